"""Sampling from a trained model with bounded state.

Language models decode one token at a time from their working memory: the
LSTM's (h, c) or the Transformer's KV cache (a ring buffer of `window` slots
when the model uses a sliding window, so memory stays bounded however long the
sample), stored in `quant.state` (float32, bfloat16, int8, float8_e4m3fn).
Latent models sample a code from the prior and decode from it. With
`quant.weights = "int8"` the model runs on int8 matmul weights.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from wm import parallel, step as step_lib
from wm.compress import quant


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


def sample_tokens(model: nnx.Module, prompt: np.ndarray, length: int, key: jax.Array,
                  temperature: float = 1.0) -> np.ndarray:
  """Continues `prompt` [b, p] by `length` tokens, one decode step at a time."""
  batch, p = prompt.shape
  if hasattr(model, "init_cache"):
    memory = model.init_cache(batch, p + length)
  else:
    memory = model.init_state(batch)

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
    tokens = sample_tokens(model, np.tile(start, (num_samples, 1)), length, key)
  for row in tokens:
    if byte_level:
      raw = tokenizer.decode(row) if tokenizer else bytes(int(t) % 256 for t in row)
      print(raw.decode("utf-8", errors="replace"))
      print("-" * 40)
    else:
      print(" ".join(str(int(t)) for t in row))
  return 0
