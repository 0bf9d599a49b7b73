"""Loss curve of a sharded run against the same config on one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python benchmarks/sharding_parity.py --config configs/text_transformer.py:quick --mesh fsdp=4,tensor=2

Trains the first `--steps` steps twice (one device; then the given mesh over
all devices), logging every step, and prints both loss sequences, their
relative difference and the time per step. Records go to --out/{single,sharded}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import jax

from wm import config as config_lib
from wm import train


def losses(workdir: str) -> list[tuple[int, float, float]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["loss"], r["step_time_s"]) for r in rows if r["split"] == "train"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/text_transformer.py:quick")
  parser.add_argument("--mesh", default="fsdp=4,tensor=2", help="mesh axis sizes, e.g. data=2,fsdp=2,tensor=2")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--out", default="/tmp/wm_sharding_parity")
  args = parser.parse_args()
  mesh = dict(kv.split("=") for kv in args.mesh.split(","))
  shutil.rmtree(args.out, ignore_errors=True)
  common = {"train.log_every": "1", "train.progress": "false", "train.eval_every": str(10**6),
            "train.checkpoint_every": str(10**6)}
  base = config_lib.load(args.config)
  runs = {
      "single": {**common, "mesh.num_devices": "1", "mesh.data": "1"},
      "sharded": {**common, "mesh.data": "-1", **{f"mesh.{k}": v for k, v in mesh.items()}},
  }
  for name, overrides in runs.items():
    config = config_lib.validate(config_lib.override(base, overrides))
    train.train_and_evaluate(config, os.path.join(args.out, name), stop_after_step=args.steps)
  single, sharded = losses(os.path.join(args.out, "single")), losses(os.path.join(args.out, "sharded"))
  print(f"{len(jax.devices())} {jax.devices()[0].platform} devices; sharded mesh {args.mesh}\n")
  print("| step | loss, 1 device | loss, sharded | relative difference |")
  print("|---:|---:|---:|---:|")
  worst = 0.0
  for (step, a, _), (_, b, _) in zip(single, sharded):
    rel = abs(a - b) / abs(a)
    worst = max(worst, rel)
    print(f"| {step} | {a:.6f} | {b:.6f} | {rel:.2e} |")
  # The first step includes compilation; report the median of the rest.
  med = lambda rows: sorted(t for _, _, t in rows[1:])[len(rows[1:]) // 2]
  print(f"\nmax relative difference {worst:.2e}; median step time: 1 device {med(single):.3f} s, "
        f"sharded {med(sharded):.3f} s")


if __name__ == "__main__":
  main()
