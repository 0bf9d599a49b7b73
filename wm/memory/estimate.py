"""Analytic bytes per device of one train step, term by term.

    total = params + grads + optimizer + activations + transient + inputs

Every term is a named field of `Estimate`, so a table shows where the bytes go
(DESIGN.md, "Estimated step memory"). The formulas read only the config: no
parameter is created (shapes come from `nnx.eval_shape`) and nothing compiles,
so the planner can score thousands of candidates in a second. `wm.memory.measure`
gives the compiler's figure to hold them against.

Model states (Rajbhandari et al. 2020, ZeRO, sec. 3.1): parameters, gradients
and optimizer state, K bytes per parameter by optimizer and precision (Adam:
two moments in the parameter dtype; SGD with momentum: one; Adagrad: one;
Adafactor: factored row/column statistics, Shazeer & Stern 2018), each
parameter divided by the number of shards holding it: the product of the mesh
axes its logical names map to (FSDP is ZeRO-3: all three are sharded).

Saved activations: what the backward pass keeps per layer (and per time step),
by remat policy; the counts follow what our blocks tag and what XLA keeps (the
model-specific derivations are on `_transformer` and `_lstm` below). Layers are
scanned (Transformer) or looped (LSTM), and every layer's saved tensors are
alive together when the backward pass starts.

Transient: the largest working set on top of the saved activations: the
loss head (logits and their gradient), or the backward pass of one layer
(which, under remat, first recomputes that layer's forward). When the
gradients of all parameters exist and the activations are gone, the optimizer
update needs one more gradient-sized buffer; if that moment is the larger one,
it is the peak (`phase == "update"`) and the activation term is zero there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wm import models, parallel
from wm.models import remat as remat_lib

TERMS = ("params", "grads", "optimizer", "activations", "transient", "inputs")
_F32 = 4


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Estimated bytes per device of one train step.

  Attributes:
    params, grads, optimizer: model states per device (ZeRO accounting).
    activations: saved for the backward pass, all layers (0 if the peak is
      the optimizer update, when none are alive).
    transient: the largest working set at the peak (loss head, one layer's
      backward pass with its recomputation, or the optimizer update).
    inputs: this device's slice of the batch (inputs, targets, weights).
    total: the sum of the six terms.
    phase: "backward" or "update": when the peak happens.
    num_devices, mesh: the device count and mesh axis sizes assumed.
    detail: the quantities the terms were computed from (parameter count,
      per-layer saved bytes, ...), for tables and tests.
  """
  params: int
  grads: int
  optimizer: int
  activations: int
  transient: int
  inputs: int
  total: int
  phase: str
  num_devices: int
  mesh: dict[str, int]
  detail: dict[str, Any]

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def dominant(self) -> str:
    """The term holding the most bytes."""
    return max(TERMS, key=lambda name: getattr(self, name))


# ---------------------------------------------------------------------------
# Parameters: shapes and logical names without creating any array
# ---------------------------------------------------------------------------

def _shape_key(config: ml_collections.ConfigDict) -> str:
  # Parameter shapes depend on the model, vocabulary and parameter dtype only;
  # remat, batch, mesh and optimizer leave them unchanged, so the planner's
  # many candidates share one abstract model.
  return json.dumps([config.model.to_dict(), config.data.vocab_size, config.precision.param_dtype,
                     config.precision.compute_dtype], sort_keys=True, default=str)


@functools.lru_cache(maxsize=64)
def _param_leaves_cached(key: str) -> tuple[tuple[tuple[int, ...], int, tuple], ...]:
  model_cfg, vocab, param_dtype, compute_dtype = json.loads(key)
  from wm import config as config_lib
  config = config_lib.base_config()
  config.model.update(model_cfg)
  config.data.vocab_size = vocab
  config.precision.param_dtype, config.precision.compute_dtype = param_dtype, compute_dtype
  model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
  leaves = []
  for var in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    value = var.get_value() if hasattr(var, "get_value") else var.value
    names = tuple(var.get_metadata().get("out_sharding") or ())
    if len(names) != len(value.shape):
      names = (None,) * len(value.shape)
    leaves.append((tuple(value.shape), jnp.dtype(value.dtype).itemsize, names))
  return tuple(leaves)


def param_leaves(config: ml_collections.ConfigDict) -> tuple[tuple[tuple[int, ...], int, tuple], ...]:
  """(shape, itemsize, logical names) of every parameter of the config's model."""
  return _param_leaves_cached(_shape_key(config))


def _axes(rule) -> tuple[str, ...]:
  if rule is None:
    return ()
  return tuple(rule) if isinstance(rule, (tuple, list)) else (rule,)


def shards(names: tuple, rules: dict, sizes: dict[str, int], shape: tuple[int, ...] | None = None) -> int:
  """How many ways a tensor with these logical axis names is split over the mesh.

  A dimension that does not divide by its mesh axes is left whole (make_setup
  rejects such a mesh; the planner uses this to skip it).
  """
  ways, used = 1, set()
  for i, name in enumerate(names):
    axes = [a for a in _axes(rules.get(name)) if a not in used]
    n = math.prod(sizes.get(a, 1) for a in axes)
    if shape is not None and shape[i] % n:
      continue
    ways *= n
    used.update(axes)
  return ways


def fits_mesh(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> bool:
  """Whether every sharded parameter dimension divides by its mesh axes."""
  rules = dict(parallel.rules(config))
  for shape, _, names in param_leaves(config):
    for dim, name in zip(shape, names):
      n = math.prod(sizes.get(a, 1) for a in _axes(rules.get(name)))
      if dim % n:
        return False
  return True


def _optimizer_values(config: ml_collections.ConfigDict, shape: tuple[int, ...]) -> tuple[float, float]:
  """(values sharded like the parameter, values replicated) of optimizer state per parameter.

  ZeRO's K (Rajbhandari et al. 2020, sec. 3.1) in parameter-sized units:
  AdamW 2 (first and second moments), SGD 1 with momentum else 0, Adagrad 1.
  Adafactor (Shazeer & Stern 2018, sec. 3) keeps, for a matrix whose two
  largest dims are >= 128, a row and a column statistic (optax's
  min_dim_size_to_factor), otherwise a full second moment. Factored vectors
  have fewer dims than the parameter's logical names and stay replicated
  (wm.step._variable_shardings).
  """
  name = config.optim.name
  if name == "adamw":
    return 2.0, 0.0
  if name == "sgd":
    return (1.0 if config.optim.momentum else 0.0), 0.0
  if name == "adagrad":
    return 1.0, 0.0
  # adafactor
  size = math.prod(shape)
  if len(shape) >= 2:
    order = sorted(range(len(shape)), key=lambda i: shape[i])
    d1, d0 = order[-2], order[-1]
    if shape[d1] >= 128:
      row = size // shape[d0]
      col = size // shape[d1]
      return 0.0, (row + col + 2) / size
  return 1.0, 3.0 / max(size, 1)


# ---------------------------------------------------------------------------
# Activations by model family
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Acts:
  saved: float  # bytes kept for the backward pass, all layers
  layer_transient: float  # one layer's backward working set (with recomputation)
  head_transient: float  # logits, their gradient and the loss head
  detail: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Dims:
  """Per-device sizes: batch split over the batch axes and microbatches, widths over tensor."""
  b: int  # sequences per device per microbatch
  t: int  # sequence length
  d: int
  vocab: int  # vocabulary entries per device (logits are split over "vocab")
  tensor: int  # ways of the tensor axis
  c: int  # compute dtype bytes


def _dims(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> _Dims:
  rules = dict(parallel.rules(config))
  batch_ways = math.prod(sizes.get(a, 1) for a in _axes(rules.get("batch")))
  b = max(config.data.batch_size // (config.optim.microbatches * batch_ways), 1)
  vocab_ways = math.prod(sizes.get(a, 1) for a in _axes(rules.get("vocab")))
  vocab = math.ceil(config.data.vocab_size / vocab_ways)
  tensor = math.prod(sizes.get(a, 1) for a in _axes(rules.get("mlp")))
  c = jnp.dtype(config.precision.compute_dtype).itemsize
  return _Dims(b, config.data.seq_len, config.model.d, vocab, tensor, c)


def _policy_names(policy: str) -> tuple[str, set[str]]:
  base = policy.split(":", 1)[0]
  names = set()
  if ":" in policy:
    names = {n.strip() for n in policy.split(":", 1)[1].split(",") if n.strip()}
  return base, names


# What one Transformer layer's backward pass holds besides the saved tensors,
# per policy, as multiples of four per-device quantities: a [b, t, d] f32
# array, a [b, t, f] f32 array, one f32 attention-score array [b, h, t, t] and
# the layer's parameter bytes. Under remat this is the recomputed forward of
# the layer plus the gradients flowing back through it; XLA fuses part of the
# recomputation into its consumers, so the counts are not the no-remat
# residual counts. Fitted (least squares) to XLA's CPU buffer assignment over
# widths 64-128, mlp_ratio 2-4, 4-8 heads and lengths 32-128 (see
# tests/test_memory.py for the check against the compiler).
_LAYER_TRANSIENT = {
    "none": (10.11, 2.83, 2.35, 1.26),
    "full": (3.14, 6.76, 3.65, 1.21),
    "dots": (6.73, 2.33, 3.00, 1.74),
    "dots_no_batch": (3.60, 3.88, 2.71, 1.40),
    "qkv": (3.14, 6.76, 3.65, 1.21),
    "attn_context": (11.34, 5.71, 1.22, 0.93),
    "attn_out": (5.29, 6.51, 1.23, 1.12),
    "mlp_hidden": (0.63, 1.74, 4.66, 1.63),
}
# [b, t, d] f32 arrays the loss head holds beside the logits (final norm and its gradient).
_HEAD_STREAM = 4


def _transformer_layer(config: ml_collections.ConfigDict, dims: _Dims, policy: str,
                       layer_param_bytes: float, backend: str) -> tuple[float, float, dict[str, Any]]:
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
               scores: 2 h S f32 (Korthikanti's 5as/h term: their softmax
               output and dropout mask and output; we have no dropout, and
               XLA keeps the masked scores and the softmax output), plus
               2 h f32 softmax statistics.
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
  """
  m = config.model
  b, t, d, c, tp = dims.b, dims.t, dims.d, dims.c, dims.tensor
  h, kv = m.heads / tp, m.kv_heads / tp
  e = m.d // m.heads
  f = m.mlp_ratio * d / tp
  tokens = b * t
  qkv = (h * e + 2 * kv * e)  # q, k and v after rotary
  base, names = _policy_names(policy)
  if base == "offload" and backend not in ("cpu",):
    base, names = "full", set()
  elif base == "offload":
    base = "save"
  x = d * c
  if base == "none":
    per_token = (2 * d * c + (6 * d + 4) * _F32 + qkv * c + h * e * c + 2 * h * t * _F32 + 2 * h * _F32
                 + 6 * f * c)
  elif base == "full":
    per_token = x
  elif base == "dots":
    per_token = x + (qkv + h * t + h * e + d + f) * _F32
  elif base == "dots_no_batch":
    per_token = x + (qkv + d + f) * _F32
  else:  # save
    sizes = {"qkv": qkv, "attn_context": h * e, "attn_out": d, "mlp_hidden": f}
    per_token = x + sum(sizes[n] for n in names) * c
  saved = tokens * per_token

  # One layer's backward working set: see _LAYER_TRANSIENT.
  if base in ("none", "full", "dots", "dots_no_batch"):
    keys = [base]
  else:
    keys = sorted(names) or ["full"]
  coef = [max(_LAYER_TRANSIENT[k][i] for k in keys) for i in range(4)]
  transient = (coef[0] * tokens * d * _F32 + coef[1] * tokens * f * _F32 + coef[2] * b * h * t * t * _F32
               + coef[3] * layer_param_bytes)
  return saved, transient, {"saved_per_layer": int(saved), "saved_per_token_per_layer": per_token}


def _head_transient(dims: _Dims, heads: int = 1) -> float:
  """The loss head: f32 logits and their gradient, [b, t, heads, V] each, plus a few [b, t, d]."""
  tokens = dims.b * dims.t
  return 2 * tokens * heads * dims.vocab * _F32 + _HEAD_STREAM * tokens * dims.d * _F32
