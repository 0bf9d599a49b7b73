"""Orbax checkpoints that are verified before they are trusted, and never rotated away when they are the last good one.

Orbax writes a step into a temporary directory and renames it when complete,
so a kill during a save leaves no half step behind; but it does not check the
bytes of the array data when reading (a checkpoint with 64 flipped bytes
restores without an error). So once a save has finished, process 0 records
the size and SHA-256 of every file of that step (train state, meta and every
process's data-iterator file: wm.resume) in `<step>/wm_manifest.json`;
a restore first checks them. The newest step that fails (corrupt, truncated,
files missing, unreadable) is moved to `checkpoints/quarantine/` with a
warning, and the previous one is tried. A step without a manifest (the run
died between the end of the save and the manifest) is trusted only if it
restores and every restored number is finite; its manifest is written then.

Retention is done here rather than by Orbax's `max_to_keep`: only steps whose
manifest exists count towards `max_to_keep`, and the newest of them is never
deleted, so rotation cannot remove the last checkpoint known to be good.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

from absl import logging

MANIFEST = "wm_manifest.json"
QUARANTINE = "quarantine"


def steps(directory: str) -> list[int]:
  """Finalized step directories, oldest first (Orbax's temporary directories are not digits)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST and not rel.startswith(MANIFEST + "."):
        out.append(rel)
  return sorted(out)


def _digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: str) -> None:
  """Records every file's size and SHA-256 (atomically: a reader sees all of it or none)."""
  files = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _digest(os.path.join(step_dir, rel))]
           for rel in _files(step_dir)}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": files, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def has_manifest(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> str | None:
  """None if every file matches the manifest, else what is wrong (the manifest must exist)."""
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    return f"its manifest is unreadable ({e})"
  for rel, (size, digest) in files.items():
    path = os.path.join(step_dir, rel)
    if not os.path.exists(path):
      return f"{rel} is missing"
    if os.path.getsize(path) != size:
      return f"{rel} has {os.path.getsize(path)} bytes, {size} were written"
    if _digest(path) != digest:
      return f"{rel} does not match its SHA-256 (the bytes changed after the save)"
  return None


def quarantine(directory: str, step: int, reason: str) -> str:
  """Moves a bad step to checkpoints/quarantine/ (never deletes it) and warns."""
  target_dir = os.path.join(directory, QUARANTINE)
  os.makedirs(target_dir, exist_ok=True)
  target = os.path.join(target_dir, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
  while os.path.exists(target):
    target += "_"
  os.rename(os.path.join(directory, str(step)), target)
  logging.warning("checkpoint step %d in %s is unusable: %s. Moved it to %s; trying the previous one.",
                  step, directory, reason, target)
  return target


def scan(directory: str) -> tuple[list[tuple[int, bool]], list[tuple[int, str]]]:
  """Reads (never changes) the steps: (candidates newest first as (step, verified), bad as (step, reason)).

  Checks newest first and stops at the first step whose manifest matches:
  older steps are not needed unless that one fails to restore, and hashing
  them all would cost a read of every checkpoint. Steps without a manifest
  are candidates marked unverified, for the caller to trust only if they
  restore with finite values.
  """
  candidates, bad = [], []
  for step in reversed(steps(directory)):
    step_dir = os.path.join(directory, str(step))
    if not has_manifest(step_dir):
      candidates.append((step, False))
      continue
    problem = verify(step_dir)
    if problem is not None:
      bad.append((step, problem))
      continue
    candidates.append((step, True))
    break
  return candidates, bad


class SaveFailed(OSError):
  """A checkpoint could not be written (full or read-only disk); the earlier ones are intact."""


class Saver:
  """Saves through an Orbax CheckpointManager; writes manifests and rotates once each save has finished.

  Orbax saves asynchronously: `save` returns while the arrays are written in
  the background. The manifest of step s is written when the next save starts
  (Orbax waits for s to finish first anyway) or at `close`, so checksumming
  never stalls training between saves.
  """

  def __init__(self, manager: Any, directory: str, max_to_keep: int, is_main: bool,
               barrier: Callable[[str], None]):
    self.manager, self.directory, self.max_to_keep, self.is_main = manager, directory, max_to_keep, is_main
    self.barrier = barrier
    self.pending: int | None = None
    self.last_good: int | None = None

  def save(self, step: int, args: Any) -> None:
    self.finish()
    self.manager.save(step, args=args, force=True)
    self.pending = step

  def finish(self) -> None:
    """Waits for the pending save, records its manifest, and rotates old steps."""
    if self.pending is None:
      return
    step, self.pending = self.pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # Orbax re-raises the writer thread's error (ValueError, OSError, ...)
      last = "none yet" if self.last_good is None else f"step {self.last_good}"
      raise SaveFailed(
          f"checkpoint step {step} could not be written to {self.directory} ({type(e).__name__}: ...{str(e)[-300:]}). "
          f"Is the disk full or read-only? The earlier checkpoints are intact (the last good one: {last}); "
          f"free space and rerun the same command to resume.") from e
    self.pending = step
    self.barrier("wm_checkpoint_saved")  # every process's shards are on disk before process 0 hashes them
    if self.is_main:
      write_manifest(os.path.join(self.directory, str(self.pending)))
    self.last_good = self.pending
    self.pending = None
    if self.is_main:
      self.rotate()

  def rotate(self) -> None:
    verified = [s for s in steps(self.directory) if has_manifest(os.path.join(self.directory, str(s)))]
    keep = set(verified[-self.max_to_keep:])
    if not keep:
      return
    for s in steps(self.directory):
      if s not in keep and s < max(keep):
        shutil.rmtree(os.path.join(self.directory, str(s)), ignore_errors=True)

  def close(self) -> None:
    try:
      self.finish()
    finally:
      self.manager.close()
