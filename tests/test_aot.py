"""Ahead-of-time compile for a TPU topology from this CPU host (needs libtpu: pip install -e '.[tpu]')."""

import importlib.util
import json

import pytest

from wm import config as config_lib
from wm.memory import aot

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")


def tiny_config():
  c = config_lib.base_config()
  c.data.task = "mqar"
  c.data.seq_len = 32
  c.data.vocab_size = 64
  c.data.num_kv_pairs = 2
  c.data.batch_size = 8
  c.model.d = 64
  c.model.layers = 2
  c.model.heads = c.model.kv_heads = 2
  c.mesh.data, c.mesh.fsdp = -1, 2
  return config_lib.validate(c)


@needs_libtpu
def test_compiles_for_v5e_2x2_without_running():
  record = aot.compile_for_topology(tiny_config(), "v5e:2x2")
  assert record["backend"] == "tpu" and record["num_devices"] == 4
  assert record["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  for field in ("argument_size_in_bytes", "output_size_in_bytes", "generated_code_size_in_bytes",
                "peak_memory_in_bytes", "total_bytes"):
    assert record[field] > 0, field
  # A program this small can keep its temporaries out of HBM's temp allocation (TPU reports 0 then).
  assert record["temp_size_in_bytes"] >= 0
  assert record["total_bytes"] == (record["argument_size_in_bytes"] + record["output_size_in_bytes"]
                                   - record["alias_size_in_bytes"] + record["temp_size_in_bytes"])
  assert record["flops"] > 0
  # On TPU the bound is the larger of the compiler's peak and the DESIGN.md total (docs/memory.md).
  assert record["bound_bytes"] == max(record["peak_memory_in_bytes"], record["total_bytes"])
  assert record["bound_field"] in ("peak_memory_in_bytes", "total_bytes")
  # The TPU compiler's bound and the analytic estimate for 4 devices (fitted to that bound) are the same order
  # of magnitude.
  assert 0.2 < record["estimate"]["total"] / record["bound_bytes"] < 5


@needs_libtpu
def test_cli_prints_json(capsys):
  assert aot.main(tiny_config(), topology="v5e:2x2", as_json=True) == 0
  data = json.loads(capsys.readouterr().out)
  assert data["topology"] == "v5e:2x2" and data["total_bytes"] > 0


@needs_libtpu
def test_unknown_topology_is_a_clear_error(capsys):
  assert aot.main(tiny_config(), topology="v99:1x1") == 2
  assert "topology" in capsys.readouterr().err


def test_without_libtpu_it_says_how_to_install(capsys, monkeypatch):
  monkeypatch.setattr(aot, "libtpu_available", lambda: False)
  assert aot.main(tiny_config(), topology="v5e:2x2") == 2
  assert "pip install -e '.[tpu]'" in capsys.readouterr().err


def test_topology_is_required(capsys):
  assert aot.main(tiny_config(), topology=None) == 2
  assert "--topology" in capsys.readouterr().err


@needs_libtpu
def test_plan_for_a_tpu_target_is_confirmed_by_the_tpu_compiler():
  from wm.memory import report
  config = tiny_config()
  budget = 64 * 2**20
  data = report.collect(config, budget=budget, target="v5e:2x2")
  plan = data["plan"]
  assert plan["backend"] == "tpu" and plan["target"] == "v5e:2x2"
  assert plan["confirmed"] and plan["compiled"]["backend"] == "tpu"
  assert plan["compiled_bound_bytes"] <= budget and plan["margin_bytes"] == budget - plan["compiled_bound_bytes"]
  assert plan["compiled"]["num_devices"] == 4
  assert data["compiled"]["target"] == "v5e:2x2" and data["estimate"]["detail"]["backend"] == "tpu"


@pytest.mark.skipif(aot.gpu_compiler_available(), reason="JAX's CUDA compiler plugin is installed here")
def test_gpu_target_without_a_gpu_compiler_is_a_clear_error(capsys):
  from wm.memory import report
  assert report.main(tiny_config(), budget="64MiB", target="h100:8") == 2
  err = capsys.readouterr().err
  assert "GPU" in err and "jax-cuda12-plugin" in err


@pytest.mark.skipif(not aot.gpu_compiler_available(), reason="JAX's CUDA compiler plugin is not installed (docs/memory.md)")
def test_compiles_for_h100_from_this_host():
  """The train step compiled for two H100s described from public device facts (aot.GPU_SPECS), no GPU here."""
  from wm.memory import estimate as estimate_lib, measure
  config = tiny_config()
  mesh, backend = aot.target_mesh(config_lib.override(config, {"mesh.num_devices": 2, "mesh.data": 1}), "h100:2")
  assert backend == "gpu" and mesh.devices.size == 2 and mesh.devices.flat[0].device_kind == "NVIDIA H100 80GB HBM3"
  record = measure.compiled(config_lib.override(config, {"mesh.num_devices": 2, "mesh.data": 1}), mesh)
  assert record["bound_field"] == "total_bytes" and record["bound_bytes"] > 0 and record["temp_size_in_bytes"] > 0
  est = estimate_lib.estimate(config, 2, backend="gpu")
  assert 0.5 < est.total / record["bound_bytes"] < 2


@needs_libtpu
def test_splash_attention_compiles_for_tpu():
  """The Pallas splash kernel (model.attention=splash) lowers and compiles for a v5e chip, forward and backward."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  from wm.models import attention as attention_lib
  aot._quiet_libtpu("v5e:2x2")
  desc = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  sharding = NamedSharding(Mesh(np.array(desc.devices[:1]), ("x",)), PartitionSpec())
  shapes = ((2, 256, 4, 128), (2, 256, 2, 128), (2, 256, 2, 128))  # grouped-query: 4 query heads, 2 kv heads
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding) for s in shapes]

  def loss(q, k, v):
    return jnp.sum(attention_lib.splash(q, k, v, window=64, block=128).astype(jnp.float32) ** 2)

  exe = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  assert exe.as_text().count("tpu_custom_call") >= 2  # the forward kernel and its backward kernels
