"""The training loop: data, steps, records, checkpoints, resume.

`train_and_evaluate(config, workdir)` is the one entry point used by the CLI,
the tests and the experiments. A run leaves in `workdir`:

    config.json        the validated config (and the memory plan, if a budget was given)
    metrics.jsonl      one JSON object per logged step: {"step", "split", "loss", ...}
    tensorboard/       TensorBoard event files
    checkpoints/       Orbax checkpoints: train state + data iterator state

Running the same command again on the same workdir resumes from the latest
checkpoint (parameters, optimizer state, RNG, data position), so a resumed run
ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

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

from wm import config as config_lib
from wm import parallel, step as step_lib
from wm.data import pipeline
from wm.memory import measure

# Fields that fix the shapes and meaning of a checkpoint. A workdir holding
# checkpoints made with different values cannot be resumed by this config.
_STATE_FIELDS = ("model", "data.vocab_size", "data.task", "precision.param_dtype", "optim.name")


class IncompatibleWorkdir(ValueError):
  """The workdir holds checkpoints of a different model."""


def _lookup(tree: dict, dotted: str):
  for part in dotted.split("."):
    tree = tree.get(part, {}) if isinstance(tree, dict) else {}
  return tree


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to touch a workdir whose checkpoints belong to another model.

  Runs before anything is compiled, and before anything in the workdir is written.
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  saved_path = os.path.join(workdir, "config.json")
  has_ckpt = os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir))
  if not has_ckpt:
    return
  if not os.path.exists(saved_path):
    raise IncompatibleWorkdir(f"{workdir} has checkpoints but no config.json; cannot tell whether they fit this "
                              f"config. Use a new --workdir (nothing in {workdir} was changed).")
  with open(saved_path) as f:
    saved = json.load(f)
  new = config.to_dict()
  diffs = []
  for field in _STATE_FIELDS:
    old_v, new_v = _lookup(saved, field), _lookup(new, field)
    if isinstance(old_v, dict) and isinstance(new_v, dict):
      for k in sorted(set(old_v) | set(new_v)):
        if _jsonable(old_v.get(k)) != _jsonable(new_v.get(k)):
          diffs.append(f"{field}.{k}: checkpoint {old_v.get(k)!r}, now {new_v.get(k)!r}")
    elif _jsonable(old_v) != _jsonable(new_v):
      diffs.append(f"{field}: checkpoint {old_v!r}, now {new_v!r}")
  if diffs:
    raise IncompatibleWorkdir(
        f"{workdir} holds checkpoints of a different model, so this run cannot resume there:\n  "
        + "\n  ".join(diffs)
        + f"\nUse a new --workdir, or the original config to resume. Nothing in {workdir} was changed.")


def _jsonable(x):
  return json.loads(json.dumps(x, default=str))


def _write_config(config: ml_collections.ConfigDict, workdir: str, extra: dict[str, Any]) -> None:
  record = config.to_dict()
  record.update(extra)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2, default=str)
  os.replace(tmp, os.path.join(workdir, "config.json"))


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
  """Adds bits per byte for byte-level text (nll is in nats per token)."""
  if config.data.task == "text" and "nll" in metrics:
    metrics["bits_per_byte"] = metrics["nll"] / math.log(2) / pipeline.bytes_per_token(config)
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


def _eval_batches(config: ml_collections.ConfigDict, max_batches: int):
  """This process's rows of each global evaluation batch (numpy dicts).

  Rows are dealt to processes as the training iterator deals them (global row
  r to process r mod process_count). The last batch is filled with weight-0
  copies of an example, so every chosen example is scored exactly once.
  """
  source = pipeline.examples(config, "validation")
  batch, count, index = config.data.batch_size, jax.process_count(), jax.process_index()
  order = eval_indices(len(source), batch, max_batches)
  for start in range(0, len(order), batch):
    rows = [source[int(i)] for i in order[start:start + batch][index::count]]
    pad = {k: np.zeros_like(v) for k, v in source[int(order[0])].items()}
    rows += [pad] * (batch // count - len(rows))
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def evaluate(config, setup, state, eval_step, *, max_batches: int = 0) -> dict[str, Any]:
  """Mean metrics over the validation split, or over a seeded sample of `max_batches` batches of it.

  The result holds `eval_tokens` (scored target tokens) and `eval_examples`.
  """
  key = jax.random.PRNGKey(config.seed + 2)  # the same latent samples at every evaluation
  sums, examples = None, 0
  for i, local in enumerate(_eval_batches(config, max_batches)):
    examples += int(np.sum(np.any(local["weights"] > 0, axis=1)))
    out = eval_step(state, step_lib.global_batch(setup, local), jax.random.fold_in(key, i))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    raise ValueError(f"the validation split of {config.data.task!r} is empty; raise data.eval_size "
                     f"or give the validation split more text")
  metrics = _derived(config, step_lib.finish_sums(jax.device_get(sums)))
  if jax.process_count() > 1:  # each process counted its own rows
    from jax.experimental import multihost_utils
    examples = int(np.sum(multihost_utils.process_allgather(np.array([examples]))))
  metrics["eval_tokens"] = int(round(metrics["weight"]))
  metrics["eval_examples"] = examples
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict[str, Any]:
  """Trains `config`, writing records and checkpoints to `workdir`; resumes if it can.

  Args:
    config: a config from `configs/`, with overrides applied.
    workdir: where records and checkpoints go.
    stop_after_step: stop (after checkpointing) once this step is reached, as a
      preempted job would; the next call resumes. Lets a long run proceed in
      slices under a job-time limit; tests use it to check exact resumption.

  Returns:
    The last evaluation metrics.
  """
  config = config_lib.validate(config)
  parallel.maybe_initialize_distributed(config.mesh)
  plan_record = {}
  if config.train.budget:
    from wm.memory import plan as plan_lib  # the planner compiles; import only when asked
    config, plan_record = plan_lib.apply(config, config_lib.parse_bytes(config.train.budget))
  check_workdir(config, workdir)
  pipeline.prepare(config)  # fails with the command to run when a dataset is missing

  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  setup = step_lib.make_setup(config)
  if is_main:
    _write_config(config, workdir, {"memory_plan": plan_record} if plan_record else {})

  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.train.max_to_keep, create=True))
  train_iter = pipeline.make_iterator(config, "train", shuffle=True, num_epochs=None)
  latest = manager.latest_step()
  if latest is not None:
    try:
      restored = manager.restore(latest, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(setup.abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for unreadable or partial files
      where = os.path.join(manager.directory, str(latest))
      raise RuntimeError(
          f"checkpoint {where} could not be restored: {type(e).__name__}: {str(e)[:300]}\n"
          f"It is corrupt, incomplete or from another model. Move it aside (mv {where} {where}.bad) to resume "
          f"from the previous checkpoint, or use a new --workdir. Nothing was deleted.") from e
    state = restored["state"]
    pipeline.restore_iterator_state(train_iter, restored["meta"]["data_iterator"][jax.process_index()])
    logging.info("resumed from %s at step %d", manager.directory, latest)
  else:
    state = step_lib.init_state(setup)

  train_step = step_lib.make_train_step(setup)
  eval_step = step_lib.make_eval_step(setup)
  records = Records(workdir, is_main)
  tokens_per_step = config.data.batch_size * config.data.seq_len
  start = int(jax.device_get(state["step"]))
  total = config.train.steps
  last_eval: dict[str, Any] = {}

  def save(step: int) -> None:
    iter_states = _gather_iterator_states(train_iter)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": step, "data_iterator": iter_states})), force=True)

  if start == 0 and total > 0:
    last_eval = evaluate(config, setup, state, eval_step, max_batches=config.train.eval_batches)
    records.write(0, "eval", last_eval)

  bar = None
  if is_main and config.train.progress and total > start:
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
  window, t_window = [], time.perf_counter()
  step = start
  for step in range(start + 1, total + 1):
    local = next(train_iter)
    state, metrics = train_step(state, step_lib.global_batch(setup, local))
    window.append(metrics)
    if step % config.train.log_every == 0 or step == total:
      means = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0), *window))
      elapsed = time.perf_counter() - t_window
      line = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in means.items()}
      line["tokens_per_s"] = len(window) * tokens_per_step / elapsed
      line["step_time_s"] = elapsed / len(window)
      peak = measure.device_peak_bytes()
      if peak is not None:
        line["device_peak_bytes"] = peak
      records.write(step, "train", _derived(config, line))
      if bar is not None:
        bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
      window, t_window = [], time.perf_counter()
    if bar is not None:
      bar.update(1)
    if step % config.train.eval_every == 0 or step == total:
      last_eval = evaluate(config, setup, state, eval_step, max_batches=config.train.eval_batches)
      records.write(step, "eval", last_eval)
      t_window = time.perf_counter()  # evaluation time is not training throughput
    if step % config.train.checkpoint_every == 0 or step == total or step == stop_after_step:
      save(step)
    if stop_after_step is not None and step >= stop_after_step:
      break
  manager.wait_until_finished()
  manager.close()
  if bar is not None:
    bar.close()
  records.close()
  if not last_eval and total > 0:
    last_eval = evaluate(config, setup, state, eval_step, max_batches=config.train.eval_batches)
  return {"state": state, "eval": last_eval, "step": step}


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
