"""Rematerialization: policy names -> jax.checkpoint policies, and chunked time scans.

`config.remat.policy` names what a block keeps for the backward pass:

    none            no remat: every residual the backward pass needs is kept
    full            keep only block inputs; recompute the block (nothing_saveable)
    dots            keep every matmul output (checkpoint_dots)
    dots_no_batch   keep matmuls without batch dims, i.e. weight matmuls
                    (dots_with_no_batch_dims_saveable): projections are kept,
                    attention's batched score/context einsums are recomputed
    save:a,b        keep only the tensors tagged a, b (save_only_these_names)
    offload:a,b     move the tensors tagged a, b to pinned host memory and
                    recompute the rest (save_and_offload_only_these_names);
                    on CPU there is no host memory space and it acts like save

Blocks tag tensors with `jax.ad_checkpoint.checkpoint_name`; each model class
lists its tags in `REMAT_TAGS`, and naming a tag a model does not have is an
error (a policy that silently saves nothing would look like "full").

Remat blocks belong inside a scan over layers, not a Python loop: in a loop
nothing ties a block's recomputation to the arrival of its output gradient,
and XLA (CPU, measured) schedules all of them early, so temp memory did not
move at all (a 4-layer LSTM: 10.2 MB with and without "full"; 4.0 MB under
a scan).

Over time (recurrent models), `chunked_time_scan` is Chen et al. 2016's
sqrt(n) checkpointing: a scan of T steps split into T/k chunks, each under
`jax.checkpoint`, keeps only the T/k carries at chunk boundaries plus, during
the backward pass of one chunk, that chunk's k steps of residuals. With
k ~ sqrt(T) both terms are ~sqrt(T), at the price of one extra forward pass.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.ad_checkpoint  # noqa: F401  (checkpoint_name lives here; needs the explicit import)
from flax import nnx

# Every tag used by a model in wm.models, and what it holds. A model's
# REMAT_TAGS is the subset it actually emits.
TAGS = {
    # Transformer (transformer.py)
    "qkv": "query, key and value projections after rotary embedding [b, t, heads|kv_heads, head_dim]",
    "attn_context": "softmax(qk^T) v before the output projection [b, t, heads, head_dim]",
    "attn_out": "attention output projection [b, t, d]",
    "mlp_hidden": "MLP pre-activation [b, t, mlp_ratio * d]",
    # LSTM (lstm.py), per time step
    "gates": "LSTM gate pre-activations x W_x + h W_h + b [b, 4d]",
    "h": "LSTM hidden state [b, d]",
    "c": "LSTM cell state [b, d]",
}

POLICIES = ("none", "full", "dots", "dots_no_batch", "save:<tags>", "offload:<tags>")


def _names(policy_name: str, known_tags: set[str] | frozenset[str]) -> list[str]:
  names = [n.strip() for n in policy_name.split(":", 1)[1].split(",") if n.strip()]
  if not names:
    raise ValueError(f"remat policy {policy_name!r} names no tensors; known tags: {sorted(known_tags)}")
  unknown = [n for n in names if n not in known_tags]
  if unknown:
    raise ValueError(f"remat policy {policy_name!r}: unknown tag(s) {unknown}; "
                     f"this model tags {sorted(known_tags)}")
  return names


def checkpoint_policy(name: str, known_tags: set[str] | frozenset[str]) -> Callable[..., Any] | None:
  """Resolves a `config.remat.policy` string to a jax.checkpoint policy.

  Args:
    name: one of none, full, dots, dots_no_batch, save:<tags>, offload:<tags>.
    known_tags: the checkpoint names the model emits (its REMAT_TAGS).

  Returns:
    None for "none" (no remat at all), otherwise a policy for
    jax.checkpoint / nnx.remat.

  Raises:
    ValueError: an unknown policy, or a tag not in known_tags.
  """
  cp = jax.checkpoint_policies
  fixed = {"none": None, "full": cp.nothing_saveable, "dots": cp.checkpoint_dots,
           "dots_no_batch": cp.dots_with_no_batch_dims_saveable}
  if name in fixed:
    return fixed[name]
  base = name.split(":", 1)[0]
  if base == "save" and ":" in name:
    return cp.save_only_these_names(*_names(name, known_tags))
  if base == "offload" and ":" in name:
    return cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=_names(name, known_tags),
        offload_src="device", offload_dst="pinned_host")
  raise ValueError(f"unknown remat policy {name!r}; expected one of {', '.join(POLICIES)}")


def remat_block(fn: Callable, policy_name: str, known_tags: set[str] | frozenset[str], *,
                prevent_cse: bool = True) -> Callable:
  """Wraps `fn` (which may take nnx Modules) in nnx.remat with the named policy.

  "none" returns `fn` unchanged. `prevent_cse=False` is safe (and faster) when
  the block is the body of a scan, which already keeps XLA from merging the
  recomputation with the forward pass (see jax.checkpoint's docs).
  """
  policy = checkpoint_policy(policy_name, known_tags)
  if policy_name == "none":
    return fn
  return nnx.remat(fn, policy=policy, prevent_cse=prevent_cse)


def resolve_time_chunk(time_chunk: int, length: int) -> int:
  """config.remat.time_chunk -> steps per chunk for a sequence of `length` (0 = no chunking).

  -1 picks the divisor of `length` nearest sqrt(length) (ties go to the
  smaller), the memory-optimal chunk of Chen et al. 2016.
  """
  if time_chunk == 0:
    return 0
  if time_chunk == -1:
    root = math.sqrt(length)
    divisors = [k for k in range(1, length + 1) if length % k == 0]
    return min(divisors, key=lambda k: (abs(k - root), k))
  if time_chunk < -1:
    raise ValueError(f"time_chunk={time_chunk}: expected -1 (sqrt(T)), 0 (off) or a positive chunk length")
  if length % time_chunk:
    raise ValueError(f"time_chunk={time_chunk} must divide the sequence length {length}")
  return time_chunk


def chunked_time_scan(cell_fn: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: Any, chunk: int,
                      *, policy: Callable[..., Any] | None = None) -> tuple[Any, Any]:
  """`lax.scan(cell_fn, carry, xs)` over the leading (time) axis, rematerialized per chunk.

  Args:
    cell_fn: (carry, x_t) -> (carry, y_t).
    carry: initial carry.
    xs: pytree of [T, ...] inputs.
    chunk: steps per checkpointed chunk; 0 = plain lax.scan, -1 = nearest
      divisor of T to sqrt(T), otherwise must divide T.
    policy: what a chunk may keep besides its input carry (default: nothing).

  Returns:
    (final carry, ys stacked over time), equal to the plain scan's.
  """
  length = jax.tree.leaves(xs)[0].shape[0]
  chunk = resolve_time_chunk(chunk, length)
  if chunk == 0:
    return jax.lax.scan(cell_fn, carry, xs)
  n = length // chunk
  chunked = jax.tree.map(lambda x: x.reshape((n, chunk) + x.shape[1:]), xs)

  # Only the carry entering each chunk is saved by the outer scan; the inner
  # scan's per-step residuals are recomputed during that chunk's backward pass.
  def run_chunk(c, x_chunk):
    return jax.lax.scan(cell_fn, c, x_chunk)

  run_chunk = jax.checkpoint(run_chunk, policy=policy or jax.checkpoint_policies.nothing_saveable,
                             prevent_cse=False)  # the outer scan already blocks CSE
  carry, ys = jax.lax.scan(run_chunk, carry, chunked)
  return carry, jax.tree.map(lambda y: y.reshape((length,) + y.shape[2:]), ys)
