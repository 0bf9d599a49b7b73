"""Resuming from a workdir's checkpoints: what a save holds besides the train state, and getting it back.

A checkpoint (wm.checkpoints: checksummed, quarantined when damaged) holds the
train state and a JSON meta: the step, every process's data-iterator state
(`gather_iterator_states`) and the signature that decides whether a config
may resume it (wm.workdir). `restore_latest` finds the newest step that
verifies and fits; `check_generate_workdir` asks the same of a workdir the
`generate` verb is pointed at.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from wm import checkpoints as ckpt_lib
from wm import parallel, step as step_lib
from wm import workdir as workdir_lib
from wm.data import pipeline


def gather_iterator_states(train_iter) -> list[Any]:
  """Every process's data-iterator state, so each one resumes its own shard."""
  mine = pipeline.save_iterator_state(train_iter)
  if jax.process_count() == 1:
    return [mine]
  from jax.experimental import multihost_utils
  encoded = np.frombuffer(json.dumps(mine).encode(), np.uint8)
  size = int(np.max(multihost_utils.process_allgather(np.array([encoded.size]))))
  padded = np.zeros(size, np.uint8)
  padded[:encoded.size] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in np.asarray(gathered)]


def restore_latest(config, setup, ckpt_dir: str, workdir: str, signature: dict[str, Any], is_main: bool):
  """The newest checkpoint that verifies and fits this config: (step, state, meta), or None.

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
    try:
      with ocp.CheckpointManager(os.path.abspath(ckpt_dir)) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(setup.abstract_state), meta=ocp.args.JsonRestore()))
      problem = None if verified or _all_finite(restored["state"]) else "it holds non-finite numbers"
    except Exception as e:  # Orbax raises many types for unreadable or partial files  # pylint: disable=broad-except
      problem = f"it does not restore ({type(e).__name__}: {str(e)[:200]})"
    if problem is None:
      if is_main and not verified:
        ckpt_lib.write_manifest(step_dir)  # restored and finite: from now on it is checked like the others
      parallel.sync_processes("wm_restored")
      return step, restored["state"], restored["meta"]
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
