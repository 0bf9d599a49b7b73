"""Fit a config to a per-device memory budget: search, rank by cost, confirm by compiling.

The planner enumerates the memory levers of the config and scores every
candidate with the analytic estimate (wm.memory.estimate, cheap), keeps those
that fit, ranks them by a cost model of step time, and confirms the best with
one real compile (wm.memory.measure.compiled); if the compiler's figure
exceeds the budget it tries the next candidate.

Search space:
  remat.policy        none, dots_no_batch, dots, full, and save:<tag> for each
                      tag the model emits (its REMAT_TAGS). offload:<tags> is
                      left out: on the CPU backend it acts as save.
  optim.microbatches  divisors m of the global batch whose microbatch still
                      splits over the batch mesh axes (global batch unchanged).
  remat.time_chunk    recurrent models (LSTM, VRNN, LSTM encoders/decoders):
                      0 (no time remat) and every divisor k of the sequence
                      length with 2 <= k <= T/2.
  mesh data x fsdp    every split of the devices left after config.mesh.tensor
                      (which is kept) whose parameter shards divide.
  model.attention     for a config with xla attention, xla and chunked (same
                      outputs, memory linear in T; its backward pass
                      recomputes the scores); cudnn/splash configs are kept.
  precision           fixed: the config's param/compute dtypes are a modelling
                      choice (bf16 changes the numbers, not just the bytes), so
                      the planner does not change them.
  train.budget_allow  levers the user allows on top (BUDGET_LEVERS):
                      "adamw8bit" turns AdamW into 8-bit AdamW (moments in 8
                      bits, Dettmers et al. 2022); "share_layers" puts groups
                      of g consecutive layers on one weight set (every g that
                      divides the layers; ALBERT, Lan et al. 2020). Both change
                      what is trained, not only its bytes, so they are used only
                      where they make the step fit or let a cheaper one fit
                      (less recomputation, fewer microbatches); between equal
                      costs the candidate with fewer of them wins. 8-bit AdamW
                      shrinks the state kept between steps but not, today, the
                      step's peak: its update dequantizes every moment at once
                      (wm/compress/adam8bit.py), which the estimate counts, so
                      the planner takes it only where that nets a saving.

Cost model (lower is better), in FLOP-equivalents per device per step:

    cost = F * (3 + r) / n                      compute: forward, backward (2F), recomputation rF
         + FLOPS_PER_ICI_BYTE * comm            collectives (ring algorithms, bytes per device)
         + FLOPS_PER_HBM_BYTE * 3 P (m - 1)     re-reading parameters and the gradient
                                                accumulator once per extra microbatch

F is the model's forward FLOPs for the global batch (2 per multiply-add of
every matmul, plus attention's QK^T and AV, Kaplan et al. 2020 sec. 2.1), r
the fraction recomputed by the policy (full: the whole layer stack; dots: only
elementwise work, ~1%; dots_no_batch: attention's batched einsums; save:<tag>:
the layer minus the matmuls upstream of the kept tensor; time chunks: one more
forward pass of the recurrence, Chen et al. 2016, and for the LSTM language
model, which runs the whole model chunk by chunk, of the whole model). Communication: data
parallelism all-reduces gradients (2 (n-1)/n P); FSDP all-gathers parameters
for the forward and again for the backward pass (and for recomputation under
remat) and reduce-scatters gradients, each (f-1)/f P per microbatch
(Rajbhandari et al. 2020, sec. 7). The two ratios are a TPU v5e's
(197 TFLOP/s bf16; ~200 GB/s ICI and 819 GB/s HBM per chip): what matters is
their order of magnitude, which makes recomputation cheap next to moving
bytes between chips and cheaper still than running out of memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections

from wm import config as config_lib
from wm import models, parallel
from wm.config import format_bytes
from wm.memory import activations, calibration, estimate as estimate_lib, model_states, sharding
from wm.models import remat as remat_lib

FLOPS_PER_ICI_BYTE = 1000.0
FLOPS_PER_HBM_BYTE = 240.0
MAX_COMPILES = 4  # candidates tried against the compiler before giving up


class BudgetTooSmall(ValueError):
  """No candidate of the search space fits the budget.

  Attributes:
    budget: the budget in bytes.
    smallest: the smallest estimated total over the search space, in bytes:
      the smallest budget that would fit.
    dominant: the term that dominates that smallest candidate.
    candidate: that candidate (a `Candidate`).
  """

  def __init__(self, message: str, *, budget: int, smallest: int, dominant: str, candidate: Any = None):
    super().__init__(message)
    self.budget, self.smallest, self.dominant, self.candidate = budget, smallest, dominant, candidate


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One point of the search space with its estimate and cost."""
  policy: str
  microbatches: int
  time_chunk: int
  mesh: dict[str, int]  # data, fsdp, tensor
  estimate: estimate_lib.Estimate
  flops: float  # per device per step, including recomputation
  comm_bytes: float  # per device per step
  cost: float
  attention: str | None = None  # model.attention (None: the model has no attention, or the config's is kept)
  levers: tuple[tuple[str, Any], ...] = ()  # allowed levers this candidate adds (train.budget_allow), as overrides

  def overrides(self) -> dict[str, Any]:
    out = {"remat.policy": self.policy, "optim.microbatches": self.microbatches,
           "remat.time_chunk": self.time_chunk, "mesh.data": self.mesh["data"], "mesh.fsdp": self.mesh["fsdp"],
           "mesh.tensor": self.mesh["tensor"], **dict(self.levers)}
    if self.attention:
      out["model.attention"] = self.attention
    return out

  def describe(self) -> str:
    chunk = f", time_chunk {self.time_chunk}" if self.time_chunk else ""
    chunk += f", attention {self.attention}" if self.attention else ""
    chunk += "".join(f", {field} {value}" for field, value in self.levers)
    return (f"remat {self.policy}, {self.microbatches} microbatch{'es' if self.microbatches > 1 else ''}{chunk}, "
            f"mesh data={self.mesh['data']} fsdp={self.mesh['fsdp']} tensor={self.mesh['tensor']}")

  def record(self) -> dict[str, Any]:
    return {"remat_policy": self.policy, "microbatches": self.microbatches, "time_chunk": self.time_chunk,
            "attention": self.attention, "levers": dict(self.levers),
            "mesh": dict(self.mesh), "estimate_bytes": self.estimate.total, "phase": self.estimate.phase,
            "terms": {t: getattr(self.estimate, t) for t in estimate_lib.TERMS},
            "flops": self.flops, "comm_bytes": self.comm_bytes, "cost": self.cost}


@dataclasses.dataclass
class Plan:
  """The planner's choice, how it was confirmed, and what else fitted."""
  budget: int
  chosen: Candidate
  config: ml_collections.ConfigDict  # the input config with the choice applied
  compiled: dict[str, Any] | None  # wm.memory.measure.compiled of the choice; None if not confirmed
  confirm_note: str
  runners_up: list[Candidate]
  considered: int
  fitting: int
  rejected: list[dict[str, Any]]  # candidates whose compile exceeded the budget
  reserve: float = 0.0  # share of the budget kept free when selecting by estimate
  backend: str = "cpu"  # the compiler whose calibration scored the candidates
  target: str | None = None  # the compile target of the confirmation (None = this host)

  @property
  def margin(self) -> int:
    """Budget minus the compiled total (minus the estimate when not compiled)."""
    used = self.compiled["bound_bytes"] if self.compiled else self.chosen.estimate.total
    return self.budget - used

  def record(self) -> dict[str, Any]:
    return {"budget_bytes": self.budget, "chosen": self.chosen.record(),
            "compiled_total_bytes": self.compiled["total_bytes"] if self.compiled else None,
            "compiled_bound_bytes": self.compiled["bound_bytes"] if self.compiled else None,
            "compiled_bound_field": self.compiled["bound_field"] if self.compiled else None,
            "compiled": self.compiled, "confirmed": self.compiled is not None, "confirm_note": self.confirm_note,
            "margin_bytes": self.margin, "reserve": self.reserve, "backend": self.backend, "target": self.target,
            "considered": self.considered, "fitting": self.fitting,
            "rejected_by_compile": self.rejected, "runners_up": [c.record() for c in self.runners_up]}


# ---------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def _is_recurrent(config: ml_collections.ConfigDict) -> bool:
  m = config.model
  return (m.name in ("lstm", "vrnn") or (m.name == "vae" and "lstm" in (m.encoder, m.decoder))
          or (m.name == "mixture" and m.decoder == "lstm"))


def policies(config: ml_collections.ConfigDict) -> list[str]:
  tags = sorted(getattr(models.model_class(config.model.name), "REMAT_TAGS", ()) or ())
  return ["none", "dots_no_batch", "dots", "full"] + [f"save:{t}" for t in tags]


def time_chunks(config: ml_collections.ConfigDict) -> list[int]:
  if not _is_recurrent(config):
    return [config.remat.time_chunk]
  t = config.data.seq_len
  return [0] + [k for k in _divisors(t) if 2 <= k <= t // 2]


def attentions(config: ml_collections.ConfigDict) -> list[str | None]:
  """Attention implementations to try: the config's, and chunked where the config uses xla.

  `chunked` (wm/models/attention.py) is pure JAX, so it runs on every backend;
  cudnn and splash are hardware-specific and left to the user. None: the
  model has no Transformer stack.
  """
  m = config.model
  if not (m.name == "transformer" or (m.name in ("vae", "mixture") and "transformer" in (m.encoder, m.decoder))):
    return [None]
  return ["xla", "chunked"] if m.attention == "xla" else [m.attention]


def meshes(config: ml_collections.ConfigDict, num_devices: int) -> list[dict[str, int]]:
  """data x fsdp splits of the devices, tensor kept from the config (fsdp = 1 first)."""
  tensor = config.mesh.tensor if config.mesh.tensor > 0 else 1
  if num_devices % tensor:
    tensor = 1
  rest = num_devices // tensor
  out = []
  for fsdp in _divisors(rest):
    sizes = {"data": rest // fsdp, "fsdp": fsdp, "tensor": tensor}
    if model_states.fits_mesh(config, sizes):
      out.append(sizes)
  return out


def microbatch_counts(config: ml_collections.ConfigDict, mesh: dict[str, int]) -> list[int]:
  ways = sharding.batch_ways(config, mesh)
  b = config.data.batch_size
  return [m for m in _divisors(b) if (b // m) % ways == 0]


# ---------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------

def _forward_flops(config: ml_collections.ConfigDict) -> tuple[float, float, dict[str, float]]:
  """(forward FLOPs of the whole model, of the layer stack, per-part FLOPs of the stack) for the global batch."""
  m, tokens = config.model, config.data.batch_size * config.data.seq_len
  d, layers, v, t = m.d, m.layers, config.data.vocab_size, config.data.seq_len
  head = 2 * tokens * d * v
  if m.name == "transformer" or (m.name in ("vae", "mixture") and m.decoder == "transformer"):
    e = d // m.heads
    parts = {"qkv": 2 * tokens * d * (m.heads + 2 * m.kv_heads) * e,
             "attention": 2 * 2 * tokens * t * m.heads * e,  # QK^T and AV over all keys (masked, not skipped)
             "out": 2 * tokens * d * d, "mlp": 2 * 2 * tokens * d * m.mlp_ratio * d}
  else:
    parts = {"x_proj": 2 * tokens * d * 4 * d, "recurrence": 2 * tokens * d * 4 * d}
  parts = {k: v * layers for k, v in parts.items()}
  stack = sum(parts.values())
  copies = 2 if m.name == "vae" else (m.components if m.name == "mixture" and m.mixture_heads == "separate" else 1)
  heads = m.components if m.name == "mixture" else 1
  return stack * copies + head * heads, stack * copies, parts


def _recompute_fraction(policy: str, parts: dict[str, float], time_chunk: int, stack: float) -> float:
  """FLOPs recomputed in the backward pass, as a multiple of the stack's forward FLOPs (see module doc)."""
  if stack <= 0:
    return 0.0
  base, names = activations.policy_names(policy)
  if "recurrence" in parts:  # LSTM: layer remat reruns the layer; time chunks rerun the recurrence
    r = {"none": 0.0, "dots": 0.01}.get(base, 1.0)
    if base == "save":
      r = 1.0 - 0.5 * ("gates" in names)
    if time_chunk:
      r = max(r, parts["recurrence"] / stack)
    return r + 0.01 * (base != "none")
  upstream = {"qkv": ["qkv"], "attn_context": ["qkv", "attention"], "attn_out": ["qkv", "attention", "out"],
              "mlp_hidden": ["mlp"]}
  if base == "none":
    return 0.0
  if base == "dots":
    return 0.01
  if base == "dots_no_batch":
    return parts["attention"] / stack + 0.01
  if base in ("full", "offload"):
    return 1.0
  skipped = {p for n in names for p in upstream.get(n, [])}
  kept = sum(parts[p] for p in skipped) - (parts["mlp"] / 2 if "mlp_hidden" in names else 0.0)
  return max(1.0 - kept / stack, 0.0) + 0.01


def cost(config: ml_collections.ConfigDict, policy: str, microbatches: int, time_chunk: int,
         mesh: dict[str, int], est: estimate_lib.Estimate, attention: str | None = None) -> tuple[float, float, float]:
  """(FLOPs per device, communication bytes per device, cost) of one candidate."""
  n = math.prod(mesh.values())
  total, stack, parts = _forward_flops(config)
  r = _recompute_fraction(policy, parts, time_chunk, stack)
  t = config.data.seq_len
  if config.model.name == "lstm" and 0 < remat_lib.resolve_time_chunk(time_chunk, t) < t:
    # Model.loss reruns each chunk's whole forward pass (embedding to loss) before
    # its backward pass, and the layer policy recomputes inside that as without chunks.
    r = _recompute_fraction(policy, parts, 0, stack) + total / stack
  if attention == "chunked" and "attention" in parts:
    # FlashAttention's backward pass recomputes the scores (QK^T), half the attention FLOPs (Dao et al. 2022).
    r += parts["attention"] / 2 / stack
  flops = (3 * total + r * stack) / n
  local = est.params  # parameter bytes on this device
  fsdp, data = mesh["fsdp"], mesh["data"]
  full = local * fsdp  # the parameters gathered over fsdp
  comm = 0.0
  if fsdp > 1:
    gathers = 2 + (policy != "none")  # forward, backward, and the recomputation
    comm += microbatches * (gathers + 1) * (fsdp - 1) / fsdp * full
  if data > 1:
    comm += 2 * (data - 1) / data * local
  overhead = FLOPS_PER_HBM_BYTE * 3 * local * (microbatches - 1)
  return flops, comm, flops + FLOPS_PER_ICI_BYTE * comm + overhead


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------

def allowed_levers(config: ml_collections.ConfigDict) -> list[tuple[tuple[str, Any], ...]]:
  """Every combination of the levers train.budget_allow permits for this config, none first."""
  allow = {x.strip() for x in config.train.budget_allow.split(",") if x.strip()}
  optimizers: list[tuple[tuple[str, Any], ...]] = [()]
  if "adamw8bit" in allow and config.optim.name == "adamw":
    optimizers.append((("optim.name", "adamw8bit"),))
  sharing: list[tuple[tuple[str, Any], ...]] = [()]
  if "share_layers" in allow and config.model.name in ("lstm", "transformer") and config.model.share_layers == 1:
    sharing += [(("model.share_layers", g),) for g in _divisors(config.model.layers) if g > 1]
  return [o + s for o in optimizers for s in sharing]


def with_choice(config: ml_collections.ConfigDict, candidate: Candidate) -> ml_collections.ConfigDict:
  return config_lib.validate(config_lib.override(config, candidate.overrides()))


def candidates(config: ml_collections.ConfigDict, num_devices: int | None = None, *,
               backend: str | None = None) -> list[Candidate]:
  """Every candidate of the search space with its estimate and cost (unsorted)."""
  n = num_devices or config.mesh.num_devices or jax.device_count()
  out = []
  for added in allowed_levers(config):
    variant = config_lib.validate(config_lib.override(config, dict(added))) if added else config
    for mesh in meshes(variant, n):
      for m in microbatch_counts(variant, mesh):
        for chunk in time_chunks(variant):
          for attention in attentions(variant):
            for policy in policies(variant):
              levers = activations.Levers(policy, m, chunk, tuple(sorted(mesh.items())), attention=attention)
              est = estimate_lib.estimate(variant, n, backend=backend, levers=levers)
              flops, comm, score = cost(variant, policy, m, chunk, mesh, est, attention)
              out.append(Candidate(policy, m, chunk, dict(mesh), est, flops, comm, score, attention, added))
  return out


def plan(config: ml_collections.ConfigDict, budget_bytes: int, num_devices: int | None = None, *,
         confirm: bool = True, max_compiles: int = MAX_COMPILES, target: str | None = None,
         reserve: float | None = None) -> Plan:
  """The cheapest configuration of the levers whose step fits `budget_bytes` per device.

  Args:
    config: a validated config; its model, data shapes, precision and
      optimizer are kept, its remat, microbatches and mesh split are chosen
      (and, only where nothing fits without them, the levers
      train.budget_allow permits).
    budget_bytes: per-device budget.
    num_devices: devices to plan for (default: config.mesh.num_devices, else
      all devices JAX sees).
    confirm: compile the winner (and, if it exceeds the budget, the next
      candidates) with the real train step. Needs num_devices devices.
    max_compiles: compiles to try before giving up.
    target: where the step will run: None (this host's backend), or a TPU
      topology such as "v5e:4x4" (wm.memory.aot.target_mesh): candidates
      are scored with that backend's calibration and the choice is
      confirmed by that compiler; num_devices defaults to its chip count.
    reserve: share of the budget the estimate must leave free (default: the
      backend's calibration.Table.planning_margin, the worst held-out
      under-estimate rounded up), so that an estimate a few percent low still
      fits; the compiled confirmation is held against the whole budget.

  Returns:
    A `Plan`.

  Raises:
    BudgetTooSmall: no candidate's estimate fits (the message names the
      smallest budget that would and its dominant term), or no compiled
      candidate fits within `max_compiles` tries.
  """
  from wm.memory import aot
  backend, target_devices = aot.target_backend(target)
  n = num_devices or config.mesh.num_devices or target_devices or jax.device_count()
  reserve = calibration.table(backend).planning_margin if reserve is None else reserve
  every = candidates(config, n, backend=backend)
  if not every:
    raise ValueError(f"no mesh of {n} devices fits the parameter shapes of {config.model.name}")
  usable = budget_bytes * (1.0 - reserve)
  # The cost model first; between equal costs fewer allowed levers (they change what is trained).
  fitting = sorted((c for c in every if c.estimate.total <= usable),
                   key=lambda c: (c.cost, len(c.levers), c.estimate.total))
  if not fitting:
    smallest_candidate = min(every, key=lambda c: c.estimate.total)
    smallest = _with_reserve(smallest_candidate, reserve)
    dom = smallest_candidate.estimate.dominant()
    model_state_terms = ("params", "grads", "optimizer")
    states = sum(getattr(smallest_candidate.estimate, t) for t in model_state_terms)
    raise BudgetTooSmall(
        f"budget {format_bytes(budget_bytes)} per device is too small for this {config.model.name} "
        f"({config.model.layers} layers, d={config.model.d}, batch {config.data.batch_size} x "
        f"{config.data.seq_len}, {config.optim.name}, {config.precision.param_dtype}) on {n} device(s): "
        f"the smallest estimate over {len(every)} candidates is {format_bytes(smallest_candidate.estimate.total)} "
        f"({smallest_candidate.describe()}), dominated by {dom} "
        f"({format_bytes(getattr(smallest_candidate.estimate, dom))}). With the planner's {100 * reserve:.0f}% "
        f"reserve ({backend} calibration), a budget of at least {format_bytes(smallest)} ({smallest} bytes) would fit"
        + ("; or add devices to shard the model states" if dom in model_state_terms else "")
        + ("; or let the planner use 8-bit AdamW or shared layers (train.budget_allow=adamw8bit,share_layers)"
           if not config.train.budget_allow and states >= smallest_candidate.estimate.total / 2 else "") + ".",
        budget=budget_bytes, smallest=smallest, dominant=dom, candidate=smallest_candidate)

  rejected: list[dict[str, Any]] = []
  extra = dict(reserve=reserve, backend=backend, target=target)
  if not confirm or (target is None and n > jax.device_count()):
    note = ("not compiled: confirmation was turned off" if not confirm else
            f"not compiled: planning for {n} devices but this process has {jax.device_count()} "
            f"(use python -m wm memory --devices {n})")
    chosen = fitting[0]
    return Plan(budget_bytes, chosen, with_choice(config, chosen), None, note, fitting[1:6], len(every),
                len(fitting), rejected, **extra)

  from wm.memory import measure  # compiles; imported only when confirming
  for i, candidate in enumerate(fitting[:max_compiles]):
    new = with_choice(config, candidate)
    if target is None:
      mesh = parallel.make_mesh(new.mesh, jax.devices()[:n])
    else:
      new.mesh.num_devices = n
      mesh, _ = aot.target_mesh(new, target)
    compiled = measure.compiled(new, mesh)
    if compiled["bound_bytes"] <= budget_bytes:
      rest = fitting[i + 1:i + 6]  # the cheaper ones the compiler rejected are in `rejected`
      where = compiled["backend"] + (f" for {target}" if target else "")
      return Plan(budget_bytes, candidate, new, compiled, f"compiled on {where} ({compiled['bound_field']})", rest,
                  len(every), len(fitting), rejected, **extra)
    rejected.append({**candidate.record(), "compiled_total_bytes": compiled["total_bytes"],
                     "compiled_bound_bytes": compiled["bound_bytes"]})
  best = min(rejected, key=lambda r: r["compiled_bound_bytes"])
  raise BudgetTooSmall(
      f"budget {format_bytes(budget_bytes)}: {len(fitting)} candidates fit by estimate, but the compiler puts the "
      f"{len(rejected)} cheapest above it (smallest compiled: {format_bytes(best['compiled_bound_bytes'])}). "
      f"A budget of at least {format_bytes(best['compiled_bound_bytes'])} would fit.",
      budget=budget_bytes, smallest=best["compiled_bound_bytes"], dominant=max(best["terms"], key=best["terms"].get))


def _with_reserve(candidate: Candidate, reserve: float) -> int:
  """The smallest budget whose (1 - reserve) share holds the candidate's estimate."""
  budget = math.ceil(candidate.estimate.total / (1.0 - reserve))
  while budget * (1.0 - reserve) < candidate.estimate.total:  # float rounding
    budget += 1
  return budget


def apply(config: ml_collections.ConfigDict, budget_bytes: int) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """`plan` for the devices of this run; returns (config with the plan applied, a JSON-able record).

  wm.train calls this when train.budget is set and stores the record in
  workdir/config.json under "memory_plan".
  """
  result = plan(config, budget_bytes)
  return result.config, result.record()
