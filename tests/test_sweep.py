"""The sweep harness (wm.sweep) and the model-size lever (wm.memory.grow)."""

import json
import os
import subprocess
import sys

import pytest

from wm import config as config_lib
from wm import sweep, train
from wm.memory import calibration, grow as grow_lib, plan as plan_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_FILE = '''
from wm.config import base_config

def get_config(arg=None):
  c = base_config()
  c.data.task = "mqar"
  c.data.seq_len = 16
  c.data.vocab_size = 32
  c.data.num_kv_pairs = 2
  c.data.batch_size = 8
  c.data.train_size = 256
  c.data.eval_size = 40
  c.data.data_dir = {data_dir!r}
  c.model.d = 16
  c.model.layers = 1
  c.model.heads = 2
  c.model.kv_heads = 2
  c.train.steps = 6
  c.train.log_every = 2
  c.train.eval_every = 6
  c.train.eval_batches = 2
  c.train.checkpoint_every = 3
  c.mesh.num_devices = 1
  return c
'''


@pytest.fixture(scope="module")
def config_spec(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep_config")
  path = root / "tiny.py"
  path.write_text(CONFIG_FILE.format(data_dir=str(root / "tfds")))
  return str(path)


def grid(spec):
  return [sweep.Point("transformer", spec, labels={"family": "transformer"}),
          sweep.Point("lstm", spec, {"model.name": "lstm"}, labels={"family": "lstm"}),
          sweep.Point("lstm_wide", spec, {"model.name": "lstm", "model.d": 24}, labels={"family": "lstm"})]


def plot_names(records, out, preset):
  with open(os.path.join(out, "plotted.json"), "w") as f:
    json.dump([r["name"] for r in records], f)


def run(spec, out, *args):
  return sweep.main("tiny", {"quick": lambda: grid(spec)}, plot_names, argv=["--out", str(out), *args])


def files_and_sizes(out):
  return {os.path.join(d, f): os.path.getsize(os.path.join(d, f))
          for d, _, fs in os.walk(out) for f in fs if "tensorboard" not in d}


def test_shards_cover_the_grid_once_and_a_rerun_trains_nothing(config_spec, tmp_path):
  out = tmp_path / "exp"
  assert run(config_spec, out, "--shard", "0/2") == 0
  assert [r["name"] for r in sweep.read_records(str(out), grid(config_spec))] == ["transformer", "lstm_wide"]
  assert run(config_spec, out, "--shard", "1/2") == 0
  with open(out / "runs.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["name"] for r in records] == ["transformer", "lstm", "lstm_wide"]  # grid order, each once
  for r in records:
    assert r["steps"] == 6 and r["eval"]["eval_tokens"] > 0 and r["compiled_bytes"] > 0
    assert r["param_count"] > 0 and r["state_bytes"] > 0 and r["tokens_per_s"] > 0
    assert r["jax_version"] and r["device_kind"]
  lstm = {r["name"]: r for r in records}
  assert lstm["lstm_wide"]["state_bytes"] == 1 * 2 * 24 * 4  # layers x (h, c) x d x float32 bytes
  before = files_and_sizes(out)
  assert run(config_spec, out) == 0  # every point finished: nothing trains, nothing is appended
  after = files_and_sizes(out)
  assert {k: v for k, v in after.items() if "plotted" not in k} == {k: v for k, v in before.items()
                                                                     if "plotted" not in k}
  with open(out / "plotted.json") as f:
    assert json.load(f) == ["transformer", "lstm", "lstm_wide"]


def test_an_interrupted_point_resumes_from_its_checkpoint(config_spec, tmp_path):
  out = str(tmp_path / "exp")
  point = grid(config_spec)[1]
  workdir = sweep.point_dir(out, point)
  config, _ = sweep.resolve(point, workdir)
  first = train.train_and_evaluate(config, workdir, stop_after_step=3)  # as if killed after step 3's checkpoint
  assert first["step"] == 3 and not os.path.exists(os.path.join(workdir, sweep.RECORD))
  record = sweep.run_point(point, out)
  assert record["steps"] == 6
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"train"' in line]
  assert steps == [2, 4, 6]  # resumed at 3: nothing trained twice


def test_a_preempted_point_stops_the_grid_and_is_not_a_failure(config_spec, tmp_path, monkeypatch):
  from wm import preemption
  out = tmp_path / "exp"
  ran = []

  def preempted(point, out, extra=None):
    ran.append(point.name)
    raise preemption.Preempted(2, "somewhere")

  monkeypatch.setattr(sweep, "run_point", preempted)
  assert run(config_spec, out) == 143
  assert ran == ["transformer"]  # the rest of the grid does not start on a machine that is going away
  assert not any(f.endswith(sweep.ERROR) for f in files_and_sizes(out))  # a rerun resumes it as unfinished


def test_a_point_whose_settings_changed_is_moved_aside_and_rerun(config_spec, tmp_path, capsys):
  out = str(tmp_path / "exp")
  old = grid(config_spec)[2]
  workdir = sweep.point_dir(out, old)
  config, _ = sweep.resolve(old, workdir)
  train.train_and_evaluate(config, workdir, stop_after_step=3)  # interrupted under the old settings
  changed = sweep.Point(old.name, old.config, {**old.overrides, "model.d": 32}, labels=old.labels)
  assert "model.d" in sweep.stale_reason(out, changed) and sweep.stale_reason(out, old) is None
  assert sweep.read_records(out, [changed]) == []

  assert sweep.main("tiny", {"quick": lambda: [changed]}, plot_names, argv=["--out", out]) == 0
  assert "moved to" in capsys.readouterr().err
  [moved] = os.listdir(os.path.join(out, "stale"))
  assert moved.startswith("lstm_wide-") and os.path.exists(os.path.join(out, "stale", moved, "checkpoints"))
  [record] = sweep.read_records(out, [changed])
  assert record["model"]["d"] == 32 and record["steps"] == 6  # trained afresh, not resumed from d=24's step 3
  # A finished record of the old grid is stale too, and never drawn as the new grid's.
  assert sweep.stale_reason(out, old) and sweep.read_records(out, [old]) == []


def test_plot_redraws_from_records_without_a_backend(config_spec, tmp_path):
  out = tmp_path / "exp"
  run(config_spec, out, "--shard", "0/3")
  # With no usable JAX platform any compile or device computation fails, so a
  # successful --plot proves it used the records alone.
  script = ("import sys; sys.path.insert(0, {repo!r}); from tests import test_sweep as t; "
            "sys.exit(t.run({spec!r}, {out!r}, '--plot'))").format(repo=REPO, spec=config_spec, out=str(out))
  env = {**os.environ, "JAX_PLATFORMS": "no_such_platform"}
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  with open(out / "plotted.json") as f:
    assert json.load(f) == ["transformer"]


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("3/4", (3, 4))])
def test_parse_shard(text, expected):
  assert sweep.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["4/4", "-1/2", "1", "a/b", "0/0"])
def test_parse_shard_refuses(text):
  with pytest.raises(SystemExit, match="--shard"):
    sweep.parse_shard(text)


def test_duplicate_point_names_are_refused(config_spec):
  with pytest.raises(ValueError, match="unique"):
    sweep.check_grid([sweep.Point("a", config_spec), sweep.Point("a", config_spec)])


def test_out_in_an_override_names_the_records_root():
  points = [sweep.Point("base", "c.py"),
            sweep.Point("eval", "c.py", {"train.init_from": "{out}/runs/base", "train.steps": 0, "x": "{y}"})]
  filled = sweep.with_out(points, "/tmp/res")
  assert filled[0] == points[0]
  assert filled[1].overrides == {"train.init_from": "/tmp/res/runs/base", "train.steps": 0, "x": "{y}"}


def test_width_ladder_steps_by_about_an_eighth():
  ladder = grow_lib.width_ladder(32, 4096)
  assert ladder[:7] == [32, 48, 64, 80, 96, 112, 128]
  steps = [b / a for a, b in zip(ladder, ladder[1:]) if a >= 128]
  assert all(1.05 <= s <= 1.26 for s in steps) and ladder == sorted(set(ladder))


@pytest.mark.parametrize("family", ["transformer", "lstm"])
def test_grow_picks_the_largest_width_that_fits(config_spec, family):
  config = config_lib.validate(config_lib.override(config_lib.load(config_spec), {
      "model.name": family, "data.seq_len": 32, "data.vocab_size": 64, "data.batch_size": 16}))
  budget = 3 * 2**20
  growth = grow_lib.grow(config, budget, 1)
  assert growth.plan.compiled["total_bytes"] <= budget  # confirmed by the compiler
  ladder = grow_lib.width_ladder()
  bigger = ladder[ladder.index(growth.width) + 1]
  next_config = config_lib.validate(config_lib.override(config, grow_lib.model_overrides(config, bigger)))
  usable = budget * (1 - calibration.table("cpu").planning_margin)  # the planner's reserve stays free
  assert min(c.estimate.total for c in plan_lib.candidates(next_config, 1)) > usable  # one rung up does not fit
  if family == "transformer":
    assert growth.config.model.layers == max(1, round(growth.width / grow_lib.ASPECT_RATIO))
  else:
    assert growth.config.model.layers == config.model.layers


def test_grow_names_the_smallest_budget_when_nothing_fits(config_spec):
  config = config_lib.validate(config_lib.load(config_spec))
  with pytest.raises(plan_lib.BudgetTooSmall, match="at least"):
    grow_lib.grow(config, 2**10, 1, confirm=False)
