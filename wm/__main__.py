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

Config fields are set after --config with --config.FIELD=VALUE (or --config.FIELD VALUE);
a value is read as the type of the field's default, and a tuple field such as
mesh.rules takes JSON: --config.mesh.rules='[["batch", ["data", "fsdp"]], ["latent", null]]'.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging as absl_logging
import ml_collections
from ml_collections import config_flags

VERBS = ("train", "prepare", "memory", "compile", "generate", "export")
_CONFIG_SPEC = "configs/NAME.py[:ARG]"
_TUPLE_EXAMPLE = '[["batch", ["data", "fsdp"]], ["latent", null]]'


class _JsonTuple(flags.ArgumentParser):
  """Tuple fields (mesh.rules) from JSON, as before config_flags.

  config_flags' own tuple parser reads Python literals (no `null`) and turns
  text it cannot read into a one-string tuple, so a typo would reach
  validation as a puzzling "rule" rather than an error naming the syntax.
  """

  def parse(self, argument: Any) -> tuple:
    if isinstance(argument, (tuple, list)):
      return tuple(argument)
    value = json.loads(argument)  # a JSONDecodeError is a ValueError: absl reports the flag
    if not isinstance(value, list):
      raise ValueError(f"expected a JSON list such as {_TUPLE_EXAMPLE}")
    return tuple(value)

  def flag_type(self) -> str:
    return "JSON list"


class _Bool(flags.BooleanParser):
  """Bool fields as before config_flags: absl's spellings (true/false, t/f, 1/0) and yes/no."""

  def parse(self, argument: Any) -> bool:
    if isinstance(argument, str) and argument.lower() in ("yes", "no"):
      return argument.lower() == "yes"
    return super().parse(argument)


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  """Declares the command line on `flag_values`; `argv` (program name first) is where config_flags finds overrides."""
  # ml_collections keeps one table of field parsers per process; ours differ for tuples and bools.
  config_flags.register_flag_parser_for_type(tuple, _JsonTuple())
  config_flags.register_flag_parser_for_type(bool, _Bool())
  config_flags.DEFINE_config_file("config", None, f"{_CONFIG_SPEC} (every verb but export)",
                                  flag_values=flag_values, sys_argv=argv)
  define = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer, "bool": flags.DEFINE_boolean}
  for kind, name, default, help_text in (
      ("string", "workdir", None, "records and checkpoints (train, generate, export)"),
      ("string", "out", None, "export: the new workdir for the merged model"),
      ("string", "budget", None, "per-device training-memory budget, e.g. 2GiB (train, memory)"),
      ("string", "allow", None, "with --budget: levers the planner may add, e.g. adamw8bit,share_layers "
                                "(the same as --config.train.budget_allow)"),
      ("integer", "devices", None, "memory: plan for this many devices (CPU host devices are faked)"),
      ("bool", "json", False, "memory/compile: print JSON instead of a table"),
      ("string", "topology", None, "compile: TPU topology such as v5e:2x2 or v5p:2x2x1"),
      ("string", "target", None, "memory: plan and confirm for this target, e.g. v5e:4x4 (default: this host)"),
      ("bool", "explain", False, "memory: list the largest buffers of the compiled step"),
      ("bool", "grow", False, "memory: with --budget, the largest model of the config's family that fits it"),
      ("integer", "num_samples", 4, "generate: sequences to sample"),
      ("integer", "length", 128, "generate: tokens per sample"),
      ("string", "prompt", "", "generate: text to continue (byte-level models)"),
      ("string", "tokenizer", None, "text: 'bytes' or 'spm:N', the same as --config.data.tokenizer"),
  ):
    define[kind](name, default, help_text, flag_values=flag_values)


def _joined(argv: list[str]) -> list[str]:
  """`--config.FIELD VALUE` as `--config.FIELD=VALUE`.

  absl reads a bool field's flag alone as True, so without this
  `--config.model.tie_embeddings false` would set True and leave `false`
  behind as a stray argument; every other field takes the next argument anyway.
  """
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if (arg.startswith("--config.") and "=" not in arg and i + 1 < len(argv)
        and not argv[i + 1].startswith("--")):
      out.append(f"{arg}={argv[i + 1]}")
      i += 2
    else:
      out.append(arg)
      i += 1
  return out


def _spec_and_overrides(argv: list[str]) -> tuple[str | None, dict[str, str]]:
  """The --config value and the `--config.FIELD=VALUE` strings, read off a joined argv for error messages."""
  spec, overrides = None, {}
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg.startswith("--config.") and "=" in arg:
      key, value = arg[len("--config."):].split("=", 1)
      overrides[key] = value
  return spec, overrides


def _explain(error: BaseException, argv: list[str]) -> str:
  """One line for a command line that absl or config_flags refused, naming the field or flag and the fix.

  A config file or override that config_flags refuses is loaded again by
  wm.config, whose errors name the field and its neighbours (config_flags
  reports an unknown field as a bare KeyError, a broken file as a traceback).
  """
  from wm import config as config_lib
  spec, overrides = _spec_and_overrides(argv)
  stray = [a for a in argv if a.startswith("--config.")]
  if spec is None and stray:
    if "export" in argv:
      return "export reads the config of --workdir; --config.FIELD overrides do not apply"
    return f"{stray[0]} sets a field of --config; give --config {_CONFIG_SPEC} before it"
  if spec is not None:
    try:
      config_lib.override(config_lib.load(spec), overrides)
    except config_lib.ConfigError as e:
      return str(e)
  message = str(error).strip() or type(error).__name__
  missing = re.match(r"Missing value for flag (\S+)", message)
  if missing:
    return f"{missing.group(1)} needs a value"
  early = re.match(r"Found (\S+) in argv before a value for --config", message)  # config_flags' FlagOrderError
  if early:
    return f"{early.group(1)} comes before --config; put --config {_CONFIG_SPEC} first"
  if isinstance(error, flags.UnrecognizedFlagError):
    return f"unrecognised argument --{error.flagname}; see python -m wm --help"
  bad_field = re.match(r"flag --config\.(\S+?)=(.*?): (.*)", message, re.S)
  if bad_field:  # a value wm.config would take but absl's parser does not (a bool spelt yes)
    return f"config.{bad_field.group(1)}={bad_field.group(2)!r}: {bad_field.group(3).splitlines()[0]}"
  return message.splitlines()[0]


def usage() -> str:
  fv = flags.FlagValues()
  define_flags(fv, ["wm"])
  return f"usage: python -m wm VERB [flags]\n{__doc__}\nflags:\n{fv.get_help(include_special_flags=False)}"


def parse(argv: list[str]) -> tuple[str, flags.FlagValues]:
  """The verb and the parsed flags (a FlagValues of their own, so one process may parse many command lines).

  Raises:
    ConfigError: with one line naming the flag or field and the fix.
  """
  from wm.config import ConfigError
  argv = ["python -m wm", *_joined(argv)]
  fv = flags.FlagValues()
  define_flags(fv, argv)
  try:
    rest = fv(argv)[1:]
    config = fv.config
  except Exception as e:  # pylint: disable=broad-except  # a config file is user code: any failure is bad input
    raise ConfigError(_explain(e, argv)) from None
  if fv["config"].present and not isinstance(config, ml_collections.ConfigDict):
    # config_flags defers a missing file until the config is used, and takes whatever get_config returns.
    raise ConfigError(_explain(TypeError(f"--config {fv['config'].serialize()} gave no ConfigDict"), argv))
  if not rest:
    raise ConfigError(f"a verb is needed: python -m wm {{{','.join(VERBS)}}} --config {_CONFIG_SPEC} ...")
  if rest[0] not in VERBS:
    raise ConfigError(f"invalid choice {rest[0]!r} for the verb; choose from {', '.join(VERBS)}")
  if len(rest) > 1:
    raise ConfigError(f"unrecognised argument {rest[1]!r}; config fields are set with --config.FIELD=VALUE")
  return rest[0], fv


def _check_args(verb: str, args: flags.FlagValues) -> str | None:
  """Problems with the verb's own flags, as one message (None when fine)."""
  has_config = args["config"].present
  if verb == "export":
    if has_config:
      return "export reads the config of --workdir (its config.json); drop --config"
  elif not has_config:
    return f"{verb} needs --config {_CONFIG_SPEC}"
  if verb in ("train", "generate", "export") and not args.workdir:
    return f"{verb} needs --workdir DIR"
  if verb == "export" and not args.out:
    return "export needs --out DIR, the new workdir for the merged model"
  if args.out and verb != "export":
    return f"--out applies to export, not {verb}"
  if verb == "generate":
    if args.length < 1:
      return f"--length {args.length}: generate needs a positive number of tokens"
    if args.num_samples < 1:
      return f"--num_samples {args.num_samples}: generate needs at least one sample"
  if args.devices is not None and args.devices < 1:
    return f"--devices {args.devices}: needs a positive number of devices"
  if args.budget is not None and verb not in ("train", "memory"):
    return f"--budget applies to train and memory, not {verb}"
  if args.tokenizer is not None and verb not in ("prepare", "train"):
    return f"--tokenizer applies to prepare and train, not {verb} (set --config.data.tokenizer)"
  if (args.target or args.explain or args.grow) and verb != "memory":
    return f"--target, --explain and --grow apply to memory, not {verb}"
  if args.allow and not args.budget:
    return "--allow needs --budget: it names levers the memory planner may add to fit one"
  if args.grow and not args.budget:
    return "--grow needs --budget: the model grows to the largest that fits it"
  if args.grow and args.target:
    return "--grow plans on this host's devices; --target is not supported with it yet"
  return None


def main(argv: list[str]) -> int:
  """Runs one verb; returns the exit code. Bad input raises one of `user_errors()`."""
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
    print(usage())
    return 0
  verb, args = parse(argv)
  problem = _check_args(verb, args)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  if verb == "export":
    from wm import finetune
    print(json.dumps(finetune.export(args.workdir, args.out)))
    return 0
  if verb == "memory" and args.devices:
    # Must happen before JAX initialises its backends.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
  from wm import config as config_lib
  config = args.config  # loaded and overridden by config_flags; judged here by wm.config
  if args.budget:
    config = config_lib.override(config, {"train.budget": args.budget})
  if args.allow:
    config = config_lib.override(config, {"train.budget_allow": args.allow})
  if args.tokenizer:
    config = config_lib.override(config, {"data.tokenizer": args.tokenizer})
  config = config_lib.validate(config)

  if verb == "train":
    from wm import train
    result = train.train_and_evaluate(config, args.workdir)
    print(json.dumps({"step": result["step"], "eval": result["eval"]}))
  elif verb == "prepare":
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
  elif verb == "memory":
    if args.grow:
      from wm.memory import grow
      return grow.main(config, args.budget, as_json=args.json)
    from wm.memory import report
    return report.main(config, budget=args.budget, as_json=args.json, target=args.target,
                       explain_top=15 if args.explain else 0)
  elif verb == "compile":
    from wm.memory import aot
    return aot.main(config, topology=args.topology, as_json=args.json)
  elif verb == "generate":
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
  2 bad input, 130 interrupted, 143 stopped by SIGTERM after checkpointing
  (wm.preemption; rerun the same command to resume). WM_TRACEBACK=1 in the
  environment shows the traceback of a bad-input error too (for debugging wm
  itself).
  """
  argv = sys.argv[1:] if argv is None else argv
  try:
    return main(argv)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except SystemExit as e:  # generate's own checks
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
    if isinstance(e, train.Preempted):
      print(e, file=sys.stderr)
      return 143
    if isinstance(e, user_errors()) and not os.environ.get("WM_TRACEBACK"):
      print(f"error: {_one_line(e)}", file=sys.stderr)
      return 2
    raise


def _one_line(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename and e.strerror:
    return f"{e.filename}: {e.strerror}"
  return str(e) or type(e).__name__


def _absl_defaults(argv: list[str]) -> list[str]:
  """app.run's flags_parser: absl's own flags (logging, --pdb) at their defaults; wm's flags are `parse`'s.

  wm's flags live on a FlagValues per command line rather than on the global
  FLAGS, which absl parses once per process: tests and experiments call `run`
  many times in one process, and config_flags must see each command line's
  overrides when the flags are declared.
  """
  flags.FLAGS(argv[:1])
  # app.run raises a default verbosity to INFO, where Orbax logs a dozen lines per checkpoint;
  # the command line printed warnings and errors only before absl.app, and still does.
  absl_logging.set_verbosity(absl_logging.WARNING)
  return argv


if __name__ == "__main__":
  app.run(lambda argv: run(argv[1:]), flags_parser=_absl_defaults)
