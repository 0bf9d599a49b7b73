"""What the latent-variable sequence models share: Gaussians, KL, bounds, the training objective, encoder, decoder.

Three ways to put a random variable behind a byte sequence, one file each,
trained on the same batches as the language models (inputs x_0..x_{T-1},
targets x_1..x_T, weights). The modelled sequence is the targets; the first
input token is given, as it is to a language model, so every number is
comparable with an LM's nats per token.

    vae.py      SequenceVAE (Bowman et al. 2016): one code z per sequence.
    mixture.py  Mixture: p(x) = sum_k pi_k p_k(x) over K LMs, exact likelihood.
    vrnn.py     VRNN (Chung et al. 2015): a latent z_t per step.

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
from wm.models import transformer
from wm.typing import Array, Float, Int, Tokens, Weights

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


def elbo_training_loss(weights: Weights, rec: Float[Array, "b"], kl_d: Float[Array, "b z"],
                       correct: Float[Array, "b"], *, beta: jax.Array, free_bits: float, free_bits_unit: str,
                       batch_stats: dict[str, jax.Array] | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of a latent-variable LM, (rec + beta_t * KL with free bits) per scored token, and its metrics.

  One objective for the sequence VAE (one code per sequence) and the VRNN (a
  code per step, its terms summed over the scored steps of each sequence).

  Args:
    weights: target weights [b, t].
    rec: -log p(x|z) per sequence, summed over its scored tokens.
    kl_d: KL(q || p) per sequence and latent dimension.
    correct: correct next-token predictions per sequence.
    beta: this step's KL weight (`kl_weight`).
    free_bits: lambda in nats per dimension; 0 = off.
    free_bits_unit: what the floor is a mean over: "sequence" (the VAE's code) or "token" (the VRNN's
      per-step codes).
    batch_stats: the global batch's {"kl_d", "count"} (`batch_statistics` summed) when this batch is
      one microbatch of it; None = this batch is the whole batch.

  Returns:
    (loss, metrics): loss, nll (rec + KL, nats per token), accuracy, weight, rec, kl and elbo per
    sequence, beta, and kl_term (the free-bits KL per sequence).
  """
  if free_bits_unit not in ("sequence", "token"):
    raise ValueError(f"free_bits_unit={free_bits_unit!r}: expected 'sequence' or 'token'")
  w = weights.astype(jnp.float32)
  mask = sequence_mask(w)
  # A padding row has no scored token, but the VAE's encoder still gives it a KL: it must not count.
  rec, kl_d = rec * mask, kl_d * mask[:, None]
  kl, kl_sums = jnp.sum(kl_d, axis=1), jnp.sum(kl_d, axis=0)
  count = jnp.sum(mask) if free_bits_unit == "sequence" else jnp.sum(w)
  stats = {"kl_d": kl_sums, "count": count} if batch_stats is None else batch_stats
  kl_term = free_bits_kl_sum(kl_sums, count, free_bits, stats)  # summed over the batch's units
  total = jnp.maximum(jnp.sum(w), 1.0)
  loss = (jnp.sum(rec) + beta * kl_term) / total
  metrics = {"loss": loss, "nll": (jnp.sum(rec) + jnp.sum(kl)) / total, "accuracy": jnp.sum(correct) / total,
             "weight": jnp.sum(w), "rec": masked_mean(rec, mask), "kl": masked_mean(kl, mask),
             "elbo": -masked_mean(rec + kl, mask), "beta": beta,
             "kl_term": kl_term / jnp.maximum(jnp.sum(mask), 1.0)}
  return loss, metrics


def importance_weighted_bound(log_w: Float[Array, "s ..."]) -> jax.Array:
  """log (1/s) sum_i w_i, Burda et al. 2016's bound, from log weights log p(x, z_i) - log q(z_i|x).

  A lower bound on log p(x) for any s; s = 1 is the ELBO's Monte Carlo
  estimate, and its expectation never decreases with s (Burda et al. thm. 1).
  """
  return jax.nn.logsumexp(log_w, axis=0, b=1.0 / log_w.shape[0])


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


def sequence_mask(weights: Weights) -> Float[Array, "b"]:
  """1 for sequences with at least one scored token; padding rows do not count as sequences."""
  return (jnp.sum(weights, axis=-1) > 0).astype(jnp.float32)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def stream_key(rngs: nnx.Rngs | None, stream: str) -> jax.Array:
  # Evaluation without rngs still needs latent samples; a fixed key keeps it deterministic.
  return jax.random.PRNGKey(0) if rngs is None else getattr(rngs, stream)()


def rebuild(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.Module:
  """A module merged inside a JAX transform's body (lax.scan, checkpoint) from state split outside it.

  jax.tree.map makes fresh Variable objects that belong to the body's trace:
  NNX transforms inside the module (the layer scans of LSTMStack and
  TransformerStack) refuse Variables created at an outer trace level. The
  values stay closed-over constants of the body, so a scan neither carries
  nor stacks them per step (they are loop-invariant for autodiff too).
  """
  return nnx.merge(graphdef, jax.tree.map(lambda a: a, state))


def scan_module(module: nnx.Module, fn: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry: Any,
                 xs: Any) -> tuple[Any, Any]:
  """lax.scan of (carry, x) -> fn(module, carry, x), the module rebuilt inside the scan (`rebuild`)."""
  graphdef, state = nnx.split(module)
  return jax.lax.scan(lambda c, x: fn(rebuild(graphdef, state), c, x), carry, xs)


def map_samples(module: nnx.Module, fn: Callable[[nnx.Module, jax.Array], Any], keys: jax.Array) -> Any:
  """fn(module, key) for each key, one after another (the memory of one sample), stacked."""
  return scan_module(module, lambda m, c, k: (c, fn(m, k)), (), keys)[1]


# ---------------------------------------------------------------------------
# Encoder and decoder shared by the VAE and the mixture
# ---------------------------------------------------------------------------

def _stack(config: ml_collections.ConfigDict, kind: str, *, rngs: nnx.Rngs) -> nnx.Module:
  """An LSTMStack or TransformerStack of the config's width, depth, precision and remat."""
  m = config.model
  if kind == "lstm":
    return lstm.LSTMStack(m.d, m.d, m.layers, forget_bias=m.forget_bias, dropout=m.dropout,
                          remat_policy=config.remat.policy, time_chunk=config.remat.time_chunk, rngs=rngs,
                          **L.precision_kwargs(config))
  return transformer.TransformerStack(m.d, m.layers, m.heads, m.kv_heads, m.mlp_ratio, window=m.window,
                                      rope_base=m.rope_base, dropout=m.dropout, remat_policy=config.remat.policy,
                                      attention=m.attention, attention_block=m.attention_block,
                                      rngs=rngs, **L.precision_kwargs(config))


class Encoder(nnx.Module):
  """q(z|x) = N(mu, diag e^logvar): embedding -> LSTM | Transformer -> pool -> RMSNorm -> Dense.

  Pooling: the LSTM's top-layer hidden state at the last scored position (its
  final state when sequences are right-padded or unpadded); the (causal)
  Transformer's outputs averaged over scored positions.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    kw = L.precision_kwargs(config)
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
    kw = L.precision_kwargs(config)
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
    # K > 1 heads are independent random heads, never tied: the components start as different LMs
    # (symmetry breaking).
    self.head = L.output_head(m.d, self.vocab if heads == 1 else (heads, self.vocab),
                              tied=heads == 1 and m.tie_embeddings, rngs=rngs, **kw)

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
    return L.head_logits(self.embed, self.head, h)

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


def sample_tokens(step: Callable[[nnx.Module, jax.Array, Any], tuple[jax.Array, Any]], module: nnx.Module,
              state: Any, first: Int[Array, "b"], length: int, key: jax.Array | None,
              temperature: float = 1.0) -> Int[Array, "b t"]:
  """Ancestral (key given) or greedy (key None) generation of `length` tokens after `first`.

  Args:
    step: (module, tokens [b], state) -> (logits [b, v], state).
    module: passed to `step` (rebuilt inside the scan, see `rebuild`).
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

  _, out = scan_module(module, body, (first.astype(jnp.int32), state), keys)
  return out.T


def first_tokens(first: int | jax.Array | None, batch: int, vocab: int) -> jax.Array:
  """The token generation starts after, per sequence: `first`, or by default a newline.

  Training windows start anywhere in the text, so any byte is a natural first
  input except ones the corpus never contains (like NUL); newline (10) starts
  a fresh line. Vocabularies without byte 10 start from token 0.
  """
  if first is None:
    first = 10 if vocab == 256 else 0
  return jnp.broadcast_to(jnp.asarray(first, jnp.int32), (batch,))
