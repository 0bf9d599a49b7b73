"""Decoder-only Transformer: pre-norm blocks, rotary GQA attention, GELU MLP.

    x = x + Attn(RMSNorm(x))      causal, optionally a sliding window
    x = x + MLP(RMSNorm(x))       down(gelu(up(x))), hidden = mlp_ratio * d

Choices and their reasons:
- Pre-norm (Xiong et al. 2020): trains without warm-up tricks at any depth.
- Rotary embeddings (Su et al. 2021): relative positions, and a KV cache entry
  never has to be recomputed when the window slides.
- Grouped-query attention (Ainslie et al. 2023): `kv_heads` key/value heads
  shared by groups of query heads; the KV cache, our working memory, shrinks
  by heads/kv_heads.
- Sliding window (Beltagy et al. 2020; Mistral): position i attends to j with
  i - W <= j <= i, itself and the W positions before it (`jax.nn.
  dot_product_attention`'s `local_window_size=(W, 0)`; Mistral's
  `sliding_window` is W + 1). The state carried between tokens is then
  exactly W keys and values: the KV cache is a ring buffer of W slots, read
  before the new token is written, and working memory stops growing with
  context. With L layers information still travels L * W positions back.
- GELU MLP (Hendrycks & Gimpel 2016) rather than SwiGLU: two matrices of
  mlp_ratio * d, the MLP that Korthikanti et al. 2022's activation-memory
  formulas (used by wm.memory.estimate) are derived for; SwiGLU's gain is a
  small constant in quality, its third matrix would change every byte count.

Layers are created with nnx.vmap (parameters get a leading "layers" axis) and
applied with nnx.scan, so compile time and temp memory do not grow with
depth; each scanned block is an nnx.remat block under config.remat.policy.
With `model.share_layers = g` there are layers/g stacked blocks, each applied
to g consecutive layers (wm/models/sharing.py). With `model.lora_rank = r`
every projection (q, k, v, o, up, down) carries a low-rank adapter
(layers.LoRADense); embeddings, norms and the head have none.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wm import parallel
from wm.compress import quant
from wm.models import attention as attention_lib
from wm.models import layers as L
from wm.models import remat as R
from wm.models import sharing
from wm.typing import Array, Batch, Float, Hidden, Int, Logits, Tokens

REMAT_TAGS = frozenset({"qkv", "attn_context", "attn_out", "mlp_hidden"})

# {"k", "v": [l, b, slots, k, e] in the state dtype (int8: a quant.QArray with a scale per [l, b, slot, k];
#  int8_static: a quant.QArray whose calibrated scale [l, 1, 1, k, e] is the same for every sequence and slot),
#  "pos": int32 tokens consumed so far}
Cache = dict[str, Any]


def _tag(x: jax.Array, name: str) -> jax.Array:
  return jax.ad_checkpoint.checkpoint_name(x, name)


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
  """jax.nn.softmax over the last axis, with a backward pass that keeps only the output.

  Autodiff of jax.nn.softmax (without the global jax_softmax_custom_jvp flag)
  goes through its exp / sum / divide and keeps exp(x - max) as well as the
  probabilities: two [b, h, t, s] buffers per layer, stacked over the layer
  scan. dx = y * (g - sum(g * y)) needs y alone (docs/performance.md).
  """
  return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x):
  y = softmax(x)
  return y, y


def _softmax_bwd(y, g):
  return (y * (g - jnp.sum(g * y, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def attention(q: Float[Array, "b t h e"], k: Float[Array, "b s k e"], v: Float[Array, "b s k e"],
              q_pos: Int[Array, "b t"] | Int[Array, "t"], k_pos: Int[Array, "b s"] | Int[Array, "s"], *,
              window: int = 0, k_valid: jax.Array | None = None) -> Float[Array, "b t h e"]:
  """Causal (optionally windowed) grouped-query attention, softmax in float32.

  Query head n uses key/value head n // (h / k) (Ainslie et al. 2023). Query
  i sees key j iff k_pos[j] <= q_pos[i] and (window == 0 or
  q_pos[i] - k_pos[j] <= window) and k_valid[j]. Positions are [b, t] / [b, s],
  or [t] / [s] when every sequence of the batch shares them.
  """
  b, t, h, e = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, e)
  scores = jnp.einsum("btkge,bske->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(e)
  # Positions shared by the whole batch ([t], the training path) give a [t, s]
  # mask that XLA builds from iotas inside the softmax fusion; per-sequence
  # positions ([b, t]) give a [b, t, s] mask that the backward pass must keep
  # for every layer (docs/performance.md).
  diff = q_pos[..., :, None] - k_pos[..., None, :]  # [b, t, s] or [t, s]
  mask = diff >= 0
  if window:
    mask &= diff <= window
  if k_valid is not None:
    mask &= k_valid[..., None, :]
  # A finite floor rather than -inf: a fully masked row (never produced by our
  # callers, but cheap to guard) gives a uniform softmax instead of NaN.
  scores = jnp.where(mask[..., None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = softmax(scores).astype(v.dtype)
  ctx = jnp.einsum("bkgts,bske->btkge", probs, v, preferred_element_type=jnp.float32)
  return ctx.reshape(b, t, h, e).astype(v.dtype)


class Block(nnx.Module):
  """One pre-norm decoder block."""

  def __init__(self, d: int, heads: int, kv_heads: int, mlp_ratio: int, *, window: int, rope_base: float,
               dropout: float, param_dtype, dtype, rngs: nnx.Rngs, attention: str = "xla", attention_block: int = 512,
               lora_rank: int = 0, lora_alpha: float = 0.0):
    if d % heads or heads % kv_heads:
      raise ValueError(f"need heads | d and kv_heads | heads, got d={d} heads={heads} kv_heads={kv_heads}")
    e = d // heads
    self.window, self.rope_base, self.rate, self.dtype = window, rope_base, dropout, dtype
    self.impl, self.block = attention, attention_block  # wm/models/attention.py
    kw = dict(param_dtype=param_dtype, dtype=dtype)
    lora = dict(lora_rank=lora_rank, lora_alpha=lora_alpha)
    self.attn_norm = L.RMSNorm(d, **kw)
    self.q = L.dense(d, (heads, e), axes=("embed", "heads", "head_dim"), rngs=rngs, **lora, **kw)
    self.k = L.dense(d, (kv_heads, e), axes=("embed", "kv_heads", "head_dim"), rngs=rngs, **lora, **kw)
    self.v = L.dense(d, (kv_heads, e), axes=("embed", "kv_heads", "head_dim"), rngs=rngs, **lora, **kw)
    self.o = L.dense((heads, e), d, axes=("heads", "head_dim", "embed"), rngs=rngs, **lora, **kw)
    self.mlp_norm = L.RMSNorm(d, **kw)
    self.up = L.dense(d, mlp_ratio * d, axes=("embed", "mlp"), rngs=rngs, **lora, **kw)
    self.down = L.dense(mlp_ratio * d, d, axes=("mlp", "embed"), rngs=rngs, **lora, **kw)

  def _qkv(self, x, positions):
    h = self.attn_norm(x)
    q = _tag(L.rope(self.q(h), positions, self.rope_base), "qkv")
    k = _tag(L.rope(self.k(h), positions, self.rope_base), "qkv")
    v = _tag(self.v(h), "qkv")
    return q, k, v

  def _finish(self, x, ctx, keys):
    ctx = _tag(ctx, "attn_context")
    x = x + L.dropout(_tag(self.o(ctx), "attn_out"), self.rate, keys[0])
    hidden = _tag(self.up(self.mlp_norm(x)), "mlp_hidden")
    x = x + L.dropout(self.down(L.gelu(hidden)), self.rate, keys[1])
    return parallel.constrain(x, ("batch", "length", None))

  def __call__(self, x: Hidden, positions: Int[Array, "b t"] | Int[Array, "t"], dropout_key: jax.Array | None = None) -> Hidden:
    q, k, v = self._qkv(x, positions)
    ctx = attention_lib.attend(q, k, v, positions, positions, window=self.window, implementation=self.impl,
                               block=self.block, reference=attention)
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    return self._finish(x, ctx, keys)

  def kv_amax(self, x: Hidden, positions: Int[Array, "t"]) -> tuple[Hidden, jax.Array, jax.Array]:
    """The block's output (no dropout), and |k| and |v| maxima over batch and positions, [k, e] each.

    Keys are taken after the rotary embedding, exactly as `decode` caches them.
    """
    q, k, v = self._qkv(x, positions)
    ctx = attention_lib.attend(q, k, v, positions, positions, window=self.window, implementation=self.impl,
                               block=self.block, reference=attention)
    amax = lambda a: jnp.max(jnp.abs(a.astype(jnp.float32)), axis=(0, 1))
    return self._finish(x, ctx, (None, None)), amax(k), amax(v)

  def decode(self, x: Float[Array, "b 1 d"], k_cache: Any, v_cache: Any, pos: jax.Array, state_dtype: str):
    """One token at absolute position `pos` against a cache of S slots (slot = position mod S).

    The cache holds the S positions before `pos`, the state carried between
    tokens. The query reads them beside this step's own key and value (taken
    straight from the projection), and only then is the new entry written,
    over position pos - S, which no later query can reach. The caches hold
    keys and values in `state_dtype` (wm.compress.quant): new entries are
    encoded into it, and the cache is read back in the compute dtype.
    """
    b, slots = x.shape[0], k_cache.shape[1]
    q, k, v = self._qkv(x, jnp.full((b, 1), pos, jnp.int32))
    # Slot s holds the latest position p < pos with p = s (mod S); negative = never written.
    slot_pos = pos - 1 - jnp.mod(pos - 1 - jnp.arange(slots), slots)
    k_pos = jnp.concatenate([jnp.broadcast_to(slot_pos, (b, slots)), jnp.full((b, 1), pos)], axis=1)

    def read(cache, new):
      return jnp.concatenate([quant.decode_state(cache, self.dtype), new.astype(self.dtype)], axis=1)

    ctx = attention(q, read(k_cache, k), read(v_cache, v), jnp.full((b, 1), pos), k_pos, window=self.window,
                    k_valid=k_pos >= 0)

    def write(cache, new):
      if state_dtype == "int8_static":  # codes only: the calibrated scale is the same for every slot
        codes = quant.encode_state(new, state_dtype, cache.scale)
        return quant.QArray(jax.lax.dynamic_update_slice_in_dim(cache.values, codes, pos % slots, axis=1),
                            cache.scale)
      # An int8 entry is a QArray (values and per-row scales, both with the slot axis at 1): write both.
      return jax.tree.map(lambda c, n: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), pos % slots, axis=1),
                          cache, quant.encode_state(new, state_dtype))

    return self._finish(x, ctx, (None, None)), write(k_cache, k), write(v_cache, v)


class TransformerStack(nnx.Module):
  """`layers` blocks (stacked parameters) + final RMSNorm, on embeddings [b, t, d].

  With share_layers = g > 1, layers/g blocks are stacked and each is applied
  to g consecutive layers (ALBERT's cross-layer sharing, wm/models/sharing.py).
  """

  REMAT_TAGS = REMAT_TAGS

  def __init__(self, d: int, layers: int, heads: int, kv_heads: int, mlp_ratio: int, *, window: int = 0,
               rope_base: float = 10_000.0, dropout: float = 0.0, param_dtype=jnp.float32, dtype=jnp.float32,
               remat_policy: str = "none", attention: str = "xla", attention_block: int = 512,
               share_layers: int = 1, lora_rank: int = 0, lora_alpha: float = 0.0, state_dtype: str = "",
               rngs: nnx.Rngs):
    R.checkpoint_policy(remat_policy, REMAT_TAGS)  # fail at construction on a bad policy name
    if share_layers < 1 or layers % share_layers:
      raise ValueError(f"share_layers={share_layers} must be >= 1 and divide layers={layers}")
    self.d, self.num_layers, self.kv_heads, self.head_dim = d, layers, kv_heads, d // heads
    self.window, self.rate, self.dtype, self.remat_policy = window, dropout, dtype, remat_policy
    self.share = share_layers
    # The KV cache's storage between tokens (config quant.state); "" keeps the compute dtype.
    self.state_dtype = quant.check_state_dtype(state_dtype or jnp.dtype(dtype).name)

    # One Block per weight set (per layer without sharing) with its own init
    # keys; vmap stacks their parameters on a leading axis named "layers" in
    # the sharding metadata.
    @nnx.split_rngs(splits=layers // share_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return Block(d, heads, kv_heads, mlp_ratio, window=window, rope_base=rope_base, dropout=dropout,
                   param_dtype=param_dtype, dtype=dtype, rngs=rngs, attention=attention,
                   attention_block=attention_block, lora_rank=lora_rank, lora_alpha=lora_alpha)

    self.blocks = make(rngs)
    self.final_norm = L.RMSNorm(d, param_dtype=param_dtype, dtype=dtype)

  def _layer_keys(self, dropout_key):
    return None if dropout_key is None or self.rate <= 0 else jax.random.split(dropout_key, self.num_layers)

  def __call__(self, x: Hidden, positions: Int[Array, "b t"] | None = None, *,
               dropout_key: jax.Array | None = None, use_scan: bool = True) -> Hidden:
    """Applies all blocks and the final norm.

    Args:
      x: embeddings [b, t, d] (any conditioning already added).
      positions: absolute positions [b, t] or [t] (shared by the batch); 0..t-1 by default.
      dropout_key: enables dropout on the residual branches when the rate is > 0.
      use_scan: False applies the same parameters in a Python loop (the
        reference the scan is tested against; compiles L copies).
    """
    # Default positions stay [t] (shared by the batch): rotary tables and the
    # causal mask are then built once per length instead of once per sequence.
    positions = jnp.arange(x.shape[1], dtype=jnp.int32) if positions is None else positions
    keys = self._layer_keys(dropout_key)
    x = parallel.constrain(x.astype(self.dtype), ("batch", "length", None))

    def body(x, block, key):
      return block(x, positions, key)

    if use_scan and self.share > 1:
      x, _ = sharing.apply_shared(lambda x, block, key: (body(x, block, key), None), x, self.blocks, (keys,),
                                  share=self.share, remat_policy=self.remat_policy, tags=REMAT_TAGS)
    elif use_scan:
      body = R.remat_block(body, self.remat_policy, REMAT_TAGS, prevent_cse=False)
      scan = nnx.scan(body, in_axes=(nnx.Carry, 0, None if keys is None else 0), out_axes=nnx.Carry,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
      x = scan(x, self.blocks, keys)
    else:
      body = R.remat_block(body, self.remat_policy, REMAT_TAGS)
      for i in range(self.num_layers):
        x = body(x, self.layer(i), None if keys is None else keys[i])
    return self.final_norm(x)

  def layer(self, i: int) -> Block:
    """Layer i's block as a standalone module (a view of weight set i // share_layers)."""
    return sharing.layer_view(self.blocks, i, self.share)

  def cache_slots(self, max_len: int) -> int:
    return min(self.window, max_len) if self.window else max_len

  def init_cache(self, batch: int, max_len: int, scales: dict[str, jax.Array] | None = None) -> Cache:
    """Empty KV cache: a ring buffer of `window` slots, or max_len slots for full attention.

    Slots: min(window, max_len) with a window, else max_len. With window <=
    max_len decoding may run past max_len (the ring only overwrites positions
    that have left the window); otherwise at most max_len tokens fit.
    `scales` ({"k", "v": [l, k, e]}, from `quant.static_scales` of
    `state_amax`) is needed by, and only used for, quant.state = "int8_static".
    """
    shape = (self.num_layers, batch, self.cache_slots(max_len), self.kv_heads, self.head_dim)

    def empty(name):
      scale = None if scales is None else jnp.asarray(scales[name])[:, None, None]  # [l, 1, 1, k, e]
      return quant.empty_state(shape, self.state_dtype, self.dtype, scale)

    return {"k": empty("k"), "v": empty("v"), "pos": jnp.zeros((), jnp.int32)}

  def state_bytes(self, context_len: int, batch: int = 1) -> int:
    """layers * 2 (k, v) * kv_heads * min(L, window or L) * batch rows of head_dim elements in the state dtype."""
    rows = self.num_layers * 2 * self.kv_heads * self.cache_slots(context_len) * batch
    return rows * quant.state_row_bytes(self.state_dtype, self.head_dim)

  def state_constant_bytes(self) -> int:
    """Bytes held once per model beside the cache: int8_static's float32 scales, layers * 2 * kv_heads * head_dim."""
    return quant.state_constant_bytes(self.state_dtype, self.num_layers * 2 * self.kv_heads * self.head_dim)

  def state_amax(self, x: Hidden) -> dict[str, jax.Array]:
    """{"k", "v": [l, k, e]}: the largest |key| (after RoPE) and |value| each layer caches, over batch and positions.

    The forward pass of the embeddings x [b, t, d] at positions 0..t-1, layer
    by layer (a Python loop: calibration runs rarely, and a shared weight set
    still caches per layer).
    """
    positions = jnp.arange(x.shape[1], dtype=jnp.int32)
    x = x.astype(self.dtype)
    ks, vs = [], []
    for i in range(self.num_layers):
      x, k, v = self.layer(i).kv_amax(x, positions)
      ks.append(k)
      vs.append(v)
    return {"k": jnp.stack(ks), "v": jnp.stack(vs)}

  def decode_step(self, x: Float[Array, "b d"], cache: Cache) -> tuple[Float[Array, "b d"], Cache]:
    """One position through all blocks, reading and writing the cache."""
    pos = cache["pos"]

    def body(x, block, k_cache, v_cache):
      x, k_cache, v_cache = block.decode(x, k_cache, v_cache, pos, self.state_dtype)
      return x, (k_cache, v_cache)

    x = x[:, None].astype(self.dtype)
    if self.share > 1:  # the cache stays per layer: each application of a set writes its own keys and values
      y, (k, v) = sharing.apply_shared(body, x, self.blocks, (cache["k"], cache["v"]), share=self.share,
                                       remat_policy="none", tags=REMAT_TAGS)
    else:
      scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
      y, (k, v) = scan(x, self.blocks, cache["k"], cache["v"])
    return self.final_norm(y[:, 0]), {"k": k, "v": v, "pos": pos + 1}


class Model(nnx.Module):
  """Transformer language model (config.model.name = "transformer")."""

  REMAT_TAGS = REMAT_TAGS

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    kw = L.precision_kwargs(config)
    self.dtype, self.rate = kw["dtype"], m.dropout
    self.embed = L.Embed(config.data.vocab_size, m.d, rngs=rngs, **kw)
    self.stack = TransformerStack(m.d, m.layers, m.heads, m.kv_heads, m.mlp_ratio, window=m.window,
                                  rope_base=m.rope_base, dropout=m.dropout, remat_policy=config.remat.policy,
                                  attention=m.attention, attention_block=m.attention_block,
                                  share_layers=m.share_layers, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
                                  state_dtype=config.quant.state, rngs=rngs, **kw)
    self.head = L.output_head(m.d, config.data.vocab_size, tied=m.tie_embeddings, rngs=rngs, **kw)

  def _logits(self, x: jax.Array) -> jax.Array:
    return L.head_logits(self.embed, self.head, x)

  def __call__(self, tokens: Tokens, *, dropout_key: jax.Array | None = None, use_scan: bool = True) -> Logits:
    """Logits (float32) [b, t, V] for next-token prediction at every position."""
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    x = L.dropout(self.embed(tokens), self.rate, keys[0])
    return self._logits(self.stack(x, dropout_key=keys[1], use_scan=use_scan))

  def loss(self, batch: Batch, *, train: bool, rngs: nnx.Rngs | None = None):
    """Weighted next-token cross-entropy; see layers.lm_loss for the metrics."""
    key = rngs.dropout() if (train and self.rate > 0 and rngs is not None) else None
    logits = self(batch["inputs"], dropout_key=key)
    return L.lm_loss(logits, batch["targets"], batch["weights"])

  def num_params(self) -> int:
    return L.param_count(self)

  def state_bytes(self, context_len: int, batch: int = 1) -> int:
    """Working memory (DESIGN.md): layers * 2 * kv_heads * head_dim * min(L, window or L) * bytes * batch.

    Bytes per element are those of `quant.state` (int8: 1, plus a float32 scale per head_dim row;
    int8_static: exactly 1, its scales being `state_constant_bytes`).
    """
    return self.stack.state_bytes(context_len, batch)

  def state_constant_bytes(self) -> int:
    """Bytes held once per model (not per sequence) beside the cache: the int8_static scales, else 0."""
    return self.stack.state_constant_bytes()

  def state_amax(self, tokens: Tokens) -> dict[str, jax.Array]:
    """{"k", "v": [l, kv_heads, head_dim]}: the calibration statistic of int8_static (TransformerStack.state_amax)."""
    return self.stack.state_amax(self.embed(tokens))

  def init_cache(self, batch: int, max_len: int, scales: dict[str, jax.Array] | None = None) -> Cache:
    return self.stack.init_cache(batch, max_len, scales)

  def decode_step(self, tokens: Int[Array, "b"], cache: Cache) -> tuple[Float[Array, "b v"], Cache]:
    """Consumes one token per sequence; returns next-token logits and the updated cache."""
    x, cache = self.stack.decode_step(self.embed(tokens), cache)
    return self._logits(x), cache
