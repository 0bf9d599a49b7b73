"""AdamW with block-wise 8-bit moments (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

Adam (Kingma & Ba 2015) keeps two float moments per parameter, 8 bytes in
float32: usually the largest model state. Here both are stored as int8 codes
into a 256-entry codebook, with one float32 absolute maximum per block of
`block` elements:

    stored:   codes (int8, the parameter's shape), absmax (float32, one per block)
    read:     m = code[codes] * absmax              (dequantize, float32)
    step:     m' = b1 m + (1 - b1) g,  v' = b2 v + (1 - b2) g^2,  update from m', v' in float32
    write:    absmax' = max |m'| over the block,  codes' = nearest code to m' / absmax'

The update itself is exactly Adam's, computed from the dequantized moments
and the fresh gradient in float32; only what is stored between steps is 8-bit
(Dettmers et al. sec. 2). Two choices from the paper:

- Block-wise scales (sec. 2.1): an outlier only coarsens its own block, and
  blocks are independent (no global reduction). Our blocks run along each
  parameter's last axis (`block` elements, or the whole axis when it is
  shorter; a ragged tail block is zero-padded while quantizing), so the codes
  keep the parameter's shape and logical axis names and shard exactly like
  it (wm.step._variable_shardings), and the scales, shaped
  [..., ceil(n / block)], shard like the parameter on all but the last axis.
  Dettmers et al. use blocks of 2048 consecutive elements of the flattened
  tensor; along the last axis a block is min(block, n), so narrow weights
  (head_dim 32, say) get smaller blocks and more scale bytes (4 / min(block, n)
  per element per moment).
- Dynamic tree quantization (sec. 2.2; Dettmers 2016): a non-linear codebook
  with a decimal exponent, 7 decades from 1e-7 to 1, each split linearly into
  2^i cells (signed, for m: 127 positive values, their negatives, 0 and 1)
  or 2^(i+1) cells (unsigned, for v, which is never negative: 254 values, 0
  and 1). Small moments keep relative precision that a linear int8 grid
  (1/127 of the block's maximum) would round to zero.

Parameters with fewer than `min_size` elements keep float moments in the
parameter dtype (the paper's implementation, bitsandbytes, keeps tensors
under 4096 elements in 32 bits): norm scales and biases, a negligible share
of the bytes, and the tensors whose updates are most sensitive.

One guard that exact Adam does not need. With b1^2 < b2, Cauchy-Schwarz
over the two moving averages gives m^2 <= C v with
C = (1 - b1)^2 / ((1 - b2) (1 - b1^2 / b2)) (2.9 for b1 = 0.9, b2 = 0.98), so
exact Adam's m / sqrt(v) is bounded. Quantization breaks the bound when v
rounds to 0 in its block while m does not (an element whose gradient is
below ~5e-4 of its block's largest, in a step where it receives none):
m / (0 + eps) would then be huge. The update reads v as max(v, m^2 / C),
which changes nothing exact Adam could produce.

Bytes per parameter (estimate.py counts them): 2 (codes) + 8 / min(block, n)
(scales) instead of 2 * 4 for float32 moments.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from wm.compress import leaves

MIN_SIZE = 4096  # parameters smaller than this keep float moments (bitsandbytes' min_8bit_size)


def dynamic_map(signed: bool) -> np.ndarray:
  """The 256 sorted values of the dynamic tree codebook (Dettmers et al. 2022, sec. 2.2) in [-1, 1] or [0, 1]."""
  values = [0.0, 1.0]
  for i in range(7):  # decade i covers [0.1, 1] * 10^(i - 6)
    cells = 2 ** i if signed else 2 ** (i + 1)
    edges = np.linspace(0.1, 1.0, cells + 1)
    mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
    values += list(mids) + (list(-mids) if signed else [])
  code = np.sort(np.asarray(values, np.float32))
  assert code.size == 256, code.size
  return code


SIGNED, UNSIGNED = dynamic_map(True), dynamic_map(False)


def block_shape(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
  """Shape of the float32 scales of a parameter: one per block along its last axis."""
  n = shape[-1]
  return tuple(shape[:-1]) + (math.ceil(n / min(block, n)),)


def is_quantized(shape: tuple[int, ...], min_size: int = MIN_SIZE) -> bool:
  """Whether a parameter of this shape gets 8-bit moments (else float moments in its own dtype)."""
  return len(shape) >= 1 and math.prod(shape) >= max(min_size, 1)


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """[..., n] -> [..., n_blocks, b], b = min(block, n), the ragged tail zero-padded (zeros never raise a maximum)."""
  n = x.shape[-1]
  b = min(block, n)
  pad = math.ceil(n / b) * b - n
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + (-1, b))


def quantize_blockwise(x: jax.Array, code: np.ndarray, block: int) -> tuple[jax.Array, jax.Array]:
  """(int8 codes with x's shape, float32 absmax per block): each element -> its nearest code * absmax."""
  n = x.shape[-1]
  xb = _blocks(x.astype(jnp.float32), block)
  absmax = jnp.max(jnp.abs(xb), axis=-1)
  normed = xb / jnp.where(absmax > 0, absmax, 1.0)[..., None]
  codes = (_nearest(normed, code) - 128).astype(jnp.int8).reshape(xb.shape[:-2] + (-1,))[..., :n]
  return codes, absmax


def _nearest(x: jax.Array, code: np.ndarray) -> jax.Array:
  """Index of the code nearest to each element: the number of midpoints between neighbouring codes below it.

  A branchless binary search over the 255 midpoints (padded with +inf to
  256), unrolled: 8 gathers from a 256-entry constant and 8 selects per
  element, which XLA fuses into one elementwise loop. jnp.searchsorted gave
  the same indices, but its loop kept [n] index arrays alive per parameter:
  the update of a 100k-parameter model compiled to 4x the temp bytes.
  """
  table = jnp.asarray(np.append((code[1:] + code[:-1]) / 2, np.inf).astype(np.float32))
  idx = jnp.zeros(x.shape, jnp.int32)
  for step in (128, 64, 32, 16, 8, 4, 2, 1):
    idx = jnp.where(table[idx + (step - 1)] < x, idx + step, idx)
  return idx


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array, code: np.ndarray, block: int) -> jax.Array:
  """float32 values of `codes` (int8, from quantize_blockwise) with their blocks' absmax."""
  n = codes.shape[-1]
  values = _blocks(jnp.asarray(code)[codes.astype(jnp.int32) + 128], block)
  return (values * absmax[..., None]).reshape(codes.shape[:-1] + (-1,))[..., :n]


class ScaleByAdam8bitState(NamedTuple):
  """Per parameter, in trees shaped like the parameters.

  mu, nu: int8 codes (8-bit parameters) or float moments (small parameters).
  mu_scale, nu_scale: float32 absmax per block, or a float32 () placeholder
    for small parameters (so every tree has one leaf per parameter).
  """
  count: jax.Array
  mu: Any
  mu_scale: Any
  nu: Any
  nu_scale: Any


def _moment_bound(b1: float, b2: float) -> float:
  """C with m^2 <= C v for exact Adam moments (module docstring), or inf when b1^2 >= b2 (no bound)."""
  if b1 * b1 >= b2:
    return math.inf
  return (1 - b1) ** 2 / ((1 - b2) * (1 - b1 * b1 / b2))


def scale_by_adam8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, block: int = 256,
                      min_size: int = MIN_SIZE) -> optax.GradientTransformation:
  """optax.scale_by_adam with block-wise 8-bit moments (module docstring).

  Args:
    b1, b2, eps: Adam's decays and denominator floor, as in optax.scale_by_adam.
    block: elements per float32 scale, along each parameter's last axis.
    min_size: parameters with fewer elements keep float moments.
  """
  bound = _moment_bound(b1, b2)

  def init_fn(params):
    def mu(p):
      x = leaves.value(p)
      return leaves.like(p, jnp.zeros(x.shape, jnp.int8) if is_quantized(x.shape, min_size) else jnp.zeros_like(x))

    def scale(p):
      x = leaves.value(p)
      if not is_quantized(x.shape, min_size):
        return leaves.like(p, jnp.zeros((), jnp.float32), out_sharding=())
      names = p.get_metadata().get("out_sharding") if isinstance(p, nnx.Variable) else None
      # The last axis now counts blocks: it is not split over the mesh (it rarely divides).
      names = tuple(names[:-1]) + (None,) if names else names
      return leaves.like(p, jnp.zeros(block_shape(x.shape, block), jnp.float32), out_sharding=names)

    moments = jax.tree.map(mu, params, is_leaf=leaves.is_variable)
    scales = jax.tree.map(scale, params, is_leaf=leaves.is_variable)
    return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), moments, scales, moments, scales)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    treedefs = [jax.tree.structure(tree, is_leaf=leaves.is_variable) for tree in (updates, state.mu, state.mu_scale)]
    flat = [jax.tree.leaves(tree, is_leaf=leaves.is_variable) for tree in (updates, state.mu, state.mu_scale, state.nu,
                                                                 state.nu_scale)]
    out_u, out_m, out_ms, out_v, out_vs = [], [], [], [], []
    for g, m, ms, v, vs in zip(*flat):
      g32 = leaves.value(g).astype(jnp.float32)
      quantized = leaves.value(m).dtype == jnp.int8
      if quantized:
        m32 = dequantize_blockwise(leaves.value(m), leaves.value(ms), SIGNED, block)
        v32 = dequantize_blockwise(leaves.value(v), leaves.value(vs), UNSIGNED, block)
      else:
        m32, v32 = leaves.value(m).astype(jnp.float32), leaves.value(v).astype(jnp.float32)
      m32 = b1 * m32 + (1 - b1) * g32
      v32 = b2 * v32 + (1 - b2) * g32 * g32
      v_read = v32 if math.isinf(bound) else jnp.maximum(v32, m32 * m32 / bound)
      m_hat = m32 / (1 - b1 ** t)
      v_hat = v_read / (1 - b2 ** t)
      out_u.append(leaves.like(g, (m_hat / (jnp.sqrt(v_hat) + eps)).astype(leaves.value(g).dtype)))
      if quantized:
        codes, absmax = quantize_blockwise(m32, SIGNED, block)
        out_m.append(leaves.like(m, codes))
        out_ms.append(leaves.like(ms, absmax))
        codes, absmax = quantize_blockwise(v32, UNSIGNED, block)
        out_v.append(leaves.like(v, codes))
        out_vs.append(leaves.like(vs, absmax))
      else:
        out_m.append(leaves.like(m, m32.astype(leaves.value(m).dtype)))
        out_ms.append(ms)
        out_v.append(leaves.like(v, v32.astype(leaves.value(v).dtype)))
        out_vs.append(vs)
    updates = jax.tree.unflatten(treedefs[0], out_u)
    mu, nu = jax.tree.unflatten(treedefs[1], out_m), jax.tree.unflatten(treedefs[1], out_v)
    mu_scale, nu_scale = jax.tree.unflatten(treedefs[2], out_ms), jax.tree.unflatten(treedefs[2], out_vs)
    return updates, ScaleByAdam8bitState(count, mu, mu_scale, nu, nu_scale)

  return optax.GradientTransformation(init_fn, update_fn)


def adamw8bit(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              weight_decay: float = 1e-4, *, block: int = 256,
              min_size: int = MIN_SIZE) -> optax.GradientTransformation:
  """optax.adamw with 8-bit moments: the same chain (Adam direction, decoupled weight decay, -lr)."""
  return optax.chain(scale_by_adam8bit(b1, b2, eps, block=block, min_size=min_size),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))


def state_bytes(shape: tuple[int, ...], itemsize: int, block: int, min_size: int = MIN_SIZE) -> tuple[int, int]:
  """(bytes sharded like the parameter, bytes of the per-block scales) of both moments of one parameter.

  Scales shard like the parameter on all axes but the last; a small
  parameter's float moments are all in the first figure (its two
  placeholders, 8 bytes, in the second).
  """
  size = math.prod(shape)
  if not is_quantized(shape, min_size):
    return 2 * size * itemsize, 2 * 4
  return 2 * size, 2 * 4 * math.prod(block_shape(shape, block))
