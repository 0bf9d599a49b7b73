"""The LSTM recurrence: one cell step, and the time scan with a hand-written backward pass.

The cell is the standard LSTM (Hochreiter & Schmidhuber 1997, with the forget
gate of Gers et al. 2000), gates ordered i, f, g, o:

    [i, f, g, o] = x_t W_x + h_{t-1} W_h + b
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(c_t)

x_t W_x + b does not depend on the recurrence, so the layer (wm/models/lstm.py)
computes it as one big matmul over all time steps before the scan; only h W_h
runs inside the scan, here.

Without layer remat, the gradient of the time scan is written by hand
(`lstm_sequence`, a custom VJP, as cuDNN's and oneDNN's fused LSTMs do): the
backward scan emits the gate gradients of every step, and the recurrent
weight gradient dW_h = sum_t h_{t-1}^T dgates_t is one [d, T*b] x [T*b, 4d]
matmul after it. Autodiff of the scan instead accumulates a [d, 4d] partial
product per step inside the loop (a small matmul plus a 4*d*d add per step);
the hand-written backward trained the 2-layer d=512 LSTM about 1.5x faster
on CPU (docs/performance.md).
"""

from __future__ import annotations

import functools

import jax
import jax.ad_checkpoint
import jax.numpy as jnp

from wm.typing import Array, Float


def lstm_cell(params: dict[str, jax.Array], carry: tuple[Float[Array, "b d"], Float[Array, "b d"]],
              x_proj: Float[Array, "b 4*d"]) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """One LSTM step; scan-shaped: returns ((h', c'), h').

  Args:
    params: {"w_h": [d, 4d]} recurrent kernel (cast to h's dtype for the matmul).
    carry: (h [b, d], c [b, d]).
    x_proj: x_t W_x + b, [b, 4d], precomputed for all steps.
  """
  h, c = carry
  gates = x_proj.astype(jnp.float32) + jnp.dot(h, params["w_h"].astype(h.dtype),
                                               preferred_element_type=jnp.float32)
  gates = jax.ad_checkpoint.checkpoint_name(gates, "gates")
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  c_new = jax.nn.sigmoid(f) * c.astype(jnp.float32) + jax.nn.sigmoid(i) * jnp.tanh(g)
  h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
  h_new = jax.ad_checkpoint.checkpoint_name(h_new.astype(h.dtype), "h")
  c_new = jax.ad_checkpoint.checkpoint_name(c_new.astype(c.dtype), "c")
  return (h_new, c_new), h_new


def _gate_activations(gates: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


@jax.custom_vjp
def lstm_sequence(w_h: jax.Array, carry: tuple[Float[Array, "b d"], Float[Array, "b d"]],
                  x_proj: Float[Array, "t b 4*d"]) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """`lax.scan(lstm_cell, carry, x_proj)` over time, with a hand-written backward pass.

  Same values as the scan of `lstm_cell`; the VJP keeps the post-activation
  gates and the float32 cell states of every step (what autodiff keeps too)
  and computes the recurrent weight gradient as one matmul after the
  backward scan (see the module docstring).

  Args:
    w_h: [d, 4d] recurrent kernel in the compute dtype.
    carry: (h [b, d], c [b, d]).
    x_proj: x_t W_x + b for every step, time-major [t, b, 4d].

  Returns:
    ((h_T, c_T), hs [t, b, d]).
  """
  return jax.lax.scan(functools.partial(lstm_cell, {"w_h": w_h}), carry, x_proj)


def _lstm_sequence_fwd(w_h, carry, x_proj):
  h0, c0 = carry

  def step(carry, xp):
    h, c = carry
    gates = xp.astype(jnp.float32) + jnp.dot(h, w_h.astype(h.dtype), preferred_element_type=jnp.float32)
    i, f, g, o = _gate_activations(gates)
    c32 = f * c.astype(jnp.float32) + i * g
    h_new = (o * jnp.tanh(c32)).astype(h.dtype)
    return (h_new, c32.astype(c.dtype)), (h_new, jnp.concatenate([i, f, g, o], axis=-1), c32)

  (h, c), (hs, acts, cs32) = jax.lax.scan(step, (h0, c0), x_proj)
  return ((h, c), hs), (w_h, h0, c0, hs, acts, cs32)


def _lstm_sequence_bwd(res, cotangents):
  w_h, h0, c0, hs, acts, cs32 = res
  (d_h_last, d_c_last), d_hs = cotangents
  # c_{t-1} as the forward read it: the carried (compute dtype) cell state.
  c_prev = jnp.concatenate([c0[None], cs32[:-1].astype(c0.dtype)]).astype(jnp.float32)
  w_t = w_h.astype(h0.dtype).T

  def step(carry, xs):
    dh, dc = carry
    dy, a, c32, cp = xs
    i, f, g, o = jnp.split(a, 4, axis=-1)
    dh = dh + dy.astype(jnp.float32)
    tc = jnp.tanh(c32)
    dc = dc + dh * o * (1.0 - tc * tc)
    # d(pre-activation) of each gate: sigmoid' = s (1 - s), tanh' = 1 - tanh^2.
    dgates = jnp.concatenate([dc * g * i * (1.0 - i), dc * cp * f * (1.0 - f), dc * i * (1.0 - g * g),
                              dh * tc * o * (1.0 - o)], axis=-1)
    dh_prev = jnp.dot(dgates.astype(h0.dtype), w_t, preferred_element_type=jnp.float32)
    return (dh_prev, dc * f), dgates

  init = (d_h_last.astype(jnp.float32), d_c_last.astype(jnp.float32))
  (dh0, dc0), dgates = jax.lax.scan(step, init, (d_hs, acts, cs32, c_prev), reverse=True)
  h_prev = jnp.concatenate([h0[None], hs[:-1]])
  d_w = jnp.einsum("tbd,tbg->dg", h_prev, dgates.astype(h0.dtype), preferred_element_type=jnp.float32)
  # x_proj comes from a Dense in the compute dtype, the dtype of h.
  return d_w.astype(w_h.dtype), (dh0.astype(h0.dtype), dc0.astype(c0.dtype)), dgates.astype(h0.dtype)


lstm_sequence.defvjp(_lstm_sequence_fwd, _lstm_sequence_bwd)
