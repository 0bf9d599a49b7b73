"""Parameter trees whose leaves are nnx.Variables (with sharding metadata) or plain arrays.

Optimizer wrappers receive either: an nnx.State of Variables inside the train
step, bare arrays in tests and exports. These read and rebuild a leaf the same
way in both cases, so a mask or an update keeps its parameter's logical axis
names (and so its sharding) when there are any.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from wm.compress import quant


def is_variable(x: Any) -> bool:
  """Whether `x` is an nnx.Variable: pass as `is_leaf` so tree functions stop at Variables."""
  return isinstance(x, nnx.Variable)


def value(leaf: Any) -> jax.Array:
  """The array a leaf holds (the leaf itself when it is already an array)."""
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def like(leaf: Any, new_value: jax.Array, **metadata) -> Any:
  """`new_value` in place of a parameter leaf; an nnx.Variable keeps its metadata (changed by `metadata`)."""
  return leaf.replace(new_value, **metadata) if isinstance(leaf, nnx.Variable) else new_value


def flatten(tree: Any) -> tuple[list[quant.Path], list[Any], Any]:
  """(paths as `quant.path_key` names, leaves, treedef) of `tree`, stopping at Variables."""
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
  return [quant.path_key(p) for p, _ in pairs], [x for _, x in pairs], treedef
