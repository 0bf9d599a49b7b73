"""Every memory-saving technique of wm against one baseline: bytes and quality side by side.

    python experiments/techniques.py --preset quick          # 2 CPU cores
    python experiments/techniques.py --preset quick --plot   # redraw table.md and the figure from the records
    python experiments/techniques.py --preset full --shard $I/$N   # accelerators

Baseline: the byte-level text Transformer (configs/text_transformer.py:quick
for quick, configs/text_transformer.py for full), float32, AdamW. Each row
changes one lever (or two, the combinations) and is scored on the same fixed
validation sample (train.eval_batches batches drawn with a fixed seed):

  trained like the baseline: quantization-aware training (also scored with
    int8 weights), 8-bit Adam, magnitude pruning to 50% and 2:4 (the 2:4 model
    also scored with int8 weights: the "2:4 + int8 weights" combination),
    cross-layer sharing, 8-bit Adam + sharing;
  evaluations of the baseline's trained parameters (train.init_from the
    baseline's workdir, train.steps = 0): int8 weights (post-training), the
    KV cache in bfloat16 / int8 (a float32 scale per cached row) / int8 with
    static scales (calibrated once per model on quant.calibration_batches
    train batches; the scales' bytes are shown apart, per model) /
    float8_e4m3fn, int8 weights + int8 cache, int8 weights + static int8 cache;
  a fine-tune of the baseline: LoRA r = 8 (only the adapters train).

Generation-state rows are scored through the decode path (wm.generate:
teacher-forced, token by token, with the cache stored in the row's dtype)
next to the same scoring with a float32 cache; every row's forward-pass
evaluation is recorded too. An MQAR section (configs/mqar_transformer.py)
does the same for the baseline, an int8 KV cache (per-row and static
scales) and int8 weights, with accuracy for quality.

Per record, besides what wm.sweep records (parameter count, train-step bytes:
analytic estimate and compiled memory_analysis, tokens/s, eval metrics):
`serving` (parameter bytes as stored for the row, int8 values and scales
counted, generation-state bytes per sequence at data.seq_len, and
`state_constant`, the bytes held once per model beside the state, i.e. the
static int8 scales: wm.memory.estimate.serving_bytes), `argument_bytes` (the compiled step's
arguments by part, wm.memory.measure.argument_bytes: its `opt_state` is the
optimizer state), `decoded` / `decoded_float32` (evaluation through the decode
path), and for pruned rows `export` (prune.export_sparse's bytes of the
float weights; `export_int8` for the int8 codes, plus their scales).

Presets:
  quick  text 300 steps (pruned from step 50 to 200 every 50, then 100 steps
         to recover), LoRA 100 steps from the baseline, MQAR 600 steps; the
         committed records' wall times (training only, `wall_seconds`) add up
         to 18 minutes on 2 shared CPU cores, plus each point's compile and
         measurements.
  full   the configs' own sizes and steps (text: 20k steps, d=384, T=512),
         pruned from 2k to 14k every 1k steps, LoRA 2k steps.

Records: results/techniques/runs.jsonl (one line per point), table.md,
techniques.png/.svg.
"""

from __future__ import annotations

import math
import sys

from wm import sweep

# spm_seq_len: the text baseline's T (128 quick, 512 full) times the 0.41 tokens per byte that spm:1024 gives
# the stdlib corpus (docs/data.md), so a subword sequence covers about the bytes of a byte-level one.
SETTINGS = {
    "quick": dict(text="configs/text_transformer.py:quick", mqar="configs/mqar_transformer.py:quick", steps=300,
                  mqar_steps=600, prune=(50, 200, 50), lora_steps=100, spm_seq_len=53, extra={"mesh.num_devices": 1}),
    "full": dict(text="configs/text_transformer.py", mqar="configs/mqar_transformer.py", steps=20_000,
                 mqar_steps=20_000, prune=(2_000, 14_000, 1_000), lora_steps=2_000, spm_seq_len=210, extra={}),
}

# The baseline's workdir, where evaluation rows and the LoRA fine-tune read its parameters (wm.sweep.with_out).
FROM_TEXT = "{out}/runs/baseline"
FROM_MQAR = "{out}/runs/mqar_baseline"
KV_LABELS = {"int8_static": "KV cache int8 (static scales)"}


def _rows(s: dict) -> list[tuple[str, str, str, dict]]:
  """(section, name, technique, overrides) of every row, the baseline of each section first."""
  start, end, every = s["prune"]
  prune = {"prune.sparsity": 0.5, "prune.start_step": start, "prune.end_step": end, "prune.every": every}
  evaluate = {"train.steps": 0}

  def from_text(**overrides):
    return {"train.init_from": FROM_TEXT, **evaluate, **overrides}

  return [
      # quant.state = float32 (the compute dtype, so nothing changes in training): the baseline is also scored
      # through the decode path, the reference of the cache rows.
      ("text", "baseline", "baseline (float32, AdamW)", {"quant.state": "float32"}),
      ("text", "int8_weights", "int8 weights (post-training)", from_text(**{"quant.weights": "int8"})),
      ("text", "qat_int8", "quantization-aware training", {"quant.qat": "int8", "quant.weights": "int8"}),
      ("text", "adamw8bit", "8-bit Adam", {"optim.name": "adamw8bit"}),
      ("text", "prune_50", "magnitude pruning 50%", {"prune.method": "magnitude", **prune}),
      ("text", "prune_2of4", "2:4 pruning", {"prune.method": "2:4", "quant.weights": "int8", **prune}),
      ("text", "share_layers_2", "cross-layer sharing (2 layers, 1 set)", {"model.share_layers": 2}),
      ("text", "lora_r8", "LoRA r=8 fine-tune of the baseline",
       {"train.init_from": FROM_TEXT, "model.lora_rank": 8, "train.steps": s["lora_steps"],
        "optim.warmup_steps": max(s["lora_steps"] // 10, 1)}),
      *(("text", f"kv_{kind}", KV_LABELS.get(kind, f"KV cache {kind}"), from_text(**{"quant.state": kind}))
        for kind in ("bfloat16", "int8", "int8_static", "float8_e4m3fn")),
      ("text", "adamw8bit+share_layers_2", "8-bit Adam + sharing", {"optim.name": "adamw8bit",
                                                                     "model.share_layers": 2}),
      ("text", "int8_weights+kv_int8", "int8 weights + int8 KV cache",
       from_text(**{"quant.weights": "int8", "quant.state": "int8"})),
      ("text", "int8_weights+kv_int8_static", "int8 weights + int8 static KV",
       from_text(**{"quant.weights": "int8", "quant.state": "int8_static"})),
      # Subword tokens with each sequence covering about the baseline's bytes of text, so the row trains on
      # as many bytes and its sequence length (activations, KV cache) shrinks by the tokens per byte.
      ("text", "spm_1024", "subword tokens (SentencePiece BPE, 1024)",
       {"data.tokenizer": "spm:1024", "data.seq_len": s["spm_seq_len"]}),
      ("mqar", "mqar_baseline", "baseline (float32, AdamW)", {"quant.state": "float32"}),
      ("mqar", "mqar_kv_int8", "KV cache int8", {"train.init_from": FROM_MQAR, **evaluate, "quant.state": "int8"}),
      ("mqar", "mqar_kv_int8_static", KV_LABELS["int8_static"],
       {"train.init_from": FROM_MQAR, **evaluate, "quant.state": "int8_static"}),
      ("mqar", "mqar_int8_weights", "int8 weights (post-training)",
       {"train.init_from": FROM_MQAR, **evaluate, "quant.weights": "int8"}),
  ]


def _grid(preset: str) -> list[sweep.Point]:
  s = SETTINGS[preset]
  points = []
  for section, name, technique, overrides in _rows(s):
    steps = s["steps"] if section == "text" else s["mqar_steps"]
    common = {"train.steps": steps, "train.eval_every": steps, "train.checkpoint_every": steps,
              "train.log_every": max(steps // 12, 1), **s["extra"]}
    points.append(sweep.Point(name=name, config=s[section], overrides={**common, **overrides},
                              labels={"section": section, "technique": technique}))
  return points


def quick_grid() -> list[sweep.Point]:
  return _grid("quick")


def full_grid() -> list[sweep.Point]:
  return _grid("full")


# ---------------------------------------------------------------------------
# Measurements after training

def _int8_sparse_bytes(params, masks, pruning, weight_axes) -> int:
  """Bytes of the pruned model with int8 weights: the int8 codes exported sparse (as export_sparse does the
  float weights), plus every float32 scale."""
  import jax
  from wm.compress import prune, quant

  def is_q(x):
    return isinstance(x, quant.QArray)

  quantized = quant.quantize_params(params, weight_axes)
  codes = jax.tree.map(lambda x: x.values if is_q(x) else x, quantized, is_leaf=is_q)
  scales = sum(x.scale.nbytes for x in jax.tree.leaves(quantized, is_leaf=is_q) if is_q(x))
  return int(prune.export_sparse(codes, masks, pruning)["bytes"] + scales)


def record_extra(config, result: dict) -> dict:
  """Stored bytes, the step's arguments by part, the evaluation of eval-only rows, decode-path scores, exports."""
  from wm import config as config_lib, evaluation, generate, step as step_lib
  from wm.compress import prune
  from wm.memory import estimate, measure

  state = result["state"]
  setup = step_lib.make_setup(config)
  extra = {"serving": estimate.serving_bytes(config), "argument_bytes": measure.argument_bytes(setup)}
  if config.quant.weights == "int8":  # the same model's float parameters, for its float-weight line
    extra["param_bytes_float"] = estimate.serving_bytes(config_lib.override(config, {"quant.weights": "none"}))["params"]
  if config.train.steps == 0:  # train_and_evaluate trains and scores nothing at 0 steps: score the parameters
    extra["eval"] = evaluation.evaluate(config, setup, state, step_lib.make_eval_step(setup))
  if config.quant.state:  # the row sets the generation state: score it where it is used, in decoding
    extra["decoded"] = generate.evaluate_decoded(config, state)
    if config.quant.state != "float32":
      extra["decoded_float32"] = generate.evaluate_decoded(config, state, "float32")
  found = prune.find_state(state["opt_state"])
  if found is not None:
    pruning = prune.Pruning.from_config(config.prune, setup.weight_axes)
    export = prune.export_sparse(state["params"], found.masks, pruning)
    extra["export"] = {k: export[k] for k in ("bytes", "dense_bytes", "ratio")}
    if config.quant.weights == "int8":
      extra["export_int8"] = {"bytes": _int8_sparse_bytes(state["params"], found.masks, pruning,
                                                          setup.weight_axes)}
  return extra


# ---------------------------------------------------------------------------
# Table and figure, from records alone

def _bits(ev: dict, key: str = "nll") -> float | None:
  """Bits per byte of an eval dict's `key` (nats per token), by the bytes per token its bits_per_byte implies."""
  if key not in ev or not ev.get("bits_per_byte"):
    return None
  return ev[key] / ev["nll"] * ev["bits_per_byte"] if ev["nll"] else ev[key] / math.log(2)


def lines(record: dict) -> list[dict]:
  """The table lines of one record: {technique, params, quality, how}; a record may give two (float and int8)."""
  ev, name, serving = record["eval"], record["name"], record["serving"]
  text = record["section"] == "text"
  metric = _bits if text else (lambda e, k="nll": e.get(k.replace("nll", "accuracy")))
  dense = serving["params"]
  if "export" in record:
    dense = record["export"]["bytes"]
  out = []
  if "decoded" in record and name not in ("baseline", "mqar_baseline"):
    key = "int8_nll" if record["overrides"].get("quant.weights") == "int8" else "nll"
    reference = record["decoded_float32"]
    out.append({"technique": record["technique"], "params": serving["params"],
                "quality": metric(record["decoded"], key), "vs_f32_cache": metric(reference, key),
                "how": "decode path"})
    return out
  if record["overrides"].get("quant.weights") == "int8" and "int8_nll" in ev:
    if record["overrides"].get("train.steps") != 0:  # a trained row: its own float weights (else the baseline's)
      float_bytes = dense if "export" in record else record["param_bytes_float"]
      out.append({"technique": f"{record['technique']}, float weights", "params": float_bytes,
                  "quality": metric(ev), "how": "forward"})
    int8_bytes = record["export_int8"]["bytes"] if "export_int8" in record else serving["params"]
    label = {"prune_2of4": "2:4 pruning + int8 weights", "qat_int8": "QAT, int8 weights"}.get(
        name, record["technique"])
    out.append({"technique": label, "params": int8_bytes, "quality": metric(ev, "int8_nll"), "how": "forward"})
    return out
  out.append({"technique": record["technique"], "params": dense, "quality": metric(ev), "how": "forward"})
  if "decoded" in record:  # the baseline's own decode-path score: must equal its forward score
    out.append({"technique": "baseline, scored through the decode path (float32 cache)", "params": dense,
                "quality": metric(record["decoded"]), "how": "decode path"})
  return out


def _mib(n) -> str:
  return "" if n is None else f"{n / 2**20:.3f}"


def _kib(n) -> str:
  return "" if n is None else f"{n / 2**10:.1f}"


def _state_kib(serving: dict) -> str:
  """Generation state per sequence, and the bytes held once per model beside it (static int8 scales)."""
  constant = serving.get("state_constant", 0)
  return _kib(serving["state"]) + (f" + {_kib(constant)} per model" if constant else "")


def _ratio(x, base) -> str:
  return "" if x is None or not base else f"{x / base:.3f}"


def table_rows(records: list[dict], section: str) -> tuple[list[list], list[dict]]:
  """Markdown rows of one section and the lines behind them (for the figure)."""
  recs = [r for r in records if r.get("section") == section and not r.get("infeasible")]
  base = next((r for r in recs if r["name"].endswith("baseline")), None)
  if base is None:
    return [], []
  base_line = lines(base)[0]
  base_opt = base["argument_bytes"]["opt_state"]
  rows, shown = [], []
  for r in recs:
    trained = r["overrides"].get("train.steps", 1) != 0
    opt = r["argument_bytes"]["opt_state"]
    for line in lines(r):
      q = line["quality"]
      quality = "" if q is None else f"{q:.4f}"
      if "vs_f32_cache" in line and line["vs_f32_cache"] is not None:
        quality += f" (f32 cache {line['vs_f32_cache']:.4f})"
      sparsity = r["eval"].get("sparsity")
      technique = line["technique"] + (f" (sparsity {sparsity:.3f})" if sparsity is not None else "")
      per_byte = r["eval"].get("tokens_per_byte")
      if per_byte is not None and abs(per_byte - 1) > 1e-9:  # subword rows: their shorter sequences
        technique += f" ({per_byte:.3f} tokens/byte, T={r['overrides'].get('data.seq_len')})"
      rows.append([technique, _mib(line["params"]), _ratio(line["params"], base_line["params"]),
                   _mib(r["estimate_bytes"]), _mib(r["compiled_bytes"]),
                   f"{_mib(r['estimate_terms']['optimizer'])} / {_mib(opt)}", _ratio(opt, base_opt),
                   _state_kib(r["serving"]), _ratio(r["serving"]["state"], base["serving"]["state"]),
                   f"{r['tokens_per_s']:.0f}" if trained and r.get("tokens_per_s") else "(eval)",
                   quality + f" [{line['how']}]", _ratio(q, base_line["quality"])])
      shown.append({**line, "name": r["name"], "params_ratio": line["params"] / base_line["params"],
                    "quality_ratio": None if q is None or not base_line["quality"] else q / base_line["quality"]})
  return rows, shown


def plot(records: list[dict], out: str, preset: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  header = ["technique", "params MiB (as stored)", "x base", "train step MiB: estimate", "compiled",
            "optimizer state MiB: estimate / compiled", "x base", "generation state KiB / seq", "x base",
            "train tokens/s", "quality", "x base"]
  text_rows, text_lines = table_rows(records, "text")
  mqar_rows, mqar_lines = table_rows(records, "mqar")
  blank = [""] * (len(header) - 1)
  rows = text_rows + ([["**MQAR** (quality = accuracy)", *blank]] + mqar_rows if mqar_rows else [])
  first = records[0]
  note = (f"Quality: text = validation bits/byte (lower is better), MQAR = accuracy, on the same fixed validation "
          f"sample for every row; [forward] = the model's forward pass, [decode path] = teacher-forced token by "
          f"token through the generation state (wm.generate.decode_metrics), with the float32-cache score of the "
          f"same weights in parentheses. Params as stored: float32, int8 values + float32 scales, or the pruned "
          f"export (prune.export_sparse). Train step = analytic estimate (wm.memory.estimate) and the compiled "
          f"step's memory_analysis (argument + output - alias + temp); optimizer state: the estimate's term and "
          f"the compiled step's opt_state argument (wm.memory.measure.argument_bytes). Generation state at "
          f"data.seq_len per sequence (its x base compares that); \"+ N per model\": the static int8 scales, "
          f"float32 per layer, k/v, kv head and channel, held once however many sequences decode, calibrated "
          f"on quant.calibration_batches train batches. (eval) rows train nothing: they score the baseline's "
          f"parameters. "
          f"jax {first.get('jax_version')}, {first.get('backend')} ({first.get('device_kind')}), preset {preset}.")
  print(sweep.write_table(out, header, rows, align="lrrrrrrrrrlr", note=note))

  fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * max(len(text_lines) + len(mqar_lines), 6) + 1.2))
  shown = text_lines + mqar_lines
  labels = [("MQAR: " if line["name"].startswith("mqar") else "") + line["technique"] for line in shown]
  y = list(range(len(shown)))[::-1]
  axes[0].barh(y, [line["params_ratio"] for line in shown], color="tab:blue")
  axes[0].set_xlabel("parameter bytes as stored / baseline")
  # Points, not bars: the ratios sit within a few percent of 1, and a bar's length from 0 would hide that.
  scored = [(yi, line["quality_ratio"]) for yi, line in zip(y, shown) if line["quality_ratio"] is not None]
  axes[1].plot([q for _, q in scored], [yi for yi, _ in scored], "o", color="tab:orange")
  axes[1].set_ylim(axes[0].get_ylim())
  axes[1].set_xlabel("quality / baseline (text: bits/byte, lower is better; MQAR: accuracy)")
  axes[1].axvline(1.0, color="k", lw=0.8)
  axes[0].set_yticks(y, labels, fontsize=7)
  axes[1].set_yticks(y, [""] * len(y))
  for ax in axes:
    ax.grid(axis="x", alpha=0.3)
  fig.suptitle(f"Memory-saving techniques against one baseline ({preset})", fontsize=9)
  fig.tight_layout()
  sweep.save_figure(fig, out, "techniques")


def main(argv=None) -> int:
  return sweep.main("techniques", {"quick": quick_grid, "full": full_grid}, plot, description=__doc__,
                    record_extra=record_extra, argv=argv)


if __name__ == "__main__":
  sys.exit(main())
