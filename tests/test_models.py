"""LSTM and Transformer against references: NumPy equations, Python loops, full forwards."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import wm  # noqa: F401  (turns off eager sharding before any model is built)
from wm.config import base_config
from wm.models import layers as L
from wm.models import lstm, lstm_cell, remat, transformer

DTYPES = ["float32", "bfloat16"]
# bfloat16 keeps 8 mantissa bits: ~0.4% relative error per rounding.
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=5e-2, atol=5e-2)}
LOGICAL_NAMES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "gates", "layers"}


def config(name="transformer", dtype="float32", **model):
  c = base_config()
  c.model.name = name
  c.data.vocab_size = 37
  c.data.seq_len = 16
  c.model.d, c.model.layers, c.model.heads, c.model.kv_heads, c.model.mlp_ratio = 16, 2, 4, 2, 2
  c.precision.param_dtype = c.precision.compute_dtype = dtype
  for k, v in model.items():
    c.model[k] = v
  return c


# Tests compile with LLVM at -O0: half the CPU compile time of the default,
# the same HLO (so the same buffers and the same math up to float rounding).
FAST = {"xla_backend_optimization_level": 0}


def jit(fn):
  """jax.jit of fn(module, *args), the module passed as (static graph, state)."""
  @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
  def run(graphdef, state, *args):
    return fn(nnx.merge(graphdef, state), *args)

  return lambda module, *args: run(*nnx.split(module), *args)


_INITIAL_STATES = {}


def init(make):
  """make() with its parameter init compiled once (eagerly, every draw compiles alone).

  Every `make` here seeds nnx.Rngs(0), and static settings (window, dropout,
  remat, time chunk) change no parameter, so modules whose state has the same
  structure, shapes and dtypes share one initial state.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  leaves, treedef = jax.tree.flatten(abstract)
  key = (treedef, tuple((x.shape, str(x.dtype)) for x in leaves))
  if key not in _INITIAL_STATES:
    _INITIAL_STATES[key] = jax.jit(lambda: nnx.state(make()), compiler_options=FAST)()
  return nnx.merge(graphdef, _INITIAL_STATES[key])


@functools.lru_cache(maxsize=None)
def _build(name, dtype, items):
  module = {"lstm": lstm, "transformer": transformer}[name]
  return init(lambda: module.Model(config(name, dtype, **dict(items)), rngs=nnx.Rngs(0)))


def build(name="transformer", dtype="float32", **model):
  """A model of `config(...)`, built once per distinct config (tests only read it)."""
  return _build(name, dtype, tuple(sorted(model.items())))


def tokens(b=2, t=16, vocab=37, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


# Every model call is jitted: eager op-by-op dispatch compiles each small op
# separately and is far slower than one compile of the whole function.
forward = jit(lambda model, tok: model(tok))
forward_loop = jit(lambda model, tok: model(tok, use_scan=False))
decode = jit(lambda model, tok, state: model.decode_step(tok, state))
forward_loss = jit(lambda model, batch: model.loss(batch, train=False)[0])
attention = jax.jit(transformer.attention, static_argnames="window", compiler_options=FAST)


def normal(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_lstm(x, w_x, b, w_h, h, c):
  """Textbook LSTM (Hochreiter & Schmidhuber 1997; Gers et al. 2000), gates i, f, g, o, float64."""
  d = h.shape[-1]
  ys = []
  for t in range(x.shape[1]):
    z = x[:, t] @ w_x + b + h @ w_h
    i, f, g, o = (z[:, k * d:(k + 1) * d] for k in range(4))
    c = np_sigmoid(f) * c + np_sigmoid(i) * np.tanh(g)
    h = np_sigmoid(o) * np.tanh(c)
    ys.append(h)
  return np.stack(ys, 1), h, c


def f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# ----------------------------------------------------------------------------- layers


def test_lm_loss_matches_numpy():
  logits = normal(0, 2, 5, 7) * 3
  targets = np.random.default_rng(1).integers(0, 7, (2, 5))
  weights = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
  lm_loss = jax.jit(L.lm_loss, compiler_options=FAST)
  loss, metrics = lm_loss(logits, targets, weights)
  lg, tg, w = f64(logits), np.asarray(targets), f64(weights)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  xent = -np.take_along_axis(logp, tg[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, (w * xent).sum() / w.sum(), rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], (w * (lg.argmax(-1) == tg)).sum() / w.sum(), rtol=1e-6)
  assert metrics["nll"] == metrics["loss"] == loss and metrics["weight"] == 7
  # No scored tokens: loss 0, not NaN.
  assert lm_loss(logits, targets, np.zeros_like(weights))[0] == 0


def test_rope_preserves_norm_and_depends_on_relative_position():
  q, k = normal(0, 1, 1, 2, 8), normal(1, 1, 1, 2, 8)
  rope = jax.jit(L.rope, compiler_options=FAST)
  rot = lambda x, p: np.asarray(rope(x, np.array([[p]])), np.float64)
  np.testing.assert_allclose(np.linalg.norm(rot(q, 5)), np.linalg.norm(q), rtol=1e-5)
  dot = lambda pq, pk: np.sum(rot(q, pq) * rot(k, pk))
  np.testing.assert_allclose(dot(7, 3), dot(14, 10), rtol=1e-4)
  assert not np.isclose(dot(7, 3), dot(7, 4))


# ----------------------------------------------------------------------------- LSTM


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_layer_matches_textbook_equations(dtype):
  d_in, d, b, t = 5, 8, 3, 7
  dt = L.dtype_of(dtype)
  layer = init(lambda: lstm.LSTMLayer(d_in, d, forget_bias=1.0, param_dtype=jnp.float32, dtype=dt,
                                     rngs=nnx.Rngs(0)))
  bias = f64(layer.w_x.bias[...])
  np.testing.assert_array_equal(bias[d:2 * d], 1.0)  # forget gate starts at forget_bias
  np.testing.assert_array_equal(np.delete(bias, np.s_[d:2 * d]), 0.0)
  x, h0, c0 = normal(0, b, t, d_in), 0.5 * normal(1, b, d), 0.5 * normal(2, b, d)
  y, (h, c) = jit(lambda m, *a: m(*a))(layer, x, h0.astype(dt), c0.astype(dt))
  ref_y, ref_h, ref_c = np_lstm(f64(x), f64(layer.w_x.kernel[...]), bias, f64(layer.w_h[...]), f64(h0), f64(c0))
  for got, want in ((y, ref_y), (h, ref_h), (c, ref_c)):
    assert got.dtype == dt
    np.testing.assert_allclose(f64(got), want, **TOL[dtype])
  # The pure cell alone, one step.
  (h1, c1), out = jit(lambda m, h, c, x: lstm_cell.lstm_cell(m.cell_params(), (h, c), m.w_x(x)))(
      layer, h0.astype(dt), c0.astype(dt), x[:, 0])
  _, ref_h1, ref_c1 = np_lstm(f64(x[:, :1]), f64(layer.w_x.kernel[...]), bias, f64(layer.w_h[...]), f64(h0), f64(c0))
  np.testing.assert_allclose(f64(h1), ref_h1, **TOL[dtype])
  np.testing.assert_allclose(f64(c1), ref_c1, **TOL[dtype])
  np.testing.assert_array_equal(out, h1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_stack_scan_equals_step_loop(dtype):
  # d_in != d: layer 0 stands alone, layers 1-2 run under the scan over layers.
  stack = init(lambda: lstm.LSTMStack(5, 8, 3, dtype=L.dtype_of(dtype), rngs=nnx.Rngs(0)))
  x = normal(0, 2, 9, 5)
  state0 = [(0.5 * normal(1 + i, 2, 8), 0.5 * normal(4 + i, 2, 8)) for i in range(3)]
  y, final = jit(lambda m, x, s: m(x, s))(stack, x, state0)
  step = jit(lambda m, x, s: m.step(x, s))
  state, ys = state0, []
  for t in range(x.shape[1]):
    out, state = step(stack, x[:, t], state)
    ys.append(out)
  np.testing.assert_allclose(f64(y), f64(jnp.stack(ys, 1)), **TOL[dtype])
  for (h, c), (h2, c2) in zip(final, state):
    np.testing.assert_allclose(f64(h), f64(h2), **TOL[dtype])
    np.testing.assert_allclose(f64(c), f64(c2), **TOL[dtype])


@pytest.mark.parametrize("policy", ["none", "save:h"])  # the hand-written backward, and autodiff of the scan
def test_lstm_time_chunked_scan_equals_plain_scan(policy):
  x = normal(0, 2, 16, 5)

  def run(time_chunk):  # -1: chunks of 4 = sqrt(16) steps
    stack = init(lambda: lstm.LSTMStack(5, 8, 3, time_chunk=time_chunk, remat_policy=policy, rngs=nnx.Rngs(0)))

    def loss(stack, x):
      y, final = stack(x)
      return jnp.sum(y ** 2) + jnp.sum(final[-1][1])

    return jit(lambda stack, x: nnx.value_and_grad(loss, argnums=(0, 1))(stack, x))(stack, x)

  (v0, (g0, gx0)), (v1, (g1, gx1)) = run(0), run(-1)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  np.testing.assert_allclose(gx1, gx0, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), nnx.state(g1), nnx.state(g0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_hand_written_backward_equals_autodiff(dtype):
  """lstm_sequence's VJP against jax.grad of the plain scan of lstm_cell, every input and the final carry."""
  dt = L.dtype_of(dtype)
  b, t, d = 3, 11, 8
  w_h = jnp.asarray(normal(0, d, 4 * d) / math.sqrt(d), dt)
  h0, c0 = jnp.asarray(0.5 * normal(1, b, d), dt), jnp.asarray(0.5 * normal(2, b, d), dt)
  x_proj = jnp.asarray(normal(3, t, b, 4 * d), dt)
  dy, dh, dc = normal(4, t, b, d), normal(5, b, d), normal(6, b, d)

  def loss(seq_fn, w_h, h0, c0, x_proj):
    # Cotangents on the outputs and on both parts of the final carry.
    (h, c), ys = seq_fn(w_h, (h0, c0), x_proj)
    f32 = lambda a: a.astype(jnp.float32)
    return jnp.sum(f32(ys) * dy) + jnp.sum(f32(h) * dh) + jnp.sum(f32(c) * dc)

  autodiff = lambda w, carry, xp: jax.lax.scan(functools.partial(lstm_cell.lstm_cell, {"w_h": w}), carry, xp)
  grads = [jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3)),
                   compiler_options=FAST)(w_h, h0, c0, x_proj) for fn in (lstm_cell.lstm_sequence, autodiff)]
  (v_hand, g_hand), (v_auto, g_auto) = grads
  np.testing.assert_allclose(f64(v_hand), f64(v_auto), **TOL[dtype])
  for got, want in zip(g_hand, g_auto):
    assert got.dtype == want.dtype
    # bfloat16: the hand-written backward keeps dh and dc in float32 across
    # steps where autodiff rounds them to bfloat16 at every step.
    scale = np.max(np.abs(f64(want)))
    np.testing.assert_allclose(f64(got) / scale, f64(want) / scale, **TOL[dtype])


def test_gelu_matches_jax_nn_gelu_and_its_gradient():
  x = jnp.asarray(np.linspace(-6, 6, 101, dtype=np.float32))
  np.testing.assert_allclose(L.gelu(x), jax.nn.gelu(x, approximate=True), rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda x: jnp.sum(jnp.sin(x) * L.gelu(x)))(x)
  g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(x) * jax.nn.gelu(x, approximate=True)))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_softmax_matches_jax_nn_softmax_and_its_gradient():
  x = jax.random.normal(jax.random.key(0), (3, 5, 17)) * 4
  x = x.at[..., :4].set(jnp.finfo(jnp.float32).min)  # masked scores, as attention writes them
  np.testing.assert_allclose(transformer.softmax(x), jax.nn.softmax(x, axis=-1), rtol=1e-6, atol=1e-7)
  w = jax.random.normal(jax.random.key(1), x.shape)
  g = jax.grad(lambda x: jnp.sum(jnp.sin(w * transformer.softmax(x))))(x)
  g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(w * jax.nn.softmax(x, axis=-1))))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_shape,n_in,w_shape", [((2, 3, 8), 1, (8, 4, 5)), ((2, 3, 4, 5), 2, (4, 5, 8)),
                                                   ((7, 8), 1, (8, 6))])
def test_matmul_2d_equals_dot_general_and_its_gradients(x_shape, n_in, w_shape):
  kx, kw = jax.random.split(jax.random.key(0))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  contract = ((tuple(range(len(x_shape) - n_in, len(x_shape))), tuple(range(n_in))), ((), ()))
  ref = lambda x, w: jax.lax.dot_general(x, w, contract)
  new = lambda x, w: L.matmul_2d(x, w, n_in).reshape(x.shape[:len(x_shape) - n_in] + w.shape[n_in:])
  np.testing.assert_allclose(new(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.cos(f(x, w)))
  for a, b in zip(jax.grad(loss(new), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_resolve_time_chunk():
  assert remat.resolve_time_chunk(0, 100) == 0
  assert remat.resolve_time_chunk(-1, 100) == 10
  assert remat.resolve_time_chunk(-1, 512) == 16  # divisors 16 and 32 around sqrt(512)=22.6; 16 is nearer
  assert remat.resolve_time_chunk(-1, 13) == 1  # a prime: only 1 and 13 divide it
  assert remat.resolve_time_chunk(8, 64) == 8
  with pytest.raises(ValueError, match="must divide"):
    remat.resolve_time_chunk(5, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_decode_step_reproduces_forward(dtype):
  model = build("lstm", dtype)
  tok = tokens()
  full = forward(model, tok)
  state, steps = model.init_state(tok.shape[0]), []
  for t in range(tok.shape[1]):
    logits, state = decode(model, tok[:, t], state)
    steps.append(logits)
  assert full.dtype == jnp.float32
  np.testing.assert_allclose(jnp.stack(steps, 1), full, **TOL[dtype])


# ----------------------------------------------------------------------------- Transformer


@pytest.mark.parametrize("dtype", DTYPES)
def test_transformer_scan_over_layers_equals_loop(dtype):
  model = build(dtype=dtype)
  tok = tokens()
  scanned, looped = forward(model, tok), forward_loop(model, tok)
  assert scanned.dtype == jnp.float32 and scanned.shape == (2, 16, 37)
  np.testing.assert_allclose(scanned, looped, **TOL[dtype])


def np_attention(q, k, v, window=0):
  """Softmax(q k^T / sqrt(e)) v per head, key head n // (h/k) for query head n, causal (+ window: i reads i-window..i)."""
  b, t, h, e = q.shape
  rep = h // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  out = np.zeros_like(q)
  for i in range(t):
    lo = max(0, i - window) if window else 0
    s = np.einsum("bhe,bjhe->bhj", q[:, i], k[:, lo:i + 1]) / math.sqrt(e)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[:, i] = np.einsum("bhj,bjhe->bhe", p, v[:, lo:i + 1])
  return out


@pytest.mark.parametrize("kv_heads,window", [(4, 0), (2, 0), (1, 3)])
def test_attention_matches_numpy_reference(kv_heads, window):
  b, t, h, e = 2, 7, 4, 8
  q, k, v = normal(0, b, t, h, e), normal(1, b, t, kv_heads, e), normal(2, b, t, kv_heads, e)
  pos = np.broadcast_to(np.arange(t), (b, t))
  got = attention(q, k, v, pos, pos, window=window)
  np.testing.assert_allclose(got, np_attention(f64(q), f64(k), f64(v), window), rtol=1e-5, atol=1e-5)


def test_gqa_with_one_group_per_head_is_multi_head_attention():
  # kv_heads == heads: the grouped einsum reduces to standard MHA (Vaswani et al. 2017).
  b, t, h, e = 2, 6, 4, 8
  q, k, v = (normal(i, b, t, h, e) for i in range(3))
  pos = np.broadcast_to(np.arange(t), (b, t))
  s = np.einsum("bthe,bshe->bhts", q, k) / math.sqrt(e)
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  mha = np.einsum("bhts,bshe->bthe", p / p.sum(-1, keepdims=True), v)
  np.testing.assert_allclose(attention(q, k, v, pos, pos), mha, rtol=1e-5, atol=1e-5)


def changed_positions(model, tok, at):
  """Positions whose logits change when token `at` changes."""
  other = tok.at[:, at].set((tok[:, at] + 1) % 37)
  diff = jnp.max(jnp.abs(forward(model, tok) - forward(model, other)), axis=(0, 2))
  return set(np.flatnonzero(np.asarray(diff) > 1e-6).tolist())


def test_transformer_is_causal():
  model = build()
  assert changed_positions(model, tokens(), 6) == set(range(6, 16))


@pytest.mark.parametrize("layers,window", [(1, 4), (2, 4), (3, 3)])
def test_sliding_window_receptive_field_is_exact(layers, window):
  # One layer moves information at most W positions forward, L layers L*W.
  model = build(layers=layers, window=window)
  at = 2
  reach = layers * window
  assert changed_positions(model, tokens(), at) == set(range(at, at + reach + 1))


@pytest.mark.parametrize("window,dtype", [(0, "float32"), (4, "float32"), (3, "float32"), (4, "bfloat16")])
def test_transformer_decode_with_kv_cache_reproduces_forward(window, dtype):
  model = build(dtype=dtype, **({"layers": 3} if window == 3 else {}), window=window)
  tok, length = tokens(), 16  # longer than the window: the ring buffer wraps
  full = forward(model, tok)
  cache = model.init_cache(tok.shape[0], max_len=length)
  # Bounded working memory: a ring of `window` slots, however long the generation.
  assert cache["k"].shape[2] == (window or length)
  outs = []
  for t in range(length):  # under jit, so the position in the cache is a traced value
    logits, cache = decode(model, tok[:, t], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.stack(outs, 1), full, **TOL[dtype])


def test_dropout_only_in_training_and_reproducible():
  model = build(dropout=0.5)
  t = tokens()
  batch = {"inputs": t, "targets": t, "weights": jnp.ones(t.shape)}
  loss = jit(lambda m, b, key: (m.loss(b, train=False, rngs=nnx.Rngs(key))[0],
                                m.loss(b, train=True, rngs=nnx.Rngs(key))[0]))
  eval_loss, train_loss = loss(model, batch, jax.random.key(1))
  assert train_loss != eval_loss
  np.testing.assert_array_equal(eval_loss, forward_loss(build(), batch))  # eval: exactly no dropout
  np.testing.assert_array_equal(train_loss, loss(model, batch, jax.random.key(1))[1])
  assert train_loss != loss(model, batch, jax.random.key(2))[1]


# ----------------------------------------------------------------------------- both families


@pytest.mark.parametrize("tie", [True, False])
def test_num_params_matches_formula(tie):
  V, d, l, h, k, r = 37, 16, 2, 4, 2, 2
  e = d // h
  tr = build(tie_embeddings=tie)
  block = 2 * d + d * h * e + 2 * d * k * e + h * e * d + 2 * d * r * d
  head = 0 if tie else d * V
  assert tr.num_params() == V * d + l * block + d + head
  ls = build("lstm", tie_embeddings=tie)
  assert ls.num_params() == V * d + l * (d * 4 * d + 4 * d + d * 4 * d) + d + head
  for model in (tr, ls):
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert model.num_params() == sum(x.size for x in leaves)


@pytest.mark.parametrize("dtype,nbytes", [("float32", 4), ("bfloat16", 2)])
def test_state_bytes_match_design_formulas(dtype, nbytes):
  ls = build("lstm", dtype)
  assert ls.state_bytes(1000, batch=2) == 2 * 2 * 16 * nbytes * 2
  state = ls.init_state(2)
  assert sum(x.nbytes for x in jax.tree.leaves(state)) == ls.state_bytes(1000, batch=2)
  full = build(dtype=dtype)
  assert full.state_bytes(10) == 2 * 2 * 2 * 4 * 10 * nbytes
  windowed = build(dtype=dtype, window=4)
  assert windowed.state_bytes(100, batch=2) == 2 * 2 * 2 * 4 * 4 * nbytes * 2
  assert windowed.state_bytes(3) == 2 * 2 * 2 * 4 * 3 * nbytes
  cache = windowed.init_cache(2, max_len=100)
  assert cache["k"].nbytes + cache["v"].nbytes == windowed.state_bytes(100, batch=2)


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_every_parameter_has_logical_axis_names(name):
  model = build(name, tie_embeddings=False)
  params = nnx.state(model, nnx.Param)
  for path, var in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, (path, names, var.shape)
    assert set(names) <= LOGICAL_NAMES, (path, names)
  if name == "transformer":
    assert params["stack"]["blocks"]["q"]["kernel"].get_metadata()["out_sharding"] == (
        "layers", "embed", "heads", "head_dim")
