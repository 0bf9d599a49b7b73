"""Latent-variable sequence models: sequence VAE, mixture of sequence models, VRNN.

Three ways to put a random variable behind a byte sequence, trained on the
same batches as the language models (inputs x_0..x_{T-1}, targets x_1..x_T,
weights). The modelled sequence is the targets; the first input token is
given, as it is to a language model, so every number is comparable with an
LM's nats per token.

    SequenceVAE (Bowman et al. 2016)  one code z per sequence:
        q(z|x) = N(mu(x), diag sigma^2(x)) from an encoder (LSTM: hidden state
        at the last scored position; Transformer: mean over scored positions),
        p(x|z) an LM conditioned on z (LSTM: z sets the initial (h, c) of every
        layer; Transformer: a projection of z is added to every input
        embedding), p(z) = N(0, I).
        loss = E_q[-log p(x|z)] + beta_t * KL(q(z|x) || p(z)).
    Mixture  p(x) = sum_k pi_k p_k(x) over K LMs (one body with K output heads,
        or K separate decoders), trained on the exact log-likelihood.
    VRNN (Chung et al. 2015)  a latent z_t per step with prior p(z_t|h_{t-1}),
        posterior q(z_t|x_t, h_{t-1}), decoder p(x_t|z_t, h_{t-1}), and an LSTM
        recurrence on [x_t, z_t]; the ELBO sums over steps.

Interface (wm/models/__init__.py): `loss(batch, *, train, rngs, step)`.
Training returns nats per scored token with beta_t from `kl_weight` (a
function of `step`) and the free-bits floor; the metric "nll" is always the
true bound (beta = 1, no floor), so the train loop's bits per byte bound the
model's. Evaluation (`train=False`, also `evaluate`) is the true ELBO and
adds the importance-weighted bound iw_nll (Burda et al. 2016) from
`model.iw_samples` samples. Metrics: "nll" and "iw_nll_per_token" in nats per
scored token; rec, kl, elbo, iw_nll, kl_term in nats per sequence (mean over
the batch's sequences); active_units (Burda et al. 2016); for the mixture the
exact nll, usage (mean responsibility per component) and mixing weights.

Notation (wm/typing.py): b batch, t time, v vocab, d width, z latent dim,
c mixture components, s importance samples.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wm import parallel
from wm.models import layers as L
from wm.models import lstm
from wm.models import remat as R
from wm.models import transformer
from wm.typing import Array, Batch, Float, Int, Tokens, Weights

Metrics = dict[str, jax.Array]

# Burda et al. 2016: a latent unit u is active if Cov_x(E_q(z|x)[z_u]) > 0.01.
ACTIVE_UNIT_THRESHOLD = 0.01
# Fu et al. 2019: each cycle spends its first R = 0.5 rising linearly from 0 to 1.
CYCLICAL_RISE = 0.5


# ---------------------------------------------------------------------------
# Gaussian and bound arithmetic (pure functions, float32)
# ---------------------------------------------------------------------------

def gaussian_kl(mu_q: jax.Array, logvar_q: jax.Array, mu_p: jax.Array | float = 0.0,
                logvar_p: jax.Array | float = 0.0) -> jax.Array:
  """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) per dimension (elementwise).

  0.5 * (logvar_p - logvar_q + (e^logvar_q + (mu_q - mu_p)^2) / e^logvar_p - 1);
  with the defaults the prior is N(0, 1) (Kingma & Welling 2014, appendix B).
  """
  mu_q, logvar_q = mu_q.astype(jnp.float32), logvar_q.astype(jnp.float32)
  return 0.5 * (logvar_p - logvar_q + (jnp.exp(logvar_q) + jnp.square(mu_q - mu_p)) * jnp.exp(-logvar_p) - 1.0)


def gaussian_log_prob(z: jax.Array, mu: jax.Array | float = 0.0, logvar: jax.Array | float = 0.0) -> jax.Array:
  """log N(z; mu, e^logvar) per dimension (elementwise)."""
  return -0.5 * (math.log(2 * math.pi) + logvar + jnp.square(z - mu) * jnp.exp(-jnp.asarray(logvar)))


def reparameterize(key: jax.Array, mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """z = mu + sigma * eps, eps ~ N(0, I): a sample with gradients to mu and sigma (Kingma & Welling 2014)."""
  return mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, jnp.float32)


def kl_weight(schedule: str, step: jax.Array | int | None, warmup_steps: int) -> jax.Array:
  """beta_t, the weight of the KL term at training step `step` (may be traced).

  constant  1.
  linear    min(1, step / warmup): the monotonic anneal (Fu et al. 2019's baseline).
  logistic  sigmoid(10 (step / warmup - 1/2)): Bowman et al. 2016's logistic
            anneal, centred on warmup/2 and ~0.993 at `warmup`.
  cyclical  Fu et al. 2019: cycles of `warmup` steps; in each, beta rises
            linearly over the first half and stays at 1 for the second.

  `step=None` (no schedule known, e.g. evaluation) and `warmup_steps <= 0` give 1.
  """
  if step is None or schedule == "constant" or warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  s = jnp.asarray(step, jnp.float32) / warmup_steps
  if schedule == "linear":
    return jnp.minimum(1.0, s)
  if schedule == "logistic":
    return jax.nn.sigmoid(10.0 * (s - 0.5))
  if schedule == "cyclical":
    return jnp.minimum(1.0, jnp.mod(s, 1.0) / CYCLICAL_RISE)
  raise ValueError(f"unknown kl_schedule {schedule!r}; expected constant, linear, logistic or cyclical")


def free_bits_kl(kl: Float[Array, "b z"], free_bits: float, mask: Float[Array, "b"] | None = None) -> jax.Array:
  """sum_d max(lambda, mean_b KL_bd): the KL term with a per-dimension floor, per sequence.

  Free bits (Kingma et al. 2016, the IAF paper) with the floor applied to the batch
  mean of each dimension's KL, so a dimension whose average KL is under
  lambda costs exactly lambda and gets no gradient pushing it further down,
  while single sequences can still spend more or less than lambda on it.

  Args:
    kl: per-sequence, per-dimension KL.
    free_bits: lambda in nats per dimension; 0 returns the plain batch-mean KL.
    mask: 1 for sequences that count (have scored tokens), 0 for padding rows.
  """
  mask = jnp.ones(kl.shape[:1], jnp.float32) if mask is None else mask
  mean = jnp.sum(kl * mask[:, None], axis=0) / jnp.maximum(jnp.sum(mask), 1.0)
  return jnp.sum(jnp.maximum(mean, free_bits))


def free_bits_kl_sum(kl_sums: Float[Array, "z"], count: jax.Array, free_bits: float,
                     stats: dict[str, jax.Array]) -> jax.Array:
  """This batch's share of N * sum_d max(lambda, mean_d KL_d), with mean_d over the global batch.

  The free-bits term (see `free_bits_kl`) is nonlinear in a batch mean, so a
  microbatch cannot compute it alone. Given the global sums `stats`
  ({"kl_d": sum of KL_d over the N units of the global batch, "count": N}),
  each dimension either sits above the floor (it then costs its KL, linear in
  the examples) or below it (it costs lambda per unit and has no gradient).
  Summed over microbatches this is exactly N * sum_d max(lambda, mean_d), with
  the same gradient as the global term, so accumulation leaves the objective
  unchanged. With `stats` from this batch alone it equals the plain term.

  Args:
    kl_sums: sum over this batch's units (sequences, or scored tokens) of KL per dimension.
    count: this batch's number of units.
    free_bits: lambda in nats per dimension; 0 returns sum(kl_sums).
    stats: global {"kl_d" [z], "count"}.
  """
  if free_bits <= 0:
    return jnp.sum(kl_sums)
  mean = stats["kl_d"] / jnp.maximum(stats["count"], 1.0)
  above = jax.lax.stop_gradient((mean > free_bits).astype(jnp.float32))
  return jnp.sum(above * kl_sums + (1.0 - above) * free_bits * count)


def importance_weighted_bound(log_w: Float[Array, "s ..."]) -> jax.Array:
  """log (1/s) sum_i w_i, Burda et al. 2016's bound, from log weights log p(x, z_i) - log q(z_i|x).

  A lower bound on log p(x) for any s; s = 1 is the ELBO's Monte Carlo
  estimate, and its expectation never decreases with s (Burda et al. thm. 1).
  """
  return jax.nn.logsumexp(log_w, axis=0) - math.log(log_w.shape[0])


def active_units(mu: Float[Array, "n z"], mask: Float[Array, "n"] | None = None) -> jax.Array:
  """Number of dimensions with Var_x(E_q[z_d | x]) > 0.01 over the rows of `mu` (Burda et al. 2016)."""
  mask = jnp.ones(mu.shape[:1], jnp.float32) if mask is None else mask
  n = jnp.maximum(jnp.sum(mask), 1.0)
  mean = jnp.sum(mu * mask[:, None], axis=0) / n
  var = jnp.sum(jnp.square(mu - mean) * mask[:, None], axis=0) / n
  return jnp.sum((var > ACTIVE_UNIT_THRESHOLD).astype(jnp.float32))


def word_dropout(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array | None:
  """Which decoder inputs to hide: a boolean mask, each position True with probability `rate`.

  Bowman et al. 2016: a decoder that cannot always see the previous tokens
  has to get more of the sequence from z, which counters posterior collapse.
  None when the rate is 0.
  """
  if rate <= 0.0:
    return None
  return jax.random.bernoulli(key, rate, shape)


def token_log_probs(logits: Float[Array, "... v"], targets: Int[Array, "..."]) -> tuple[jax.Array, jax.Array]:
  """(log p(target), 1[argmax == target]) per position, float32."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return target_logp, correct


def _sequence_mask(weights: Weights) -> Float[Array, "b"]:
  """1 for sequences with at least one scored token; padding rows do not count as sequences."""
  return (jnp.sum(weights, axis=-1) > 0).astype(jnp.float32)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _key(rngs: nnx.Rngs | None, stream: str) -> jax.Array:
  # Evaluation without rngs still needs latent samples; a fixed key keeps it deterministic.
  return jax.random.PRNGKey(0) if rngs is None else getattr(rngs, stream)()


def _precision(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(param_dtype=L.dtype_of(config.precision.param_dtype),
              dtype=L.dtype_of(config.precision.compute_dtype))


def _rebuild(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.Module:
  """A module merged inside a JAX transform's body (lax.scan, checkpoint) from state split outside it.

  jax.tree.map makes fresh Variable objects that belong to the body's trace:
  NNX transforms inside the module (the layer scans of LSTMStack and
  TransformerStack) refuse Variables created at an outer trace level. The
  values stay closed-over constants of the body, so a scan neither carries
  nor stacks them per step (they are loop-invariant for autodiff too).
  """
  return nnx.merge(graphdef, jax.tree.map(lambda a: a, state))


def _scan_module(module: nnx.Module, fn: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry: Any,
                 xs: Any) -> tuple[Any, Any]:
  """lax.scan of (carry, x) -> fn(module, carry, x), the module rebuilt inside the scan (`_rebuild`)."""
  graphdef, state = nnx.split(module)
  return jax.lax.scan(lambda c, x: fn(_rebuild(graphdef, state), c, x), carry, xs)


def _map_samples(module: nnx.Module, fn: Callable[[nnx.Module, jax.Array], Any], keys: jax.Array) -> Any:
  """fn(module, key) for each key, one after another (the memory of one sample), stacked."""
  return _scan_module(module, lambda m, c, k: (c, fn(m, k)), (), keys)[1]


# ---------------------------------------------------------------------------
# Encoder and decoder shared by the VAE and the mixture
# ---------------------------------------------------------------------------

def _stack(config: ml_collections.ConfigDict, kind: str, *, rngs: nnx.Rngs) -> nnx.Module:
  """An LSTMStack or TransformerStack of the config's width, depth, precision and remat."""
  m = config.model
  if kind == "lstm":
    return lstm.LSTMStack(m.d, m.d, m.layers, forget_bias=m.forget_bias, dropout=m.dropout,
                          remat_policy=config.remat.policy, time_chunk=config.remat.time_chunk, rngs=rngs,
                          **_precision(config))
  return transformer.TransformerStack(m.d, m.layers, m.heads, m.kv_heads, m.mlp_ratio, window=m.window,
                                      rope_base=m.rope_base, dropout=m.dropout, remat_policy=config.remat.policy,
                                      rngs=rngs, **_precision(config))


class Encoder(nnx.Module):
  """q(z|x) = N(mu, diag e^logvar): embedding -> LSTM | Transformer -> pool -> RMSNorm -> Dense.

  Pooling: the LSTM's top-layer hidden state at the last scored position (its
  final state when sequences are right-padded or unpadded); the (causal)
  Transformer's outputs averaged over scored positions.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    kw = _precision(config)
    self.kind, self.latent_dim = m.encoder, m.latent_dim
    self.embed = L.Embed(config.data.vocab_size, m.d, rngs=rngs, **kw)
    self.body = _stack(config, m.encoder, rngs=rngs)
    self.norm = L.RMSNorm(m.d, **kw)
    self.out = L.Dense(m.d, (2, m.latent_dim), axes=("embed", None, "latent"), use_bias=True, rngs=rngs, **kw)

  def __call__(self, tokens: Tokens, weights: Weights | None = None) -> tuple[Float[Array, "b z"], Float[Array, "b z"]]:
    """(mu, logvar) in float32 for each sequence of `tokens` (positions with weight 0 are ignored)."""
    weights = jnp.ones(tokens.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    x = parallel.constrain(self.embed(tokens), ("batch", "length", None))
    if self.kind == "lstm":
      h, _ = self.body(x)
      # Index of the last scored position (the final state for unpadded rows).
      last = jnp.max(jnp.where(weights > 0, jnp.arange(tokens.shape[1]), 0), axis=1)
      pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    else:
      h = self.body(x)
      pooled = jnp.einsum("btd,bt->bd", h.astype(jnp.float32), weights) / jnp.maximum(
          jnp.sum(weights, axis=1, keepdims=True), 1.0)
    out = self.out(self.norm(pooled)).astype(jnp.float32)
    return out[:, 0], out[:, 1]


class Decoder(nnx.Module):
  """An LM p(x | z): embedding -> LSTM | Transformer -> output head(s), optionally conditioned on a code z.

  Conditioning: for the LSTM, z sets every layer's initial state,
  h_0 = tanh(W_h z), c_0 = W_c z (Bowman et al. 2016 feed z only there); for
  the Transformer, W z is added to the embedding at every position. W has no
  bias, so with W = 0 the decoder is exactly the unconditioned LM.

  Args:
    config: the run config (model.decoder, d, layers, ..., precision, remat).
    latent_dim: size of z; 0 builds an unconditioned LM.
    heads: output heads; the mixture's shared body uses one per component,
      giving logits [..., heads, v]. One head may be tied to the embedding.
    mask_token: adds a learned embedding that replaces word-dropped inputs
      (Bowman et al. use <unk>; a separate vector rather than an extra
      vocabulary row keeps the vocabulary dimension shardable).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, latent_dim: int = 0, heads: int = 1,
               mask_token: bool = False, rngs: nnx.Rngs):
    m = config.model
    kw = _precision(config)
    self.kind, self.vocab, self.num_heads = m.decoder, config.data.vocab_size, heads
    self.d, self.num_layers, self.dtype = m.d, m.layers, kw["dtype"]
    self.embed = L.Embed(self.vocab, m.d, rngs=rngs, **kw)
    # Unit variance per coordinate, like the embedded tokens (layers.Embed).
    self.mask_embedding = nnx.Param(jax.random.normal(rngs.params(), (m.d,), jnp.float32).astype(kw["param_dtype"]),
                                    out_sharding=("embed",)) if mask_token else None
    self.body = _stack(config, m.decoder, rngs=rngs)
    # The Transformer stack ends with its own RMSNorm; the LSTM's outputs get one here (as in lstm.Model).
    self.norm = L.RMSNorm(m.d, **kw) if self.kind == "lstm" else None
    if not latent_dim:
      self.z_proj = None
    elif self.kind == "lstm":
      self.z_proj = L.Dense(latent_dim, (m.layers, 2, m.d), axes=("latent", None, None, "embed"), rngs=rngs, **kw)
    else:
      self.z_proj = L.Dense(latent_dim, m.d, axes=("latent", "embed"), rngs=rngs, **kw)
    self.tied = heads == 1 and m.tie_embeddings
    if self.tied:
      self.head = None
    elif heads == 1:
      self.head = L.Dense(m.d, self.vocab, axes=("embed", "vocab"), rngs=rngs, **kw)
    else:
      # Independent random heads: the components start as different LMs (symmetry breaking).
      self.head = L.Dense(m.d, (heads, self.vocab), axes=("embed", "components", "vocab"), rngs=rngs, **kw)

  def _lstm_state(self, z: jax.Array | None, batch: int) -> lstm.State:
    if z is None or self.z_proj is None:
      return self.body.init_state(batch)
    hc = self.z_proj(z.astype(self.dtype)).astype(jnp.float32)  # [b, layers, 2, d]
    return [(jnp.tanh(hc[:, i, 0]).astype(self.dtype), hc[:, i, 1].astype(self.dtype))
            for i in range(self.num_layers)]

  def _embed(self, tokens: jax.Array, z: jax.Array | None, dropped: jax.Array | None = None) -> jax.Array:
    x = self.embed(tokens)
    if dropped is not None:
      x = jnp.where(dropped[..., None], self.mask_embedding[...].astype(x.dtype), x)
    if self.kind == "transformer" and z is not None and self.z_proj is not None:
      shift = self.z_proj(z.astype(self.dtype))  # [b, d]
      x = x + (shift[:, None] if x.ndim == 3 else shift)
    return x

  def logits(self, h: jax.Array) -> jax.Array:
    """Float32 logits [..., v] (one head) or [..., heads, v] from body outputs."""
    if self.norm is not None:
      h = self.norm(h)
    if self.tied:
      return self.embed.attend(h)
    return self.head(h).astype(jnp.float32)

  def __call__(self, tokens: Tokens, z: Float[Array, "b z"] | None = None, *, dropped: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """Next-token logits for every position of `tokens`, [b, t, v] or [b, t, heads, v].

    Args:
      tokens: inputs [b, t].
      z: codes [b, z] to condition on, or None.
      dropped: [b, t] True where word dropout hides the input (needs mask_token).
      dropout_key: enables the stack's dropout.
    """
    x = parallel.constrain(self._embed(tokens, z, dropped), ("batch", "length", None))
    if self.kind == "lstm":
      h, _ = self.body(x, self._lstm_state(z, tokens.shape[0]), dropout_key=dropout_key)
    else:
      h = self.body(x, dropout_key=dropout_key)
    return self.logits(h)

  def init_state(self, batch: int, max_len: int, z: jax.Array | None = None) -> Any:
    """Generation state: per-layer (h, c) from z, or an empty KV cache of `max_len` positions."""
    if self.kind == "lstm":
      return self._lstm_state(z, batch)
    return self.body.init_cache(batch, max_len)

  def step(self, tokens: Int[Array, "b"], state: Any, z: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Consumes one token per sequence: (next-token logits [b, (heads,) v], new state)."""
    x = self._embed(tokens, z)
    if self.kind == "lstm":
      h, state = self.body.step(x, state)
    else:
      h, state = self.body.decode_step(x, state)
    return self.logits(h), state

  def state_bytes(self, context_len: int) -> int:
    """Bytes carried between tokens for one sequence (DESIGN.md): LSTM (h, c) or the KV cache."""
    itemsize = jnp.dtype(self.dtype).itemsize
    if self.kind == "lstm":
      return self.num_layers * 2 * self.d * itemsize
    s = self.body
    return s.num_layers * 2 * s.kv_heads * s.head_dim * s.cache_slots(context_len) * itemsize


def _generate(step: Callable[[nnx.Module, jax.Array, Any], tuple[jax.Array, Any]], module: nnx.Module,
              state: Any, first: Int[Array, "b"], length: int, key: jax.Array | None,
              temperature: float = 1.0) -> Int[Array, "b t"]:
  """Ancestral (key given) or greedy (key None) generation of `length` tokens after `first`.

  Args:
    step: (module, tokens [b], state) -> (logits [b, v], state).
    module: passed to `step` (rebuilt inside the scan, see `_rebuild`).
    state: the initial generation state.
    first: the token each sequence starts from (not part of the output).
  """
  keys = jnp.zeros((length, 2), jnp.uint32) if key is None else jax.random.split(key, length)

  def body(module, carry, k):
    tokens, state = carry
    logits, state = step(module, tokens, state)
    if key is None:
      nxt = jnp.argmax(logits, axis=-1)
    else:
      nxt = jax.random.categorical(k, logits.astype(jnp.float32) / temperature, axis=-1)
    nxt = nxt.astype(jnp.int32)
    return (nxt, state), nxt

  _, out = _scan_module(module, body, (first.astype(jnp.int32), state), keys)
  return out.T


def _first_tokens(first: int | jax.Array | None, batch: int, vocab: int) -> jax.Array:
  """The token generation starts after, per sequence: `first`, or by default a newline.

  Training windows start anywhere in the text, so any byte is a natural first
  input except ones the corpus never contains (like NUL); newline (10) starts
  a fresh line. Vocabularies without byte 10 start from token 0.
  """
  if first is None:
    first = 10 if vocab == 256 else 0
  return jnp.broadcast_to(jnp.asarray(first, jnp.int32), (batch,))


# ---------------------------------------------------------------------------
# Sequence VAE
# ---------------------------------------------------------------------------

class SequenceVAE(nnx.Module):
  """Sequence VAE of Bowman et al. 2016 (config.model.name = "vae"); see the module docstring.

  Against posterior collapse: KL annealing (`kl_schedule`, `kl_warmup_steps`),
  free bits (`free_bits`), word dropout on the decoder inputs (`word_dropout`).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    self.vocab, self.latent_dim = config.data.vocab_size, m.latent_dim
    self.dtype = _precision(config)["dtype"]
    self.schedule, self.warmup, self.free_bits = m.kl_schedule, m.kl_warmup_steps, m.free_bits
    self.word_dropout_rate, self.iw_samples, self.dropout = m.word_dropout, m.iw_samples, m.dropout
    self.encoder = Encoder(config, rngs=rngs)
    # The mask embedding exists whatever the rate, so word_dropout can change on resume.
    self.decoder = Decoder(config, latent_dim=m.latent_dim, mask_token=True, rngs=rngs)

  def encode(self, tokens: Tokens, weights: Weights | None = None) -> tuple[jax.Array, jax.Array]:
    """(mu, logvar) [b, z] of q(z|x) for sequences x = tokens."""
    return self.encoder(tokens, weights)

  def _reconstruction(self, batch: Batch, z: jax.Array, dropped: jax.Array | None = None,
                      dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(-log p(x|z) [b], correct predictions [b]), summed over scored tokens."""
    logits = self.decoder(batch["inputs"], z, dropped=dropped, dropout_key=dropout_key)
    logp, correct = token_log_probs(logits, batch["targets"])
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
    mask = _sequence_mask(w)
    mu, logvar = self.encode(batch["targets"], w)
    return {"kl_d": jnp.sum(gaussian_kl(mu, logvar) * mask[:, None], axis=0), "count": jnp.sum(mask)}

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
    mask = _sequence_mask(w)
    mu, logvar = self.encode(batch["targets"], w)
    z = reparameterize(rngs.latent(), mu, logvar)
    dropped = word_dropout(rngs.dropout(), batch["inputs"].shape, self.word_dropout_rate)
    rec, correct = self._reconstruction(batch, z, dropped, rngs.dropout() if self.dropout > 0 else None)
    kl_bd = gaussian_kl(mu, logvar)
    kl = jnp.sum(kl_bd, axis=1)
    beta = kl_weight(self.schedule, step, self.warmup)
    n_seq = jnp.sum(mask)
    kl_sums = jnp.sum(kl_bd * mask[:, None], axis=0)
    stats = {"kl_d": kl_sums, "count": n_seq} if batch_stats is None else batch_stats
    kl_term = free_bits_kl_sum(kl_sums, n_seq, self.free_bits, stats)  # summed over sequences
    total = jnp.maximum(jnp.sum(w), 1.0)
    loss = (jnp.sum(rec * mask) + beta * kl_term) / total
    nll = (jnp.sum(rec * mask) + jnp.sum(kl * mask)) / total
    metrics = {"loss": loss, "nll": nll, "accuracy": jnp.sum(correct) / total, "weight": jnp.sum(w),
               "rec": _masked_mean(rec, mask), "kl": _masked_mean(kl, mask),
               "elbo": -_masked_mean(rec + kl, mask), "beta": beta, "kl_term": kl_term / jnp.maximum(n_seq, 1.0),
               "active_units": active_units(mu, mask)}
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
      z = reparameterize(k, mu, logvar)
      rec, correct = model._reconstruction(batch, z)
      log_ratio = jnp.sum(gaussian_log_prob(z) - gaussian_log_prob(z, mu, logvar), axis=1)
      return -rec + log_ratio, rec, correct

    return _map_samples(self, one, jax.random.split(key, samples))

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
    mask = _sequence_mask(w)
    mu, logvar = self.encode(batch["targets"], w)
    log_w, rec_s, correct_s = self.log_weights(batch, _key(rngs, "latent"), self.iw_samples, (mu, logvar))
    rec = jnp.mean(rec_s, axis=0)
    kl = jnp.mean(-log_w - rec_s, axis=0)  # log w_i = -rec_i - (log q(z_i|x) - log p(z_i))
    iw_nll = -importance_weighted_bound(log_w)
    total = jnp.maximum(jnp.sum(w), 1.0)
    nll = jnp.sum((rec + kl) * mask) / total
    metrics = {"loss": nll, "nll": nll, "accuracy": jnp.sum(jnp.mean(correct_s, axis=0)) / total,
               "weight": jnp.sum(w), "rec": _masked_mean(rec, mask), "kl": _masked_mean(kl, mask),
               "elbo": -_masked_mean(rec + kl, mask), "iw_nll": _masked_mean(iw_nll, mask),
               "iw_nll_per_token": jnp.sum(iw_nll * mask) / total, "active_units": active_units(mu, mask),
               "kl_analytic": _masked_mean(jnp.sum(gaussian_kl(mu, logvar), axis=1), mask)}
    return nll, metrics

  def decode_greedy(self, z: Float[Array, "b z"], length: int, *, first: int | jax.Array | None = None) -> Tokens:
    """argmax decoding of `length` tokens from codes z, starting after token `first`."""
    state = self.decoder.init_state(z.shape[0], length + 1, z)
    return _generate(lambda dec, tok, s: dec.step(tok, s, z), self.decoder, state,
                     _first_tokens(first, z.shape[0], self.vocab), length, None)

  def sample(self, rngs: nnx.Rngs, batch: int, length: int, *, first: int | jax.Array | None = None,
             temperature: float = 1.0) -> Tokens:
    """Ancestral samples: z ~ N(0, I), then x ~ p(x|z) token by token after `first`."""
    z = jax.random.normal(rngs.latent(), (batch, self.latent_dim), jnp.float32)
    state = self.decoder.init_state(batch, length + 1, z)
    return _generate(lambda dec, tok, s: dec.step(tok, s, z), self.decoder, state,
                     _first_tokens(first, batch, self.vocab), length, rngs.sample(), temperature)

  def num_params(self) -> int:
    return L.param_count(self)

  def state_bytes(self, context_len: int, batch: int = 1) -> int:
    """Working memory (DESIGN.md): the code z (float32) plus the decoder's state, per sequence times batch."""
    return (self.latent_dim * 4 + self.decoder.state_bytes(context_len)) * batch


# ---------------------------------------------------------------------------
# Mixture of sequence models
# ---------------------------------------------------------------------------

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
    kw = _precision(config)
    self.k, self.shared, self.gated = m.components, m.mixture_heads == "shared", m.mixture_prior == "gated"
    self.vocab = config.data.vocab_size
    self.dtype, self.dropout, self.anneal_steps = kw["dtype"], m.dropout, m.mixture_anneal_steps
    if self.shared:
      self.decoder = Decoder(config, heads=m.components, rngs=rngs)
    else:
      @nnx.split_rngs(splits=m.components)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "components"})
      def make(rngs):
        return Decoder(config, rngs=rngs)

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
    logp, _ = token_log_probs(logits, batch["targets"][:, :, None])  # [b, t, c]
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
    w, mask = terms["w"], _sequence_mask(terms["w"])
    total = jnp.maximum(jnp.sum(w), 1.0)
    nll = -jnp.sum(terms["log_px"] * mask) / total
    beta = kl_weight("linear", step if train else None, self.anneal_steps)
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
               "responsibility_entropy": _masked_mean(entropy, mask)}
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

    tokens = _generate(step, self, self._init_state(batch, length + 1), _first_tokens(first, batch, self.vocab), length,
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
# VRNN
# ---------------------------------------------------------------------------

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
    kw = _precision(config)
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
    logp, correct = token_log_probs(self._decode(self._phi_z(z), h), target)
    kl = gaussian_kl(mu_q, lv_q, mu_0, lv_0)  # [b, z]
    log_ratio = jnp.sum(gaussian_log_prob(z, mu_0, lv_0) - gaussian_log_prob(z, mu_q, lv_q), axis=-1)
    return (state, z), {"logp": logp, "correct": correct, "kl": kl, "log_ratio": log_ratio, "mu": mu_q}

  def run(self, batch: Batch, eps: Float[Array, "t b z"]) -> dict[str, jax.Array]:
    """The scan over time with posterior noise `eps`; per-step terms stacked [t, b, ...]."""
    b = batch["inputs"].shape[0]
    carry = (self.rnn.init_state(b), jnp.zeros((b, self.latent_dim), jnp.float32))
    xs = (batch["inputs"].T, batch["targets"].T, eps)
    graphdef, state = nnx.split(self)
    cell = lambda carry, xs: _rebuild(graphdef, state)._cell(carry, xs)
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
    s = self._sequence_terms(batch, _key(rngs, "latent"))
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
    w = batch["weights"].astype(jnp.float32)
    mask = _sequence_mask(w)
    s = self._sequence_terms(batch, rngs.latent())
    total = jnp.maximum(jnp.sum(w), 1.0)
    kl = jnp.sum(s["kl_d"], axis=1)
    # Free bits per dimension on the KL per scored token (the global batch mean over b and t).
    kl_sums, tokens = jnp.sum(s["kl_d"], axis=0), jnp.sum(w)
    stats = {"kl_d": kl_sums, "count": tokens} if batch_stats is None else batch_stats
    kl_term = free_bits_kl_sum(kl_sums, tokens, self.free_bits, stats)
    beta = kl_weight(self.schedule, step, self.warmup)
    loss = (jnp.sum(s["rec"]) + beta * kl_term) / total
    nll = jnp.sum(s["rec"] + kl) / total
    metrics = {"loss": loss, "nll": nll, "accuracy": jnp.sum(s["correct"]) / total, "weight": jnp.sum(w),
               "rec": _masked_mean(s["rec"], mask), "kl": _masked_mean(kl, mask),
               "elbo": -_masked_mean(s["rec"] + kl, mask), "beta": beta,
               "kl_term": kl_term / jnp.maximum(jnp.sum(mask), 1.0),
               "active_units": self._active_units(s["mu"], w)}
    return loss, metrics

  def _active_units(self, mu: Float[Array, "t b z"], w: Weights) -> jax.Array:
    # Over every scored (sequence, step) pair: the per-step code's variation across data.
    return active_units(mu.reshape(-1, self.latent_dim), (w.T > 0).astype(jnp.float32).reshape(-1))

  def evaluate(self, batch: Batch, *, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, Metrics]:
    """True bounds (beta = 1, no free bits) from `iw_samples` posterior trajectories.

    Metrics as SequenceVAE.evaluate (all from the same samples, so
    iw_nll <= -elbo per sequence); iw_nll is Burda et al.'s bound with whole
    trajectories z_{1:T} ~ q as the importance samples. "kl_analytic" sums
    the per-step closed-form KLs along the sampled trajectories.
    """
    w = batch["weights"].astype(jnp.float32)
    mask = _sequence_mask(w)
    keys = jax.random.split(_key(rngs, "latent"), self.iw_samples)
    s = _map_samples(self, lambda model, k: model._sequence_terms(batch, k), keys)  # leading [s]
    rec = jnp.mean(s["rec"], axis=0)
    kl = jnp.mean(-s["log_w"] - s["rec"], axis=0)  # Monte Carlo: sum_t log q(z_t|.) - log p(z_t|h)
    iw_nll = -importance_weighted_bound(s["log_w"])
    total = jnp.maximum(jnp.sum(w), 1.0)
    nll = jnp.sum(rec + kl) / total
    metrics = {"loss": nll, "nll": nll, "accuracy": jnp.sum(jnp.mean(s["correct"], axis=0)) / total,
               "weight": jnp.sum(w), "rec": _masked_mean(rec, mask), "kl": _masked_mean(kl, mask),
               "elbo": -_masked_mean(rec + kl, mask), "iw_nll": _masked_mean(iw_nll, mask),
               "iw_nll_per_token": jnp.sum(iw_nll) / total, "active_units": self._active_units(s["mu"][0], w),
               "kl_analytic": _masked_mean(jnp.mean(jnp.sum(s["kl_d"], axis=-1), axis=0), mask)}
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
      z = reparameterize(k_z, mu_0, lv_0)
      logits = model._decode(model._phi_z(z), h)
      x = jax.random.categorical(k_x, logits / temperature, axis=-1).astype(jnp.int32)
      return (state, z, x), x

    carry = (self.rnn.init_state(batch), jnp.zeros((batch, self.latent_dim), jnp.float32),
             _first_tokens(first, batch, self.vocab))
    _, tokens = _scan_module(self, body, carry, keys)
    return tokens.T

  def num_params(self) -> int:
    return L.param_count(self)

  def state_bytes(self, context_len: int, batch: int = 1) -> int:
    """Working memory (DESIGN.md): the LSTM's (h, c) per layer plus z_{t-1} (float32), per sequence times batch."""
    del context_len
    return (self.num_layers * 2 * self.d * jnp.dtype(self.dtype).itemsize + self.latent_dim * 4) * batch
