"""Two processes on localhost (2 CPU devices each) against one process with 4.

Each process loads its own slice of every global batch; `jax.distributed`
joins them over gloo CPU collectives. The loss sequence must match the
single-process run, and only process 0 writes records.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = """
import sys
from wm import train
from tests.test_train import tiny_config
import pathlib
tmp, workdir, address, num, pid = sys.argv[1:6]
overrides = {"train.steps": 6, "train.log_every": 1, "train.eval_every": 100, "train.checkpoint_every": 3,
             "mesh.num_devices": 0, "mesh.data": -1}
if address:
  overrides.update({"mesh.coordinator_address": address, "mesh.num_processes": int(num), "mesh.process_id": int(pid)})
train.train_and_evaluate(tiny_config(pathlib.Path(tmp), **overrides), workdir)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp_path, workdir, devices, address="", num=1, pid=0):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(workdir), address, str(num), str(pid)],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def test_two_processes_match_one(tmp_path):
  one = _launch(tmp_path, tmp_path / "one", devices=4)
  out, _ = one.communicate(timeout=600)
  assert one.returncode == 0, out[-3000:]
  address = f"127.0.0.1:{_free_port()}"
  procs = [_launch(tmp_path, tmp_path / "two", devices=2, address=address, num=2, pid=i) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert len(got) == len(ref) == 6  # process 1 wrote no second set of lines
  for a, b in zip(got, ref):
    assert abs(a - b) <= 1e-4 * abs(b), (got, ref)
