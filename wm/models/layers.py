"""Layers shared by the model families: embedding, dense, output head, RMSNorm, rotary, loss.

Precision: parameters are stored in `param_dtype` and cast to the compute
`dtype` right before a matmul; matmuls accumulate in float32
(`preferred_element_type`) and return the compute dtype. Normalisation
statistics, logits and the loss are float32 whatever the compute dtype.

Sharding: every parameter carries logical axis names where it is created
(`nnx.Param(value, out_sharding=names)`); `config.mesh.rules` maps them to mesh
axes (see wm.parallel). Names used in this package:

    vocab     vocabulary rows of the embedding / output head
    embed     the model-width dimension of a weight (FSDP shards it)
    mlp       the MLP hidden dimension
    heads     query heads            kv_heads  key/value heads
    head_dim  per-head width         gates     the LSTM's 4*d gate outputs
    layers    the stacked-layer axis (added by nnx.vmap, see transformer.py)

Activations are constrained with ("batch", "length", None): never "embed",
which maps to the fsdp mesh axis the batch already occupies.

Why not Flax NNX's own layers (flax 0.12.8, read 2026-11-24): they carry our
sharding metadata (`kernel_metadata={"out_sharding": ...}`) and the
parameter names match ("kernel", "bias", "embedding", "scale"), but not our
precision contract. `nnx.Embed.attend` promotes to the compute dtype and
returns bfloat16 logits under mixed precision (ours accumulate and return
float32); `nnx.RMSNorm` casts x to the compute dtype before normalising
(ours normalises in float32). `nnx.LinearGeneral` fits `Dense` (multi-dim
in/out shapes, `preferred_element_type`) except that it returns the
accumulation dtype, and its default initialisers draw at the kernel's rank, which
compiles slower than `normal` below on CPU. The matmuls are the same
`dot_general` either way, so switching would not change step speed.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wm.compress import quant
from wm.typing import Array, Float, Int, Logits, Tokens, Weights

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str) -> jnp.dtype:
  """'float32' | 'bfloat16' -> the jnp dtype (config.precision fields)."""
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
  return jnp.dtype(_DTYPES[name])


def precision_kwargs(config: ml_collections.ConfigDict) -> dict[str, jnp.dtype]:
  """`param_dtype` and `dtype` from config.precision: the keywords every layer here takes."""
  return dict(param_dtype=dtype_of(config.precision.param_dtype), dtype=dtype_of(config.precision.compute_dtype))


def _shape(s: int | Sequence[int]) -> tuple[int, ...]:
  return (s,) if isinstance(s, int) else tuple(s)


def normal(key: jax.Array, shape: Sequence[int], std: float, dtype=jnp.float32) -> jax.Array:
  """std * N(0, 1) of `shape`, drawn flat and reshaped.

  Same distribution as `jax.random.normal(key, shape)`, but XLA's CPU compile
  time of the (partitionable) threefry generator grows steeply with the rank
  of the requested shape: a [16, 4, 5] draw compiled ~4x slower than a flat
  [320] one on our machines, and stacked layers (nnx.vmap) add another dim.
  """
  return (std * jax.random.normal(key, (math.prod(shape),), jnp.float32)).reshape(tuple(shape)).astype(dtype)


class Embed(nnx.Module):
  """Token embedding, optionally reused as the output head (`attend`).

  Rows are drawn with std 1/sqrt(d) so that `attend` (tied output, Press & Wolf
  2017) starts with unit-variance logits for unit-variance inputs; the lookup
  multiplies by sqrt(d) (Vaswani et al. 2017, sec. 3.4) so the embedded inputs
  also have unit variance per coordinate.
  """

  def __init__(self, vocab: int, d: int, *, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
    self.vocab, self.d, self.dtype = vocab, d, dtype
    table = normal(rngs.params(), (vocab, d), 1 / math.sqrt(d), param_dtype)
    self.embedding = nnx.Param(table, out_sharding=("vocab", "embed"))

  def __call__(self, tokens: Int[Array, "..."]) -> Float[Array, "... d"]:
    return (quant.take_rows(self.embedding.get_value(), tokens) * math.sqrt(self.d)).astype(self.dtype)

  def attend(self, x: Float[Array, "... d"]) -> Float[Array, "... v"]:
    """Logits x @ E^T in float32 (the tied output head)."""
    table = quant.matmul_weight(self.embedding.get_value(), self.dtype)
    # Flattened to one 2-D matmul for the same reason as Dense (see matmul_2d).
    x2 = x.astype(self.dtype).reshape(-1, self.d)
    logits = jax.lax.dot_general(x2, table, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return logits.reshape(x.shape[:-1] + (self.vocab,))

  def quant_axes(self) -> dict[str, tuple[int, ...]]:
    """Int8 scales per vocabulary row (wm.compress.quant): one scale serves the lookup and `attend`."""
    return {"embedding": (-1,)}


def matmul_2d(x: jax.Array, w: jax.Array, n_in: int = 1) -> Float[Array, "n out"]:
  """x @ w as one 2-D matmul in float32: x's leading dims flattened, its trailing `n_in` dims contracted
  with w's leading `n_in` dims, w's other dims flattened (reshapes of row-major arrays, so no copies).

  Why 2-D: the gradient of a [b, t, d] x [d, f] dot_general contracts over
  (b, t), and XLA's CPU backend lowered that weight-gradient dot with its
  [b*t, f] operand copied into transposed order first, fused with whatever
  elementwise work produced it (the GELU derivative): a strided loop as slow
  as the matmul itself. As [b*t, d] x [d, f] the weight gradient is a plain
  [n, d]^T [n, f] dot with no copy (docs/performance.md). Same values.
  Give x batch-major ([b, t, ...]): with the batch dim sharded, only a
  flattening in which it is the major dim keeps the sharding (GSPMD gathers
  a time-major [t, b] flattening; see wm/models/lstm.py).
  """
  x2 = x.reshape(math.prod(x.shape[:x.ndim - n_in]), math.prod(x.shape[x.ndim - n_in:]))
  w2 = w.reshape(math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:]))
  return jax.lax.dot_general(x2, w2, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


class Dense(nnx.Module):
  """y = x @ W (+ b), contracting the trailing `in_shape` dims of x.

  Multi-dimensional shapes keep heads as their own weight dimension (e.g. a
  query projection is [d, heads, head_dim] with names ("embed", "heads",
  "head_dim")) so tensor parallelism can split heads without reshapes. Weights
  use LeCun-normal init (variance 1/fan_in) to keep activations at unit scale.

  Args:
    in_shape: trailing input dims contracted (int or tuple).
    out_shape: output dims appended (int or tuple).
    axes: logical names, one per dim of the kernel (in_shape + out_shape).
    use_bias: adds a bias named by the output part of `axes`.
    bias_init: initial bias value (array of shape out_shape) or None for zeros.
  """

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *,
               axes: Sequence[str | None], use_bias: bool = False, bias_init: jax.Array | None = None,
               param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_shape, self.out_shape = _shape(in_shape), _shape(out_shape)
    axes = tuple(axes)
    if len(axes) != len(self.in_shape) + len(self.out_shape):
      raise ValueError(f"Dense{self.in_shape}->{self.out_shape}: need one logical axis name per kernel dim, "
                       f"got {axes}")
    self.dtype = dtype
    fan_in = math.prod(self.in_shape)
    kernel = normal(rngs.params(), self.in_shape + self.out_shape, 1 / math.sqrt(fan_in), param_dtype)
    self.kernel = nnx.Param(kernel, out_sharding=axes)
    if use_bias:
      b = jnp.zeros(self.out_shape, jnp.float32) if bias_init is None else jnp.asarray(bias_init, jnp.float32)
      self.bias = nnx.Param(b.reshape(self.out_shape).astype(param_dtype), out_sharding=axes[len(self.in_shape):])
    else:
      self.bias = None

  def __call__(self, x: jax.Array) -> jax.Array:
    n = len(self.in_shape)
    kernel = quant.matmul_weight(self.kernel.get_value(), self.dtype)  # float, or int8 after quantization
    y = matmul_2d(x.astype(self.dtype), kernel, n).reshape(x.shape[:x.ndim - n] + self.out_shape)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)

  def quant_axes(self) -> dict[str, tuple[int, ...]]:
    """Int8 scales per output channel (wm.compress.quant): reduce over the contracted input dims.

    Counted from the end, so a stacked kernel's leading "layers" axis keeps a scale per layer.
    """
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    return {"kernel": tuple(range(-(n_in + n_out), -n_out))}


Linear = Dense  # the name readers coming from nnx.Linear / torch.nn.Linear look for


def output_head(d: int, vocab: int | Sequence[int], *, tied: bool, rngs: nnx.Rngs, **precision) -> Dense | None:
  """The projection from width `d` to logits, or None when the embedding table is the head (`tied`).

  `vocab` may be a shape, e.g. (components, vocab) for a mixture's K heads;
  `precision` is `precision_kwargs(config)`.
  """
  if tied:
    return None
  names = ("embed", "vocab") if isinstance(vocab, int) else ("embed", "components", "vocab")
  return Dense(d, vocab, axes=names, rngs=rngs, **precision)


def head_logits(embed: Embed, head: Dense | None, x: Float[Array, "... d"]) -> jax.Array:
  """Float32 logits of `x` through `head`, or through the embedding table (`Embed.attend`) when it is None."""
  if head is None:
    return embed.attend(x)
  return head(x).astype(jnp.float32)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale (Zhang & Sennrich 2019), statistics in float32."""

  def __init__(self, d: int, *, eps: float = 1e-6, param_dtype=jnp.float32, dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init; accepted so all layers construct alike
    self.eps, self.dtype = eps, dtype
    self.scale = nnx.Param(jnp.ones((d,), param_dtype), out_sharding=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope(x: Float[Array, "b t h e"], positions: Int[Array, "b t"] | Int[Array, "t"],
         base: float = 10_000.0) -> Float[Array, "b t h e"]:
  """Rotary position embedding (Su et al. 2021, RoFormer eq. 34).

  Rotates the pairs (x[..., i], x[..., i + e/2]) by angle pos * base^(-2i/e)
  (the "half-split" layout of GPT-NeoX/LLaMA, equivalent to the paper's
  interleaved pairs up to a fixed permutation of the head dims). Dot products
  between rotated queries and keys then depend only on relative position.
  Computed in float32, returned in x's dtype.
  """
  e = x.shape[-1]
  if e % 2:
    raise ValueError(f"rope needs an even head dim, got {e}")
  half = e // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / e)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, e/2] or [t, e/2]
  if angles.ndim == 2:
    angles = angles[None]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # broadcast over heads
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x32: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(gelu(x), tanh(u)) for float32 x, u = sqrt(2/pi) (x + 0.044715 x^3)."""
  t = jnp.tanh(_SQRT_2_OVER_PI * (x32 + 0.044715 * x32 * x32 * x32))
  return 0.5 * x32 * (1.0 + t), t


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """GELU, tanh approximation (Hendrycks & Gimpel 2016, eq. after sec. 2): jax.nn.gelu(x, approximate=True).

  Same values as jax.nn.gelu; the custom VJP saves only x for the backward
  pass and recomputes the derivative there. Autodiff of jax.nn.gelu keeps
  five [b, t, f] intermediates per layer, and XLA's CPU backend fused their
  product into the transposed copy that feeds the up-projection's weight
  gradient: a strided loop over five inputs that took a third of a 6-layer
  d=256 Transformer step (docs/performance.md). With one saved input the
  train step ran 1.5x faster.
  """
  return _gelu_tanh(x.astype(jnp.float32))[0].astype(x.dtype)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  # d/dx [0.5 x (1 + tanh u)] = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx.
  x32 = x.astype(jnp.float32)
  _, t = _gelu_tanh(x32)
  du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x32 * x32)
  dy = 0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * du
  return ((g.astype(jnp.float32) * dy).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout (Srivastava et al. 2014); identity when key is None or rate is 0."""
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def lm_loss_sums(logits: Logits, targets: Tokens, weights: Weights) -> dict[str, jax.Array]:
  """The weighted sums behind `lm_loss`'s metrics, float32 scalars.

  Sums add over disjoint slices of a batch, so a model that computes its loss
  one time chunk at a time (wm/models/lstm.py) adds these per chunk and
  finishes once with `lm_loss_from_sums`, getting the metrics of `lm_loss`.

  Returns:
    {"xent": sum(weights * xent), "correct": sum(weights * (argmax == target)),
    "weight": sum(weights)}.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  xent = logz - target_logit
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"xent": jnp.sum(weights * xent), "correct": jnp.sum(weights * correct), "weight": jnp.sum(weights)}


def lm_loss_from_sums(sums: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`lm_loss`'s (loss, metrics) from `lm_loss_sums` (or their sum over chunks)."""
  denom = jnp.maximum(sums["weight"], 1.0)
  loss = sums["xent"] / denom
  return loss, {"loss": loss, "nll": loss, "accuracy": sums["correct"] / denom, "weight": sums["weight"]}


def lm_loss(logits: Logits, targets: Tokens, weights: Weights) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted next-token cross-entropy in float32.

  Returns:
    loss: sum(weights * xent) / max(sum(weights), 1), nats per scored token.
    metrics: {"loss", "nll" (both = loss), "accuracy" (argmax == target over
      scored positions), "weight" (sum of weights)}.
  """
  return lm_loss_from_sums(lm_loss_sums(logits, targets, weights))


def param_count(module: nnx.Module) -> int:
  """Number of scalars in the module's nnx.Param variables."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


# ---------------------------------------------------------------------------
# Low-rank adapters (Hu et al. 2021, LoRA)
# ---------------------------------------------------------------------------

# The adapters' variable type: a subclass of nnx.Param, so the model and its
# sharding treat adapters as parameters, and a filter on this type makes them
# the only trainable ones (wm.step.trainable). Flax's own type, so nnx.LoRA
# layers and ours are caught by the same filter.
LoRAParam = nnx.LoRAParam


class LoRA(nnx.Module):
  """The low-rank update (alpha / r) A B of a `Dense` kernel: in_shape -> r -> out_shape.

  Hu et al. 2021 (sec. 4.1): h = W0 x + (alpha / r) B A x, with A random and B
  zero, so an adapted model starts equal to its base. In our x @ W layout A is
  [in..., r] and B is [r, out...]. A is LeCun-normal (variance 1/fan_in, the
  default of Flax's nnx.LoRA; PEFT's Kaiming-uniform has a third of it), so
  x A has unit scale like a base projection's output.

  Why not nnx.LoRA / nnx.LoRALinear (flax 0.12.8, read 2026-11-25): they take
  2-D (in_features, out_features) only, while our projections keep heads as
  their own dims ([d, heads, head_dim]) for tensor parallelism; they have no
  alpha / r scale; and they multiply in the promoted dtype without float32
  accumulation (layers.py's precision contract). The variable type is theirs.

  Logical axes: A carries the kernel's input names, B its output names; the
  rank dim is None (replicated: r is small, and splitting it would only add
  a reduction).
  """

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], rank: int, *,
               alpha: float = 0.0, axes: Sequence[str | None], param_dtype=jnp.float32, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.in_shape, self.out_shape = _shape(in_shape), _shape(out_shape)
    axes = tuple(axes)
    self.rank, self.dtype = rank, dtype
    self.scale = (alpha or rank) / rank
    fan_in = math.prod(self.in_shape)
    self.a = LoRAParam(normal(rngs.params(), self.in_shape + (rank,), 1 / math.sqrt(fan_in), param_dtype),
                       out_sharding=axes[:len(self.in_shape)] + (None,))
    self.b = LoRAParam(jnp.zeros((rank,) + self.out_shape, param_dtype),
                       out_sharding=(None,) + axes[len(self.in_shape):])

  def __call__(self, x: jax.Array) -> jax.Array:
    """(alpha / r) (x A) B in float32, x's trailing in_shape dims contracted."""
    n = len(self.in_shape)
    contract = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
    xa = jax.lax.dot_general(x.astype(self.dtype), self.a[...].astype(self.dtype), contract,
                             preferred_element_type=jnp.float32)
    y = jax.lax.dot_general((self.scale * xa).astype(self.dtype), self.b[...].astype(self.dtype),
                            (((xa.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y

  def delta(self) -> jax.Array:
    """(alpha / r) A B, shaped like the kernel, float32; any leading (stacked-layer) dims of A and B are kept."""
    a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
    lead = a.ndim - len(self.in_shape) - 1
    a = a.reshape(a.shape[:lead] + (-1, self.rank))
    b = b.reshape(b.shape[:lead] + (self.rank, -1))
    return (self.scale * (a @ b)).reshape(a.shape[:lead] + self.in_shape + self.out_shape)


class LoRADense(Dense):
  """A `Dense` with a low-rank adapter: y = x W (+ b) + (alpha / r) (x A) B.

  The base kernel and bias keep their names and shapes, so a base model's
  checkpoint loads into it (wm.train, `train.init_from`) and `merge_lora`
  folds the adapter back into a plain Dense's kernel. (x A) B is computed
  apart from x W rather than as x (W + A B): the backward pass then never
  forms a kernel-sized gradient, and the extra activation kept is x A, r wide.
  """

  def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *, lora_rank: int,
               lora_alpha: float = 0.0, axes: Sequence[str | None], param_dtype=jnp.float32, dtype=jnp.float32,
               rngs: nnx.Rngs, **kwargs):
    super().__init__(in_shape, out_shape, axes=axes, param_dtype=param_dtype, dtype=dtype, rngs=rngs, **kwargs)
    self.lora = LoRA(in_shape, out_shape, lora_rank, alpha=lora_alpha, axes=axes, param_dtype=param_dtype,
                     dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return (super().__call__(x).astype(jnp.float32) + self.lora(x)).astype(self.dtype)

  def merge_lora(self) -> None:
    self.kernel[...] = (self.kernel[...].astype(jnp.float32) + self.lora.delta()).astype(self.kernel.dtype)


def dense(in_shape, out_shape, *, lora_rank: int = 0, lora_alpha: float = 0.0, **kwargs) -> Dense:
  """A `Dense`, or a `LoRADense` when lora_rank > 0 (config.model.lora_rank)."""
  if lora_rank:
    return LoRADense(in_shape, out_shape, lora_rank=lora_rank, lora_alpha=lora_alpha, **kwargs)
  return Dense(in_shape, out_shape, **kwargs)


def merge_lora(model: nnx.Module) -> None:
  """Folds every adapter into its base weight in place: W <- W + (alpha / r) A B.

  Calls `merge_lora()` on each submodule that has one (`LoRADense`, the LSTM
  layer for its recurrent kernel). The adapters stay (unchanged) in the
  module; the base parameters, split off with `nnx.Not(LoRAParam)`, are then
  the parameters of the same model without adapters (wm/export.py).
  """
  for _, module in nnx.iter_modules(model):
    if hasattr(type(module), "merge_lora"):
      module.merge_lora()
