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
    python experiments/recall_vs_state.py --preset recipe         # the LSTM recipe's ablation, 2 CPU cores

Presets:
  quick  (T, pairs) = (64, 4) and (128, 8), vocabulary 64, batch 64; full
         attention at widths 32-128 and sliding windows 8-64 at width 64 (2
         layers; 500 and 700 steps), single-layer LSTMs at widths 64-256
         (forget-gate bias 3; 2,000 and 3,000 steps); learning rates {1e-3, 3e-3},
         the best per model kept.
  full   (64, 4), (128, 8), (256, 16), (512, 64) with vocabulary 8192, batch
         64, 20k steps; full attention at widths 32-256, windows 8-128, LSTMs
         at widths 64-1024; the best of four learning rates between 1e-4 and
         1e-2, as in Zoology.
  recipe the quick LSTM at (64, 4), d=128, with forget-gate bias 1 or 3 and
         one or two layers (results/recall_vs_state/recipe/).

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

# (seq_len, kv pairs, train steps of the attention models, train steps of the LSTMs). Attention reaches
# 1.000 at width 64 within 500-700 steps; an LSTM first sits on the plateau of loss ln(pairs) (it knows which
# tokens are values, not which value goes with which key) for 500-1,000 steps at T=64, longer at T=128, before
# its accuracy climbs, so the quick preset gives the LSTMs more steps rather than draw them at the plateau.
QUICK = dict(
    tasks=[(64, 4, 500, 2000), (128, 8, 700, 3000)],
    vocab=64, batch=64, train_size=50_000, eval_size=512,
    attention_widths=[32, 64, 128], window_width=64, windows=[8, 16, 32, 64],
    lstm_widths=[64, 128, 256], lrs=[3e-3, 1e-3])
FULL = dict(
    tasks=[(64, 4, 20_000, 20_000), (128, 8, 20_000, 20_000), (256, 16, 20_000, 20_000),
           (512, 64, 20_000, 20_000)],
    vocab=8192, batch=64, train_size=100_000, eval_size=3_000,
    attention_widths=[32, 64, 128, 256], window_width=128, windows=[8, 16, 32, 64, 128],
    lstm_widths=[64, 128, 256, 512, 1024], lrs=[1e-4, 4.6e-4, 2.2e-3, 1e-2])


# One layer, as in the working-memory tasks, with a forget-gate bias of 3. A bias b keeps a cell's content
# for about 1 + e^b steps at init (forget gate sigmoid(b)): about 4 steps at the usual b = 1, 21 at b = 3;
# Tallec & Ollivier (2018) set it from the dependency length, here the tens of tokens between a pair and
# its query. The recipe preset measures both choices (T=64, d=128, 2,000 steps; results/recall_vs_state/
# recipe/): one layer reaches 0.59 at b = 3 and 0.41 at b = 1; two layers stay near 1/pairs (0.28, 0.27).
LSTM_RECIPE = {"model.layers": 1, "model.forget_bias": 3.0}


def heads(d: int) -> int:
  return max(2, d // 16)  # head dim 16 (Zoology's small attention models use 1-2 heads of width d/heads)


def _grid(p: dict) -> list[sweep.Point]:
  # Learning rate outermost: the first pass over the grid already draws the
  # whole figure at one rate; later passes complete the sweep.
  points = []
  for lr, (t, pairs, steps, lstm_steps) in itertools.product(p["lrs"], p["tasks"]):
    task = {"data.seq_len": t, "data.num_kv_pairs": pairs, "data.vocab_size": p["vocab"],
            "data.batch_size": p["batch"], "data.train_size": p["train_size"], "data.eval_size": p["eval_size"],
            "train.eval_batches": 0}
    models = [("attention", f"d={d}", "transformer",
               {"model.d": d, "model.heads": heads(d), "model.kv_heads": heads(d), **_schedule(steps)})
              for d in p["attention_widths"]]
    wd = p["window_width"]
    models += [("sliding window", f"w={w}", "transformer",
                {"model.d": wd, "model.heads": heads(wd), "model.kv_heads": heads(wd), "model.window": w,
                 **_schedule(steps)})
               for w in p["windows"] if w < t]
    models += [("lstm", f"d={d}", "lstm", {"model.d": d, **LSTM_RECIPE, **_schedule(lstm_steps)})
               for d in p["lstm_widths"]]
    for family, setting, name, overrides in models:
      points.append(sweep.Point(
          name=f"T={t}_{family.replace(' ', '_')}_{setting}_lr={lr:g}", config=CONFIGS[name],
          overrides={**task, **overrides, "model.name": name, "optim.lr": lr},
          labels={"family": family, "setting": setting, "seq_len": t, "kv_pairs": pairs, "lr": lr}))
  return points


def _schedule(steps: int) -> dict:
  return {"train.steps": steps, "optim.warmup_steps": min(100, steps // 10), "train.eval_every": steps,
          "train.log_every": max(steps // 10, 1), "train.checkpoint_every": max(steps // 4, 1)}


def quick_grid() -> list[sweep.Point]:
  return _grid(QUICK)


def recipe_grid() -> list[sweep.Point]:
  """The quick LSTM recipe against its alternatives: forget-gate bias 1 or 3, one or two layers.

  (T, pairs) = (64, 4), d = 128, learning rate 3e-3, 2,000 steps: the quick
  preset's setting for that point, with the recipe varied one factor at a time.
  """
  t, pairs, _, steps = QUICK["tasks"][0]
  points = []
  recipe = (LSTM_RECIPE["model.layers"], LSTM_RECIPE["model.forget_bias"])
  for layers, bias in (recipe, (1, 1.0), (2, 3.0), (2, 1.0)):
    points.append(sweep.Point(
        name=f"T={t}_lstm_d=128_layers={layers}_forget_bias={bias:g}", config=CONFIGS["lstm"],
        overrides={"data.seq_len": t, "data.num_kv_pairs": pairs, "data.vocab_size": QUICK["vocab"],
                   "data.batch_size": QUICK["batch"], "data.train_size": QUICK["train_size"],
                   "data.eval_size": QUICK["eval_size"], "train.eval_batches": 0, "model.name": "lstm",
                   "model.d": 128, "model.layers": layers, "model.forget_bias": bias, "optim.lr": 3e-3,
                   **_schedule(steps)},
        labels={"family": "lstm", "setting": f"d=128, {layers} layer(s), forget bias {bias:g}", "seq_len": t,
                "kv_pairs": pairs, "lr": 3e-3}))
  return points


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

  if preset == "recipe":  # one width: a table, no figure
    _table(records, records, out, preset)
    return
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
  _table(records, best, out, preset)


def _table(records: list[dict], best: list[dict], out: str, preset: str) -> None:
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
  grids = {"quick": quick_grid, "full": full_grid, "recipe": recipe_grid}
  return sweep.main("recall_vs_state", grids, plot, description=__doc__, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
