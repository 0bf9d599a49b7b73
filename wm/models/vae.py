"""Sequence VAE (Bowman et al. 2016): one Gaussian code z per sequence (config.model.name = "vae").

q(z|x) = N(mu(x), diag sigma^2(x)) from an encoder (LSTM: hidden state at
the last scored position; Transformer: mean over scored positions); p(x|z)
an LM conditioned on z (LSTM: z sets the initial (h, c) of every layer;
Transformer: a projection of z is added to every input embedding); p(z) =
N(0, I). loss = E_q[-log p(x|z)] + beta_t * KL(q(z|x) || p(z)). The
probability pieces, the encoder and the decoder are shared with the other
latent families in wm/models/latent.py, which also states the metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wm.models import latent
from wm.models import layers as L
from wm.typing import Array, Batch, Float, Tokens, Weights

Metrics = latent.Metrics


class SequenceVAE(nnx.Module):
  """Sequence VAE of Bowman et al. 2016 (config.model.name = "vae"); see the module docstring.

  Against posterior collapse: KL annealing (`kl_schedule`, `kl_warmup_steps`),
  free bits (`free_bits`), word dropout on the decoder inputs (`latent.word_dropout`).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    self.vocab, self.latent_dim = config.data.vocab_size, m.latent_dim
    self.dtype = L.precision_kwargs(config)["dtype"]
    self.schedule, self.warmup, self.free_bits = m.kl_schedule, m.kl_warmup_steps, m.free_bits
    self.word_dropout_rate, self.iw_samples, self.dropout = m.word_dropout, m.iw_samples, m.dropout
    self.encoder = latent.Encoder(config, rngs=rngs)
    # The mask embedding exists whatever the rate, so latent.word_dropout can change on resume.
    self.decoder = latent.Decoder(config, latent_dim=m.latent_dim, mask_token=True, rngs=rngs)

  def encode(self, tokens: Tokens, weights: Weights | None = None) -> tuple[jax.Array, jax.Array]:
    """(mu, logvar) [b, z] of q(z|x) for sequences x = tokens."""
    return self.encoder(tokens, weights)

  def _reconstruction(self, batch: Batch, z: jax.Array, dropped: jax.Array | None = None,
                      dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(-log p(x|z) [b], correct predictions [b]), summed over scored tokens."""
    logits = self.decoder(batch["inputs"], z, dropped=dropped, dropout_key=dropout_key)
    logp, correct = latent.token_log_probs(logits, batch["targets"])
    w = batch["weights"].astype(jnp.float32)
    return -jnp.sum(w * logp, axis=1), jnp.sum(w * correct, axis=1)

  @property
  def needs_batch_statistics(self) -> bool:
    """Free bits floor a global batch mean: wm.step sums `batch_statistics` over microbatches first."""
    return self.free_bits > 0

  def batch_statistics(self, batch: Batch, *, rngs: nnx.Rngs | None = None,
                       step: jax.Array | None = None) -> dict[str, jax.Array]:
    """Additive sums for the free-bits term: KL per dimension summed over sequences, and the sequences.

    q(z|x) is deterministic given x, so no latent sample is needed.
    """
    del rngs, step
    w = batch["weights"].astype(jnp.float32)
    mask = latent.sequence_mask(w)
    mu, logvar = self.encode(batch["targets"], w)
    return {"kl_d": jnp.sum(latent.gaussian_kl(mu, logvar) * mask[:, None], axis=0), "count": jnp.sum(mask)}

  def loss(self, batch: Batch, *, train: bool, rngs: nnx.Rngs | None = None,
           step: jax.Array | None = None, batch_stats: dict[str, jax.Array] | None = None
           ) -> tuple[jax.Array, Metrics]:
    """Training: (rec + beta_t * KL with free bits) per token; evaluation: see `evaluate`.

    Args:
      batch: {"inputs", "targets", "weights"} [b, t].
      train: single-sample reparameterised loss if True, else `evaluate`.
      rngs: latent samples ("latent"), word dropout and dropout ("dropout").
      step: training step for beta_t; None means beta = 1.
      batch_stats: `batch_statistics` summed over the global batch when this
        batch is one microbatch of it; None means this batch is the whole batch.
    """
    if not train:
      return self.evaluate(batch, rngs=rngs)
    if rngs is None:
      raise ValueError("SequenceVAE.loss(train=True) needs rngs for the latent sample")
    w = batch["weights"].astype(jnp.float32)
    mu, logvar = self.encode(batch["targets"], w)
    z = latent.reparameterize(rngs.latent(), mu, logvar)
    dropped = latent.word_dropout(rngs.dropout(), batch["inputs"].shape, self.word_dropout_rate)
    rec, correct = self._reconstruction(batch, z, dropped, rngs.dropout() if self.dropout > 0 else None)
    loss, metrics = latent.elbo_training_loss(
        w, rec, latent.gaussian_kl(mu, logvar), correct, beta=latent.kl_weight(self.schedule, step, self.warmup),
        free_bits=self.free_bits, free_bits_unit="sequence", batch_stats=batch_stats)
    metrics["latent.active_units"] = latent.active_units(mu, latent.sequence_mask(w))
    return loss, metrics

  def log_weights(self, batch: Batch, key: jax.Array, samples: int,
                  posterior: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Importance log weights log p(x, z_i) - log q(z_i|x) for `samples` draws z_i ~ q(z|x).

    Returns:
      (log_w [s, b], rec [s, b] = -log p(x|z_i), correct [s, b]); one
      decoder pass per sample, run sequentially (lax.map) to bound memory.
    """
    mu, logvar = self.encode(batch["targets"], batch["weights"]) if posterior is None else posterior

    def one(model, k):
      z = latent.reparameterize(k, mu, logvar)
      rec, correct = model._reconstruction(batch, z)
      log_ratio = jnp.sum(latent.gaussian_log_prob(z) - latent.gaussian_log_prob(z, mu, logvar), axis=1)
      return -rec + log_ratio, rec, correct

    return latent.map_samples(self, one, jax.random.split(key, samples))

  def evaluate(self, batch: Batch, *, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, Metrics]:
    """True bounds (beta = 1, no free bits) from `iw_samples` posterior samples z_i ~ q(z|x).

    Every term uses the same samples: rec = mean_i -log p(x|z_i), kl =
    mean_i log q(z_i|x) - log p(z_i) (Monte Carlo; the closed form is
    "kl_analytic"), so elbo = -(rec + kl) = mean_i log w_i, and
    iw_nll = -log (1/s) sum_i w_i (Burda et al. 2016) satisfies
    iw_nll <= -elbo for every sequence (Jensen), not only on average. "nll"
    and "iw_nll_per_token" are the two bounds in nats per scored token.
    """
    w = batch["weights"].astype(jnp.float32)
    mask = latent.sequence_mask(w)
    mu, logvar = self.encode(batch["targets"], w)
    log_w, rec_s, correct_s = self.log_weights(batch, latent.stream_key(rngs, "latent"), self.iw_samples, (mu, logvar))
    rec = jnp.mean(rec_s, axis=0)
    kl = jnp.mean(-log_w - rec_s, axis=0)  # log w_i = -rec_i - (log q(z_i|x) - log p(z_i))
    iw_nll = -latent.importance_weighted_bound(log_w)
    total = jnp.maximum(jnp.sum(w), 1.0)
    nll = jnp.sum((rec + kl) * mask) / total
    metrics = {"loss": nll, "nll": nll, "accuracy": jnp.sum(jnp.mean(correct_s, axis=0)) / total,
               "weight": jnp.sum(w), "rec": latent.masked_mean(rec, mask), "kl": latent.masked_mean(kl, mask),
               "elbo": -latent.masked_mean(rec + kl, mask), "iw_nll": latent.masked_mean(iw_nll, mask),
               "iw_nll_per_token": jnp.sum(iw_nll * mask) / total, "latent.active_units": latent.active_units(mu, mask),
               "kl_analytic": latent.masked_mean(jnp.sum(latent.gaussian_kl(mu, logvar), axis=1), mask)}
    return nll, metrics

  def decode_greedy(self, z: Float[Array, "b z"], length: int, *, first: int | jax.Array | None = None) -> Tokens:
    """argmax decoding of `length` tokens from codes z, starting after token `first`."""
    state = self.decoder.init_state(z.shape[0], length + 1, z)
    return latent.sample_tokens(lambda dec, tok, s: dec.step(tok, s, z), self.decoder, state,
                     latent.first_tokens(first, z.shape[0], self.vocab), length, None)

  def sample(self, rngs: nnx.Rngs, batch: int, length: int, *, first: int | jax.Array | None = None,
             temperature: float = 1.0) -> Tokens:
    """Ancestral samples: z ~ N(0, I), then x ~ p(x|z) token by token after `first`."""
    z = jax.random.normal(rngs.latent(), (batch, self.latent_dim), jnp.float32)
    state = self.decoder.init_state(batch, length + 1, z)
    return latent.sample_tokens(lambda dec, tok, s: dec.step(tok, s, z), self.decoder, state,
                     latent.first_tokens(first, batch, self.vocab), length, rngs.sample(), temperature)

  def num_params(self) -> int:
    return L.param_count(self)

  def state_bytes(self, context_len: int, batch: int = 1) -> int:
    """Working memory (DESIGN.md): the code z (float32) plus the decoder's state, per sequence times batch."""
    return (self.latent_dim * 4 + self.decoder.state_bytes(context_len)) * batch


# ---------------------------------------------------------------------------
