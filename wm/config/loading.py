"""Getting a config: a config file's `get_config(arg)`, then `--config.FIELD=VALUE` overrides.

Both only build the ConfigDict; wm.config.validation judges the values.
Tests, sweeps and experiments call them directly. The command line loads and
overrides through ml_collections.config_flags (wm/__main__.py) and calls these
when config_flags refuses an input, because their errors name the field and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import ml_collections

from wm.config.schema import ConfigError


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist (expected configs/NAME.py[:ARG])")
  if not os.path.isfile(path):
    raise ConfigError(f"config {path!r} is not a file (expected configs/NAME.py[:ARG])")
  module_spec = importlib.util.spec_from_file_location("wm_user_config", path)
  if module_spec is None or module_spec.loader is None:
    raise ConfigError(f"config {path!r} is not a Python file (expected configs/NAME.py[:ARG])")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # SyntaxError, ImportError, ...: the file, not wm, is at fault
    raise ConfigError(f"config file {path} cannot be loaded: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} does not define get_config(arg=None)")
  try:
    config = module.get_config(arg or None)
  except Exception as e:  # a config file is user code: any failure is a bad config, reported in one line
    where = f"{path}:{arg}" if arg else path
    raise ConfigError(f"{where}: get_config({arg or None!r}) failed: {type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict (start from "
                      f"wm.config.base_config()), got {type(config).__name__}")
  return config


def _coerce(field: str, old: Any, text: str) -> Any:
  """Parses a command-line string into the type of the field's default."""
  try:
    if isinstance(old, bool):
      if text.lower() in ("true", "1", "yes"):
        return True
      if text.lower() in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if isinstance(old, int):
      return int(text)
    if isinstance(old, float):
      return float(text)
    if isinstance(old, (tuple, list)):
      value = json.loads(text)
      if not isinstance(value, list):
        raise ValueError(text)
      return type(old)(value)
    return text
  except (ValueError, TypeError, OverflowError):
    raise ConfigError(
        f"config.{field}={text!r}: expected a {type(old).__name__} like {old!r}") from None


def override(config: ml_collections.ConfigDict, assignments: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted fields (`{"model.d": "256"}`); strings are parsed to the field's type.

  Unknown fields raise a `ConfigError` naming the field and its neighbours.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # a copy we may change
  for field, value in assignments.items():
    *parents, leaf = field.split(".")
    node = config
    for i, name in enumerate(parents):
      if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
        raise ConfigError(f"config.{'.'.join(parents[:i + 1])} is not a config section")
      node = node[name]
    if leaf not in node:
      raise ConfigError(
          f"config.{field} does not exist; fields here are: {', '.join(sorted(node.keys()))}")
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
      raise ConfigError(f"config.{field} is a section; set one of its fields: "
                        f"{', '.join(sorted(old.keys()))}")
    value = _coerce(field, old, value) if isinstance(value, str) and not isinstance(old, str) else value
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.{field}={value!r}: expected a {type(old).__name__} like {old!r} ({e})") from None
  return config
