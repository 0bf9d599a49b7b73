"""TFDS builders for the datasets `wm` makes itself, prepared without TensorFlow.

Two builders, each with one `BuilderConfig` per parameter set:

- `WmSyntheticTasks`: the tasks of `wm.data.tasks`, one config per task
  parameter set (`synthetic_config`); splits train (data.train_size examples)
  and validation (data.eval_size). Record i of a split is
  `tasks.example(data, split, i)`: shuffling at write time is off.
- `WmTextFiles`: local text, one document per file (or per split of a single
  file), its raw bytes (`text_files_config`): the interpreter's
  standard-library sources (split by a hash of each path) or the files of
  data.text_files, split as `wm.data.corpus.layout` says (by position, by the
  files' names, by explicit per-split patterns, or by path hash); splits
  train, validation and, where the layout gives one, test.

Config names carry a hash of everything that determines the records, so two
parameter sets, file sets or layouts never share a directory, and a change to
the generators (`tasks.GENERATOR_VERSION`) or to the layout rules
(`corpus.LAYOUT_VERSION`) prepares afresh. Prepare with
`builder.download_and_prepare(file_format="array_record")`, read with
`builder.as_data_source()` or `tfds.builder_from_directory(path)`: neither
needs TensorFlow (`tfds.load` and the default tfrecord format do).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from wm.data import corpus, records, tasks

VERSION = "1.0.0"
FILE_FORMAT = "array_record"
# Examples generated, serialized and written per step when preparing a synthetic
# task: large enough that numpy's per-call overhead vanishes, small enough that
# memory stays at tens of MB whatever the split size.
_WRITE_BLOCK = 8192


def _short_hash(payload: Any) -> str:
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


@dataclasses.dataclass(eq=False)
class SyntheticTaskConfig(tfds.core.BuilderConfig):
  """One synthetic task parameter set.

  Attributes:
    params: `tasks.task_params(data)`: the task name and the fields that shape its examples.
    train_size: examples in the train split.
    eval_size: examples in the validation split.
  """
  params: dict[str, Any] = dataclasses.field(default_factory=dict)
  train_size: int = 0
  eval_size: int = 0


def synthetic_config(data: Any) -> SyntheticTaskConfig:
  """The builder config for the synthetic task described by the `data` config section."""
  params = tasks.task_params(data)
  key = {**params, "train_size": data.train_size, "eval_size": data.eval_size,
         "generator_version": tasks.GENERATOR_VERSION}
  name = f"{data.task}-t{data.seq_len}-v{data.vocab_size}-{_short_hash(key)}"
  return SyntheticTaskConfig(name=name, version=VERSION, description=json.dumps(key, sort_keys=True),
                             params=params, train_size=data.train_size, eval_size=data.eval_size)


class WmSyntheticTasks(tfds.core.GeneratorBasedBuilder):
  """Synthetic working-memory tasks (`wm.data.tasks`) as a TFDS dataset."""

  VERSION = tfds.core.Version(VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    t = self.builder_config.params["seq_len"]
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"wm synthetic task {self.builder_config.description}",
        # Raw bytes (encoding="bytes") rather than TFDS's default int64/float
        # lists: every record then has one fixed layout, which `records`
        # serializes a block at a time with numpy, and reading decodes with
        # one np.frombuffer per feature.
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=(t,), dtype=np.int32, encoding="bytes"),
            "targets": tfds.features.Tensor(shape=(t,), dtype=np.int32, encoding="bytes"),
            "weights": tfds.features.Tensor(shape=(t,), dtype=np.float32, encoding="bytes"),
        }),
        # Record i must be example i: the examples are already random, and
        # index order is what makes them reproducible from (split, index).
        disable_shuffling=True,
    )

  def _split_sizes(self) -> dict[str, int]:
    c = self.builder_config
    return {"train": c.train_size, "validation": c.eval_size}

  def _download_and_prepare(self, dl_manager, download_config):
    """Writes each split a block of examples at a time (`wm.data.records`).

    Replaces TFDS's per-example path (`_split_generators` below, which TFDS's
    interface requires and `benchmarks/data_prepare.py --tfds_writer` times
    for comparison): the same records, written 5-10x faster.
    """
    del dl_manager, download_config  # nothing to download
    data = types.SimpleNamespace(**self.builder_config.params)
    features = sorted(self.info.features.keys())  # the order `pipeline` reads them in
    record_bytes = records.serialize(tasks.example_range(data, "train", 0, 1)).shape[1]
    splits = []
    for split, size in self._split_sizes().items():
      blocks = (records.serialize({k: e[k] for k in features})
                for e in (tasks.example_range(data, split, start, min(start + _WRITE_BLOCK, size))
                          for start in range(0, size, _WRITE_BLOCK)))
      splits.append(records.write_split(self, split, size, record_bytes, blocks))
    tasks.clear_cache()  # the last blocks written: tens of MB a training process need not keep
    self.info.set_splits(tfds.core.SplitDict(splits))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split, size) for split, size in self._split_sizes().items()}

  def _generate_examples(self, split: str, size: int):
    data = types.SimpleNamespace(**self.builder_config.params)
    for i in range(size):
      yield i, tasks.example(data, split, i)


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  """A set of text files and how they split (`wm.data.corpus.Layout`).

  Attributes:
    root: folder the paths are relative to.
    pieces: (split, relative path, begin, end, whole file?) of every document, in order.
  """
  root: str = ""
  # Hundreds of pieces for a source tree: left out of repr to keep logs short.
  pieces: tuple[tuple[str, str, int, int, bool], ...] = dataclasses.field(default=(), repr=False)

  def splits(self) -> dict[str, list[corpus.Piece]]:
    out: dict[str, list[corpus.Piece]] = {}
    for split, path, begin, end, whole in self.pieces:
      out.setdefault(split, []).append(corpus.Piece(path, begin, end, whole))
    return out


def corpus_layout(data: Any) -> corpus.Layout:
  """The layout of `data.text_source` "stdlib" or "files"."""
  if data.text_source == "stdlib":
    return corpus.stdlib_layout()
  if data.text_source == "files":
    return corpus.layout(data.text_files)
  raise ValueError(f"data.text_source={data.text_source!r} is not a local source ('stdlib' or 'files')")


def text_files_config(data: Any) -> TextFilesConfig:
  """The builder config for `data.text_source` "stdlib" or "files"."""
  files = corpus_layout(data)
  if data.text_source == "stdlib":
    # Named by the file set alone, as before layouts existed: its split rule never changed.
    name = f"stdlib-{corpus.stdlib_tag()}-{corpus.fingerprint(files.root, sorted(files.sizes))}"
    description = f"standard-library sources under {files.root}"
  else:
    name = f"files-{files.rule}-{corpus.layout_fingerprint(files)}"
    description = (f"{len(files.sizes)} files under {files.root} ({data.text_files}), split by {files.rule}: "
                   f"{files.describe()}")
  pieces = tuple((split, p.path, p.begin, p.end, p.whole) for split, ps in files.splits.items() for p in ps)
  return TextFilesConfig(name=name, version=VERSION, description=description, root=files.root, pieces=pieces)


class WmTextFiles(tfds.core.GeneratorBasedBuilder):
  """Local text as documents: `text` holds a document's bytes, `path` where it comes from.

  A document is a whole file, or for a single file split by position, the
  file's bytes of that split (`path` then reads `name[begin:end]`).
  """

  VERSION = tfds.core.Version(VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"wm text files: {self.builder_config.description}",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        disable_shuffling=True,  # documents in path order; the loader shuffles chunks
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(pieces) for split, pieces in self.builder_config.splits().items()}

  def _generate_examples(self, pieces: list[corpus.Piece]):
    for i, piece in enumerate(pieces):
      with open(os.path.join(self.builder_config.root, piece.path), "rb") as f:
        f.seek(piece.begin)
        # Raw bytes, not str: the tokenizer is byte-level, and some sources
        # are not UTF-8 (a few stdlib modules declare latin-1).
        yield i, {"text": f.read(piece.end - piece.begin), "path": piece.name}


def builder_for(data: Any, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
  """The builder of a local dataset (synthetic task or local text) in `data_dir`."""
  if data.task == "text":
    return WmTextFiles(config=text_files_config(data), data_dir=data_dir, file_format=FILE_FORMAT)
  return WmSyntheticTasks(config=synthetic_config(data), data_dir=data_dir, file_format=FILE_FORMAT)


def local_dataset_path(data: Any, data_dir: str) -> str:
  """Where `builder_for(data, data_dir)` writes: DATA_DIR/BUILDER/CONFIG/VERSION.

  Computed without instantiating a builder, so a missing dataset is reported at once.
  """
  if data.task == "text":
    builder, config = WmTextFiles.name, text_files_config(data).name
  else:
    builder, config = WmSyntheticTasks.name, synthetic_config(data).name
  return os.path.join(data_dir, builder, config, VERSION)


def build(data: Any, data_dir: str) -> str:
  """Prepares the local dataset for `data` in `data_dir`; returns its directory."""
  builder = builder_for(data, data_dir)
  builder.download_and_prepare(
      file_format=FILE_FORMAT,
      # Nothing to fetch; never ask TFDS to look for a copy on GCS.
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return os.fspath(builder.data_path)
