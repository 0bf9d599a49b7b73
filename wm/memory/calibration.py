"""Fitted coefficients of the estimate, one table per compiler backend.

`wm.memory.estimate` derives what follows from the model code (model states,
saved activations per policy, inputs). What it cannot derive is how much
working memory a compiler's schedule holds on top at the peak: one layer's
backward pass with its recomputation, the loss head, the optimizer update.
Those depend on fusion and scheduling decisions that differ by compiler (XLA
CPU keeps bfloat16 arithmetic in float32 temporaries, the TPU compiler fuses
and pads differently), so each backend has its own `Table`, fitted to that
compiler's figures by `benchmarks/calibrate.py` from the records in
`results/calibration/<backend>.jsonl`, and each table says what it was fitted
on. A table that was not fitted to its backend says so in `fitted_on`.

Units (per device, per layer):

    layer_transient[key]  coefficients of (tokens*d f32, tokens*f f32,
                          b*h*t*S f32 scores, layer parameter bytes,
                          tokens*d compute dtype, tokens*f compute dtype),
                          with S the keys a score block spans (t for xla
                          attention, the block for chunked, 0 for fused
                          kernels), key = remat policy or saved tag.
    layer_transient_alt   a second candidate peak for some policies (the
                          larger applies).
    head_stream           [b, t, d] f32 arrays the loss head holds beside
                          the logits and their gradient.
    lstm_transient[key]   coefficients of (tokens*d f32, layer parameter
                          bytes) for one LSTM layer's backward pass.
    vrnn_chunk_grads      parameter-sized buffers of a chunked VRNN's outer
                          time scan in its backward pass.
    update_buffers        gradient-sized buffers alive in the optimizer update.
    saved_scale[dtype]    the compiler's saved activations over the derived
                          count, by compute dtype (1 where the compiler keeps
                          what the model code saves; XLA CPU has no bfloat16
                          arithmetic and widens part of the residuals).
    planning_margin       share of the budget the planner keeps free, set from
                          the worst under-estimate seen on this backend's
                          held-out matrix (benchmarks/estimate_accuracy.py).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

LAYER_UNITS = 6
LSTM_UNITS = 2


@dataclasses.dataclass(frozen=True)
class Table:
  """The calibrated coefficients of one backend (see the module doc for units)."""
  backend: str
  fitted_on: str
  layer_transient: Mapping[str, tuple[float, ...]]
  layer_transient_alt: Mapping[str, tuple[float, ...]]
  head_stream: float
  lstm_transient: Mapping[str, tuple[float, float]]
  vrnn_chunk_grads: float
  update_buffers: float
  planning_margin: float
  saved_scale: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {"float32": 1.0, "bfloat16": 1.0})

  def replace(self, **changes) -> "Table":
    return dataclasses.replace(self, **changes)


# XLA:CPU, jax 0.10.2. Refit with `python benchmarks/calibrate.py --backend cpu`.
CPU = Table(
    backend="cpu",
    fitted_on=("XLA CPU buffer assignment, jax 0.10.2: widths 32-128, mlp_ratio 2-4, 2-8 heads, lengths 32-1024, "
               "2-12 layers, float32 (tests/test_memory.py and benchmarks/remat.py configs)"),
    layer_transient={
        "none": (7.84, 3.51, 2.62, 1.08, 0.0, 0.0),
        "full": (3.63, 7.06, 3.44, 0.93, 0.0, 0.0),
        "dots": (3.51, 2.77, 3.57, 1.83, 0.0, 0.0),
        "dots_no_batch": (0.10, 4.01, 3.46, 1.66, 0.0, 0.0),
        "qkv": (3.63, 7.06, 3.44, 0.93, 0.0, 0.0),
        "attn_context": (11.34, 5.71, 1.22, 0.93, 0.0, 0.0),
        "attn_out": (5.29, 6.51, 1.23, 1.12, 0.0, 0.0),
        "mlp_hidden": (2.78, 1.86, 4.14, 1.27, 0.0, 0.0),
    },
    layer_transient_alt={
        "attn_context": (0.0, 0.0, 4.4, 0.0, 0.0, 0.0),
        "attn_out": (0.0, 0.0, 4.4, 0.0, 0.0, 0.0),
    },
    head_stream=4.0,
    lstm_transient={
        "none": (20.13, 1.48),
        "full": (27.05, 1.01),
        "dots": (30.05, 1.51),
        "save:gates": (23.01, 1.07),
        "save:h": (27.05, 1.51),
        "save:c": (27.05, 1.51),
        "none/chunk": (11.74, 2.55),
        "full/chunk": (14.36, 0.77),
    },
    vrnn_chunk_grads=1.7,
    update_buffers=1.0,
    planning_margin=0.05,
)

# The TPU and GPU compilers until refitted: CPU's coefficients, and a wider margin.
TPU = CPU.replace(backend="tpu", fitted_on="not fitted to the TPU compiler: XLA CPU coefficients", planning_margin=0.10)
GPU = CPU.replace(backend="gpu", fitted_on=("not fitted: no GPU compiler on the calibration host (docs/memory.md, "
                                            "'GPU targets'); XLA CPU coefficients"), planning_margin=0.10)

TABLES = {"cpu": CPU, "tpu": TPU, "gpu": GPU}


def table(backend: str) -> Table:
  """The table for a backend name ("cpu", "tpu", "gpu"; "cuda"/"rocm" are gpu)."""
  name = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
  if name not in TABLES:
    raise ValueError(f"no memory calibration for backend {backend!r}; known: {sorted(TABLES)}")
  return TABLES[name]


# ---------------------------------------------------------------------------
# Fitting (benchmarks/calibrate.py)
# ---------------------------------------------------------------------------

def _flatten(t: Table) -> tuple[list[float], Callable[[list[float]], Table]]:
  """The table's coefficients as one vector, and the inverse."""
  layer_keys, alt_keys, lstm_keys = sorted(t.layer_transient), sorted(t.layer_transient_alt), sorted(t.lstm_transient)
  x = ([c for k in layer_keys for c in t.layer_transient[k]] + [c for k in alt_keys for c in t.layer_transient_alt[k]]
       + [t.head_stream] + [c for k in lstm_keys for c in t.lstm_transient[k]] + [t.vrnn_chunk_grads, t.update_buffers]
       + [t.saved_scale[k] for k in sorted(t.saved_scale)])
  scale_keys = sorted(t.saved_scale)

  def unflatten(x) -> Table:
    x = [float(v) for v in x]
    i = 0
    layer = {}
    for k in layer_keys:
      layer[k] = tuple(x[i:i + LAYER_UNITS]); i += LAYER_UNITS
    alt = {}
    for k in alt_keys:
      alt[k] = tuple(x[i:i + LAYER_UNITS]); i += LAYER_UNITS
    head = x[i]; i += 1
    lstm = {}
    for k in lstm_keys:
      lstm[k] = tuple(x[i:i + LSTM_UNITS]); i += LSTM_UNITS
    scales = {k: x[i + 2 + j] for j, k in enumerate(scale_keys)}
    return t.replace(layer_transient=layer, layer_transient_alt=alt, head_stream=head, lstm_transient=lstm,
                     vrnn_chunk_grads=x[i], update_buffers=x[i + 1], saved_scale=scales)

  return x, unflatten


def fit(records: list[dict[str, Any]], backend: str, make_config: Callable[[dict], Any], *,
        under_weight: float = 4.0, max_evals: int = 20) -> tuple[Table, str]:
  """Refits `backend`'s table to compiled records; returns (table, a text report).

  Minimises the relative error of the estimated total against each record's
  `bound_bytes`, with under-estimates weighted `under_weight` times (an
  under-estimate is an out-of-memory crash; an over-estimate, some unused
  memory), over non-negative coefficients (scipy's bounded least squares,
  starting from the current table). Coefficients no record exercises keep
  their value.
  """
  import numpy as np
  from scipy import optimize
  from wm.memory import estimate as estimate_lib

  start = table(backend)
  configs = [(make_config(r["overrides"]), r["num_devices"], r["bound_bytes"]) for r in records]

  def errors(t: Table) -> np.ndarray:
    return np.array([(estimate_lib.estimate(c, n, backend=backend, table=t).total - b) / b for c, n, b in configs])

  def residuals(x) -> np.ndarray:
    e = errors(unflatten(x))
    return np.where(e < 0, under_weight * e, e)

  x0, unflatten = _flatten(start)
  # Which coefficients matter: one perturbation each (the rest stay fixed).
  base = residuals(x0)
  active = [i for i in range(len(x0)) if np.any(np.abs(residuals(
      [v + (1.0 if j == i else 0.0) for j, v in enumerate(x0)]) - base) > 1e-9)]
  x0a = np.array([x0[i] for i in active])

  def full(xa):
    x = list(x0)
    for i, v in zip(active, xa):
      x[i] = v
    return x

  result = optimize.least_squares(lambda xa: residuals(full(xa)), x0a, bounds=(0.0, np.inf), max_nfev=max_evals,
                                  diff_step=1e-3)
  fitted = unflatten(full(result.x))
  before, after = errors(start), errors(fitted)

  def summary(e):
    a = np.abs(e)
    return (f"median |err| {100 * np.median(a):.2f}%, max {100 * a.max():.2f}%, "
            f"under-estimates {np.mean(e < 0) * 100:.0f}% (worst {100 * e.min():+.2f}%)")

  families = sorted({r["overrides"]["model.name"] for r in records})
  targets = sorted({r["target"] for r in records})
  fitted = fitted.replace(fitted_on=(
      f"{len(records)} compiled train steps on {', '.join(targets)} (results/calibration/{backend}.jsonl): "
      f"{', '.join(families)}; widths 32-1024, 1-4 layers, lengths 32-512, float32/bfloat16, 1 and 4 devices, "
      f"every optimizer; fit: {summary(after)}"))
  report = (f"{backend}: {len(records)} records, {len(active)} coefficients exercised\n"
            f"  before: {summary(before)}\n  after:  {summary(after)}")
  return fitted, report


def render(t: Table) -> str:
  """Python source of a table, to paste into this module."""
  def tup(v):
    return "(" + ", ".join(f"{c:.3f}" for c in v) + ("," if len(v) == 1 else "") + ")"
  lines = [f"{t.backend.upper()} = Table(", f"    backend={t.backend!r},", f"    fitted_on={t.fitted_on!r},",
           "    layer_transient={"]
  lines += [f"        {k!r}: {tup(v)}," for k, v in sorted(t.layer_transient.items())]
  lines += ["    },", "    layer_transient_alt={"]
  lines += [f"        {k!r}: {tup(v)}," for k, v in sorted(t.layer_transient_alt.items())]
  lines += ["    },", f"    head_stream={t.head_stream:.3f},", "    lstm_transient={"]
  lines += [f"        {k!r}: {tup(v)}," for k, v in sorted(t.lstm_transient.items())]
  lines += ["    },", f"    vrnn_chunk_grads={t.vrnn_chunk_grads:.3f},", f"    update_buffers={t.update_buffers:.3f},",
            f"    planning_margin={t.planning_margin:.3f},",
            "    saved_scale={" + ", ".join(f"{k!r}: {v:.3f}" for k, v in sorted(t.saved_scale.items())) + "},", ")"]
  return "\n".join(lines)


def as_json(t: Table) -> str:
  return json.dumps(dataclasses.asdict(t), indent=2, default=lambda v: list(v) if isinstance(v, tuple) else v)

