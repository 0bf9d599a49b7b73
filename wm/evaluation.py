"""Evaluation: which validation examples a run scores, and the metrics it logs for them.

Every evaluation of a run (and of any other run on the same split) scores the
same examples: the whole validation split, or a fixed-seed sample of
`train.eval_batches` batches of it. Metrics are nats per token, plus bits per
byte for byte-level text and, when pruning, the sparsity of the masks.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wm import parallel, step as step_lib
from wm.compress import prune
from wm.data import pipeline


def add_bits_per_byte(config: ml_collections.ConfigDict, metrics: dict[str, Any]) -> dict[str, Any]:
  """`metrics` with bits per byte of the text added (nll is in nats per token), and tokens per byte to evaluations.

  An evaluation of subword text has `bytes`, the bytes its scored tokens
  cover: bits per byte = nll * tokens / (ln 2 * bytes), exactly. Otherwise
  (byte-level text, and training lines) bytes per token is the split's mean.
  Returns `metrics`.
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


def eval_batches(config: ml_collections.ConfigDict):
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


def calibration_batches(config: ml_collections.ConfigDict):
  """The train-split batches that calibrate quant.state = "int8_static" (numpy dicts, whole global batches).

  `quant.calibration_batches` batches of data.batch_size examples, a
  fixed-seed sample of the whole train split (`eval_indices`); a split
  smaller than that gives all its examples, the last batch short rather than
  padded (a padding row's tokens would enter the maxima). Every process reads
  the same batches, so every process calibrates the same scales.
  """
  source = pipeline.examples(config, "train")
  batch = config.data.batch_size
  order = eval_indices(len(source), batch, config.quant.calibration_batches)
  for start in range(0, len(order), batch):
    yield pipeline.read_rows(source, order[start:start + batch])


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
  for i, local in enumerate(eval_batches(config)):
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
  return add_bits_per_byte(config, metrics)


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
