"""The largest model of a family that fits a training-memory budget.

    python -m wm memory --config configs/text_transformer.py:quick --budget 64MiB --grow

`plan` (wm.memory.plan) fits a *given* model to a budget with the levers that
leave the model's function unchanged (remat, microbatches, time chunks, the
mesh split). `grow` adds the model's size as a lever: it walks a ladder of
widths, derives depth and heads from the width by the family's rule below,
and keeps the largest model for which the planner finds a configuration that
fits, confirmed by one compile.

Growth rules (what changes with the width d; everything else is the config's):

    transformer   layers = max(1, round(d / 64)), heads = d / head_dim with
                  head_dim 32 below d = 512 and 64 from there, kv_heads =
                  heads (or the config's heads/kv_heads ratio, when it
                  divides). Depth and width grow together at an aspect
                  ratio d / layers = 64: Kaplan et al. 2020 (sec. 3.1, fig. 5)
                  find loss nearly independent of the aspect ratio over
                  roughly 20-200 at fixed parameter count, so one fixed
                  ratio inside that range is a fair single line to grow on.
    lstm, vrnn    width only; layers as in the config (stacked LSTM language
                  models keep 2-3 layers and grow wide: Zaremba et al. 2014,
                  Jozefowicz et al. 2016).
    vae, mixture  width only (encoder and decoder together); latent size and
                  component count as in the config.

The ladder steps by about 1/8 of the width (multiples of 32 from 32 up: 32,
48, 64, 80, 96, 112, 128, 160, ..., 256, 288, ..., 512, 576, ...), so the
grown model is within about 12% of the largest width that fits.

Search: every width gets the planner's estimate-only search (thousands of
candidates a second, no compile); the largest width whose estimate fits the
budget less the planner's calibrated reserve (wm.memory.calibration) is
then planned with confirmation (one compile). If the compiler puts it above
the budget, the ratio of the compiled figure to the budget rescales the
estimates of the smaller widths and the largest that fits at that ratio is
tried next, up to `max_widths_compiled` widths.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Sequence

import ml_collections

from wm import config as config_lib
from wm.config import format_bytes
from wm.memory import plan as plan_lib

ASPECT_RATIO = 64  # transformer d / layers
MIN_WIDTH, MAX_WIDTH = 32, 16384


def width_ladder(low: int = MIN_WIDTH, high: int = MAX_WIDTH) -> list[int]:
  """Widths in steps of about 1/8 of the width, each a multiple of 16 (32 and up: of 32 from 128)."""
  out, d = [], low
  while d <= high:
    out.append(d)
    step = max(16, (d // 8) // 16 * 16) if d < 128 else max(32, (d // 8) // 32 * 32)
    d += step
  return out


def _heads(d: int, config: ml_collections.ConfigDict) -> tuple[int, int]:
  head_dim = 32 if d < 512 else 64
  heads = max(1, d // head_dim)
  while d % heads or (d // heads) % 2:  # heads must divide d into even head dims (rotary embeddings)
    heads -= 1
  ratio = max(1, config.model.heads // max(config.model.kv_heads, 1))
  kv_heads = heads // ratio if heads % ratio == 0 else heads
  return heads, kv_heads


def model_overrides(config: ml_collections.ConfigDict, d: int) -> dict[str, Any]:
  """The family's growth rule at width d, as config overrides (see the module docstring)."""
  m = config.model
  out: dict[str, Any] = {"model.d": d}
  uses_transformer = m.name == "transformer" or (m.name in ("vae", "mixture")
                                                 and "transformer" in (m.encoder, m.decoder))
  if m.name == "transformer":
    out["model.layers"] = max(1, round(d / ASPECT_RATIO))
  if uses_transformer:
    out["model.heads"], out["model.kv_heads"] = _heads(d, config)
  return out


def _at_width(config: ml_collections.ConfigDict, d: int,
              precision: tuple[str, str] | None) -> ml_collections.ConfigDict | None:
  overrides = model_overrides(config, d)
  if precision:
    overrides.update({"precision.param_dtype": precision[0], "precision.compute_dtype": precision[1]})
  try:
    return config_lib.validate(config_lib.override(config, overrides))
  except config_lib.ConfigError:  # e.g. a window longer than the model allows: not on the ladder
    return None


@dataclasses.dataclass
class Growth:
  """The grown model: its width, the plan that fits it, and what the search saw."""
  budget: int
  width: int
  overrides: dict[str, Any]  # model (and precision) overrides of the growth rule
  plan: plan_lib.Plan
  param_count: int
  tried: list[dict[str, Any]]  # width -> smallest estimate, whether it fits, compile outcome

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.plan.config

  def record(self) -> dict[str, Any]:
    return {"budget_bytes": self.budget, "width": self.width, "model_overrides": self.overrides,
            "param_count": self.param_count, "plan": self.plan.record(), "tried": self.tried}


def grow(config: ml_collections.ConfigDict, budget_bytes: int, num_devices: int | None = None, *,
         widths: Sequence[int] | None = None, precisions: Sequence[tuple[str, str]] | None = None,
         confirm: bool = True, max_widths_compiled: int = 3) -> Growth:
  """The largest model along the family's growth rule whose train step fits `budget_bytes` per device.

  Args:
    config: a validated config; its family, data shapes, optimizer and
      everything outside the growth rule are kept.
    budget_bytes: per-device training-memory budget.
    num_devices: devices to plan for (as `plan.plan`).
    widths: the ladder to search (default `width_ladder()`).
    precisions: (param_dtype, compute_dtype) pairs the search may use, in
      order of preference at equal width (default: the config's own only:
      precision changes the numbers, so it is a lever only when asked for).
    confirm: confirm the choice with one compile (as `plan.plan`).
    max_widths_compiled: widths to try against the compiler before giving up.

  Returns:
    A `Growth`.

  Raises:
    plan.BudgetTooSmall: not even the smallest width fits.
  """
  import jax
  from wm.memory import calibration

  widths = sorted(widths or width_ladder())
  # The planner keeps a share of the budget free (its calibrated reserve);
  # judge widths by the same usable share, so a width that fits here is one
  # the planner can place.
  usable = budget_bytes * (1.0 - calibration.table(jax.default_backend()).planning_margin)
  precisions = list(precisions or [None])
  tried: list[dict[str, Any]] = []
  fitting: list[tuple[int, tuple[str, str] | None, ml_collections.ConfigDict, int]] = []
  smallest_seen = None
  for d in widths:
    fits_here = None
    for precision in precisions:
      grown = _at_width(config, d, precision)
      if grown is None:
        continue
      every = plan_lib.candidates(grown, num_devices)
      if not every:
        continue
      least = min(c.estimate.total for c in every)
      if smallest_seen is None or least < smallest_seen[0]:
        smallest_seen = (least, d)
      tried.append({"width": d, "precision": precision, "smallest_estimate_bytes": least,
                    "fits_by_estimate": least <= usable})
      if least <= usable:
        fits_here = (d, precision, grown, least)
        break
    if fits_here:
      fitting.append(fits_here)
    elif fitting and d > 2 * fitting[-1][0]:
      break  # far past the largest fitting width; estimates only grow with width
  if not fitting:
    least, d = smallest_seen or (0, widths[0])
    raise plan_lib.BudgetTooSmall(
        f"budget {format_bytes(budget_bytes)} per device: not even the smallest {config.model.name} of the ladder "
        f"(d={widths[0]}) fits; the smallest estimate seen is {format_bytes(least)} at d={d}. "
        f"Raise the budget to at least {format_bytes(least)}, or shrink data.batch_size / data.seq_len.",
        budget=budget_bytes, smallest=int(least), dominant="activations")
  # Confirm from the largest width down. When the compiler rejects a width,
  # how far its figure exceeds the budget says how far (at least) the estimate
  # is off for this family and shape; widths that would not fit at that ratio
  # are skipped instead of each costing compiles.
  ratio, last_error = 1.0, None
  for _ in range(max_widths_compiled):
    left = [f for f in fitting if f[3] * ratio <= usable]
    if not left:
      break
    d, precision, grown, least = left[-1]
    try:
      result = plan_lib.plan(grown, budget_bytes, num_devices, confirm=confirm, max_compiles=2)
    except plan_lib.BudgetTooSmall as e:
      last_error = e
      # The rejected candidates' estimates were at most the budget and the
      # compiler's smallest figure for them is e.smallest, so the estimate is
      # low by at least e.smallest / budget here (a lower bound: skipping by
      # it never skips a width that the compiler would accept).
      ratio = max(ratio, e.smallest / budget_bytes)
      tried.append({"width": d, "precision": precision, "rejected_by_compile": str(e)[:200],
                    "compiled_over_budget": round(e.smallest / budget_bytes, 3)})
      fitting = [f for f in fitting if f[0] < d]
      continue
    overrides = model_overrides(config, d)
    if precision:
      overrides.update({"precision.param_dtype": precision[0], "precision.compute_dtype": precision[1]})
    count = int(result.chosen.estimate.detail.get("param_count", 0))
    return Growth(budget_bytes, d, overrides, result, count, tried)
  if last_error is None:
    raise plan_lib.BudgetTooSmall(f"budget {format_bytes(budget_bytes)}: no width left to try", budget=budget_bytes,
                                  smallest=0, dominant="activations")
  raise plan_lib.BudgetTooSmall(
      f"budget {format_bytes(budget_bytes)} per device: the compiler put every {config.model.name} width tried "
      f"above it (the estimate was low by at least {ratio:.2f}x for this shape). {last_error}",
      budget=budget_bytes, smallest=last_error.smallest, dominant=last_error.dominant)


def main(config: ml_collections.ConfigDict, budget: str, as_json: bool = False) -> int:
  """`python -m wm memory --budget B --grow`: prints the grown model and its plan; returns an exit code."""
  budget_bytes = config_lib.parse_bytes(budget)
  try:
    growth = grow(config, budget_bytes)
  except plan_lib.BudgetTooSmall as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if as_json:
    print(json.dumps({"schema": "wm.memory.grow/1", **growth.record()}, indent=2, default=str))
    return 0
  p, m = growth.plan, growth.config.model
  shape = f"d={m.d}, {m.layers} layers" + (f", {m.heads} heads ({m.kv_heads} kv)" if m.name == "transformer" else "")
  compiled = p.record()["compiled_total_bytes"]
  print(f"largest {m.name} within {format_bytes(budget_bytes)} per device: {shape}, "
        f"{growth.param_count / 1e6:.2f}M parameters")
  print(f"  plan: {p.chosen.describe()}")
  print(f"  estimate {format_bytes(p.chosen.estimate.total)}, compiled "
        f"{format_bytes(compiled) if compiled is not None else '(not compiled)'}: {p.confirm_note}")
  print("  overrides: " + " ".join(f"--config.{k}={v}" for k, v in {**growth.overrides,
                                                                     **p.chosen.overrides()}.items()))
  return 0
