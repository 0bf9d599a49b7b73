"""Where a tensor's bytes land on one device: mesh shards, TPU tiles, and the buffers sharding adds.

Derived from the mesh, the logical axis rules (wm.parallel) and the target's
memory layout; the counts of sharding buffers a compiler keeps alive are
fitted (`wm.memory.calibration.Table.fsdp_gathered`, `dp_grad_copies`).
"""

from __future__ import annotations

import itertools
import math

import jax
import ml_collections

from wm import parallel
from wm.memory import calibration
from wm.models import remat as remat_lib


def axes(rule) -> tuple[str, ...]:
  """The mesh axes a logical axis rule names (None, one axis, or several)."""
  if rule is None:
    return ()
  return tuple(rule) if isinstance(rule, (tuple, list)) else (rule,)


def _ways(names: tuple, rules: dict, sizes: dict[str, int], shape: tuple[int, ...] | None) -> list[int]:
  """Per dimension, how many ways the mesh splits it; a mesh axis splits one dimension at most."""
  out, used = [], set()
  for i, name in enumerate(names):
    mesh_axes = [a for a in axes(rules.get(name)) if a not in used]
    n = math.prod(sizes.get(a, 1) for a in mesh_axes)
    if shape is not None and shape[i] % n:
      out.append(1)
      continue
    out.append(n)
    used.update(mesh_axes)
  return out


def shards(names: tuple, rules: dict, sizes: dict[str, int], shape: tuple[int, ...] | None = None) -> int:
  """How many ways a tensor with these logical axis names is split over the mesh.

  A dimension that does not divide by its mesh axes is left whole (make_setup
  rejects such a mesh; the planner uses this to skip it).
  """
  return math.prod(_ways(names, rules, sizes, shape))


def local_shape(shape: tuple[int, ...], names: tuple, rules: dict, sizes: dict[str, int]) -> tuple[int, ...]:
  """This device's slice of a tensor with these logical names (undivisible dimensions stay whole, as `shards`)."""
  return tuple(n // w for n, w in zip(shape, _ways(names, rules, sizes, shape)))


def mesh_sizes(config: ml_collections.ConfigDict, num_devices: int | None = None) -> dict[str, int]:
  """Mesh axis sizes for `num_devices` (default: config.mesh.num_devices, else all devices)."""
  n = num_devices or config.mesh.num_devices or jax.device_count()
  return parallel.mesh_shape(config.mesh, n)


def batch_ways(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> int:
  """Devices the batch is split over (the mesh axes of the "batch" rule)."""
  return math.prod(sizes.get(a, 1) for a in axes(dict(parallel.rules(config)).get("batch")))


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


def family_key(config: ml_collections.ConfigDict, time_chunk: int) -> str:
  """Which per-family sharding coefficients a step uses (`calibration.Table.fsdp_gathered`, `dp_grad_copies`).

  The model family, except the LSTM language model in time chunks (0 < k < t,
  wm/models/lstm.py `Model.loss`): its chunk scan runs the whole model once
  per chunk, so the gathered weights and reduced gradients live in another
  loop than the unchunked LSTM's layer scan (XLA CPU buffer listings of the
  same LSTM with and without chunks: the chunked step keeps whole gathered
  weight matrices and several gradient shards beside each other), and one
  set of coefficients cannot hold both.
  """
  name = config.model.name
  if name == "lstm":
    k = remat_lib.resolve_time_chunk(time_chunk, config.data.seq_len)
    if 0 < k < config.data.seq_len:
      return "lstm_chunked"
  return name


def sharding_buffers(config: ml_collections.ConfigDict, policy: str, sizes: dict[str, int],
                     cal: calibration.Table, layer_param_bytes: float, gathered_extra: float,
                     grads: float, time_chunk: int = 0) -> tuple[float, float]:
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
  key = family_key(config, time_chunk)
  gathered = reduced = 0.0
  if sizes.get("fsdp", 1) > 1:
    none_copies, remat_copies, whole = cal.fsdp_gathered.get(key, (0.0, 0.0, 0.0))
    # Time chunks are rematerialized whole whatever the layer policy: their weights are gathered as under remat.
    rematerialized = policy != "none" or key == "lstm_chunked"
    gathered = (remat_copies if rematerialized else none_copies) * layer_param_bytes + whole * gathered_extra
  if sizes.get("data", 1) > 1:
    reduced = cal.dp_grad_copies.get(key, 0.0) * grads
  return gathered, reduced
