"""Attention implementations side by side: compiled train-step memory and the loss they compute.

    python benchmarks/attention.py [--lengths 1024 8192] [--block 512] [--out results/attention.md]

For each sequence length, the Transformer's train step (wm.step, AdamW, f32,
no layer remat) is compiled with `model.attention=xla` and `=chunked`
(wm.memory.measure.compiled: temp and the backend's bound, per device), and
the loss of one batch is evaluated with the same parameters under both, so
the table shows the bytes saved and that the numbers did not change.

What it is held to: at T = 8192, chunked's compiled temp is at most a
quarter of xla's, with the same loss to float tolerance.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's wm, not an installed one

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from wm import config as config_lib  # noqa: E402
from wm import models  # noqa: E402
from wm.config import format_bytes  # noqa: E402
from wm.memory import measure  # noqa: E402


def make_config(length: int, attention: str, block: int):
  c = config_lib.base_config()
  c.data.task = "text"
  c.data.seq_len = length
  c.data.batch_size = 1
  c.model.name = "transformer"
  c.model.d, c.model.layers, c.model.heads, c.model.kv_heads = 128, 2, 4, 4
  c.model.attention, c.model.attention_block = attention, block
  c.mesh.num_devices = 1
  return config_lib.validate(c)


def loss_of(config) -> float:
  """Loss of one fixed batch with parameters from seed 0 (the same for every implementation)."""
  model = models.build(config, nnx.Rngs(0))
  t, v = config.data.seq_len, config.data.vocab_size
  batch = {"inputs": jax.random.randint(jax.random.key(1), (1, t), 0, v),
           "targets": jax.random.randint(jax.random.key(2), (1, t), 0, v), "weights": jnp.ones((1, t))}
  out = nnx.jit(lambda m, b: m.loss(b, train=False))(model, batch)
  return float(out[0] if isinstance(out, tuple) else out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
  parser.add_argument("--block", type=int, default=512)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}); "
           f"2 layers, d=128, 4 heads, batch 1, f32, AdamW, remat none.", "",
           "| T | attention | compiled temp | bound | temp / xla | loss |",
           "|---:|---|---:|---:|---:|---:|"]
  for t in args.lengths:
    temps = {}
    for impl in ("xla", "chunked"):
      config = make_config(t, impl, args.block)
      comp = measure.compiled(config)
      temps[impl] = comp["temp_size_in_bytes"]
      label = impl if impl == "xla" else f"chunked (block {args.block})"
      lines.append(f"| {t} | {label} | {format_bytes(comp['temp_size_in_bytes'])} | {format_bytes(comp['bound_bytes'])} "
                   f"| {temps[impl] / temps['xla']:.3f} | {loss_of(config):.6f} |")
      print(lines[-1], flush=True)
  text = "\n".join(lines)
  print("\n" + text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
