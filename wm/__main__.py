"""Command line: `python -m wm VERB --config configs/NAME.py[:ARG] [--config.FIELD=VALUE ...]`.

Verbs:
  train     train and evaluate; records and checkpoints in --workdir (resumes if it can)
  prepare   prepare the config's dataset (synthetic tasks, local text) as TFDS array_record
  memory    per-device bytes: analytic estimate beside the compiler's figure; with --budget, a plan
  compile   ahead-of-time compile of the train step for a TPU topology, from a CPU host
  generate  sample from a trained model in --workdir
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
  parser = argparse.ArgumentParser(prog="python -m wm", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("verb", choices=["train", "prepare", "memory", "compile", "generate"])
  parser.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
  parser.add_argument("--workdir", help="records and checkpoints (train, generate)")
  parser.add_argument("--budget", help="per-device training-memory budget, e.g. 2GiB (train, memory)")
  parser.add_argument("--devices", type=int, help="memory: plan for this many devices (CPU host devices are faked)")
  parser.add_argument("--json", action="store_true", help="memory/compile: print JSON instead of a table")
  parser.add_argument("--topology", help="compile: TPU topology such as v5e:2x2 or v5p:2x2x1")
  parser.add_argument("--num_samples", type=int, default=4, help="generate: sequences to sample")
  parser.add_argument("--length", type=int, default=128, help="generate: tokens per sample")
  parser.add_argument("--prompt", default="", help="generate: text to continue (byte-level models)")
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


def main(argv: list[str]) -> int:
  args, overrides = _parse(argv)
  if args.verb == "memory" and args.devices:
    # Must happen before JAX initialises its backends.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}").strip()
  from wm import config as config_lib
  try:
    config = config_lib.load(args.config)
    config = config_lib.override(config, overrides)
    if args.budget:
      config = config_lib.override(config, {"train.budget": args.budget})
    config = config_lib.validate(config)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  if args.verb == "train":
    if not args.workdir:
      print("error: train needs --workdir DIR", file=sys.stderr)
      return 2
    from wm import train
    result = train.train_and_evaluate(config, args.workdir)
    print(json.dumps({"step": result["step"], "eval": result["eval"]}))
  elif args.verb == "prepare":
    from wm.data import pipeline
    pipeline.prepare(config, allow_build=True)
    print(f"prepared {config.data.task} in {pipeline.data_dir(config)}")
  elif args.verb == "memory":
    from wm.memory import report
    return report.main(config, budget=args.budget, as_json=args.json)
  elif args.verb == "compile":
    from wm.memory import aot
    return aot.main(config, topology=args.topology, as_json=args.json)
  elif args.verb == "generate":
    from wm import generate
    return generate.main(config, args.workdir, num_samples=args.num_samples, length=args.length,
                         prompt=args.prompt)
  return 0


def run() -> None:
  from wm import config as config_lib
  from wm.data import pipeline
  from wm import train
  try:
    sys.exit(main(sys.argv[1:]))
  except (config_lib.ConfigError, pipeline.DatasetNotPrepared, train.IncompatibleWorkdir) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
