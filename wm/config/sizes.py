"""Byte counts as people write them: budgets in (`512MiB`, `8GiB`, `16GB`) and reports out."""

from __future__ import annotations

import math
import re

from wm.config.schema import ConfigError


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
  """`512MiB`, `8GiB`, `16GB`, `1e9` -> bytes."""
  if isinstance(text, int):
    return text
  match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
  if not match or match.group(2).lower() not in _UNITS:
    raise ConfigError(f"budget {text!r}: expected a size like 512MiB, 8GiB or 16GB")
  value = float(match.group(1)) * _UNITS[match.group(2).lower()]
  if value <= 0 or not math.isfinite(value):
    raise ConfigError(f"budget {text!r} must be positive")
  return int(value)


def format_bytes(n: float) -> str:
  """Bytes for a reader: `1.50 GiB`, `12.00 MiB`, `512 B` (binary units, two decimals)."""
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"
