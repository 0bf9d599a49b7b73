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
    fsdp_gathered[key]    with an fsdp axis: (one layer's whole weights alive
                          in its backward pass without remat, the same under
                          a remat policy, whole-model bytes beyond the local
                          shards) (sharding.sharding_buffers).
    dp_grad_copies[key]   with a data axis: gradient-sized buffers the
                          all-reduce of the gradients adds. Keys: the model
                          families, and "lstm_chunked" for the LSTM language
                          model in time chunks (`sharding.family_key`).
    fixed_mib             MiB the compiler's figure holds whatever the step
                          (the TPU's peak counts buffers outside the temp
                          allocation that no term models; 0 on CPU).
    saved_scale[dtype]    the compiler's saved activations over the derived
                          count, by compute dtype (1 where the compiler keeps
                          what the model code saves; XLA CPU has no bfloat16
                          arithmetic and widens part of the residuals).
    planning_margin       share of the budget the planner keeps free (CPU 5%,
                          TPU and GPU 10%). Held-out under-estimates
                          (benchmarks/estimate_accuracy.py) go beyond it on
                          every backend (docs/memory.md): the compile that
                          confirms a plan against the budget is what holds.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

LAYER_UNITS = 6
LSTM_UNITS = 2
# Keys of the per-family sharding coefficients: the model families, and the LSTM language model run in
# time chunks ("lstm_chunked"), which compiles differently from the unchunked one: its chunk scan runs the
# whole model (every layer's weights, gathered over fsdp, and a gradient sum over the chunks) at every chunk.
FAMILIES = ("lstm", "lstm_chunked", "mixture", "transformer", "vae", "vrnn")
# Starting points before a fit: ZeRO-3's one gathered copy of a layer (two when it is recomputed), the
# time-scanned models' whole gathered weights, a few copies of one layer's weights for the LSTM in time chunks
# (XLA CPU, fsdp 4, d=256, 1/2/4 layers: temp 7.97/8.25/11.13 MiB, the growth per layer its gradient shards:
# the chunk's layer scan gathers one layer at a time, about four copies of it alive together), and one
# all-reduced gradient copy for the LSTMs (all measured on XLA CPU before they were fitted).
FAMILY_DEFAULTS = {
    "fsdp_gathered": {"lstm": (0.0, 0.0, 1.0), "lstm_chunked": (0.0, 3.5, 0.0), "mixture": (1.0, 2.0, 0.0),
                      "transformer": (1.0, 2.0, 0.0),
                      "vae": (1.0, 2.0, 0.0), "vrnn": (0.0, 0.0, 1.0)},
    "dp_grad_copies": {"lstm": 1.0, "lstm_chunked": 1.0, "mixture": 0.0, "transformer": 0.0, "vae": 0.0, "vrnn": 0.0},
}


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
  fsdp_gathered: Mapping[str, tuple[float, float, float]] = dataclasses.field(default_factory=lambda: dict(
      FAMILY_DEFAULTS["fsdp_gathered"]))
  dp_grad_copies: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(
      FAMILY_DEFAULTS["dp_grad_copies"]))
  fixed_mib: float = 0.0

  def replace(self, **changes) -> "Table":
    return dataclasses.replace(self, **changes)


_SCALARS = ("head_stream", "vrnn_chunk_grads", "update_buffers", "planning_margin", "mixture_head_logits", "fixed_mib")
_GROUPS = ("layer_transient", "layer_transient_alt", "lstm_transient", "saved_scale", "fsdp_gathered", "dp_grad_copies")


def _rows(t: Table) -> dict[str, tuple[float, ...]]:
  """A table as rows: `group.key` or a scalar's name -> its coefficients."""
  rows = {}
  for group in _GROUPS:
    for key, value in sorted(getattr(t, group).items()):
      rows[f"{group}.{key}"] = tuple(value) if isinstance(value, tuple) else (value,)
  for name in _SCALARS:
    rows[name] = (getattr(t, name),)
  return rows


def parse(text: str, fitted_on: Mapping[str, str]) -> dict[str, Table]:
  """The tables of a `COEFFICIENTS` block: a header of backend names, then a row per coefficient, columns split by |."""
  lines = [line for line in text.strip().splitlines() if line.strip()]
  backends = lines[0].replace("|", " ").split()
  rows = {}
  for line in lines[1:]:
    name, values = line.split(None, 1)
    rows[name] = dict(zip(backends, (tuple(float(v) for v in col.split()) for col in values.split("|"))))

  def one(backend: str) -> Table:
    def group(name: str, scalar: bool = False) -> dict:
      out = {row.split(".", 1)[1]: v[backend] for row, v in rows.items() if row.split(".", 1)[0] == name}
      return {k: v[0] for k, v in out.items()} if scalar else out
    return Table(backend=backend, fitted_on=fitted_on[backend],
                 **{g: group(g, scalar=g in ("saved_scale", "dp_grad_copies")) for g in _GROUPS},
                 **{s: rows[s][backend][0] for s in _SCALARS})

  return {b: one(b) for b in backends}


# The fitted tables, one row per coefficient (units in the module doc) and one column per backend, so the
# compilers read side by side; `render` writes this block from fitted tables.
#
# cpu: XLA:CPU, jax 0.10.2: benchmarks/calibrate.py's fit (bounded least squares, ridge 0.05 towards the start,
# tests/test_memory.py's matrix weighted 8x) to the 184 records of results/calibration/cpu.jsonl, compiled from
# the code of this branch (record field wm_commit). Refit: python benchmarks/calibrate.py --backend cpu
# --refit-only (it starts from this table, so a rerun refines it rather than repeating it).
# tpu: the TPU compiler (libtpu 0.0.42.1, v5e:2x2 compiled from this host), fitted like CPU's to the 66 records of
# results/calibration/tpu.jsonl that are not mixtures (python benchmarks/calibrate.py --backend tpu --refit-only
# --families transformer lstm vae vrnn --max-evals 200): a mixture step's TPU peak is up to 40x its arguments,
# in a VMEM scratch allocation and buffers outside the temp allocation that no term models (docs/memory.md); fitting
# them pulled the Transformer's and LSTM's coefficients far from the other families' figures. Its model states and
# activations are tiled (sharding.tpu_bytes). The mixture family's own coefficients (mixture_head_logits,
# fsdp_gathered.mixture, dp_grad_copies.mixture) keep the values of a fit to the first 48 records, mixtures included.
FITTED_ON = {
    'cpu': '184 compiled train steps on cpu (results/calibration/cpu.jsonl): lstm, mixture, transformer, vae, vrnn; widths 32-1024, 1-4 layers, lengths 32-512, bfloat16/float32, 1/2/4/8 devices (data/fsdp/tensor), 4 optimizers; fit: median |err| 7.88%, max 85.77%, under-estimates 36% (worst -60.31%)',
    'tpu': '66 compiled train steps on v5e:2x2 (results/calibration/tpu.jsonl): lstm, transformer, vae, vrnn; widths 32-1024, 1-4 layers, lengths 32-512, bfloat16/float32, 1/2/4 devices (data/fsdp/tensor), 4 optimizers; fit: median |err| 15.63%, max 190.38%, under-estimates 29% (worst -38.63%)',
}
COEFFICIENTS = """
                                  cpu                                       | tpu
layer_transient.attn_context      24.298  3.503  0.047  0.546  0.000  0.000 |  0.737  0.341  0.354  0.143  0.000  0.000
layer_transient.attn_out           3.754  5.275  5.932  0.905  0.000  0.000 |  5.396  6.933  1.442  1.280  0.000  0.000
layer_transient.dots              29.847  0.589  1.252  0.006  0.000  0.000 |  0.001  0.000  0.039  2.116  0.000  0.000
layer_transient.dots_no_batch     16.274  2.114  2.593  0.461  0.000  0.000 |  5.016  3.138  0.000  2.112  0.000  0.000
layer_transient.full               0.000  7.569  3.748  2.056  0.000  0.000 |  1.879  2.300  1.084  0.528  0.000  0.000
layer_transient.mlp_hidden         0.210  1.317  6.608  2.213  0.000  0.000 |  6.555  6.800  0.958  0.002  0.000  0.000
layer_transient.none               0.000  0.000  0.000  1.979  0.000  0.000 |  0.000  0.000  0.002  0.134  0.000  0.000
layer_transient.qkv                0.947  8.405  4.479  0.000  0.000  0.000 |  1.099  0.151  0.680  0.249  0.000  0.000
layer_transient_alt.attn_context   0.000  0.000  3.760  0.000  0.000  0.000 |  0.000  0.000  3.760  0.000  0.000  0.000
layer_transient_alt.attn_out       0.014  0.061  6.217  0.002  0.000  0.000 |  0.000  0.000  1.842  0.000  0.000  0.000
lstm_transient.dots               34.518  0.973                             |  3.973  0.006
lstm_transient.full               28.341  0.855                             | 13.157  1.574
lstm_transient.full/chunk          9.837  1.128                             | 14.360  0.770
lstm_transient.none                3.976  2.104                             |  0.000 13.759
lstm_transient.none/chunk          2.130  2.738                             |  0.001 14.898
lstm_transient.save:c              2.921  2.259                             | 32.426  6.905
lstm_transient.save:gates          8.520  3.280                             |  0.000  8.356
lstm_transient.save:h             13.781  0.000                             | 40.446  0.000
saved_scale.bfloat16               0.923                                    |  1.000
saved_scale.float32                1.000                                    |  1.000
fsdp_gathered.lstm                 0.000  0.585  0.260                      |  0.000  0.000  1.000
fsdp_gathered.lstm_chunked         0.000  3.018  0.000                      |  0.000  2.445  0.000
fsdp_gathered.mixture              1.000  0.000  0.000                      |  1.000  0.000  0.000
fsdp_gathered.transformer          0.016  1.187  0.000                      |  0.000  0.000  1.780
fsdp_gathered.vae                  0.000  0.597  0.003                      |  1.000  0.010  0.000
fsdp_gathered.vrnn                 0.000  1.893  3.237                      |  0.000  0.018  1.831
dp_grad_copies.lstm                0.000                                    |  0.000
dp_grad_copies.lstm_chunked        0.331                                    |  0.755
dp_grad_copies.mixture             1.610                                    |  0.000
dp_grad_copies.transformer         0.000                                    |  0.001
dp_grad_copies.vae                 0.596                                    |  0.000
dp_grad_copies.vrnn                1.561                                    |  1.918
head_stream                        4.000                                    |  4.000
vrnn_chunk_grads                   1.724                                    |  1.324
update_buffers                     2.168                                    |  3.145
planning_margin                    0.050                                    |  0.100
mixture_head_logits                3.663                                    |  1.336
fixed_mib                          0.000                                    |  0.588
"""
TABLES = parse(COEFFICIENTS, FITTED_ON)
CPU, TPU = TABLES["cpu"], TABLES["tpu"]
# The GPU compiler can be run from this host (wm.memory.aot, an H100 described from public facts), and
# benchmarks/estimate_accuracy.py measures this table against it; no fitting set was compiled for it yet.
GPU = TABLES.setdefault("gpu", CPU.replace(
    backend="gpu", fitted_on=("not fitted to the GPU compiler: XLA CPU coefficients, measured against H100 compiles "
                              "made from a CPU host (docs/memory.md, 'GPU targets')"), planning_margin=0.10))


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
       + [t.saved_scale[k] for k in sorted(t.saved_scale)] + [t.mixture_head_logits]
       + [c for k in FAMILIES for c in t.fsdp_gathered[k]] + [t.dp_grad_copies[k] for k in FAMILIES]
       + [t.fixed_mib])
  scale_keys = sorted(t.saved_scale)
  names = ([f"layer_transient.{k}.{i}" for k in layer_keys for i in range(LAYER_UNITS)]
           + [f"layer_transient_alt.{k}.{i}" for k in alt_keys for i in range(LAYER_UNITS)] + ["head_stream"]
           + [f"lstm_transient.{k}.{i}" for k in lstm_keys for i in range(LSTM_UNITS)]
           + ["vrnn_chunk_grads", "update_buffers"] + [f"saved_scale.{k}" for k in scale_keys]
           + ["mixture_head_logits"] + [f"fsdp_gathered.{k}.{i}" for k in FAMILIES for i in range(3)]
           + [f"dp_grad_copies.{k}" for k in FAMILIES] + ["fixed_mib"])

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
    vrnn, update, mixture = x[i], x[i + 1], x[i + 2 + len(scale_keys)]
    i += 3 + len(scale_keys)
    gathered = {}
    for k in FAMILIES:
      gathered[k] = tuple(x[i:i + 3]); i += 3
    reduced = {k: x[i + j] for j, k in enumerate(FAMILIES)}
    return t.replace(layer_transient=layer, layer_transient_alt=alt, head_stream=head, lstm_transient=lstm,
                     vrnn_chunk_grads=vrnn, update_buffers=update, saved_scale=scales, mixture_head_logits=mixture,
                     fsdp_gathered=gathered, dp_grad_copies=reduced, fixed_mib=x[i + len(FAMILIES)])

  return x, unflatten, names


# Coefficients a fit leaves alone: float32 saved activations are derived exactly
# (the compiler keeps what the model code saves), the others are fixed counts.
# The LSTM in time chunks gathers one layer at a time inside its chunk (FAMILY_DEFAULTS): its layer units
# are fitted, its "none" and whole-model units stay at zero (the fitting set's 1-, 2- and 4-layer records
# otherwise trade layer copies for whole-model copies, which the 3- and 5-layer steps do not hold).
FROZEN = frozenset({"saved_scale.float32", "head_stream", "fsdp_gathered.lstm_chunked.0",
                    "fsdp_gathered.lstm_chunked.2"})


# Per backend: the TPU has bfloat16 arithmetic, so what the model code saves in bfloat16 stays bfloat16 there
# (no widening to fit; a free coefficient traded the saved activations for transient terms: 0.126).
FROZEN_BY_BACKEND = {"tpu": frozenset({"saved_scale.bfloat16"})}


def _frozen(name: str, backend: str = "") -> bool:
  # The per-layer units in the compute dtype (4 and 5) stay at zero: bfloat16's widening is
  # saved_scale's one coefficient, not sixteen more for a few records to pull around.
  return (name in FROZEN or name in FROZEN_BY_BACKEND.get(backend, ())
          or (name.startswith("layer_transient") and name.rsplit(".", 1)[1] in ("4", "5")))


def fit(records: list[dict[str, Any]], backend: str, make_config: Callable[[dict], Any], *,
        under_weight: float = 4.0, max_evals: int = 20, start: Table | None = None,
        ridge: float = 0.05, weights: list[float] | None = None) -> tuple[Table, str]:
  """Refits `backend`'s table to compiled records; returns (table, a text report).

  Minimises the relative error of the estimated total against each record's
  `bound_bytes`, with under-estimates weighted `under_weight` times (an
  under-estimate is an out-of-memory crash; an over-estimate, some unused
  memory), over non-negative coefficients (scipy's bounded least squares,
  starting from the current table). Coefficients no record exercises keep
  their value; the others are pulled towards it with weight `ridge` (relative
  to their size), so a coefficient few records see does not wander off.
  `weights` (one per record, default 1) scales a record's residual.
  """
  import numpy as np
  from scipy import optimize
  from wm.memory import estimate as estimate_lib

  start = start or table(backend)
  configs = [(make_config(r["overrides"]), r["num_devices"], r["bound_bytes"]) for r in records]

  def errors(t: Table, rows=None) -> np.ndarray:
    rows = range(len(configs)) if rows is None else rows
    return np.array([(estimate_lib.estimate(configs[k][0], configs[k][1], backend=backend, table=t).total
                      - configs[k][2]) / configs[k][2] for k in rows])

  record_weights = np.ones(len(configs)) if weights is None else np.asarray(weights, dtype=float)

  def weigh(e, rows=slice(None)):
    return record_weights[rows] * np.where(e < 0, under_weight * e, e)

  x0, unflatten, names = _flatten(start)
  # Which coefficients matter, and for which records: one perturbation each (the rest stay fixed). Each
  # record sees only its family's, policy's and mesh's coefficients, so the Jacobian below re-estimates
  # only those records (a tenth of the work of a dense finite-difference Jacobian).
  base = errors(unflatten(x0))
  active, rows = [], []
  for i in range(len(x0)):
    if _frozen(names[i], backend):
      continue
    changed = np.nonzero(np.abs(errors(unflatten([v + (1.0 if j == i else 0.0) for j, v in enumerate(x0)]))
                                - base) > 1e-12)[0]
    if len(changed):
      active.append(i)
      rows.append(changed)
  x0a = np.array([x0[i] for i in active])
  scale = ridge / (1.0 + np.abs(x0a))

  def full(xa):
    x = list(x0)
    for i, v in zip(active, xa):
      x[i] = v
    return x

  def objective(xa):
    return np.concatenate([weigh(errors(unflatten(full(xa)))), scale * (xa - x0a)])

  def jacobian(xa):
    e0 = errors(unflatten(full(xa)))
    jac = np.zeros((len(configs) + len(xa), len(xa)))
    for col, (value, changed) in enumerate(zip(xa, rows)):
      step = 1e-3 * max(1.0, abs(value))
      moved = np.array(xa, dtype=float)
      moved[col] += step
      jac[changed, col] = (weigh(errors(unflatten(full(moved)), changed), changed) - weigh(e0[changed], changed)) / step
    jac[len(configs):, :] = np.diag(scale)
    return jac

  result = optimize.least_squares(objective, x0a, jac=jacobian, bounds=(0.0, np.inf), max_nfev=max_evals)
  fitted = unflatten(full(result.x))
  before, after = errors(start), errors(fitted)

  def summary(e):
    a = np.abs(e)
    return (f"median |err| {100 * np.median(a):.2f}%, max {100 * a.max():.2f}%, "
            f"under-estimates {np.mean(e < 0) * 100:.0f}% (worst {100 * e.min():+.2f}%)")

  fitted = fitted.replace(fitted_on=(
      f"{len(records)} compiled train steps on {', '.join(sorted({r['target'] for r in records}))} "
      f"(results/calibration/{backend}.jsonl): {describe(records)}; fit: {summary(after)}"))
  report = (f"{backend}: {len(records)} records, {len(active)} coefficients exercised\n"
            f"  before: {summary(before)}\n  after:  {summary(after)}")
  return fitted, report


def describe(records: list[dict[str, Any]]) -> str:
  """What a set of compiled records spans: families, widths, depths, lengths, dtypes, device counts."""
  o = [r["overrides"] for r in records]

  def span(key, default=None):
    values = sorted({x.get(key, default) for x in o})
    return f"{values[0]}-{values[-1]}" if len(values) > 1 else str(values[0])

  return (f"{', '.join(sorted({x['model.name'] for x in o}))}; widths {span('model.d')}, "
          f"{span('model.layers')} layers, lengths {span('data.seq_len')}, "
          f"{'/'.join(sorted({x.get('precision.compute_dtype', 'float32') for x in o}))}, "
          f"{'/'.join(str(n) for n in sorted({x['mesh.num_devices'] for x in o}))} devices "
          f"(data/fsdp/tensor), {len({x.get('optim.name', 'adamw') for x in o})} optimizers")


def render(tables: Mapping[str, Table]) -> str:
  """Python source of `FITTED_ON` and `COEFFICIENTS` for these tables, to paste into this module."""
  columns = {b: _rows(t) for b, t in tables.items()}
  names = list(next(iter(columns.values())))
  cells = {b: {n: " ".join(f"{c:6.3f}" for c in rows[n]) for n in names} for b, rows in columns.items()}
  widths = {b: max(len(c) for c in col.values()) for b, col in cells.items()}
  first = max(len(n) for n in names)
  lines = ["FITTED_ON = {"] + [f"    {b!r}: {t.fitted_on!r}," for b, t in tables.items()] + ["}", 'COEFFICIENTS = """']
  lines.append(" " * first + "  " + " | ".join(b.ljust(widths[b]) for b in tables).rstrip())
  lines += [n.ljust(first) + "  " + " | ".join(cells[b][n].ljust(widths[b]) for b in tables).rstrip() for n in names]
  return "\n".join(lines + ['"""'])


def as_json(t: Table) -> str:
  return json.dumps(dataclasses.asdict(t), indent=2, default=lambda v: list(v) if isinstance(v, tuple) else v)

