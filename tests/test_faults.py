"""Faults a long run meets, injected on purpose; after each, no work may be lost.

kill -9 (also during a save), a preemption notice (SIGTERM), corrupted / truncated / half-deleted checkpoints,
non-finite losses, two runs on one workdir, stale locks, a full disk during a
save, and a fuzz of bad configs and command lines. Where a run resumes, its
final parameters are compared bitwise with an uninterrupted run's.
"""

import json
import os
import pathlib
import random
import signal
import shutil
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from wm import __main__ as cli
from wm import checkpoints as ckpt_lib
from wm import config as config_lib
from wm import resume
from wm import step as step_lib
from wm import train
from wm import workdir as workdir_lib
from wm.data import pipeline
from tests.test_train import read_records, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
# The run every fault is compared against: checkpoints every 5 steps, the newest 3 kept.
OVERRIDES = {"train.checkpoint_every": 5, "train.max_to_keep": 3}


def config_for(root, **overrides):
  return tiny_config(root, steps=STEPS, **{**OVERRIDES, **overrides})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  """One prepared dataset for the whole module (tiny_config puts it under <root>/tfds)."""
  return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference_run(data_root):
  """An uninterrupted STEPS-step run: (workdir, its result with the state on the host)."""
  workdir = data_root / "reference"
  result = train.train_and_evaluate(config_for(data_root), str(workdir))
  return workdir, dict(result, state=jax.device_get(result["state"]))


@pytest.fixture(scope="module")
def reference(reference_run):
  return reference_run[1]["state"]


def assert_bitwise(state, reference):
  got, want = jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(reference)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def assert_each_step_once(workdir, last, log_every=10):
  steps = [r["step"] for r in read_records(workdir) if r["split"] == "train"]
  assert steps == list(range(log_every, last + 1, log_every)), steps


# ---------------------------------------------------------------------------
# Checkpoint integrity
# ---------------------------------------------------------------------------

def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != ckpt_lib.MANIFEST]
  return max(files, key=lambda p: p.stat().st_size)


def _flip(step_dir):
  path = _largest_file(step_dir)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  path.write_bytes(bytes(data))


def _truncate(step_dir):
  path = _largest_file(step_dir)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _half_delete(step_dir):
  files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != ckpt_lib.MANIFEST)
  for path in files[::2]:
    path.unlink()


def _stopped_at_25(reference_run, tmp_path):
  """A copy of the reference workdir as if the run had died after saving step 25 (checkpoints 20, 25)."""
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / "30")
  assert ckpt_lib.steps(str(workdir / "checkpoints")) == [20, 25]
  return workdir


@pytest.mark.parametrize("damage", [_flip, _truncate, _half_delete], ids=["flip", "truncate", "half_delete"])
def test_damaged_latest_checkpoint_is_quarantined_and_previous_used(data_root, reference_run, tmp_path, damage,
                                                                     caplog):
  workdir = _stopped_at_25(reference_run, tmp_path)
  damage(workdir / "checkpoints" / "25")
  config = config_for(data_root)
  setup = step_lib.make_setup(config)
  signature = workdir_lib.signature(config, setup.abstract_state, 1)
  step, state, _ = resume.restore_latest(config, setup, str(workdir / "checkpoints"), str(workdir), signature, True)
  assert step == 20 and int(state["step"]) == 20
  quarantined = os.listdir(workdir / "checkpoints" / ckpt_lib.QUARANTINE)
  assert len(quarantined) == 1 and quarantined[0].startswith("25-")
  assert "checkpoint step 25" in caplog.text and "quarantine" in caplog.text


def test_flipped_bytes_then_resume_is_bitwise_exact(data_root, reference_run, reference, tmp_path):
  workdir = _stopped_at_25(reference_run, tmp_path)
  _flip(workdir / "checkpoints" / "25")
  result = train.train_and_evaluate(config_for(data_root), str(workdir))
  assert result["step"] == STEPS
  assert_bitwise(result["state"], reference)  # resumed from step 20: nothing lost but time
  assert_each_step_once(str(workdir), STEPS)


POSITION = pathlib.Path(resume.DATA_ITERATOR) / "process_0-of-1.json"  # grain's file of this (the only) process


def _to_old_layout(ckpt_dir: pathlib.Path, step: int, config) -> None:
  """Rewrites checkpoint `step` as wm wrote it before the data position had its own Orbax item:
  every process's iterator state in meta["data_iterator"], no data_iterator/ item."""
  setup = step_lib.make_setup(config)
  step_dir = ckpt_dir / str(step)
  with ocp.CheckpointManager(str(ckpt_dir)) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(setup.abstract_state), meta=ocp.args.JsonRestore()))
  position = json.loads((step_dir / POSITION).read_text())
  shutil.rmtree(step_dir)
  with ocp.CheckpointManager(str(ckpt_dir)) as manager:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(restored["state"]),
        meta=ocp.args.JsonSave(dict(restored["meta"], data_iterator=[position]))), force=True)
    manager.wait_until_finished()
  ckpt_lib.write_manifest(str(step_dir))


def test_a_checkpoint_with_the_data_position_in_meta_still_resumes_bitwise(data_root, reference_run, reference,
                                                                           tmp_path):
  workdir = _stopped_at_25(reference_run, tmp_path)
  ckpt_dir = workdir / "checkpoints"
  _to_old_layout(ckpt_dir, 25, config_for(data_root))
  assert not (ckpt_dir / "25" / resume.DATA_ITERATOR).exists()
  result = train.train_and_evaluate(config_for(data_root), str(workdir))
  assert result["step"] == STEPS
  assert not (ckpt_dir / ckpt_lib.QUARANTINE).exists()  # resumed from step 25 itself
  assert_bitwise(result["state"], reference)
  assert (ckpt_dir / "30" / POSITION).exists()  # new saves write grain's item
  assert_each_step_once(str(workdir), STEPS)


@pytest.mark.parametrize("verified", [True, False], ids=["manifest", "no_manifest"])
def test_a_damaged_data_position_is_quarantined_like_the_state(data_root, reference_run, tmp_path, verified, caplog):
  workdir = _stopped_at_25(reference_run, tmp_path)
  step_dir = workdir / "checkpoints" / "25"
  (step_dir / POSITION).write_text("{not json")
  if not verified:
    (step_dir / ckpt_lib.MANIFEST).unlink()  # the checksums cannot catch it: the restore must
  config = config_for(data_root)
  setup = step_lib.make_setup(config)

  def new_iterator():
    return pipeline.make_iterator(config, "train", shuffle=True, num_epochs=None)

  step, _, iterator = resume.restore_latest(config, setup, str(workdir / "checkpoints"), str(workdir),
                                            workdir_lib.signature(config, setup.abstract_state, 1), True, new_iterator)
  assert step == 20
  assert os.listdir(workdir / "checkpoints" / ckpt_lib.QUARANTINE)[0].startswith("25-")
  assert "checkpoint step 25" in caplog.text
  assert (str(POSITION) if verified else "does not restore") in caplog.text
  fresh = new_iterator()
  for _ in range(20):
    next(fresh)
  want, got = next(fresh), next(iterator)  # the iterator is at step 20's data position
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_rotation_keeps_only_verified_checkpoints(reference_run):
  ckpt_dir = str(reference_run[0] / "checkpoints")
  assert ckpt_lib.steps(ckpt_dir) == [20, 25, 30]
  for step in (20, 25, 30):
    assert ckpt_lib.verify(os.path.join(ckpt_dir, str(step))) is None


# ---------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------

class _Poisoned(grain.DatasetIterator):  # a grain iterator, as checkpoints save it with grain's handler
  """A train iterator whose batches at the given (1-based) steps carry NaN weights."""

  def __init__(self, inner, steps):
    super().__init__(inner)
    self.inner, self.steps, self.count = inner, set(steps), 0

  def __next__(self):
    batch = dict(next(self.inner))
    self.count += 1
    if self.count in self.steps:
      batch["weights"] = np.full_like(batch["weights"], np.nan)
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _poison(monkeypatch, steps):
  make = pipeline.make_iterator

  def patched(config, split, **kwargs):
    it = make(config, split, **kwargs)
    return _Poisoned(it, steps) if split == "train" else it

  monkeypatch.setattr(pipeline, "make_iterator", patched)


def test_nan_stops_within_the_step_and_keeps_good_checkpoints(data_root, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  config = config_for(data_root)
  _poison(monkeypatch, [13])
  with pytest.raises(train.NonFiniteLoss, match=r"step 13: .*checkpoints/10 \(step 10\)"):
    train.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  assert ckpt_lib.steps(str(workdir / "checkpoints")) == [5, 10]
  stopped = [r for r in read_records(str(workdir)) if r.get("stopped")]
  assert [r["step"] for r in stopped] == [13]
  assert not os.path.exists(workdir / "lock")
  # A rerun resumes from step 10, whose state is the uninterrupted run's (resuming from
  # there is bitwise exact: test_flipped_bytes_then_resume_is_bitwise_exact).
  setup = step_lib.make_setup(config)
  step, state, _ = resume.restore_latest(config, setup, str(workdir / "checkpoints"), str(workdir),
                                        workdir_lib.signature(config, setup.abstract_state, 1), True)
  assert step == 10 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state)))


def test_divergent_learning_rate_stops_at_the_first_nonfinite_step(data_root, tmp_path):
  workdir = tmp_path / "run"
  config = config_for(data_root, **{"optim.lr": 1e8, "optim.clip_norm": 0.0, "train.log_every": 1,
                                    "train.checkpoint_every": 1})
  with pytest.raises(train.NonFiniteLoss) as info:
    train.train_and_evaluate(config, str(workdir))
  lines = [r for r in read_records(str(workdir)) if r["split"] == "train"]
  *finite, last = lines
  assert last.get("stopped") == "nonfinite" and f"step {last['step']}:" in str(info.value)
  assert all(r["loss"] is not None and np.isfinite(r["grad_norm"]) for r in finite)
  assert [r["step"] for r in finite] == list(range(1, last["step"]))  # stopped at the first bad step
  ckpt_dir = str(workdir / "checkpoints")
  assert ckpt_lib.steps(ckpt_dir)[-1] == last["step"] - 1
  # A rerun resumes from that checkpoint, whose parameters are finite (if far from sane:
  # the same command then stops at the same step again).
  setup = step_lib.make_setup(config)
  step, state, _ = resume.restore_latest(config, setup, ckpt_dir, str(workdir),
                                        workdir_lib.signature(config, setup.abstract_state, 1), True)
  assert step == last["step"] - 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state)))


def test_skip_batch_drops_updates_then_stops_after_too_many(data_root, tmp_path, monkeypatch):
  config = config_for(data_root, **{"train.on_nonfinite": "skip_batch", "train.max_skipped_in_row": 3,
                                    "train.steps": 10, "train.eval_every": 100})
  _poison(monkeypatch, [5, 6])
  result = train.train_and_evaluate(config, str(tmp_path / "skip"))
  assert result["step"] == 10
  lines = read_records(str(tmp_path / "skip"))
  assert sum(r.get("nonfinite_steps", 0) for r in lines if r["split"] == "train") == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(result["state"]["params"])))
  monkeypatch.undo()
  _poison(monkeypatch, [5, 6, 7])
  with pytest.raises(train.NonFiniteLoss, match="step 7: .*3 steps in a row"):
    train.train_and_evaluate(config, str(tmp_path / "stop"))


# ---------------------------------------------------------------------------
# The workdir lock
# ---------------------------------------------------------------------------

def _write_lock(workdir, host, pid):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "lock"), "w") as f:
    json.dump({"host": host, "pid": pid, "start": None, "time": "then"}, f)


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_stale_lock_is_taken_over(data_root, reference_run, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_run[0], workdir)
  _write_lock(workdir, socket.gethostname(), _dead_pid())  # as a sweep killed with -9 leaves it
  result = train.train_and_evaluate(config_for(data_root), workdir)
  assert result["step"] == STEPS
  assert "took over the stale lock" in caplog.text
  assert not os.path.exists(os.path.join(workdir, "lock"))


@pytest.mark.parametrize("host", ["here", "elsewhere"])
def test_live_or_foreign_lock_is_refused(data_root, tmp_path, host):
  workdir = str(tmp_path / "run")
  name = socket.gethostname() if host == "here" else "some-other-host"
  _write_lock(workdir, name, os.getpid())
  with pytest.raises(train.WorkdirError, match=f"pid {os.getpid()} on host {name}"):
    train.train_and_evaluate(tiny_config(data_root, steps=10), workdir)
  assert sorted(os.listdir(workdir)) == ["lock"]  # nothing else was written


# ---------------------------------------------------------------------------
# Sweep-harness contract: finished workdirs train nothing
# ---------------------------------------------------------------------------

def test_finished_workdir_trains_nothing_and_returns_its_last_eval(data_root, reference_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_run[0], workdir)
  lines = read_records(workdir)
  again = train.train_and_evaluate(config_for(data_root), workdir)
  assert again["step"] == STEPS and again["eval"] == reference_run[1]["eval"]
  assert read_records(workdir) == lines  # nothing trained, evaluated or logged
  assert_bitwise(again["state"], reference_run[1]["state"])


# ---------------------------------------------------------------------------
# Subprocesses: kill -9, two runs at once, a full disk
# ---------------------------------------------------------------------------

WORKER = """
import os, pathlib, resource, signal, sys
fsize = int(os.environ.get("WM_TEST_FSIZE", "0"))
if fsize:  # a full disk: writes past this many bytes fail with EFBIG instead of killing the process
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
from wm import __main__ as cli
from wm import train
from tests.test_train import tiny_config
root, workdir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
overrides = dict(arg.split("=", 1) for arg in sys.argv[4:])
config = tiny_config(pathlib.Path(root), steps=steps, **overrides)
try:
  train.train_and_evaluate(config, workdir)
except cli.user_errors() as e:
  print(f"error: {e}", file=sys.stderr)
  sys.exit(2)
except train.Preempted as e:  # as wm.__main__.run reports it
  print(e, file=sys.stderr)
  sys.exit(143)
"""


def _launch(root, workdir, steps, *overrides, fsize=0):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, WM_TEST_FSIZE=str(fsize),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(workdir), str(steps), *overrides],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _saving(ckpt_dir):
  """True while Orbax writes a step (its temporary directory exists)."""
  try:
    return any("tmp" in name for name in os.listdir(ckpt_dir))
  except FileNotFoundError:
    return False


def _overrides(**extra):
  return [f"{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]


def test_kill_9_anywhere_then_resume_is_bitwise_exact(data_root, reference, tmp_path):
  workdir = tmp_path / "run"
  ckpt_dir = str(workdir / "checkpoints")
  rng = random.Random(0)
  killed_during_save = 0
  for kind in ("during_save", "random", "during_save", "random"):
    proc = _launch(data_root, workdir, STEPS, *_overrides())
    deadline = time.time() + 300
    if kind == "during_save":
      while proc.poll() is None and time.time() < deadline and not _saving(ckpt_dir):
        time.sleep(0.0005)
    else:  # anywhere from start-up (compiling, restoring) to the end of training
      time.sleep(rng.uniform(0.0, 1.0))
      while proc.poll() is None and time.time() < deadline and rng.random() < 0.5 and not ckpt_lib.steps(ckpt_dir):
        time.sleep(0.2)
    if proc.poll() is not None:
      break  # it finished first: nothing left to interrupt
    killed_during_save += _saving(ckpt_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert killed_during_save >= 1, "no kill landed during a save"
  resumed = train.train_and_evaluate(config_for(data_root), str(workdir))  # takes over the stale lock
  assert resumed["step"] == STEPS
  assert_bitwise(resumed["state"], reference)
  assert_each_step_once(str(workdir), STEPS)


def test_sigterm_during_a_run_saves_that_step_and_exits_143(data_root, tmp_path):
  workdir = tmp_path / "run"
  # No periodic checkpoint before the end: whatever is on disk was saved for the signal.
  proc = _launch(data_root, workdir, 5000, "train.checkpoint_every=10000", "train.log_every=10")
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline and not (workdir / "metrics.jsonl").exists():
    time.sleep(0.05)
  while proc.poll() is None and time.time() < deadline and not any(
      r["split"] == "train" for r in read_records(str(workdir))):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err
  saved = ckpt_lib.steps(str(workdir / "checkpoints"))
  assert len(saved) == 1 and 10 <= saved[0] < 5000, saved
  assert f"stopped by SIGTERM after step {saved[0]}" in err and "rerun the same command" in err
  assert "Traceback" not in err
  assert ckpt_lib.has_manifest(str(workdir / "checkpoints" / str(saved[0])))
  last = read_records(str(workdir))[-1]
  assert last["step"] == saved[0] and last.get("stopped") == "preempted"
  assert not (workdir / "lock").exists()


class _Terminated(grain.DatasetIterator):  # a grain iterator, as checkpoints save it with grain's handler
  """The train iterator, sending this process SIGTERM while it hands out the batch of step `at`."""

  def __init__(self, inner, at):
    super().__init__(inner)
    self.inner, self.at, self.count = inner, at, 0

  def __next__(self):
    self.count += 1
    if self.count == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def test_sigterm_then_resume_is_bitwise_exact(data_root, reference, tmp_path, monkeypatch):
  import threading
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("the SIGTERM handler can only be installed from the main thread")
  workdir = tmp_path / "run"
  make = pipeline.make_iterator
  monkeypatch.setattr(pipeline, "make_iterator", lambda config, split, **kw: (
      _Terminated(make(config, split, **kw), 13) if split == "train" else make(config, split, **kw)))
  with pytest.raises(train.Preempted, match="after step 13; checkpoint 13 is saved"):
    train.train_and_evaluate(config_for(data_root), str(workdir))
  monkeypatch.undo()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives only as long as the loop
  assert ckpt_lib.steps(str(workdir / "checkpoints")) == [5, 10, 13]
  resumed = train.train_and_evaluate(config_for(data_root), str(workdir))
  assert resumed["step"] == STEPS
  assert_bitwise(resumed["state"], reference)
  lines = [r for r in read_records(str(workdir)) if r["split"] == "train"]
  assert [(r["step"], r.get("stopped")) for r in lines] == [(10, None), (13, "preempted"), (20, None), (30, None)]


def test_two_runs_at_once_exactly_one_trains(data_root, tmp_path):
  workdir = tmp_path / "run"
  procs = [_launch(data_root, workdir, 150, "train.checkpoint_every=50") for _ in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert sorted(p.returncode for p in procs) == [0, 2], outs
  refused = [err for p, (_, err) in zip(procs, outs) if p.returncode == 2][0]
  assert "in use by another run" in refused and "Traceback" not in refused
  assert_each_step_once(str(workdir), 150)  # one run's lines only


def test_disk_full_during_a_save_keeps_earlier_checkpoints(data_root, reference_run, tmp_path):
  workdir = _stopped_at_25(reference_run, tmp_path)
  # Files past 64 KiB cannot be written: the arrays of the next checkpoint are larger.
  proc = _launch(data_root, workdir, STEPS, *_overrides(), fsize=64 * 1024)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 2, err[-3000:]
  # Orbax's writer threads log their own tracebacks (absl ERROR, and "Event loop is closed" at
  # exit); wm's part is one message, and no traceback passes through wm's code.
  ours = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(ours) == 1, err[-3000:]
  assert ours[0].startswith("error: checkpoint step 30 could not be written") and "File too large" in ours[0]
  assert "the last good one: step 25" in ours[0]
  assert f"{os.sep}wm{os.sep}" not in "".join(line for line in err.splitlines() if line.strip().startswith("File "))
  ckpt_dir = str(workdir / "checkpoints")
  assert ckpt_lib.steps(ckpt_dir) == [20, 25]
  for step in (20, 25):
    assert ckpt_lib.verify(os.path.join(ckpt_dir, str(step))) is None  # intact, so a rerun resumes from 25


# ---------------------------------------------------------------------------
# One clean message for every bad input
# ---------------------------------------------------------------------------

def _numeric_fields():
  out = []

  def walk(node, prefix):
    for k, v in node.items():
      if hasattr(v, "keys"):
        walk(v, f"{prefix}{k}.")
      elif isinstance(v, (int, float)) and not isinstance(v, bool):
        out.append(f"{prefix}{k}")

  walk(config_lib.base_config(), "")
  return out


ENUMS = ["data.task", "model.name", "model.encoder", "model.decoder", "model.mixture_heads", "model.mixture_prior",
         "model.kl_schedule", "precision.param_dtype", "precision.compute_dtype", "optim.name", "optim.schedule",
         "remat.policy", "train.on_nonfinite"]

# (override, text the message must contain)
EXPLICIT = [
    ("optim.b1=5", "optim.b1"), ("optim.b1=1", "optim.b1"), ("optim.b2=1.0", "optim.b2"),
    ("optim.eps=-1", "optim.eps"), ("optim.eps=0", "optim.eps"), ("optim.min_lr_ratio=-3", "optim.min_lr_ratio"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"), ("optim.lr=inf", "optim.lr"), ("optim.lr=0", "optim.lr"),
    ("optim.lr=1e999", "optim.lr"), ("optim.momentum=1", "optim.momentum"), ("data.worker_count=-3", "worker_count"),
    ("seed=-1", "seed"), ("seed=99999999999", "seed"), ("model.dropout=1", "model.dropout"),
    ("remat.policy=save:bogus", "remat.policy"), ("remat.policy=offload:qkv,,nope", "remat.policy"),
    ("remat.policy=full:qkv", "remat.policy"), ("remat.policy=save:gates", "remat.policy"),
    ("remat.policy=save:", "remat.policy"), ("remat.policy=offload:", "remat.policy"),
    ("remat.policy=dots:x", "remat.policy"), ("remat.policy=SAVE:qkv", "remat.policy"),
    ("mesh.rules=notjson", "mesh.rules"), ('mesh.rules={"a": 1}', "mesh.rules"),
    ('mesh.rules=[["batch"]]', "mesh.rules"), ('mesh.rules=[["batch", "nope"]]', "mesh.rules"),
    ('mesh.rules=[[1, "data"]]', "mesh.rules"), ('mesh.rules=[["batch", ["data", "x"]]]', "mesh.rules"),
    ('mesh.rules=[["embed", "fsdp"], ["embed", "data"]]', "mesh.rules"), ("mesh.rules=[3]", "mesh.rules"),
    ("mesh.process_id=3", "mesh.process_id"), ("mesh.num_devices=100", "num_devices"),
    ("mesh.tensor=3", "mesh"), ("model.dd=3", "model.dd"), ("nosuch.x=3", "nosuch"),
    ("model=3", "model"), ("model.d.x=3", "model.d"), ("train.budget=lots", "budget"),
    ("train.budget=-5GiB", "budget"), ("train.budget=0", "budget"), ("model.heads=3", "heads"),
    ("model.kv_heads=3", "kv_heads"), ("model.window=1000", "window"), ("optim.microbatches=5", "microbatches"),
    ("data.num_kv_pairs=40", "seq_len"), ("remat.time_chunk=5", "time_chunk"),
    ("model.tie_embeddings=maybe", "tie_embeddings"),
    ("train.progress=2", "train.progress"),
    ("model.share_layers=3", "model.share_layers"), ("model.lora_rank=1000", "model.lora_rank"),
    ("model.lora_alpha=2", "model.lora_alpha"), ("train.init_from=/nonexistent/run", "train.init_from"),
]


def _cases(config_file, workdir):
  """(argv, text the message must contain): at least 200, each an error."""
  base = ["train", "--config", config_file, "--workdir", workdir]
  cases = []
  for field in _numeric_fields():
    for bad in ("abc", "nan", "[1]"):
      cases.append((base + [f"--config.{field}={bad}"], field))
    if field != "model.forget_bias":
      cases.append((base + [f"--config.{field}=-5"], field))
  for field in ENUMS:
    cases.append((base + [f"--config.{field}=bogus"], field))
  cases += [(base + [f"--config.{o}"], text) for o, text in EXPLICIT]
  cases += [(base[:-2] + [f"--config.{o}"], "--workdir") for o in ("model.d=64", "optim.lr=0.1")]
  cases += [
      (["train"], "--config"), (["fly", "--config", config_file], "invalid choice"),
      (base + ["extra"], "extra"), (base + ["--config.model.d"], "needs a value"),
      (["train", "--config.model.d=64"] + base[1:], "comes before --config"), (base + ["--bogus"], "--bogus"),
      (base + ["--devices=abc"], "--devices"), (base + ["--config.model.tie_embeddings", "maybe"], "tie_embeddings"),
      (["train", "--workdir", workdir, "--config.model.d=64"], "give --config"),
      (base + ["--budget", "lots"], "budget"), (base + ["--budget", "0"], "budget"),
      (["memory", "--config", config_file, "--devices", "0"], "--devices"),
      (["generate", "--config", config_file, "--workdir", workdir, "--length", "-5"], "--length"),
      (["generate", "--config", config_file, "--workdir", workdir, "--num_samples", "0"], "--num_samples"),
      (["generate", "--config", config_file], "--workdir"),
      (["generate", "--config", config_file, "--workdir", workdir], "does not exist"),
      (["prepare", "--config", config_file, "--budget", "1GiB"], "--budget"),
      (["export", "--workdir", workdir], "--out"), (["export", "--out", workdir], "--workdir"),
      (["export", "--workdir", workdir + "_none", "--out", workdir], "config.json"),
      (["export", "--config", config_file, "--workdir", workdir, "--out", workdir], "drop --config"),
      (["train", "--config", "configs/nope.py", "--workdir", workdir], "does not exist"),
      (["train", "--config", ":badarg", "--workdir", workdir], "does not exist"),
      (["train", "--config", "configs", "--workdir", workdir], "not a file"),
      (["train", "--config", "configs/mqar_lstm.py:badarg", "--workdir", workdir], "badarg"),
      (["train", "--config", "README.md", "--workdir", workdir], "README.md"),
  ]
  return cases


# config file -> (its text, what the message must contain)
BAD_FILES = {
    "syntax.py": ("def get_config(arg=None)\n  return 1\n", "syntax.py"),
    "dict.py": ("def get_config(arg=None):\n  return {'model': {'d': 3}}\n", "ConfigDict"),
    "none.py": ("x = 1\n", "get_config"),
    "raises.py": ("def get_config(arg=None):\n  raise RuntimeError('boom')\n", "boom"),
    "wrongtype.py": ("from wm.config import base_config\n"
                     "def get_config(arg=None):\n  c = base_config()\n  c.model.d = 'wide'\n  return c\n",
                     "wrongtype.py"),
    "import.py": ("import no_such_module\n", "no_such_module"),
    "extra.py": ("from wm.config import base_config\ndef get_config(arg=None):\n  c = base_config()\n"
                 "  c.unlock()\n  c.model.extra = 3\n  return c\n", "model.extra"),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad")
  good = root / "tiny.py"
  good.write_text("import pathlib\nfrom tests.test_train import tiny_config\n"
                  f"def get_config(arg=None):\n  return tiny_config(pathlib.Path({str(root)!r}))\n")
  workdir = str(root / "workdir")
  cases = _cases(str(good), workdir)
  for name, (text, expected) in BAD_FILES.items():
    (root / name).write_text(text)
    cases.append((["train", "--config", str(root / name), "--workdir", workdir], expected))
  a_file = root / "a_file"
  a_file.write_text("x")
  (root / "empty.txt").write_text("")
  cases += [
      (["train", "--config", str(good), "--workdir", str(a_file)], "is a file"),
      (["train", "--config", str(good), "--workdir", str(a_file / "below")], "is a file"),
      (["train", "--config", str(good), "--workdir", workdir, "--config.data.task=text",
        "--config.data.text_source=files", f"--config.data.text_files={root}/nothing*.txt"], "matches no file"),
      (["train", "--config", str(good), "--workdir", workdir, "--config.data.task=text",
        "--config.data.text_source=files", f"--config.data.text_files={root}/empty.txt"], "empty"),
      (["train", "--config", str(good), "--workdir", workdir, "--config.data.task=text",
        "--config.data.text_source=files"], "data.text_files"),
  ]
  return root, workdir, cases


def test_fuzz_bad_inputs_give_one_clean_message(bad_inputs, capsys, monkeypatch):
  root, workdir, cases = bad_inputs
  monkeypatch.chdir(ROOT)
  assert len(cases) >= 200
  for argv, expected in cases:
    code = cli.run(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, code, err[-2000:])
    assert "Traceback" not in err and err.count("error:") == 1, (argv, err)
    assert expected in err, (argv, expected, err)
    assert not os.path.exists(workdir), argv  # no workdir left behind by a refused run


def test_bad_inputs_through_a_real_process(bad_inputs):
  root, workdir, cases = bad_inputs
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  picked = [c for c in cases if any(s in " ".join(c[0]) for s in ("save:bogus", "syntax.py", "a_file", "--length",
                                                                   "mesh.rules=notjson", "optim.b1=5"))]
  assert len(picked) >= 6
  for argv, expected in picked:
    proc = subprocess.run([sys.executable, "-m", "wm", *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, (argv, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and expected in proc.stderr, (argv, proc.stderr[-2000:])


def test_help_is_fast_and_does_not_import_jax():
  code = ("import sys, wm.__main__ as m\n"
          "try:\n  m.run(['--help'])\nexcept SystemExit:\n  pass\n"
          "from wm import config\nconfig.validate(config.load('configs/mqar_lstm.py:quick'))\n"
          "assert 'jax' not in sys.modules, 'jax imported'\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-2000:]
