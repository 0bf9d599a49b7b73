"""Preparing synthetic task data: seconds per task, generation and the whole prepare.

    python benchmarks/data_prepare.py [--examples 100000] [--tfds_writer] [--out results/data_prepare.md]

(from a checkout other than the installed one: PYTHONPATH=. python benchmarks/...)

For every synthetic task (`wm.data.tasks.TASKS`, at the sizes of the quick
configs and, for MQAR, also Zoology's T=256, V=8192, 16 pairs), in a fresh
temporary data_dir:

- generate: `tasks.example_range` over the train split alone (numpy, a block of
  1024 examples per call);
- prepare: `wm.data.pipeline.prepare(config)`, what `python -m wm prepare`
  runs after its imports: generation, serialization and array_record writes
  of the train split (--examples) and a 1,000-example validation split.

With --tfds_writer, the same dataset is also written through TFDS's generic
per-example path (`GeneratorBasedBuilder._download_and_prepare`, the path wm
used before `wm.data.records`; same records), for comparison. Prints a
Markdown table (and writes it to --out). Times are wall-clock seconds of one
run: on a shared machine, run it twice.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tensorflow_datasets as tfds  # noqa: E402

from wm import config as config_lib  # noqa: E402
from wm.data import builders, pipeline, tasks  # noqa: E402

# (label, task, data fields): the quick configs' sizes, and MQAR at Zoology's.
CASES = [
    ("mqar (quick)", "mqar", dict(seq_len=64, vocab_size=64, num_kv_pairs=4)),
    ("mqar (Zoology)", "mqar", dict(seq_len=256, vocab_size=8192, num_kv_pairs=16)),
    ("copy", "copy", dict(seq_len=64, vocab_size=64, copy_len=16)),
    ("selective_copy", "selective_copy", dict(seq_len=256, vocab_size=64, copy_len=16)),
    ("nback", "nback", dict(seq_len=64, vocab_size=64, nback=4)),
    ("induction", "induction", dict(seq_len=64, vocab_size=64)),
]


def make_config(task: str, fields: dict, examples: int, data_dir: str):
  c = config_lib.base_config()
  c.data.task = task
  c.data.update(fields)
  c.data.train_size = examples
  c.data.eval_size = 1000
  c.data.data_dir = data_dir
  return config_lib.validate(c)


def tfds_writer_seconds(config) -> float:
  """Prepares the same dataset through TFDS's per-example writer; returns seconds."""
  with tempfile.TemporaryDirectory() as data_dir:
    builder = builders.builder_for(config.data, data_dir)
    os.makedirs(builder.data_path)  # download_and_prepare would make it (as a temporary directory)
    start = time.perf_counter()
    tfds.core.GeneratorBasedBuilder._download_and_prepare(  # the generic path our builder overrides
        builder, dl_manager=None, download_config=tfds.download.DownloadConfig())
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--examples", type=int, default=100_000, help="train examples per task")
  parser.add_argument("--tfds_writer", action="store_true", help="also time TFDS's per-example writer")
  parser.add_argument("--out", help="also write the table to this Markdown file")
  args = parser.parse_args(argv)

  header = "| task | seq_len | vocab | examples | generate s | prepare s | examples/s |"
  rule = "|---|---|---|---|---|---|---|"
  if args.tfds_writer:
    header, rule = header + " TFDS writer s |", rule + "---|"
  lines = [header, rule]
  print("\n".join(lines), flush=True)
  for label, task, fields in CASES:
    with tempfile.TemporaryDirectory() as data_dir:
      config = make_config(task, fields, args.examples, data_dir)
      tasks.clear_cache()
      start = time.perf_counter()
      tasks.example_range(config.data, "train", 0, args.examples)
      generate = time.perf_counter() - start
      tasks.clear_cache()
      start = time.perf_counter()
      pipeline.prepare(config)
      prepare = time.perf_counter() - start
    total = args.examples + config.data.eval_size
    line = (f"| {label} | {config.data.seq_len} | {config.data.vocab_size} | {total:,} | {generate:.2f} | "
            f"{prepare:.2f} | {total / prepare:,.0f} |")
    if args.tfds_writer:
      tasks.clear_cache()
      line += f" {tfds_writer_seconds(config):.2f} |"
    lines.append(line)
    print(line, flush=True)
  machine = f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), python {platform.python_version()}"
  lines += ["", f"Machine: {machine}. generate: the train split alone; prepare: train + validation, written."]
  print(lines[-1])
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
