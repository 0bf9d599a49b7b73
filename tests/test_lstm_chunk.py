"""The LSTM language model in time chunks (`remat.time_chunk`): same numbers, sqrt(T) memory.

`lstm.Model.loss` with k < T runs embedding, every layer, head and loss one
chunk of k steps at a time under one rematerialized scan (Chen et al. 2016).
Loss, metrics and parameter gradients must equal the unchunked model's to
float32 rounding, for every layer remat policy (the hand-written backward
runs inside the chunks under "none", autodiff of the cell under the others),
and the compiled train step's temporaries must fall from linear in T to
about sqrt(T).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wm  # noqa: F401  (turns off eager sharding before any model is built)
from wm import config as config_lib
from wm.memory import measure
from wm.models import layers as L
from wm.models import lstm, remat

VOCAB = 37
# LLVM at -O0: half the CPU compile time, the same HLO (tests/test_models.py).
FAST = {"xla_backend_optimization_level": 0}


def config(time_chunk=0, policy="none", length=16, layers=3, d=16, dtype="float32", dropout=0.0):
  c = config_lib.base_config()
  c.model.name = "lstm"
  c.data.vocab_size, c.data.seq_len = VOCAB, length
  c.model.d, c.model.layers, c.model.dropout = d, layers, dropout
  c.remat.policy, c.remat.time_chunk = policy, time_chunk
  c.precision.param_dtype = c.precision.compute_dtype = dtype
  return c


def batch(length, b=3, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (b, length + 1)).astype(np.int32)
  weights = rng.random((b, length)).astype(np.float32)
  weights[0, length // 2:] = 0.0  # a padded row: unscored positions must not count, in any chunk
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


@functools.lru_cache(maxsize=None)
def params(length, layers, d, dtype):
  """Initial parameters: remat and time chunks change no parameter, so every variant shares them."""
  make = lambda: nnx.split(lstm.Model(config(0, length=length, layers=layers, d=d, dtype=dtype),
                                      rngs=nnx.Rngs(0)), nnx.Param, ...)[1:]
  return jax.jit(make, compiler_options=FAST)()


def loss_and_grads(c, data, train=False, seed=0):
  """((loss, metrics), grads) of `lstm.Model(c).loss` with respect to the parameters."""
  graphdef = nnx.split(nnx.eval_shape(lambda: lstm.Model(c, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
  p, rest = params(c.data.seq_len, c.model.layers, c.model.d, c.precision.param_dtype)

  def loss(p, data):
    return nnx.merge(graphdef, p, rest).loss(data, train=train, rngs=nnx.Rngs(dropout=seed))

  return jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST)(p, data)


def assert_same(got, want, rtol=1e-5, atol=1e-6):
  (loss, metrics), grads = got
  (loss0, metrics0), grads0 = want
  np.testing.assert_allclose(loss, loss0, rtol=rtol)
  assert set(metrics) == set(metrics0) == {"loss", "nll", "accuracy", "weight"}
  for name in metrics0:
    np.testing.assert_allclose(metrics[name], metrics0[name], rtol=rtol, err_msg=name)
  # Relative to each gradient's largest entry: float32 sums over chunks round differently.
  for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
    scale = float(jnp.max(jnp.abs(g0.astype(jnp.float32)))) or 1.0
    np.testing.assert_allclose(np.asarray(g, np.float64) / scale, np.asarray(g0, np.float64) / scale,
                               rtol=rtol, atol=atol)


# "none" runs the hand-written backward (lstm_sequence) inside each chunk; the
# others differentiate the cell's scan under a layer remat nested in the chunk's.
@pytest.mark.parametrize("policy", ["none", "full", "save:h", "dots"])
@pytest.mark.parametrize("time_chunk", [4, -1])  # -1: sqrt(16) = 4 as well, resolved by the model
def test_chunked_loss_metrics_and_grads_equal_unchunked(policy, time_chunk):
  data = batch(16)
  want = loss_and_grads(config(0, policy), data)
  got = loss_and_grads(config(time_chunk, policy), data)
  assert_same(got, want)


@pytest.mark.parametrize("length,time_chunk,layers", [
    (13, -1, 2),   # a prime length: -1 resolves to k = 1, every step its own chunk
    (24, 8, 1),    # three chunks, one layer
    (16, 16, 2),   # k = T: one chunk, the unchunked path (no chunk scan)
])
def test_chunk_edge_cases_equal_unchunked(length, time_chunk, layers):
  data = batch(length, seed=1)
  want = loss_and_grads(config(0, length=length, layers=layers), data)
  got = loss_and_grads(config(time_chunk, length=length, layers=layers), data)
  assert_same(got, want)


def test_chunk_must_divide_the_length():
  # resolve_time_chunk has no ragged last chunk: k must divide T (config validation says so first).
  with pytest.raises(ValueError, match="must divide"):
    loss_and_grads(config(5, length=16), batch(16))


def test_chunked_bfloat16_equals_unchunked_to_bfloat16_rounding():
  data = batch(16)
  want = loss_and_grads(config(0, dtype="bfloat16"), data)
  got = loss_and_grads(config(4, dtype="bfloat16"), data)
  assert_same(got, want, rtol=5e-2, atol=5e-2)


def test_chunked_dropout_draws_one_key_per_chunk():
  """With dropout the masks differ from the unchunked path's: chunk i uses fold_in(key, i) (documented)."""
  c = config(4, dropout=0.3)
  data = batch(16)
  (loss, _), _ = loss_and_grads(c, data, train=True, seed=7)
  (again, _), _ = loss_and_grads(c, data, train=True, seed=7)
  (unchunked, _), _ = loss_and_grads(config(0, dropout=0.3), data, train=True, seed=7)
  assert loss == again  # deterministic in the key
  assert abs(float(loss) - float(unchunked)) > 1e-4  # other masks

  # Reference: the chunks run one by one in Python, each from the previous state, with its own key.
  graphdef = nnx.split(nnx.eval_shape(lambda: lstm.Model(c, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
  p, rest = params(16, 3, 16, "float32")

  @functools.partial(jax.jit, compiler_options=FAST)
  def by_hand(p, data):
    model = nnx.merge(graphdef, p, rest)
    key = nnx.Rngs(dropout=7).dropout()  # the key Model.loss draws
    state, sums = None, []
    for i in range(4):
      cols = slice(4 * i, 4 * i + 4)
      logits, state = model._forward(data["inputs"][:, cols], state, jax.random.fold_in(key, i), time_chunk=0)
      sums.append(L.lm_loss_sums(logits, data["targets"][:, cols], data["weights"][:, cols]))
    return L.lm_loss_from_sums(jax.tree.map(lambda *s: sum(s), *sums))[0]

  np.testing.assert_allclose(by_hand(p, data), loss, rtol=1e-6)


# ---------------------------------------------------------------------------
# Memory: the compiled train step (wm.memory.measure, what the planner and the experiments read)
# ---------------------------------------------------------------------------

def step_temp(length, time_chunk):
  """temp_size_in_bytes of the real train step (AdamW), d=32, 2 layers, batch 8, vocab 64."""
  c = config_lib.base_config()
  c.data.task, c.data.num_kv_pairs, c.data.vocab_size = "mqar", 2, 64
  c.data.seq_len, c.data.batch_size = length, 8
  c.model.name, c.model.d, c.model.layers = "lstm", 32, 2
  c.remat.time_chunk = time_chunk
  c.mesh.num_devices = 1
  return measure.compiled(config_lib.validate(c))["temp_size_in_bytes"]


def test_chunked_train_step_temporaries_grow_like_sqrt_t():
  lengths = [256, 1024, 4096]
  chunked = [step_temp(t, -1) for t in lengths]  # k = 16, 32, 64
  plain = [step_temp(t, 0) for t in lengths]
  slope = lambda temps: np.polyfit(np.log(lengths), np.log(temps), 1)[0]
  # Measured (CPU, jax 0.10.2): 0.73, 1.27, 2.32 MB chunked; 7.5, 30.8, 122.8 MB plain.
  assert chunked[1] < 0.1 * plain[1], (chunked, plain)
  assert slope(plain) > 0.95, plain
  # Carries (T/k) plus one chunk (k) grow as sqrt(T); the gradients and the
  # optimizer update do not grow at all, which pulls the whole step's slope
  # below 0.5 (0.41 here; the larger the parameters next to b * d * sqrt(T),
  # the lower: docs/experiments.md, remat).
  assert 0.3 <= slope(chunked) <= 0.6, chunked
