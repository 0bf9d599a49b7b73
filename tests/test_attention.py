"""Attention implementations against the xla reference: outputs, gradients, whole-model loss, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wm import config as config_lib
from wm import models
from wm.models import attention as attention_lib
from wm.models import transformer


def _qkv(b=2, t=37, h=4, kv=2, e=8, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, t, h, e), dtype)
  k = jax.random.normal(keys[1], (b, t, kv, e), dtype)
  v = jax.random.normal(keys[2], (b, t, kv, e), dtype)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return q, k, v, pos


@pytest.mark.parametrize("window,kv,block", [(0, 4, 8), (0, 2, 16), (5, 2, 8), (12, 1, 64), (0, 4, 37)])
def test_chunked_matches_xla_outputs_and_gradients(window, kv, block):
  q, k, v, pos = _qkv(kv=kv)

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out * jnp.cos(out)), out  # a nonlinear read, so every gradient path matters

  ref = lambda q, k, v: transformer.attention(q, k, v, pos, pos, window=window)
  new = lambda q, k, v: attention_lib.chunked(q, k, v, pos, pos, window=window, block=block)
  (_, out_ref), g_ref = jax.value_and_grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (_, out_new), g_new = jax.value_and_grad(lambda *a: loss(new, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(out_new, out_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(g_new, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_chunked_matches_xla_in_bfloat16():
  q, k, v, pos = _qkv(dtype=jnp.bfloat16)
  ref = transformer.attention(q, k, v, pos, pos, window=6)
  new = attention_lib.chunked(q, k, v, pos, pos, window=6, block=8)
  np.testing.assert_allclose(np.asarray(new, np.float32), np.asarray(ref, np.float32), rtol=2e-2, atol=2e-2)


def test_chunked_decoding_against_a_ring_cache_matches_xla():
  # k_valid masks never-written slots; key positions are not sorted (a ring buffer).
  q, k, v, _ = _qkv(t=1)
  _, k, v, _ = _qkv(t=10, seed=1)
  k, v = k[:, :10], v[:, :10]
  q_pos = jnp.full((2, 1), 13)
  k_pos = jnp.broadcast_to(13 - jnp.mod(13 - jnp.arange(10), 10), (2, 10))
  valid = k_pos >= 0
  ref = transformer.attention(q, k, v, q_pos, k_pos, window=7, k_valid=valid)
  new = attention_lib.chunked(q, k, v, q_pos, k_pos, window=7, k_valid=valid, block=4)
  np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,kv", [(0, 4), (6, 2)])
def test_fused_mask_arguments_match_xla(window, kv):
  # jax.nn.dot_product_attention's own XLA lowering checks the arguments the cuDNN path passes.
  q, k, v, pos = _qkv(kv=kv)
  ref = transformer.attention(q, k, v, pos, pos, window=window)
  new = attention_lib.fused(q, k, v, window=window, implementation="xla")
  np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-5)


def _model_config(attention, **overrides):
  c = config_lib.base_config()
  c.data.task, c.data.seq_len, c.data.vocab_size, c.data.num_kv_pairs, c.data.batch_size = "mqar", 48, 64, 2, 2
  c.model.d, c.model.layers, c.model.heads, c.model.kv_heads, c.model.window = 32, 2, 4, 2, 20
  c.model.attention, c.model.attention_block = attention, 16
  for key, value in overrides.items():
    c.remat[key] = value
  return config_lib.validate(c)


def test_transformer_loss_and_gradients_are_the_same_with_chunked_attention():
  batch = {"inputs": jax.random.randint(jax.random.key(1), (2, 48), 0, 64),
           "targets": jax.random.randint(jax.random.key(2), (2, 48), 0, 64), "weights": jnp.ones((2, 48))}
  results = []
  for impl in ("xla", "chunked"):
    model = models.build(_model_config(impl, policy="full"), nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params):
      out = nnx.merge(graphdef, params).loss(batch, train=True)
      return out[0] if isinstance(out, tuple) else out

    results.append(jax.value_and_grad(loss)(params))
  (l0, g0), (l1, g1) = results
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_chunked_attention_memory_is_linear_in_length():
  """Compiled temp of the attention's gradient: quadratic for xla, linear for chunked (fixed block)."""
  def temp(impl, t, h=4, e=16):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, t, h, e), (1, t, h, e), (1, t, h, e))]
    pos = jnp.arange(t, dtype=jnp.int32)[None]

    def loss(q, k, v):
      if impl == "xla":
        out = transformer.attention(q, k, v, pos, pos)
      else:
        out = attention_lib.chunked(q, k, v, pos, pos, block=64)
      return jnp.sum(out ** 2)

    exe = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    return exe.memory_analysis().temp_size_in_bytes

  # From 1024 on: at 512 XLA's buffer assignment keeps one more [t, t] buffer than at longer lengths
  # (temp 16.1, 48.5, 193.0 MiB at 512, 1024, 2048 with the softmax that saves only its output).
  xla = [temp("xla", t) for t in (1024, 2048)]
  chunked = [temp("chunked", t) for t in (1024, 2048)]
  assert xla[1] / xla[0] > 3.5, xla  # scores [t, t]
  assert chunked[1] / chunked[0] < 2.5, chunked  # [t, block]
  assert chunked[1] < xla[1] / 4, (chunked, xla)
