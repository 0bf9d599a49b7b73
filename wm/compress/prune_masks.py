"""Pruning masks: the k smallest magnitudes of each matrix, unstructured or within N:M groups.

Masks only ever grow: a pruned weight scores below every live one (score
-1, where |w| >= 0), so with a non-decreasing s_t it stays among the k
pruned. The k smallest are found by bisection on the bits of |w| (float32
magnitudes order like their int32 bit patterns), 31 passes of a count over
the matrix, then a bisection on the position among the ties: counts and
compares fuse into reductions over the weights as they lie, which a sort
would not (a sort of a sharded matrix gathers it, and keeps a copy of keys
and indices).

The schedule that says when and how far to prune, and the optimizer that
applies the masks, are in wm.compress.prune.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from wm.compress import leaves

STACK_AXES = ("layers", "components")  # leading axes of a stacked weight: each index is one matrix
# Scores are the int32 bits of |w| (>= 0), -1 for a pruned weight, and NOT_CANDIDATE (above +inf's
# bits, 0x7F800000) for a weight N:M keeps whatever happens.
NOT_CANDIDATE = 0x7F800001


def matrix_axes(leaf: Any) -> tuple[int, ...]:
  """The axes of one matrix of a (possibly stacked) weight: all but its leading "layers"/"components" axes."""
  value = leaves.value(leaf)
  names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
  lead = 0
  if names and len(names) == value.ndim:
    while lead < value.ndim and names[lead] in STACK_AXES:
      lead += 1
  return tuple(range(lead, value.ndim))


def _least(pred, target: jax.Array, lo: int, hi: int, reduce_axes: tuple[int, ...], keep_shape) -> jax.Array:
  """The least x in [lo, hi] with count(pred(x)) >= target (lo where target <= 0), per slice, by bisection.

  count(pred(x)) must not decrease with x; `target` has `keep_shape` (the
  slice dims, size 1 on `reduce_axes`). hi - lo must fit in int32.
  """
  steps = max(math.ceil(math.log2(hi - lo + 1)), 1)

  def body(_, bounds):
    low, high = bounds
    mid = low + (high - low) // 2
    ok = jnp.sum(pred(mid), axis=reduce_axes, keepdims=True, dtype=jnp.int32) >= target
    return jnp.where(ok, low, mid + 1), jnp.where(ok, mid, high)

  start = (jnp.full(keep_shape, lo, jnp.int32), jnp.full(keep_shape, hi, jnp.int32))
  return jax.lax.fori_loop(0, steps, body, start)[0]


def smallest(score: jax.Array, k: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """True at the k smallest entries of an int32 `score` over `axes` (ties: lower position first), per slice.

  Args:
    score: int32 in [-1, NOT_CANDIDATE].
    k: int32, broadcastable to the slice shape (size 1 on `axes`).
    axes: the axes of one slice (a matrix).
  """
  axes = tuple(sorted(a % score.ndim for a in axes))
  keep_shape = tuple(1 if i in axes else s for i, s in enumerate(score.shape))
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), keep_shape)
  value = _least(lambda x: score <= x, k, -1, NOT_CANDIDATE, axes, keep_shape)  # the k-th smallest score
  below = score < value
  need = k - jnp.sum(below, axis=axes, keepdims=True, dtype=jnp.int32)  # how many of the ties at `value`
  # Position of each element within its slice (row-major), from broadcast iotas: nothing to reshape.
  pos = jnp.zeros(score.shape, jnp.int32)
  stride = 1
  for a in reversed(axes):
    pos = pos + jax.lax.broadcasted_iota(jnp.int32, score.shape, a) * stride
    stride *= score.shape[a]
  tie = score == value
  last = _least(lambda x: tie & (pos <= x), need, -1, stride - 1, axes, keep_shape)
  return below | (tie & (pos <= last))


def _scores(w: jax.Array, mask: jax.Array) -> jax.Array:
  """int32 bits of |w| (which order like the magnitudes), -1 where already pruned."""
  bits = jax.lax.bitcast_convert_type(jnp.abs(w.astype(jnp.float32)), jnp.int32)
  return jnp.where(mask > 0, bits, -1)


def nm_candidates(score: jax.Array, axis: int, n: int, m: int) -> jax.Array:
  """True at the m - n smallest scores of every group of m consecutive elements along `axis` (ties by position)."""
  axis %= score.ndim
  size = score.shape[axis]
  grouped = score.reshape(score.shape[:axis] + (size // m, m) + score.shape[axis + 1:])
  within = axis + 1
  idx = jax.lax.broadcasted_iota(jnp.int32, grouped.shape, within)
  rank = jnp.zeros(grouped.shape, jnp.int32)
  for j in range(m):  # rank = how many of the group come before this element in (score, position) order
    other = jax.lax.slice_in_dim(grouped, j, j + 1, axis=within)
    rank = rank + ((other < grouped) | ((other == grouped) & (j < idx))).astype(jnp.int32)
  return (rank < m - n).reshape(score.shape)


def group_axis(contracted: tuple[int, ...], ndim: int) -> int:
  """The axis N:M groups run along: the innermost contracted (input) axis."""
  return max(a % ndim for a in contracted)


def new_mask(w: jax.Array, mask: jax.Array, sparsity: jax.Array, axes: tuple[int, ...],
             nm: tuple[int, int, int] | None = None) -> jax.Array:
  """The uint8 mask of `w` at `sparsity` per matrix over `axes`, keeping every weight `mask` already pruned pruned.

  Args:
    w: the weight (any float dtype).
    mask: its current mask (uint8, 1 kept).
    sparsity: the fraction of each matrix to prune (a float32 scalar, may be traced).
    axes: the axes of one matrix; the others index stacked matrices.
    nm: (group axis, n, m) for N:M, or None for unstructured.
  """
  size = math.prod(w.shape[a] for a in axes)
  k = jnp.round(sparsity * size).astype(jnp.int32)
  score = _scores(w, mask)
  if nm is not None:
    axis, n, m = nm
    score = jnp.where(nm_candidates(score, axis, n, m), score, NOT_CANDIDATE)
    k = jnp.minimum(k, size // m * (m - n))  # never past the N:M pattern, whatever float rounding gives
  # `& mask`: a lower target than before (never the schedule's) does not bring pruned weights back.
  return (jnp.logical_not(smallest(score, k, axes)) & (mask > 0)).astype(jnp.uint8)
