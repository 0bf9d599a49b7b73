"""Device mesh, logical axis rules, shardings and multi-process start-up.

Parameters carry logical axis names where they are created (e.g. a Transformer
MLP kernel is ("embed", "mlp")); `config.mesh.rules` maps each logical name to
a mesh axis ("data", "fsdp", "tensor") or None. With the default rules that is
FSDP over "fsdp" (ZeRO-3: every parameter sharded on its "embed" dimension)
and Megatron-style tensor parallelism over "tensor" (column-parallel up
projections, row-parallel down projections).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wm.config import ConfigError

AXES = ("data", "fsdp", "tensor")


def maybe_initialize_distributed(mesh_config: ml_collections.ConfigDict) -> None:
  """Starts `jax.distributed` for multi-process runs; a no-op for one process.

  On TPU VMs (and SLURM/Open MPI clusters) JAX discovers the coordinator by
  itself, so `jax.distributed.initialize()` needs no arguments: we call it when
  the environment says we are one of several hosts. Elsewhere the coordinator
  address, process count and id come from the config or from the environment
  variables WM_COORDINATOR, WM_NUM_PROCESSES, WM_PROCESS_ID.
  """
  address = mesh_config.coordinator_address or os.environ.get("WM_COORDINATOR", "")
  num = mesh_config.num_processes or int(os.environ.get("WM_NUM_PROCESSES", "0"))
  pid = mesh_config.process_id if mesh_config.process_id >= 0 else int(os.environ.get("WM_PROCESS_ID", "-1"))
  if jax.distributed.is_initialized():
    return
  if address:
    if num < 1 or pid < 0:
      raise ConfigError("mesh.coordinator_address is set: also set mesh.num_processes and mesh.process_id "
                        "(or WM_NUM_PROCESSES and WM_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  elif _on_multihost_cluster():
    jax.distributed.initialize()


def _on_multihost_cluster() -> bool:
  # TPU pod slices set TPU_WORKER_HOSTNAMES to more than one host; SLURM sets SLURM_NTASKS.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return hosts.count(",") >= 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def sync_processes(name: str) -> None:
  """Waits until every process reaches the barrier `name` (e.g. before process 0 moves files others read)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def broadcast_from_main(value: int) -> int:
  """Process 0's `value` on every process (so all act on one decision, e.g. whether the workdir lock was taken)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves -1 sizes and checks that the axes multiply to the device count."""
  sizes = {a: int(mesh_config[a]) for a in AXES}
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"config.mesh.{a}={s}: a mesh axis size must be >= 1, or -1 for the devices left over")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {free}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"config.mesh: the fixed axes multiply to {fixed}, which does not divide the "
                        f"{num_devices} devices; change mesh sizes so they divide {num_devices}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(f"config.mesh: data*fsdp*tensor = {fixed} but there are {num_devices} devices; "
                      f"make the product {num_devices} or set one axis to -1")
  return sizes


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  if devices is None:
    devices = jax.devices()
    if mesh_config.num_devices:
      if mesh_config.num_devices > len(devices):
        raise ConfigError(f"config.mesh.num_devices={mesh_config.num_devices} but only {len(devices)} devices exist")
      devices = devices[:mesh_config.num_devices]
  devices = list(devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  if devices and devices[0].platform in ("tpu", "gpu") and len(devices) == len(jax.devices()):
    # Lays the mesh out along the physical interconnect (ICI rings on TPU).
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in config.mesh.rules)


def logical_to_spec(logical: Sequence[str | None], axis_rules) -> P:
  table = dict(axis_rules)
  return P(*(table.get(name) if name is not None else None for name in logical))


@contextlib.contextmanager
def activate(mesh: Mesh, axis_rules):
  """Makes `mesh` and the logical rules current for model code and `constrain`."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(axis_rules):
    yield


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical axis names.

  A no-op outside `activate(...)` so models run unchanged on one device and in
  tests that never build a mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  axis_rules = flax_spmd.get_logical_axis_rules()  # set by activate() through nnx.logical_axis_rules
  if mesh is None or mesh.empty or not axis_rules:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, axis_rules))


def state_shardings(abstract_state, mesh: Mesh, axis_rules):
  """NamedShardings for an nnx State from its variables' logical names.

  Checks that every sharded dimension divides by its mesh axes, so a bad mesh
  fails here with the parameter's name rather than deep inside XLA.
  """
  with nnx.logical_axis_rules(axis_rules):
    specs = nnx.get_partition_spec(abstract_state)

  def check(path, leaf, spec):
    if not hasattr(leaf, "shape"):
      return
    for dim, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
      if axes is None:
        continue
      size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
      if dim % size:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ConfigError(f"parameter {name} of shape {leaf.shape} cannot be split {size} ways over mesh axes "
                          f"{axes}: change config.mesh or the model width so {size} divides {dim}")

  jax.tree_util.tree_map_with_path(
      lambda path, leaf, spec: check(path, leaf, spec), abstract_state, specs,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, axis_rules) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch", "length"), axis_rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
