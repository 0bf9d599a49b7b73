"""`python -m wm memory`: the estimate beside the compiler's figure, and a plan for a budget.

    python -m wm memory --config configs/text_transformer.py [--budget 2GiB] [--devices N] [--json]
    python -m wm memory --config configs/text_transformer.py --budget 16GiB --target v5e:4x4   (needs libtpu)

Prints, per device, each term of the analytic estimate (wm.memory.estimate)
beside the compiled step's memory_analysis() (wm.memory.measure), and with
--budget the planner's choice (wm.memory.plan), its margin and the runners-up.
--json prints one object with the schema documented in docs/memory.md
(`"schema": "wm.memory/1"`). With a target (`collect(..., target="v5e:4x4")`)
the estimate uses that backend's calibration table and the compiles are the
target compiler's (wm.memory.aot.target_mesh).
"""

from __future__ import annotations

import json
import linecache
import math
import os
import re
import sys
from typing import Any

import jax
import ml_collections

from wm import config as config_lib
from wm.config import format_bytes
from wm.memory import estimate as estimate_lib
from wm.memory import measure, plan as plan_lib

SCHEMA = "wm.memory/1"
CPU_PEAK_NOTE = "the CPU backend keeps no allocator statistics (memory_stats() is None); the compiled figure stands in"


def _summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
  m = config.model
  return {"model": m.name, "layers": m.layers, "d": m.d, "vocab_size": config.data.vocab_size,
          "batch_size": config.data.batch_size, "seq_len": config.data.seq_len,
          "remat_policy": config.remat.policy, "time_chunk": config.remat.time_chunk,
          "microbatches": config.optim.microbatches, "optimizer": config.optim.name,
          "param_dtype": config.precision.param_dtype, "compute_dtype": config.precision.compute_dtype,
          "mesh": {a: config.mesh[a] for a in ("data", "fsdp", "tensor")}}


def _device_peak() -> tuple[int | None, str]:
  peak = measure.device_peak_bytes()
  if peak is None:
    return None, CPU_PEAK_NOTE if jax.default_backend() == "cpu" else "not reported by this backend"
  return peak, "memory_stats()['peak_bytes_in_use'] of the first local device (this process so far)"


def collect(config: ml_collections.ConfigDict, budget: str | int | None = None, *,
            target: str | None = None, explain_top: int = 0) -> dict[str, Any]:
  """Everything `main` prints, as the documented JSON object (raises BudgetTooSmall).

  Args:
    config: a validated config.
    budget: per-device budget ("16GiB" or bytes) to plan for, or None.
    target: None (this host) or a compile target such as "v5e:4x4": the
      estimate uses that backend's calibration, the plan is confirmed and the
      config compiled by that compiler, over its chips.
    explain_top: with N > 0, adds "explain": the N largest buffers of the
      compiled step with the module, line and checkpoint_name tag that make
      them (`explain`).
  """
  from wm.memory import aot
  backend, target_devices = aot.target_backend(target)
  if target is not None and target_devices:
    config = config_lib.override(config, {"mesh.num_devices": target_devices})
  est = estimate_lib.estimate(config, backend=backend)
  planned = None
  if budget is not None:  # first: an impossible budget fails before anything compiles
    planned = plan_lib.plan(config, config_lib.parse_bytes(budget), est.num_devices, target=target).record()
  mesh = aot.target_mesh(config, target)[0] if target is not None else None
  buffers = None
  if explain_top:
    import time
    start = time.perf_counter()
    exe, setup = measure.compiled_step(config, mesh)
    compiled = measure.record(exe, setup, time.perf_counter() - start)
    buffers = explain(exe.as_text(), explain_top)
  else:
    compiled = measure.compiled(config, mesh)
  if target is not None:
    compiled["target"] = target
  peak, note = _device_peak()
  out: dict[str, Any] = {
      "schema": SCHEMA,
      "config": _summary(config),
      "estimate": est.as_dict(),
      "compiled": compiled,
      "relative_error": (est.total - compiled["bound_bytes"]) / compiled["bound_bytes"],
      "device_peak_bytes": peak,
      "device_peak_note": note,
      "plan": planned,
  }
  if buffers is not None:
    out["explain"] = buffers
  return out


# ---------------------------------------------------------------------------
# --explain: what holds the bytes
# ---------------------------------------------------------------------------

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
# Instructions that name another buffer rather than own one.
_VIEWS = {"bitcast", "get-tuple-element", "tuple", "reshape", "broadcast", "constant", "iota", "after-all",
          "partition-id", "replica-id", "copy-done", "opt-barrier"}
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\](?:\{[^}]*\})? ([\w-]+)\(.*?stack_frame_id=(\d+)")
_TAG = re.compile(r"""(?:_tag|checkpoint_name)\(.*["'](\w+)["']\)""")


def _frames(text: str) -> tuple[dict[int, tuple[str, str, int]], dict[int, tuple[int, int]]]:
  """The HLO text's stack-frame tables: location id -> (file, function, line), frame id -> (location, parent)."""
  section, files, funcs, locs, frames = None, {}, {}, {}, {}
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
      continue
    m = re.match(r"^(\d+) (.*)$", line)
    if not section or not m:
      if line.startswith("HloModule") or line.startswith("%") or line.startswith("ENTRY"):
        section = None
      continue
    key, rest = int(m.group(1)), m.group(2)
    if section == "FileNames":
      files[key] = rest.strip('"')
    elif section == "FunctionNames":
      funcs[key] = rest.strip('"')
    elif section == "FileLocations":
      f = dict(re.findall(r"(\w+)=(\d+)", rest))
      locs[key] = (files.get(int(f["file_name_id"]), "?"), funcs.get(int(f["function_name_id"]), "?"), int(f["line"]))
    elif section == "StackFrames":
      f = dict(re.findall(r"(\w+)=(\d+)", rest))
      frames[key] = (int(f["file_location_id"]), int(f.get("parent_frame_id", 0)))
  return locs, frames


def _model_frame(frame: int, locs, frames) -> tuple[str, str, int] | None:
  """The innermost stack frame in wm/models (else in wm/), as (file, function, line)."""
  chain, seen = [], set()
  while frame in frames and frame not in seen:
    seen.add(frame)
    loc, parent = frames[frame]
    if loc in locs:
      chain.append(locs[loc])
    frame = parent
  for want in (f"{os.sep}wm{os.sep}models{os.sep}", f"{os.sep}wm{os.sep}"):
    for f in chain:
      if want in f[0]:
        return f
  return chain[0] if chain else None


def explain(hlo_text: str, top: int = 15) -> list[dict[str, Any]]:
  """The largest buffers the compiled step defines, with the model code that makes them.

  Reads the optimized HLO (`compiled.as_text()`): every instruction that owns
  its output (not a view, tuple or constant) is a buffer of that shape; its
  `stack_frame_id` leads to the Python frames that traced it, the innermost
  one in wm/models names the module and line, and a `checkpoint_name` tag on
  that line (`_tag(x, "attn_out")`) names the tensor. A buffer inside a loop
  body (the layer scan, a time scan) is one iteration's; a buffer of the
  entry computation with a leading layers axis is what the scan stacks for
  the backward pass. Same shape from the same line counts once.
  """
  locs, frames = _frames(hlo_text)
  # Computations whose instructions are not buffers of their own: fusion bodies
  # and the reducers/wrappers applied elementwise (their output is the caller's).
  inner = set(re.findall(r" fusion\(.*?calls=%([\w.-]+)", hlo_text))
  inner |= {name for line in hlo_text.splitlines() if " call(" not in line
            for name in re.findall(r"to_apply=%([\w.-]+)", line)}
  computation, out, seen = "?", [], set()
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY ") or (line.startswith("%") and line.rstrip().endswith("{")):
      computation = "entry" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
      continue
    m = _INSTR.match(line) if computation not in inner else None
    if not m:
      continue
    name, dtype, dims, opcode, frame = m.groups()
    if opcode in _VIEWS or dtype not in _ITEMSIZE:
      continue
    shape = [int(x) for x in dims.split(",") if x]
    size = math.prod(shape) * _ITEMSIZE[dtype]
    where = _model_frame(int(frame), locs, frames)
    source = code = tag = module = None
    if where:
      path, func, lineno = where
      code = linecache.getline(path, lineno).strip()
      found = _TAG.search(code)
      tag = found.group(1) if found else None
      module = func.split(".")[0]
      marker = f"{os.sep}wm{os.sep}"
      rel = "wm/" + path.split(marker, 1)[1] if marker in path else os.path.basename(path)
      source = f"{rel}:{lineno} {func}"
    key = (dtype, dims, source)
    if key in seen:
      continue
    seen.add(key)
    out.append({"bytes": size, "shape": f"{dtype}[{dims}]", "opcode": opcode, "instruction": name,
                "computation": computation, "module": module, "tag": tag, "source": source, "code": code})
  out.sort(key=lambda r: -r["bytes"])
  return out[:top]


def explain_table(rows: list[dict[str, Any]]) -> str:
  lines = ["largest buffers of the compiled step (per device; loop bodies: one iteration):",
           f"  {'bytes':>11}  {'shape':<24} {'tag':<13} {'module':<16} source"]
  for r in rows:
    lines.append(f"  {format_bytes(r['bytes']):>11}  {r['shape']:<24} {r['tag'] or '-':<13} {r['module'] or '-':<16} "
                 f"{r['source'] or r['instruction']}  [{r['computation'][:28]}]")
  return "\n".join(lines)


def _row(name: str, est: float | None, comp: float | None, note: str = "") -> str:
  e = format_bytes(est) if est is not None else "-"
  c = format_bytes(comp) if comp is not None else "-"
  return f"  {name:<28} {e:>12} {c:>12}  {note}"


def table(data: dict[str, Any]) -> str:
  """The human-readable report."""
  cfg, est, comp = data["config"], data["estimate"], data["compiled"]
  lines = [f"{cfg['model']}: {cfg['layers']} layers, d={cfg['d']}, batch {cfg['batch_size']} x {cfg['seq_len']}, "
           f"remat {cfg['remat_policy']}, microbatches {cfg['microbatches']}, time_chunk {cfg['time_chunk']}, "
           f"{cfg['optimizer']}, {cfg['param_dtype']}/{cfg['compute_dtype']}",
           f"per device, {est['num_devices']} device(s), mesh {est['mesh']}, compiled on {comp['backend']} "
           f"({comp['device_kind']}); estimate peak phase: {est['phase']}",
           "",
           f"  {'term':<28} {'estimate':>12} {'compiler':>12}"]
  for term in estimate_lib.TERMS:
    lines.append(_row(term, est[term], None))
  args_est = est["params"] + est["optimizer"] + est["inputs"]
  temp_est = est["grads"] + est["activations"] + est["transient"]
  lines += [
      "  " + "-" * 56,
      _row("state + batch (arguments)", args_est, comp["argument_size_in_bytes"], "params + optimizer + inputs"),
      _row("temp", temp_est, comp["temp_size_in_bytes"], "grads + activations + transient"),
      _row("output - alias", None, comp["output_size_in_bytes"] - comp["alias_size_in_bytes"],
           "metrics (state is donated)"),
      _row("total (arg + out - alias + temp)", None, comp["total_bytes"]),
      _row(f"bound ({comp['bound_field']})", est["total"], comp["bound_bytes"],
           f"estimate {100 * data['relative_error']:+.1f}%"),
      "",
      _row("host (offloaded)", est.get("host", 0), comp.get("host_temp_size_in_bytes"),
           "offload:<tags> on TPU/GPU; not in the device total"),
      "",
      "  compiler fields: " + ", ".join(f"{k.replace('_in_bytes', '')}={v}" for k, v in comp.items()
                                         if k.endswith("_in_bytes") and v is not None),
      f"  flops per device per step: {comp['flops']:.4g}" if comp.get("flops") else "  flops: not reported",
      f"  device peak: {format_bytes(data['device_peak_bytes'])}" if data["device_peak_bytes"] is not None
      else f"  device peak: absent ({data['device_peak_note']})",
  ]
  p = data.get("plan")
  if p:
    ch = p["chosen"]
    compiled_total = p["compiled_bound_bytes"]
    lines += ["", f"plan for a budget of {format_bytes(p['budget_bytes'])} per device "
                  f"({p['fitting']} of {p['considered']} candidates fit by estimate):",
              f"  chosen: remat {ch['remat_policy']}, microbatches {ch['microbatches']}, time_chunk {ch['time_chunk']}, "
              f"mesh {ch['mesh']}" + "".join(f", {k} {v}" for k, v in (ch.get("levers") or {}).items()),
              f"  estimate {format_bytes(ch['estimate_bytes'])}, compiled "
              + (format_bytes(compiled_total) if compiled_total is not None else f"- ({p['confirm_note']})")
              + f", margin {format_bytes(p['margin_bytes'])}"]
    for r in p["rejected_by_compile"]:
      lines.append(f"  rejected by the compiler: remat {r['remat_policy']}, microbatches {r['microbatches']} "
                   f"({format_bytes(r['compiled_bound_bytes'])})")
    if p["runners_up"]:
      lines.append("  runners-up (by cost):")
      lines.append(f"    {'remat':<20} {'micro':>5} {'chunk':>5} {'data':>4} {'fsdp':>4} {'estimate':>12} {'cost':>10}")
      for r in p["runners_up"]:
        lines.append(f"    {r['remat_policy']:<20} {r['microbatches']:>5} {r['time_chunk']:>5} {r['mesh']['data']:>4} "
                     f"{r['mesh']['fsdp']:>4} {format_bytes(r['estimate_bytes']):>12} {r['cost'] / ch['cost']:>9.2f}x")
  return "\n".join(lines)


def main(config: ml_collections.ConfigDict, budget: str | None = None, as_json: bool = False, *,
         target: str | None = None, explain_top: int = 0) -> int:
  """`python -m wm memory`; returns an exit code (1 when the budget cannot be met, 2 on a bad target)."""
  try:
    data = collect(config, budget, target=target, explain_top=explain_top)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except plan_lib.BudgetTooSmall as e:
    if as_json:
      print(json.dumps({"schema": SCHEMA, "error": "budget_too_small", "message": str(e),
                        "budget_bytes": e.budget, "smallest_budget_bytes": e.smallest,
                        "dominant_term": e.dominant}, indent=2))
    print(f"error: {e}", file=sys.stderr)
    return 1
  text = table(data) + ("\n\n" + explain_table(data["explain"]) if data.get("explain") and not as_json else "")
  print(json.dumps(data, indent=2, default=str) if as_json else text)
  return 0
