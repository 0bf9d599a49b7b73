"""The training loop: data, steps, records, checkpoints, resume.

`train_and_evaluate(config, workdir)` is the one entry point used by the CLI,
the tests and the experiments. A run leaves in `workdir`:

    config.json          the validated config (and the memory plan, if a budget was given)
    config_history.jsonl the config of every later run that resumed here
    metrics.jsonl        one JSON object per logged step: {"step", "split", "loss", ...}
    tensorboard/         TensorBoard event files
    checkpoints/         Orbax checkpoints, one directory per step: state/ (train state),
                         meta/ (step, signature) and data_iterator/ (each process's data
                         position, by grain's Orbax handler; wm.resume), each step with a
                         manifest of checksums (wm.checkpoints); quarantine/ holds bad ones
    lock                 while a run is using the workdir (wm.workdir)

Running the same command again on the same workdir resumes from the latest
checkpoint that verifies (parameters, optimizer state, RNG, data position), so
a resumed run ends exactly where an uninterrupted one would; a finished run
trains nothing and returns its last evaluation. A non-finite loss or gradient
never reaches the train state (see `wm.step.make_train_step`): the run stops,
or with `train.on_nonfinite=skip_batch` drops that update and goes on. A
fresh run with `train.init_from=W` starts from the parameters of W's latest
verified checkpoint (wm.finetune: pretrain, then fine-tune, e.g. with LoRA).

The loop is here; what it calls lives next door: wm.evaluation (which
examples an evaluation scores and its metrics), wm.resume (what a checkpoint
holds besides the state, and the newest one that verifies and fits),
wm.workdir (the lock, the config record, metrics.jsonl) and wm.checkpoints
(checksums, quarantine, retention).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from wm import checkpoints as ckpt_lib
from wm import config as config_lib
from wm import evaluation, finetune
from wm import parallel, preemption, resume, step as step_lib
from wm import workdir as workdir_lib
from wm.data import pipeline
from wm.memory import measure


IncompatibleWorkdir = workdir_lib.IncompatibleWorkdir
WorkdirError = workdir_lib.WorkdirError


Preempted = preemption.Preempted


class NonFiniteLoss(RuntimeError):
  """Training produced a non-finite loss or gradient and the run stopped (its state stays finite)."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict[str, Any]:
  """Trains `config`, writing records and checkpoints to `workdir`; resumes if it can.

  Everything knowable from the config and the filesystem is checked before a
  dataset is built, anything is compiled or the workdir is created; the
  workdir is then locked for this run (process 0 holds the lock).

  Args:
    config: a config from `configs/`, with overrides applied.
    workdir: where records and checkpoints go.
    stop_after_step: stop (after checkpointing) once this step is reached, as a
      preempted job would; the next call resumes. Lets a long run proceed in
      slices under a job-time limit; tests use it to check exact resumption.

  Returns:
    {"state": the train state, "eval": the last evaluation metrics, "step": the last step}.

  Raises:
    ConfigError, WorkdirError, IncompatibleWorkdir, DatasetNotPrepared: bad input,
      found before training starts.
    NonFiniteLoss: the loss or gradient became non-finite (after
      `train.max_skipped_in_row` in a row with `on_nonfinite=skip_batch`);
      the checkpoints hold finite state only.
    Preempted: SIGTERM arrived (a preemption notice); the step in progress
      finished and was checkpointed, and the next call resumes from it.
  """
  config = config_lib.validate(config)
  workdir_lib.check_path(workdir)
  parallel.maybe_initialize_distributed(config.mesh)
  plan_record = {}
  if config.train.budget:
    from wm.memory import plan as plan_lib  # the planner compiles; import only when asked
    config, plan_record = plan_lib.apply(config, config_lib.parse_bytes(config.train.budget))
  pipeline.prepare(config)  # fails with the command to run when a dataset is missing
  for split in ("train", "validation"):  # before anything compiles
    if len(pipeline.examples(config, split)) == 0:
      raise config_lib.ConfigError(
          f"the {split} split of {config.data.task!r} holds no example of data.seq_len={config.data.seq_len} "
          f"tokens; lower data.seq_len or give that split more data")
  setup = step_lib.make_setup(config)  # a mesh that does not fit the parameters fails here
  init_step = None
  if config.train.init_from and not ckpt_lib.steps(os.path.join(workdir, "checkpoints")):
    # A fresh run: the pretrained checkpoint must exist and fit the model before anything compiles.
    init_step = finetune.check_init_from(config, setup, workdir)

  is_main = jax.process_index() == 0
  created = not os.path.exists(workdir)
  lock = workdir_lib.Lock(workdir)
  try:
    refused = None
    if is_main:
      try:
        os.makedirs(workdir, exist_ok=True)
        lock.acquire()
      except (WorkdirError, OSError) as e:
        refused = e
    # Every process learns process 0's answer (the others would otherwise wait for it in a collective).
    if not parallel.broadcast_from_main(0 if refused is not None else 1):
      raise refused if refused is not None else WorkdirError(
          f"{workdir} is in use by another run (process 0 could not lock it)")
    return _run(config, setup, workdir, plan_record, stop_after_step, is_main, init_step)
  except BaseException:
    lock.release()
    if created and is_main and os.path.isdir(workdir) and not os.listdir(workdir):
      os.rmdir(workdir)  # a run refused before writing anything leaves no empty workdir behind
    raise
  finally:
    lock.release()


def _run(config, setup, workdir: str, plan_record: dict[str, Any], stop_after_step: int | None,
         is_main: bool, init_step: int | None = None) -> dict[str, Any]:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  signature = workdir_lib.signature(config, setup.abstract_state, jax.process_count())
  record = config.to_dict()
  if plan_record:
    record["memory_plan"] = plan_record

  def new_iterator():
    return pipeline.make_iterator(config, "train", shuffle=True, num_epochs=None)

  restored = resume.restore_latest(config, setup, ckpt_dir, workdir, signature, is_main, new_iterator)
  if restored is not None:
    start, state, train_iter = restored  # the iterator at the checkpoint's data position
    logging.info("resumed from %s at step %d", ckpt_dir, start)
  else:
    train_iter = new_iterator()
    if config.train.init_from:
      # init_step is None when this workdir had checkpoints that all failed to restore: check the source now.
      init_step = finetune.check_init_from(config, setup, workdir) if init_step is None else init_step
      start, state = 0, finetune.init_state(setup, config.train.init_from, init_step)
      record["init_from_checkpoint"] = {"workdir": config.train.init_from, "step": init_step}
    else:
      start, state = 0, step_lib.init_state(setup)
  if is_main:  # the run is accepted: only now is anything in the workdir written
    workdir_lib.record_config(workdir, record, start if restored is not None else None)
    workdir_lib.cut_metrics(workdir, start if restored is not None else None)

  manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir),
                                  options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
                                  item_handlers=resume.item_handlers())
  saver = ckpt_lib.Saver(manager, ckpt_dir, config.train.max_to_keep, is_main, parallel.sync_processes)
  saver.last_good = start if restored is not None else None
  train_step = step_lib.make_train_step(setup)
  eval_step = step_lib.make_eval_step(setup)
  records = workdir_lib.Records(workdir, is_main)
  try:
    return _loop(config, setup, workdir, state, start, train_iter, train_step, eval_step, saver, records,
                 signature, stop_after_step, is_main)
  finally:
    records.close()
    saver.close()


def _loop(config, setup, workdir, state, start, train_iter, train_step, eval_step, saver, records, signature,
          stop_after_step, is_main) -> dict[str, Any]:
  total, t = config.train.steps, config.train
  tokens_per_step = config.data.batch_size * config.data.seq_len
  last_eval: dict[str, Any] = {}

  def save(step: int) -> None:
    saver.save(step, resume.save_args(state, {"step": step, "signature": signature}, train_iter))

  if start >= total:
    # Finished already: train nothing, and return the evaluation logged at the end.
    last_eval = workdir_lib.last_eval(workdir, start) or {}
    if not last_eval and total > 0:
      last_eval = evaluation.evaluate(config, setup, state, eval_step)
      records.write(start, "eval", last_eval)
    return {"state": state, "eval": last_eval, "step": start}
  if start == 0:
    last_eval = evaluation.evaluate(config, setup, state, eval_step)
    records.write(0, "eval", last_eval)

  guard = _NonFiniteGuard(config, saver, records, os.path.join(workdir, "checkpoints"))
  bar = None
  if is_main and t.progress:
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
  window, t_window = [], time.perf_counter()

  def log_window(step: int, **extra) -> None:
    line = _window_line(window, time.perf_counter() - t_window, tokens_per_step)
    records.write(step, "train", {**evaluation.add_bits_per_byte(config, line), **extra})

  step = start
  watch = preemption.Watch()  # from here on SIGTERM stops the loop at a step boundary
  try:
    for step in range(start + 1, total + 1):
      local = next(train_iter)
      state, metrics = train_step(state, step_lib.global_batch(setup, local))
      # The flag of the step before this one: this step is already queued on the
      # device, so waiting for one bool of the previous step costs no idle time.
      guard.check_previous()
      guard.pending = (step, metrics)
      window.append(metrics)
      # Asked to stop (SIGTERM)? Decided before this step's line is written, so that the last train line of a
      # preempted run carries the mark even when the stop falls on a logging step.
      stopping = (step < total and (stop_after_step is None or step < stop_after_step)
                  and watch.requested(step))
      if step % t.log_every == 0 or step == total:
        guard.check_previous()  # the means below read this step anyway
        log_window(step, **({"stopped": "preempted"} if stopping else {}))
        if bar is not None:
          bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        window, t_window = [], time.perf_counter()
      if bar is not None:
        bar.update(1)
      if step % t.eval_every == 0 or step == total:
        last_eval = evaluation.evaluate(config, setup, state, eval_step)
        records.write(step, "eval", last_eval)
        t_window = time.perf_counter()  # evaluation time is not training throughput
      saved = step % t.checkpoint_every == 0 or step == total or step == stop_after_step
      if saved:
        guard.check_previous()  # never checkpoint past an unchecked step
        save(step)
      if stop_after_step is not None and step >= stop_after_step:
        break
      if stopping:
        guard.check_previous()
        if not saved:
          save(step)
        saver.finish()  # on disk and verified before the process is told to go
        if window:  # the steps since the last logged line are not run again on resume: log them now
          log_window(step, stopped="preempted")
        raise Preempted(step, saver.directory)
    guard.check_previous()
  finally:
    watch.close()
    if bar is not None:
      bar.close()
  if not last_eval and total > 0:
    last_eval = evaluation.evaluate(config, setup, state, eval_step)
  return {"state": state, "eval": last_eval, "step": step}


def _window_line(window: list[dict[str, Any]], elapsed: float, tokens_per_step: int) -> dict[str, Any]:
  """Means of the logged window's metrics; non-finite steps are counted, not averaged."""
  skipped = sum(int(m["nonfinite"]) for m in window)
  means = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0),
                                      *[{k: v for k, v in m.items() if k != "nonfinite"} for m in window]))
  line = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in means.items()}
  line["nonfinite_steps"] = skipped
  line["tokens_per_s"] = len(window) * tokens_per_step / elapsed
  line["step_time_s"] = elapsed / len(window)
  peak = measure.device_peak_bytes()
  if peak is not None:
    line["device_peak_bytes"] = peak
  return line


class _NonFiniteGuard:
  """Reads each step's non-finite flag (one step late) and stops or counts skips.

  The train step already dropped the update of a non-finite step (wm.step), so
  the state is finite whatever happens here.
  """

  def __init__(self, config, saver, records, ckpt_dir: str):
    self.action, self.limit = config.train.on_nonfinite, config.train.max_skipped_in_row
    self.lr = config.optim.lr
    self.saver, self.records, self.ckpt_dir = saver, records, ckpt_dir
    self.pending: tuple[int, dict[str, Any]] | None = None
    self.in_row = 0

  def check_previous(self) -> None:
    if self.pending is None:
      return
    step, metrics = self.pending
    self.pending = None
    if not int(metrics["nonfinite"]):
      self.in_row = 0
      return
    self.in_row += 1
    loss, grad = float(metrics["loss"]), float(metrics["grad_norm"])
    if self.action == "skip_batch" and self.in_row < self.limit:
      logging.warning("step %d: loss %s, gradient norm %s: update dropped (%d in a row; stop at %d)",
                      step, loss, grad, self.in_row, self.limit)
      return
    self.records.write(step, "train", {"loss": loss, "grad_norm": grad, "nonfinite_steps": self.in_row,
                                       "stopped": "nonfinite"})
    self.saver.finish()  # the last save in flight is good: complete it, so it can be named
    last = self.saver.last_good
    where = (f"the last good checkpoint is {os.path.join(self.ckpt_dir, str(last))} (step {last}); rerunning the "
             f"same command resumes from it" if last is not None else "no checkpoint was written yet")
    why = (f"{self.in_row} steps in a row were non-finite" if self.action == "skip_batch"
           else "train.on_nonfinite=stop")
    raise NonFiniteLoss(
        f"step {step}: loss {loss}, gradient norm {grad}: not finite, so the run stopped ({why}); that update "
        f"was not applied and no non-finite state was saved. {where[0].upper() + where[1:]}. Lower optim.lr "
        f"(now {self.lr}), keep optim.clip_norm > 0, or set train.on_nonfinite=skip_batch to drop such batches.")


