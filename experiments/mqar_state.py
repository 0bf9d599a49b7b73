"""Recall accuracy against working-memory bytes on MQAR.

Trains LSTMs of several widths and Transformers with several sliding windows
on the same MQAR task, records each run's validation accuracy beside its state
memory (bytes carried between tokens at the task's context length, DESIGN.md),
and plots accuracy against state bytes:

    python experiments/mqar_state.py --out results/mqar_state           # train the grid, then plot
    python experiments/mqar_state.py --out results/mqar_state --plot    # re-plot from the records only

Records: results/mqar_state/runs.jsonl (one line per run) and each run's
workdir; figure: accuracy_vs_state_bytes.{png,svg}; table: table.md.
"""

from __future__ import annotations

import argparse
import json
import os

from flax import nnx

from wm import config as config_lib
from wm import models, train

BASE = "configs/mqar_transformer.py:quick"
# The grid: one line per run, as config overrides on the quick MQAR setting.
GRID = [
    {"model.name": "lstm", "model.d": 32},
    {"model.name": "lstm", "model.d": 64},
    {"model.name": "lstm", "model.d": 128},
    {"model.name": "transformer", "model.window": 4},
    {"model.name": "transformer", "model.window": 16},
    {"model.name": "transformer", "model.window": 64},
]


def run_name(overrides: dict) -> str:
  return "_".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())


def state_bytes(config) -> int:
  model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
  return int(model.state_bytes(config.data.seq_len))


def train_grid(out: str, steps: int | None) -> None:
  os.makedirs(out, exist_ok=True)
  done = set()
  runs_path = os.path.join(out, "runs.jsonl")
  if os.path.exists(runs_path):
    with open(runs_path) as f:
      done = {json.loads(line)["name"] for line in f}
  for overrides in GRID:
    name = run_name(overrides)
    if name in done:
      continue
    config = config_lib.override(config_lib.load(BASE), {**overrides, "train.progress": False,
                                                         **({"train.steps": steps} if steps else {})})
    config = config_lib.validate(config)
    result = train.train_and_evaluate(config, os.path.join(out, name))
    record = {"name": name, **overrides, "state_bytes": state_bytes(config),
              "accuracy": result["eval"]["accuracy"], "loss": result["eval"]["loss"], "steps": result["step"]}
    with open(runs_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


def plot(out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  with open(os.path.join(out, "runs.jsonl")) as f:
    runs = [json.loads(line) for line in f]
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for family, marker in (("lstm", "o"), ("transformer", "s")):
    rows = sorted((r for r in runs if r["model.name"] == family), key=lambda r: r["state_bytes"])
    ax.plot([r["state_bytes"] for r in rows], [r["accuracy"] for r in rows], marker=marker, label=family)
    for r in rows:
      label = f"d={r['model.d']}" if family == "lstm" else f"w={r['model.window']}"
      ax.annotate(label, (r["state_bytes"], r["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("state memory per sequence (bytes, log scale)")
  ax.set_ylabel("MQAR validation accuracy")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("Recall against working memory (T=64, 4 pairs)")
  fig.tight_layout()
  for ext in ("png", "svg"):
    fig.savefig(os.path.join(out, f"accuracy_vs_state_bytes.{ext}"), dpi=150)
  lines = ["| model | setting | state bytes | accuracy |", "|---|---|---:|---:|"]
  for r in sorted(runs, key=lambda r: (r["model.name"], r["state_bytes"])):
    setting = f"d={r['model.d']}" if r["model.name"] == "lstm" else f"window={r['model.window']}"
    lines.append(f"| {r['model.name']} | {setting} | {r['state_bytes']} | {r['accuracy']:.3f} |")
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="results/mqar_state")
  parser.add_argument("--steps", type=int, help="train steps per run (default: the quick config's)")
  parser.add_argument("--plot", action="store_true", help="only plot the existing records")
  args = parser.parse_args()
  if not args.plot:
    train_grid(args.out, args.steps)
  plot(args.out)


if __name__ == "__main__":
  main()
