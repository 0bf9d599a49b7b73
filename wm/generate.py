"""Sampling from a trained model with bounded state.

Language models decode one token at a time from their working memory: the
LSTM's (h, c) or the Transformer's KV cache (a ring buffer of `window` slots
when the model uses a sliding window, so memory stays bounded however long the
sample), stored in `quant.state` (float32, bfloat16, int8, int8_static,
float8_e4m3fn). "int8_static" stores int8 codes on static per-channel scales
that `calibrate_state` computes once per model from its own activations on
training batches; the scales travel with the memory as arrays.
Latent models sample a code from the prior and decode from it. With
`quant.weights = "int8"` the model runs on int8 matmul weights.

`decode_metrics` scores a batch through the same decode path, teacher-forced
(the true token goes in at every position): the quality of a quantized
generation state, which the training forward pass never stores, on the same
footing as the forward pass's validation loss.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from wm import config as config_lib
from wm import evaluation, parallel, step as step_lib
from wm.compress import quant
from wm.models import layers


def restore_model(config: ml_collections.ConfigDict, workdir: str) -> nnx.Module:
  """The latest checkpoint's model, on one device; int8 matmul weights under `quant.weights = "int8"`."""
  ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  single = ml_collections.ConfigDict(config.to_dict())
  single.mesh.update(num_devices=1, data=1, fsdp=1, tensor=1)
  setup = step_lib.make_setup(single, parallel.make_mesh(single.mesh, jax.devices()[:1]))
  with ocp.CheckpointManager(ckpt_dir) as manager:
    latest = manager.latest_step()
    if latest is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first: python -m wm train --config ... "
                              f"--workdir {workdir}")
    state = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(setup.abstract_state)))["state"]
  model = step_lib.model_from_state(setup, state)
  # Weight-only int8 (wm.compress.quant): each layer dequantizes its own weights when it runs.
  return quant.quantize_model(model) if config.quant.weights == "int8" else model


def init_memory(model: nnx.Module, batch: int, max_len: int, scales: dict[str, jax.Array] | None = None):
  """The empty working memory decoding starts from: a KV cache for `max_len` tokens, or a recurrent state.

  `scales`: the int8_static scales (`calibrate_state`); only that state dtype reads them.
  """
  kw = {} if scales is None else {"scales": scales}
  if hasattr(model, "init_cache"):
    return model.init_cache(batch, max_len, **kw)
  return model.init_state(batch, **kw)


def calibrate_state(config: ml_collections.ConfigDict, model: nnx.Module,
                    setup: step_lib.Setup | None = None) -> dict[str, jax.Array]:
  """Static int8 scales of the generation state: amax / 127 per layer and cached channel.

  The model's forward pass over `quant.calibration_batches` train batches
  (`evaluation.calibration_batches`) records the largest magnitude of every
  channel the state stores (Transformer: keys after RoPE and values, per
  layer, kv head and head_dim channel; LSTM: c per layer and channel, h's
  bound being 1), the maximum over batches, positions and sequences. Values
  beyond it saturate when decoding.

  Args:
    config: the run's config (its data and quant.calibration_batches).
    model: the model as it decodes (float or int8 weights).
    setup: the mesh and rules the model's arrays live on, if any.

  Returns:
    {"k", "v"} (Transformer) or {"h", "c"} (LSTM) float32 scales [layers, ...].
  """
  amax_fn = nnx.jit(lambda m, tokens: m.state_amax(tokens))
  amax = None
  for batch in evaluation.calibration_batches(config):
    if setup is None:
      got = amax_fn(model, jnp.asarray(batch["inputs"]))
    else:
      with parallel.activate(setup.mesh, setup.rules):
        got = amax_fn(model, jnp.asarray(batch["inputs"]))
    amax = got if amax is None else jax.tree.map(jnp.maximum, amax, got)
  if amax is None:
    raise ValueError(f"the train split of {config.data.task!r} is empty: nothing to calibrate "
                     f"quant.state=\"int8_static\" on")
  return jax.device_get(quant.static_scales(amax))


def decode_metrics(model: nnx.Module, batch: dict, key: jax.Array | None = None,
                   scales: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """`layers.lm_loss`'s metrics of `batch`, scored one token at a time through `decode_step`.

  Teacher-forced: position i consumes the true input token, whatever the
  model predicted, so the sums equal the forward pass's up to the state's
  storage (float32 state: float rounding; a quantized state: its error,
  which compounds over positions the way it does in generation). A
  `lax.scan` over positions, so it compiles once for any length. The
  signature is `step.make_eval_step`'s `score` (bind `scales`, the
  int8_static scales of `calibrate_state`, with functools.partial).
  """
  del key  # decoding is deterministic (no dropout, no latent samples)
  graphdef, variables = nnx.split(model)
  b, t = batch["inputs"].shape

  def body(carry, xs):
    memory, sums = carry
    tokens, targets, weights = xs
    # copy=True: fresh Variables at this trace level (nnx.scan in decode_step refuses the outer level's).
    logits, memory = nnx.merge(graphdef, variables, copy=True).decode_step(tokens, memory)
    return (memory, jax.tree.map(jnp.add, sums, layers.lm_loss_sums(logits, targets, weights))), None

  zero = jnp.zeros((), jnp.float32)
  init = (init_memory(model, b, t, scales), {"xent": zero, "correct": zero, "weight": zero})
  columns = tuple(jnp.swapaxes(batch[k], 0, 1) for k in ("inputs", "targets", "weights"))  # [t, b]: scan over t
  (_, sums), _ = jax.lax.scan(body, init, columns)
  return layers.lm_loss_from_sums(sums)[1]


def evaluate_decoded(config: ml_collections.ConfigDict, state: step_lib.State,
                     state_dtype: str | None = None) -> dict:
  """`evaluation.evaluate` of a train state (same examples, same metrics), scored through the decode path.

  Args:
    config: the run's config; its evaluation sample (`train.eval_batches`) is the one scored.
    state: a train state of that config (e.g. `train_and_evaluate(...)["state"]`).
    state_dtype: the generation state's storage (`quant.state`); None = the config's.
  """
  if state_dtype is not None:
    config = config_lib.override(config, {"quant.state": state_dtype})
  setup = step_lib.make_setup(config)
  score, int8_score = decode_metrics, None  # None: the int8-weight model is scored like the float one
  if config.quant.state == "int8_static":
    # Each model decodes with scales calibrated on its own activations: the int8-weight model's keys and
    # values differ slightly from the float model's.
    model = step_lib.model_from_state(setup, state)
    score = functools.partial(decode_metrics, scales=calibrate_state(config, model, setup))
    if config.quant.weights == "int8":
      int8_score = functools.partial(decode_metrics,
                                     scales=calibrate_state(config, quant.quantize_model(model), setup))
  return evaluation.evaluate(config, setup, state, step_lib.make_eval_step(setup, score=score,
                                                                           int8_score=int8_score))


def sample_tokens(model: nnx.Module, prompt: np.ndarray, length: int, key: jax.Array,
                  temperature: float = 1.0, scales: dict[str, jax.Array] | None = None) -> np.ndarray:
  """Continues `prompt` [b, p] by `length` tokens, one decode step at a time (`scales`: int8_static's)."""
  batch, p = prompt.shape
  memory = init_memory(model, batch, p + length, scales)

  @nnx.jit
  def step(model, tokens, memory, key):
    logits, memory = model.decode_step(tokens, memory)
    logits = logits.astype(jnp.float32)
    nxt = (jnp.argmax(logits, -1) if temperature == 0
           else jax.random.categorical(key, logits / temperature, axis=-1))
    return nxt.astype(jnp.int32), memory

  out = [prompt[:, i] for i in range(p)]
  tokens = jnp.asarray(prompt[:, 0], jnp.int32)
  for i in range(p + length - 1):
    nxt, memory = step(model, tokens, memory, jax.random.fold_in(key, i))
    tokens = jnp.asarray(prompt[:, i + 1], jnp.int32) if i + 1 < p else nxt
    if i + 1 >= p:
      out.append(np.asarray(nxt))
  return np.stack(out, axis=1)


def main(config: ml_collections.ConfigDict, workdir: str | None, *, num_samples: int, length: int,
         prompt: str) -> int:
  if not workdir:
    raise SystemExit("error: generate needs --workdir of a trained run")
  model = restore_model(config, workdir)
  key = jax.random.PRNGKey(config.seed)
  byte_level = config.data.task == "text"
  tokenizer = None
  if byte_level and config.data.tokenizer != "bytes":  # subword text: the model prepared beside the dataset
    from wm.data import pipeline, subword
    tokenizer = subword.load_tokenizer(pipeline.tokens_folder(config))
  if hasattr(model, "sample") and not hasattr(model, "decode_step"):
    tokens = np.asarray(model.sample(nnx.Rngs(config.seed), num_samples, length))
  else:
    if byte_level:
      start = (tokenizer.encode(prompt or "\n") if tokenizer else
               np.frombuffer((prompt or "\n").encode(), np.uint8).astype(np.int32))
    else:
      start = np.array([int(t) for t in prompt.split()] or [1], np.int32)
    scales = calibrate_state(config, model) if config.quant.state == "int8_static" else None
    tokens = sample_tokens(model, np.tile(start, (num_samples, 1)), length, key, scales=scales)
  for row in tokens:
    if byte_level:
      raw = tokenizer.decode(row) if tokenizer else bytes(int(t) % 256 for t in row)
      print(raw.decode("utf-8", errors="replace"))
      print("-" * 40)
    else:
      print(" ".join(str(int(t)) for t in row))
  return 0
