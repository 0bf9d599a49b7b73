"""Preemption: on SIGTERM, finish the step, save a checkpoint, and stop.

Spot and preemptible machines (Cloud TPU VMs, GCE, GKE), SLURM (`--signal`)
and Kubernetes send SIGTERM some seconds before they kill a job. Left to the
default action, the signal kills the run at once and every step since its
last periodic checkpoint is lost; here the loop saves the step it has just
finished, and `wm` exits with 143 (128 + SIGTERM) and says which checkpoint
to resume from, so a scheduler that reruns failed jobs resumes it.

One process: a Python handler sets a flag that the loop reads after every
step. Several processes (`jax.distributed`): every process must save the
same step, yet the signal may reach them at different steps. JAX's
preemption sync manager (started by `jax.distributed.initialize`; it watches
SIGTERM itself, so no Python handler is installed) agrees on one step for all
of them: `multihost_utils.reached_preemption_sync_point`, what MaxText and
Orbax use.
"""

from __future__ import annotations

import signal
import threading

import jax


class Preempted(RuntimeError):
  """The run stopped on SIGTERM after saving the step it had finished."""

  def __init__(self, step: int, checkpoint_dir: str):
    super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {step} is saved in {checkpoint_dir}: "
                     f"rerun the same command to resume from it")
    self.step = step


class Watch:
  """Installs the SIGTERM handler (one process) until `close`; `requested(step)` says whether to stop after `step`."""

  def __init__(self):
    self.signalled = False
    self._multi = jax.process_count() > 1
    self._previous = None
    # signal.signal works only in the main thread; elsewhere (a run started
    # from a worker thread) SIGTERM keeps its default action.
    self._installed = not self._multi and threading.current_thread() is threading.main_thread()
    if self._installed:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def close(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self.signalled = True

  def requested(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # no preemption service (jax_enable_preemption_service off): SIGTERM kills
        return False
    return self.signalled
