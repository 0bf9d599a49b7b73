"""Command line: `python -m wm VERB --config configs/NAME.py[:ARG] [--config.FIELD=VALUE ...]`.

Verbs:
  train     train and evaluate; records and checkpoints in --workdir (resumes if it can)
  prepare   prepare the config's dataset (synthetic tasks, local text) as TFDS array_record;
            with --tokenizer spm:N, also train a subword model on its train split and tokenize it
  memory    per-device bytes: analytic estimate beside the compiler's figure; with --budget, a plan
  compile   ahead-of-time compile of the train step for a TPU topology, from a CPU host
  generate  sample from a trained model in --workdir
  export    merge a LoRA run's adapters into its base weights: a plain model's workdir at --out
            (python -m wm export --workdir RUN --out DIR; the config is RUN's own)
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
  parser = argparse.ArgumentParser(prog="python -m wm", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("verb", choices=["train", "prepare", "memory", "compile", "generate", "export"])
  parser.add_argument("--config", help="configs/NAME.py[:ARG] (every verb but export)")
  parser.add_argument("--workdir", help="records and checkpoints (train, generate, export)")
  parser.add_argument("--out", help="export: the new workdir for the merged model")
  parser.add_argument("--budget", help="per-device training-memory budget, e.g. 2GiB (train, memory)")
  parser.add_argument("--devices", type=int, help="memory: plan for this many devices (CPU host devices are faked)")
  parser.add_argument("--json", action="store_true", help="memory/compile: print JSON instead of a table")
  parser.add_argument("--topology", help="compile: TPU topology such as v5e:2x2 or v5p:2x2x1")
  parser.add_argument("--target", help="memory: plan and confirm for this target, e.g. v5e:4x4 (default: this host)")
  parser.add_argument("--explain", action="store_true", help="memory: list the largest buffers of the compiled step")
  parser.add_argument("--grow", action="store_true",
                      help="memory: with --budget, the largest model of the config's family that fits it")
  parser.add_argument("--num_samples", type=int, default=4, help="generate: sequences to sample")
  parser.add_argument("--length", type=int, default=128, help="generate: tokens per sample")
  parser.add_argument("--prompt", default="", help="generate: text to continue (byte-level models)")
  parser.add_argument("--tokenizer", help="text: 'bytes' or 'spm:N', the same as --config.data.tokenizer")
  args, rest = parser.parse_known_args(argv)
  overrides: dict[str, str] = {}
  i = 0
  while i < len(rest):
    arg = rest[i]
    if not arg.startswith("--config."):
      parser.error(f"unrecognised argument {arg!r}; config fields are set with --config.FIELD=VALUE")
    if "=" in arg:
      key, value = arg[2:].split("=", 1)
    elif i + 1 < len(rest):
      key, value = arg[2:], rest[i + 1]
      i += 1
    else:
      parser.error(f"{arg} needs a value")
    overrides[key[len("config."):]] = value
    i += 1
  return args, overrides


def _check_args(args: argparse.Namespace) -> str | None:
  """Problems with the verb's own flags, as one message (None when fine)."""
  if args.verb == "export":
    if args.config:
      return "export reads the config of --workdir (its config.json); drop --config"
  elif not args.config:
    return f"{args.verb} needs --config configs/NAME.py[:ARG]"
  if args.verb in ("train", "generate", "export") and not args.workdir:
    return f"{args.verb} needs --workdir DIR"
  if args.verb == "export" and not args.out:
    return "export needs --out DIR, the new workdir for the merged model"
  if args.out and args.verb != "export":
    return f"--out applies to export, not {args.verb}"
  if args.verb == "generate":
    if args.length < 1:
      return f"--length {args.length}: generate needs a positive number of tokens"
    if args.num_samples < 1:
      return f"--num_samples {args.num_samples}: generate needs at least one sample"
  if args.devices is not None and args.devices < 1:
    return f"--devices {args.devices}: needs a positive number of devices"
  if args.budget is not None and args.verb not in ("train", "memory"):
    return f"--budget applies to train and memory, not {args.verb}"
  if args.tokenizer is not None and args.verb not in ("prepare", "train"):
    return f"--tokenizer applies to prepare and train, not {args.verb} (set --config.data.tokenizer)"
  if (args.target or args.explain or args.grow) and args.verb != "memory":
    return f"--target, --explain and --grow apply to memory, not {args.verb}"
  if args.grow and not args.budget:
    return "--grow needs --budget: the model grows to the largest that fits it"
  if args.grow and args.target:
    return "--grow plans on this host's devices; --target is not supported with it yet"
  return None


def main(argv: list[str]) -> int:
  """Runs one verb; returns the exit code. Bad input raises one of `user_errors()`."""
  args, overrides = _parse(argv)
  problem = _check_args(args)
  if not problem and args.verb == "export" and overrides:
    problem = "export reads the config of --workdir; --config.FIELD overrides do not apply"
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  if args.verb == "export":
    from wm import finetune
    print(json.dumps(finetune.export(args.workdir, args.out)))
    return 0
  if args.verb == "memory" and args.devices:
    # Must happen before JAX initialises its backends.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
  from wm import config as config_lib
  config = config_lib.load(args.config)
  config = config_lib.override(config, overrides)
  if args.budget:
    config = config_lib.override(config, {"train.budget": args.budget})
  if args.tokenizer:
    config = config_lib.override(config, {"data.tokenizer": args.tokenizer})
  config = config_lib.validate(config)

  if args.verb == "train":
    from wm import train
    result = train.train_and_evaluate(config, args.workdir)
    print(json.dumps({"step": result["step"], "eval": result["eval"]}))
  elif args.verb == "prepare":
    from wm.data import pipeline
    pipeline.prepare(config, allow_build=True)
    print(f"prepared {config.data.task} in {pipeline.data_dir(config)}")
    if config.data.task == "text" and config.data.tokenizer != "bytes":
      from wm.data import subword
      folder = pipeline.tokens_folder(config)
      info = subword.read_info(folder, subword.parse(config.data.tokenizer))
      print(f"{config.data.tokenizer} model and token streams in {folder}")
      for split, n in info["splits"].items():
        print(f"  {split}: {n['tokens']:,} tokens for {n['bytes']:,} bytes, "
              f"{n['tokens'] / n['bytes']:.4f} tokens/byte")
  elif args.verb == "memory":
    if args.grow:
      from wm.memory import grow
      return grow.main(config, args.budget, as_json=args.json)
    from wm.memory import report
    return report.main(config, budget=args.budget, as_json=args.json, target=args.target,
                       explain_top=15 if args.explain else 0)
  elif args.verb == "compile":
    from wm.memory import aot
    return aot.main(config, topology=args.topology, as_json=args.json)
  elif args.verb == "generate":
    from wm import generate, resume
    resume.check_generate_workdir(config, args.workdir)  # a missing or foreign workdir is one message
    return generate.main(config, args.workdir, num_samples=args.num_samples, length=args.length,
                         prompt=args.prompt)
  return 0


def user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that mean bad input (config, flags, files), reported as one line with exit code 2.

  ValueError covers every impossible value found past validation (a mesh
  that does not fit the parameters, a budget too small to plan for);
  OSError covers the filesystem (a read-only or full disk, a missing file).
  Anything else is a bug in wm and keeps its traceback.
  """
  from wm import config as config_lib
  from wm.data import pipeline
  from wm import train
  return (config_lib.ConfigError, pipeline.DatasetNotPrepared, train.IncompatibleWorkdir, train.WorkdirError,
          ValueError, OSError)


def run(argv: list[str] | None = None) -> int:
  """The console entry point: `main` with one clean message (no traceback) for bad input.

  Exit codes: 0 success, 1 the run failed (non-finite loss, budget not met),
  2 bad input, 130 interrupted. WM_TRACEBACK=1 in the environment shows the
  traceback of a bad-input error too (for debugging wm itself).
  """
  argv = sys.argv[1:] if argv is None else argv
  try:
    return main(argv)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except SystemExit as e:  # argparse (exit code 2 with its usage line) and generate's own checks
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
      return 2
    return 0 if e.code is None else e.code
  except Exception as e:  # pylint: disable=broad-except
    from wm import config as config_lib
    if isinstance(e, config_lib.ConfigError) and not os.environ.get("WM_TRACEBACK"):
      print(f"error: {e}", file=sys.stderr)  # the common case, answered without importing JAX
      return 2
    from wm import train
    if isinstance(e, train.NonFiniteLoss):
      print(f"error: {e}", file=sys.stderr)
      return 1
    if isinstance(e, user_errors()) and not os.environ.get("WM_TRACEBACK"):
      print(f"error: {_one_line(e)}", file=sys.stderr)
      return 2
    raise


def _one_line(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename and e.strerror:
    return f"{e.filename}: {e.strerror}"
  return str(e) or type(e).__name__


if __name__ == "__main__":
  sys.exit(run())
