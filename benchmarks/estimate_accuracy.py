"""Out-of-sample accuracy of the estimate against a compiler, per backend.

    python benchmarks/estimate_accuracy.py --backend cpu [--count 48] [--out results/calibration/accuracy_cpu.md]
    python benchmarks/estimate_accuracy.py --backend tpu --targets v5e:2x4     (needs libtpu)
    python benchmarks/estimate_accuracy.py --backend gpu --targets h100:8     (needs JAX's CUDA plugin, wm.memory.aot)

A held-out matrix, disjoint from benchmarks/calibrate.py's fitting set (widths
48-384 and depths 3 and 5, which the fitting set never uses; checked by
`calibrate.assert_disjoint`), the model families in turn (3/8 Transformer,
1/4 LSTM, 1/8 each of vae, mixture, vrnn), covering grouped-query heads, MLP
ratios 2 and 3, sliding windows, bfloat16 compute and parameters, 8-device
meshes (data, fsdp, tensor and their mixes), microbatches, every optimizer
and chunked attention. Every config's train step is compiled for the target and its
`bound_bytes` (the figure that bounds device memory there, see
docs/memory.md) is held against `wm.memory.estimate` with that backend's
calibration table. Compiled records are kept in
results/calibration/<backend>_heldout.jsonl (a rerun only compiles what is
missing, and re-estimates everything with the current tables).

Prints, overall and per family: median and maximum |relative error|, the
share of under-estimates and the worst one.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import calibrate  # noqa: E402  (sets up JAX and sys.path like the fitting run)

from wm.memory import estimate as estimate_lib  # noqa: E402

HELD_WIDTHS = (48, 96, 192, 384)
HELD_LAYERS = (3, 5)


# (devices, data, fsdp, tensor): one device, and 8 devices over every axis and their mixes.
HELD_MESHES = [(1, 1, 1, 1)] * 3 + [(8, 8, 1, 1), (8, 1, 8, 1), (8, 2, 4, 1), (8, 1, 4, 2), (8, 2, 2, 2), (8, 4, 1, 2)]


def held_out(count: int, seed: int = 1) -> list[dict]:
  """`count` configs, the families of calibrate.FAMILIES in turn (3/8 Transformer, 1/4 LSTM, 1/8 each latent)."""
  rng = random.Random(seed)
  out, seen = [], set()
  while len(out) < count:
    o = calibrate.sample(rng, widths=HELD_WIDTHS, layers=HELD_LAYERS, lengths=(48, 96, 160, 320),
                         meshes=HELD_MESHES, mlp_ratios=(2, 3), gqa=True, windows=(0, 0, 16, 40), micro=(1, 2, 4),
                         chunked_share=0.25, family=calibrate.FAMILIES[len(out) % len(calibrate.FAMILIES)])
    if o["model.d"] >= 384:
      o["data.seq_len"] = min(o["data.seq_len"], 160)
    key = json.dumps(o, sort_keys=True)
    if not calibrate.valid(o):
      continue
    if key not in seen:
      seen.add(key)
      out.append(o)
  calibrate.assert_disjoint(out)
  return out


def errors(records: list[dict], backend: str) -> list[tuple[dict, float]]:
  out = []
  for r in records:
    config = calibrate.make_config(r["overrides"])
    est = estimate_lib.estimate(config, r["num_devices"], backend=backend).total
    out.append((r, (est - r["bound_bytes"]) / r["bound_bytes"]))
  return out


def summarize(rows: list[tuple[dict, float]]) -> str:
  def line(name, errs):
    under = [e for e in errs if e < 0]
    return (f"| {name} | {len(errs)} | {100 * statistics.median(abs(e) for e in errs):.1f}% | "
            f"{100 * max(abs(e) for e in errs):.1f}% | {100 * len(under) / len(errs):.0f}% | "
            f"{(100 * min(under)) if under else 0:+.1f}% |")
  lines = ["| configs | n | median abs error | max abs error | under-estimates | worst under-estimate |",
           "|---|---:|---:|---:|---:|---:|", line("all", [e for _, e in rows])]
  groups: dict[str, list[float]] = {}
  for r, e in rows:
    o = r["overrides"]
    groups.setdefault(o["model.name"], []).append(e)
    groups.setdefault(f"compute {o.get('precision.compute_dtype', 'float32')}", []).append(e)
    groups.setdefault(f"{o['mesh.num_devices']} device(s)", []).append(e)
    if o.get("model.attention") == "chunked":
      groups.setdefault("chunked attention", []).append(e)
  lines += [line(k, v) for k, v in sorted(groups.items())]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--backend", choices=("cpu", "tpu", "gpu"), required=True)
  parser.add_argument("--targets", nargs="+", default=None)
  parser.add_argument("--count", type=int, default=48)
  parser.add_argument("--out", default="")
  parser.add_argument("--no-compile", action="store_true",
                      help="report on the records already saved, compile nothing (e.g. after a refit)")
  args = parser.parse_args()
  targets = args.targets or {"cpu": ["cpu"], "tpu": ["v5e:2x4"], "gpu": ["h100:8"]}[args.backend]
  path = calibrate.RESULTS / f"{args.backend}_heldout.jsonl"
  if args.no_compile:
    records = [json.loads(line) for line in path.read_text().splitlines()]
  else:
    records = calibrate.run(path, held_out(args.count), targets)
  rows = errors(records, args.backend)
  worst = sorted(rows, key=lambda x: x[1])[:3]
  text = (f"{args.backend} ({', '.join(targets)}), estimate with the '{args.backend}' table, against bound_bytes:\n\n"
          + summarize(rows) + "\n\nlargest under-estimates:\n"
          + "\n".join(f"  {100 * e:+.1f}%  {json.dumps(r['overrides'], sort_keys=True)}" for r, e in worst))
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
  main()
