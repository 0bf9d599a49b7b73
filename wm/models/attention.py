"""Attention implementations with the same semantics, chosen by `model.attention`.

    xla       scores [b, h, t, s] materialised, softmax in float32
              (wm.models.transformer.attention): memory quadratic in t.
    chunked   online softmax over key blocks of `model.attention_block` keys
              (Rabe & Staats 2021, "Self-attention does not need O(n^2)
              memory"; the backward pass of Dao et al. 2022, FlashAttention,
              Alg. 2): pure JAX, runs anywhere; only [b, h, t, block] scores
              exist at a time and the backward pass keeps the output and
              the row log-sum-exp, so memory is linear in t for a fixed block.
    cudnn     jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's
              fused flash attention on NVIDIA GPUs (bf16/fp16 only).
    splash    Pallas splash attention (jax.experimental.pallas.ops.tpu.
              splash_attention) on TPU.

All take q [b, t, h, e], k and v [b, s, k, e] with grouped-query heads (query
head n reads key/value head n // (h / k), Ainslie et al. 2023), positions
q_pos [b, t] and k_pos [b, s], and mask: query i sees key j iff k_pos[j] <=
q_pos[i] and (window == 0 or q_pos[i] - k_pos[j] <= window): a window of W
lets each query read itself and the W keys before it (the convention of
`jax.nn.dot_product_attention`'s `local_window_size=(W, 0)` and of
FlashAttention's `window_size=(W, 0)`; Hugging Face's Mistral
`sliding_window` counts the query too, so it is W + 1). `cudnn` and
`splash` take the mask as "causal + window" over equal q and k positions 0..t-1
(training and scoring); decoding against a cache always uses `xla`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from wm.typing import Array, Float, Int

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "splash")
_FLOOR = float(jnp.finfo(jnp.float32).min)  # masked scores, as in the xla implementation


def _mask(q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array | None, window: int) -> jax.Array:
  """[b, t, s] boolean: query i may read key j."""
  diff = q_pos[:, :, None] - k_pos[:, None, :]
  mask = diff >= 0
  if window:
    mask &= diff <= window
  if k_valid is not None:
    mask &= k_valid[:, None, :]
  return mask


def _blocks(x: jax.Array, block: int, fill) -> jax.Array:
  """[b, s, ...] -> [n, b, block, ...], padding s up to a multiple of block with `fill`."""
  b, s = x.shape[:2]
  n = -(-s // block)
  pad = n * block - s
  if pad:
    x = jnp.concatenate([x, jnp.full((b, pad) + x.shape[2:], fill, x.dtype)], axis=1)
  return jnp.moveaxis(x.reshape((b, n, block) + x.shape[2:]), 1, 0)


def _block_scores(qg, kb, q_pos, kp, kv_ok, window, scale):
  """Masked f32 scores of all queries against one key block: [b, k, g, t, block]."""
  s = jnp.einsum("btkge,bske->bkgts", qg, kb, preferred_element_type=jnp.float32) * scale
  return jnp.where(_mask(q_pos, kp, kv_ok, window)[:, None, None], s, _FLOOR)


def _chunked_forward(q, k, v, q_pos, k_pos, k_valid, window, block):
  b, t, h, e = q.shape
  kv = k.shape[2]
  g = h // kv
  scale = 1.0 / math.sqrt(e)
  qg = q.reshape(b, t, kv, g, e)
  valid = jnp.ones(k_pos.shape, bool) if k_valid is None else k_valid
  xs = (_blocks(k, block, 0), _blocks(v, block, 0), _blocks(k_pos, block, 0), _blocks(valid, block, False))

  def step(carry, x):
    m, l, acc = carry  # running max, normaliser, unnormalised output (Milakov & Gimelshein 2018)
    kb, vb, kp, ok = x
    s = _block_scores(qg, kb, q_pos, kp, ok, window, scale)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(-1)
    pv = jnp.einsum("bkgts,bske->bkgte", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
    return (m_new, l, acc * corr[..., None] + pv), None

  init = (jnp.full((b, kv, g, t), _FLOOR, jnp.float32), jnp.zeros((b, kv, g, t), jnp.float32),
          jnp.zeros((b, kv, g, t, e), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(step, init, xs)
  out = acc / l[..., None]  # [b, k, g, t, e]
  lse = m + jnp.log(l)
  ctx = jnp.moveaxis(out, 3, 1).reshape(b, t, h, e).astype(v.dtype)
  return ctx, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _chunked(q, k, v, q_pos, k_pos, k_valid, window, block):
  return _chunked_forward(q, k, v, q_pos, k_pos, k_valid, window, block)[0]


def _chunked_fwd(q, k, v, q_pos, k_pos, k_valid, window, block):
  ctx, lse = _chunked_forward(q, k, v, q_pos, k_pos, k_valid, window, block)
  # Residuals linear in t: the inputs, the output and one float per query row.
  return ctx, (q, k, v, q_pos, k_pos, k_valid, ctx, lse)


def _chunked_bwd(window, block, res, d_ctx):
  """FlashAttention's backward pass (Dao et al. 2022, Alg. 2) over key blocks.

  With P = softmax(S) recomputed per block from the saved log-sum-exp:
  dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K,
  dK = dS^T Q (each times the 1/sqrt(e) scale where S was scaled).
  """
  q, k, v, q_pos, k_pos, k_valid, ctx, lse = res
  b, t, h, e = q.shape
  s_len, kv = k.shape[1], k.shape[2]
  g = h // kv
  scale = 1.0 / math.sqrt(e)
  qg = q.reshape(b, t, kv, g, e)
  do = d_ctx.reshape(b, t, kv, g, e).astype(jnp.float32)
  delta = jnp.einsum("btkge,btkge->bkgt", do, ctx.reshape(b, t, kv, g, e).astype(jnp.float32))
  valid = jnp.ones(k_pos.shape, bool) if k_valid is None else k_valid
  xs = (_blocks(k, block, 0), _blocks(v, block, 0), _blocks(k_pos, block, 0), _blocks(valid, block, False))

  def step(dq, x):
    kb, vb, kp, ok = x
    s = _block_scores(qg, kb, q_pos, kp, ok, window, scale)
    p = jnp.exp(s - lse[..., None])
    dv = jnp.einsum("bkgts,btkge->bske", p, do)
    dp = jnp.einsum("btkge,bske->bkgts", do, vb.astype(jnp.float32))
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + jnp.einsum("bkgts,bske->btkge", ds, kb.astype(jnp.float32))
    dk = jnp.einsum("bkgts,btkge->bske", ds, qg.astype(jnp.float32))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros((b, t, kv, g, e), jnp.float32), xs)
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, -1) + x.shape[3:])[:, :s_len]
  zero_int = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
  return (dq.reshape(b, t, h, e).astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype),
          zero_int(q_pos), zero_int(k_pos), zero_int(k_valid))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked(q: Float[Array, "b t h e"], k: Float[Array, "b s k e"], v: Float[Array, "b s k e"],
            q_pos: Int[Array, "b t"] | Int[Array, "t"], k_pos: Int[Array, "b s"] | Int[Array, "s"], *,
            window: int = 0, k_valid: jax.Array | None = None, block: int = 512) -> Float[Array, "b t h e"]:
  """Memory-efficient attention: online softmax over key blocks, with its own backward pass.

  Same outputs as the xla implementation to float tolerance (the sums run in
  a different order). A query row that sees no key at all (never produced by
  our callers) averages the values of its last block rather than all values.
  """
  block = max(1, min(block, k.shape[1]))
  # Key positions are cut into blocks along a batch axis; positions shared by
  # the batch ([t], the training path) are broadcast first (a few ints a row).
  q_pos = jnp.broadcast_to(q_pos, q.shape[:2])
  k_pos = jnp.broadcast_to(k_pos, k.shape[:2])
  return _chunked(q, k, v, q_pos, k_pos, k_valid, window, block)


def fused(q: Float[Array, "b t h e"], k: Float[Array, "b t k e"], v: Float[Array, "b t k e"], *,
          window: int = 0, implementation: str = "cudnn") -> Float[Array, "b t h e"]:
  """Causal (optionally windowed) attention through `jax.nn.dot_product_attention`.

  `implementation="cudnn"` is cuDNN's fused kernel (GPU, bf16/fp16); "xla" is
  the same call lowered by XLA, which the tests use on CPU to check the mask
  arguments: `local_window_size=(window, 0)` is "i - window <= j <= i".
  """
  local = (window, 0) if window else None
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                      implementation=implementation)


def splash(q: Float[Array, "b t h e"], k: Float[Array, "b t k e"], v: Float[Array, "b t k e"], *,
           window: int = 0, block: int = 512) -> Float[Array, "b t h e"]:
  """Causal (optionally windowed) attention with the Pallas splash-attention TPU kernel.

  Grouped-query heads run as one multi-query kernel per key/value head (the
  kernel's q is [g, t, e] against k, v [t, e]); queries are pre-scaled by
  1/sqrt(e) because the kernel does not scale. TPU only (Mosaic); on a
  sharded mesh call it inside shard_map over the batch axes.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
  b, t, h, e = q.shape
  kv = k.shape[2]
  g = h // kv
  head_mask = (mask_lib.LocalMask((t, t), window_size=(window, 0), offset=0) if window
               else mask_lib.CausalMask((t, t)))
  size = min(block, t)
  sizes = kernel_lib.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size,
                                block_kv_dkv=size, block_kv_dkv_compute=size, block_q_dq=size, block_kv_dq=size)
  kernel = kernel_lib.make_splash_mqa_single_device(mask_lib.MultiHeadMask([head_mask] * g), block_sizes=sizes)
  qg = (q / math.sqrt(e)).astype(q.dtype).reshape(b, t, kv, g, e).transpose(0, 2, 3, 1, 4)  # [b, k, g, t, e]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, k, t, e]
  out = jax.vmap(jax.vmap(kernel))(qg, kt, vt)  # over batch, then key/value heads
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


def attend(q, k, v, q_pos, k_pos, *, window: int = 0, k_valid=None, implementation: str = "xla",
           block: int = 512, reference=None):
  """Dispatch on `implementation` (see the module doc); `reference` is the xla implementation."""
  if implementation == "chunked":
    return chunked(q, k, v, q_pos, k_pos, window=window, k_valid=k_valid, block=block)
  if implementation in ("cudnn", "splash") and k_valid is None and q.shape[1] == k.shape[1]:
    if implementation == "cudnn":
      return fused(q, k, v, window=window, implementation="cudnn")
    return splash(q, k, v, window=window, block=block)
  return reference(q, k, v, q_pos, k_pos, window=window, k_valid=k_valid)
