"""The best model of each family inside a training-memory budget.

For each per-device training-memory budget and each family (LSTM language
model, Transformer, sequence VAE), the memory planner grows the model to the
largest width (and, for the Transformer, depth) that fits the budget
together with the memory levers (remat policy, microbatches, time chunks, mesh
split), confirmed by one compile (wm.memory.grow). Every point then trains on
the same text for the same number of tokens, and the figure shows validation
bits per byte, and training tokens/s, against the budget.

    python experiments/budget_sweep.py --preset quick          # 5 budgets x 3 families, 2 CPU cores
    python experiments/budget_sweep.py --preset quick --plot   # redraw from results/budget_sweep/ only
    python experiments/budget_sweep.py --preset full --shard $I/$N \\
        --set data.text_source=lm1b --set data.data_dir=/data/tfds   # a TPU VM per shard

Presets:
  quick  budgets 4-128 MiB per device on one CPU device, byte-level text of the
         offline corpus (the interpreter's standard library), sequences of
         128 bytes, batch 16, 200 steps (410k tokens) per point. The budgets are
         small because a budget sets the model's size and the model's size
         sets its compute: at 1 GiB the largest LSTM has ~50M parameters,
         which 2 CPU cores cannot train on a useful number of tokens in an
         hour; 4-128 MiB spans 0.1M-6M parameters.
  full   budgets 1-64 GiB per device on the devices of the host (a TPU VM or
         GPU host), sequences of 512 bytes, global batch 64, 30k steps (~1B
         tokens) per point, bfloat16 compute. Point it at a real corpus with
         --set (the offline corpus is 12 MB).

Records: results/budget_sweep/runs.jsonl (one line per point, wm.sweep), each
point's workdir under runs/; figure budget_sweep.png/.svg; table.md.
"""

from __future__ import annotations

import math
import sys

from wm import sweep

FAMILIES = {  # family -> its text config
    "lstm": "configs/text_lstm.py:quick",
    "transformer": "configs/text_transformer.py:quick",
    "vae": "configs/vae_text.py:quick",
}

QUICK = dict(budgets=["4MiB", "8MiB", "16MiB", "32MiB", "64MiB", "128MiB"], seq_len=128, batch=16, steps=200)
FULL = dict(budgets=["1GiB", "2GiB", "4GiB", "8GiB", "16GiB", "32GiB", "64GiB"], seq_len=512, batch=64,
            steps=30_000)


def _points(preset: dict, extra: dict[str, object]) -> list[sweep.Point]:
  steps = preset["steps"]
  common = {
      "data.seq_len": preset["seq_len"], "data.batch_size": preset["batch"], "train.steps": steps,
      "optim.warmup_steps": max(steps // 4, 1) if steps < 1000 else 1000,
      # One evaluation at the end (and the one at step 0), on a seeded sample of
      # 32 batches spread over the whole validation split.
      "train.eval_every": steps, "train.eval_batches": 32, "train.log_every": max(steps // 10, 1),
      "train.checkpoint_every": max(steps // 4, 1), **extra,
  }
  points = []
  for family, config in FAMILIES.items():
    overrides = dict(common)
    if family == "vae":
      # Beta reaches 1 halfway through; 8 importance samples for the bound at evaluation.
      overrides.update({"model.kl_warmup_steps": steps // 2, "model.iw_samples": 8})
    for budget in preset["budgets"]:
      points.append(sweep.Point(name=f"{family}_budget={budget}", config=config, overrides=overrides,
                                budget=budget, grow=True, labels={"family": family}))
  return points


def quick_grid() -> list[sweep.Point]:
  return _points(QUICK, {"mesh.num_devices": 1})


def full_grid() -> list[sweep.Point]:
  return _points(FULL, {"precision.compute_dtype": "bfloat16", "train.eval_batches": 256})


def bits_per_byte(record: dict) -> float:
  """Validation bits per byte; for the VAE the importance-weighted bound (tighter than the ELBO)."""
  ev = record["eval"]
  if record["family"] == "vae" and "iw_nll_per_token" in ev:
    return ev["iw_nll_per_token"] / math.log(2)
  return ev["bits_per_byte"]


def plot(records: list[dict], out: str, preset: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from wm.config import format_bytes

  infeasible = [r for r in records if r.get("infeasible")]
  records = [r for r in records if not r.get("infeasible")]
  fig, (ax_q, ax_s) = plt.subplots(1, 2, figsize=(10, 3.8))
  for family, marker in (("lstm", "o"), ("transformer", "s"), ("vae", "^")):
    rows = sorted((r for r in records if r["family"] == family), key=lambda r: r["budget_bytes"])
    if not rows:
      continue
    x = [r["budget_bytes"] / 2**20 for r in rows]
    line, = ax_q.plot(x, [bits_per_byte(r) for r in rows], marker=marker, label=family)
    for r in rows:
      ax_q.annotate(f"{r['param_count'] / 1e6:.2g}M", (r["budget_bytes"] / 2**20, bits_per_byte(r)),
                    textcoords="offset points", xytext=(3, 4), fontsize=6, color=line.get_color())
    ax_s.plot(x, [r["tokens_per_s"] for r in rows], marker=marker, label=family)
  for ax in (ax_q, ax_s):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training-memory budget per device (MiB, log2)")
    ax.grid(alpha=0.3)
  ax_q.set_ylabel("validation bits/byte (VAE: IW bound)")
  ax_s.set_ylabel("training tokens/s")
  ax_s.set_yscale("log")
  ax_q.legend()
  tokens = records[0]["tokens"]
  ax_q.set_title(f"Largest model per budget, {tokens / 1e3:.0f}k tokens each ({preset})", fontsize=9)
  ax_s.set_title(f"Throughput ({records[0]['device_kind']}, {records[0]['num_devices']} device)", fontsize=9)
  fig.tight_layout()
  sweep.save_figure(fig, out, "budget_sweep")

  header = ["family", "budget", "model", "params", "plan", "estimate", "compiled", "tokens/s", "bits/byte",
            "eval tokens"]
  rows = []
  for r in sorted(records, key=lambda r: (r["family"], r["budget_bytes"])):
    m = r["model"]
    shape = f"d={m['d']} L={m['layers']}" + (f" h={m['heads']}" if m["name"] == "transformer" else "")
    plan = f"{r['remat_policy']}, mb={r['microbatches']}" + (f", chunk={r['time_chunk']}" if r["time_chunk"] else "")
    rows.append([r["family"], r["budget"], shape, f"{r['param_count'] / 1e6:.2f}M", plan,
                 format_bytes(r["estimate_bytes"]), format_bytes(r["compiled_bytes"]),
                 f"{r['tokens_per_s']:.0f}", f"{bits_per_byte(r):.3f}", r["eval"].get("eval_tokens", "")])
  for r in sorted(infeasible, key=lambda r: (r["family"], r["budget_bytes"])):
    rows.append([r["family"], r["budget"], "nothing fits", "", f"smallest compiled {format_bytes(r['smallest_fitting_bytes'])}",
                 "", "", "", "", ""])
  note = (f"Each point: the largest model of its family whose train step fits the budget (wm.memory.grow), "
          f"trained {records[0]['steps']} steps ({tokens} tokens). `compiled` is the compiler's "
          f"argument + output - alias + temp for the step actually trained; jax {records[0]['jax_version']}, "
          f"{records[0]['backend']} ({records[0]['device_kind']}).")
  print(sweep.write_table(out, header, rows, align="lllrlrrrrr", note=note))


def main(argv=None) -> int:
  return sweep.main("budget_sweep", {"quick": quick_grid, "full": full_grid}, plot, description=__doc__, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
