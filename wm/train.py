"""The training loop: data, steps, records, checkpoints, resume.

`train_and_evaluate(config, workdir)` is the one entry point used by the CLI,
the tests and the experiments. A run leaves in `workdir`:

    config.json          the validated config (and the memory plan, if a budget was given)
    config_history.jsonl the config of every later run that resumed here
    metrics.jsonl        one JSON object per logged step: {"step", "split", "loss", ...}
    tensorboard/         TensorBoard event files
    checkpoints/         Orbax checkpoints: train state + data iterator state, each with
                         a manifest of checksums (wm.checkpoints); quarantine/ holds bad ones
    lock                 while a run is using the workdir (wm.workdir)

Running the same command again on the same workdir resumes from the latest
checkpoint that verifies (parameters, optimizer state, RNG, data position), so
a resumed run ends exactly where an uninterrupted one would; a finished run
trains nothing and returns its last evaluation. A non-finite loss or gradient
never reaches the train state (see `wm.step.make_train_step`): the run stops,
or with `train.on_nonfinite=skip_batch` drops that update and goes on. A
fresh run with `train.init_from=W` starts from the parameters of W's latest
verified checkpoint (wm.finetune: pretrain, then fine-tune, e.g. with LoRA).
"""

from __future__ import annotations

import functools
import json
import math
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
from wm import finetune
from wm import parallel, step as step_lib
from wm import workdir as workdir_lib
from wm.compress import prune
from wm.data import pipeline
from wm.memory import measure


IncompatibleWorkdir = workdir_lib.IncompatibleWorkdir
WorkdirError = workdir_lib.WorkdirError


class NonFiniteLoss(RuntimeError):
  """Training produced a non-finite loss or gradient and the run stopped (its state stays finite)."""


class Records:
  """metrics.jsonl + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.writer = None
    if enabled:
      self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard events are a convenience; the JSON lines are the record.
        logging.warning("tensorboardX not installed: no TensorBoard events")

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = {"step": int(step), "split": split, **metrics}
    # A non-finite float becomes null: NaN is not JSON, and readers other than Python's reject it.
    line = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}
    self.file.write(json.dumps(line) + "\n")
    self.file.flush()
    if self.writer is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.writer.add_scalar(f"{split}/{k}", v, step)
        elif isinstance(v, list):
          for i, x in enumerate(v):
            self.writer.add_scalar(f"{split}/{k}/{i}", x, step)
      self.writer.flush()

  def close(self) -> None:
    if self.enabled:
      self.file.close()
      if self.writer is not None:
        self.writer.close()


def _derived(config: ml_collections.ConfigDict, metrics: dict[str, Any]) -> dict[str, Any]:
  """Adds bits per byte of the text (nll is in nats per token), and tokens per byte to evaluations.

  An evaluation of subword text has `bytes`, the bytes its scored tokens
  cover: bits per byte = nll * tokens / (ln 2 * bytes), exactly. Otherwise
  (byte-level text, and training lines) bytes per token is the split's mean.
  """
  if config.data.task == "text" and "nll" in metrics:
    if "bytes" in metrics:
      metrics["eval_bytes"] = int(metrics.pop("bytes"))
      metrics["bits_per_byte"] = metrics["nll"] * metrics["weight"] / math.log(2) / metrics["eval_bytes"]
      metrics["tokens_per_byte"] = metrics["weight"] / metrics["eval_bytes"]
    else:
      metrics["bits_per_byte"] = metrics["nll"] / math.log(2) / pipeline.bytes_per_token(config)
      if "eval_tokens" in metrics:
        metrics["tokens_per_byte"] = 1 / pipeline.bytes_per_token(config)
  return metrics


# The evaluation sample is drawn with a fixed seed, not config.seed, so runs
# that differ only in their seed (or anything else) score the same examples.
EVAL_SAMPLE_SEED = 20161


def eval_indices(num_examples: int, batch_size: int, max_batches: int) -> np.ndarray:
  """Which validation examples an evaluation scores, in file order.

  The whole split when `max_batches` is 0 or covers it; otherwise a uniform
  sample without replacement of `max_batches * batch_size` examples drawn
  from the whole split with a fixed seed, so every evaluation (of this run and
  of any other run on the same split) scores the same examples, and a split
  whose documents are sorted by source or date is not judged by its head.
  """
  wanted = max_batches * batch_size
  if not max_batches or wanted >= num_examples:
    return np.arange(num_examples)
  rng = np.random.default_rng(EVAL_SAMPLE_SEED)
  return np.sort(rng.choice(num_examples, size=wanted, replace=False))


def _eval_batches(config: ml_collections.ConfigDict):
  """This process's rows of each global evaluation batch (numpy dicts).

  Rows are dealt to processes as the training iterator deals them (global row
  r to process r mod process_count). The last batch is padded with weight-0
  rows, so every chosen example is scored exactly once.
  """
  source = pipeline.examples(config, "validation")
  batch, count, index = config.data.batch_size, jax.process_count(), jax.process_index()
  order = eval_indices(len(source), batch, config.train.eval_batches)
  for start in range(0, len(order), batch):
    rows = order[start:start + batch]
    rows = np.concatenate([rows, np.full(batch - len(rows), len(source))])  # past the end: padding rows
    yield pipeline.read_rows(source, rows[index::count])


def evaluate(config, setup, state, eval_step) -> dict[str, Any]:
  """Mean metrics over the validation split, or a fixed sample of `train.eval_batches` batches of it.

  Returns:
    The model's metrics (nats per token), plus `eval_tokens` (the summed target
    weights scored) and `eval_examples` (examples with at least one scored token);
    for text, `bits_per_byte` and `tokens_per_byte` (and for subword text
    `eval_bytes`, the bytes the scored tokens cover).
  """
  key = jax.random.PRNGKey(config.seed + 2)  # the same latent samples at every evaluation
  sums = None
  for i, local in enumerate(_eval_batches(config)):
    out = eval_step(state, step_lib.global_batch(setup, local), jax.random.fold_in(key, i))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    raise ValueError(f"the validation split of {config.data.task!r} is empty; raise data.eval_size "
                     f"or give the corpus a validation part")
  metrics = step_lib.finish_sums(jax.device_get(sums))
  metrics["eval_tokens"] = int(round(metrics["weight"]))
  metrics["eval_examples"] = int(metrics.pop("examples"))
  pruning = prune.find_state(state.get("opt_state"))
  if pruning is not None:
    metrics.update(_sparsity_record(setup.mesh, pruning.masks))
  return _derived(config, metrics)


@functools.lru_cache(maxsize=8)
def _sparsity_fn(mesh):
  # Jitted with replicated outputs: every process can read sums over masks sharded across processes.
  return jax.jit(lambda masks: (prune.sparsity(masks), prune.layer_sparsity(masks)),
                 out_shardings=parallel.replicated(mesh))


def _sparsity_record(mesh, masks) -> dict[str, Any]:
  """`sparsity` (all pruned weights) and `sparsity_layers` ({weight: fraction pruned, per layer}) for the eval line."""
  overall, layers = jax.device_get(_sparsity_fn(mesh)(masks))
  return {"sparsity": float(overall),
          "sparsity_layers": {k: np.round(np.asarray(v, np.float64), 6).tolist() for k, v in layers.items()}}


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _broadcast_int(value: int) -> int:
  """Process 0's `value` on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _restore(config, setup, ckpt_dir: str, workdir: str, signature: dict[str, Any], is_main: bool):
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
  _barrier("wm_scanned")  # every process has read the files before process 0 moves any
  if is_main:
    for step, reason in bad:
      ckpt_lib.quarantine(ckpt_dir, step, reason)
  _barrier("wm_quarantined")
  while candidates:
    step, verified = candidates[0]
    step_dir = os.path.join(ckpt_dir, str(step))
    try:
      with ocp.CheckpointManager(os.path.abspath(ckpt_dir)) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(setup.abstract_state), meta=ocp.args.JsonRestore()))
      problem = None if verified or _finite(restored["state"]) else "it holds non-finite numbers"
    except Exception as e:  # Orbax raises many types for unreadable or partial files  # pylint: disable=broad-except
      problem = f"it does not restore ({type(e).__name__}: {str(e)[:200]})"
    if problem is None:
      if is_main and not verified:
        ckpt_lib.write_manifest(step_dir)  # restored and finite: from now on it is checked like the others
      _barrier("wm_restored")
      return step, restored["state"], restored["meta"]
    if jax.process_count() > 1:
      raise RuntimeError(f"checkpoint {step_dir}: {problem}. Move it to {ckpt_dir}/{ckpt_lib.QUARANTINE}/ "
                         f"and rerun to resume from the previous one.")
    ckpt_lib.quarantine(ckpt_dir, step, problem)
    candidates, bad = ckpt_lib.scan(ckpt_dir)
    for bad_step, reason in bad:
      ckpt_lib.quarantine(ckpt_dir, bad_step, reason)
  return None


def _finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


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
    if not _broadcast_int(0 if refused is not None else 1):
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
  restored = _restore(config, setup, ckpt_dir, workdir, signature, is_main)
  train_iter = pipeline.make_iterator(config, "train", shuffle=True, num_epochs=None)
  if restored is not None:
    start, state, meta = restored
    pipeline.restore_iterator_state(train_iter, meta["data_iterator"][jax.process_index()])
    logging.info("resumed from %s at step %d", ckpt_dir, start)
  elif config.train.init_from:
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
                                  options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))
  saver = ckpt_lib.Saver(manager, ckpt_dir, config.train.max_to_keep, is_main, _barrier)
  saver.last_good = start if restored is not None else None
  train_step = step_lib.make_train_step(setup)
  eval_step = step_lib.make_eval_step(setup)
  records = Records(workdir, is_main)
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
    saver.save(step, ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": step, "data_iterator": _gather_iterator_states(train_iter),
                                "signature": signature})))

  if start >= total:
    # Finished already: train nothing, and return the evaluation logged at the end.
    last_eval = workdir_lib.last_eval(workdir, start) or {}
    if not last_eval and total > 0:
      last_eval = evaluate(config, setup, state, eval_step)
      records.write(start, "eval", last_eval)
    return {"state": state, "eval": last_eval, "step": start}
  if start == 0:
    last_eval = evaluate(config, setup, state, eval_step)
    records.write(0, "eval", last_eval)

  guard = _NonFiniteGuard(config, saver, records, os.path.join(workdir, "checkpoints"))
  bar = None
  if is_main and t.progress:
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
  window, t_window = [], time.perf_counter()
  step = start
  try:
    for step in range(start + 1, total + 1):
      local = next(train_iter)
      state, metrics = train_step(state, step_lib.global_batch(setup, local))
      # The flag of the step before this one: this step is already queued on the
      # device, so waiting for one bool of the previous step costs no idle time.
      guard.check_previous()
      guard.pending = (step, metrics)
      window.append(metrics)
      if step % t.log_every == 0 or step == total:
        guard.check_previous()  # the means below read this step anyway
        records.write(step, "train", _derived(config, _window_line(window, time.perf_counter() - t_window,
                                                                   tokens_per_step)))
        if bar is not None:
          bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        window, t_window = [], time.perf_counter()
      if bar is not None:
        bar.update(1)
      if step % t.eval_every == 0 or step == total:
        last_eval = evaluate(config, setup, state, eval_step)
        records.write(step, "eval", last_eval)
        t_window = time.perf_counter()  # evaluation time is not training throughput
      if step % t.checkpoint_every == 0 or step == total or step == stop_after_step:
        guard.check_previous()  # never checkpoint past an unchecked step
        save(step)
      if stop_after_step is not None and step >= stop_after_step:
        break
    guard.check_previous()
  finally:
    if bar is not None:
      bar.close()
  if not last_eval and total > 0:
    last_eval = evaluate(config, setup, state, eval_step)
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


def check_generate_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses, in one message, a workdir with no usable checkpoint or one of another model (for `generate`)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} does not exist; train first: python -m wm train --config ... "
                       f"--workdir {workdir}")
  candidates, bad = ckpt_lib.scan(ckpt_dir)
  if bad and (not candidates or bad[0][0] > candidates[0][0]):
    raise WorkdirError(f"the latest checkpoint in {ckpt_dir} (step {bad[0][0]}) is damaged: {bad[0][1]}. Run "
                       f"`python -m wm train` on this workdir once: it quarantines it and resumes from the previous one.")
  if not candidates:
    raise WorkdirError(f"{workdir} has no usable checkpoint in {ckpt_dir}; train first (or resume) with "
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


def _gather_iterator_states(train_iter) -> list[Any]:
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
