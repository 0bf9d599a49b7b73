"""Working-memory tasks: accuracy against state bytes for LSTM widths and attention windows.

Four synthetic tasks (wm.data.tasks), each a direct probe of what a model
must carry between tokens:

  copy            reproduce L tokens after a separator (needs the L tokens, L back)
  selective_copy  the same with the L tokens scattered among blanks (Gu & Dao 2023)
  nback           at every position, the token n positions back (needs the last n tokens)
  induction       after the second trigger, the token that followed the first
                  (Olsson et al. 2022; the H3/Mamba synthetic)

For each task the grid trains LSTMs of several widths (state: (h, c) per
layer, `layers * 2 * d * 4` bytes) and sliding-window Transformers of several
windows (state: the KV cache, `layers * 2 * d * min(T, window) * 4` bytes),
and plots validation accuracy against state bytes (DESIGN.md definition, from
`model.state_bytes(seq_len)`).

n-back is the calibrated one. A window of w lets the query at position t
attend to itself and the w tokens before it, t - w .. t
(wm.models.transformer.attention: t - j <= w), and the KV cache carries
exactly those w tokens between steps, so n-back needs w >= n. The n-back
Transformers have one layer so the window is exactly the receptive field (L
layers can relay information L * w back, which would move the step to about
n / L); the grid straddles the step with windows n - 1, n, n + 1.

    python experiments/working_memory_tasks.py --preset quick          # 2 CPU cores
    python experiments/working_memory_tasks.py --preset quick --plot   # redraw from results/working_memory_tasks/
    python experiments/working_memory_tasks.py --preset full --shard $I/$N   # accelerators

Presets:
  quick  sequences of 32 tokens over a 16-token vocabulary, copy and selective
         copy of 6 tokens, 8-back; LSTM widths 16, 64, 128, windows 2, 4, 8,
         32 (= full attention; n-back: 4, 7, 8, 9, 16); d=64, batch 64, 500
         steps per point (1-layer attention solves 8-back in ~160).
  full   sequences of 256 tokens, vocabulary 64, copy and selective copy of
         32 tokens, 64-back; LSTM widths 64-2048, windows 8-256; d=128,
         batch 128, 20k steps per point.

Records: results/working_memory_tasks/runs.jsonl (wm.sweep), figure
accuracy_vs_state_bytes.png/.svg, table.md.
"""

from __future__ import annotations

import sys

from wm import sweep

TASKS = ("nback", "copy", "selective_copy", "induction")
CONFIGS = {"lstm": "configs/mqar_lstm.py:quick", "transformer": "configs/mqar_transformer.py:quick"}

QUICK = dict(seq_len=32, vocab=16, copy_len=6, nback=8, d=64, batch=64, steps=500, lr=3e-3,
             train_size=20_000, eval_size=1024, lstm_widths=(16, 64, 128), windows=(2, 4, 8, 32),
             nback_windows=(4, 7, 8, 9, 16))
FULL = dict(seq_len=256, vocab=64, copy_len=32, nback=64, d=128, batch=128, steps=20_000, lr=1e-3,
            train_size=500_000, eval_size=4096, lstm_widths=(64, 128, 256, 512, 1024, 2048),
            windows=(8, 16, 32, 64, 128, 256), nback_windows=(16, 32, 63, 64, 65, 128))


def task_overrides(task: str, preset: dict) -> dict:
  """The data fields of `task` at the preset's sizes."""
  o = {"data.task": task, "data.seq_len": preset["seq_len"], "data.vocab_size": preset["vocab"],
       "data.train_size": preset["train_size"], "data.eval_size": preset["eval_size"]}
  if task in ("copy", "selective_copy"):
    o["data.copy_len"] = preset["copy_len"]
  if task == "nback":
    o["data.nback"] = preset["nback"]
  return o


def _points(preset: dict, extra: dict) -> list[sweep.Point]:
  steps = preset["steps"]
  common = {
      "data.batch_size": preset["batch"], "train.steps": steps, "optim.lr": preset["lr"],
      "optim.warmup_steps": min(steps // 10, 1000), "optim.weight_decay": 0.0,
      # One evaluation at the end, on the whole validation split.
      "train.eval_every": steps, "train.eval_batches": 0, "train.log_every": max(steps // 10, 1),
      "train.checkpoint_every": max(steps // 2, 1), **extra,
  }
  points = []
  for task in TASKS:
    data = task_overrides(task, preset)
    for d in preset["lstm_widths"]:
      points.append(sweep.Point(
          name=f"{task}_lstm_d={d}", config=CONFIGS["lstm"],
          overrides={**common, **data, "model.d": d, "model.layers": 1},
          labels={"task": task, "family": "lstm", "width": d, "window": None}))
    windows = preset["nback_windows"] if task == "nback" else preset["windows"]
    # n-back: one layer, so the window is the whole receptive field (module docstring).
    layers = 1 if task == "nback" else 2
    for w in windows:
      points.append(sweep.Point(
          name=f"{task}_attn_w={w}", config=CONFIGS["transformer"],
          overrides={**common, **data, "model.d": preset["d"], "model.heads": 4, "model.kv_heads": 4,
                     "model.layers": layers, "model.window": w},
          labels={"task": task, "family": "transformer", "width": preset["d"], "window": w,
                  "layers": layers, "reach": layers * w}))
  return points


def quick_grid() -> list[sweep.Point]:
  return _points(QUICK, {"mesh.num_devices": 1})


def full_grid() -> list[sweep.Point]:
  return _points(FULL, {"precision.compute_dtype": "bfloat16"})


def task_detail(record: dict) -> str:
  """'copy L=6, T=32, V=16'-style description of a record's task."""
  o = record["overrides"]
  task = record["task"]
  size = f"T={o['data.seq_len']}, V={o['data.vocab_size']}"
  if task in ("copy", "selective_copy"):
    return f"{task} L={o['data.copy_len']}, {size}"
  if task == "nback":
    return f"{o['data.nback']}-back, {size}"
  return f"{task}, {size}"


def chance(record: dict) -> float:
  """Accuracy of guessing uniformly among the task's content tokens (wm.data.tasks ranges)."""
  v = record["overrides"]["data.vocab_size"]
  low = {"copy": 2, "selective_copy": 3, "nback": 1, "induction": 2}[record["task"]]
  return 1.0 / (v - low)


def plot(records: list[dict], out: str, preset: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
  fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    rows = [r for r in records if r["task"] == task]
    for family, marker in (("lstm", "o"), ("transformer", "s")):
      fam = sorted((r for r in rows if r["family"] == family), key=lambda r: r["state_bytes"])
      if not fam:
        continue
      line, = ax.plot([r["state_bytes"] for r in fam], [r["eval"]["accuracy"] for r in fam], marker=marker,
                      label="LSTM (width)" if family == "lstm" else "attention (window)")
      for r in fam:
        ax.annotate(f"d={r['width']}" if family == "lstm" else f"w={r['window']}",
                    (r["state_bytes"], r["eval"]["accuracy"]), textcoords="offset points", xytext=(3, 4),
                    fontsize=6, color=line.get_color())
    ax.axhline(chance(rows[0]), color="gray", lw=0.8, ls=":", label="chance")
    if task == "nback":
      n = rows[0]["overrides"]["data.nback"]
      step = [r for r in rows if r["family"] == "transformer" and r["window"] == n]
      if step:  # the smallest window whose single layer reaches n back
        ax.axvline(step[0]["state_bytes"], color="gray", lw=0.8, ls="--", label=f"window = n = {n}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("state bytes per sequence (log2)")
    ax.set_title(task_detail(rows[0]), fontsize=9)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("validation accuracy")
  legend = {}
  for ax in axes[0]:  # one legend for all panels (the n-back panel adds the window line)
    legend.update(zip(*reversed(ax.get_legend_handles_labels())))
  fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend), fontsize=7)
  fig.suptitle(f"Working-memory tasks: accuracy against state bytes ({preset}, {records[0]['steps']} steps)",
               fontsize=10)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  sweep.save_figure(fig, out, "accuracy_vs_state_bytes")

  header = ["task", "model", "setting", "params", "state bytes", "accuracy", "loss", "steps", "tokens/s"]
  rows = []
  order = {t: i for i, t in enumerate(TASKS)}
  for r in sorted(records, key=lambda r: (order[r["task"]], r["family"], r["state_bytes"])):
    setting = (f"d={r['width']}, 1 layer" if r["family"] == "lstm" else
               f"window={r['window']}, {r['layers']} layer{'s' if r['layers'] > 1 else ''}, d={r['width']}")
    rows.append([task_detail(r), r["family"], setting, f"{r['param_count'] / 1e3:.0f}k", r["state_bytes"],
                 f"{r['eval']['accuracy']:.3f}", f"{r['eval']['loss']:.3f}", r["steps"],
                 f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else ""])
  note = (f"Accuracy over every scored position of the whole validation split ({records[0]['eval'].get('eval_tokens', '?')}"
          f" tokens for the first row). State bytes: LSTM layers * 2 * d * 4; attention layers * 2 * d * "
          f"min(T, window) * 4 (float32), per sequence. A window of w reaches w tokens back per layer. "
          f"jax {records[0]['jax_version']}, {records[0]['backend']} ({records[0]['device_kind']}).")
  print(sweep.write_table(out, header, rows, align="lllrrrrrr", note=note))


def main(argv=None) -> int:
  return sweep.main("working_memory_tasks", {"quick": quick_grid, "full": full_grid}, plot, description=__doc__,
                    argv=argv)


if __name__ == "__main__":
  sys.exit(main())
