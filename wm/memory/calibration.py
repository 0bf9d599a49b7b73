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
    mixture_head_logits   [b, t, K, V] f32 buffers a K-component mixture's
                          loss head holds at its peak (logits, their gradient,
                          the per-component log-softmax and posterior).
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
  mixture_head_logits: float = 3.0

  def replace(self, **changes) -> "Table":
    return dataclasses.replace(self, **changes)


# XLA:CPU, jax 0.10.2: benchmarks/calibrate.py's fit (bounded least squares, 25 evaluations, from the
# earlier hand fit) to the 45 Transformer, LSTM and mixture records of results/calibration/cpu.jsonl.
# Refit: python benchmarks/calibrate.py --backend cpu --refit-only --families transformer lstm mixture --max-evals 25
# (it starts from this table, so a rerun refines it rather than repeating it).
CPU = Table(
    backend='cpu',
    fitted_on='45 compiled train steps on cpu (results/calibration/cpu.jsonl): lstm, mixture, transformer; widths 32-1024, 1-4 layers, lengths 32-512, float32/bfloat16, 1 and 4 devices, every optimizer; fit: median |err| 4.46%, max 56.12%, under-estimates 33% (worst -26.16%)',
    layer_transient={
        'attn_context': (11.423, 6.040, 1.385, 1.054, 0.000, 0.000),
        'attn_out': (5.396, 6.933, 1.442, 1.280, 0.000, 0.000),
        'dots': (1.413, 6.793, 0.649, 0.834, 0.000, 0.000),
        'dots_no_batch': (0.363, 5.070, 4.173, 0.593, 0.000, 0.000),
        'full': (3.673, 7.233, 3.527, 0.995, 0.000, 0.000),
        'mlp_hidden': (6.771, 7.714, 3.466, 0.000, 0.000, 0.000),
        'none': (0.005, 9.537, 0.916, 0.109, 0.000, 0.000),
        'qkv': (2.423, 2.023, 15.252, 0.695, 0.000, 0.000),
    },
    layer_transient_alt={
        'attn_context': (0.000, 0.000, 3.760, 0.000, 0.000, 0.000),
        'attn_out': (0.000, 0.000, 4.400, 0.000, 0.000, 0.000),
    },
    head_stream=4.000,
    lstm_transient={
        'dots': (30.050, 1.510),
        'full': (27.073, 1.381),
        'full/chunk': (14.360, 0.770),
        'none': (17.375, 2.269),
        'none/chunk': (12.622, 1.245),
        'save:c': (32.426, 6.905),
        'save:gates': (0.000, 8.356),
        'save:h': (34.235, 0.000),
    },
    vrnn_chunk_grads=1.700,
    update_buffers=1.000,
    planning_margin=0.050,
    saved_scale={'bfloat16': 1.371, 'float32': 1.000},
    mixture_head_logits=4.697,
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
       + [t.saved_scale[k] for k in sorted(t.saved_scale)] + [t.mixture_head_logits])
  scale_keys = sorted(t.saved_scale)
  names = ([f"layer_transient.{k}.{i}" for k in layer_keys for i in range(LAYER_UNITS)]
           + [f"layer_transient_alt.{k}.{i}" for k in alt_keys for i in range(LAYER_UNITS)] + ["head_stream"]
           + [f"lstm_transient.{k}.{i}" for k in lstm_keys for i in range(LSTM_UNITS)]
           + ["vrnn_chunk_grads", "update_buffers"] + [f"saved_scale.{k}" for k in scale_keys]
           + ["mixture_head_logits"])

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
                     vrnn_chunk_grads=x[i], update_buffers=x[i + 1], saved_scale=scales,
                     mixture_head_logits=x[i + 2 + len(scale_keys)])

  return x, unflatten, names


# Coefficients a fit leaves alone: float32 saved activations are derived exactly
# (the compiler keeps what the model code saves), the others are fixed counts.
FROZEN = frozenset({"saved_scale.float32", "head_stream", "update_buffers", "vrnn_chunk_grads"})


def fit(records: list[dict[str, Any]], backend: str, make_config: Callable[[dict], Any], *,
        under_weight: float = 4.0, max_evals: int = 20, start: Table | None = None) -> tuple[Table, str]:
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

  start = start or table(backend)
  configs = [(make_config(r["overrides"]), r["num_devices"], r["bound_bytes"]) for r in records]

  def errors(t: Table) -> np.ndarray:
    return np.array([(estimate_lib.estimate(c, n, backend=backend, table=t).total - b) / b for c, n, b in configs])

  def residuals(x) -> np.ndarray:
    e = errors(unflatten(x))
    return np.where(e < 0, under_weight * e, e)

  x0, unflatten, names = _flatten(start)
  # Which coefficients matter: one perturbation each (the rest stay fixed).
  base = residuals(x0)
  active = [i for i in range(len(x0)) if names[i] not in FROZEN and np.any(np.abs(residuals(
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
            "    saved_scale={" + ", ".join(f"{k!r}: {v:.3f}" for k, v in sorted(t.saved_scale.items())) + "},",
            f"    mixture_head_logits={t.mixture_head_logits:.3f},", ")"]
  return "\n".join(lines)


def as_json(t: Table) -> str:
  return json.dumps(dataclasses.asdict(t), indent=2, default=lambda v: list(v) if isinstance(v, tuple) else v)

