"""Associative recall against working memory (Zoology, Arora et al. 2023, fig. 2; Based, Arora et al. 2024, fig. 2).

Multi-query associative recall (MQAR): a sequence lists key-value pairs, then
asks for keys again; the model must answer each query with its value. A model
can only answer from what it carries between tokens, its working memory: a
Transformer's KV cache (all keys and values of the context, or the last
`window` of them with sliding-window attention) or an LSTM's (h, c). The
experiment trains each model on MQAR and plots recall accuracy against the
bytes of that state (DESIGN.md's definition at the task's length), and
against model width per sequence length.

    python experiments/recall_vs_state.py --preset quick          # 2 CPU cores
    python experiments/recall_vs_state.py --preset quick --plot   # redraw from results/recall_vs_state/
    python experiments/recall_vs_state.py --preset full --shard $I/$N   # the papers' grid, accelerators

Presets:
  quick  (T, pairs) = (64, 4) and (128, 8), vocabulary 64, batch 64; full
         attention at widths 32-128, sliding windows 8-64 at width 64, LSTMs
         at widths 64-256 (2 layers); learning rates {1e-3, 3e-3}, the best
         per model kept.
  full   (64, 4), (128, 8), (256, 16), (512, 64) with vocabulary 8192, batch
         64, 20k steps; full attention at widths 32-256, windows 8-128, LSTMs
         at widths 64-1024; the best of four learning rates between 1e-4 and
         1e-2, as in Zoology.

Each point is one (task, model, learning rate); the plot keeps, per (task,
model), the learning rate with the best final validation accuracy (the whole
validation split is scored). Records: results/recall_vs_state/runs.jsonl;
figures accuracy_vs_state_bytes.png/.svg and accuracy_vs_width.png/.svg;
table.md.
"""

from __future__ import annotations

import collections
import itertools
import sys

from wm import sweep

CONFIGS = {"transformer": "configs/mqar_transformer.py:quick", "lstm": "configs/mqar_lstm.py:quick"}

QUICK = dict(
    tasks=[(64, 4, 500), (128, 8, 700)],  # (seq_len, kv pairs, train steps)
    vocab=64, batch=64, train_size=50_000, eval_size=512,
    attention_widths=[32, 64, 128], window_width=64, windows=[8, 16, 32, 64],
    lstm_widths=[64, 128, 256], lrs=[3e-3, 1e-3])
FULL = dict(
    tasks=[(64, 4, 20_000), (128, 8, 20_000), (256, 16, 20_000), (512, 64, 20_000)],
    vocab=8192, batch=64, train_size=100_000, eval_size=3_000,
    attention_widths=[32, 64, 128, 256], window_width=128, windows=[8, 16, 32, 64, 128],
    lstm_widths=[64, 128, 256, 512, 1024], lrs=[1e-4, 4.6e-4, 2.2e-3, 1e-2])


def heads(d: int) -> int:
  return max(2, d // 16)  # head dim 16 (Zoology's small attention models use 1-2 heads of width d/heads)


def _grid(p: dict) -> list[sweep.Point]:
  # Learning rate outermost: the first pass over the grid already draws the
  # whole figure at one rate; later passes complete the sweep.
  points = []
  for lr, (t, pairs, steps) in itertools.product(p["lrs"], p["tasks"]):
    task = {"data.seq_len": t, "data.num_kv_pairs": pairs, "data.vocab_size": p["vocab"],
            "data.batch_size": p["batch"], "data.train_size": p["train_size"], "data.eval_size": p["eval_size"],
            "train.steps": steps, "optim.warmup_steps": min(100, steps // 10), "train.eval_every": steps,
            "train.eval_batches": 0, "train.log_every": max(steps // 10, 1),
            "train.checkpoint_every": max(steps // 4, 1)}
    models = [("attention", f"d={d}", "transformer", {"model.d": d, "model.heads": heads(d), "model.kv_heads": heads(d)})
              for d in p["attention_widths"]]
    wd = p["window_width"]
    models += [("sliding window", f"w={w}", "transformer",
                {"model.d": wd, "model.heads": heads(wd), "model.kv_heads": heads(wd), "model.window": w})
               for w in p["windows"] if w < t]
    models += [("lstm", f"d={d}", "lstm", {"model.d": d}) for d in p["lstm_widths"]]
    for family, setting, name, overrides in models:
      points.append(sweep.Point(
          name=f"T={t}_{family.replace(' ', '_')}_{setting}_lr={lr:g}", config=CONFIGS[name],
          overrides={**task, **overrides, "model.name": name, "optim.lr": lr},
          labels={"family": family, "setting": setting, "seq_len": t, "kv_pairs": pairs, "lr": lr}))
  return points


def quick_grid() -> list[sweep.Point]:
  return _grid(QUICK)


def full_grid() -> list[sweep.Point]:
  return _grid(FULL)


def best_per_model(records: list[dict]) -> list[dict]:
  """Per (sequence length, family, setting): the record of the learning rate with the best accuracy."""
  groups = collections.defaultdict(list)
  for r in records:
    groups[(r["seq_len"], r["family"], r["setting"])].append(r)
  return [max(rs, key=lambda r: r["eval"]["accuracy"]) for rs in groups.values()]


STYLE = {"attention": ("s", "C0"), "sliding window": ("D", "C2"), "lstm": ("o", "C1")}


def plot(records: list[dict], out: str, preset: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  best = best_per_model(records)
  lengths = sorted({r["seq_len"] for r in best})
  fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 3.8), squeeze=False)
  for ax, t in zip(axes[0], lengths):
    for family, (marker, color) in STYLE.items():
      rows = sorted((r for r in best if r["seq_len"] == t and r["family"] == family), key=lambda r: r["state_bytes"])
      if not rows:
        continue
      ax.plot([r["state_bytes"] for r in rows], [r["eval"]["accuracy"] for r in rows], marker=marker, color=color,
              label=family)
      for r in rows:
        ax.annotate(r["setting"], (r["state_bytes"], r["eval"]["accuracy"]), textcoords="offset points",
                    xytext=(3, -9), fontsize=6, color=color)
    pairs = next(r["kv_pairs"] for r in best if r["seq_len"] == t)
    ax.set_title(f"MQAR, T={t}, {pairs} key-value pairs", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("state bytes per sequence (log2)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("validation recall accuracy")
  axes[0][0].legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  sweep.save_figure(fig, out, "accuracy_vs_state_bytes")

  fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 3.8), squeeze=False)
  for ax, t in zip(axes[0], lengths):
    for family in ("attention", "lstm"):
      marker, color = STYLE[family]
      rows = sorted((r for r in best if r["seq_len"] == t and r["family"] == family), key=lambda r: r["model"]["d"])
      ax.plot([r["model"]["d"] for r in rows], [r["eval"]["accuracy"] for r in rows], marker=marker, color=color,
              label=family)
    ax.set_title(f"MQAR, T={t}", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model width d (log2)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("validation recall accuracy")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  sweep.save_figure(fig, out, "accuracy_vs_width")

  header = ["T", "pairs", "family", "setting", "params", "state bytes", "best lr", "accuracy", "accuracy per lr",
            "steps", "eval tokens"]
  rows = []
  order = {f: i for i, f in enumerate(STYLE)}
  for r in sorted(best, key=lambda r: (r["seq_len"], order[r["family"]], r["state_bytes"])):
    per_lr = sorted((x for x in records if (x["seq_len"], x["family"], x["setting"]) ==
                     (r["seq_len"], r["family"], r["setting"])), key=lambda x: x["lr"])
    rows.append([r["seq_len"], r["kv_pairs"], r["family"], r["setting"], f"{r['param_count'] / 1e3:.0f}k",
                 r["state_bytes"], f"{r['lr']:g}", f"{r['eval']['accuracy']:.3f}",
                 " / ".join(f"{x['eval']['accuracy']:.3f}" for x in per_lr), r["steps"],
                 r["eval"].get("eval_tokens", "")])
  note = (f"Accuracy over the whole validation split ({preset} preset); state bytes per sequence at the task's "
          f"length (KV cache: layers x 2 x kv_heads x head_dim x min(T, window) x 4 bytes; LSTM: layers x 2 x d "
          f"x 4 bytes). 'accuracy per lr' lists every learning rate tried, ascending.")
  print(sweep.write_table(out, header, rows, align="rrllrrrrlrr", note=note))


def main(argv=None) -> int:
  return sweep.main("recall_vs_state", {"quick": quick_grid, "full": full_grid}, plot, description=__doc__,
                    argv=argv)


if __name__ == "__main__":
  sys.exit(main())
