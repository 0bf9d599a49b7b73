"""Two processes on localhost (2 CPU devices each) against one process with 4.

Each process loads its own slice of every global batch; `jax.distributed`
joins them over gloo CPU collectives. The loss sequence must match the
single-process run, and only process 0 writes records. A two-process run
stopped after step 3 and run again ends with the same losses: each process
reads back its own file of the data position (grain's Orbax handler).
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
tmp, workdir, address, num, pid, stop = sys.argv[1:7]
overrides = {"train.steps": 6, "train.log_every": 1, "train.eval_every": 100, "train.checkpoint_every": 3,
             "mesh.num_devices": 0, "mesh.data": -1}
if address:
  overrides.update({"mesh.coordinator_address": address, "mesh.num_processes": int(num), "mesh.process_id": int(pid)})
train.train_and_evaluate(tiny_config(pathlib.Path(tmp), **overrides), workdir, stop_after_step=int(stop) or None)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp_path, workdir, devices, address="", num=1, pid=0, stop=0):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(workdir), address, str(num), str(pid),
                           str(stop)],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def _two_processes(tmp_path, workdir, stop=0):
  address = f"127.0.0.1:{_free_port()}"
  procs = [_launch(tmp_path, workdir, devices=2, address=address, num=2, pid=i, stop=stop) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The 6 losses of the one-process run (the data prepared under its tmp directory, shared by the tests)."""
  tmp_path = tmp_path_factory.mktemp("multihost")
  one = _launch(tmp_path, tmp_path / "one", devices=4)
  out, _ = one.communicate(timeout=600)
  assert one.returncode == 0, out[-3000:]
  return tmp_path, _losses(tmp_path / "one")


def _assert_close(got, ref):
  assert len(got) == len(ref) == 6  # process 1 wrote no second set of lines
  for a, b in zip(got, ref):
    assert abs(a - b) <= 1e-4 * abs(b), (got, ref)


def test_two_processes_match_one(one_process):
  tmp_path, ref = one_process
  _two_processes(tmp_path, tmp_path / "two")
  _assert_close(_losses(tmp_path / "two"), ref)


def test_two_processes_resume_each_its_own_data_position(one_process):
  """Stopped after step 3 and run again: each process reads back its own grain file of the data position."""
  tmp_path, ref = one_process
  workdir = tmp_path / "two_resumed"
  _two_processes(tmp_path, workdir, stop=3)
  position = workdir / "checkpoints" / "3" / "data_iterator"
  assert sorted(os.listdir(position)) == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  _two_processes(tmp_path, workdir)
  _assert_close(_losses(workdir), ref)
