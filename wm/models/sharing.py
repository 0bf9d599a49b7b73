"""Cross-layer parameter sharing (Lan et al. 2020, ALBERT): one set of weights for several consecutive layers.

With `model.share_layers = g` a stack of L layers stores L/g weight sets
(stacked on the leading "layers" axis, as unshared stacks store L), and layer
i applies set i // g. Parameters, their gradients and optimizer state shrink
g-fold; activations do not (every application keeps its own for the backward
pass), nor does compute.

How it runs: an nnx.scan over the L/g sets (the stacked module sliced per
set, as the unshared stacks scan over layers) whose body is a lax.scan of the
g applications of that set. The set's variables enter the inner scan as a
closed-over constant, so JAX's transpose of the scan sums the g per-application
gradients into one: the gradient of a shared weight is the sum of the
gradients its applications would have as separate layers (tests/test_levers.py
checks this against tied copies). Each application is its own remat block
under the stack's policy, as each layer is without sharing.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from wm.models import remat as R


def layer_view(stacked: nnx.Module, i: int, share: int) -> nnx.Module:
  """Layer i of a stack as a standalone module: a view of weight set i // share of `stacked`."""
  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i // share], state))


def apply_shared(body: Callable[..., tuple[Any, Any]], carry: Any, stacked: nnx.Module, xs: tuple, *, share: int,
                 remat_policy: str, tags: frozenset[str]) -> tuple[Any, Any]:
  """Applies `sets * share` layers in order; layer i uses weight set i // share of `stacked`.

  Args:
    body: (carry, module, *xs_i) -> (carry, ys_i), one layer.
    carry: what flows from layer to layer (the hidden sequence).
    stacked: a module whose variables have a leading axis of `sets` weight sets.
    xs: per-layer inputs, each [sets * share, ...], or None (not scanned).
    share: applications of each set (config.model.share_layers).
    remat_policy: the remat policy of one application ("none": no remat).
    tags: the checkpoint names the body emits (the model's REMAT_TAGS).

  Returns:
    (final carry, ys stacked over all layers [sets * share, ...]).
  """
  xs = tuple(None if x is None else jax.tree.map(lambda a: a.reshape((-1, share) + a.shape[1:]), x) for x in xs)
  policy = R.checkpoint_policy(remat_policy, tags)

  def per_set(carry, module, *xs_set):
    # The set's variables as plain arrays: each application merges its own
    # module from them inside its own trace. nnx.remat around a module merged
    # inside the inner scan refuses it ("Cannot mutate Param from a different
    # trace level"), so the remat is jax.checkpoint of a pure function of the
    # arrays, with the policy nnx.remat would get (wm.models.remat).
    graphdef, state = nnx.split(module)

    def layer(carry, state, xs_i):
      return body(carry, nnx.merge(graphdef, state), *xs_i)

    if remat_policy != "none":
      # Under a scan the recomputation cannot merge with the forward pass, so prevent_cse is not needed.
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
    return jax.lax.scan(lambda carry, xs_i: layer(carry, state, xs_i), carry, xs_set, length=share)

  scan = nnx.scan(per_set, in_axes=(nnx.Carry, 0) + tuple(None if x is None else 0 for x in xs),
                  out_axes=(nnx.Carry, 0), transform_metadata={nnx.PARTITION_NAME: "layers"})
  carry, ys = scan(carry, stacked, *xs)
  return carry, jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), ys)
