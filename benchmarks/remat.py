"""Remat policies side by side: compiled bytes and measured step time against no remat.

    python benchmarks/remat.py [--quick] [--steps 3] [--out results/remat.md]

For the Transformer (12 layers, sequence length 1024) and the LSTM, every
policy's train step is compiled once (wm.memory.measure.compiled_step: temp
and total bytes per device) and that executable is run on real arrays: after
a warm-up step, steps of the policy alternate with steps of `none` and the
time ratio is the median of the per-round ratios, so a shared machine's
drifting load affects both sides alike. Prints a Markdown table (and writes
it to --out).

What it is held to: on the 12-layer Transformer, `full` cuts compiled temp
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


class Runner:
  """One compiled train step with its own state and batch; `step()` times one call.

  The executable is the one measure.compiled_step compiles (the figure in the
  table), called directly: no second compile for the timing.
  """

  def __init__(self, config):
    self.exe, setup = measure.compiled_step(config)
    self.memory = measure.memory_fields(self.exe)
    self.state = step_lib.init_state(setup)
    rng = np.random.default_rng(0)
    b, t, v = config.data.batch_size, config.data.seq_len, config.data.vocab_size
    self.batch = step_lib.global_batch(setup, {"inputs": rng.integers(0, v, (b, t), dtype=np.int32),
                                               "targets": rng.integers(0, v, (b, t), dtype=np.int32),
                                               "weights": np.ones((b, t), np.float32)})
    self.step()  # warm-up

  def step(self) -> float:
    start = time.perf_counter()
    self.state, metrics = self.exe(self.state, self.batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def run(models: list[str], quick: bool, steps: int) -> list[dict]:
  """Per policy: compiled bytes, and step time measured alternately with `none`'s.

  Alternating none / policy steps (median of the per-round ratios) keeps the
  ratio honest on a shared machine whose load drifts during the run.
  """
  rows = []
  for name in models:
    make, policies = CASES[name]
    base = None
    for policy, chunk in policies:
      config = make(quick)
      config.remat.policy, config.remat.time_chunk = policy, chunk
      config = config_lib.validate(config)
      runner = Runner(config)
      est = estimate_lib.estimate(config)
      if base is None:
        base, base_row = runner, None
        times, ratios = [runner.step() for _ in range(steps)], [1.0]
      else:
        times, ratios = [], []
        for _ in range(steps):
          t_none = base.step()
          times.append(runner.step())
          ratios.append(times[-1] / t_none)
      row = {"model": name, "policy": policy + (" + time_chunk sqrt(T)" if chunk else ""),
             "temp": runner.memory["temp_size_in_bytes"], "total": runner.memory["total_bytes"],
             "estimate": est.total, "seconds": statistics.median(times), "time_ratio": statistics.median(ratios),
             "shape": f"{config.model.layers}L d={config.model.d} B={config.data.batch_size} T={config.data.seq_len}"}
      base_row = base_row or row
      row["temp_ratio"] = base_row["temp"] / row["temp"]
      rows.append(row)
      if runner is not base:
        del runner  # frees its state; `none` stays for the next comparison
      print(f"  {name:12s} {row['policy']:32s} temp {format_bytes(row['temp']):>11}  step {row['seconds']:.3f}s "
            f"({row['time_ratio']:.2f}x none)", file=sys.stderr, flush=True)
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
  parser.add_argument("--steps", type=int, default=2, help="timed rounds per policy (after one warm-up)")
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
