"""Remat policies side by side: compiled bytes and measured step time against no remat.

    python benchmarks/remat.py [--quick] [--steps 3] [--out results/remat.md]

For the Transformer (12 layers, sequence length 1024) and the LSTM, every
policy is compiled (wm.memory.measure.compiled: temp and total bytes per
device) and run for a few steps on real arrays (median wall time of a step
after one warm-up step). Ratios are against `none` of the same model, in the
same run, so machine load affects both sides alike. Prints a Markdown table
(and writes it to --out).

Acceptance (issue #4): on the 12-layer Transformer, `full` cuts compiled temp
at least 5x against `none`, at a step time at most 1.4x.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from wm import config as config_lib  # noqa: E402
from wm import step as step_lib  # noqa: E402
from wm.config import format_bytes  # noqa: E402
from wm.memory import estimate as estimate_lib, measure  # noqa: E402


def transformer_config(quick: bool):
  c = config_lib.base_config()
  c.data.task = "text"
  c.data.seq_len = 256 if quick else 1024
  c.data.batch_size = 2
  c.model.name = "transformer"
  c.model.d = 128
  c.model.layers = 4 if quick else 12
  c.model.heads = c.model.kv_heads = 4
  c.mesh.num_devices = 1
  return c


def lstm_config(quick: bool):
  c = config_lib.base_config()
  c.data.task = "text"
  c.data.seq_len = 256 if quick else 1024
  c.data.batch_size = 4
  c.model.name = "lstm"
  c.model.d = 128
  c.model.layers = 2
  c.mesh.num_devices = 1
  return c


CASES = {
    "transformer": (transformer_config, [("none", 0), ("dots", 0), ("dots_no_batch", 0), ("full", 0),
                                         ("save:qkv", 0), ("save:attn_context", 0), ("save:attn_out", 0),
                                         ("save:mlp_hidden", 0)]),
    "lstm": (lstm_config, [("none", 0), ("dots", 0), ("full", 0), ("save:gates", 0), ("save:h", 0),
                           ("none", -1), ("full", -1)]),
}


def step_seconds(config, steps: int) -> float:
  """Median wall time of one train step on random tokens, after a warm-up (compile) step."""
  setup = step_lib.make_setup(config)
  state = step_lib.init_state(setup)
  train_step = step_lib.make_train_step(setup)
  rng = np.random.default_rng(0)
  b, t, v = config.data.batch_size, config.data.seq_len, config.data.vocab_size
  batch = step_lib.global_batch(setup, {"inputs": rng.integers(0, v, (b, t), dtype=np.int32),
                                        "targets": rng.integers(0, v, (b, t), dtype=np.int32),
                                        "weights": np.ones((b, t), np.float32)})
  state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(models: list[str], quick: bool, steps: int) -> list[dict]:
  rows = []
  for name in models:
    make, policies = CASES[name]
    base = None
    for policy, chunk in policies:
      config = make(quick)
      config.remat.policy, config.remat.time_chunk = policy, chunk
      config = config_lib.validate(config)
      comp = measure.compiled(config)
      est = estimate_lib.estimate(config)
      seconds = step_seconds(config, steps)
      row = {"model": name, "policy": policy + (" + time_chunk sqrt(T)" if chunk else ""), "temp": comp["temp_size_in_bytes"],
             "total": comp["total_bytes"], "estimate": est.total, "seconds": seconds,
             "shape": f"{config.model.layers}L d={config.model.d} B={config.data.batch_size} T={config.data.seq_len}"}
      base = base or row
      row["temp_ratio"] = base["temp"] / row["temp"]
      row["time_ratio"] = row["seconds"] / base["seconds"]
      rows.append(row)
      print(f"  {name:12s} {row['policy']:32s} temp {format_bytes(row['temp']):>11}  step {seconds:.3f}s",
            file=sys.stderr, flush=True)
  return rows


def markdown(rows: list[dict]) -> str:
  lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
           f"jax {jax.__version__} ({jax.default_backend()}); per device, f32, AdamW.", "",
           "| model | shape | policy | compiled temp | none / policy (temp) | compiled total | estimate | "
           "step time | time / none |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['shape']} | {r['policy']} | {format_bytes(r['temp'])} | {r['temp_ratio']:.2f}x | "
                 f"{format_bytes(r['total'])} | {format_bytes(r['estimate'])} | {r['seconds']:.3f} s | "
                 f"{r['time_ratio']:.2f}x |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="smaller shapes (a few minutes on 2 cores)")
  parser.add_argument("--steps", type=int, default=2, help="timed steps per policy (after one warm-up)")
  parser.add_argument("--models", default="transformer,lstm")
  parser.add_argument("--out", help="also write the Markdown table here")
  args = parser.parse_args(argv)
  rows = run(args.models.split(","), args.quick, args.steps)
  table = markdown(rows)
  print(table)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(table + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
