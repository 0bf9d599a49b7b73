"""Pretrain, then fine-tune: start a run from another run's parameters; fold LoRA adapters back into them.

    python -m wm train --config configs/text_transformer.py:quick --workdir runs/base
    python -m wm train --config configs/text_transformer.py:quick --workdir runs/lora \
        --config.model.lora_rank=8 --config.train.init_from=runs/base
    python -m wm export --workdir runs/lora --out runs/lora_merged

`train.init_from=W` starts a fresh run from the parameters of W's latest
verified checkpoint (wm.checkpoints): only the parameters, not the optimizer
state, step, RNG or data position. They are read with Orbax's partial
restore into this run's abstract parameters, whose shardings are this run's
mesh, so the pretrained run may have used any mesh (Orbax reshards on
load). With `model.lora_rank > 0` the loaded weights are the frozen base
(wm.step puts them in the state's "rest") and the adapters start at B = 0, so
the run starts exactly at the pretrained model.

`export` merges a LoRA run's adapters into its base weights (layers.merge_lora:
W <- W + (alpha / r) A B, Hu et al. 2021 sec. 4.1: no inference latency) and
writes a workdir of the same model without adapters: config.json, and a
checkpoint at the same step whose parameters are the merged weights (and whose
data position is the LoRA run's, copied as saved: wm.resume.Position). That
workdir serves `generate` and a later `init_from` like any other; resuming
training in it trains every weight again, from a fresh optimizer state.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from wm import checkpoints as ckpt_lib
from wm import config as config_lib
from wm import resume
from wm import step as step_lib
from wm import workdir as workdir_lib
from wm.models import layers

# The parameters a pretrained checkpoint provides: every Param but the adapters.
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
_PARAMS = "['params']"


def latest_verified_step(workdir: str, field: str = "train.init_from") -> int:
  """The newest checkpoint step of `workdir` whose checksums verify (wm.checkpoints.scan); reads only."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(workdir):
    raise workdir_lib.WorkdirError(f"{field}={workdir} does not exist; pretrain into it first: "
                                   f"python -m wm train --config ... --workdir {workdir}")
  candidates, bad = ckpt_lib.scan(ckpt_dir)
  verified = [step for step, ok in candidates if ok]
  if not verified:
    found = ", ".join([f"step {s} (unverified: no manifest yet)" for s, _ in candidates]
                      + [f"step {s} ({reason})" for s, reason in bad])
    raise workdir_lib.WorkdirError(
        f"{field}={workdir} has no verified checkpoint in {ckpt_dir} ({found or 'no checkpoint at all'}); "
        f"run `python -m wm train` on it (it verifies, quarantines or resumes) before starting from it")
  return verified[0]


def base_abstract(setup: step_lib.Setup) -> nnx.State:
  """This run's base parameters (not adapters) as ShapeDtypeStructs carrying this mesh's shardings."""
  state = setup.abstract_state
  return nnx.state(nnx.merge(setup.graphdef, state["params"], state["rest"]), BASE)


def _saved_config(workdir: str) -> dict[str, Any]:
  return workdir_lib.read_saved_config(workdir) or {}


def check_init_from(config: ml_collections.ConfigDict, setup: step_lib.Setup, workdir: str) -> int:
  """Checks `train.init_from` against this run's model before anything compiles; returns the step to load.

  Raises:
    ConfigError: init_from is the run's own workdir.
    WorkdirError: it does not exist, has no verified checkpoint, or holds a
      LoRA run (whose weights are base + adapters: export it first).
    IncompatibleWorkdir: its parameters differ from this model's, every
      differing parameter named.
  """
  source = config.train.init_from
  if os.path.abspath(source) == os.path.abspath(workdir):
    raise config_lib.ConfigError(f"config.train.init_from={source} is this run's own --workdir; a run resumes from "
                                 f"its own checkpoints anyway: point init_from at the pretrained run's workdir")
  step = latest_verified_step(source)
  saved_config = _saved_config(source)
  if saved_config.get("model", {}).get("lora_rank"):
    raise workdir_lib.WorkdirError(
        f"train.init_from={source} is a LoRA run (model.lora_rank={saved_config['model']['lora_rank']}): its model is "
        f"the base plus adapters. Merge them first: python -m wm export --workdir {source} --out DIR, then "
        f"train.init_from=DIR")
  with ocp.CheckpointManager(os.path.abspath(os.path.join(source, "checkpoints"))) as manager:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  signature = (meta or {}).get("signature")
  if signature is None:
    raise workdir_lib.WorkdirError(f"train.init_from={source}: checkpoint step {step} predates parameter signatures, "
                                   f"so its parameters cannot be checked against this model")
  saved = {path[len(_PARAMS):]: tuple(shape) for path, (shape, _) in signature["state"].items()
           if path.startswith(_PARAMS)}
  want = {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(base_abstract(setup))[0]}
  lines = []
  for path in sorted(set(saved) | set(want)):
    if path not in saved:
      lines.append(f"{path}: not in the checkpoint, {want[path]} in this model")
    elif path not in want:
      lines.append(f"{path}: {saved[path]} in the checkpoint, not in this model")
    elif saved[path] != want[path]:
      lines.append(f"{path}: {saved[path]} in the checkpoint, {want[path]} in this model")
  if lines:
    shown = lines[:8] + ([f"... and {len(lines) - 8} more"] if len(lines) > 8 else [])
    changed = workdir_lib.config_changes(saved_config, config.to_dict()) if saved_config else {}
    fields = [f"{k}: {o!r} -> {n!r}" for k, (o, n) in changed.items()
              if k.startswith("model.") and not k.startswith("model.lora_") or k == "data.vocab_size"]
    hint = ("\nModel fields that differ from the pretrained run: " + ", ".join(fields[:12])) if fields else ""
    raise workdir_lib.IncompatibleWorkdir(
        f"train.init_from={source} (checkpoint step {step}) does not fit this model; these parameters differ:\n  "
        + "\n  ".join(shown) + hint + "\nFine-tune with the pretrained run's model fields (adapters and dropout may "
        "differ).")
  return step


def load_params(setup: step_lib.Setup, source: str, step: int) -> nnx.State:
  """The base parameters of `source`'s checkpoint `step`, placed on this run's mesh.

  Orbax's partial restore reads only the leaves named by the target (the
  parameters), never the optimizer state; the target's shardings, this
  run's, decide where every shard goes.
  """
  target = {"params": base_abstract(setup)}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.CheckpointManager(os.path.abspath(os.path.join(source, "checkpoints"))) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)))
  return restored["state"]["params"]


def _with_params(setup: step_lib.Setup, state: dict[str, Any], *updates: nnx.State) -> dict[str, Any]:
  """`state` with some variables replaced, split again into trainable "params" and the "rest"."""
  model = nnx.merge(setup.graphdef, state["params"], state["rest"])
  nnx.update(model, *updates)
  _, params, rest = nnx.split(model, step_lib.trainable(setup.config), ...)
  return dict(state, params=params, rest=rest)


def init_state(setup: step_lib.Setup, source: str, step: int) -> dict[str, Any]:
  """A fresh train state (optimizer state, step 0, RNG) whose base parameters are `source`'s at `step`."""
  state = _with_params(setup, step_lib.init_state(setup), load_params(setup, source, step))
  logging.info("parameters from %s, checkpoint step %d; %s", source, step,
               "adapters from scratch" if setup.config.model.lora_rank else "optimizer state from scratch")
  return state


def config_from_record(record: dict[str, Any]) -> ml_collections.ConfigDict:
  """A config.json record (which may hold extra keys such as memory_plan) -> a validated config."""
  fields = config_lib.base_config().keys()
  return config_lib.validate(ml_collections.ConfigDict({k: v for k, v in record.items() if k in fields}))


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same model without adapters (what `export` writes, and what a LoRA run's base weights belong to)."""
  return config_lib.override(config, {"model.lora_rank": 0, "model.lora_alpha": 0.0, "train.init_from": ""})


def merge_lora(setup: step_lib.Setup, state: dict[str, Any]) -> nnx.State:
  """The merged parameters W + (alpha / r) A B of a LoRA run's state: the parameters of `base_config`'s model."""
  model = step_lib.model_from_state(setup, state)
  layers.merge_lora(model)
  return nnx.state(model, BASE)


def export(workdir: str, out: str) -> dict[str, Any]:
  """Writes to `out` a workdir of `workdir`'s model with its LoRA adapters merged into the base weights.

  Returns:
    {"out", "step", "params": parameter count of the merged model}.
  """
  record = workdir_lib.read_saved_config(workdir)
  if record is None:
    raise workdir_lib.WorkdirError(f"--workdir {workdir} holds no config.json: not a wm run")
  config = config_from_record(record)
  if not config.model.lora_rank:
    raise workdir_lib.WorkdirError(f"--workdir {workdir} has no adapters (model.lora_rank=0): its checkpoints are "
                                   f"already a plain model; use the workdir itself")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise workdir_lib.WorkdirError(f"--out {out} exists and is not an empty directory; choose a new path")
  workdir_lib.check_path(out)
  step = latest_verified_step(workdir, "--workdir")
  setup = step_lib.make_setup(config)
  position = resume.Position()  # the run's data position, carried over so that DIR can resume training
  with ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints"))) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(setup.abstract_state), meta=ocp.args.JsonRestore()))
    resume.restore_iterator(manager, step, restored["meta"], position)
  merged = merge_lora(setup, restored["state"])

  plain = base_config(config)
  plain_setup = step_lib.make_setup(plain, setup.mesh)
  state = _with_params(plain_setup, step_lib.init_state(plain_setup), merged)
  state = dict(state, step=restored["state"]["step"], rng=restored["state"]["rng"])
  meta = {k: v for k, v in restored["meta"].items() if k != resume.DATA_ITERATOR}  # an older step kept it here
  meta.update(step=step, signature=workdir_lib.signature(plain, plain_setup.abstract_state, jax.process_count()))
  os.makedirs(out, exist_ok=True)
  line = dict(plain.to_dict(), exported_from={"workdir": os.path.abspath(workdir), "step": step,
                                             "lora_rank": config.model.lora_rank,
                                             "lora_alpha": config.model.lora_alpha})
  workdir_lib.record_config(out, line, None)
  ckpt_dir = os.path.join(out, "checkpoints")
  with ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=ocp.CheckpointManagerOptions(create=True),
                            item_handlers=resume.item_handlers()) as manager:
    manager.save(step, args=resume.save_args(state, meta, position), force=True)
    manager.wait_until_finished()
  if jax.process_index() == 0:
    ckpt_lib.write_manifest(os.path.join(ckpt_dir, str(step)))
  count = sum(x.size for x in jax.tree.leaves(merged))
  return {"out": out, "step": step, "params": int(count)}
