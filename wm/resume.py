"""Resuming from a workdir's checkpoints: what a save holds besides the train state, and getting it back.

A checkpoint step (wm.checkpoints: checksummed, quarantined when damaged)
holds three Orbax items:

    state/          the train state (`ocp.args.StandardSave`)
    meta/           JSON: the step and the signature that decides whether a
                    config may resume it (wm.workdir)
    data_iterator/  the data position, written by grain's own Orbax handler
                    (`grain.checkpoint.CheckpointSave`): one file per process,
                    process_<i>-of-<n>.json, each process writing and reading
                    its own shard's position

Checkpoints written before the iterator had its own item kept every
process's position in meta instead (meta["data_iterator"][process_index]);
those still resume (`restore_iterator`). `restore_latest` finds the newest
step that verifies and fits; `check_generate_workdir` asks the same of a
workdir the `generate` verb is pointed at.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import grain
import grain.checkpoint  # registers CheckpointSave / CheckpointRestore with Orbax
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from wm import checkpoints as ckpt_lib
from wm import parallel, step as step_lib
from wm import workdir as workdir_lib

DATA_ITERATOR = "data_iterator"  # the Orbax item (and step subdirectory) of the data position


def item_handlers() -> dict[str, Any]:
  """The handler of each item a training checkpoint holds, for the CheckpointManager that saves them."""
  return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
          DATA_ITERATOR: grain.checkpoint.CheckpointHandler()}


def save_args(state: Any, meta: dict[str, Any], iterator: grain.DatasetIterator) -> ocp.args.Composite:
  """A checkpoint's items. grain's handler writes the iterator's position within the save call (not in
  Orbax's background thread), so the loop may go on drawing batches as soon as `save` returns."""
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                            **{DATA_ITERATOR: grain.checkpoint.CheckpointSave(iterator)})


def restore_iterator(manager: ocp.CheckpointManager, step: int, meta: dict[str, Any],
                     iterator: grain.DatasetIterator) -> None:
  """Moves `iterator` (fresh, of the same config and process) to the data position saved at `step`.

  Raises:
    ValueError: the step holds no data position (or not this process's).
  """
  if os.path.isdir(os.path.join(str(manager.directory), str(step), DATA_ITERATOR)):
    manager.restore(step, args=ocp.args.Composite(**{DATA_ITERATOR: grain.checkpoint.CheckpointRestore(iterator)}))
    return
  # Checkpoints written before the data position had its own item kept every
  # process's iterator state in meta, gathered to process 0: they still resume.
  states = (meta or {}).get(DATA_ITERATOR)
  if states is None:
    raise ValueError(f"step {step} holds no data position (neither a {DATA_ITERATOR}/ item nor "
                     f"meta[{DATA_ITERATOR!r}])")
  iterator.set_state(states[jax.process_index()])


class Position(grain.DatasetIterator):
  """A saved data position without its dataset: carries an iterator state from one checkpoint to another
  (`wm export` writes the source run's position into the exported step)."""

  def __init__(self):
    super().__init__()
    self.state: dict[str, Any] | None = None

  def __next__(self):
    raise StopIteration

  def get_state(self) -> dict[str, Any] | None:
    return self.state

  def set_state(self, state: dict[str, Any]) -> None:
    self.state = state


def restore_latest(config, setup, ckpt_dir: str, workdir: str, signature: dict[str, Any], is_main: bool,
                   new_iterator: Callable[[], grain.DatasetIterator] | None = None):
  """The newest checkpoint that verifies and fits this config: (step, state, iterator), or None.

  `new_iterator` makes a fresh train iterator, which is moved to the step's
  data position (`restore_iterator`) and returned; without it, the iterator
  returned is None.

  Order matters: the files are only read until the config is known to fit
  (a refused run changes nothing); then process 0 quarantines the steps that
  failed their checksums, and every process restores the newest good step.
  A step that still fails to restore (or, unverified, holds non-finite
  numbers) is quarantined too and the previous one tried (one process only;
  with several, the run stops and names the step to move aside).
  """
  candidates, bad = ckpt_lib.scan(ckpt_dir)
  for step, _ in candidates:
    try:
      with ocp.CheckpointManager(os.path.abspath(ckpt_dir)) as manager:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # unreadable metadata: this step is handled (quarantined) below  # pylint: disable=broad-except
      continue
    workdir_lib.check_compatible(meta.get("signature"), signature, workdir, step,
                                 workdir_lib.read_saved_config(workdir), config)
    break
  parallel.sync_processes("wm_scanned")  # every process has read the files before process 0 moves any
  if is_main:
    for step, reason in bad:
      ckpt_lib.quarantine(ckpt_dir, step, reason)
  parallel.sync_processes("wm_quarantined")
  while candidates:
    step, verified = candidates[0]
    step_dir = os.path.join(ckpt_dir, str(step))
    # A fresh iterator for every step tried: a failed restore may have moved the last one.
    iterator = new_iterator() if new_iterator is not None else None
    try:
      with ocp.CheckpointManager(os.path.abspath(ckpt_dir)) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(setup.abstract_state), meta=ocp.args.JsonRestore()))
        problem = None if verified or _all_finite(restored["state"]) else "it holds non-finite numbers"
        if problem is None and iterator is not None:
          restore_iterator(manager, step, restored["meta"], iterator)
    except Exception as e:  # Orbax raises many types for unreadable or partial files  # pylint: disable=broad-except
      problem = f"it does not restore ({type(e).__name__}: {str(e)[:200]})"
    if problem is None:
      if is_main and not verified:
        ckpt_lib.write_manifest(step_dir)  # restored and finite: from now on it is checked like the others
      parallel.sync_processes("wm_restored")
      return step, restored["state"], iterator
    if iterator is not None:
      iterator.close()
    if jax.process_count() > 1:
      raise RuntimeError(f"checkpoint {step_dir}: {problem}. Move it to {ckpt_dir}/{ckpt_lib.QUARANTINE}/ "
                         f"and rerun to resume from the previous one.")
    ckpt_lib.quarantine(ckpt_dir, step, problem)
    candidates, bad = ckpt_lib.scan(ckpt_dir)
    for bad_step, reason in bad:
      ckpt_lib.quarantine(ckpt_dir, bad_step, reason)
  return None


def _all_finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def check_generate_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses, in one message, a workdir with no usable checkpoint or one of another model (for `generate`)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(workdir):
    raise workdir_lib.WorkdirError(f"--workdir {workdir} does not exist; train first: python -m wm train --config ... "
                       f"--workdir {workdir}")
  candidates, bad = ckpt_lib.scan(ckpt_dir)
  if bad and (not candidates or bad[0][0] > candidates[0][0]):
    raise workdir_lib.WorkdirError(f"the latest checkpoint in {ckpt_dir} (step {bad[0][0]}) is damaged: {bad[0][1]}. Run "
                       f"`python -m wm train` on this workdir once: it quarantines it and resumes from the previous one.")
  if not candidates:
    raise workdir_lib.WorkdirError(f"{workdir} has no usable checkpoint in {ckpt_dir}; train first (or resume) with "
                       f"python -m wm train --config ... --workdir {workdir}")
  single = ml_collections.ConfigDict(config.to_dict())
  single.mesh.update(num_devices=1, data=1, fsdp=1, tensor=1)
  setup = step_lib.make_setup(single, parallel.make_mesh(single.mesh, jax.devices()[:1]))
  step = candidates[0][0]
  with ocp.CheckpointManager(os.path.abspath(ckpt_dir)) as manager:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  saved = meta.get("signature")
  if saved is not None:
    now = workdir_lib.signature(single, setup.abstract_state, 1)
    # Sampling needs the parameters only; the data stream does not matter here.
    workdir_lib.check_compatible({"state": saved["state"], "data": {}}, {"state": now["state"], "data": {}},
                                 workdir, step, workdir_lib.read_saved_config(workdir), config)
