"""Measured bytes: the compiler's figure for the real train step, and the device peak.

`compiled(config)` lowers and compiles the very train step `wm.train` runs
(`wm.step.make_train_step`) on abstract inputs (`jax.ShapeDtypeStruct`s that
carry their shardings), so nothing is materialised and a config too large for
this machine can still be measured. The figure is per device: the compiled
program is the SPMD program every device runs.

Compiled step memory (DESIGN.md):

    total = argument + output - alias + temp

`temp_size_in_bytes` is the part remat changes. Every field is reported, and
`bound_bytes` names the one figure that bounds the device memory the step
needs on the backend that compiled it (`bound_field` says which; the reasons,
with XLA's sources, are in docs/memory.md, "Which compiler figure bounds
device memory"):

    cpu, gpu   total_bytes: XLA's runtime allocates the temp allocation whole
               for each execution (BufferAllocation::IsPreallocatedTempBuffer),
               next to the resident arguments and the outputs; the heap
               simulator's peak_memory_in_bytes packs the same buffers and
               can only be smaller (and on CPU it leaves temp out).
    tpu        max(peak_memory_in_bytes, total_bytes): libtpu's accounting is
               not public; its peak counts temporaries outside the temp
               allocation (small programs: up to 4.6x total), its temp
               allocation is reserved whole (large programs: total up to 4%
               above peak). Only the larger holds under both readings.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from wm import parallel, step as step_lib

# Fields of jax's CompiledMemoryStats, in bytes. Older/other backends may lack
# some; those are reported as absent (None) rather than guessed.
MEMORY_FIELDS = (
    "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
    "generated_code_size_in_bytes", "peak_memory_in_bytes",
    "host_argument_size_in_bytes", "host_output_size_in_bytes", "host_alias_size_in_bytes",
    "host_temp_size_in_bytes", "host_generated_code_size_in_bytes",
)


def compiled_step(config: ml_collections.ConfigDict, mesh: Mesh | None = None):
  """Lowers and compiles the train step of `config` on abstract inputs.

  Returns:
    (compiled, setup): the `jax.stages.Compiled` step and the `wm.step.Setup`.
  """
  setup = step_lib.make_setup(config, mesh)
  train_step = step_lib.make_train_step(setup)
  # The mesh and logical rules must be current while tracing: the models'
  # activation constraints (wm.parallel.constrain) read them.
  with parallel.activate(setup.mesh, setup.rules):
    lowered = train_step.jitted.lower(setup.abstract_state, setup.abstract_batch())
    return lowered.compile(), setup


def bound(fields: dict[str, int | None], backend: str) -> tuple[int, str]:
  """(bytes, field name) of the figure that bounds device memory on `backend` (see the module doc)."""
  if backend == "tpu" and (fields.get("peak_memory_in_bytes") or 0) > fields["total_bytes"]:
    return int(fields["peak_memory_in_bytes"]), "peak_memory_in_bytes"
  return int(fields["total_bytes"]), "total_bytes"


def memory_fields(compiled, backend: str | None = None) -> dict[str, int | None]:
  """Every `memory_analysis()` field (bytes per device), the DESIGN.md total and the backend's bound."""
  stats = compiled.memory_analysis()
  if isinstance(stats, (list, tuple)):  # some backends return one entry per program
    stats = stats[0]
  out: dict[str, int | None] = {}
  for name in MEMORY_FIELDS:
    value = getattr(stats, name, None)
    out[name] = None if value is None else int(value)
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                        - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  if backend is not None:
    out["bound_bytes"], out["bound_field"] = bound(out, backend)
  return out


def flops(compiled) -> float | None:
  """Per-device FLOPs of the compiled step from `cost_analysis()` (None if not reported)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def compiled(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> dict[str, Any]:
  """Compiled step memory of `config`'s train step, without running it.

  Args:
    config: a validated config.
    mesh: the mesh to compile for; default `wm.parallel.make_mesh(config.mesh)`
      over this process's devices (or a TPU topology's, see wm.memory.aot).

  Returns:
    A dict: every `memory_analysis()` field (`*_in_bytes`, None where the
    backend does not report it), `total_bytes` (argument + output - alias +
    temp), `bound_bytes` and `bound_field` (the figure that bounds device
    memory on this backend, and which field it is: see the module doc),
    `argument_bytes` (the arguments by part: params, rest, opt_state, step,
    rng, batch; see `argument_bytes`),
    `flops` (cost_analysis, per device), `backend` (platform),
    `device_kind`, `num_devices`, `mesh` (axis sizes) and `compile_seconds`.
  """
  start = time.perf_counter()
  exe, setup = compiled_step(config, mesh)
  return record(exe, setup, time.perf_counter() - start)


def argument_bytes(setup) -> dict[str, int]:
  """Per-device bytes of each argument of the train step: the state's parts and the batch.

  The step's arguments are the train state {"params", "rest", "opt_state",
  "step", "rng"} and the batch, so these add up to the compiler's
  `argument_size_in_bytes` (tests/test_levers.py checks it): the
  optimizer-state bytes of a compiled step are `opt_state`. With LoRA,
  "params" are the adapters and the frozen base weights are in "rest".
  """
  def local(tree) -> int:
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))

  out = {name: local(part) for name, part in setup.abstract_state.items()}
  out["batch"] = local(setup.abstract_batch())
  return out


def record(exe, setup, seconds: float) -> dict[str, Any]:
  """`compiled`'s dict for an executable already compiled by `compiled_step`."""
  device = setup.mesh.devices.flat[0]
  return {
      **memory_fields(exe, device.platform),
      "argument_bytes": argument_bytes(setup),
      "flops": flops(exe),
      "backend": device.platform,
      "device_kind": device.device_kind,
      "num_devices": int(setup.mesh.devices.size),
      "mesh": {name: int(size) for name, size in setup.mesh.shape.items()},
      "compile_seconds": round(seconds, 3),
  }


def device_peak_bytes(device: jax.Device | None = None) -> int | None:
  """`memory_stats()['peak_bytes_in_use']` of a device (default: the first local one).

  None where the backend keeps no allocator statistics: CPU reports none, so
  on CPU the compiled figure is the only measurement.
  """
  device = device or jax.local_devices()[0]
  stats = device.memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])
