"""Latent-variable models: Gaussian KL, bounds, schedules, free bits, mixture likelihood, training.

References are closed forms and NumPy equations, Monte Carlo estimates, the
plain language models of lstm.py / transformer.py, and uninterrupted scans.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from wm import config as config_lib
from wm import models
from wm import parallel
from wm import step as step_lib
from wm.models import latent
from wm.models import lstm, transformer

B, T = 4, 12
TRAINED_VAE = {"model.kl_schedule": "linear", "model.kl_warmup_steps": 20, "model.word_dropout": 0.2}


def tiny(name, **overrides):
  c = config_lib.base_config()
  c.data.task = "text"
  c.data.seq_len = T
  c.data.batch_size = B
  c.model.name = name
  c.model.d = 16
  c.model.layers = 1
  c.model.heads = 2
  c.model.kv_heads = 2
  c.model.mlp_ratio = 2
  c.model.latent_dim = 3
  c.model.components = 3
  c.model.iw_samples = 4
  c.model.kl_warmup_steps = 0
  return config_lib.validate(config_lib.override(c, overrides))


@functools.lru_cache(maxsize=None)
def _built(name, items):
  cls = models.model_class(name)
  return cls(tiny(name, **dict(items)), rngs=nnx.Rngs(0))


def build(name, **overrides):
  """A fresh copy of the tiny model (built once per config: eager init compiles every op shape)."""
  return nnx.clone(_built(name, tuple(sorted(overrides.items()))))


@functools.partial(nnx.jit, static_argnames=("train",))
def run_loss(model, batch, key, step=None, *, train):
  return model.loss(batch, train=train, rngs=nnx.Rngs(key), step=step)


@nnx.jit
def run_evaluate(model, batch, key):
  return model.evaluate(batch, rngs=nnx.Rngs(key))


def byte_batch(seed=0, b=B, t=T, pad=0):
  """Random bytes as next-token pairs; the last `pad` positions of row 0 are unscored."""
  tokens = np.random.default_rng(seed).integers(32, 127, (b, t + 1)).astype(np.int32)
  weights = np.ones((b, t), np.float32)
  if pad:
    weights[0, t - pad:] = 0
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
          "weights": jnp.asarray(weights)}


def pattern_batch(seed=0, b=8, t=T):
  """Two kinds of sequences, "abcd..." runs and "0123..." runs, at random offsets."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(b):
    alphabet = b"abcdefgh" if i % 2 else b"01234567"
    start = rng.integers(len(alphabet))
    rows.append([alphabet[(start + j) % len(alphabet)] for j in range(t + 1)])
  tokens = np.asarray(rows, np.int32)
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
          "weights": jnp.ones((b, t), jnp.float32)}


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_logsumexp(x, axis):
  m = x.max(axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis, keepdims=True))).squeeze(axis)


# --- Gaussian arithmetic, schedules, free bits --------------------------------------------------

def test_gaussian_kl_matches_closed_form_and_monte_carlo():
  rng = np.random.default_rng(0)
  mu_q, mu_p = rng.normal(size=5), rng.normal(size=5)
  lv_q, lv_p = rng.normal(size=5) * 0.5, rng.normal(size=5) * 0.5
  s_q, s_p = np.exp(0.5 * lv_q), np.exp(0.5 * lv_p)
  closed = np.log(s_p / s_q) + (s_q**2 + (mu_q - mu_p) ** 2) / (2 * s_p**2) - 0.5
  n = 200_000

  @jax.jit
  def compute(mu_q, lv_q, mu_p, lv_p):
    z = mu_q + jnp.exp(0.5 * lv_q) * jax.random.normal(jax.random.PRNGKey(1), (n, 5))
    log_ratio = latent.gaussian_log_prob(z, mu_q, lv_q) - latent.gaussian_log_prob(z, mu_p, lv_p)
    return (latent.gaussian_kl(mu_q, lv_q, mu_p, lv_p), latent.gaussian_kl(mu_q, lv_q),
            jnp.mean(log_ratio, 0), jnp.std(log_ratio, 0) / math.sqrt(n),
            latent.gaussian_log_prob(mu_p, mu_q, lv_q))

  kl, kl_std, mc, se, log_prob = map(np.asarray, compute(*map(jnp.asarray, (mu_q, lv_q, mu_p, lv_p))))
  np.testing.assert_allclose(kl, closed, rtol=1e-5, atol=1e-6)
  # Standard-normal prior: 0.5 (mu^2 + sigma^2 - 1 - log sigma^2).
  np.testing.assert_allclose(kl_std, 0.5 * (mu_q**2 + s_q**2 - 1 - lv_q), rtol=1e-5, atol=1e-6)
  # Monte Carlo: E_q[log q(z) - log p(z)], z ~ q, within 5 standard errors.
  assert np.all(np.abs(mc - closed) < 5 * se + 1e-4), (mc, closed, se)
  np.testing.assert_allclose(log_prob, -0.5 * np.log(2 * np.pi * s_q**2) - (mu_p - mu_q) ** 2 / (2 * s_q**2),
                             rtol=1e-5)


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 100, {0: 1.0, 50: 1.0, 10_000: 1.0}),
    ("linear", 1000, {0: 0.0, 250: 0.25, 1000: 1.0, 5000: 1.0}),
    ("logistic", 1000, {0: 1 / (1 + math.exp(5)), 500: 0.5, 1000: 1 / (1 + math.exp(-5))}),
    ("cyclical", 100, {0: 0.0, 25: 0.5, 50: 1.0, 99: 1.0, 100: 0.0, 125: 0.5, 180: 1.0}),
])
def test_kl_schedule_values(schedule, warmup, expected):
  steps = list(expected)
  got = jax.jit(jax.vmap(lambda s: latent.kl_weight(schedule, s, warmup)))(jnp.asarray(steps, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), [expected[s] for s in steps], atol=1e-6)  # traced steps
  np.testing.assert_allclose(float(latent.kl_weight(schedule, steps[1], warmup)), expected[steps[1]], atol=1e-6)
  assert float(latent.kl_weight(schedule, None, warmup)) == 1.0  # no step: the true ELBO


def test_free_bits_hold_low_dimensions_at_the_floor():
  mu = jnp.asarray([[0.05, 2.0, 0.0], [0.1, 1.0, 0.0]])  # dim 0: small KL, dim 1: large, dim 2: zero
  logvar = jnp.asarray([[0.0, -1.0, 0.0], [0.0, -0.5, 0.0]])
  floor = 0.5

  @jax.jit
  def compute(mu):
    term = lambda mu: latent.free_bits_kl(latent.gaussian_kl(mu, logvar), floor)
    plain = lambda mu: jnp.sum(latent.gaussian_kl(mu, logvar)) / 2
    return latent.gaussian_kl(mu, logvar), term(mu), jax.grad(term)(mu), jax.grad(plain)(mu)

  kl, value, grad, plain = map(np.asarray, compute(mu))
  kl = kl.mean(0)
  assert kl[0] < floor and kl[1] > floor and kl[2] == 0
  np.testing.assert_allclose(value, floor + kl[1] + floor, rtol=1e-6)
  np.testing.assert_array_equal(grad[:, [0, 2]], 0.0)  # held at the floor: no pull towards the prior
  np.testing.assert_allclose(grad[:, 1], plain[:, 1], rtol=1e-6)
  # Through the VAE: a floor far above the KL makes the KL term exactly latent_dim * floor.
  model = build("vae", **{"model.free_bits": 50.0})
  _, metrics = run_loss(model, byte_batch(), jax.random.PRNGKey(0), train=True)
  np.testing.assert_allclose(float(metrics["kl_term"]), 3 * 50.0, rtol=1e-6)
  assert 0 < float(metrics["kl"]) < 50.0


# --- Bounds -----------------------------------------------------------------------------------

def test_importance_weighted_bound_is_above_elbo_and_grows_with_k():
  log_w = np.random.default_rng(0).normal(size=(8, 3)) * 3
  np.testing.assert_allclose(np.asarray(latent.importance_weighted_bound(jnp.asarray(log_w))),
                             np.log(np.mean(np.exp(log_w), 0)), rtol=1e-5)
  model = build("vae", **TRAINED_VAE)  # the training test's model: evaluate() compiles once for both
  batch = pattern_batch()
  ks, s, seeds = (1, 4, 16, 64), 64, 4

  @nnx.jit
  def compute(model, keys):
    mu, logvar = model.encode(batch["targets"], batch["weights"])
    kl = jnp.sum(latent.gaussian_kl(mu, logvar), 1)
    log_w, rec, _ = nnx.vmap(lambda m, k: m.log_weights(batch, k, s), in_axes=(None, 0))(model, keys)  # [seeds, s, b]
    bounds = {k: jnp.mean(latent.importance_weighted_bound(  # disjoint groups of k samples, IW_k each
        log_w.reshape(seeds, s // k, k, -1).swapaxes(0, 2)), axis=(0, 1)) for k in ks}
    return kl, jnp.mean(-rec, axis=1) - kl, bounds

  kl, elbos, bounds = compute(model, jax.random.split(jax.random.PRNGKey(0), seeds))
  mean = {k: float(np.mean(v)) for k, v in bounds.items()}
  elbo = float(np.mean(elbos))  # analytic-KL ELBO per sequence
  assert abs(mean[1] - elbo) < 0.5, (mean, elbo)  # IW_1 is the ELBO's Monte Carlo estimate
  assert mean[1] <= mean[4] <= mean[16] <= mean[64], mean
  # An untrained decoder barely uses z, so log p(x) ~ ELBO + KL: IW_64 recovers much of that gap.
  assert mean[64] > elbo + 0.5 * float(np.mean(kl)), (mean, elbo, kl)
  # evaluate(): all terms from the same samples, so iw_nll <= -elbo = rec + kl exactly.
  _, metrics = run_evaluate(model, batch, jax.random.PRNGKey(1))
  m = {k: float(v) for k, v in metrics.items()}
  assert m["iw_nll"] <= -m["elbo"] + 1e-4
  np.testing.assert_allclose(-m["elbo"], m["rec"] + m["kl"], rtol=1e-6)
  np.testing.assert_allclose(m["kl_analytic"], np.mean(kl), rtol=1e-5)


# --- Mixture ----------------------------------------------------------------------------------

def _standalone_components(model, config):
  """Each of the K separate decoders as its own Decoder module (slice k of the stacked parameters)."""
  pure = nnx.to_pure_dict(nnx.state(model.decoder))
  out = []
  for k in range(model.k):
    decoder = latent.Decoder(config, rngs=nnx.Rngs(9))
    state = nnx.state(decoder)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: a[k], pure))
    nnx.update(decoder, state)
    out.append(decoder)
  return out


@pytest.mark.parametrize("heads, prior, decoder", [("shared", "gated", "lstm"), ("separate", "learned", "transformer")])
def test_mixture_log_likelihood_is_logsumexp_by_hand(heads, prior, decoder):
  overrides = {"model.mixture_heads": heads, "model.mixture_prior": prior, "model.decoder": decoder}
  model = build("mixture", **overrides)
  if prior == "learned":  # non-uniform weights, so log pi matters
    model.prior_logits[...] = jnp.asarray([0.5, -1.0, 0.2])
  batch = byte_batch(pad=3)
  components = None if heads == "shared" else _standalone_components(model, tiny("mixture", **overrides))

  @nnx.jit
  def compute(model, components):
    if components is None:
      logits = model.decoder(batch["inputs"])  # [b, t, c, v]
    else:
      logits = jnp.stack([c(batch["inputs"]) for c in components], axis=2)
    loss, metrics = model.loss(batch, train=False)
    return (logits, model.log_mixing_weights(), loss, metrics, model.component_log_likelihoods(batch),
            model.responsibilities(batch))

  logits, log_pi, loss, metrics, ll_model, resp_model = compute(model, components)
  logp = np_log_softmax(logits)
  tgt, w = np.asarray(batch["targets"]), np.asarray(batch["weights"])
  b, t = tgt.shape
  picked = logp[np.arange(b)[:, None, None], np.arange(t)[None, :, None], np.arange(3)[None, None], tgt[..., None]]
  ll = np.sum(picked * w[..., None], axis=1)  # log p_k(x), [b, c]
  log_pi = np.asarray(log_pi, np.float64)
  log_px = np_logsumexp(log_pi + ll, axis=1)
  np.testing.assert_allclose(float(loss), -log_px.sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ll_model), ll, rtol=1e-5)
  resp = np.exp(log_pi + ll - log_px[:, None])
  np.testing.assert_allclose(np.asarray(resp_model), resp, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics["usage"]), resp.mean(0), rtol=1e-4, atol=1e-6)


def test_mixture_of_one_is_its_component_lm():
  """K = 1: the mixture's loss is the LSTM language model's (lstm.Model) with the same weights."""
  model = build("mixture", **{"model.components": 1})
  lm = lstm.Model(tiny("lstm"), rngs=nnx.Rngs(5))
  nnx.update(lm.embed, nnx.state(model.decoder.embed))
  nnx.update(lm.stack, nnx.state(model.decoder.body))
  nnx.update(lm.norm, nnx.state(model.decoder.norm))
  batch = byte_batch(pad=2)
  (loss, metrics), (lm_loss, lm_metrics) = nnx.jit(
      lambda model, lm: (model.loss(batch, train=True, rngs=nnx.Rngs(0)), lm.loss(batch, train=False)))(model, lm)
  np.testing.assert_allclose(float(loss), float(lm_loss), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["accuracy"]), float(lm_metrics["accuracy"]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics["usage"]), [1.0])


def test_mixture_annealing_tempers_only_the_gradient():
  """Loss value is always the exact -log p(x); its gradient is exact once beta = 1, and at
  beta = 0 every component gets the same weight (deterministic annealing)."""
  model = build("mixture", **{"model.mixture_anneal_steps": 10})
  batch = byte_batch(pad=2)
  total = float(np.sum(batch["weights"]))

  def exact(model):
    joint = model.log_mixing_weights() + model.component_log_likelihoods(batch)
    return -jnp.sum(jax.nn.logsumexp(joint, axis=-1)) / total

  def uniform(model):  # beta = 0: sum_k (1/K) (log pi_k + log p_k(x))
    joint = model.log_mixing_weights() + model.component_log_likelihoods(batch)
    return -jnp.sum(jnp.mean(joint, axis=-1)) / total

  @nnx.jit
  def compute(model):
    grad = lambda f: nnx.grad(f)(model)
    train = lambda step: (lambda m: m.loss(batch, train=True, rngs=nnx.Rngs(0), step=jnp.int32(step))[0])
    return (exact(model), train(0)(model), grad(train(0)), grad(uniform), grad(train(10)), grad(exact))

  value, value0, g0, g_uniform, g10, g_exact = compute(model)
  np.testing.assert_allclose(float(value0), float(value), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g_uniform)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  for a, b in zip(jax.tree.leaves(g10), jax.tree.leaves(g_exact)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


# --- VAE --------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", ["lstm", "transformer"])
def test_vae_decoder_ignoring_z_reconstructs_like_the_plain_lm(decoder):
  model = build("vae", **{"model.decoder": decoder})
  model.decoder.z_proj.kernel[...] = jnp.zeros_like(model.decoder.z_proj.kernel[...])
  config = tiny(decoder)
  lm = (lstm.Model if decoder == "lstm" else transformer.Model)(config, rngs=nnx.Rngs(5))
  nnx.update(lm.embed, nnx.state(model.decoder.embed))  # same weights
  nnx.update(lm.stack, nnx.state(model.decoder.body))
  if decoder == "lstm":
    nnx.update(lm.norm, nnx.state(model.decoder.norm))
  batch = byte_batch(pad=2)
  everything = jnp.ones((B, T), bool)

  @nnx.jit
  def compute(model, lm):
    # Word dropout of every input: the decoder sees only mask embeddings, so the inputs cannot matter.
    hidden = [model.decoder(batch[k], dropped=everything) for k in ("inputs", "targets")]
    return model.evaluate(batch, rngs=nnx.Rngs(0))[1], lm.loss(batch, train=False)[0], hidden

  metrics, lm_loss, (masked_a, masked_b) = compute(model, lm)
  total = float(np.sum(batch["weights"]))
  np.testing.assert_allclose(float(metrics["rec"]) * B / total, float(lm_loss), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(masked_a), np.asarray(masked_b), rtol=1e-6)


@pytest.mark.parametrize("decoder", ["lstm", "transformer"])
def test_greedy_decoding_matches_the_teacher_forced_decoder(decoder):
  """Step-by-step generation (LSTM state / KV cache) agrees with the full-sequence decoder."""
  model = build("vae", **{"model.decoder": decoder})
  batch = byte_batch()

  @nnx.jit
  def compute(model):
    mu, _ = model.encode(batch["targets"])
    z = jnp.concatenate([0.5 * mu[:1] + 0.5 * mu[1:2], mu], 0)  # an interpolation between two codes, then all
    tokens = model.decode_greedy(z, 6, first=65)
    inputs = jnp.concatenate([jnp.full((B + 1, 1), 65, jnp.int32), tokens[:, :-1]], 1)
    return tokens, model.decoder(inputs, z), model.sample(nnx.Rngs(0), 3, 5)

  tokens, logits, samples = compute(model)
  assert tokens.shape == (B + 1, 6)
  np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1), np.asarray(tokens))
  assert samples.shape == (3, 5) and samples.dtype == jnp.int32


def test_state_bytes_follow_the_design_definition():
  def abstract(name, **overrides):  # shapes only: state_bytes reads no parameter values
    cls = models.model_class(name)
    return nnx.eval_shape(lambda: cls(tiny(name, **overrides), rngs=nnx.Rngs(0)))

  vae = abstract("vae")  # LSTM decoder: code + layers * 2 * d, float32
  assert vae.state_bytes(100, batch=2) == 2 * (3 * 4 + 1 * 2 * 16 * 4)
  vae_tf = abstract("vae", **{"model.decoder": "transformer", "model.window": 8, "model.layers": 2})
  assert vae_tf.state_bytes(100) == 3 * 4 + 2 * 2 * 2 * 8 * 8 * 4  # code + KV cache of the 8-token window
  mix = abstract("mixture", **{"model.mixture_heads": "separate"})
  assert mix.state_bytes(100) == 3 * (2 * 16 * 4) + 3 * 4  # K decoder states + K running log-weights
  assert abstract("mixture").state_bytes(100) == 2 * 16 * 4 + 3 * 4  # one shared body
  # (h, c) in the compute dtype + z_{t-1} in float32
  assert abstract("vrnn", **{"precision.compute_dtype": "bfloat16"}).state_bytes(100) == 2 * 16 * 2 + 3 * 4


@pytest.mark.parametrize("name, overrides", [
    ("vae", {}), ("vae", {"model.encoder": "transformer", "model.decoder": "transformer"}),
    ("mixture", {"model.mixture_heads": "separate", "model.mixture_prior": "gated"}), ("vrnn", {})])
def test_parameters_shard_on_a_data_fsdp_tensor_mesh(name, overrides):
  """Every parameter's logical axes give a valid sharding on a 2x2x2 mesh (abstract: nothing compiles)."""
  config = tiny(name, **overrides, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  setup = step_lib.make_setup(config, parallel.make_mesh(config.mesh, jax.devices()[:8]))
  specs = [s.spec for s in jax.tree.leaves(setup.state_shardings["params"])]
  assert any("fsdp" in jax.tree.leaves(tuple(spec)) for spec in specs)
  assert any("tensor" in jax.tree.leaves(tuple(spec)) for spec in specs)


# --- VRNN -------------------------------------------------------------------------------------

def test_vrnn_chunked_remat_scan_equals_plain_scan():
  batch = byte_batch(pad=3)

  @nnx.jit
  def loss_and_grads(model):
    fn = lambda m: m.loss(batch, train=True, rngs=nnx.Rngs(3), step=jnp.int32(0))
    return nnx.value_and_grad(fn, has_aux=True)(model)

  model = build("vrnn", **{"model.kl_warmup_steps": 10})
  (loss0, m0), g0 = loss_and_grads(model)
  chunked = build("vrnn", **{"model.kl_warmup_steps": 10, "remat.time_chunk": 4})
  (loss4, m4), g4 = loss_and_grads(chunked)
  np.testing.assert_allclose(float(loss4), float(loss0), rtol=1e-6)
  np.testing.assert_allclose(float(m4["kl"]), float(m0["kl"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g4)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # At step 0 of a linear anneal beta = 0: the loss is the reconstruction alone, while KL > 0.
  assert float(m0["beta"]) == 0.0 and float(m0["kl"]) > 0
  np.testing.assert_allclose(float(loss0) * float(np.sum(batch["weights"])), float(m0["rec"]) * B, rtol=1e-5)


# --- Training ---------------------------------------------------------------------------------

def _train(model, batch, steps, lr):
  optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, i):
    key = jax.random.fold_in(jax.random.PRNGKey(0), i)
    fn = lambda m: m.loss(batch, train=True, rngs=nnx.Rngs(key), step=i)
    (_, metrics), grads = nnx.value_and_grad(fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return metrics

  for i in range(steps):
    step(model, optimizer, jnp.int32(i))


def test_short_training_lowers_the_negative_elbo():
  model = build("vae", **TRAINED_VAE)
  batch = pattern_batch()
  before = run_evaluate(model, batch, jax.random.PRNGKey(1))[1]
  _train(model, batch, 40, 1e-2)
  after = run_evaluate(model, batch, jax.random.PRNGKey(1))[1]
  assert float(after["nll"]) < float(before["nll"]) - 1.5, (before["nll"], after["nll"])
  assert float(after["iw_nll"]) <= -float(after["elbo"]) + 1e-3
  assert float(after["kl"]) > 0


def test_mixture_training_uses_more_than_one_component():
  """Two kinds of sequences: a trained mixture gives each kind to its own components."""
  model = build("mixture", **{"model.components": 4, "model.mixture_anneal_steps": 20})
  batch = pattern_batch(b=16)
  _train(model, batch, 40, 1e-2)
  metrics, resp = nnx.jit(lambda m: (m.loss(batch, train=False)[1], m.responsibilities(batch)))(model)
  usage = np.asarray(metrics["usage"])
  assert np.sum(usage > 0.05) >= 2, usage
  resp = np.asarray(resp)
  kinds = np.arange(16) % 2
  # Each kind's sequences agree on their most responsible component, and the two kinds differ.
  top = resp.argmax(1)
  assert len(set(top[kinds == 0])) == 1 and len(set(top[kinds == 1])) == 1 and top[0] != top[1], resp
