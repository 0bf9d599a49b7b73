"""Analytic bytes per device of one train step, term by term.

    total = params + grads + optimizer + activations + transient + inputs

Every term is a named field of `Estimate`, so a table shows where the bytes go
(DESIGN.md, "Estimated step memory"). The formulas read only the config: no
parameter is created (shapes come from `nnx.eval_shape`) and nothing compiles,
so the planner can score thousands of candidates in a second. `wm.memory.measure`
gives the compiler's figure to hold them against.

The terms come from three modules, each with its sources: model states
(parameters, gradients, optimizer state; ZeRO, with the compression levers'
masks and copies) in `wm.memory.model_states`; saved activations and the
transient working sets by model family and remat policy in
`wm.memory.activations`; the buffers sharding adds (FSDP's all-gathered
weights, the data axis's all-reduced gradients) and TPU tiling in
`wm.memory.sharding`. Every fitted coefficient is in `wm.memory.calibration`,
one table per backend; none of these modules holds a fitted number.

The peak is the larger of two moments. In the backward pass: every gradient
(the scan's stacked gradient buffer; with microbatches or LSTM time chunks a
running sum beside it), the saved activations, and the largest transient.
In the optimizer update, when the gradients exist and the activations are
gone: one more gradient-sized buffer per `calibration.Table.update_buffers`;
if that moment is the larger one it is the peak (`phase == "update"`) and the
activation term is zero there. `quant.weights` and `quant.state` change the
bytes of evaluation and generation, not of the train step: `serving_bytes`
gives those.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wm import models, parallel
from wm.compress import quant
from wm.memory import activations, calibration, model_states, sharding
from wm.memory.activations import Levers

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
  sizes = dict(levers.mesh) if levers.mesh else sharding.mesh_sizes(config, num_devices)
  rules = dict(parallel.rules(config))
  states = model_states.model_states(config, rules, sizes, backend)
  params = states.params
  grads = states.trained  # gradients in the parameter dtype, sharded like the parameters (ZeRO-2/3 under FSDP)
  dims = activations.per_device_dims(config, sizes, levers.microbatches, levers, backend)
  batch_ways = sharding.batch_ways(config, sizes)
  # One weight set runs at a time: a layer's, or with sharing (ALBERT) the set g layers share.
  layer_param_bytes = states.stack_bytes / max(config.model.layers // config.model.get("share_layers", 1), 1)
  # XLA CPU has no 16-bit arithmetic (see activations.per_device_dims): with bfloat16 parameters the backward
  # pass computes the gradients, and the layers their weights' working copies, in f32, and casts only the
  # results. Gradient- and weight-sized buffers in the step are f32-sized there (measured, 2-layer d=256 LSTM
  # and Transformer, SGD, 1 and 2 microbatches: temp with bf16 parameters equal to or above temp with f32
  # parameters, not half of the gradient part).
  widen = _F32 / jnp.dtype(config.precision.param_dtype).itemsize if backend == "cpu" else 1.0
  work_grads, layer_param_bytes = grads * widen, layer_param_bytes * widen
  acts = activations.by_family(config, dims, levers, layer_param_bytes, params * widen, backend, cal)
  # accumulator (param dtype: zeros_like the parameters) + this microbatch's, + the sum over time chunks and
  # this chunk's
  live_grads = grads * (levers.microbatches > 1) + work_grads * (1 + acts.extra_grads)
  # The compiler may keep more than the model code saves (calibration.Table.saved_scale).
  acts = dataclasses.replace(acts, saved=acts.saved * cal.saved_scale.get(config.precision.compute_dtype, 1.0))
  # inputs and targets int32, weights f32, this device's rows.
  inputs = config.data.batch_size / batch_ways * config.data.seq_len * 12
  if backend == "tpu":
    inputs = 3 * sharding.tpu_bytes((max(config.data.batch_size // batch_ways, 1), config.data.seq_len), 4)
    # Activations are [b, t, d]-shaped (the scores [.., t, t]): padded like the residual stream.
    pad = sharding.tpu_bytes((dims.b, dims.t, dims.d), _F32) / (dims.b * dims.t * dims.d * _F32)
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
  lever_buffers = states.dequantized + states.fresh_masks
  whole_extra = max(states.whole_params - params, 0.0) * widen  # gathered beyond the local shards (never < 0 tiled)
  gathered, reduced = sharding.sharding_buffers(config, levers.policy, sizes, cal, layer_param_bytes, whole_extra,
                                                grads, levers.time_chunk)
  fixed = cal.fixed_mib * 2**20  # what the compiler's figure holds whatever the step (calibrated)
  transient_bwd = max(acts.layer_transient, acts.head_transient) + states.qat_copy + lever_buffers + gathered + reduced
  backward = live_grads + acts.saved + transient_bwd + fixed
  # wm/step.py divides the summed gradients by the f32 total weight (`g / total`): the update's gradient-sized
  # buffers are f32 whatever the parameter dtype, beside the gradients as the backward pass left them.
  grads_f32 = grads * _F32 / jnp.dtype(config.precision.param_dtype).itemsize
  update = grads + cal.update_buffers * grads_f32 + lever_buffers + fixed
  if backward >= update:
    phase, saved, transient, grads_term = "backward", acts.saved, transient_bwd + fixed, live_grads
  else:
    phase, saved, transient, grads_term = "update", 0.0, update - grads, grads
  terms = dict(params=int(params), grads=int(grads_term), optimizer=int(states.optimizer),
               activations=int(saved), transient=int(transient), inputs=int(inputs))
  detail = dict(acts.detail, param_count=states.count, trainable_param_count=states.trained_count,
                saved_activations=int(acts.saved), layer_transient=int(acts.layer_transient),
                head_transient=int(acts.head_transient), per_device_batch=dims.b, microbatches=levers.microbatches,
                remat_policy=levers.policy, time_chunk=levers.time_chunk, backend=backend,
                attention=dims.attention, calibration=cal.fitted_on,
                qat_weight_copy=int(states.qat_copy), optimizer_dequantized=int(states.dequantized),
                prune_masks=int(states.masks), prune_fresh_masks=int(states.fresh_masks),
                fsdp_gathered=int(gathered), dp_reduced_grads=int(reduced))
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
     "state_constant": bytes held once per model beside the state, however
     many sequences (quant.state = "int8_static": its float32 scales; else 0),
     "total": their sum}. Nothing is created: shapes come from nnx.eval_shape.
  """
  def build():
    model = models.build(config, nnx.Rngs(0))
    return quant.quantize_model(model) if config.quant.weights == "int8" else model

  model = nnx.eval_shape(build)
  params = quant.param_bytes(model)
  state = int(model.state_bytes(context_len or config.data.seq_len, batch=batch))
  constant = int(model.state_constant_bytes()) if hasattr(model, "state_constant_bytes") else 0
  return {"params": params, "state": state, "state_constant": constant, "total": params + state + constant}
