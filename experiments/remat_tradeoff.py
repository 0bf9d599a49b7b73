"""Rematerialization: compiled bytes and step time against sequence length.

Two sweeps over the sequence length T, each a memory/time trade-off:

  transformer  every remat policy (wm.models.remat: none, full, dots,
               dots_no_batch, save:<tags>, offload:<tags>) at T = 256-2048
  lstm         time chunks (remat.time_chunk: none, k = sqrt(T), and fixed
               k = 16 and 64) at T = 256-4096, the chunked time scan of Chen
               et al. 2016 that Gruslys et al. 2016 refine for BPTT

For every (T, variant) the train step (wm.step, the one wm.train runs) is
compiled once: `memory_analysis()` gives temp (the bytes remat changes) and
the DESIGN.md total (argument + output - alias + temp). Then every variant of
the same T runs real steps on the same batch, alternating variants round by
round so that load from other processes falls on all of them alike; the step
time is the median of the timed rounds after one warm-up call. For each LSTM
variant a least-squares line through log(temp) against log(T) gives the
exponent of its growth: sqrt(T) checkpointing should give 0.5 (Chen et al.
2016), no chunking 1. Part of temp does not grow with T at all (the
gradients, the optimizer update), which pulls the fitted exponent of a
sublinear variant below its asymptote; so every point also compiles its
first variant at T = 2 (`floor`: temp with next to no activations), and the
table adds the exponent of temp - floor, the part that grows with T.

The papers' trade-offs, drawn on the frontier figure beside ours:
  Chen et al. 2016: O(sqrt(n)) memory for one extra forward pass (~+33% time
    when the backward costs two forwards);
  Gruslys et al. 2016: at T = 1000, 95% of BPTT's memory saved for +33% time.

    python experiments/remat_tradeoff.py --preset quick          # 2 CPU cores
    python experiments/remat_tradeoff.py --preset quick --plot   # redraw from results/remat_tradeoff/
    python experiments/remat_tradeoff.py --preset full           # a TPU VM / GPU host

Each point of the grid is one (family, T) and measures all of its variants
(that is what lets them alternate); it is a wm.sweep point with
`train.steps=0`, and the measurements happen in `record_extra`, so resume,
`--shard`, `--plot` and `--list` behave as for any experiment.

Presets:
  quick  Transformer d=128, 4 layers, batch 2, T = 256-2048; LSTM d=128,
         2 layers, batch 64, T = 256-4096; byte-level text; 5 timed steps.
         (The LSTM's batch is large enough that activations, not the
         parameter-sized floor, make most of its temp: at batch 4 the floor
         was 3.4x the k=16 activations at T=256 and the raw exponent 0.18.)
  full   Transformer d=1024, 12 layers, batch 8, T = 512-8192; LSTM d=1024,
         2 layers, batch 32, T = 256-8192; bfloat16 compute; 5 timed steps.

Records: results/remat_tradeoff/runs.jsonl, figures remat_vs_length.png/.svg
and remat_frontier.png/.svg, table.md.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

from wm import sweep

CONFIGS = {"transformer": "configs/text_transformer.py:quick", "lstm": "configs/text_lstm.py:quick"}

# Variants measured at every T: (name, remat.policy, remat.time_chunk).
TRANSFORMER_VARIANTS = [
    ("none", "none", 0), ("full", "full", 0), ("dots", "dots", 0), ("dots_no_batch", "dots_no_batch", 0),
    ("save:attn_out,mlp_hidden", "save:attn_out,mlp_hidden", 0),
    ("offload:attn_out,mlp_hidden", "offload:attn_out,mlp_hidden", 0),
]
LSTM_VARIANTS = [("no chunks", "none", 0), ("k=sqrt(T)", "none", -1), ("k=16", "none", 16), ("k=64", "none", 64)]
TIMED_STEPS = 5  # after one warm-up call (which also allocates); the median is reported
FLOOR_LENGTH = 2  # the shortest sequence a config accepts: temp there is what does not grow with T

QUICK = {
    "transformer": dict(d=128, layers=4, heads=4, batch=2, lengths=(256, 512, 1024, 2048)),
    "lstm": dict(d=128, layers=2, batch=64, lengths=(256, 512, 1024, 2048, 4096)),
}
FULL = {
    "transformer": dict(d=1024, layers=12, heads=16, batch=8, lengths=(512, 1024, 2048, 4096, 8192)),
    "lstm": dict(d=1024, layers=2, batch=32, lengths=(256, 512, 1024, 2048, 4096, 8192)),
}


def variants(family: str) -> list[tuple[str, str, int]]:
  return TRANSFORMER_VARIANTS if family == "transformer" else LSTM_VARIANTS


def _points(preset: dict, extra: dict) -> list[sweep.Point]:
  points = []
  for family, s in preset.items():
    model = {"model.d": s["d"], "model.layers": s["layers"]}
    if family == "transformer":
      model.update({"model.heads": s["heads"], "model.kv_heads": s["heads"]})
    for t in s["lengths"]:
      overrides = {**model, "data.seq_len": t, "data.batch_size": s["batch"], "train.steps": 0,
                   "remat.policy": "none", "remat.time_chunk": 0, "train.eval_batches": 1, **extra}
      points.append(sweep.Point(name=f"{family}_T={t}", config=CONFIGS[family], overrides=overrides,
                                labels={"family": family, "seq_len": t}))
  return points


def quick_grid() -> list[sweep.Point]:
  return _points(QUICK, {"mesh.num_devices": 1})


def full_grid() -> list[sweep.Point]:
  return _points(FULL, {"precision.compute_dtype": "bfloat16"})


def _batch(config, setup):
  """One fixed batch of random bytes, the same for every variant of a point."""
  import numpy as np
  from wm import step as step_lib
  rng = np.random.default_rng(0)
  shape = (config.data.batch_size, config.data.seq_len)
  tokens = rng.integers(1, config.data.vocab_size, size=(shape[0], shape[1] + 1)).astype(np.int32)
  local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones(shape, np.float32)}
  return step_lib.global_batch(setup, local)


def measure_variants(config, timed_steps: int = TIMED_STEPS, names: list[str] | None = None) -> dict:
  """Compiles every variant of `config`'s family at its length, then times them alternately.

  Args:
    config: a validated config of the point (family, length, batch).
    timed_steps: steps timed per variant after one warm-up call.
    names: only these variants (default: all of the family's).

  Returns:
    {"variants": [one dict per variant: name, policy, time_chunk, chunk,
    every memory field, flops, compile_seconds, step_times (s), step_time (median)],
    "floor": {seq_len, temp_size_in_bytes, total_bytes} of the first variant at T = FLOOR_LENGTH}.
  """
  import jax
  from wm import config as config_lib, step as step_lib
  from wm.memory import measure
  from wm.models import remat

  runs = []
  for name, policy, chunk in variants(config.model.name):
    if names is not None and name not in names:
      continue
    cfg = config_lib.validate(config_lib.override(config, {"remat.policy": policy, "remat.time_chunk": chunk}))
    start = time.perf_counter()
    exe, setup = measure.compiled_step(cfg)
    compile_seconds = time.perf_counter() - start
    runs.append({"name": name, "policy": policy, "time_chunk": chunk,
                 "chunk": remat.resolve_time_chunk(chunk, cfg.data.seq_len) if cfg.model.name == "lstm" else None,
                 **measure.memory_fields(exe), "flops": measure.flops(exe),
                 "compile_seconds": round(compile_seconds, 2),
                 "_exe": exe, "_state": step_lib.init_state(setup), "_batch": _batch(cfg, setup), "step_times": []})
  # Round-robin: one step of each variant per round, so load from other
  # processes falls on every variant alike. The step donates its state, so
  # each variant carries its own state forward (real steps, real updates).
  for round_ in range(timed_steps + 1):
    for run in runs:
      start = time.perf_counter()
      run["_state"], metrics = run["_exe"](run["_state"], run["_batch"])
      jax.block_until_ready(metrics)
      if round_ > 0:  # round 0 is the warm-up
        run["step_times"].append(time.perf_counter() - start)
  for run in runs:
    run["step_time"] = statistics.median(run["step_times"])
    for key in [k for k in run if k.startswith("_")]:
      del run[key]
  # The T-independent part of temp: the same step at T = 2, where the activations are a few bytes.
  _, policy, _ = variants(config.model.name)[0]
  cfg = config_lib.validate(config_lib.override(config, {"remat.policy": policy, "remat.time_chunk": 0,
                                                         "data.seq_len": FLOOR_LENGTH}))
  fields = measure.memory_fields(measure.compiled_step(cfg)[0])
  floor = {"seq_len": FLOOR_LENGTH, "temp_size_in_bytes": fields["temp_size_in_bytes"],
           "total_bytes": fields["total_bytes"]}
  return {"variants": runs, "floor": floor}


def record_extra(config, result: dict) -> dict:
  del result  # nothing trained (train.steps = 0): the measurements are the point
  return measure_variants(config)


def rows(records: list[dict]) -> list[dict]:
  """One flat row per (family, T, variant), with ratios to the variant without remat at the same T."""
  out = []
  for r in records:
    base = r["variants"][0]  # "none" / "no chunks" comes first
    floor = r.get("floor", {}).get("temp_size_in_bytes")  # records before the floor was measured have none
    for v in r["variants"]:
      out.append({"family": r["family"], "seq_len": r["seq_len"], **v, "floor_temp": floor,
                  "temp_above_floor": None if floor is None else v["temp_size_in_bytes"] - floor,
                  "temp_ratio": v["temp_size_in_bytes"] / base["temp_size_in_bytes"],
                  "total_ratio": v["total_bytes"] / base["total_bytes"],
                  "time_ratio": v["step_time"] / base["step_time"]})
  return out


def fit_exponent(lengths: list[float], values: list[float]) -> float:
  """Slope of the least-squares line through (log T, log value): value ~ T^slope."""
  xs, ys = [math.log(t) for t in lengths], [math.log(v) for v in values]
  mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
  return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def exponents(flat: list[dict], family: str, field: str = "temp_size_in_bytes") -> dict[str, float]:
  """Fitted growth exponent of `field` against T for every variant of `family` (needs >= 2 lengths)."""
  out = {}
  for name in dict.fromkeys(r["name"] for r in flat if r["family"] == family):
    pts = sorted((r["seq_len"], r.get(field)) for r in flat if r["family"] == family and r["name"] == name)
    if len(pts) >= 2 and all(v is not None and v > 0 for _, v in pts):
      out[name] = fit_exponent([t for t, _ in pts], [v for _, v in pts])
  return out


def plot(records: list[dict], out: str, preset: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from wm.config import format_bytes

  flat = rows(records)
  families = [f for f in ("transformer", "lstm") if any(r["family"] == f for r in flat)]
  fig, axes = plt.subplots(2, len(families), figsize=(5.2 * len(families), 7), squeeze=False)
  for col, family in enumerate(families):
    fits = exponents(flat, family)
    for name in dict.fromkeys(r["name"] for r in flat if r["family"] == family):
      pts = sorted((r for r in flat if r["family"] == family and r["name"] == name), key=lambda r: r["seq_len"])
      t = [r["seq_len"] for r in pts]
      label = f"{name} (T^{fits[name]:.2f})" if name in fits else name
      axes[0][col].plot(t, [r["temp_size_in_bytes"] / 2**20 for r in pts], marker="o", label=label)
      axes[1][col].plot(t, [r["step_time"] * 1e3 for r in pts], marker="o", label=name)
    floors = {r["floor_temp"] for r in flat if r["family"] == family and r["floor_temp"] is not None}
    if len(floors) == 1:  # one model per family: the same floor at every T
      axes[0][col].axhline(floors.pop() / 2**20, color="gray", ls="--", lw=0.8,
                           label=f"temp at T={FLOOR_LENGTH} (does not grow with T)")
    title = "Transformer: remat policy" if family == "transformer" else "LSTM: time chunk k"
    axes[0][col].set_title(f"{title}; compiled temp", fontsize=9)
    axes[1][col].set_title(f"{title}; step time (median)", fontsize=9)
    axes[0][col].set_ylabel("temp bytes (MiB)")
    axes[1][col].set_ylabel("step time (ms)")
    for ax in axes[:, col]:
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("sequence length T")
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=6)
  fig.suptitle(f"Remat against sequence length ({preset}; {records[0]['backend']}, jax {records[0]['jax_version']})",
               fontsize=10)
  fig.tight_layout()
  sweep.save_figure(fig, out, "remat_vs_length")

  # Frontier: memory and time relative to no remat, at each family's longest T.
  fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
  for ax, family in zip(axes[0], families):
    fam = [r for r in flat if r["family"] == family]
    longest = max(r["seq_len"] for r in fam)
    for i, r in enumerate(r for r in fam if r["seq_len"] == longest):
      ax.scatter(r["time_ratio"], r["temp_ratio"], marker="os^vDP"[i % 6], s=40, label=r["name"])
    if family == "lstm":
      # Chen et al.: with k = sqrt(T), T/k saved carries + k steps of residuals,
      # ~2 sqrt(T) of the T steps BPTT keeps, for one extra forward (~4/3 time).
      ax.scatter([4 / 3], [2 / math.sqrt(longest)], marker="*", s=120, color="black",
                 label=f"Chen et al. 2016 (ideal, T={longest})")
      ax.scatter([4 / 3], [0.05], marker="X", s=80, color="dimgray", label="Gruslys et al. 2016 (T=1000)")
    ax.axvline(1.0, color="gray", lw=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("step time / step time without remat")
    ax.set_ylabel("compiled temp / temp without remat (log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6)
    ax.set_title(f"{'Transformer policies' if family == 'transformer' else 'LSTM time chunks'} at T={longest}",
                 fontsize=9)
  fig.suptitle(f"Memory/time frontier ({preset})", fontsize=10)
  fig.tight_layout()
  sweep.save_figure(fig, out, "remat_frontier")

  header = ["family", "T", "variant", "temp", "total", "temp / none", "step time", "time / none", "compile s"]
  table = []
  for r in sorted(flat, key=lambda r: (families.index(r["family"]), r["seq_len"])):
    table.append([r["family"], r["seq_len"], r["name"] + (f" (k={r['chunk']})" if r.get("chunk") else ""),
                  format_bytes(r["temp_size_in_bytes"]), format_bytes(r["total_bytes"]), f"{r['temp_ratio']:.3f}",
                  f"{r['step_time'] * 1e3:.1f} ms", f"{r['time_ratio']:.2f}", f"{r['compile_seconds']:.1f}"])
  fits = []
  for family in families:
    above = exponents(flat, family, "temp_above_floor")
    for name, slope in exponents(flat, family).items():
      total = exponents(flat, family, "total_bytes")[name]
      fit = f"{family} {name}: temp ~ T^{slope:.3f}, total ~ T^{total:.3f}"
      if name in above:
        fit += f", temp - temp at T={FLOOR_LENGTH} ~ T^{above[name]:.3f}"
      fits.append(fit)
  m = records[0]["model"]
  note = ("Fitted exponents (least squares of log bytes against log T over the lengths above):\n\n"
          + "\n".join(f"- {f}" for f in fits)
          + f"\n\ntemp: memory_analysis().temp_size_in_bytes of the compiled train step; total: argument + output - "
            f"alias + temp (DESIGN.md). Step time: median of {TIMED_STEPS} steps after a warm-up, variants "
            f"alternating on the same batch. {records[0]['backend']} ({records[0]['device_kind']}), jax "
            f"{records[0]['jax_version']}; first record's model d={m['d']}, layers={m['layers']}.")
  floors = sorted({(r["family"], r["floor_temp"]) for r in flat if r["floor_temp"] is not None})
  if floors:
    note += ("\n\nTemp of the same step at T=" + str(FLOOR_LENGTH) + " without remat (what does not grow with T: "
             "gradients, optimizer update): " + ", ".join(f"{f} {format_bytes(b)}" for f, b in floors) + ".")
  print(sweep.write_table(out, header, table, align="lrlrrrrrr", note=note))


def main(argv=None) -> int:
  return sweep.main("remat_tradeoff", {"quick": quick_grid, "full": full_grid}, plot, description=__doc__,
                    record_extra=record_extra, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
