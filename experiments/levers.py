"""Two memory levers, measured: cross-layer sharing (ALBERT) and LoRA fine-tuning from a pretrained run.

    python experiments/levers.py            # ~10 minutes on 2 CPU cores
    python experiments/levers.py --table    # rewrite table.md from results/levers/levers.jsonl only

Sharing: for the quick text Transformer and LSTM (2 layers), share_layers 1
and 2 (all layers on one weight set): the compiled step's arguments by part
(wm.memory.measure.argument_bytes: they add up to argument_size_in_bytes),
its temp bytes, and the analytic estimate's terms.

LoRA: pretrain configs/text_transformer.py:quick for --pretrain_steps into
runs/base, then fine-tune from it (train.init_from) for --steps, once with
every weight trained and once with model.lora_rank=8; record each run's
compiled arguments (optimizer state, trainable parameters, frozen base),
validation loss, and whether the pretrained checkpoint's arrays are unchanged
afterwards. The optimizer-state ratio is also computed for the full-size
configs/text_transformer.py (d=384, 6 layers), compiled once.

Records: results/levers/levers.jsonl (one line per measurement), table.md,
and the runs' workdirs under results/levers/runs/ (config and metrics; their
checkpoints are not kept in git).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

RESULTS = "results/levers"


def _config(spec: str, **overrides):
  from wm import config as config_lib
  config = config_lib.load(spec)
  return config_lib.validate(config_lib.override(config, {k: str(v) for k, v in overrides.items()}))


def _memory(config) -> dict:
  from wm.memory import estimate, measure
  compiled = measure.compiled(config)
  est = estimate.estimate(config)
  return {
      "argument_bytes": compiled["argument_bytes"],
      "argument_size_in_bytes": compiled["argument_size_in_bytes"],
      "temp_size_in_bytes": compiled["temp_size_in_bytes"],
      "total_bytes": compiled["total_bytes"],
      "estimate": {k: getattr(est, k) for k in ("params", "grads", "optimizer", "activations", "transient", "total")},
      "param_count": est.detail["param_count"],
      "trainable_param_count": est.detail["trainable_param_count"],
  }


def sharing() -> list[dict]:
  rows = []
  for family, spec in (("transformer", "configs/text_transformer.py:quick"), ("lstm", "configs/text_lstm.py:quick")):
    for g in (1, 2):
      config = _config(spec, **{"model.share_layers": g, "mesh.num_devices": 1})
      rows.append({"lever": "share_layers", "family": family, "config": spec, "share_layers": g, **_memory(config)})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def _params(workdir: str, step: int) -> dict:
  """The parameters of `workdir`'s checkpoint `step`, as numpy arrays (pure dict)."""
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx
  from wm import finetune, step as step_lib, workdir as workdir_lib
  config = finetune.config_from_record(workdir_lib.read_saved_config(workdir))
  setup = step_lib.make_setup(config)
  with ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints"))) as manager:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state)))
  return jax.device_get(nnx.to_pure_dict(state["state"]["params"]))


def lora(pretrain_steps: int, steps: int) -> list[dict]:
  import jax
  import numpy as np
  from wm import train
  spec = "configs/text_transformer.py:quick"
  runs = os.path.join(RESULTS, "runs")
  shutil.rmtree(runs, ignore_errors=True)
  every = {"train.eval_every": steps, "train.log_every": max(steps // 4, 1), "train.checkpoint_every": steps,
           "train.progress": False, "mesh.num_devices": 1}
  base_dir = os.path.join(runs, "base")
  base = train.train_and_evaluate(_config(spec, **dict(every, **{"train.steps": pretrain_steps,
                                                                  "train.eval_every": pretrain_steps,
                                                                  "train.checkpoint_every": pretrain_steps})),
                                  base_dir)
  before = _params(base_dir, pretrain_steps)
  rows = [{"lever": "pretrain", "config": spec, "steps": pretrain_steps, "eval_loss": base["eval"]["loss"]}]
  for name, rank in (("full", 0), ("lora", 8)):
    overrides = dict(every, **{"train.steps": steps, "train.init_from": base_dir, "model.lora_rank": rank,
                               "optim.warmup_steps": max(steps // 10, 1)})
    config = _config(spec, **overrides)
    result = train.train_and_evaluate(config, os.path.join(runs, name))
    after = _params(base_dir, pretrain_steps)
    unchanged = all(jax.tree.leaves(jax.tree.map(np.array_equal, before, after)))
    rows.append({"lever": "init_from", "finetune": name, "lora_rank": rank, "config": spec, "steps": steps,
                 "start_eval_loss": base["eval"]["loss"], "eval_loss": result["eval"]["loss"],
                 "base_checkpoint_unchanged": bool(unchanged), **_memory(config)})
    print(json.dumps(rows[-1]), flush=True)
  full, low = rows[-2], rows[-1]
  rows.append({"lever": "lora_ratio", "config": spec, "lora_rank": 8,
               "opt_state_ratio": low["argument_bytes"]["opt_state"] / full["argument_bytes"]["opt_state"],
               "total_bytes_ratio": low["total_bytes"] / full["total_bytes"]})
  big = "configs/text_transformer.py"
  sizes = {rank: _memory(_config(big, **{"model.lora_rank": rank, "mesh.num_devices": 1})) for rank in (0, 8)}
  rows.append({"lever": "lora_ratio", "config": big, "lora_rank": 8,
               "opt_state_ratio": sizes[8]["argument_bytes"]["opt_state"] / sizes[0]["argument_bytes"]["opt_state"],
               "total_bytes_ratio": sizes[8]["total_bytes"] / sizes[0]["total_bytes"],
               "full": sizes[0], "lora": sizes[8]})
  print(json.dumps(rows[-2:]), flush=True)
  return rows


def _mib(n: float) -> str:
  return f"{n / 2**20:.2f}"


def table(rows: list[dict]) -> str:
  out = ["# Memory levers: measured", "",
         "Per device, CPU backend, float32, AdamW. Compiled = the train step's `memory_analysis()`; arguments by "
         "part from `wm.memory.measure.argument_bytes` (they add up to `argument_size_in_bytes`). "
         "Made by `python experiments/levers.py`.", "",
         "## Cross-layer sharing (share_layers = g; both quick configs have 2 layers)", "",
         "| family | g | params | params MiB | optimizer state MiB | temp MiB | compiled total MiB "
         "| estimate: params + grads + optimizer MiB | estimate: activations MiB |",
         "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["lever"] == "share_layers":
      e = r["estimate"]
      out.append(f"| {r['family']} | {r['share_layers']} | {r['param_count']:,} | {_mib(r['argument_bytes']['params'])} "
                 f"| {_mib(r['argument_bytes']['opt_state'])} | {_mib(r['temp_size_in_bytes'])} "
                 f"| {_mib(r['total_bytes'])} | {_mib(e['params'] + e['grads'] + e['optimizer'])} "
                 f"| {_mib(e['activations'])} |")
  out += ["", "## Fine-tuning from a pretrained checkpoint (configs/text_transformer.py:quick)", "",
          "| fine-tune | trainable params | frozen MiB | trainable MiB | optimizer state MiB | temp MiB "
          "| compiled total MiB | eval loss: start -> end | base checkpoint unchanged |",
          "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["lever"] == "pretrain":
      out.insert(len(out) - 2, f"Pretrained {r['steps']} steps: validation loss {r['eval_loss']:.4f}.\n")
    if r["lever"] == "init_from":
      a = r["argument_bytes"]
      out.append(f"| {r['finetune']} (r={r['lora_rank']}) | {r['trainable_param_count']:,} | {_mib(a['rest'])} "
                 f"| {_mib(a['params'])} | {_mib(a['opt_state'])} | {_mib(r['temp_size_in_bytes'])} "
                 f"| {_mib(r['total_bytes'])} | {r['start_eval_loss']:.4f} -> {r['eval_loss']:.4f} "
                 f"| {r['base_checkpoint_unchanged']} |")
  out += ["", "## LoRA (r = 8) optimizer state as a share of full fine-tuning's", "",
          "| config | optimizer state: LoRA / full | compiled total: LoRA / full |", "|---|---|---|"]
  for r in rows:
    if r["lever"] == "lora_ratio":
      out.append(f"| {r['config']} | {100 * r['opt_state_ratio']:.2f}% | {100 * r['total_bytes_ratio']:.1f}% |")
  return "\n".join(out) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pretrain_steps", type=int, default=300)
  parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps")
  parser.add_argument("--table", action="store_true", help="only rewrite table.md from the records")
  args = parser.parse_args(argv)
  os.makedirs(RESULTS, exist_ok=True)
  records = os.path.join(RESULTS, "levers.jsonl")
  if not args.table:
    rows = sharing() + lora(args.pretrain_steps, args.steps)
    with open(records, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  with open(records) as f:
    rows = [json.loads(line) for line in f]
  with open(os.path.join(RESULTS, "table.md"), "w") as f:
    f.write(table(rows))
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
