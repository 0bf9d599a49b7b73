"""Gradual magnitude pruning (Zhu & Gupta 2017), unstructured and N:M, as an optax wrapper with masks in its state.

    prune.py          the schedule, the optimizer wrapper, the sparsity it reports (this file)
    prune_masks.py    the masks: k smallest magnitudes per matrix, N:M candidates
    sparse_export.py  the compressed export where sparsity saves bytes

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

How the k smallest are found, and why masks only ever grow: wm.compress.prune_masks.

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
a compressed form, `sparse_export.export_sparse` (docs/compression.md, "Pruning").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from wm import config as config_lib
from wm.compress import leaves, prune_masks, quant

Path = quant.Path
METHODS = config_lib.PRUNE_METHODS


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
# The optimizer
# ---------------------------------------------------------------------------

class PruneState(NamedTuple):
  """count: updates applied (the next is step count + 1 of the schedule); masks: uint8 per parameter (module docstring); inner: the
  wrapped optimizer's state."""
  count: jax.Array
  masks: Any
  inner: Any


def _check_groups(path: Path, shape: tuple[int, ...], contracted: tuple[int, ...], pruning: Pruning) -> None:
  axis = prune_masks.group_axis(contracted, len(shape))
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
        return leaves.like(p, jnp.ones((), jnp.uint8), out_sharding=())
      if pruning.m:
        _check_groups(key, leaves.value(p).shape, pruning.weights[key], pruning)
      return leaves.like(p, jnp.ones(leaves.value(p).shape, jnp.uint8))

    masks = jax.tree_util.tree_map_with_path(mask, params, is_leaf=leaves.is_variable)
    return PruneState(jnp.zeros([], jnp.int32), masks, inner.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("pruning reads the weights: call update(grads, state, params)")
    paths, p_leaves, _ = leaves.flatten(params)
    _, m_leaves, m_treedef = leaves.flatten(state.masks)
    _, g_leaves, g_treedef = leaves.flatten(updates)
    pruned_at = [i for i, key in enumerate(paths) if key in pruning.weights]

    t = state.count + 1  # the step this update completes (module docstring)

    def recompute(values):
      s = sparsity_at(t, pruning)
      out = []
      for i, mask in zip(pruned_at, values):
        w = leaves.value(p_leaves[i])
        nm = None
        if pruning.m:
          nm = (prune_masks.group_axis(pruning.weights[paths[i]], w.ndim), pruning.n, pruning.m)
        out.append(prune_masks.new_mask(w, mask, s, prune_masks.matrix_axes(p_leaves[i]), nm))
      return out

    old = [leaves.value(m_leaves[i]) for i in pruned_at]
    fresh = jax.lax.cond(is_update_step(t, pruning), recompute, lambda values: values, old)
    m_leaves = list(m_leaves)
    for i, value in zip(pruned_at, fresh):
      m_leaves[i] = leaves.like(m_leaves[i], value)

    g_leaves = list(g_leaves)
    for i in pruned_at:
      g = leaves.value(g_leaves[i])
      g_leaves[i] = leaves.like(g_leaves[i], g * leaves.value(m_leaves[i]).astype(g.dtype))
    u, inner_state = inner.update(jax.tree.unflatten(g_treedef, g_leaves), state.inner, params)
    _, u_leaves, u_treedef = leaves.flatten(u)
    u_leaves = list(u_leaves)
    for i in pruned_at:
      u_value, w = leaves.value(u_leaves[i]), leaves.value(p_leaves[i])
      kept = leaves.value(m_leaves[i]) > 0
      u_leaves[i] = leaves.like(u_leaves[i], jnp.where(kept, u_value, -w.astype(u_value.dtype)))
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
  arrays = [leaves.value(x) for x in jax.tree.leaves(masks, is_leaf=leaves.is_variable) if leaves.value(x).ndim]
  if not arrays:
    return jnp.float32(0.0)
  # Counted in int32 per weight, so a fully dense model reports exactly 0 (1 - kept / total would round).
  pruned_count = sum((x.size - jnp.sum(x, dtype=jnp.int32)).astype(jnp.float32) for x in arrays)
  return pruned_count / float(sum(x.size for x in arrays))


def layer_sparsity(masks: Any) -> dict[str, jax.Array]:
  """{"path/of/weight": fraction pruned per matrix}: a float for a single matrix, an array shaped by the
  stack axes for a stacked weight (one value per layer, [components, layers] for separate mixture decoders).

  Jit it with replicated outputs (wm.evaluation does) to read it on every host; `.tolist()` gives JSON.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(masks, is_leaf=leaves.is_variable)[0]:
    value = leaves.value(leaf)
    if value.ndim:
      axes = prune_masks.matrix_axes(leaf)
      size = math.prod(value.shape[a] for a in axes)
      out["/".join(quant.path_key(path))] = (size - jnp.sum(value, axis=axes, dtype=jnp.int32)) / size
  return out


def mask_leaves(model: nnx.Module, embeddings: bool = False) -> tuple[tuple[tuple[int, ...], tuple, bool], ...]:
  """(shape, logical axis names, pruned) of every parameter of `model` (which may be abstract), in state order.

  What wm.memory.estimate counts: a pruned parameter's mask is 1 byte per
  element sharded by these names, every other parameter's a 1-byte placeholder.
  """
  weights = prunable(quant.weight_axes(model), embeddings)
  out = []
  for path, var in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param), is_leaf=leaves.is_variable)[0]:
    shape = tuple(leaves.value(var).shape)
    names = tuple(var.get_metadata().get("out_sharding") or ())
    out.append((shape, names if len(names) == len(shape) else (None,) * len(shape), quant.path_key(path) in weights))
  return tuple(out)
