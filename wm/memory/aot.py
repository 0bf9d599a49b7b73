"""Ahead-of-time compile of the train step for a TPU topology or an NVIDIA GPU, from a CPU host.

    python -m wm compile --config configs/text_transformer.py --topology v5e:2x2 [--json]

With `jax[tpu]` installed (libtpu; `pip install -e '.[tpu]'`), JAX can describe
a TPU slice it is not attached to: `get_topology_desc(platform="tpu",
topology_name="v5e:2x2")` returns compile-only devices. We lay the config's
mesh over them, build the sharded abstract state (`wm.step.make_setup`) and
lower + compile the real train step on abstract inputs. Nothing runs and no
parameter is materialised, so this is how to check that a run fits a slice's
HBM before booking the hardware: the compiler's per-device bytes come from the
TPU compiler itself (where `temp` and host-offloaded bytes are real, unlike
the CPU backend's).

NVIDIA GPUs (`target="h100:8"`): JAX's CUDA PJRT plugin describes GPUs it is
not attached to when given an XLA GPU target description
(`stream_executor::GpuTargetConfigProto` in text form, the `target_config`
option of `PJRT_GpuDeviceTopology_Create` in
xla/pjrt/c/pjrt_c_api_gpu_internal.cc) and a `topology` of
partitions x hosts x devices. Compiling needs only the plugin's compiler,
not CUDA's libraries, so the plugin is installed without dependencies, and
outside the environment's site-packages: installed there, JAX's plugin
discovery would start it (and log that there is no CUDA) in every process.

    pip install --no-deps --target ~/.cache/wm/gpu-compiler \
        jax-cuda12-plugin==$JAXVER jax-cuda12-pjrt==$JAXVER     # $JAXVER: the installed jax's version

`WM_GPU_COMPILER` overrides that directory. The device description is
written from public device facts (`GPU_SPECS`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import re
import sys
from typing import Any

import ml_collections

from wm.config import ConfigError, format_bytes

INSTALL_HINT = "pip install -e '.[tpu]'   (or: pip install 'jax[tpu]' matching your jax version)"

# Accelerator names libtpu expects in TPU_ACCELERATOR_TYPE, by generation;
# the value only quiets libtpu's start-up probe, it does not shape the compile.
_ACCELERATOR = {"v4": "v4-{cores}", "v5p": "v5p-{cores}", "v5e": "v5litepod-{chips}",
                "v5litepod": "v5litepod-{chips}", "v6e": "v6e-{chips}"}


# Public device facts of the GPUs we can describe (NVIDIA H100 Tensor Core GPU datasheet and the Hopper
# architecture whitepaper, SXM5 80 GB part; CUDA C Programming Guide, "Compute capability 9.0" limits):
# streaming multiprocessors, their shared memory and registers, thread limits, L2, HBM size and
# bandwidth, boost clock. The compiler reads them to size kernels (tiles, occupancy) and, for the
# memory-aware scheduler, the device memory; none of them changes which buffers a step keeps.
GPU_SPECS = {
    "h100": {
        "name": "NVIDIA H100 80GB HBM3",
        "compute_capability": (9, 0),
        "core_count": 132,  # SMs, H100 SXM5
        "fpus_per_core": 128,  # FP32 cores per SM
        "threads_per_block_limit": 1024,
        "threads_per_core_limit": 2048,
        "threads_per_warp": 32,
        "thread_dim_limit_x": 1024,  # block dimensions
        "thread_dim_limit_y": 1024,
        "thread_dim_limit_z": 64,
        "block_dim_limit_x": 2**31 - 1,  # grid dimensions
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "shared_memory_per_block": 48 * 1024,  # without opt-in
        "shared_memory_per_block_optin": 227 * 1024,
        "shared_memory_per_core": 228 * 1024,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
        "l2_cache_size": 50 * 2**20,
        "device_memory_size": 80 * 2**30,  # 80 GB HBM3
        "memory_bandwidth": 3_350_000_000_000,  # 3.35 TB/s
        "clock_rate_ghz": 1.98,  # boost clock
    },
}
GPU_INSTALL_HINT = ("pip install --no-deps --target ~/.cache/wm/gpu-compiler jax-cuda12-plugin=={v} "
                    "jax-cuda12-pjrt=={v}   (the installed jax's version; docs/memory.md, 'GPU targets')")


def gpu_target_config(kind: str) -> str:
  """An XLA `GpuTargetConfigProto` in text form for a GPU kind of `GPU_SPECS`."""
  spec = GPU_SPECS[kind]
  major, minor = spec["compute_capability"]
  fields = [f"  {k}: {v}" for k, v in spec.items() if k not in ("name", "compute_capability")]
  return ("gpu_device_info {\n" + "\n".join(fields)
          + f"\n  cuda_compute_capability {{\n    major: {major}\n    minor: {minor}\n  }}\n}}\n"
          + f'platform_name: "CUDA"\ndevice_description_str: "{spec["name"]}"\n')


def _gpu_compiler_dir() -> str:
  return os.environ.get("WM_GPU_COMPILER", str(pathlib.Path.home() / ".cache" / "wm" / "gpu-compiler"))


def gpu_compiler_available() -> bool:
  """Whether JAX's CUDA plugin is importable (installed, or in the WM_GPU_COMPILER directory)."""
  if importlib.util.find_spec("jax_plugins") is not None:
    import jax_plugins
    if any(os.path.isdir(os.path.join(p, "xla_cuda12")) for p in jax_plugins.__path__):
      return True
  return os.path.isdir(os.path.join(_gpu_compiler_dir(), "jax_plugins", "xla_cuda12"))


def _cuda_compiler():
  """Registers JAX's CUDA plugin for compiling only; raises ConfigError if it is not installed."""
  import jax
  from jax._src import xla_bridge
  # Compile-only: the plugin's start-up would otherwise insist on CUDA's runtime libraries.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")  # execution stays on this host's CPU; the GPU is a compile target
  directory = _gpu_compiler_dir()
  if os.path.isdir(directory) and directory not in sys.path:
    sys.path.append(directory)
  try:
    plugin = importlib.import_module("jax_plugins.xla_cuda12")
  except ImportError as e:
    raise ConfigError("compiling for a GPU from this host needs JAX's CUDA compiler plugin:\n  "
                      + GPU_INSTALL_HINT.format(v=jax.__version__)) from e
  try:
    xla_bridge.make_pjrt_topology("cuda", "", topology="1x1x1", target_config=gpu_target_config("h100"))
  except NotImplementedError:  # not registered yet (discovery did not see it, or refused it without CUDA)
    plugin.initialize()


def gpu_topology(target: str):
  """Compile-only devices of `target` ("h100:8": 8 H100s on one host)."""
  generation, _, dims = target.partition(":")
  kind = generation.lower()
  if kind == "gpu":
    kind = "h100"
  if kind not in GPU_SPECS:
    raise ConfigError(f"--target {target!r}: GPUs that can be described are {sorted(GPU_SPECS)} (wm.memory.aot.GPU_SPECS)")
  count = 1
  for n in re.findall(r"\d+", dims):
    count *= int(n)
  _cuda_compiler()
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="cuda", topology_name="", target_config=gpu_target_config(kind),
                                      topology=f"1x1x{count}")


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def _quiet_libtpu(topology: str) -> None:
  """Environment that lets libtpu start on a host with no TPU, without probing the network."""
  generation, _, dims = topology.partition(":")
  chips = 1
  for n in re.findall(r"\d+", dims):
    chips *= int(n)
  pattern = _ACCELERATOR.get(generation.lower(), "v5litepod-{chips}")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", pattern.format(chips=chips, cores=2 * chips))
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server here
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # one host; else libtpu logs an error
  # libtpu takes /tmp/libtpu_lockfile for the whole process by default; compiling
  # for a topology attaches to no TPU, so other processes may do the same.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  from jax._src import xla_bridge
  if not xla_bridge.backends_are_initialized():
    # Ordinary execution stays on CPU: the TPU is only a compile target here.
    jax.config.update("jax_platforms", "cpu")


def _tpu_topology(topology: str, flag: str):
  """libtpu's compile-only description of a TPU slice, or a ConfigError naming `flag`."""
  from jax.experimental import topologies
  _quiet_libtpu(topology)
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # libtpu raises JaxRuntimeError / ValueError with its own wording
    raise ConfigError(f"libtpu could not describe {flag} {topology!r}: {e}\n"
                      f"Topologies look like v5e:2x2, v5e:4x4, v6e:2x2, v5p:2x2x1, v4:2x2x1") from e


def topology_mesh(config: ml_collections.ConfigDict, topology: str):
  """A `Mesh` with the config's axes over the compile-only devices of a TPU topology."""
  from jax.experimental import topologies
  from wm import parallel
  desc = _tpu_topology(topology, "--topology")
  devices = list(desc.devices)
  sizes = parallel.mesh_shape(config.mesh, len(devices))
  return topologies.make_mesh(desc, tuple(sizes[a] for a in parallel.AXES), parallel.AXES)


def target_mesh(config: ml_collections.ConfigDict, target: str | None = None):
  """(mesh, backend) to compile `config` for: this host's devices, or a described accelerator.

  Args:
    config: its mesh section sets the axes; `mesh.num_devices` (0 = all) picks
      how many of the target's devices the mesh spans.
    target: None or "cpu" (this host's devices), a TPU topology ("v5e:2x2",
      "v6e:4x4", ...; needs libtpu), or "h100:N" (N H100s on one host; needs
      JAX's CUDA compiler plugin, see the module doc).
  """
  from jax.sharding import Mesh
  import numpy as np
  from wm import parallel
  if target in (None, "", "cpu", "local"):
    return parallel.make_mesh(config.mesh), jax_backend()
  generation = target.split(":", 1)[0].lower()
  if generation in ("gpu", "h100", "a100", "h200", "b200"):
    devices = list(gpu_topology(target).devices)
    n = config.mesh.num_devices or len(devices)
    if n > len(devices):
      raise ConfigError(f"config.mesh.num_devices={n} but target {target} has {len(devices)} GPUs")
    sizes = parallel.mesh_shape(config.mesh, n)
    return Mesh(np.asarray(devices[:n]).reshape(tuple(sizes[a] for a in parallel.AXES)), parallel.AXES), "gpu"
  if not libtpu_available():
    raise ConfigError(f"--target {target!r} needs the TPU compiler (libtpu): {INSTALL_HINT}")
  from jax.experimental import topologies
  desc = _tpu_topology(target, "--target")
  devices = list(desc.devices)
  n = config.mesh.num_devices or len(devices)
  if n > len(devices):
    raise ConfigError(f"config.mesh.num_devices={n} but topology {target} has {len(devices)} chips")
  sizes = parallel.mesh_shape(config.mesh, n)
  shape = tuple(sizes[a] for a in parallel.AXES)
  if n == len(devices):
    return topologies.make_mesh(desc, shape, parallel.AXES), "tpu"
  return Mesh(np.asarray(devices[:n]).reshape(shape), parallel.AXES), "tpu"


def target_backend(target: str | None) -> tuple[str, int | None]:
  """(backend name, device count) of a target string, without starting its compiler.

  None/"cpu"/"local" is this host's backend (device count: None, the caller
  decides); "v5e:4x4" is ("tpu", 16); "h100:8" is ("gpu", 8).
  """
  if target in (None, "", "cpu", "local"):
    return jax_backend(), None
  generation, _, dims = target.partition(":")
  count = 1
  for n in re.findall(r"\d+", dims):
    count *= int(n)
  if generation.lower() in ("gpu", "h100", "a100", "h200", "b200"):
    return "gpu", count
  return "tpu", count


def jax_backend() -> str:
  import jax
  return jax.default_backend()


def compile_for_topology(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
  """Compiled per-device memory and FLOPs of the train step on a TPU topology.

  Returns:
    `wm.memory.measure.compiled(...)` fields plus `topology` and the analytic
    `estimate` (wm.memory.estimate, same device count) for comparison.
  """
  from wm.memory import estimate as estimate_lib, measure
  mesh = topology_mesh(config, topology)
  record = measure.compiled(config, mesh)
  record["topology"] = topology
  record["estimate"] = estimate_lib.estimate(config, num_devices=int(mesh.devices.size), backend="tpu").as_dict()
  return record


def _table(record: dict[str, Any]) -> str:
  rows = [("topology", record["topology"]),
          ("devices", f"{record['num_devices']} x {record['device_kind']}  mesh {record['mesh']}")]
  for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
               "generated_code_size_in_bytes", "host_temp_size_in_bytes", "peak_memory_in_bytes"):
    value = record.get(name)
    if value is not None:
      rows.append((name.replace("_size_in_bytes", "").replace("_in_bytes", ""), format_bytes(value)))
  rows.append(("total (arg+out-alias+temp)", format_bytes(record["total_bytes"])))
  rows.append((f"bound ({record['bound_field']})", format_bytes(record["bound_bytes"])))
  rows.append(("estimate (wm.memory.estimate)", format_bytes(record["estimate"]["total"])))
  if record.get("flops") is not None:
    rows.append(("flops per device per step", f"{record['flops']:.4g}"))
  rows.append(("compile time", f"{record['compile_seconds']:.1f} s"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(config: ml_collections.ConfigDict, topology: str | None = None, as_json: bool = False) -> int:
  """`python -m wm compile`: prints per-device bytes and FLOPs; returns an exit code."""
  if not topology:
    print("error: compile needs --topology, e.g. --topology v5e:2x2", file=sys.stderr)
    return 2
  if not libtpu_available():
    print(f"error: compiling for a TPU topology needs the TPU compiler (libtpu), which is not installed.\n"
          f"Install it with:\n  {INSTALL_HINT}\n"
          f"It installs on CPU-only hosts; nothing runs on a TPU.", file=sys.stderr)
    return 2
  try:
    record = compile_for_topology(config, topology)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(record, indent=2) if as_json else _table(record))
  return 0
