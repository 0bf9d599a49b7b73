"""Gradual magnitude pruning (Zhu & Gupta 2017), unstructured and N:M, as an optax wrapper with masks in its state.

Schedule (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1). The masks
are recomputed every `every` (Δt) steps from `start` (t0) to `end`
(t0 + n Δt), each time at sparsity

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3,    t = t0, t0 + Δt, ..., t0 + n Δt

and held between updates: fast pruning while the network has many redundant
weights, slower as few are left. Before t0 nothing is pruned; after t0 + nΔt
the masks stay fixed (s_f). s_i is 0 here, so the update at t0 prunes nothing.
With start == end the whole sparsity is applied once, at t0 (one-shot pruning).
t is the number of the step an update completes (1 for the first), as in
metrics.jsonl and checkpoints: the masks of step t are recomputed before its
update, so the record of step end_step shows s_f. It is counted from the
optimizer's own applied updates, so a step the non-finite guard of wm.step
dropped does not advance the schedule.

What is pruned: each matmul weight (the weights wm.compress.quant knows from
the modules' `quant_axes()`: Dense kernels, the LSTM's W_x and W_h), one
target per matrix: a stacked weight `[layers, ...]` (leading axes named
"layers" or "components") is that many matrices, each pruned to s_t of its
own elements. Norm scales and biases are never pruned (vectors, a negligible
share of the bytes, and a zero norm scale silences a whole channel); the
token embedding only with `embeddings=True` (config `prune.embeddings`): a
zeroed embedding entry is an input feature gone for that token, and tied, an
output logit term too.

- Unstructured ("magnitude"): the k = round(s_t N) smallest |w| of a matrix
  of N elements are pruned, exactly k (ties broken by position).
- N:M (NVIDIA's 2:4 for sparse tensor cores, Mishra et al. 2021): in every
  group of m consecutive elements along the contraction (input) axis at most
  n are kept, the axis along which the sparse operand of a sparse tensor-core
  matmul must be compressed (for a kernel with several contracted axes, e.g.
  the attention output [heads, head_dim, d], the innermost: head_dim). To
  prune gradually into that pattern, the candidates are the m - n smallest of
  every group, and the schedule prunes the k = round(s_t N) smallest
  candidates of the matrix; at s_f = 1 - n/m every candidate is gone and
  every group keeps exactly n. (Zhou et al. 2021 and Mishra et al. 2021 reach
  N:M by other routes: training from scratch with a sparse-refined
  straight-through estimator, or one-shot pruning of a trained model and
  retraining; one-shot is start == end here.)

Masks only ever grow: a pruned weight scores below every live one (score
-1, where |w| >= 0), so with a non-decreasing s_t it stays among the k
pruned. The k smallest are found by bisection on the bits of |w| (float32
magnitudes order like their int32 bit patterns), 31 passes of a count over
the matrix, then a bisection on the position among the ties: counts and
compares fuse into reductions over the weights as they lie, which a sort
would not (a sort of a sharded matrix gathers it, and keeps a copy of keys
and indices).

The optimizer (`pruned(inner, pruning)`) wraps the whole chain (clipping,
AdamW, learning rate):
  1. at an update step, the masks are recomputed from the current weights;
  2. the gradient is masked (g * mask) before the inner chain sees it, as in
     Zhu & Gupta's implementation, where the forward pass reads w * mask and
     a pruned weight gets no gradient: its Adam moments decay to zero and the
     global-norm clip measures the live weights only;
  3. the inner update is masked at the output: u' = u where kept, -w where
     pruned, so w + u' is exactly 0 at every pruned weight after every step
     (x + (-x) == 0 in floating point), whatever the inner chain adds:
     AdamW's momentum (built before the weight was pruned) and its decoupled
     weight decay cannot bring a pruned weight back.

State: PruneState(count, masks, inner). Masks are uint8 (1 kept, 0 pruned),
one byte per element of each pruned weight, shaped like it and carrying its
logical axis names, so they shard like it (wm.step._variable_shardings) and
Orbax saves and restores them with the rest of the optimizer state;
parameters never pruned get a uint8 () placeholder. Packed bits would be 1/8
byte per element, but a packed mask no longer has the weight's shape to
shard by. The masks are training state: dense storage of a 50%-sparse matrix
takes the same bytes as a dense one, plus the mask. Bytes are saved only by
a compressed form, `export_sparse` (docs/compression.md, "Pruning").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from wm import config as config_lib
from wm.compress import quant

Path = quant.Path
STACK_AXES = ("layers", "components")  # leading axes of a stacked weight: each index is one matrix
METHODS = config_lib.PRUNE_METHODS
# Scores are the int32 bits of |w| (>= 0), -1 for a pruned weight, and _NOT_CANDIDATE (above +inf's
# bits, 0x7F800000) for a weight N:M keeps whatever happens.
_NOT_CANDIDATE = 0x7F800001


@dataclasses.dataclass(frozen=True, eq=False)
class Pruning:
  """What to prune, how far and when: config.prune resolved against a model.

  Attributes:
    weights: {param path: its contracted axes}: the matrices pruned.
    sparsity: s_f, the final fraction of each matrix pruned.
    start, end, every: t0, t0 + nΔt and Δt of the schedule.
    n, m: N:M (keep n of every m along the innermost contracted axis); 0, 0 = unstructured.
    initial: s_i, the sparsity of the first update (0: Zhu & Gupta's usual choice).
  """
  weights: dict[Path, tuple[int, ...]]
  sparsity: float
  start: int
  end: int
  every: int
  n: int = 0
  m: int = 0
  initial: float = 0.0

  @classmethod
  def from_config(cls, prune: Any, weight_axes: dict[Path, tuple[int, ...]]) -> "Pruning | None":
    """From `config.prune` and `quant.weight_axes(model)`; None when pruning is off."""
    if not prune.method:
      return None
    n, m = {"magnitude": (0, 0), "2:4": (2, 4), "n:m": (prune.n, prune.m)}[prune.method]
    return cls(prunable(weight_axes, prune.embeddings), float(prune.sparsity), int(prune.start_step),
               int(prune.end_step), int(prune.every), n, m)


def prunable(weight_axes: dict[Path, tuple[int, ...]], embeddings: bool = False) -> dict[Path, tuple[int, ...]]:
  """The matmul weights pruning applies to: all that `quant.weight_axes` lists, the token embedding only if asked."""
  return {k: v for k, v in weight_axes.items() if embeddings or k[-1] != "embedding"}


# ---------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------

def sparsity_at(t, pruning: Pruning):
  """s_t of Zhu & Gupta 2017, eq. 1, held between mask updates: 0 before t0, s_f from t0 + nΔt on.

  `t` is a step number (a Python int, or the traced count + 1 inside the optimizer).
  """
  t = jnp.asarray(t, jnp.int32)
  s_i, s_f = pruning.initial, pruning.sparsity
  span = pruning.end - pruning.start
  if span == 0:
    return jnp.where(t >= pruning.start, jnp.float32(s_f), jnp.float32(0.0))
  done = jnp.clip(t - pruning.start, 0, span) // pruning.every * pruning.every  # k Δt of the last update
  frac = done.astype(jnp.float32) / span
  s = s_f + (s_i - s_f) * (1.0 - frac) ** 3
  return jnp.where(t >= pruning.start, s, 0.0).astype(jnp.float32)


def is_update_step(t, pruning: Pruning) -> jax.Array:
  """Whether the masks are recomputed in step `t` (t0, t0 + Δt, ..., t0 + nΔt), before its update."""
  t = jnp.asarray(t, jnp.int32)
  return (t >= pruning.start) & (t <= pruning.end) & ((t - pruning.start) % pruning.every == 0)


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------

def matrix_axes(leaf: Any) -> tuple[int, ...]:
  """The axes of one matrix of a (possibly stacked) weight: all but its leading "layers"/"components" axes."""
  value = _value(leaf)
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
    score: int32 in [-1, _NOT_CANDIDATE].
    k: int32, broadcastable to the slice shape (size 1 on `axes`).
    axes: the axes of one slice (a matrix).
  """
  axes = tuple(sorted(a % score.ndim for a in axes))
  keep_shape = tuple(1 if i in axes else s for i, s in enumerate(score.shape))
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), keep_shape)
  value = _least(lambda x: score <= x, k, -1, _NOT_CANDIDATE, axes, keep_shape)  # the k-th smallest score
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
    score = jnp.where(nm_candidates(score, axis, n, m), score, _NOT_CANDIDATE)
    k = jnp.minimum(k, size // m * (m - n))  # never past the N:M pattern, whatever float rounding gives
  # `& mask`: a lower target than before (never the schedule's) does not bring pruned weights back.
  return (jnp.logical_not(smallest(score, k, axes)) & (mask > 0)).astype(jnp.uint8)


# ---------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------

class PruneState(NamedTuple):
  """count: updates applied (the next is step count + 1 of the schedule); masks: uint8 per parameter (module docstring); inner: the
  wrapped optimizer's state."""
  count: jax.Array
  masks: Any
  inner: Any


def _value(leaf: Any) -> jax.Array:
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _like(leaf: Any, value: jax.Array, **metadata) -> Any:
  """`value` in place of a parameter leaf; an nnx.Variable keeps its metadata (changed by `metadata`)."""
  return leaf.replace(value, **metadata) if isinstance(leaf, nnx.Variable) else value


def _is_leaf(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _flat(tree: Any) -> tuple[list[Path], list[Any], Any]:
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  return [quant.path_key(p) for p, _ in pairs], [x for _, x in pairs], treedef


def _check_groups(path: Path, shape: tuple[int, ...], contracted: tuple[int, ...], pruning: Pruning) -> None:
  axis = group_axis(contracted, len(shape))
  if shape[axis] % pruning.m:
    raise config_lib.ConfigError(
        f"config.prune.method: {pruning.n}:{pruning.m} groups run along the input axis of {'/'.join(path)} "
        f"{tuple(shape)}, whose size {shape[axis]} is not a multiple of prune.m={pruning.m}; choose widths "
        f"divisible by {pruning.m}, or prune.method=\"magnitude\"")


def pruned(inner: optax.GradientTransformation, pruning: Pruning) -> optax.GradientTransformation:
  """`inner` with gradual magnitude pruning: masked gradients in, pruned weights held at exactly zero out.

  Args:
    inner: the optimizer to wrap (the whole chain: clipping, AdamW, learning rate).
    pruning: what to prune and when (`Pruning.from_config`).

  Returns:
    A GradientTransformation whose state is a PruneState; its update needs the params.
  """
  def init_fn(params):
    def mask(path, p):
      key = quant.path_key(path)
      if key not in pruning.weights:
        return _like(p, jnp.ones((), jnp.uint8), out_sharding=())
      if pruning.m:
        _check_groups(key, _value(p).shape, pruning.weights[key], pruning)
      return _like(p, jnp.ones(_value(p).shape, jnp.uint8))

    masks = jax.tree_util.tree_map_with_path(mask, params, is_leaf=_is_leaf)
    return PruneState(jnp.zeros([], jnp.int32), masks, inner.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("pruning reads the weights: call update(grads, state, params)")
    paths, p_leaves, _ = _flat(params)
    _, m_leaves, m_treedef = _flat(state.masks)
    _, g_leaves, g_treedef = _flat(updates)
    pruned_at = [i for i, key in enumerate(paths) if key in pruning.weights]

    t = state.count + 1  # the step this update completes (module docstring)

    def recompute(values):
      s = sparsity_at(t, pruning)
      out = []
      for i, mask in zip(pruned_at, values):
        w = _value(p_leaves[i])
        nm = None
        if pruning.m:
          nm = (group_axis(pruning.weights[paths[i]], w.ndim), pruning.n, pruning.m)
        out.append(new_mask(w, mask, s, matrix_axes(p_leaves[i]), nm))
      return out

    old = [_value(m_leaves[i]) for i in pruned_at]
    fresh = jax.lax.cond(is_update_step(t, pruning), recompute, lambda values: values, old)
    m_leaves = list(m_leaves)
    for i, value in zip(pruned_at, fresh):
      m_leaves[i] = _like(m_leaves[i], value)

    g_leaves = list(g_leaves)
    for i in pruned_at:
      g = _value(g_leaves[i])
      g_leaves[i] = _like(g_leaves[i], g * _value(m_leaves[i]).astype(g.dtype))
    u, inner_state = inner.update(jax.tree.unflatten(g_treedef, g_leaves), state.inner, params)
    _, u_leaves, u_treedef = _flat(u)
    u_leaves = list(u_leaves)
    for i in pruned_at:
      u_value, w = _value(u_leaves[i]), _value(p_leaves[i])
      kept = _value(m_leaves[i]) > 0
      u_leaves[i] = _like(u_leaves[i], jnp.where(kept, u_value, -w.astype(u_value.dtype)))
    return (jax.tree.unflatten(u_treedef, u_leaves),
            PruneState(optax.safe_increment(state.count), jax.tree.unflatten(m_treedef, m_leaves), inner_state))

  return optax.GradientTransformation(init_fn, update_fn)


def find_state(opt_state: Any) -> PruneState | None:
  """The PruneState inside an optimizer state (at the top, or inside another wrapper's state), or None."""
  if isinstance(opt_state, PruneState):
    return opt_state
  if isinstance(opt_state, (tuple, list)):
    for x in opt_state:
      found = find_state(x)
      if found is not None:
        return found
  if isinstance(opt_state, dict):
    for x in opt_state.values():
      found = find_state(x)
      if found is not None:
        return found
  return None


# ---------------------------------------------------------------------------
# Reported sparsity
# ---------------------------------------------------------------------------

def sparsity(masks: Any) -> jax.Array:
  """Fraction of the pruned weights' elements that are zero (the placeholders of other parameters not counted)."""
  leaves = [_value(x) for x in jax.tree.leaves(masks, is_leaf=_is_leaf) if _value(x).ndim]
  if not leaves:
    return jnp.float32(0.0)
  # Counted in int32 per weight, so a fully dense model reports exactly 0 (1 - kept / total would round).
  pruned_count = sum((x.size - jnp.sum(x, dtype=jnp.int32)).astype(jnp.float32) for x in leaves)
  return pruned_count / float(sum(x.size for x in leaves))


def layer_sparsity(masks: Any) -> dict[str, jax.Array]:
  """{"path/of/weight": fraction pruned per matrix}: a float for a single matrix, an array shaped by the
  stack axes for a stacked weight (one value per layer, [components, layers] for separate mixture decoders).

  Jit it with replicated outputs (wm.train does) to read it on every host; `.tolist()` gives JSON.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_leaf)[0]:
    value = _value(leaf)
    if value.ndim:
      axes = matrix_axes(leaf)
      size = math.prod(value.shape[a] for a in axes)
      out["/".join(quant.path_key(path))] = (size - jnp.sum(value, axis=axes, dtype=jnp.int32)) / size
  return out


# ---------------------------------------------------------------------------
# Export: where sparsity saves bytes
# ---------------------------------------------------------------------------

def _index_bits(m: int) -> int:
  return max(math.ceil(math.log2(m)), 1)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes < 2**bits, `bits` bits each, little-endian within a byte, packed into uint8."""
  flat = codes.reshape(-1).astype(np.uint8)
  planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1), bitorder="little")


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  planes = np.unpackbits(packed, bitorder="little")[:count * bits].reshape(count, bits)
  return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1).astype(np.uint8)


def export_sparse(params: Any, masks: Any, pruning: Pruning | None = None,
                  path: str | None = None) -> dict[str, Any]:
  """A compressed copy of the weights and its byte count (host memory, NumPy).

  Pruned weights are stored as their kept values plus where they sit:
    - "bitmap" (unstructured): values in row-major order + one bit per element;
      bytes = nnz * itemsize + N / 8.
    - "n:m" (when `pruning` is N:M and every group keeps at most n): n values
      per group of m along the input axis + ceil(log2 m) bits per value for
      its position in the group (NVIDIA's 2:4 layout: 2 bits per kept value);
      bytes = N n/m * itemsize + N n/m * ceil(log2 m) / 8.
  Everything else is stored dense. CSR (int32 column indices and row
  pointers) would cost nnz * (itemsize + 4) + 4 (rows + 1): at 50% float32,
  as many bytes as dense, which is why the bitmap is the format here.

  Args:
    params: the parameters (an nnx.State or a pytree of arrays).
    masks: the masks from the optimizer state (`find_state(opt_state).masks`).
    pruning: the run's pruning (for N:M); None = every pruned weight as a bitmap.
    path: if given, the arrays are also written there with `np.savez` (uncompressed).

  Returns:
    {"tensors": {name: {"format", "shape", "dtype", arrays...}}, "bytes": exported bytes (the arrays'
     nbytes, headers not counted), "dense_bytes": the same parameters stored dense,
     "ratio": bytes / dense_bytes}.
  """
  paths, p_leaves, _ = _flat(params)
  _, m_leaves, _ = _flat(masks)
  tensors: dict[str, dict[str, Any]] = {}
  for key, p, m in zip(paths, p_leaves, m_leaves):
    w, mask = np.asarray(_value(p)), np.asarray(_value(m))
    name = "/".join(key)
    entry: dict[str, Any] = {"shape": list(w.shape), "dtype": str(w.dtype)}
    if not mask.ndim:
      entry.update(format="dense", values=w)
    else:
      keep = mask.astype(bool)
      nm = None
      if pruning is not None and pruning.m and key in pruning.weights:
        axis = group_axis(pruning.weights[key], w.ndim)
        groups = np.moveaxis(keep, axis, -1).reshape(-1, pruning.m)
        if groups.sum(axis=1).max(initial=0) <= pruning.n:
          nm = axis
      if nm is not None:
        n, m = pruning.n, pruning.m
        wg = np.moveaxis(w, nm, -1).reshape(-1, m)
        kg = np.moveaxis(keep, nm, -1).reshape(-1, m)
        # The kept positions first (stable), then pruned ones to fill a group that kept fewer than n (zeros).
        idx = np.argsort(~kg, axis=1, kind="stable")[:, :n]
        values = np.where(np.take_along_axis(kg, idx, axis=1), np.take_along_axis(wg, idx, axis=1), 0).astype(w.dtype)
        entry.update(format="n:m", n=n, m=m, axis=nm, values=values.reshape(-1),
                     index=_pack(idx, _index_bits(m)))
      else:
        entry.update(format="bitmap", values=w[keep], bitmap=np.packbits(keep.reshape(-1)))
    tensors[name] = entry
  stored = sum(sum(v.nbytes for v in e.values() if isinstance(v, np.ndarray)) for e in tensors.values())
  dense = sum(np.asarray(_value(p)).nbytes for p in p_leaves)
  if path is not None:
    np.savez(path, **{f"{name}/{k}": v for name, e in tensors.items() for k, v in e.items()
                      if isinstance(v, np.ndarray)})
  return {"tensors": tensors, "bytes": int(stored), "dense_bytes": int(dense), "ratio": stored / max(dense, 1)}


def densify(exported: dict[str, Any]) -> dict[str, np.ndarray]:
  """{name: dense array} back from `export_sparse` (pruned entries zero): the round trip is exact."""
  out = {}
  for name, e in exported["tensors"].items():
    shape, dtype = tuple(e["shape"]), np.dtype(e["dtype"])
    if e["format"] == "dense":
      out[name] = e["values"]
    elif e["format"] == "bitmap":
      keep = np.unpackbits(e["bitmap"])[:math.prod(shape)].astype(bool).reshape(shape)
      w = np.zeros(shape, dtype)
      w[keep] = e["values"]
      out[name] = w
    else:
      n, m, axis = e["n"], e["m"], e["axis"]
      moved = tuple(np.moveaxis(np.empty(shape, np.uint8), axis, -1).shape)
      groups = math.prod(shape) // m
      idx = _unpack(e["index"], _index_bits(m), groups * n).reshape(groups, n).astype(np.int64)
      wg = np.zeros((groups, m), dtype)
      np.put_along_axis(wg, idx, e["values"].reshape(groups, n), axis=1)
      out[name] = np.moveaxis(wg.reshape(moved), -1, axis)
  return out


def mask_leaves(model: nnx.Module, embeddings: bool = False) -> tuple[tuple[tuple[int, ...], tuple, bool], ...]:
  """(shape, logical axis names, pruned) of every parameter of `model` (which may be abstract), in state order.

  What wm.memory.estimate counts: a pruned parameter's mask is 1 byte per
  element sharded by these names, every other parameter's a 1-byte placeholder.
  """
  weights = prunable(quant.weight_axes(model), embeddings)
  out = []
  for path, var in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param), is_leaf=_is_leaf)[0]:
    shape = tuple(_value(var).shape)
    names = tuple(var.get_metadata().get("out_sharding") or ())
    out.append((shape, names if len(names) == len(shape) else (None,) * len(shape), quant.path_key(path) in weights))
  return tuple(out)
