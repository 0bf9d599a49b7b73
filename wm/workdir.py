"""A run's workdir: the lock that keeps one run in it, resume compatibility, and its records.

    lock                 host, pid and start time of the run using the workdir
    config.json          the config of the run that created the workdir (never rewritten)
    config_history.jsonl one line per later run: the step it resumed from and its config
    metrics.jsonl        cut back to the restored step when a run resumes

Whether a workdir can be resumed is decided from what a checkpoint holds, not
from a hand-kept list of config fields: each checkpoint carries a signature
of the train state (every leaf's path, shape and dtype) and of the inputs
that fix the training data stream. A change that alters neither (dropout,
learning rate, evaluation, logging, remat, mesh, number of steps) resumes; any
other is refused with the differing leaves and config fields named.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from typing import Any

import ml_collections
from absl import logging

LOCK = "lock"

# config.data fields that do not change the training stream: where the prepared
# files live, how many workers read them, and the validation split's size.
_DATA_FIELDS_OUTSIDE_STREAM = ("data_dir", "worker_count", "eval_size")


class WorkdirError(ValueError):
  """The workdir path cannot be used (a file, not writable, or in use by another run)."""


class IncompatibleWorkdir(ValueError):
  """The workdir holds checkpoints this config cannot resume."""


# ---------------------------------------------------------------------------
# The path itself
# ---------------------------------------------------------------------------

def check_path(workdir: str) -> None:
  """Refuses a workdir that is a file or cannot be created or written, before anything is built."""
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise WorkdirError(f"--workdir {workdir} is a file, not a directory; choose another path")
    if not os.access(path, os.W_OK | os.X_OK):
      raise WorkdirError(f"--workdir {workdir} is not writable; fix its permissions or choose another path")
    return
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WorkdirError(f"--workdir {workdir}: {parent} is a file, so the directory cannot be created")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir {workdir} cannot be created: {parent} is not writable")


# ---------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------

def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict[str, Any]) -> bool:
  pid = int(holder.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  started = _start_time(pid)
  return holder.get("start") is None or started is None or started == holder["start"]


class Lock:
  """An exclusive claim on a workdir, held by one process of one run.

  Created atomically (a complete file hard-linked into place, so a reader never
  sees a half-written lock). A lock whose holder is a dead process on this
  host is stale (a run killed with -9) and is taken over with a warning; one
  held by a live process, or by another host (whose processes cannot be
  checked from here), is refused with the holder named.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self.held = False

  def acquire(self) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = f"{self.path}.{me['pid']}.tmp"
    with open(tmp, "w") as f:
      json.dump(me, f)
    try:
      for _ in range(3):
        try:
          os.link(tmp, self.path)  # fails if the lock exists: exactly one of several racing runs wins
          self.held = True
          return
        except FileExistsError:
          pass
        holder = self._read()
        if holder is None:
          continue  # it vanished between link and read (its holder released it): try again
        if holder.get("host") == me["host"] and not _alive(holder):
          # Move the stale lock aside under a unique name: if two runs both find it
          # stale, only one rename succeeds and only then does either retry the link.
          try:
            os.rename(self.path, f"{self.path}.stale.{me['pid']}")
          except FileNotFoundError:
            continue
          os.remove(f"{self.path}.stale.{me['pid']}")
          logging.warning("took over the stale lock of %s: pid %s on %s is no longer running",
                          os.path.dirname(self.path), holder.get("pid"), holder.get("host"))
          continue
        raise WorkdirError(
            f"{os.path.dirname(self.path)} is in use by another run (pid {holder.get('pid')} on host "
            f"{holder.get('host')}, since {holder.get('time')}). Wait for it to finish, or use another --workdir; "
            f"if that run is dead on another host, delete {self.path}.")
      raise WorkdirError(f"could not take the lock {self.path}; another run keeps taking it")
    finally:
      os.remove(tmp)

  def _read(self) -> dict[str, Any] | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable: treat as held by an unknown holder, never take it over silently

  def release(self) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False


# ---------------------------------------------------------------------------
# Compatibility
# ---------------------------------------------------------------------------

def signature(config: ml_collections.ConfigDict, abstract_state: Any, process_count: int) -> dict[str, Any]:
  """What a checkpoint must match to be resumed: the state tree and the data-stream inputs.

  Args:
    config: the validated config.
    abstract_state: `Setup.abstract_state` (ShapeDtypeStructs).
    process_count: each process saves its own data-iterator position, so the
      number of processes is part of the data stream.
  """
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  state = {jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)] for path, leaf in leaves}
  data = {k: v for k, v in config.data.to_dict().items() if k not in _DATA_FIELDS_OUTSIDE_STREAM}
  if data.get("tokenizer") == "bytes":
    del data["tokenizer"]  # the stream before the field existed: checkpoints saved then still resume
  data["seed"] = config.seed
  data["process_count"] = process_count
  return {"state": state, "data": json.loads(json.dumps(data, default=str))}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
  """Dotted config fields whose values differ: {field: [old, new]}."""
  a, b = _flat(old), _flat(json.loads(json.dumps(new, default=str)))
  return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_compatible(saved: dict[str, Any] | None, current: dict[str, Any], workdir: str, step: int,
                     saved_config: dict[str, Any] | None, config: ml_collections.ConfigDict) -> None:
  """Raises IncompatibleWorkdir naming every differing state leaf and data-stream field."""
  if saved is None:
    logging.warning("checkpoint %d in %s predates resume signatures; resuming without checking it", step, workdir)
    return
  lines = []
  old_state, new_state = saved["state"], current["state"]
  order = ("['params']", "['rest']", "['step']", "['rng']", "['opt_state']")  # most telling first
  rank = lambda p: (next((i for i, o in enumerate(order) if p.startswith(o)), len(order)), p)
  for path in sorted(set(old_state) | set(new_state), key=rank):
    o, n = old_state.get(path), new_state.get(path)
    if o != n:
      fmt = lambda x: "absent" if x is None else f"{tuple(x[0])} {x[1]}"
      lines.append(f"state{path}: checkpoint {fmt(o)}, now {fmt(n)}")
  old_data, new_data = saved["data"], current["data"]
  for field in sorted(set(old_data) | set(new_data)):
    if old_data.get(field) != new_data.get(field):
      name = field if field in ("seed", "process_count") else f"data.{field}"
      lines.append(f"{name}: checkpoint {old_data.get(field)!r}, now {new_data.get(field)!r}")
  if not lines:
    return
  shown = lines[:8] + ([f"... and {len(lines) - 8} more"] if len(lines) > 8 else [])
  hint = ""
  if saved_config is not None:
    changed = config_changes(saved_config, config.to_dict())
    changed = {k: v for k, v in changed.items() if not k.startswith("memory_plan")}
    if changed:
      hint = "Config fields that differ from the workdir's last run: " + ", ".join(
          f"{k}: {o!r} -> {n!r}" for k, (o, n) in list(changed.items())[:12]) + "\n"
  raise IncompatibleWorkdir(
      f"{workdir} holds checkpoints (step {step}) that this config cannot resume.\n{hint}"
      f"The train state or the data stream differs:\n  " + "\n  ".join(shown) +
      f"\nUse a new --workdir, or the workdir's own config (config.json) to resume. Nothing in {workdir} was changed.")


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------

def read_saved_config(workdir: str) -> dict[str, Any] | None:
  """The latest accepted config: the last history line, else config.json (None if neither)."""
  history = os.path.join(workdir, "config_history.jsonl")
  if os.path.exists(history):
    with open(history) as f:
      lines = [line for line in f if line.strip()]
    for line in reversed(lines):
      try:
        return json.loads(line)["config"]
      except (ValueError, KeyError):
        continue  # a line cut short by a crash
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        return json.load(f)
    except ValueError:
      return None
  return None


def record_config(workdir: str, record: dict[str, Any], resumed_from: int | None) -> None:
  """config.json for the run that creates the workdir; later runs append to config_history.jsonl."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(record, f, indent=2, default=str)
    os.replace(tmp, path)
    return
  previous = read_saved_config(workdir) or {}
  line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from_step": resumed_from,
          "changed": config_changes(previous, record), "config": record}
  with open(os.path.join(workdir, "config_history.jsonl"), "a") as f:
    f.write(json.dumps(line, default=str) + "\n")


class Records:
  """Writes metrics.jsonl (and TensorBoard events, when tensorboardX is installed); only process 0 writes."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.writer = None
    if enabled:
      self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard events are a convenience; the JSON lines are the record.
        logging.warning("tensorboardX not installed: no TensorBoard events")

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = {"step": int(step), "split": split, **metrics}
    # A non-finite float becomes null: NaN is not JSON, and readers other than Python's reject it.
    line = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}
    self.file.write(json.dumps(line) + "\n")
    self.file.flush()
    if self.writer is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self.writer.add_scalar(f"{split}/{k}", v, step)
        elif isinstance(v, list):
          for i, x in enumerate(v):
            self.writer.add_scalar(f"{split}/{k}/{i}", x, step)
      self.writer.flush()

  def close(self) -> None:
    if self.enabled:
      self.file.close()
      if self.writer is not None:
        self.writer.close()


def _metric_lines(workdir: str):
  """(raw line, parsed record) of each whole line of metrics.jsonl; a line cut short by a crash is skipped."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  with open(path) as f:
    for line in f:
      try:
        yield line, json.loads(line)
      except ValueError:
        continue


def cut_metrics(workdir: str, last_step: int | None) -> None:
  """Drops metrics.jsonl lines past `last_step` (all of them when None), so a resumed run logs each step once.

  Lines after the restored checkpoint were logged by a run that then died;
  the resumed run recomputes those steps bitwise and logs them again. A
  trailing line cut short by the crash is dropped too.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  kept = [line if line.endswith("\n") else line + "\n" for line, record in _metric_lines(workdir)
          if last_step is not None and record.get("step", 0) <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def last_eval(workdir: str, step: int) -> dict[str, Any] | None:
  """The eval line logged at `step`, without its step and split (None if there is none)."""
  found = None
  for _, record in _metric_lines(workdir):
    if record.get("split") == "eval" and record.get("step") == step:
      found = {k: v for k, v in record.items() if k not in ("step", "split")}
  return found
