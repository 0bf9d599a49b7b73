"""Model states per device: parameters, gradients and optimizer state (ZeRO's terms), derived from shapes.

Rajbhandari et al. 2020 (ZeRO, sec. 3.1): K bytes per parameter by optimizer
and precision (Adam: two moments in the parameter dtype; 8-bit Adam: two int8
codes plus a float32 scale per block, Dettmers et al. 2022; SGD with
momentum: one; Adagrad: one; Adafactor: factored row/column statistics,
Shazeer & Stern 2018), each parameter divided by the number of shards
holding it: the product of the mesh axes its logical names map to (FSDP is
ZeRO-3: all three are sharded). With LoRA (Hu et al. 2021) only the adapters
have gradients and optimizer state. On TPU every local shard is tiled in HBM
(`sharding.tpu_bytes`).

Compression levers (wm/compress, docs/compression.md). `optim.name =
"adamw8bit"` changes the optimizer term (int8 codes and float32 block
scales) and adds, as transient, the float32 copies of both moments its
update works on (`ModelStates.dequantized`). `quant.qat = "int8"` stores
nothing extra (float master weights, float gradients, the same optimizer
state), but the step computes a fake-quantized copy of the weights and keeps
the stacked kernels' copy for the backward pass (`ModelStates.qat_copy`).
`prune.method` adds the uint8 masks to the optimizer term
(`ModelStates.masks`) and, as transient, the masks the step may recompute
(`ModelStates.fresh_masks`).

No parameter is created: shapes come from `nnx.eval_shape`, one abstract
model per parameter shape (`shape_key`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wm import models, optim, parallel, step as step_lib
from wm.compress import adam8bit, prune, quant
from wm.memory.sharding import axes, local_shape, shards, tpu_bytes

_F32 = 4
Leaf = tuple[tuple[int, ...], int, tuple]  # shape, itemsize, logical axis names


def shape_key(config: ml_collections.ConfigDict) -> str:
  """What parameter shapes depend on: the model, vocabulary and dtypes.

  Remat, batch, mesh and optimizer leave them unchanged, so the planner's
  many candidates share one abstract model.
  """
  return json.dumps([config.model.to_dict(), config.data.vocab_size, config.precision.param_dtype,
                     config.precision.compute_dtype], sort_keys=True, default=str)


def _config_of(key: str) -> ml_collections.ConfigDict:
  """A config with what `shape_key` kept (the rest at its defaults)."""
  model_cfg, vocab, param_dtype, compute_dtype = json.loads(key)
  from wm import config as config_lib
  config = config_lib.base_config()
  config.model.update(model_cfg)
  config.data.vocab_size = vocab
  config.precision.param_dtype, config.precision.compute_dtype = param_dtype, compute_dtype
  return config


@functools.lru_cache(maxsize=1024)  # the fit cycles over every record's model
def _abstract_model(key: str) -> nnx.Module:
  config = _config_of(key)
  return nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))


def _leaf(var) -> Leaf:
  """(shape, itemsize, names) of a state leaf; names are None where they do not match its dimensions.

  Such leaves (factored statistics, scalars, plain arrays) stay replicated (wm.step).
  """
  is_var = isinstance(var, nnx.Variable)
  value = (var.get_value() if hasattr(var, "get_value") else var.value) if is_var else var
  names = tuple(var.get_metadata().get("out_sharding") or ()) if is_var else ()
  if len(names) != len(value.shape):
    names = (None,) * len(value.shape)
  return tuple(value.shape), jnp.dtype(value.dtype).itemsize, names


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


@functools.lru_cache(maxsize=1024)
def _param_leaves_cached(key: str) -> tuple[tuple[tuple[int, ...], int, tuple, bool], ...]:
  model = _abstract_model(key)
  weights = quant.weight_axes(model)
  return tuple(_leaf(var) + (tuple(quant.path_key(path)) in weights,)
               for path, var in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param), is_leaf=_is_var))


def param_leaves(config: ml_collections.ConfigDict) -> tuple[tuple[tuple[int, ...], int, tuple, bool], ...]:
  """(shape, itemsize, logical names, is a matmul weight) of every parameter of the config's model.

  Matmul weights are those wm.compress.quant quantizes (quant.weights, quant.qat).
  """
  return _param_leaves_cached(shape_key(config))


@functools.lru_cache(maxsize=1024)
def _trainable_cached(key: str) -> tuple[bool, ...]:
  # The same leaves in the same order as _param_leaves_cached (nnx.state(model, nnx.Param) of one model).
  return tuple(isinstance(var, nnx.LoRAParam)
               for var in jax.tree.leaves(nnx.state(_abstract_model(key), nnx.Param), is_leaf=_is_var))


def trainable_leaves(config: ml_collections.ConfigDict) -> tuple[bool, ...]:
  """Per `param_leaves` entry, whether the optimizer updates it: with LoRA (Hu et al. 2021) the adapters only.

  Frozen weights still count in `params`, but have no gradient and no
  optimizer state (wm.step.trainable).
  """
  if not config.model.get("lora_rank", 0):
    return (True,) * len(param_leaves(config))
  return _trainable_cached(shape_key(config))


def fits_mesh(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> bool:
  """Whether every sharded parameter dimension divides by its mesh axes."""
  rules = dict(parallel.rules(config))
  for shape, _, names, _ in param_leaves(config):
    for dim, name in zip(shape, names):
      n = math.prod(sizes.get(a, 1) for a in axes(rules.get(name)))
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
  (wm.step's state shardings).
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


def _prune_mask_bytes(config: ml_collections.ConfigDict, rules: dict, sizes: dict[str, int]) -> tuple[float, float]:
  """(mask bytes in the optimizer state, bytes of recomputed masks in the step) per device, 0 without pruning.

  Masks (wm/compress/prune.py): uint8, one byte per element of a pruned
  weight, sharded like it, and a one-byte placeholder per other parameter.
  """
  if not config.prune.method:
    return 0.0, 0.0
  stored = fresh = 0.0
  for shape, names, pruned in prune.mask_leaves(_abstract_model(shape_key(config)), config.prune.embeddings):
    if pruned:
      local = math.prod(shape) / shards(names, rules, sizes, shape)
      stored, fresh = stored + local, fresh + local
    else:
      stored += 1
  return stored, fresh


@functools.lru_cache(maxsize=1024)  # the fit cycles over every record's model
def _state_leaves_cached(key: str, optim_json: str) -> tuple[Leaf, ...]:
  """(shape, itemsize, logical names) of every optimizer-state leaf (names None where replicated)."""
  config = _config_of(key)
  config.optim.update(json.loads(optim_json))
  # The optimizer holds state for what it updates only: with LoRA the adapters (wm.step.trainable).
  params = nnx.state(_abstract_model(key), step_lib.trainable(config))
  state = jax.eval_shape(optim.make_optimizer(config.optim, config.train.steps).init, params)
  return tuple(_leaf(leaf) for leaf in jax.tree.leaves(state, is_leaf=_is_var))


def _tpu_optimizer_bytes(config: ml_collections.ConfigDict, rules: dict, sizes: dict[str, int]) -> float:
  """Optimizer-state bytes per device in TPU HBM, each local shard tiled (`tpu_bytes`)."""
  leaves = _state_leaves_cached(shape_key(config), json.dumps(config.optim.to_dict(), sort_keys=True))
  return float(sum(tpu_bytes(local_shape(shape, names, rules, sizes), itemsize) for shape, itemsize, names in leaves))


@dataclasses.dataclass(frozen=True)
class ModelStates:
  """Per-device bytes of the model states, and what the rest of the estimate reads off the parameters."""
  params: float  # every parameter: this device's shards
  trained: float  # the parameters the optimizer updates (their gradients are as large)
  optimizer: float  # optimizer state, pruning's masks included
  count: int  # parameters in the model
  trained_count: int  # parameters the optimizer updates
  whole_params: float  # every parameter gathered over fsdp (still split over tensor)
  stack_bytes: float  # the scanned layer stacks' parameters gathered over fsdp (a layer's weights while it runs)
  qat_copy: float  # QAT: the fake-quantized copy of the stacked kernels (transient)
  dequantized: float  # 8-bit Adam: float32 copies of both moments in the update (transient)
  masks: float  # pruning masks (part of `optimizer`)
  fresh_masks: float  # pruning masks the step may recompute (transient)


def model_states(config: ml_collections.ConfigDict, rules: dict, sizes: dict[str, int], backend: str) -> ModelStates:
  """Parameters, trained parameters and optimizer state on one device of a mesh with axis `sizes`."""
  params = optimizer = trained = whole_params = stack_bytes = qat_copy = dequantized = 0.0
  count = trained_count = 0
  compute_bytes = jnp.dtype(config.precision.compute_dtype).itemsize
  # Under mixed precision the layers already make a compute-dtype copy of each weight (the cast);
  # the fake-quantized copy takes its place (measured: no change in temp with bfloat16 compute).
  qat_fresh_copy = config.quant.qat == "int8" and config.precision.compute_dtype == config.precision.param_dtype
  for (shape, itemsize, names, is_weight), updated in zip(param_leaves(config), trainable_leaves(config)):
    size = math.prod(shape)
    count += size
    local = size / shards(names, rules, sizes, shape)
    # TPU HBM is tiled: small and odd dimensions are padded (tpu_bytes).
    local_bytes = tpu_bytes(local_shape(shape, names, rules, sizes), itemsize) if backend == "tpu" else local * itemsize
    params += local_bytes
    if updated:  # frozen weights (LoRA's base) have no gradient or optimizer state
      optimizer += _optimizer_bytes(config, shape, itemsize, names, rules, sizes)
      trained += local_bytes
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
  if backend == "tpu":
    optimizer = _tpu_optimizer_bytes(config, rules, sizes)
  masks, fresh_masks = _prune_mask_bytes(config, rules, sizes)
  return ModelStates(params, trained, optimizer + masks, count, trained_count, whole_params, stack_bytes,
                     qat_copy, dequantized, masks, fresh_masks)
