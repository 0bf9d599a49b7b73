"""Saved activations and transient working sets of one train step, by model family and remat policy.

Saved activations: what the backward pass keeps per layer (and per time step),
by remat policy; the counts follow what our blocks tag and what XLA keeps (the
derivations are in the docstrings of `_transformer_layer`, `_lstm_layer` and
`by_family`). Both stacks scan over layers, so every layer's saved tensors
are alive together when the backward pass starts, next to every gradient
(the scan's stacked gradient buffer) and, with microbatches, the gradient
accumulator (`wm.memory.estimate`). The LSTM language model in time chunks
saves only the carries between chunks, and holds one chunk's activations at a
time and a gradient accumulator over the chunks (`_lstm_time_chunks`).

Transient: the largest working set on top of those: the loss head (logits
and their gradient), or the backward pass of one layer (which, under remat,
first recomputes that layer's forward). Unlike the saved counts these are
not derivable from the model code alone (the compiler fuses part of each
recomputation into its consumers and schedules differently per backend), so
their coefficients live in `wm.memory.calibration`, one fitted table per
backend; this module holds no fitted number.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import ml_collections

from wm import parallel
from wm.memory import calibration, sharding
from wm.models import remat as remat_lib

_F32 = 4


@dataclasses.dataclass(frozen=True)
class Levers:
  """The settings the planner varies; `Levers.of(config)` reads them from a config."""
  policy: str
  microbatches: int
  time_chunk: int
  mesh: tuple[tuple[str, int], ...] | None = None  # axis sizes; None = from config.mesh
  attention: str | None = None  # model.attention; None = the config's
  attention_block: int | None = None  # model.attention_block; None = the config's

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "Levers":
    return cls(config.remat.policy, config.optim.microbatches, config.remat.time_chunk)


@dataclasses.dataclass(frozen=True)
class Acts:
  """What a model family's forward and backward passes hold beyond the model states (per device)."""
  saved: float  # bytes kept for the backward pass, all layers
  layer_transient: float  # one layer's backward working set (with recomputation)
  head_transient: float  # logits, their gradient and the loss head
  detail: dict[str, Any]
  # Gradient-sized buffers the backward pass adds to the one gradient: a scan
  # over time chunks that sums every chunk's parameter gradients holds its
  # running sum and the chunk's own, as microbatches do (`estimate`).
  extra_grads: int = 0


@dataclasses.dataclass(frozen=True)
class Dims:
  """Per-device sizes: batch split over the batch axes and microbatches, widths over tensor."""
  b: int  # sequences per device per microbatch
  t: int  # sequence length
  d: int
  vocab: int  # vocabulary entries per device (logits are split over "vocab")
  tensor: int  # ways of the tensor axis
  c: int  # compute dtype bytes
  attention: str = "xla"  # model.attention
  block: int = 512  # model.attention_block


def per_device_dims(config: ml_collections.ConfigDict, sizes: dict[str, int], microbatches: int,
                    levers: Levers | None = None, backend: str | None = None) -> Dims:
  """The sizes one device works on, on a mesh with axis `sizes`, for `backend`'s arithmetic."""
  rules = dict(parallel.rules(config))
  b = max(config.data.batch_size // (microbatches * sharding.batch_ways(config, sizes)), 1)
  vocab_ways = math.prod(sizes.get(a, 1) for a in sharding.axes(rules.get("vocab")))
  vocab = math.ceil(config.data.vocab_size / vocab_ways)
  tensor = math.prod(sizes.get(a, 1) for a in sharding.axes(rules.get("mlp")))
  c = jnp.dtype(config.precision.compute_dtype).itemsize
  if backend == "cpu":
    # XLA CPU has no 16-bit arithmetic: its float normalization runs bfloat16 operations in f32, and most
    # tensors a backward pass reads (the layer scan's stacked residuals) are converted to f32 once, before it
    # starts (read off the compiled steps' buffers; some, like the attention probabilities, stay bf16). What
    # the backward pass holds is mostly f32-sized; calibration.Table.saved_scale carries the rest.
    c = _F32
  attention = (levers and levers.attention) or config.model.get("attention", "xla")
  block = (levers and levers.attention_block) or config.model.get("attention_block", 512)
  return Dims(b, config.data.seq_len, config.model.d, vocab, tensor, c, attention, block)


def policy_names(policy: str) -> tuple[str, set[str]]:
  """A remat policy's base and the tags it names: "save:qkv,mlp_hidden" -> ("save", {"qkv", "mlp_hidden"})."""
  base = policy.split(":", 1)[0]
  names = set()
  if ":" in policy:
    names = {n.strip() for n in policy.split(":", 1)[1].split(",") if n.strip()}
  return base, names


def _transformer_layer(config: ml_collections.ConfigDict, dims: Dims, policy: str,
                       layer_param_bytes: float, backend: str,
                       cal: calibration.Table) -> tuple[float, float, dict[str, Any]]:
  """Saved bytes and backward working set of one Transformer layer (per device).

  Korthikanti et al. 2022 (sec. 4.1, eq. 1) count the activations one GPT
  layer keeps without recomputation as s*b*h*(34 + 5*a*s/h) bytes in 16-bit:
  every tensor the backward pass reads, grouped by where it comes from. We
  count the same way for our block (wm/models/transformer.py: pre-RMSNorm,
  rotary GQA attention, GELU MLP, no dropout) per token, in elements, with
  f = mlp_ratio * d, e = d / heads, k = kv_heads, S = t keys:

    stream     x (the layer input, kept by every policy) and the residual
               sum after attention: 2 d (compute dtype); each RMSNorm keeps
               x in f32, x * rsqrt(mean x^2) and the scaled output: 3 d f32,
               plus two [b, t, 1] statistics; two norms: 6 d + 4.
    attention  q, k, v after rotary: d + 2 k e; the context: d;
               scores: h S (4 + c) bytes (Korthikanti's 5as/h term: their
               softmax output and dropout mask and output; we have no
               dropout: XLA keeps the f32 softmax output and the
               probabilities the context einsum reads, in the compute dtype,
               a second f32 buffer in f32; read off the compiled steps'
               buffers), plus 2 h f32 softmax statistics.
    MLP        the up projection and GELU's tanh-approximation intermediates:
               6 f (Korthikanti keep 2: input and GELU output; the tanh form
               keeps its polynomial, tanh, and products as separate tensors).

  Policies keep (beside x): `full` nothing; `dots` every matmul output in
  f32 (preferred_element_type): q, k, v, the scores (h S), the context
  (d), out-projection (d) and up-projection (f); `dots_no_batch` the weight
  matmuls only (q, k, v, out, up): the score and context einsums have batch
  dimensions and are recomputed; `save:<tags>` the tagged tensors, in the
  compute dtype: qkv (d + 2 k e), attn_context (d), attn_out (d), mlp_hidden
  (f). `offload:<tags>` keeps them in host memory on TPU/GPU (device bytes as
  `full`); the CPU backend has no host memory space, so there it acts as save.
  With tensor parallelism (Korthikanti et al. sec. 4.2.2) heads and f are
  split t ways; the stream tensors are replicated.

  Attention implementations (wm/models/attention.py) change the score terms:
  `xla` materialises [b, h, t, t] scores (S = t keys per row); `chunked`
  (Rabe & Staats 2021) only one key block at a time (S = block) and its
  backward pass keeps the row log-sum-exp (h f32 per token) instead of the
  2 h t scores; the fused kernels (`cudnn`, `splash`) keep no scores in
  device memory (S = 0) and the log-sum-exp.
  """
  m = config.model
  b, t, d, c, tp = dims.b, dims.t, dims.d, dims.c, dims.tensor
  h, kv = m.heads / tp, m.kv_heads / tp
  e = m.d // m.heads
  f = m.mlp_ratio * d / tp
  tokens = b * t
  qkv = (h * e + 2 * kv * e)  # q, k and v after rotary
  impl = dims.attention
  keys_per_row = {"xla": t, "chunked": min(dims.block, t)}.get(impl, 0)
  # xla: the f32 softmax output for its own backward pass, and the probabilities the context einsum read
  # (cast to the compute dtype; in f32 a second f32 buffer), plus two f32 row statistics; otherwise the
  # row log-sum-exp only.
  scores_saved = h * t * (_F32 + c) + 2 * h * _F32 if impl == "xla" else h * _F32
  base, names = policy_names(policy)
  names &= {"qkv", "attn_context", "attn_out", "mlp_hidden"}  # an LSTM half's tags save nothing here
  if base in ("save", "offload") and not names:
    base = "full"
  tag_sizes = {"qkv": qkv, "attn_context": h * e, "attn_out": d, "mlp_hidden": f}
  host = 0.0
  if base == "offload" and backend not in ("cpu",):
    # The tagged tensors go to host memory (TPU/GPU memory kind pinned_host): counted apart from the device.
    host = tokens * sum(tag_sizes[n] for n in names) * c
    base, names = "full", set()
  elif base == "offload":
    base = "save"
  x = d * c
  if base == "none":
    per_token = (2 * d * c + (6 * d + 4) * _F32 + qkv * c + h * e * c + scores_saved + 6 * f * c)
  elif base == "full":
    per_token = x
  elif base == "dots":
    per_token = x + (qkv + (h * t if impl == "xla" else h) + h * e + d + f) * _F32
  elif base == "dots_no_batch":
    per_token = x + (qkv + d + f) * _F32
  else:  # save
    per_token = x + sum(tag_sizes[n] for n in names) * c
  saved = tokens * per_token

  # One layer's backward working set: calibrated (wm.memory.calibration).
  if base in ("none", "full", "dots", "dots_no_batch"):
    keys = [base]
  else:
    keys = sorted(names) or ["full"]
  units = (tokens * d * _F32, tokens * f * _F32, b * h * t * keys_per_row * _F32, layer_param_bytes,
           tokens * d * c, tokens * f * c)
  fits = ([cal.layer_transient[k] for k in keys]
          + [cal.layer_transient_alt[k] for k in keys if k in cal.layer_transient_alt])
  transient = max(sum(c * u for c, u in zip(coef, units)) for coef in fits)
  return saved, transient, {"saved_per_layer": int(saved), "saved_per_token_per_layer": per_token,
                            "host_per_layer": int(host)}


def _head_transient(dims: Dims, cal: calibration.Table, heads: int = 1) -> float:
  """The loss head: f32 logits and their gradient, [b, t, heads, V] each, plus a few [b, t, d] (calibrated)."""
  tokens = dims.b * dims.t
  return 2 * tokens * heads * dims.vocab * _F32 + cal.head_stream * tokens * dims.d * _F32


def _lstm_layer(config: ml_collections.ConfigDict, dims: Dims, policy: str,
                time_chunk: int, backend: str, cal: calibration.Table,
                microbatches: int = 1) -> tuple[float, float, dict[str, Any]]:
  """Saved bytes of one LSTM layer and the backward working set of one layer (per device).

  For an `LSTMStack` run over the whole sequence: the latent models' stacks,
  and the LSTM language model without time chunks (with them it runs the
  stack unchunked over each chunk, `_lstm_time_chunks`).

  Derivation (wm/models/lstm.py). The input projection x W_x + b is one
  matmul over all steps, x_proj [t, b, 4d]; the time scan runs the cell

      gates = x_proj_t + h W_h;  c' = s(f) c + s(i) tanh(g);  h' = s(o) tanh(c')

  and, without remat, JAX's scan keeps per step 12 [b, d] f32 residuals for
  the backward pass: the four gate nonlinearities and their derivative
  factors, c, tanh(c'), h (for dW_h) and the f32 casts (jax.ad_checkpoint's
  saved_residuals lists them). With the layer input x (kept by every policy,
  for dW_x) and half a [b, t, d] of output staging, one layer keeps per token:

      none           13.5 d
      full           1 d           (x; the layer's scans are rerun in backward)
      dots           9 d           (x, and both matmul outputs: x W_x and h W_h, 4d each)
      save:<tags>    1 d + gates 4 d, h 1 d, c 1 d

  Layers are scanned (stacked parameters), so one layer's recomputation is
  alive at a time. Time chunking (`remat.time_chunk` = k, Chen et al. 2016)
  matters under `none`: the outer scan over t/k chunks keeps only the carry
  (h, c) entering each chunk, plus the chunk inputs x_proj that a chunk reads
  again when it is recomputed:

      none, chunk k  (1 + 4 + 0.5) d per token + 2 d per chunk

  and each chunk's backward pass recomputes its k steps (12 d per step). So
  the recurrent part, 2 d t/k + 12 d k per sequence, is smallest at
  k = sqrt(t), where it grows as sqrt(t); the per-token part (the inputs the
  chunks read again) stays linear in t. Under a remat policy other than
  none the layer's saved tensors are as above whatever the chunk.
  """
  b, t, d, c, tp = dims.b, dims.t, dims.d, dims.c, dims.tensor
  tokens = b * t
  k = remat_lib.resolve_time_chunk(time_chunk, t)
  base, names = policy_names(policy)
  names &= {"gates", "h", "c"}  # another stack's tags (a latent model's Transformer half) save nothing here
  if base in ("save", "offload") and not names:
    base = "full"
  if base == "dots_no_batch":  # x W_x and h W_h have no batch dimensions in their dot_general: same as dots
    base = "dots"
  host = 0.0
  if base == "offload" and backend != "cpu":  # tagged tensors kept in host memory
    host = tokens * sum({"gates": 4.0, "h": 1.0, "c": 1.0}[n] for n in names) * d / tp * _F32
  if base == "offload":
    base = "save" if backend == "cpu" else "full"
  if base == "dots_no_batch":  # every LSTM matmul has a batch dimension: nothing is saveable, as under full
    base = "full"
  if base == "none" and k:
    per_token = d * c + 4.5 * d / tp * _F32
    saved = tokens * per_token + 2 * b * (t // k) * d * c
    key = "none/chunk"
  else:
    inner = {"none": 12.5, "full": 0.0, "dots": 8.0}.get(base, 0.0)
    if base == "save":
      inner = sum({"gates": 4.0, "h": 1.0, "c": 1.0}[n] for n in names)
    per_token = d * c + inner * d / tp * _F32
    saved = tokens * per_token
    key = base if base != "save" else "save:" + ",".join(sorted(names))
  coef = cal.lstm_transient.get(key)
  if coef is None:  # several tags: the largest working set of any of them
    coef = max((cal.lstm_transient[f"save:{n}"] for n in names), key=lambda x: x[0])
  layer_params = (2 * d * 4 * d + 4 * d) / tp * jnp.dtype(config.precision.param_dtype).itemsize
  if backend == "cpu":  # weight-sized working buffers are f32 on XLA CPU (wm.memory.estimate, `widen`)
    layer_params = (2 * d * 4 * d + 4 * d) / tp * _F32
  transient = coef[0] * tokens * d * _F32 + coef[1] * layer_params
  if k and base == "full":
    key += "/chunk"
    coef = cal.lstm_transient["full/chunk"]
    transient = coef[0] * tokens * d * _F32 + coef[1] * layer_params
  if k:
    transient += 12 * b * k * d / tp * _F32  # one chunk's recomputed residuals
  if backend == "cpu" and config.precision.compute_dtype != "float32":
    # XLA CPU runs the 16-bit matmuls in f32: the weights they read are converted to f32, and the time scan's
    # loop-invariant W_h (and the W_x of the projection before it) are converted once, hoisted out of the
    # loop: one layer's weights in f32 alive through its backward pass (measured, 2-layer d=256 LSTM: temp
    # +1.6 MiB with bfloat16 compute, 1 and 2 microbatches). With bfloat16 parameters and microbatches the
    # conversion is hoisted out of the microbatch loop as well: the whole stack's weights in f32 (buffer
    # listing of the same step with 4 microbatches: f32 copies of both stacked kernels beside the gradients).
    hoisted = config.model.layers if microbatches > 1 and config.precision.param_dtype != "float32" else 1
    transient += hoisted * (2 * d * 4 * d + 4 * d) / tp * _F32
  return saved, transient, {"saved_per_layer": int(saved), "time_chunk": k, "host_per_layer": int(host)}


def _lstm_time_chunks(config: ml_collections.ConfigDict, dims: Dims, levers: Levers, k: int, backend: str,
                      cal: calibration.Table) -> Acts:
  """The LSTM language model run in time chunks of k < t steps (wm/models/lstm.py, `Model.loss`).

  One scan over the t/k chunks runs the whole model a chunk at a time
  (embedding, every layer, norm, head and loss), each chunk rematerialized
  whole (Chen et al. 2016, sec. 4). Its forward pass keeps only the carry
  entering each chunk, every layer's (h, c) in the compute dtype:

      saved = (t / k) * layers * 2 * b * d

  and its backward pass holds one chunk's: the unchunked model on k steps,
  i.e. the saved activations of every layer under the layer policy
  (`_lstm_layer` at t = k) plus the larger of one layer's backward pass and
  the loss head, at b * k tokens. Nothing [b, t, ...] is alive but the
  batch, so at k = sqrt(t) both parts grow as sqrt(t); what does not grow
  with t (gradients, optimizer state and update) is counted by `estimate`
  as for any model, but the backward pass of the chunk scan holds two sets
  of parameter gradients, the sum over the chunks so far and the chunk's
  own (`Acts.extra_grads`), as gradient accumulation over microbatches does.
  """
  layers = config.model.layers
  chunk_dims = dataclasses.replace(dims, t=k)
  per_layer, layer_transient, detail = _lstm_layer(config, chunk_dims, levers.policy, 0, backend, cal,
                                                   levers.microbatches)
  head = _head_transient(chunk_dims, cal)
  # The chunk's own saved activations are alive through its backward pass, widened like any saved activations.
  chunk_saved = layers * per_layer * cal.saved_scale.get(config.precision.compute_dtype, 1.0)
  carries = (dims.t // k) * layers * 2 * dims.b * dims.d * dims.c
  detail = dict(detail, time_chunk=k, chunk_carries=int(carries), chunk_saved=int(chunk_saved))
  return Acts(carries, chunk_saved + layer_transient, chunk_saved + head, detail, extra_grads=1)


def _stack_acts(config: ml_collections.ConfigDict, kind: str, dims: Dims, levers: Levers,
                layer_param_bytes: float, backend: str,
                cal: calibration.Table) -> tuple[float, float, dict[str, Any]]:
  """All layers of one LSTM or Transformer stack: (saved, layer transient, detail)."""
  layers = config.model.layers
  if kind == "transformer":
    per_layer, transient, detail = _transformer_layer(config, dims, levers.policy, layer_param_bytes, backend, cal)
  else:
    per_layer, transient, detail = _lstm_layer(config, dims, levers.policy, levers.time_chunk, backend, cal,
                                               levers.microbatches)
  return layers * per_layer, transient, detail


def by_family(config: ml_collections.ConfigDict, dims: Dims, levers: Levers, layer_param_bytes: float,
              param_bytes: float, backend: str, cal: calibration.Table) -> Acts:
  """Saved activations and transients of the config's model family.

  The latent models reuse the stacks (wm/models/latent.py, vae.py, mixture.py, vrnn.py):

    vae       an encoder stack (model.encoder) and a decoder stack
              (model.decoder) over the same tokens: saved bytes add; the
              code z ([b, latent_dim]) is negligible. The head is the LM's.
    mixture   "shared": one decoder stack and K heads, logits [b, t, K, V];
              the head transient is K LM heads plus the softmax the predictive
              accuracy reads (one more [b, t, K, V]). "separate": K decoder
              stacks (vmapped: their saved bytes add), same head.
    vrnn      one time scan over a cell with the LSTM stack (input 2d), the
              prior, posterior and decoder MLPs (width d) and a V-way softmax
              per step. Per step and sequence it keeps the LSTM's residuals
              (13.5 d per layer, as above; split over tensor like the gates),
              about 12 d for the three MLPs (half of it, the hidden layers,
              split over tensor),
              the concatenations and the latent sample, and 3 V f32 for the
              step's logits, log-softmax and its gradient. With time chunks of
              k steps it keeps the carries (2 d per layer + z per chunk), the
              per-step inputs and outputs (KL and posterior mean, 2 z + 1 f32
              per step), and recomputes one chunk (the transient); every
              chunk's backward pass also makes a full set of parameter
              gradients that the outer scan adds up, which with its other
              buffers comes to about 1.7 parameter sizes (measured).
  """
  m = config.model
  tokens = dims.b * dims.t
  name = m.name
  if name == "lstm":
    k = remat_lib.resolve_time_chunk(levers.time_chunk, dims.t)
    if 0 < k < dims.t:
      return _lstm_time_chunks(config, dims, levers, k, backend, cal)
  if name in ("transformer", "lstm"):
    saved, transient, detail = _stack_acts(config, name, dims, levers, layer_param_bytes, backend, cal)
    return Acts(saved, transient, _head_transient(dims, cal), detail)
  if name == "vae":
    enc, enc_t, _ = _stack_acts(config, m.encoder, dims, levers, layer_param_bytes, backend, cal)
    dec, dec_t, detail = _stack_acts(config, m.decoder, dims, levers, layer_param_bytes, backend, cal)
    return Acts(enc + dec, max(enc_t, dec_t), _head_transient(dims, cal), detail)
  if name == "mixture":
    k = m.components
    dec, dec_t, detail = _stack_acts(config, m.decoder, dims, levers, layer_param_bytes, backend, cal)
    if m.mixture_heads == "separate":
      dec, dec_t = k * dec, k * dec_t
    # K components' logits, their gradient, log-softmax and posterior (count calibrated).
    head = cal.mixture_head_logits * tokens * k * dims.vocab * _F32 + cal.head_stream * tokens * dims.d * _F32
    return Acts(dec, dec_t, head, detail)
  # vrnn
  d, v, z, layers, tp = dims.d, dims.vocab, m.latent_dim, m.layers, dims.tensor
  # The LSTM's residuals are [b, 4d]/[b, d] slices of the gates, split over "gates" (tensor); of the MLPs'
  # 12 d, the three hidden layers before and after their ReLU (6 d) are split over "mlp" (tensor), the
  # concatenations [x, h], [z, h] and phi(z) are replicated; the logits are already V / tensor.
  per_step = (layers * 13.5 * d / tp + 6 * d / tp + 6 * d + 4 * z + 3 * v) * _F32
  chunk = remat_lib.resolve_time_chunk(levers.time_chunk, dims.t)
  if chunk:
    carries = dims.b * (dims.t // chunk) * (2 * layers * d + z) * _F32
    saved = carries + tokens * (3 + 2 * z + 1) * _F32  # chunk inputs (tokens, targets, noise) and outputs
    transient = dims.b * chunk * per_step + cal.vrnn_chunk_grads * param_bytes
  else:
    saved, transient = tokens * per_step, tokens * 4 * d * _F32
  return Acts(saved, transient, 2 * tokens * 3 * _F32, {"saved_per_step": per_step, "time_chunk": chunk})
