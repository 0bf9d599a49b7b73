"""Test-session set-up shared by every test file.

Runs before any test module imports JAX, which is when these must be set.
"""

import os

# Eight fake CPU devices, so sharded meshes (data x fsdp x tensor) are tested on one host.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# LLVM's optimisation of the generated CPU code is most of a small program's compile time, and the tests
# compile hundreds of small programs that each run a few steps: level 0 halves the suite's CPU time. XLA's
# HLO passes, fusion and buffer assignment (so memory_analysis) are the same at every level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ["XLA_FLAGS"] + " --xla_backend_optimization_level=0").strip()
# With jax[tpu] installed, JAX would otherwise probe for a TPU (and log errors) before falling back to CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
