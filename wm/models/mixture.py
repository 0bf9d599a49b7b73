"""Mixture of K sequence models, p(x) = sum_k pi_k p_k(x) (config.model.name = "mixture").

One decoder body with K output heads, or K separate decoders, trained on the
exact log-likelihood (no latent sample is drawn). Shared pieces and the
metrics: wm/models/latent.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wm.models import latent
from wm.models import layers as L
from wm.typing import Array, Batch, Float, Int, Tokens

Metrics = latent.Metrics


class Mixture(nnx.Module):
  """p(x) = sum_k pi_k p_k(x), K autoregressive components (config.model.name = "mixture").

  Components (`mixture_heads`): "shared" is one decoder body with K output
  heads (p_k differ only in the head); "separate" is K full decoders, created
  and applied with nnx.vmap (parameters get a leading "components" axis).

  Mixing weights (`mixture_prior`): "learned" is pi = softmax(a) with free
  logits a (zeros at init: uniform). "gated" is pi = softmax(g(c)) with g a
  one-hidden-layer tanh MLP and c a code that never depends on x: a learned
  vector c by default, or batch["code"] [b, latent_dim] when the batch carries
  a conditioning code (then p(x | c) = sum_k pi_k(c) p_k(x)). Because pi does
  not see x, log p(x) = logsumexp_k(log pi_k + log p_k(x)) is the exact
  marginal likelihood and training maximises it directly; a gate reading x
  would be a posterior q(k|x) and give only a bound. g's output layer starts
  at zero so pi starts uniform as well.

  Using more than one component. The gradient of log p(x) reaches component
  k weighted by its responsibility r_k(x) = pi_k p_k(x) / p(x), and over a
  whole sequence the r_k are nearly one-hot. From a random start, whichever
  component first learns what all sequences share (byte frequencies, common
  words) wins every sequence; the others stop receiving gradient and die
  (observed: one component at 100% usage after 150 steps on text). Two
  things prevent it:
    - symmetry breaking: components start as different random LMs
      (independent head or decoder initialisations);
    - deterministic annealing (Ueda & Nakano 1998) over the first
      `mixture_anneal_steps` steps: the gradient uses tempered
      responsibilities softmax_k(beta_t (log pi_k + log p_k(x))) with beta_t
      rising linearly from 0 to 1. At small beta every component learns the
      shared structure; as beta grows they split the sequences by what
      distinguishes them. From then on (and for every reported number) the
      objective is the exact log-likelihood: the loss value is always
      -log p(x), only its gradient is tempered during the anneal.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    kw = L.precision_kwargs(config)
    self.k, self.shared, self.gated = m.components, m.mixture_heads == "shared", m.mixture_prior == "gated"
    self.vocab = config.data.vocab_size
    self.dtype, self.dropout, self.anneal_steps = kw["dtype"], m.dropout, m.mixture_anneal_steps
    if self.shared:
      self.decoder = latent.Decoder(config, heads=m.components, rngs=rngs)
    else:
      @nnx.split_rngs(splits=m.components)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "components"})
      def make(rngs):
        return latent.Decoder(config, rngs=rngs)

      self.decoder = make(rngs)
    if self.gated:
      self.code = nnx.Param(jax.random.normal(rngs.params(), (m.latent_dim,), jnp.float32).astype(kw["param_dtype"]),
                            out_sharding=("latent",))
      self.gate_hidden = L.Dense(m.latent_dim, m.d, axes=("latent", "embed"), use_bias=True, rngs=rngs, **kw)
      self.gate_out = L.Dense(m.d, m.components, axes=("embed", "components"), use_bias=True, rngs=rngs, **kw)
      self.gate_out.kernel[...] = jnp.zeros_like(self.gate_out.kernel[...])
    else:
      self.prior_logits = nnx.Param(jnp.zeros((m.components,), kw["param_dtype"]), out_sharding=("components",))

  def log_mixing_weights(self, code: Float[Array, "b z"] | None = None) -> jax.Array:
    """log pi: [c] (learned prior, or gate on the learned code) or [b, c] (gate on a given code)."""
    if not self.gated:
      return jax.nn.log_softmax(self.prior_logits[...].astype(jnp.float32))
    c = self.code[...] if code is None else code
    hidden = jnp.tanh(self.gate_hidden(c.astype(self.dtype)).astype(jnp.float32))
    return jax.nn.log_softmax(self.gate_out(hidden.astype(self.dtype)).astype(jnp.float32), axis=-1)

  def component_logits(self, tokens: Tokens, *, dropout_key: jax.Array | None = None) -> Float[Array, "b t c v"]:
    """Every component's next-token logits."""
    if self.shared:
      logits = self.decoder(tokens, dropout_key=dropout_key)
      return logits[:, :, None] if self.k == 1 else logits  # one (possibly tied) head has no component axis
    keys = None if dropout_key is None else jax.random.split(dropout_key, self.k)

    @nnx.vmap(in_axes=(0, None, None if keys is None else 0), out_axes=2,
              transform_metadata={nnx.PARTITION_NAME: "components"})
    def run(decoder, tokens, key):
      return decoder(tokens, dropout_key=key)

    return run(self.decoder, tokens, keys)

  def _terms(self, batch: Batch, dropout_key: jax.Array | None = None) -> dict[str, jax.Array]:
    w = batch["weights"].astype(jnp.float32)
    logits = self.component_logits(batch["inputs"], dropout_key=dropout_key)  # [b, t, c, v]
    logp, _ = latent.token_log_probs(logits, batch["targets"][:, :, None])  # [b, t, c]
    logp = logp * w[:, :, None]
    log_pi = self.log_mixing_weights(batch.get("code"))
    log_pi = jnp.broadcast_to(log_pi, (w.shape[0], self.k))
    joint = log_pi + jnp.sum(logp, axis=1)  # log pi_k + log p_k(x), [b, c]
    log_px = jax.nn.logsumexp(joint, axis=-1)
    # Exact predictive p(x_t | x_<t) = sum_k p(k | x_<t) p_k(x_t | x_<t), with
    # p(k | x_<t) from the log-likelihood of the prefix; its argmax gives the accuracy.
    prefix = log_pi[:, None] + jnp.cumsum(logp, axis=1) - logp  # [b, t, c]
    post = jax.nn.softmax(prefix, axis=-1)
    probs = jnp.einsum("btc,btcv->btv", post, jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
    correct = (jnp.argmax(probs, axis=-1) == batch["targets"]).astype(jnp.float32)
    return {"joint": joint, "log_px": log_px, "log_pi": log_pi, "correct": jnp.sum(w * correct), "w": w}

  def component_log_likelihoods(self, batch: Batch) -> Float[Array, "b c"]:
    """log p_k(x) = sum_t w_t log p_k(x_t | x_<t) for every sequence and component."""
    terms = self._terms(batch)
    return terms["joint"] - terms["log_pi"]

  def responsibilities(self, batch: Batch) -> Float[Array, "b c"]:
    """p(k | x) = pi_k p_k(x) / p(x) per sequence."""
    return jax.nn.softmax(self._terms(batch)["joint"], axis=-1)

  def loss(self, batch: Batch, *, train: bool, rngs: nnx.Rngs | None = None,
           step: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """-log p(x) per scored token (exact), with responsibilities and usage in the metrics.

    Args:
      batch: {"inputs", "targets", "weights"} [b, t]; optionally "code"
        [b, latent_dim] for the gated prior.
      train: tempers the gradient during the anneal (see the class docstring).
      rngs: dropout, if the config has any.
      step: training step for the anneal's beta_t; None means beta = 1.

    Metrics beyond the LM's: usage [c] (mean responsibility per component),
    mixing_weights [c] (pi; the mean over the batch for a per-sequence code),
    components_used (usage > 5%), responsibility_entropy (nats per sequence),
    and in training anneal_beta.
    """
    key = rngs.dropout() if (train and rngs is not None) else None
    terms = self._terms(batch, key if self.dropout > 0 else None)
    w, mask = terms["w"], latent.sequence_mask(terms["w"])
    total = jnp.maximum(jnp.sum(w), 1.0)
    nll = -jnp.sum(terms["log_px"] * mask) / total
    beta = latent.kl_weight("linear", step if train else None, self.anneal_steps)
    # Value -log p(x); gradient -sum_k softmax(beta * joint)_k grad joint_k, which is grad -log p(x) at beta = 1.
    tempered = jax.lax.stop_gradient(jax.nn.softmax(beta * terms["joint"], axis=-1))
    joint = terms["joint"]
    surrogate = jax.lax.stop_gradient(terms["log_px"]) + jnp.sum(
        tempered * (joint - jax.lax.stop_gradient(joint)), axis=-1)
    loss = -jnp.sum(surrogate * mask) / total
    resp = jax.nn.softmax(terms["joint"], axis=-1)
    usage = jnp.sum(resp * mask[:, None], axis=0) / jnp.maximum(jnp.sum(mask), 1.0)
    entropy = -jnp.sum(resp * jnp.log(jnp.maximum(resp, 1e-30)), axis=-1)
    metrics = {"loss": nll, "nll": nll, "accuracy": terms["correct"] / total, "weight": jnp.sum(w),
               "usage": usage, "mixing_weights": jnp.mean(jnp.exp(terms["log_pi"]), axis=0),
               "components_used": jnp.sum((usage > 0.05).astype(jnp.float32)),
               "responsibility_entropy": latent.masked_mean(entropy, mask)}
    if train:
      metrics["anneal_beta"] = beta
    return loss, metrics

  def evaluate(self, batch: Batch, *, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, Metrics]:
    """The exact nll and mixture statistics (same as loss(train=False))."""
    return self.loss(batch, train=False, rngs=rngs)

  def _step_all(self, tokens: jax.Array, state: Any) -> tuple[jax.Array, Any]:
    """One generation step of every component: logits [b, c, v]."""
    if self.shared:
      logits, state = self.decoder.step(tokens, state)
      return (logits[:, None] if self.k == 1 else logits), state

    @nnx.vmap(in_axes=(0, None, 0), out_axes=(1, 0), transform_metadata={nnx.PARTITION_NAME: "components"})
    def run(decoder, tokens, state):
      return decoder.step(tokens, state)

    return run(self.decoder, tokens, state)

  def _init_state(self, batch: int, max_len: int) -> Any:
    if self.shared:
      return self.decoder.init_state(batch, max_len)

    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "components"})
    def run(decoder):
      return decoder.init_state(batch, max_len)

    return run(self.decoder)

  def sample(self, rngs: nnx.Rngs, batch: int, length: int, *, first: int | jax.Array | None = None,
             temperature: float = 1.0, return_components: bool = False) -> Tokens | tuple[Tokens, Int[Array, "b"]]:
    """Ancestral samples: k ~ pi, then x ~ p_k token by token; tokens, or (tokens, k) if asked."""
    log_pi = jnp.broadcast_to(self.log_mixing_weights(), (batch, self.k))
    comp = jax.random.categorical(rngs.latent(), log_pi, axis=-1)

    def step(model, tokens, state):
      logits, state = model._step_all(tokens, state)
      return jnp.take_along_axis(logits, comp[:, None, None], axis=1)[:, 0], state

    tokens = latent.sample_tokens(step, self, self._init_state(batch, length + 1), latent.first_tokens(first, batch, self.vocab), length,
                       rngs.sample(), temperature)
    return (tokens, comp) if return_components else tokens

  def num_params(self) -> int:
    return L.param_count(self)

  def state_bytes(self, context_len: int, batch: int = 1) -> int:
    """Working memory for the exact predictive p(x_t | x_<t): the decoder state(s) plus
    log pi_k + log p_k(x_<t) for every component (float32), per sequence times batch.

    Shared: one body state; separate: K decoder states.
    """
    body = self.decoder.state_bytes(context_len)  # static shapes: the same for every component
    return ((body if self.shared else self.k * body) + self.k * 4) * batch


# ---------------------------------------------------------------------------
