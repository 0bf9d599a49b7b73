"""Analytic bytes per device of one train step, term by term.

    total = params + grads + optimizer + activations + transient + inputs

Every term is a named field of `Estimate`, so a table shows where the bytes go
(DESIGN.md, "Estimated step memory"). The formulas read only the config: no
parameter is created (shapes come from `nnx.eval_shape`) and nothing compiles,
so the planner can score thousands of candidates in a second. `wm.memory.measure`
gives the compiler's figure to hold them against.

Model states (Rajbhandari et al. 2020, ZeRO, sec. 3.1): parameters, gradients
and optimizer state, K bytes per parameter by optimizer and precision (Adam:
two moments in the parameter dtype; 8-bit Adam: two int8 codes plus a
float32 scale per block, Dettmers et al. 2022; SGD with momentum: one;
Adagrad: one; Adafactor: factored row/column statistics, Shazeer & Stern
2018), each parameter divided by the number of shards holding it: the product
of the mesh axes its logical names map to (FSDP is ZeRO-3: all three are
sharded).

Compression levers (wm/compress, docs/compression.md). `optim.name =
"adamw8bit"` changes the optimizer term (int8 codes and float32 block
scales) and adds, as transient, the float32 copies of both moments its
update works on (`detail["optimizer_dequantized"]`). `quant.qat = "int8"`
stores nothing extra (float master weights, float gradients, the same
optimizer state), but the step computes a fake-quantized copy of the weights
and keeps the stacked kernels' copy for the backward pass (transient,
`detail["qat_weight_copy"]`). `prune.method` adds the uint8 masks to the
optimizer term (`detail["prune_masks"]`) and, as transient, the masks the
step may recompute (`detail["prune_fresh_masks"]`). `quant.weights` and `quant.state` change the
bytes of evaluation and generation, not of the train step: `serving_bytes`
gives those.

Saved activations: what the backward pass keeps per layer (and per time step),
by remat policy; the counts follow what our blocks tag and what XLA keeps (the
derivations are in the docstrings of `_transformer_layer`, `_lstm_layer` and
`_activations`). Both stacks scan over layers, so every layer's saved tensors
are alive together when the backward pass starts, next to every gradient
(the scan's stacked gradient buffer) and, with microbatches, the gradient
accumulator. The LSTM language model in time chunks saves only the carries
between chunks, and holds one chunk's activations at a time and a gradient
accumulator over the chunks (`_lstm_time_chunks`).

Sharding adds buffers of its own (`_sharding_buffers`): FSDP's all-gathered
weights (ZeRO-3) and the data axis's all-reduced gradients. On TPU every
array is tiled in HBM, so small and odd dimensions are padded (`tpu_bytes`).

Transient: the largest working set on top of those: the loss head (logits
and their gradient), or the backward pass of one layer (which, under remat,
first recomputes that layer's forward). Unlike the saved counts these are
not derivable from the model code alone (the compiler fuses part of each
recomputation into its consumers and schedules differently per backend), so
their coefficients live in `wm.memory.calibration`, one fitted table per
backend; this module holds no fitted number. When the gradients
exist and the activations are gone, the optimizer update needs one more
gradient-sized buffer; if that moment is the larger one it is the peak
(`phase == "update"`) and the activation term is zero there.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wm import models, optim, parallel, step as step_lib
from wm.compress import adam8bit, prune, quant
from wm.memory import calibration
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
    host: saved activations an `offload:<tags>` policy keeps in host memory
      on TPU/GPU, all layers (compare the compiler's host_temp_size_in_bytes);
      device bytes and host bytes are separate budgets, so it is not in total.
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
  host: int = 0  # bytes offloaded to host memory (offload:<tags> on TPU/GPU), not part of `total`

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


@functools.lru_cache(maxsize=1024)  # the fit cycles over every record's model
def _param_leaves_cached(key: str) -> tuple[tuple[tuple[int, ...], int, tuple, bool], ...]:
  model_cfg, vocab, param_dtype, compute_dtype = json.loads(key)
  from wm import config as config_lib
  config = config_lib.base_config()
  config.model.update(model_cfg)
  config.data.vocab_size = vocab
  config.precision.param_dtype, config.precision.compute_dtype = param_dtype, compute_dtype
  model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
  weights = quant.weight_axes(model)
  leaves = []
  state = nnx.state(model, nnx.Param)
  for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    value = var.get_value() if hasattr(var, "get_value") else var.value
    names = tuple(var.get_metadata().get("out_sharding") or ())
    if len(names) != len(value.shape):
      names = (None,) * len(value.shape)
    is_weight = tuple(quant.path_key(path)) in weights
    leaves.append((tuple(value.shape), jnp.dtype(value.dtype).itemsize, names, is_weight))
  return tuple(leaves)


def param_leaves(config: ml_collections.ConfigDict) -> tuple[tuple[tuple[int, ...], int, tuple, bool], ...]:
  """(shape, itemsize, logical names, is a matmul weight) of every parameter of the config's model.

  Matmul weights are those wm.compress.quant quantizes (quant.weights, quant.qat).
  """
  return _param_leaves_cached(_shape_key(config))


@functools.lru_cache(maxsize=1024)  # the fit cycles over every record's model
def _trainable_cached(key: str) -> tuple[bool, ...]:
  model_cfg, vocab, param_dtype, compute_dtype = json.loads(key)
  from wm import config as config_lib
  config = config_lib.base_config()
  config.model.update(model_cfg)
  config.data.vocab_size = vocab
  config.precision.param_dtype, config.precision.compute_dtype = param_dtype, compute_dtype
  model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
  # Same model and leaf order as _param_leaves_cached (nnx.state(model, nnx.Param) of the same config).
  return tuple(isinstance(var, nnx.LoRAParam) for var in jax.tree.leaves(
      nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)))


def trainable_leaves(config: ml_collections.ConfigDict) -> tuple[bool, ...]:
  """Per `param_leaves` entry, whether the optimizer updates it: with LoRA (Hu et al. 2021) the adapters only.

  Frozen weights still count in `params`, but have no gradient and no
  optimizer state (wm.step.trainable).
  """
  if not config.model.get("lora_rank", 0):
    return (True,) * len(param_leaves(config))
  return _trainable_cached(_shape_key(config))


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
  for shape, _, names, _ in param_leaves(config):
    for dim, name in zip(shape, names):
      n = math.prod(sizes.get(a, 1) for a in _axes(rules.get(name)))
      if dim % n:
        return False
  return True


def _optimizer_bytes(config: ml_collections.ConfigDict, shape: tuple[int, ...], itemsize: int, names: tuple,
                     rules: dict, sizes: dict[str, int]) -> float:
  """Optimizer state bytes of one parameter on one device.

  8-bit Adam (wm/compress/adam8bit.py): int8 codes of both moments sharded
  like the parameter, float32 block scales sharded like it on all axes but
  the last (which counts blocks); small parameters keep float moments.
  """
  size = math.prod(shape)
  local = size / shards(names, rules, sizes, shape)
  if config.optim.name == "adamw8bit":
    like_param, scales = adam8bit.state_bytes(shape, itemsize, config.optim.state_block)
    if not adam8bit.is_quantized(shape):
      return like_param * local / size + scales
    scale_shape = adam8bit.block_shape(shape, config.optim.state_block)
    scale_names = tuple(names[:-1]) + (None,)
    return like_param * local / size + scales / shards(scale_names, rules, sizes, scale_shape)
  sharded, replicated = _optimizer_values(config, shape)
  return (sharded * local + replicated * size) * itemsize


_PRUNE_LEAVES: dict[tuple[str, bool], tuple[tuple[tuple[int, ...], tuple, bool], ...]] = {}


def _prune_mask_bytes(config: ml_collections.ConfigDict, rules: dict, sizes: dict[str, int]) -> tuple[float, float]:
  """(mask bytes in the optimizer state, bytes of recomputed masks in the step) per device, 0 without pruning.

  Masks (wm/compress/prune.py): uint8, one byte per element of a pruned
  weight, sharded like it, and a one-byte placeholder per other parameter.
  """
  if not config.prune.method:
    return 0.0, 0.0
  key = (_shape_key(config), bool(config.prune.embeddings))
  if key not in _PRUNE_LEAVES:
    model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
    _PRUNE_LEAVES[key] = prune.mask_leaves(model, config.prune.embeddings)
  stored = fresh = 0.0
  for shape, names, pruned in _PRUNE_LEAVES[key]:
    if pruned:
      local = math.prod(shape) / shards(names, rules, sizes, shape)
      stored, fresh = stored + local, fresh + local
    else:
      stored += 1
  return stored, fresh


def tpu_bytes(shape: tuple[int, ...], itemsize: int) -> int:
  """Bytes of an array in TPU HBM: tiled, so small or odd dimensions are padded.

  The TPU keeps arrays in (8 * 4 / itemsize, 128) tiles over their two minor
  dimensions (8 x 128 for 32-bit, 16 x 128 for 16-bit: the vector
  registers' sublanes x lanes; "TPU memory layout" in the Pallas TPU docs),
  rank-1 arrays in 512-byte units, nothing in less than 512 bytes. The
  compiler chooses each array's layout, i.e. which dimensions are minor; we
  take the choice that pads least, which is close to what it picks for the
  train state (the estimated arguments of 35 of the 48 held-out v5e steps
  within 2% of the compiler's, at most +34%: benchmarks/estimate_accuracy.py).
  """
  if len(shape) == 0:
    return 512
  if len(shape) == 1:
    return max(512, math.ceil(shape[0] * itemsize / 512) * 512)
  sublanes = 8 * 4 // itemsize
  best = math.inf
  for i, j in itertools.permutations(range(len(shape)), 2):  # i second-minor, j minor
    rows = math.ceil(shape[i] / sublanes) * sublanes if shape[i] > 1 else 1
    rest = math.prod(n for k, n in enumerate(shape) if k not in (i, j))
    best = min(best, rest * rows * math.ceil(shape[j] / 128) * 128 * itemsize)
  return max(512, int(best))


@functools.lru_cache(maxsize=1024)  # the fit cycles over every record's model
def _state_leaves_cached(key: str, optim_json: str) -> tuple[tuple[tuple[int, ...], int, tuple], ...]:
  """(shape, itemsize, logical names) of every optimizer-state leaf (names () where replicated)."""
  model_cfg, vocab, param_dtype, compute_dtype = json.loads(key)
  from wm import config as config_lib
  config = config_lib.base_config()
  config.model.update(model_cfg)
  config.data.vocab_size = vocab
  config.precision.param_dtype, config.precision.compute_dtype = param_dtype, compute_dtype
  config.optim.update(json.loads(optim_json))
  # The optimizer holds state for what it updates only: with LoRA the adapters (wm.step.trainable).
  params = nnx.state(nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0))), step_lib.trainable(config))
  state = jax.eval_shape(optim.make_optimizer(config.optim, config.train.steps).init, params)
  leaves = []
  for leaf in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    value = (leaf.get_value() if hasattr(leaf, "get_value") else leaf.value) if isinstance(leaf, nnx.Variable) else leaf
    names = tuple(leaf.get_metadata().get("out_sharding") or ()) if isinstance(leaf, nnx.Variable) else ()
    if len(names) != len(value.shape):  # factored statistics and scalars stay replicated (wm.step)
      names = (None,) * len(value.shape)
    leaves.append((tuple(value.shape), jnp.dtype(value.dtype).itemsize, names))
  return tuple(leaves)


def _local_shape(shape: tuple[int, ...], names: tuple, rules: dict, sizes: dict[str, int]) -> tuple[int, ...]:
  """This device's slice of a tensor with these logical names (undivisible dimensions stay whole, as `shards`)."""
  out, used = list(shape), set()
  for i, name in enumerate(names):
    axes = [a for a in _axes(rules.get(name)) if a not in used]
    n = math.prod(sizes.get(a, 1) for a in axes)
    if out[i] % n == 0:
      out[i] //= n
      used.update(axes)
  return tuple(out)


def _tpu_model_states(config: ml_collections.ConfigDict, rules: dict,
                      sizes: dict[str, int]) -> tuple[float, float, float]:
  """(parameter, trained-parameter, optimizer-state bytes) per device in TPU HBM, each local shard tiled (`tpu_bytes`)."""
  params = trained = 0.0
  for (shape, itemsize, names, _), updated in zip(param_leaves(config), trainable_leaves(config)):
    tiled = tpu_bytes(_local_shape(shape, names, rules, sizes), itemsize)
    params += tiled
    trained += tiled if updated else 0
  leaves = _state_leaves_cached(_shape_key(config), json.dumps(config.optim.to_dict(), sort_keys=True))
  state = sum(tpu_bytes(_local_shape(shape, names, rules, sizes), itemsize) for shape, itemsize, names in leaves)
  return params, trained, float(state)


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
class _Acts:
  saved: float  # bytes kept for the backward pass, all layers
  layer_transient: float  # one layer's backward working set (with recomputation)
  head_transient: float  # logits, their gradient and the loss head
  detail: dict[str, Any]
  # Gradient-sized buffers the backward pass adds to the one gradient: a scan
  # over time chunks that sums every chunk's parameter gradients holds its
  # running sum and the chunk's own, as microbatches do (`estimate`).
  extra_grads: int = 0


@dataclasses.dataclass(frozen=True)
class _Dims:
  """Per-device sizes: batch split over the batch axes and microbatches, widths over tensor."""
  b: int  # sequences per device per microbatch
  t: int  # sequence length
  d: int
  vocab: int  # vocabulary entries per device (logits are split over "vocab")
  tensor: int  # ways of the tensor axis
  c: int  # compute dtype bytes
  attention: str = "xla"  # model.attention
  block: int = 512  # model.attention_block


def _dims(config: ml_collections.ConfigDict, sizes: dict[str, int], microbatches: int,
          levers: Levers | None = None, backend: str | None = None) -> _Dims:
  rules = dict(parallel.rules(config))
  batch_ways = math.prod(sizes.get(a, 1) for a in _axes(rules.get("batch")))
  b = max(config.data.batch_size // (microbatches * batch_ways), 1)
  vocab_ways = math.prod(sizes.get(a, 1) for a in _axes(rules.get("vocab")))
  vocab = math.ceil(config.data.vocab_size / vocab_ways)
  tensor = math.prod(sizes.get(a, 1) for a in _axes(rules.get("mlp")))
  c = jnp.dtype(config.precision.compute_dtype).itemsize
  if backend == "cpu":
    # XLA CPU has no 16-bit arithmetic: its float normalization runs bfloat16 operations in f32, and most
    # tensors a backward pass reads (the layer scan's stacked residuals) are converted to f32 once, before it
    # starts (read off the compiled steps' buffers; some, like the attention probabilities, stay bf16). What
    # the backward pass holds is mostly f32-sized; calibration.Table.saved_scale carries the rest.
    c = _F32
  attention = (levers and levers.attention) or config.model.get("attention", "xla")
  block = (levers and levers.attention_block) or config.model.get("attention_block", 512)
  return _Dims(b, config.data.seq_len, config.model.d, vocab, tensor, c, attention, block)


def _policy_names(policy: str) -> tuple[str, set[str]]:
  base = policy.split(":", 1)[0]
  names = set()
  if ":" in policy:
    names = {n.strip() for n in policy.split(":", 1)[1].split(",") if n.strip()}
  return base, names


def _transformer_layer(config: ml_collections.ConfigDict, dims: _Dims, policy: str,
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
  base, names = _policy_names(policy)
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


def _head_transient(dims: _Dims, cal: calibration.Table, heads: int = 1) -> float:
  """The loss head: f32 logits and their gradient, [b, t, heads, V] each, plus a few [b, t, d] (calibrated)."""
  tokens = dims.b * dims.t
  return 2 * tokens * heads * dims.vocab * _F32 + cal.head_stream * tokens * dims.d * _F32


def _lstm_layer(config: ml_collections.ConfigDict, dims: _Dims, policy: str,
                time_chunk: int, backend: str, cal: calibration.Table) -> tuple[float, float, dict[str, Any]]:
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
  base, names = _policy_names(policy)
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
  transient = coef[0] * tokens * d * _F32 + coef[1] * layer_params
  if k and base == "full":
    key += "/chunk"
    coef = cal.lstm_transient["full/chunk"]
    transient = coef[0] * tokens * d * _F32 + coef[1] * layer_params
  if k:
    transient += 12 * b * k * d / tp * _F32  # one chunk's recomputed residuals
  return saved, transient, {"saved_per_layer": int(saved), "time_chunk": k, "host_per_layer": int(host)}


def _lstm_time_chunks(config: ml_collections.ConfigDict, dims: _Dims, levers: Levers, k: int, backend: str,
                      cal: calibration.Table) -> _Acts:
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
  own (`_Acts.extra_grads`), as gradient accumulation over microbatches does.
  """
  layers = config.model.layers
  chunk_dims = dataclasses.replace(dims, t=k)
  per_layer, layer_transient, detail = _lstm_layer(config, chunk_dims, levers.policy, 0, backend, cal)
  head = _head_transient(chunk_dims, cal)
  # The chunk's own saved activations are alive through its backward pass, widened like any saved activations.
  chunk_saved = layers * per_layer * cal.saved_scale.get(config.precision.compute_dtype, 1.0)
  carries = (dims.t // k) * layers * 2 * dims.b * dims.d * dims.c
  detail = dict(detail, time_chunk=k, chunk_carries=int(carries), chunk_saved=int(chunk_saved))
  return _Acts(carries, chunk_saved + layer_transient, chunk_saved + head, detail, extra_grads=1)


def _stack_acts(config: ml_collections.ConfigDict, kind: str, dims: _Dims, levers: Levers,
                layer_param_bytes: float, backend: str,
                cal: calibration.Table) -> tuple[float, float, dict[str, Any]]:
  """All layers of one LSTM or Transformer stack: (saved, layer transient, detail)."""
  layers = config.model.layers
  if kind == "transformer":
    per_layer, transient, detail = _transformer_layer(config, dims, levers.policy, layer_param_bytes, backend, cal)
  else:
    per_layer, transient, detail = _lstm_layer(config, dims, levers.policy, levers.time_chunk, backend, cal)
  return layers * per_layer, transient, detail


def _activations(config: ml_collections.ConfigDict, dims: _Dims, levers: Levers, layer_param_bytes: float,
                 param_bytes: float, backend: str, cal: calibration.Table) -> _Acts:
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
              (13.5 d per layer, as above), about 12 d for the three MLPs,
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
    return _Acts(saved, transient, _head_transient(dims, cal), detail)
  if name == "vae":
    enc, enc_t, _ = _stack_acts(config, m.encoder, dims, levers, layer_param_bytes, backend, cal)
    dec, dec_t, detail = _stack_acts(config, m.decoder, dims, levers, layer_param_bytes, backend, cal)
    return _Acts(enc + dec, max(enc_t, dec_t), _head_transient(dims, cal), detail)
  if name == "mixture":
    k = m.components
    dec, dec_t, detail = _stack_acts(config, m.decoder, dims, levers, layer_param_bytes, backend, cal)
    if m.mixture_heads == "separate":
      dec, dec_t = k * dec, k * dec_t
    # K components' logits, their gradient, log-softmax and posterior (count calibrated).
    head = cal.mixture_head_logits * tokens * k * dims.vocab * _F32 + cal.head_stream * tokens * dims.d * _F32
    return _Acts(dec, dec_t, head, detail)
  # vrnn
  d, v, z, layers = dims.d, dims.vocab, m.latent_dim, m.layers
  per_step = (layers * 13.5 * d + 12 * d + 4 * z + 3 * v) * _F32
  chunk = remat_lib.resolve_time_chunk(levers.time_chunk, dims.t)
  if chunk:
    carries = dims.b * (dims.t // chunk) * (2 * layers * d + z) * _F32
    saved = carries + tokens * (3 + 2 * z + 1) * _F32  # chunk inputs (tokens, targets, noise) and outputs
    transient = dims.b * chunk * per_step + cal.vrnn_chunk_grads * param_bytes
  else:
    saved, transient = tokens * per_step, tokens * 4 * d * _F32
  return _Acts(saved, transient, 2 * tokens * 3 * _F32, {"saved_per_step": per_step, "time_chunk": chunk})


def _sharding_buffers(config: ml_collections.ConfigDict, levers: Levers, sizes: dict[str, int],
                      cal: calibration.Table, layer_param_bytes: float, gathered_extra: float,
                      grads: float) -> tuple[float, float]:
  """(gathered weights, reduced gradients): the buffers sharding adds to the backward pass's peak.

  FSDP (ZeRO-3, Rajbhandari et al. 2020 sec. 5.3) keeps a parameter shard per
  device and all-gathers the weights where they are used. Under the layer
  scan's backward pass that is one layer's whole weights
  (`layer_param_bytes`: gathered over fsdp, still split over tensor), once
  for the backward matmuls and, when a remat policy recomputes the layer's
  forward, once more for the recomputation: both gathers are alive together
  in XLA CPU's buffer listing of a held-out Transformer step, with a
  transposed copy beside them. The LSTM's time scan and the VRNN's cell use
  every weight at every step, so there the whole model's weights are
  gathered for the scan (`gathered_extra`: every parameter's whole bytes
  less the local shards). How many of these copies the compiler keeps alive
  together is its scheduler's choice: counts fitted per model family
  (`calibration.Table.fsdp_gathered`: layer copies without remat, layer
  copies under remat, whole-model copies), starting from 1, 2, 0 for
  Transformer stacks and 0, 0, 1 for the time-scanned models.

  Data parallelism (the `data` axis): the gradients of the parameters
  replicated over it are summed across it (all-reduce); whether the
  compiler reduces in place or into another gradient-sized buffer is its
  choice, fitted per model family (`calibration.Table.dp_grad_copies`).
  Tensor-parallel all-reduces are of [b, t, d] activations and fold into the
  layer transient.
  """
  m = config.model
  gathered = reduced = 0.0
  if sizes.get("fsdp", 1) > 1:
    none_copies, remat_copies, whole = cal.fsdp_gathered.get(m.name, (0.0, 0.0, 0.0))
    gathered = (none_copies if levers.policy == "none" else remat_copies) * layer_param_bytes + whole * gathered_extra
  if sizes.get("data", 1) > 1:
    reduced = cal.dp_grad_copies.get(m.name, 0.0) * grads
  return gathered, reduced


def mesh_sizes(config: ml_collections.ConfigDict, num_devices: int | None = None) -> dict[str, int]:
  """Mesh axis sizes for `num_devices` (default: config.mesh.num_devices, else all devices)."""
  n = num_devices or config.mesh.num_devices or jax.device_count()
  return parallel.mesh_shape(config.mesh, n)


def estimate(config: ml_collections.ConfigDict, num_devices: int | None = None, *,
             backend: str | None = None, levers: Levers | None = None,
             table: calibration.Table | None = None) -> Estimate:
  """Analytic per-device bytes of the config's train step.

  Args:
    config: a validated config (model, data, precision, optim, remat, mesh).
    num_devices: devices the mesh spans; default config.mesh.num_devices, else
      every device JAX sees. The mesh sizes come from config.mesh
      (wm.parallel.mesh_shape), so -1 axes take what is left.
    backend: the compile target ("cpu", "tpu", "gpu"; default JAX's):
      offload policies keep their tensors on the device only on CPU.
    levers: remat policy, microbatches, time chunk and mesh sizes to use
      instead of the config's (the planner scores candidates this way
      without copying configs).
    table: calibrated coefficients to use instead of the backend's
      (`wm.memory.calibration.table(backend)`); the fit passes candidates.

  Returns:
    An `Estimate` whose six terms sum to `total`.
  """
  backend = backend or jax.default_backend()
  cal = table or calibration.table(backend)
  levers = levers or Levers.of(config)
  sizes = dict(levers.mesh) if levers.mesh else mesh_sizes(config, num_devices)
  rules = dict(parallel.rules(config))
  params = optimizer = trained = 0.0
  count = trained_count = 0
  stack_bytes = 0.0  # parameters of the scanned layer stacks (for the per-layer transient)
  whole_params = 0.0  # parameters gathered over fsdp
  qat_copy = dequantized = 0.0
  compute_bytes = jnp.dtype(config.precision.compute_dtype).itemsize
  # Under mixed precision the layers already make a compute-dtype copy of each weight (the cast);
  # the fake-quantized copy takes its place (measured: no change in temp with bfloat16 compute).
  qat_fresh_copy = config.quant.qat == "int8" and config.precision.compute_dtype == config.precision.param_dtype
  for (shape, itemsize, names, is_weight), updated in zip(param_leaves(config), trainable_leaves(config)):
    size = math.prod(shape)
    count += size
    local = size / shards(names, rules, sizes, shape)
    params += local * itemsize
    if updated:  # frozen weights (LoRA's base) have no gradient or optimizer state
      optimizer += _optimizer_bytes(config, shape, itemsize, names, rules, sizes)
      trained += local * itemsize
      trained_count += size
      if config.optim.name == "adamw8bit" and adam8bit.is_quantized(shape):
        dequantized += 2 * local * _F32
    if is_weight and "layers" in names and qat_fresh_copy:
      qat_copy += local * compute_bytes
    tensor_only = tuple(n if n in ("heads", "kv_heads", "mlp", "gates", "vocab") else None for n in names)
    whole = size * itemsize / shards(tensor_only, rules, sizes, shape)  # gathered over fsdp
    whole_params += whole
    if "layers" in names:  # a scanned layer's weights are gathered whole (over fsdp) while it runs
      stack_bytes += whole
  masks, fresh_masks = _prune_mask_bytes(config, rules, sizes)
  if backend == "tpu":  # HBM is tiled: small and odd dimensions are padded (tpu_bytes)
    params, trained, optimizer = _tpu_model_states(config, rules, sizes)
  optimizer += masks
  grads = trained  # gradients in the parameter dtype, sharded like the parameters (ZeRO-2/3 under FSDP)
  dims = _dims(config, sizes, levers.microbatches, levers, backend)
  batch_ways = math.prod(sizes.get(a, 1) for a in _axes(rules.get("batch")))
  # One weight set runs at a time: a layer's, or with sharing (ALBERT) the set g layers share.
  layer_param_bytes = stack_bytes / max(config.model.layers // config.model.get("share_layers", 1), 1)
  acts = _activations(config, dims, levers, layer_param_bytes, params, backend, cal)
  # accumulator + this microbatch's, + the sum over time chunks and this chunk's
  live_grads = grads * (1 + (levers.microbatches > 1) + acts.extra_grads)
  # The compiler may keep more than the model code saves (calibration.Table.saved_scale).
  acts = dataclasses.replace(acts, saved=acts.saved * cal.saved_scale.get(config.precision.compute_dtype, 1.0))
  # inputs and targets int32, weights f32, this device's rows.
  inputs = config.data.batch_size / batch_ways * config.data.seq_len * 12
  if backend == "tpu":
    inputs = 3 * tpu_bytes((max(config.data.batch_size // batch_ways, 1), config.data.seq_len), 4)
    # Activations are [b, t, d]-shaped (the scores [.., t, t]): padded like the residual stream.
    pad = tpu_bytes((dims.b, dims.t, dims.d), _F32) / (dims.b * dims.t * dims.d * _F32)
    acts = dataclasses.replace(acts, saved=acts.saved * pad, layer_transient=acts.layer_transient * pad,
                               head_transient=acts.head_transient * pad)

  # QAT: the forward pass reads a fake-quantized copy of every matmul weight; the layer scan keeps the
  # stacked kernels' copy for the backward pass (measured, float32: +1.0x their bytes of temp, Transformer
  # with any remat policy; the LSTM's came to 0.9x), while the embedding's is fused into its readers.
  # 8-bit Adam: the update dequantizes both moments of every 8-bit parameter to float32; XLA's CPU buffer
  # assignment gave those buffers space of their own beside the backward pass's (measured: +2 x 4 bytes per
  # 8-bit parameter of temp whatever the phase of the peak), so they add to either phase.
  # Pruning: the step writes the masks it may have recomputed into a buffer of their own, 1 byte per pruned
  # element beside the backward pass's (measured, CPU: temp + 1.0x the mask bytes, Transformer and LSTM).
  gathered, reduced = _sharding_buffers(config, levers, sizes, cal, layer_param_bytes, whole_params - params, grads)
  transient_bwd = (max(acts.layer_transient, acts.head_transient) + qat_copy + dequantized + fresh_masks
                   + gathered + reduced)
  transient_bwd += cal.fixed_mib * 2**20  # what the compiler's figure holds whatever the step (calibrated)
  backward = live_grads + acts.saved + transient_bwd
  update = grads + cal.update_buffers * grads + dequantized + fresh_masks + cal.fixed_mib * 2**20
  if backward >= update:
    phase, activations, transient, grads_term = "backward", acts.saved, transient_bwd, live_grads
  else:
    phase, activations, transient, grads_term = "update", 0.0, update - grads, grads
  terms = dict(params=int(params), grads=int(grads_term), optimizer=int(optimizer),
               activations=int(activations), transient=int(transient), inputs=int(inputs))
  detail = dict(acts.detail, param_count=count, trainable_param_count=trained_count, saved_activations=int(acts.saved),
                layer_transient=int(acts.layer_transient), head_transient=int(acts.head_transient),
                per_device_batch=dims.b, microbatches=levers.microbatches, remat_policy=levers.policy,
                time_chunk=levers.time_chunk, backend=backend,
                attention=dims.attention, calibration=cal.fitted_on,
                qat_weight_copy=int(qat_copy), optimizer_dequantized=int(dequantized),
                prune_masks=int(masks), prune_fresh_masks=int(fresh_masks))
  host = acts.detail.get("host_per_layer", 0) * config.model.layers
  return Estimate(**terms, total=sum(terms.values()), phase=phase, num_devices=math.prod(sizes.values()),
                  mesh=dict(sizes), detail=detail, host=int(host))


def serving_bytes(config: ml_collections.ConfigDict, context_len: int | None = None, batch: int = 1) -> dict[str, int]:
  """Bytes of evaluation and generation (one device, no training state), by the config's quantization levers.

  Returns:
    {"params": parameters as stored (int8 values and float32 scales for the
     matmul weights under quant.weights = "int8", the rest in param_dtype),
     "state": working memory for `context_len` tokens (default data.seq_len)
     and `batch` sequences in quant.state (DESIGN.md definition),
     "total": their sum}. Nothing is created: shapes come from nnx.eval_shape.
  """
  def build():
    model = models.build(config, nnx.Rngs(0))
    return quant.quantize_model(model) if config.quant.weights == "int8" else model

  model = nnx.eval_shape(build)
  params = quant.param_bytes(model)
  state = int(model.state_bytes(context_len or config.data.seq_len, batch=batch))
  return {"params": params, "state": state, "total": params + state}
