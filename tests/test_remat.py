"""Remat policies change memory, never numbers.

For each family and policy: loss and gradients equal the no-remat ones, and
the compiled gradient step's temp bytes (`memory_analysis()`, what remat
changes; DESIGN.md) move the way the policy says. Shapes are moderate (4
layers, d=64, T=128) because on tiny shapes XLA's scheduling can hide the
difference between policies.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import wm  # noqa: F401
from wm.config import base_config
from wm.models import lstm, remat, transformer

FAMILIES = {"transformer": transformer, "lstm": lstm}
POLICIES = {
    "transformer": ["full", "dots", "dots_no_batch", "save:mlp_hidden", "offload:qkv"],
    "lstm": ["full", "dots", "dots_no_batch", "save:h", "offload:gates"],
}


# Without layer remat the LSTM runs its hand-written backward (lstm.lstm_sequence),
# which keeps 6 d floats per step (post-activation gates, c, h); autodiff under
# `dots` keeps both matmul outputs (x W_x and h W_h, 8 d) and under
# `offload:gates` (= save:gates on CPU) the pre-activation gates plus what the
# recomputation needs, so these policies are for the autodiff path only and
# keep more than no remat (measured here: none 5.6 MB, dots 8.3, offload:gates
# 5.7, save:h 4.8, full 4.1).
KEEPS_MORE_THAN_NONE = {"lstm": ("dots", "dots_no_batch", "offload:gates")}


def config(name: str, policy: str = "none", time_chunk: int = 0, seq_len: int = 128, **model):
  c = base_config()
  c.model.name = name
  c.data.vocab_size, c.data.seq_len = 64, seq_len
  c.model.d, c.model.layers, c.model.heads, c.model.kv_heads, c.model.mlp_ratio = 64, 4, 4, 4, 4
  c.remat.policy, c.remat.time_chunk = policy, time_chunk
  for k, v in model.items():
    c.model[k] = v
  return c


def batch(b: int, t: int, vocab: int = 64):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((b, t), np.float32)}


# LLVM at -O0 halves CPU compile time; buffer assignment (what temp bytes
# measure) happens before LLVM and is unchanged.
FAST = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def params_of(name: str, **model):
  """Initial (params, rest): policy-independent, remat changes no parameter."""
  c = config(name, **model)
  make = lambda: nnx.split(FAMILIES[name].Model(c, rngs=nnx.Rngs(0)), nnx.Param, ...)[1:]
  return jax.jit(make, compiler_options=FAST)()


def compiled_grad(name: str, policy: str, time_chunk: int = 0, seq_len: int = 128, b: int = 4, **model):
  """(compiled value_and_grad of the loss wrt parameters, its arguments) for a policy."""
  c = config(name, policy, time_chunk, seq_len, **model)
  # The graph (which carries the policy) without running an init.
  graphdef = nnx.split(nnx.eval_shape(lambda: FAMILIES[name].Model(c, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
  params, rest = params_of(name, **model)

  def loss(params, batch):
    return nnx.merge(graphdef, params, rest).loss(batch, train=False)[0]

  args = (params, batch(b, c.data.seq_len))
  return jax.jit(jax.value_and_grad(loss)).lower(*args).compile(FAST), args


def temp_bytes(compiled) -> int:
  return compiled.memory_analysis().temp_size_in_bytes


@functools.lru_cache(maxsize=None)
def run(name: str, policy: str):
  """(loss, grads) and compiled temp bytes of one policy (each compiled once per session)."""
  compiled, args = compiled_grad(name, policy)
  return compiled(*args), temp_bytes(compiled)


@pytest.mark.parametrize("name,policy", [(n, p) for n in FAMILIES for p in POLICIES[n]])
def test_policy_keeps_numbers_and_changes_memory(name, policy):
  (loss0, grads0), none = run(name, "none")
  (loss, grads), temp = run(name, policy)
  np.testing.assert_allclose(loss, loss0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads0)
  # A policy that changes nothing is a bug (DESIGN.md). Saving some tensors
  # sits between saving nothing (full) and saving everything (none); measured
  # on CPU XLA at these shapes, e.g. Transformer none 33.0 MB, dots 14.8,
  # dots_no_batch 10.1, offload:qkv 9.2, save:mlp_hidden 7.9, full 7.6.
  if policy in KEEPS_MORE_THAN_NONE.get(name, ()):
    assert temp > none, f"{name} {policy}: expected more than the hand-written backward's {none} bytes, got {temp}"
  else:
    assert temp < none, f"{name} {policy}: temp {temp} bytes, no remat {none}: the policy saved nothing"
  if policy != "full":
    full = run(name, "full")[1]
    assert full < temp, f"{name} {policy}: temp {temp} bytes <= full remat's {full}"


def test_dots_no_batch_recomputes_attention_einsums():
  # dots keeps attention's batched score and context einsums, dots_no_batch only weight matmuls.
  assert run("transformer", "dots_no_batch")[1] < run("transformer", "dots")[1]


@pytest.mark.parametrize("name", FAMILIES)
def test_unknown_tag_or_policy_raises(name):
  module = FAMILIES[name]
  with pytest.raises(ValueError, match=r"unknown tag.*'nope'.*" + sorted(module.Model.REMAT_TAGS)[0]):
    remat.checkpoint_policy("save:nope", module.Model.REMAT_TAGS)
  with pytest.raises(ValueError, match="nope"):
    nnx.eval_shape(lambda: module.Model(config(name, "offload:nope"), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="unknown remat policy"):
    remat.checkpoint_policy("most", module.Model.REMAT_TAGS)


def test_checkpoint_policy_resolution():
  tags = frozenset({"qkv", "mlp_hidden"})
  cp = jax.checkpoint_policies
  assert remat.checkpoint_policy("none", tags) is None
  assert remat.checkpoint_policy("full", tags) is cp.nothing_saveable
  assert remat.checkpoint_policy("dots", tags) is cp.checkpoint_dots
  assert remat.checkpoint_policy("dots_no_batch", tags) is cp.dots_with_no_batch_dims_saveable
  assert callable(remat.checkpoint_policy("save:qkv, mlp_hidden", tags))
  assert callable(remat.checkpoint_policy("offload:qkv", tags))
  assert set(transformer.Model.REMAT_TAGS) | set(lstm.Model.REMAT_TAGS) <= set(remat.TAGS)


def test_time_chunked_lstm_saves_sqrt_t_memory():
  # T=512: the plain scan keeps every step's residuals; chunks of 16 steps
  # (the divisor nearest sqrt(T)) run the whole model (embedding to loss)
  # and keep 32 boundary carries plus, in the backward pass, one chunk's
  # residuals (Chen et al. 2016); no [T, ...] tensor is left. Measured:
  # 10.2 MB plain, 0.77 MB chunked.
  results = {}
  for chunk in (0, -1):
    compiled, args = compiled_grad("lstm", "none", chunk, seq_len=512, b=2, d=128, layers=1)
    results[chunk] = compiled(*args), temp_bytes(compiled)
  ((l0, g0), plain), ((l1, g1), chunked) = results[0], results[-1]
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)
  assert chunked < 0.15 * plain, (chunked, plain)
