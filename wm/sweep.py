"""Experiments as grids of config overrides: resumable, shardable, recorded.

An experiment script (experiments/*.py) declares its grid per preset as a list
of `Point`s, says how to plot and tabulate the records, and hands both to
`main`:

    python experiments/NAME.py --preset quick            # run the grid (2 CPU cores), then plot
    python experiments/NAME.py --preset full --shard 3/8 # this host's share of the papers' grid
    python experiments/NAME.py --preset quick --plot     # redraw figure and table from the records only
    python experiments/NAME.py --preset quick --list     # print the grid, run nothing

Layout of `results/<experiment>/` for the quick preset, `results/<experiment>/<preset>/`
for the others (`--out` changes the root):

    runs/<point>/            the point's workdir (wm.train): config.json, metrics.jsonl, checkpoints/
    runs/<point>/resolved.json  the config the point trains (after the memory planner), fixed at first start
    runs/<point>/record.json    the point's record, written once it has finished
    runs/<point>/error.json     why the point's last attempt failed (the grid goes on; the next run retries it)
    runs.jsonl               every finished point's record, one line each, in grid order
    <figure>.png, .svg, table.md

Resumption. A point whose record.json exists is skipped; a point that was
interrupted (killed, preempted, out of time) resumes from its latest
checkpoint, because `wm.train.train_and_evaluate` does. On SIGTERM the point
in progress saves the step it finished (wm.preemption) and the grid stops
with exit code 143; rerunning the same command continues it. The config it trains
is fixed in resolved.json the first time the point starts, so a resumed point
never re-plans into a different model.

Stale points. A point is its name *and* what it runs (config, overrides,
budget, grow). When the grid changes under a name (a preset edited, another
`--set`), the directory on disk belongs to another experiment: reusing its
record would put the old result in the new figure, and resuming its
checkpoint would train the old model. So before running, every such
directory moves to out/stale/<name>-<UTC time> (nothing is deleted) with a
line saying so, and the point runs afresh.

Sharding. `--shard I/N` runs the points whose index in the grid is I mod N,
so N hosts or an N-task job array cover the grid exactly once with no
coordinator. Each point writes only inside its own directory; runs.jsonl is
rebuilt from the record.json files (atomically) after every point and by
`--plot`, so shards on a shared filesystem never write the same file at once
except for that rebuild, whose last writer sees every record then present.

Points that start from another point. An override's string value may name
the records root as "{out}" (e.g. train.init_from="{out}/runs/baseline": a
fine-tune, or an evaluation with train.steps=0, of the baseline's trained
parameters); `main` replaces it with the --out in use. Put such a point after
the one it reads: run before that point has finished (another shard), it
fails naming the missing checkpoint, and the next run retries it.

Records. One JSON object per point (a point whose budget no configuration
fits gets a record with "infeasible" and the smallest budget that would fit,
and nothing trains): its overrides and labels, parameter
count, state bytes at the task's context, training-step bytes (analytic
estimate and the compiler's figure), the memory plan where a budget applied,
tokens/s (median over the logged windows after the first, which holds the
compile), wall time, the final validation metrics with the number of tokens
they scored, jax version, backend and device kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

RECORD = "record.json"
RESOLVED = "resolved.json"
ERROR = "error.json"  # the last failure of a point that has not finished (retried by the next run)


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a grid.

  Attributes:
    name: directory name, unique in the grid (e.g. "lstm_budget=8MiB").
    config: config spec, "configs/NAME.py[:ARG]".
    overrides: dotted config fields to set ({"model.d": 64}).
    budget: per-device training-memory budget ("8MiB"): the memory planner
      fits the point to it before training.
    grow: with a budget, also pick the largest model of the family that fits
      (wm.memory.grow) instead of planning the given model.
    labels: extra columns carried into the record (family, sweep axis, ...).
  """
  name: str
  config: str
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  budget: str | None = None
  grow: bool = False
  labels: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_shard(text: str) -> tuple[int, int]:
  """"I/N" -> (I, N) with 0 <= I < N."""
  try:
    index, count = (int(x) for x in text.split("/"))
  except ValueError:
    raise SystemExit(f"error: --shard {text!r}: expected I/N, e.g. 0/4") from None
  if count < 1 or not 0 <= index < count:
    raise SystemExit(f"error: --shard {text!r}: need 0 <= I < N")
  return index, count


def shard_points(points: Sequence[Point], index: int, count: int) -> list[Point]:
  """The points whose grid position is `index` mod `count`."""
  return [p for i, p in enumerate(points) if i % count == index]


def with_out(points: Sequence[Point], out: str) -> list[Point]:
  """The points with "{out}" in their string overrides replaced by the records root `out`."""
  def fill(value):
    return value.replace("{out}", out) if isinstance(value, str) else value
  return [dataclasses.replace(p, overrides={k: fill(v) for k, v in p.overrides.items()}) for p in points]


def check_grid(points: Sequence[Point]) -> None:
  names = [p.name for p in points]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f"grid point names must be unique; repeated: {dupes}")


# ---------------------------------------------------------------------------
# Records on disk

def _write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(tmp, path)  # atomic: a reader never sees half a record


def _read_json(path: str) -> Any | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def point_dir(out: str, point: Point) -> str:
  return os.path.join(out, "runs", point.name)


def identity(point: Point) -> dict[str, Any]:
  """What a point runs, as it reads back from JSON (so a saved copy compares equal)."""
  return json.loads(json.dumps({"config": point.config, "overrides": point.overrides, "budget": point.budget,
                                "grow": point.grow}, default=str))


def stale_reason(out: str, point: Point, record: dict[str, Any] | None = None) -> str | None:
  """Why the point's directory on disk belongs to another grid, or None when it is this point's (or absent).

  resolved.json (written when a point first starts) carries the identity;
  records from before it did are compared on their config, overrides and
  budget, which every record has. `record`: the point's record.json when the
  caller has already read it.
  """
  workdir = point_dir(out, point)
  want = identity(point)
  for name in (RESOLVED, RECORD):
    saved = record if name == RECORD and record is not None else _read_json(os.path.join(workdir, name))
    if saved is None:
      continue
    have = saved.get("point") if name == RESOLVED else {k: saved.get(k) for k in ("config", "overrides", "budget")}
    if have is None:
      continue
    keys = [k for k in want if k in have]
    diff = sorted({*_changed(have.get("overrides") or {}, want["overrides"]),
                   *(k for k in keys if k != "overrides" and have[k] != want[k])})
    if diff:
      return f"{name} ran with other settings ({', '.join(diff)})"
  return None


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  return [k for k in sorted({*old, *new}) if old.get(k, "<unset>") != new.get(k, "<unset>")]


def move_stale(out: str, point: Point, reason: str) -> str:
  """Moves a stale point directory to out/stale/<name>-<UTC time>; returns the new path."""
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  dest = os.path.join(out, "stale", f"{point.name}-{stamp}")
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  os.replace(point_dir(out, point), dest)
  print(f"{point.name}: {reason}; moved to {dest} and running the point afresh", file=sys.stderr)
  return dest


def read_records(out: str, points: Sequence[Point] | None = None) -> list[dict[str, Any]]:
  """Finished points' records: in grid order for `points`, else every record under out/runs."""
  runs = os.path.join(out, "runs")
  if points is None:
    names = sorted(os.listdir(runs)) if os.path.isdir(runs) else []
  else:
    names = [p.name for p in points]
  records = []
  for i, name in enumerate(names):
    record = _read_json(os.path.join(runs, name, RECORD))
    if record is not None and points is not None and stale_reason(out, points[i], record):
      continue  # another grid's result under this name: never drawn as this grid's (a run moves it aside)
    if record is not None:
      records.append(record)
  return records


def write_runs_jsonl(out: str, points: Sequence[Point]) -> list[dict[str, Any]]:
  """Rebuilds out/runs.jsonl from every finished point's record.json (grid order)."""
  records = read_records(out, points)
  tmp = os.path.join(out, f"runs.jsonl.tmp{os.getpid()}")
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r, default=str) + "\n")
  os.replace(tmp, os.path.join(out, "runs.jsonl"))
  return records


# ---------------------------------------------------------------------------
# Running one point

def resolve(point: Point, workdir: str) -> tuple[Any, dict[str, Any]]:
  """The config the point trains, and what the planner decided (fixed in resolved.json at first start)."""
  from wm import config as config_lib

  saved = _read_json(os.path.join(workdir, RESOLVED))
  base = config_lib.override(config_lib.load(point.config), {**point.overrides, "train.progress": False})
  if saved is not None:
    return config_lib.validate(config_lib.override(base, saved["overrides"])), saved
  config = config_lib.validate(base)
  resolved: dict[str, Any] = {"point": identity(point), "overrides": {}, "plan": None, "growth": None}
  if point.budget:
    from wm.memory import grow as grow_lib, plan as plan_lib
    budget = config_lib.parse_bytes(point.budget)
    if point.grow:
      growth = grow_lib.grow(config, budget)
      resolved["growth"] = {k: v for k, v in growth.record().items() if k != "plan"}
      chosen, planned = {**growth.overrides, **growth.plan.chosen.overrides()}, growth.plan
    else:
      planned = plan_lib.plan(config, budget)
      chosen = planned.chosen.overrides()
    resolved["overrides"] = chosen
    resolved["plan"] = planned.record()
    config = planned.config
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, RESOLVED), resolved)
  return config, resolved


def _train_lines(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _tokens_per_s(lines: list[dict[str, Any]]) -> float | None:
  speeds = [r["tokens_per_s"] for r in lines if r.get("split") == "train" and "tokens_per_s" in r]
  # The first window of a run (and of each resumption) includes compilation;
  # the median over the rest is robust to the odd slow window on a shared machine.
  steady = speeds[1:] or speeds
  return statistics.median(steady) if steady else None


def code_version() -> str | None:
  """The git commit of the code that ran (with "+dirty" for uncommitted changes), if in a git checkout."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "wm"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "")


def measure_point(config, resolved: dict[str, Any]) -> dict[str, Any]:
  """Parameter count, state bytes, estimated and compiled step bytes of `config`."""
  import jax
  from flax import nnx
  from wm import models
  from wm.memory import estimate as estimate_lib, measure

  model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
  est = estimate_lib.estimate(config)
  plan = resolved.get("plan") or {}
  compiled = plan.get("compiled") or measure.compiled(config)
  return {
      "param_count": int(model.num_params()),
      "state_bytes": int(model.state_bytes(config.data.seq_len)),
      "estimate_bytes": int(est.total),
      "estimate_terms": {t: getattr(est, t) for t in estimate_lib.TERMS},
      "compiled_bytes": int(compiled["total_bytes"]),
      "compiled": {k: v for k, v in compiled.items() if k.endswith("_in_bytes") or k in ("flops", "backend")},
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "num_devices": int(compiled.get("num_devices") or jax.device_count()),
  }


def run_point(point: Point, out: str, record_extra: Callable[[Any, dict], dict] | None = None) -> dict[str, Any]:
  """Trains one point (or resumes it) and writes its record; returns the record."""
  from wm import train

  from wm.memory import plan as plan_lib

  workdir = point_dir(out, point)
  try:
    config, resolved = resolve(point, workdir)
  except plan_lib.BudgetTooSmall as e:
    # Nothing fits this budget: that is the point's result, recorded like any
    # other so the figure can say so and a rerun does not search again.
    record = {"name": point.name, **point.labels, "config": point.config, "overrides": point.overrides,
              "budget": point.budget, "budget_bytes": e.budget, "infeasible": str(e),
              "smallest_fitting_bytes": e.smallest, "eval": {}, "code_version": code_version()}
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, RECORD), record)
    return record
  measured = measure_point(config, resolved)
  start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  seconds = time.perf_counter() - start
  elapsed_path = os.path.join(workdir, "wall_seconds.json")
  previous = (_read_json(elapsed_path) or {}).get("seconds", 0.0)  # earlier, interrupted attempts
  _write_json(elapsed_path, {"seconds": previous + seconds})
  lines = _train_lines(workdir)
  final = {k: v for k, v in result["eval"].items() if isinstance(v, (int, float, list))}
  record = {
      "name": point.name, **point.labels, "config": point.config, "overrides": point.overrides,
      "budget": point.budget, "budget_bytes": None, "resolved_overrides": resolved["overrides"],
      **measured,
      "model": {k: config.model[k] for k in ("name", "d", "layers", "heads", "kv_heads", "window", "latent_dim")},
      "remat_policy": config.remat.policy, "microbatches": config.optim.microbatches,
      "time_chunk": config.remat.time_chunk,
      "steps": int(result["step"]), "tokens": int(result["step"]) * config.data.batch_size * config.data.seq_len,
      "tokens_per_s": _tokens_per_s(lines), "wall_seconds": round(previous + seconds, 1),
      "eval": final, "plan": resolved["plan"], "growth": resolved["growth"], "code_version": code_version(),
  }
  if point.budget:
    from wm import config as config_lib
    record["budget_bytes"] = config_lib.parse_bytes(point.budget)
  if record_extra is not None:
    record.update(record_extra(config, result))
  _write_json(os.path.join(workdir, RECORD), record)
  if os.path.exists(os.path.join(workdir, ERROR)):
    os.remove(os.path.join(workdir, ERROR))
  return record


# ---------------------------------------------------------------------------
# The command line every experiment shares

def main(name: str, grids: dict[str, Callable[[], list[Point]]], plot: Callable[[list[dict[str, Any]], str, str], None],
         *, description: str = "", record_extra: Callable[[Any, dict], dict] | None = None,
         argv: Sequence[str] | None = None) -> int:
  """Parses the shared flags, runs this shard of the preset's grid, then plots.

  Args:
    name: the experiment's name; records go to results/<name> (quick) or
      results/<name>/<preset> by default.
    grids: preset name -> function returning the grid.
    plot: plot(records, out_dir, preset) writes the figure(s) and table.md
      from records alone (no JAX).
    description: the script's docstring, for --help.
    record_extra: optional record_extra(config, train_result) -> extra record
      fields measured after training (e.g. a recall probe).
    argv: command-line arguments (default sys.argv[1:]).

  Returns:
    An exit code.
  """
  parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(grids), default="quick",
                      help="grid size: quick (2 CPU cores, about an hour) or full (the papers' sizes, accelerators)")
  parser.add_argument("--out", help=f"records root (default results/{name} for quick, results/{name}/PRESET otherwise)")
  parser.add_argument("--shard", default="0/1", help="I/N: run every N-th point starting at I (hosts, job arrays)")
  parser.add_argument("--plot", action="store_true", help="only redraw the figure and table from the records")
  parser.add_argument("--list", action="store_true", help="print the grid and what is finished; run nothing")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a config override for every point (repeatable), e.g. data.text_source=lm1b; "
                           "records of another setting belong in another --out")
  args = parser.parse_args(argv)
  extra = {}
  for item in args.set:
    field, sep, value = item.partition("=")
    if not sep or not field:
      parser.error(f"--set {item!r}: expected FIELD=VALUE, e.g. --set data.data_dir=/data/tfds")
    extra[field.removeprefix("config.")] = value
  # The quick preset's records are the ones committed (they regenerate on any
  # CPU machine); other presets keep theirs apart so the two never mix.
  out = args.out or os.path.join("results", name, *([] if args.preset == "quick" else [args.preset]))
  points = with_out([dataclasses.replace(p, overrides={**p.overrides, **extra}) for p in grids[args.preset]()], out)
  check_grid(points)
  os.makedirs(out, exist_ok=True)
  index, count = parse_shard(args.shard)
  mine = shard_points(points, index, count)

  if args.list:
    for i, p in enumerate(points):
      done = os.path.exists(os.path.join(point_dir(out, p), RECORD))
      state = "stale" if stale_reason(out, p) else "done" if done else ""
      print(f"{i:3d} {state:5s} {'*' if p in mine else ' '} {p.name}"
            + (f"  budget={p.budget}{' (grow)' if p.grow else ''}" if p.budget else ""))
    return 0
  failed: list[str] = []
  if not args.plot:
    for p in mine:
      reason = stale_reason(out, p)
      if reason:
        move_stale(out, p, reason)
    todo = [p for p in mine if not os.path.exists(os.path.join(point_dir(out, p), RECORD))]
    print(f"{name} ({args.preset}): {len(points)} points, shard {index}/{count} has {len(mine)}, "
          f"{len(mine) - len(todo)} finished, {len(todo)} to run; records in {out}", file=sys.stderr)
    from tqdm import tqdm
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="point", dynamic_ncols=True)
    from wm import preemption
    failed = []
    for p in todo:
      bar.set_description(p.name)
      try:
        record = run_point(p, out, record_extra)
      except preemption.Preempted as e:  # the machine is going away: stop the grid, not just this point
        bar.close()
        write_runs_jsonl(out, points)
        print(f"{p.name}: {e}", file=sys.stderr)
        return 143
      except Exception as e:  # one point's failure must not cost the rest of the grid  # pylint: disable=broad-except
        failed.append(p.name)
        message = f"{type(e).__name__}: {e}"
        os.makedirs(point_dir(out, p), exist_ok=True)
        _write_json(os.path.join(point_dir(out, p), ERROR), {"error": message, "code_version": code_version()})
        bar.write(f"{p.name}: FAILED ({message[:300]}); the error is in {point_dir(out, p)}/{ERROR}, "
                  f"and the next run retries the point")
        continue
      write_runs_jsonl(out, points)
      bar.update(1)
      bar.write(f"{p.name}: " + json.dumps({k: record["eval"].get(k) for k in ("bits_per_byte", "accuracy")
                                            if k in record["eval"]}))
    bar.close()
    if failed:
      write_runs_jsonl(out, points)
      print(f"{len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
  records = write_runs_jsonl(out, points)
  if not records:
    print(f"no finished points under {out}/runs yet; nothing to plot", file=sys.stderr)
    return 1 if failed else 0
  plot(records, out, args.preset)
  return 1 if not args.plot and failed else 0


def save_figure(fig, out: str, stem: str) -> None:
  """Writes `stem`.png and `stem`.svg into `out`."""
  for ext in ("png", "svg"):
    fig.savefig(os.path.join(out, f"{stem}.{ext}"), dpi=150, bbox_inches="tight")


def write_table(out: str, header: Sequence[str], rows: Sequence[Sequence[Any]], *, align: str | None = None,
                note: str = "") -> str:
  """Writes out/table.md (a Markdown table, optional note below it) and returns its text."""
  align = align or "l" * len(header)
  marks = {"l": "---", "r": "---:", "c": ":---:"}
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  text = "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(text)
  return text
