"""Variational RNN (Chung et al. 2015): a latent z_t per step (config.model.name = "vrnn").

Prior p(z_t|h_{t-1}), posterior q(z_t|x_t, h_{t-1}), decoder p(x_t|z_t,
h_{t-1}), and an LSTM recurrence on [x_t, z_t]; the ELBO sums over steps.
Shared pieces and the metrics: wm/models/latent.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wm.models import latent
from wm.models import layers as L
from wm.models import lstm
from wm.models import remat as R
from wm.typing import Array, Batch, Float, Tokens, Weights

Metrics = latent.Metrics


class VRNN(nnx.Module):
  """Variational RNN of Chung et al. 2015 (config.model.name = "vrnn").

  At step t, with h the LSTM output after reading the previous token x_{t-1}
  (= inputs[t]) and the previous latent z_{t-1}:

      prior      p(z_t | h)        = N(mu_0, e^lv_0),  [mu_0, lv_0] = phi_prior(h)
      posterior  q(z_t | x_t, h)   = N(mu_z, e^lv_z),  [mu_z, lv_z] = phi_enc([phi_x(x_t), h])
      decoder    p(x_t | z_t, h)   = softmax(phi_dec([phi_z(z_t), h]))
      recurrence h' = LSTM(h, [phi_x(x_t), phi_z(z_t)])   (read at step t + 1)

  phi_x is the embedding, phi_z a ReLU layer, phi_prior/enc/dec one-hidden-
  layer ReLU MLPs (Chung et al. sec. 3). The ELBO is
  sum_t E_q[log p(x_t | z_t, h) - KL(q(z_t | .) || p(z_t | h))], the KL in
  closed form given the sampled history. The time loop is one scan over a
  cell, chunked and rematerialised per chunk (`remat.time_chunk`, Chen et al.
  2016) with the chunk's saved tensors chosen by `remat.policy`. Free bits
  floor each dimension's KL per scored token (batch mean).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    kw = L.precision_kwargs(config)
    d, z, v = m.d, m.latent_dim, config.data.vocab_size
    self.vocab, self.latent_dim, self.d, self.num_layers, self.dtype = v, z, d, m.layers, kw["dtype"]
    self.schedule, self.warmup, self.free_bits = m.kl_schedule, m.kl_warmup_steps, m.free_bits
    self.iw_samples, self.time_chunk = m.iw_samples, config.remat.time_chunk
    self.policy = config.remat.policy
    R.checkpoint_policy(self.policy, lstm.REMAT_TAGS)  # a bad policy name fails at construction
    dense = lambda i, o, axes, bias=True: L.Dense(i, o, axes=axes, use_bias=bias, rngs=rngs, **kw)
    self.embed = L.Embed(v, d, rngs=rngs, **kw)  # phi_x
    self.phi_z = dense(z, d, ("latent", "embed"))
    self.rnn = lstm.LSTMStack(2 * d, d, m.layers, forget_bias=m.forget_bias, rngs=rngs, **kw)
    self.prior_hidden, self.prior_out = dense(d, d, ("embed", "mlp")), dense(d, (2, z), ("mlp", None, "latent"))
    self.post_hidden = dense(2 * d, d, ("embed", "mlp"))
    self.post_out = dense(d, (2, z), ("mlp", None, "latent"))
    self.dec_hidden = dense(2 * d, d, ("embed", "mlp"))
    self.norm = L.RMSNorm(d, **kw)
    self.head = dense(d, v, ("embed", "vocab"), bias=False)

  # The three conditionals, each [b, ...] -> float32 outputs.
  def _prior(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = self.prior_out(jax.nn.relu(self.prior_hidden(h))).astype(jnp.float32)
    return out[:, 0], out[:, 1]

  def _posterior(self, x_feat: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    out = self.post_out(jax.nn.relu(self.post_hidden(jnp.concatenate([x_feat, h], -1)))).astype(jnp.float32)
    return out[:, 0], out[:, 1]

  def _decode(self, z_feat: jax.Array, h: jax.Array) -> jax.Array:
    hidden = jax.nn.relu(self.dec_hidden(jnp.concatenate([z_feat, h], -1)))
    return self.head(self.norm(hidden)).astype(jnp.float32)

  def _phi_z(self, z: jax.Array) -> jax.Array:
    return jax.nn.relu(self.phi_z(z.astype(self.dtype)))

  def _cell(self, carry, xs):
    """One step: (lstm state, z_{t-1}), (x_{t-1}, x_t, eps_t) -> new carry, per-step terms."""
    state, z_prev = carry
    prev, target, eps = xs
    h, state = self.rnn.step(jnp.concatenate([self.embed(prev), self._phi_z(z_prev)], -1), state)
    mu_0, lv_0 = self._prior(h)
    mu_q, lv_q = self._posterior(self.embed(target), h)
    z = mu_q + jnp.exp(0.5 * lv_q) * eps
    logp, correct = latent.token_log_probs(self._decode(self._phi_z(z), h), target)
    kl = latent.gaussian_kl(mu_q, lv_q, mu_0, lv_0)  # [b, z]
    log_ratio = jnp.sum(latent.gaussian_log_prob(z, mu_0, lv_0) - latent.gaussian_log_prob(z, mu_q, lv_q), axis=-1)
    return (state, z), {"logp": logp, "correct": correct, "kl": kl, "log_ratio": log_ratio, "mu": mu_q}

  def run(self, batch: Batch, eps: Float[Array, "t b z"]) -> dict[str, jax.Array]:
    """The scan over time with posterior noise `eps`; per-step terms stacked [t, b, ...]."""
    b = batch["inputs"].shape[0]
    carry = (self.rnn.init_state(b), jnp.zeros((b, self.latent_dim), jnp.float32))
    xs = (batch["inputs"].T, batch["targets"].T, eps)
    graphdef, state = nnx.split(self)
    cell = lambda carry, xs: latent.rebuild(graphdef, state)._cell(carry, xs)
    _, terms = R.chunked_time_scan(cell, carry, xs, self.time_chunk,
                                   policy=R.checkpoint_policy(self.policy, lstm.REMAT_TAGS))
    return terms

  def _sequence_terms(self, batch: Batch, key: jax.Array) -> dict[str, jax.Array]:
    """Per-sequence sums over scored steps: rec, kl, kl per dim, log_w, correct; and mu [t, b, z]."""
    t, b = batch["inputs"].shape[1], batch["inputs"].shape[0]
    terms = self.run(batch, jax.random.normal(key, (t, b, self.latent_dim), jnp.float32))
    w = batch["weights"].astype(jnp.float32).T  # [t, b]
    return {"rec": -jnp.sum(w * terms["logp"], axis=0), "kl_d": jnp.sum(w[..., None] * terms["kl"], axis=0),
            "log_w": jnp.sum(w * (terms["logp"] + terms["log_ratio"]), axis=0),
            "correct": jnp.sum(w * terms["correct"], axis=0), "mu": terms["mu"]}

  @property
  def needs_batch_statistics(self) -> bool:
    """Free bits floor a global batch mean: wm.step sums `batch_statistics` over microbatches first."""
    return self.free_bits > 0

  def batch_statistics(self, batch: Batch, *, rngs: nnx.Rngs | None = None,
                       step: jax.Array | None = None) -> dict[str, jax.Array]:
    """Additive sums for the free-bits term: KL per dimension summed over scored tokens, and the tokens.

    The KL depends on the sampled trajectory, so this draws the same first
    "latent" sample as `loss` does from the same rngs.
    """
    del step
    s = self._sequence_terms(batch, latent.stream_key(rngs, "latent"))
    return {"kl_d": jnp.sum(s["kl_d"], axis=0), "count": jnp.sum(batch["weights"].astype(jnp.float32))}

  def loss(self, batch: Batch, *, train: bool, rngs: nnx.Rngs | None = None,
           step: jax.Array | None = None, batch_stats: dict[str, jax.Array] | None = None
           ) -> tuple[jax.Array, Metrics]:
    """Training: (rec + beta_t * KL with free bits) per token; evaluation: see `evaluate`.

    `batch_stats`: as for SequenceVAE.loss.
    """
    if not train:
      return self.evaluate(batch, rngs=rngs)
    if rngs is None:
      raise ValueError("VRNN.loss(train=True) needs rngs for the latent samples")
    s = self._sequence_terms(batch, rngs.latent())
    # Free bits per dimension on the KL per scored token (the global batch mean over b and t).
    loss, metrics = latent.elbo_training_loss(
        batch["weights"], s["rec"], s["kl_d"], s["correct"], beta=latent.kl_weight(self.schedule, step, self.warmup),
        free_bits=self.free_bits, free_bits_unit="token", batch_stats=batch_stats)
    metrics["latent.active_units"] = self._active_units(s["mu"], batch["weights"].astype(jnp.float32))
    return loss, metrics

  def _active_units(self, mu: Float[Array, "t b z"], w: Weights) -> jax.Array:
    # Over every scored (sequence, step) pair: the per-step code's variation across data.
    return latent.active_units(mu.reshape(-1, self.latent_dim), (w.T > 0).astype(jnp.float32).reshape(-1))

  def evaluate(self, batch: Batch, *, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, Metrics]:
    """True bounds (beta = 1, no free bits) from `iw_samples` posterior trajectories.

    Metrics as SequenceVAE.evaluate (all from the same samples, so
    iw_nll <= -elbo per sequence); iw_nll is Burda et al.'s bound with whole
    trajectories z_{1:T} ~ q as the importance samples. "kl_analytic" sums
    the per-step closed-form KLs along the sampled trajectories.
    """
    w = batch["weights"].astype(jnp.float32)
    mask = latent.sequence_mask(w)
    keys = jax.random.split(latent.stream_key(rngs, "latent"), self.iw_samples)
    s = latent.map_samples(self, lambda model, k: model._sequence_terms(batch, k), keys)  # leading [s]
    rec = jnp.mean(s["rec"], axis=0)
    kl = jnp.mean(-s["log_w"] - s["rec"], axis=0)  # Monte Carlo: sum_t log q(z_t|.) - log p(z_t|h)
    iw_nll = -latent.importance_weighted_bound(s["log_w"])
    total = jnp.maximum(jnp.sum(w), 1.0)
    nll = jnp.sum(rec + kl) / total
    metrics = {"loss": nll, "nll": nll, "accuracy": jnp.sum(jnp.mean(s["correct"], axis=0)) / total,
               "weight": jnp.sum(w), "rec": latent.masked_mean(rec, mask), "kl": latent.masked_mean(kl, mask),
               "elbo": -latent.masked_mean(rec + kl, mask), "iw_nll": latent.masked_mean(iw_nll, mask),
               "iw_nll_per_token": jnp.sum(iw_nll) / total, "latent.active_units": self._active_units(s["mu"][0], w),
               "kl_analytic": latent.masked_mean(jnp.mean(jnp.sum(s["kl_d"], axis=-1), axis=0), mask)}
    return nll, metrics

  def sample(self, rngs: nnx.Rngs, batch: int, length: int, *, first: int | jax.Array | None = None,
             temperature: float = 1.0) -> Tokens:
    """Ancestral samples: z_t ~ p(z_t | h), x_t ~ p(x_t | z_t, h), token by token after `first`."""
    keys = jax.random.split(rngs.sample(), length)

    def body(model, carry, key):
      state, z_prev, prev = carry
      k_z, k_x = jax.random.split(key)
      h, state = model.rnn.step(jnp.concatenate([model.embed(prev), model._phi_z(z_prev)], -1), state)
      mu_0, lv_0 = model._prior(h)
      z = latent.reparameterize(k_z, mu_0, lv_0)
      logits = model._decode(model._phi_z(z), h)
      x = jax.random.categorical(k_x, logits / temperature, axis=-1).astype(jnp.int32)
      return (state, z, x), x

    carry = (self.rnn.init_state(batch), jnp.zeros((batch, self.latent_dim), jnp.float32),
             latent.first_tokens(first, batch, self.vocab))
    _, tokens = latent.scan_module(self, body, carry, keys)
    return tokens.T

  def num_params(self) -> int:
    return L.param_count(self)

  def state_bytes(self, context_len: int, batch: int = 1) -> int:
    """Working memory (DESIGN.md): the LSTM's (h, c) per layer plus z_{t-1} (float32), per sequence times batch."""
    del context_len
    return (self.num_layers * 2 * self.d * jnp.dtype(self.dtype).itemsize + self.latent_dim * 4) * batch
