"""Int8 weights (post-training and quantization-aware) and int8/fp8 generation state (dynamic or static scales).

Weights: per-channel symmetric int8, weight-only. For a weight W whose
contracted (input) axes are I and whose other axes index output channels j,

    s_j = max_{i in I} |W_ij| / 127,   Q_ij = round(W_ij / s_j) in [-127, 127],   W_ij ~= Q_ij s_j

(symmetric, zero-point-free quantization with one scale per output channel:
Krishnamoorthi 2018, sec. 2.2-2.3; Jacob et al. 2018 for the affine scheme it
simplifies). Rounding to nearest bounds the error of every element by s_j / 2,
i.e. 1/254 of its channel's largest magnitude. Scales are float32 and keep
the weight's rank (size 1 on the reduced axes), so a stacked weight
[layers, ...] gets one scale per layer and channel, and nnx.scan/vmap slice
values and scales alike. The per-channel axes of each weight are declared by
the module that owns it (`quant_axes()` on layers.Dense, layers.Embed and
lstm.LSTMLayer): the input dims of a Dense kernel, the width of an embedding
row (one scale per vocabulary entry serves both the lookup and the tied
output head, whose contraction is over the width), the input rows of the
LSTM's recurrent kernel. Norm scales and biases stay in float: they are
vectors, a few hundred bytes per layer.

- Post-training (`quant.weights = "int8"`): `quantize_params` replaces each
  such weight by a `QArray` (int8 values + float32 scales); the model
  dequantizes it to the compute dtype inside the layer that uses it
  (`matmul_weight`), so at most one layer's float copy exists at a time
  under the layer scan. Stored bytes: 1 per element plus 4 per channel.
- Quantization-aware training (`quant.qat = "int8"`): the train step runs
  the forward pass on `fake_quantize_params(params)`, the same grid as
  above, with a straight-through estimator (Bengio et al. 2013; Jacob et al.
  2018 sec. 3): forward W -> Q s, backward identity, so the float master
  weights learn to sit well on the int8 grid that post-training quantization
  later uses. Stored bytes are unchanged (float master weights, float
  gradients, the same optimizer state); the step holds one fake-quantized
  copy of the weights while it runs (wm.memory.estimate counts it).

Generation state (`quant.state`): the Transformer's KV cache and the LSTM's
(h, c) are stored between tokens in one of

- float32, bfloat16: a cast; 4 and 2 bytes per element.
- float8_e4m3fn (Micikevicius et al. 2022: 4 exponent bits, 3 mantissa bits,
  finite range +-448, no scale): values are clipped to the range, and our
  pre-norm models keep keys, values and states at unit scale, far inside it;
  1 byte per element.
- int8 (dynamic): symmetric, one float32 scale computed per row of the last
  axis as it is written (per cached key/value head vector, per sequence's h
  or c); 1 + 4/row bytes per element (head_dim 32: 1.125, 0.281x float32).
- int8_static: symmetric int8 codes on a static scale per channel, as
  deployed int8 KV caches do (TensorRT-LLM's and vLLM's calibrated KV
  scales): Transformer: one per (layer, keys or values, kv head, head_dim
  channel); LSTM: one per (layer, h or c, channel). The cache holds the codes
  alone, exactly 1 byte per element per sequence (0.25x float32, 0.5x
  bfloat16); the float32 scales are a per-model constant, counted apart
  (`state_constant_bytes`: layers * 2 * kv_heads * head_dim * 4 bytes, or
  layers * 2 * d * 4), held once however many sequences decode. Scales are
  calibrated once from the model's own activations: its forward pass over
  `quant.calibration_batches` train-split batches (wm.generate.
  calibrate_state) records the largest |key| (after RoPE, as cached) and
  |value| per channel, or the LSTM's largest |c|; scale = amax / 127 (an
  all-zero channel gets 1). h = sigmoid(o) tanh(c) lies in (-1, 1), so its
  scale is 1/127 without calibration. A value beyond its channel's
  calibrated range saturates at +-127 codes (clipped, not wrapped): a risk
  for inputs unlike the calibration data, or the LSTM's c on sequences
  longer than the calibration's. The scales travel with the state as the
  `scale` of a QArray that broadcasts over batch and slots (passed in as
  arrays; decoding stays one compiled program).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wm import config

STATE_DTYPES = config.STATE_DTYPES  # quant.state; "" there means the compute dtype
_QMAX = 127  # symmetric int8: -128 is never used, so the grid is symmetric around 0
_FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """An int8 tensor with float32 scales: the value is `values * scale`.

  `scale` has the rank of `values` with size 1 on the reduced axes, so slicing
  both leaves along any kept axis (a scan over layers, a cache slot) keeps
  them consistent.
  """
  values: jax.Array  # int8
  scale: jax.Array  # float32, broadcasts against values

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  @property
  def nbytes(self) -> int:
    return int(self.values.nbytes + self.scale.nbytes)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


def _axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  return tuple(sorted(a % ndim for a in axes))


def quantize(x: jax.Array, axes: tuple[int, ...]) -> QArray:
  """Symmetric int8 with one scale per slice over `axes` (the reduced, contracted axes)."""
  x32 = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x32), axis=_axes(axes, x.ndim), keepdims=True)
  # An all-zero channel gets scale 1 (any scale represents it exactly) rather than 0 / 0.
  scale = jnp.where(absmax > 0, absmax / _QMAX, 1.0)
  values = jnp.clip(jnp.round(x32 / scale), -_QMAX, _QMAX).astype(jnp.int8)
  return QArray(values, scale)


def fake_quantize(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """x rounded to its int8 grid in the forward pass, identity in the backward pass (straight-through).

  x + stop_gradient(q(x) - x) has the value q(x) and the derivative 1: the
  gradient of the rounded weight is applied to the float weight unchanged.
  """
  rounded = quantize(x, axes).dequantize(x.dtype)
  return x + jax.lax.stop_gradient(rounded - x)


def matmul_weight(value: jax.Array | QArray, dtype) -> jax.Array:
  """A weight in the compute dtype, whether stored in float or as an int8 QArray."""
  if isinstance(value, QArray):
    return value.dequantize(dtype)
  return value.astype(dtype)


def take_rows(table: jax.Array | QArray, ids: jax.Array) -> jax.Array:
  """Rows `ids` of an embedding table; an int8 table dequantizes only the rows taken (float32)."""
  if isinstance(table, QArray):
    return jnp.take(table.values, ids, axis=0).astype(jnp.float32) * jnp.take(table.scale, ids, axis=0)
  return jnp.take(table, ids, axis=0)


# ---------------------------------------------------------------------------
# Which weights, along which axes
# ---------------------------------------------------------------------------

Path = tuple[str, ...]


def _key(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_key(path: Any) -> Path:
  """A jax key path into an nnx.State as the tuple of names `weight_axes` uses."""
  return tuple(_key(p) for p in path)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def weight_axes(model: nnx.Module) -> dict[Path, tuple[int, ...]]:
  """{path of a matmul weight in nnx.state(model): the axes its per-channel scale reduces over}.

  Every module that owns a matmul weight declares it with
  `quant_axes() -> {attribute: axes}`; the model may be abstract
  (`nnx.eval_shape`), since only shapes are read.
  """
  found = {}
  for path, module in nnx.iter_modules(model):
    if hasattr(module, "quant_axes"):
      for name, axes in module.quant_axes().items():
        found[tuple(str(p) for p in path) + (name,)] = tuple(axes)
  return found


def _map_weights(fn, params: Any, axes: dict[Path, tuple[int, ...]]) -> Any:
  def one(path, leaf):
    key = path_key(path)
    if key not in axes:
      return leaf
    if _is_variable(leaf):
      value = leaf.get_value()
      return leaf.replace(fn(value, axes[key]))
    return fn(leaf, axes[key])

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_variable)


def quantize_params(params: Any, axes: dict[Path, tuple[int, ...]]) -> Any:
  """`params` (an nnx.State) with every weight in `axes` replaced by its int8 QArray."""
  return _map_weights(quantize, params, axes)


def fake_quantize_params(params: Any, axes: dict[Path, tuple[int, ...]]) -> Any:
  """`params` with every weight in `axes` fake-quantized (straight-through): the QAT forward pass."""
  return _map_weights(fake_quantize, params, axes)


def quantize_model(model: nnx.Module) -> nnx.Module:
  """A copy of `model` whose matmul weights are int8 QArrays (weight-only post-training quantization)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, quantize_params(params, weight_axes(model)), rest)


def param_bytes(model_or_state: Any) -> int:
  """Bytes held by the parameters (int8 values and their scales counted as stored)."""
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
  return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(state)))


# ---------------------------------------------------------------------------
# Generation state
# ---------------------------------------------------------------------------

def check_state_dtype(kind: str) -> str:
  if kind not in STATE_DTYPES:
    raise ValueError(f"state dtype {kind!r} is not one of {STATE_DTYPES}")
  return kind


def static_scales(amax: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Static int8 scales from calibrated absolute maxima: amax / 127 (an all-zero channel gets scale 1)."""
  return {k: jnp.where(a > 0, a / _QMAX, 1.0).astype(jnp.float32) for k, a in amax.items()}


def empty_state(shape: tuple[int, ...], kind: str, dtype, scale: jax.Array | None = None) -> jax.Array | QArray:
  """A zero state of `shape` as stored between tokens.

  Args:
    shape: the state's shape.
    kind: its storage (`quant.state`).
    dtype: the compute dtype it is read back in.
    scale: "int8_static" only: the calibrated scale, broadcasting against
      `shape` (size 1 on the batch and slot axes): a per-model constant the
      state carries along, never rewritten.
  """
  if kind == "int8_static":
    if scale is None:
      raise ValueError('quant.state="int8_static" needs the calibrated scales: pass scales= (from '
                       'wm.generate.calibrate_state) when creating the generation state')
    return QArray(jnp.zeros(shape, jnp.int8), jnp.asarray(scale, jnp.float32))
  return encode_state(jnp.zeros(shape, dtype), kind)


def encode_state(x: jax.Array, kind: str, scale: jax.Array | None = None) -> jax.Array | QArray:
  """A state tensor as stored between tokens: cast, clipped to fp8 range, or int8.

  "int8" computes a scale per row (a QArray); "int8_static" returns the int8
  codes alone, on the grid of the given calibrated `scale` (values beyond
  127 * scale saturate).
  """
  if kind == "int8":
    return quantize(x, (-1,))
  if kind == "int8_static":
    return jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -_QMAX, _QMAX).astype(jnp.int8)
  if kind == "float8_e4m3fn":
    # float8_e4m3fn has no infinity: a cast beyond +-448 gives NaN, so saturate first.
    return jnp.clip(x.astype(jnp.float32), -_FP8_MAX, _FP8_MAX).astype(jnp.float8_e4m3fn)
  return x.astype(kind)


def update_state(old: jax.Array | QArray, new: jax.Array, kind: str) -> jax.Array | QArray:
  """`new` encoded in the storage of `old`; a static-scale state keeps `old`'s (calibrated) scale."""
  if kind == "int8_static":
    return QArray(encode_state(new, kind, old.scale), old.scale)
  return encode_state(new, kind)


def decode_state(s: jax.Array | QArray, dtype) -> jax.Array:
  """The stored state back in the compute dtype."""
  return matmul_weight(s, dtype)


def state_row_bytes(kind: str, row: int) -> int:
  """Stored bytes per sequence of one state row of `row` elements (int8 adds its float32 scale).

  "int8_static" stores codes alone: its scales are a per-model constant
  (`state_constant_bytes`), not part of any sequence's state.
  """
  if kind == "int8":
    return row + 4
  if kind == "int8_static":
    return row
  return row * jnp.dtype(kind).itemsize


def state_constant_bytes(kind: str, elements: int) -> int:
  """Bytes held once per model beside the state: the float32 static scales of `elements` channels, else 0."""
  return 4 * elements if kind == "int8_static" else 0
