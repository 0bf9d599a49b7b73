"""Training speed of `wm` against PyTorch on the same CPU, same shapes, side by side.

    pip install -e '.[bench]'          # PyTorch 2.13 (CPU)
    python benchmarks/torch_parity.py                       # every shape, 3 rounds
    python benchmarks/torch_parity.py --shapes tf_ref,lstm_ref --rounds 5

Each (shape, framework) run is its own subprocess, and the two frameworks
alternate (their order flips every round), so both see the same machine load
on a shared host; the table gives the median tokens/s of each and the median
of the per-round ratios (wm / PyTorch) with their range.

Both sides train the same byte-level language model (vocabulary 256, float32)
with AdamW and global-norm clipping on the same random batches:

- Transformer: token embedding scaled by sqrt(d), pre-norm blocks (RMSNorm,
  rotary grouped-query causal attention, GELU-tanh MLP of 4d), final RMSNorm,
  output head tied to the embedding: `wm.models.transformer`.
- LSTM: embedding, stacked LSTM, RMSNorm, tied head: `wm.models.lstm`
  (PyTorch: `torch.nn.LSTM`, i.e. oneDNN's fused cell).

`wm` runs its real train step (`wm.step.make_setup / init_state /
make_train_step`, the function `python -m wm train` runs); PyTorch runs the
eager loop a new user writes (forward, cross-entropy, backward,
clip_grad_norm_, AdamW). PyTorch uses `--threads` threads (and OpenMP/MKL
get OMP_NUM_THREADS); XLA's CPU client sizes its pool to the machine's cores,
so keep `--threads` equal to the core count (2 on our machines). For `wm` it also
reports the XLA compile time of the train step (from jax.monitoring) and the
latency of the first call (trace + compile + one step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# name -> (family, layers, d, heads, kv_heads, seq_len, batch)
SHAPES = {
    "tf_small": ("transformer", 2, 128, 4, 2, 128, 16),
    "tf_ref": ("transformer", 6, 256, 4, 4, 256, 16),
    "tf_gqa": ("transformer", 4, 256, 8, 2, 256, 8),
    "lstm_small": ("lstm", 1, 256, 0, 0, 128, 16),
    "lstm_ref": ("lstm", 2, 512, 0, 0, 256, 32),
}
VOCAB = 256
LR, B1, B2, EPS, WD, CLIP = 1e-3, 0.9, 0.98, 1e-9, 0.1, 1.0


def _batches(seq_len: int, batch: int, n: int = 4):
  import numpy as np
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    tok = rng.integers(0, VOCAB, (batch, seq_len + 1), dtype=np.int32)
    out.append({"inputs": tok[:, :-1], "targets": tok[:, 1:], "weights": np.ones((batch, seq_len), np.float32)})
  return out


def _timed_loop(step, batches, min_seconds: float, min_steps: int, block) -> tuple[int, float]:
  """Runs `step` on the batches in turn until both minimums are met; returns (steps, seconds)."""
  n, start = 0, time.perf_counter()
  while True:
    out = step(batches[n % len(batches)])
    n += 1
    if n >= min_steps:
      block(out)
      elapsed = time.perf_counter() - start
      if elapsed >= min_seconds:
        return n, elapsed


# ----------------------------------------------------------------------------- wm


def wm_config(name: str):
  from wm.config import base_config, validate
  family, layers, d, heads, kv_heads, seq_len, batch = SHAPES[name]
  c = base_config()
  c.data.task = "text"
  c.data.vocab_size = VOCAB
  c.data.seq_len, c.data.batch_size = seq_len, batch
  c.model.name, c.model.layers, c.model.d = family, layers, d
  if family == "transformer":
    c.model.heads, c.model.kv_heads, c.model.mlp_ratio = heads, kv_heads, 4
  c.optim.name, c.optim.lr, c.optim.b1, c.optim.b2, c.optim.eps = "adamw", LR, B1, B2, EPS
  c.optim.weight_decay, c.optim.clip_norm = WD, CLIP
  c.optim.schedule, c.optim.warmup_steps = "constant", 0
  c.mesh.num_devices = 1
  return validate(c)


def run_wm(name: str, min_seconds: float, min_steps: int) -> dict:
  import jax
  import jax.monitoring

  compile_s = []

  def listen(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compile_s.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listen)
  from wm import step as step_lib

  config = wm_config(name)
  setup = step_lib.make_setup(config)
  state = step_lib.init_state(setup)
  train_step = step_lib.make_train_step(setup)
  batches = [step_lib.global_batch(setup, b) for b in _batches(config.data.seq_len, config.data.batch_size)]
  jax.block_until_ready(batches)
  compile_s.clear()  # only the train step's compile from here on

  t0 = time.perf_counter()
  state, metrics = train_step(state, batches[0])
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t0
  step_compile = sum(compile_s)
  for b in batches[1:]:  # warm-up: every batch buffer seen once
    state, metrics = train_step(state, b)
  jax.block_until_ready(metrics)

  holder = {"state": state}

  def one(batch):
    holder["state"], m = train_step(holder["state"], batch)
    return m

  n, elapsed = _timed_loop(one, batches, min_seconds, min_steps, jax.block_until_ready)
  loss = float(jax.device_get(one(batches[0])["loss"]))
  return {"steps": n, "seconds": elapsed, "compile_s": step_compile, "first_step_s": first, "loss": loss}


# ----------------------------------------------------------------------------- PyTorch


def torch_model(name: str):
  import math
  import torch
  from torch import nn
  import torch.nn.functional as F

  family, layers, d, heads, kv_heads, seq_len, _ = SHAPES[name]

  class Rope(nn.Module):
    def __init__(self, e, t, base=10_000.0):
      super().__init__()
      inv = base ** (-torch.arange(e // 2, dtype=torch.float32) * 2.0 / e)
      ang = torch.arange(t, dtype=torch.float32)[:, None] * inv  # [t, e/2]
      self.register_buffer("cos", ang.cos()[None, None], persistent=False)  # [1, 1, t, e/2]
      self.register_buffer("sin", ang.sin()[None, None], persistent=False)

    def forward(self, x):  # [b, h, t, e], half-split pairs as in wm.models.layers.rope
      x1, x2 = x.chunk(2, dim=-1)
      return torch.cat([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], dim=-1)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.e = d // heads
      self.attn_norm, self.mlp_norm = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
      self.q = nn.Linear(d, heads * self.e, bias=False)
      self.k = nn.Linear(d, kv_heads * self.e, bias=False)
      self.v = nn.Linear(d, kv_heads * self.e, bias=False)
      self.o = nn.Linear(heads * self.e, d, bias=False)
      self.up = nn.Linear(d, 4 * d, bias=False)
      self.down = nn.Linear(4 * d, d, bias=False)
      self.rope = Rope(self.e, seq_len)

    def forward(self, x):
      b, t, _ = x.shape
      h = self.attn_norm(x)
      q = self.rope(self.q(h).view(b, t, heads, self.e).transpose(1, 2))
      k = self.rope(self.k(h).view(b, t, kv_heads, self.e).transpose(1, 2))
      v = self.v(h).view(b, t, kv_heads, self.e).transpose(1, 2)
      ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
      x = x + self.o(ctx.transpose(1, 2).reshape(b, t, d))
      return x + self.down(F.gelu(self.up(self.mlp_norm(x)), approximate="tanh"))

  class LM(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(VOCAB, d)
      nn.init.normal_(self.embed.weight, std=1 / math.sqrt(d))
      if family == "transformer":
        self.body = nn.ModuleList([Block() for _ in range(layers)])
      else:
        self.body = nn.LSTM(d, d, num_layers=layers, batch_first=True)
      self.norm = nn.RMSNorm(d, eps=1e-6)

    def forward(self, tokens):
      x = self.embed(tokens) * math.sqrt(d)
      if family == "transformer":
        for block in self.body:
          x = block(x)
      else:
        x, _ = self.body(x)
      return self.norm(x) @ self.embed.weight.T  # tied output head

  return LM()


def run_torch(name: str, min_seconds: float, min_steps: int, threads: int) -> dict:
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  _, _, _, _, _, seq_len, batch = SHAPES[name]
  model = torch_model(name)
  opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
  batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in _batches(seq_len, batch)]

  def one(b):
    logits = model(b["inputs"].long())
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), b["targets"].reshape(-1).long())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return loss

  t0 = time.perf_counter()
  one(batches[0])
  first = time.perf_counter() - t0
  for b in batches[1:]:
    one(b)
  n, elapsed = _timed_loop(one, batches, min_seconds, min_steps, lambda out: None)
  return {"steps": n, "seconds": elapsed, "first_step_s": first, "loss": float(one(batches[0]))}


# ----------------------------------------------------------------------------- driver


def worker(args) -> None:
  if args.worker == "wm":
    out = run_wm(args.shape, args.min_seconds, args.min_steps)
  else:
    out = run_torch(args.shape, args.min_seconds, args.min_steps, args.threads)
  _, _, _, _, _, seq_len, batch = SHAPES[args.shape]
  out["tokens_per_s"] = out["steps"] * seq_len * batch / out["seconds"]
  print("RESULT " + json.dumps(out), flush=True)


def spawn(framework: str, shape: str, args) -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  # Same thread count on both sides: PyTorch's intra-op pool (set in the
  # worker) and XLA's CPU Eigen pool plus OpenMP/MKL for oneDNN.
  env["OMP_NUM_THREADS"] = str(args.threads)
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--shape", shape,
         "--min-seconds", str(args.min_seconds), "--min-steps", str(args.min_steps), "--threads", str(args.threads)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.getcwd())
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{framework} {shape} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
  p.add_argument("--rounds", type=int, default=3, help="alternating (wm, PyTorch) pairs per shape")
  p.add_argument("--min-seconds", type=float, default=15.0, help="timed window per run")
  p.add_argument("--min-steps", type=int, default=5)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--json", default="", help="also write every run as JSON lines here")
  p.add_argument("--worker", choices=["wm", "torch"], help=argparse.SUPPRESS)
  p.add_argument("--shape", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)

  import jax
  import torch
  print(f"jax {jax.__version__}, torch {torch.__version__}, threads {args.threads}, {os.cpu_count()} cpus, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  rows, records = [], []
  for shape in args.shapes.split(","):
    wm_runs, torch_runs = [], []
    for r in range(args.rounds):
      order = ("wm", "torch") if r % 2 == 0 else ("torch", "wm")
      got = {f: spawn(f, shape, args) for f in order}
      wm_runs.append(got["wm"])
      torch_runs.append(got["torch"])
      for f in order:
        records.append({"shape": shape, "round": r, "framework": f, **got[f]})
      print(f"  {shape} round {r}: wm {got['wm']['tokens_per_s']:.0f} tok/s, "
            f"torch {got['torch']['tokens_per_s']:.0f} tok/s, load average {os.getloadavg()[0]:.1f}", flush=True)
    ratios = [w["tokens_per_s"] / t["tokens_per_s"] for w, t in zip(wm_runs, torch_runs)]
    med = lambda runs, k: statistics.median(x[k] for x in runs)
    rows.append((shape, med(wm_runs, "tokens_per_s"), med(torch_runs, "tokens_per_s"), statistics.median(ratios),
                 min(ratios), max(ratios), med(wm_runs, "compile_s"), med(wm_runs, "first_step_s"),
                 med(torch_runs, "first_step_s")))
  if args.json:
    with open(args.json, "w") as f:
      for rec in records:
        f.write(json.dumps(rec) + "\n")

  print()
  print("| shape | family, layers, d, heads/kv, T, batch | wm tok/s | PyTorch tok/s | wm/PyTorch (min-max) "
        "| wm compile s | wm first step s | PyTorch first step s |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for shape, w, t, ratio, lo, hi, comp, first, tfirst in rows:
    fam, layers, d, heads, kv, seq, batch = SHAPES[shape]
    desc = f"{fam} {layers}x{d}" + (f" {heads}/{kv}h" if fam == "transformer" else "") + f" T={seq} b={batch}"
    print(f"| {shape} | {desc} | {w:,.0f} | {t:,.0f} | {ratio:.2f} ({lo:.2f}-{hi:.2f}) | {comp:.1f} | {first:.1f} "
          f"| {tfirst:.2f} |")


if __name__ == "__main__":
  main()
