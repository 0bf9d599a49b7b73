"""From a config to batches: prepare the dataset, then a sharded, resumable grain iterator.

    prepare(config)                       build local datasets that are missing
    make_iterator(config, split, ...)     per-process batches {inputs, targets, weights}
    examples(config, split), read_rows    random access, a list of rows read at once

Datasets by `config.data`:

- a synthetic task (`wm.data.tasks`) or a local text source ("stdlib", "files"):
  TFDS datasets `wm` builds itself (`wm.data.builders`), built by `prepare`
  when missing: nothing to download, seconds on 2 cores (100k MQAR examples,
  the stdlib corpus). Local files split as `wm.data.corpus.layout` says; a
  layout with a test split (a single file, files named for their splits,
  test=PATTERNS) gives `make_iterator(config, "test", ...)`.
- `data.text_source` naming a registered TFDS dataset ("lm1b",
  "tiny_shakespeare", "NAME/CONFIG", optionally ":VERSION"): read from
  `data_dir` where someone prepared it, never downloaded (offline, a TFDS
  download hangs for minutes before failing).

Text is packed into byte sequences (`wm.data.text.PackedSequences`), or with
`data.tokenizer = "spm:N"` into subword token sequences
(`wm.data.subword.TokenSequences`): `prepare` trains the SentencePiece model on
the train split and writes every split's token stream beside the dataset.

Every missing dataset raises `DatasetNotPrepared` with the command that fixes
it, after looking at the file system only: nothing reaches TFDS until the
prepared `dataset_info.json` is known to exist.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from wm.config import ConfigError
from wm.data import builders, corpus, records, subword, text

_INFO = "dataset_info.json"
# What a model reads of a batch; examples may carry more (subword text: target_bytes, for evaluation).
BATCH_KEYS = ("inputs", "targets", "weights")


class DatasetNotPrepared(FileNotFoundError):
  """The config's dataset is not in its data_dir; the message says how to prepare it."""


def data_dir(config: ml_collections.ConfigDict) -> str:
  """data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  chosen = config.data.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(chosen))


def _is_local(data: Any) -> bool:
  return data.task != "text" or data.text_source in ("stdlib", "files")


def _describe(data: Any) -> str:
  if data.task != "text":
    return f"synthetic task {data.task!r}"
  if data.text_source == "files":
    return f"text files {data.text_files!r}"
  return f"text source {data.text_source!r}"


def _version_key(name: str) -> tuple[int, ...] | None:
  return tuple(int(x) for x in name.split(".")) if re.fullmatch(r"\d+\.\d+\.\d+", name) else None


def _registered_path(name: str, root: str) -> str:
  """DIR/NAME[/CONFIG]/VERSION of a registered dataset (highest version unless NAME:VERSION).

  Raises:
    DatasetNotPrepared: nothing prepared there, with how to fix it.
  """
  base, _, version = name.partition(":")
  folder = os.path.join(root, *base.split("/"))
  if version:
    candidates = [version]
  else:
    entries = os.listdir(folder) if os.path.isdir(folder) else []
    candidates = sorted((v for v in entries if _version_key(v)), key=_version_key, reverse=True)
  for v in candidates:
    if os.path.exists(os.path.join(folder, v, _INFO)):
      return os.path.join(folder, v)
  hint = ""
  if os.path.isdir(folder) and not candidates:
    configs = sorted(e for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)))
    if configs:
      hint = f" {folder} holds configs {configs}: name one, as data.text_source={base}/{configs[0]}."
  raise DatasetNotPrepared(
      f"TFDS dataset {name!r} is not prepared in data_dir {root} "
      f"(no {os.path.join(folder, version or '<version>', _INFO)}).{hint} wm never downloads datasets. "
      f"Prepare it on a machine with internet access and copy the {base.split('/')[0]}/ folder into {root}: "
      f"`tfds build {base} --data_dir {root} --file_format=array_record` (building most registered "
      f"datasets needs TensorFlow; only array_record can be read without it), or point data.data_dir "
      f"(or $TFDS_DATA_DIR) at a directory that already has it.")


def dataset_path(config: ml_collections.ConfigDict) -> str:
  """The prepared dataset's directory (the one holding dataset_info.json), whether or not it exists yet.

  Raises:
    DatasetNotPrepared: for a registered dataset that is not there.
  """
  root = data_dir(config)
  if _is_local(config.data):
    return builders.local_dataset_path(config.data, root)
  return _registered_path(config.data.text_source, root)


def _not_prepared(config: ml_collections.ConfigDict, missing: str) -> DatasetNotPrepared:
  return DatasetNotPrepared(
      f"{_describe(config.data)} is not prepared in data_dir {data_dir(config)} (no {missing}). "
      f"Prepare it with `python -m wm prepare --config <your config> [the same --config.* overrides]`, "
      f"or call wm.data.pipeline.prepare(config); it is built locally, with no download.")


def _check_readable(path: str) -> None:
  """Data sources need array_record files; a dataset built with TensorFlow defaults to tfrecord."""
  with open(os.path.join(path, _INFO)) as f:
    info = json.load(f)
  formats = [info.get("fileFormat", "tfrecord"), *info.get("alternativeFileFormats", [])]
  if "array_record" not in formats:
    raise DatasetNotPrepared(
        f"{path} is prepared as {formats[0]}, which needs TensorFlow to read; wm reads array_record. "
        f"Convert it where TensorFlow is installed: `tfds convert_format --dataset_version_dir={path} "
        f"--out_file_format=array_record`, or rebuild it with --file_format=array_record.")


def _check_text_fits(config: ml_collections.ConfigDict) -> None:
  """Every split of a local corpus holds at least one example of data.seq_len tokens."""
  files = builders.corpus_layout(config.data)
  for split, pieces in files.splits.items():
    corpus.check_fits(split, files.bytes(split) + len(pieces), config.data.seq_len, _describe(config.data))


def prepare(config: ml_collections.ConfigDict, allow_build: bool = True) -> None:
  """Makes sure the config's dataset is prepared in its data_dir.

  Local datasets (synthetic tasks, local text files) are built when missing; in
  a multi-process run process 0 builds first, so processes sharing a data_dir
  never write it at once, and the others then build only if their own
  data_dir still lacks it. Registered TFDS datasets are checked, never fetched.

  Args:
    config: a validated config.
    allow_build: when False, a missing local dataset raises instead of being built.

  Raises:
    DatasetNotPrepared: a registered dataset is missing (or a local one with allow_build=False).
    wm.data.corpus.CorpusError: data.text_files matches nothing, or a split is
      empty or shorter than one example.
  """
  path = dataset_path(config)  # raises for a missing registered dataset
  local = _is_local(config.data)
  if not local:
    _check_readable(path)
  elif config.data.task == "text":
    _check_text_fits(config)  # bytes bound tokens from above: a split too short in bytes is too short in tokens
  tokenizer = subword.parse(config.data.tokenizer)
  if not local and tokenizer is None:
    return

  def build_if_missing():
    if local and not os.path.exists(os.path.join(path, _INFO)):
      if not allow_build:
        raise _not_prepared(config, os.path.join(path, _INFO))
      builders.build(config.data, data_dir(config))
    if tokenizer is not None:
      _tokenize(config, tokenizer, allow_build)

  if jax.process_count() == 1:
    build_if_missing()
    return
  from jax.experimental import multihost_utils
  if jax.process_index() == 0:
    build_if_missing()
  multihost_utils.sync_global_devices("wm.data.prepare: process 0 built")
  if jax.process_index() != 0:
    build_if_missing()
  multihost_utils.sync_global_devices("wm.data.prepare: all built")


def tokens_folder(config: ml_collections.ConfigDict) -> str:
  """Where the subword model and token streams of `data.tokenizer = "spm:N"` live: beside the dataset."""
  return os.path.join(dataset_path(config), subword.parse(config.data.tokenizer).dirname())


def _tokenize(config: ml_collections.ConfigDict, tokenizer: subword.Spec, allow_build: bool) -> dict[str, Any]:
  """Trains the subword model on the train split and tokenizes every split, unless already done."""
  folder = tokens_folder(config)
  if not os.path.exists(os.path.join(folder, "info.json")) and not allow_build:
    raise _not_prepared(config, os.path.join(folder, "info.json"))
  with open(os.path.join(dataset_path(config), _INFO)) as f:
    names = [s["name"] for s in json.load(f).get("splits", [])]
  splits = {name: functools.partial(_documents, config, name) for name in sorted(names, key=_split_order)}
  return subword.prepare(folder, tokenizer, splits, _describe(config.data))


def _split_order(name: str) -> tuple[int, str]:
  return (corpus.SPLITS.index(name) if name in corpus.SPLITS else len(corpus.SPLITS), name)


def _source(config: ml_collections.ConfigDict, split: str):
  """The split's records as a random-access source (TFDS array_record)."""
  path = dataset_path(config)
  if not os.path.exists(os.path.join(path, _INFO)):
    raise _not_prepared(config, os.path.join(path, _INFO))
  _check_readable(path)
  builder = tfds.builder_from_directory(path, file_format="array_record")
  if split not in builder.info.splits:
    hint = (" (local text has a test split when data.text_files is one file, files named for their splits, "
            "or has a test=PATTERNS group)" if split == "test" and config.data.task == "text" else "")
    raise ValueError(f"{path} has no split {split!r}; it has {sorted(builder.info.splits.keys())}{hint}")
  return builder.as_data_source(split=split), path


class _Feature:
  """One feature of every record of a TFDS source, e.g. the text of each document."""

  def __init__(self, source: Any, feature: str):
    self.source, self.feature = source, feature

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> Any:
    return self.source[index][self.feature]

  def __getitems__(self, indices: list[int]) -> list[Any]:
    return [record[self.feature] for record in self.source.__getitems__(indices)]


def _lengths(documents: _Feature, path: str, split: str) -> np.ndarray:
  """Byte length of every document, cached beside the dataset.

  Packing needs them all up front, and reading a large corpus (lm1b: 30M
  sentences) takes minutes, so they are computed once and saved. A read-only
  dataset directory just means computing them each time.
  """
  cache = os.path.join(path, f"wm-document-lengths-{split}-{documents.feature}.npy")
  if os.path.exists(cache):
    lengths = np.load(cache)
    if len(lengths) == len(documents):
      return lengths
  lengths = text.document_lengths(documents)
  try:
    tmp = f"{cache}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      np.save(f, lengths)
    os.replace(tmp, cache)  # atomic: processes sharing the directory never read half a file
  except OSError:
    pass
  return lengths


def _fast_records(source: Any) -> records.FixedRecords | None:
  """The split's records decoded with numpy, when they have the layout `records.serialize` writes."""
  raw = getattr(source, "data_source", None)  # the array_record source under TFDS's decoding
  features = source.dataset_info.features
  specs = {}
  for k in sorted(features.keys()):  # the builder writes them in name order
    f = features[k]
    if not isinstance(f, tfds.features.Tensor):
      return None
    specs[k] = (f.np_dtype, f.shape)
  return records.FixedRecords.open(raw, specs) if raw is not None else None


def examples(config: ml_collections.ConfigDict, split: str) -> Any:
  """Random-access examples of `split` in the batch format (before batching).

  Raises:
    DatasetNotPrepared: the dataset is not in its data_dir.
    wm.data.corpus.CorpusError: a text split is shorter than one example.
  """
  data = config.data
  if data.task == "text" and data.tokenizer != "bytes":
    return _token_sequences(config, split)
  source, path = _source(config, split)
  if data.task != "text":
    return _fast_records(source) or source
  documents = _documents(config, split, source)
  packed = text.PackedSequences(documents, data.seq_len, _lengths(documents, path, split))
  if not len(packed):
    corpus.check_fits(split, int(packed.starts[-1]), data.seq_len, _describe(data))
  return packed


def _documents(config: ml_collections.ConfigDict, split: str, source: Any = None) -> _Feature:
  """The text of every document of a split, random access."""
  data = config.data
  source = _source(config, split)[0] if source is None else source
  feature = "text" if _is_local(data) else data.text_feature
  features = list(source.dataset_info.features.keys())
  if feature not in features:
    raise ValueError(f"data.text_feature={feature!r} is not a feature of {data.text_source}; it has {features}")
  return _Feature(source, feature)


def _token_sequences(config: ml_collections.ConfigDict, split: str) -> subword.TokenSequences:
  """The examples of a subword-tokenized split, from the streams `prepare` wrote beside the dataset."""
  folder = tokens_folder(config)
  if not os.path.exists(os.path.join(folder, "info.json")):
    raise _not_prepared(config, os.path.join(folder, "info.json"))
  info = subword.read_info(folder, subword.parse(config.data.tokenizer))
  if split not in info["splits"]:
    raise ValueError(f"{folder} has no split {split!r}; it has {sorted(info['splits'])}")
  sequences = subword.TokenSequences(os.path.join(folder, f"{split}.tokens.npy"), config.data.seq_len,
                                     subword.load_tokenizer(folder).token_bytes)
  if not len(sequences):
    tokens = info["splits"][split]["tokens"]
    raise corpus.CorpusError(
        f"{_describe(config.data)}: the {split} split is {tokens:,} tokens of {config.data.tokenizer} (its documents "
        f"and a separator after each), shorter than one example: data.seq_len={config.data.seq_len} needs "
        f"{config.data.seq_len + 1:,}. Lower data.seq_len or give the {split} split more text.")
  return sequences


class _ReadBatch:
  """Reads the examples at a batch of indices in one call and stacks them.

  Indices at or past len(source) are padding: weight-0 zero examples, so a
  last partial batch can be filled. One `__getitems__` call per batch, where
  the source has it: array_record reads a list of records in about 8 us each
  but a single record in about 370 us (measured on this 2-core machine, one
  call per record through the same reader), so reading record by record made
  the loader, not the model, the cost of a small train step.
  """

  def __init__(self, source: Any, keys: tuple[str, ...] | None = None):
    self.source, self.keys = source, keys

  @functools.cached_property
  def pad(self) -> dict[str, np.ndarray]:
    return {k: np.zeros_like(v) for k, v in self.source[0].items()}

  def _read(self, keys: list[int]) -> dict[str, np.ndarray]:
    read_batch = getattr(self.source, "read_batch", None)
    if read_batch is not None:  # records.FixedRecords: the whole batch decoded at once
      return read_batch(keys)
    getitems = getattr(self.source, "__getitems__", None)
    rows = getitems(keys) if getitems else [self.source[i] for i in keys]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    wanted = np.asarray(indices)
    real = wanted < len(self.source)
    if real.all():
      out = self._read(wanted.tolist())
    else:
      out = {k: np.zeros((len(wanted), *v.shape), v.dtype) for k, v in self.pad.items()}
      if real.any():
        got = self._read(wanted[real].tolist())
        for k in out:
          out[k][real] = got[k]
    return out if self.keys is None else {k: out[k] for k in self.keys}


def read_rows(source: Any, indices: Any) -> dict[str, np.ndarray]:
  """The examples of `source` (from `examples`) at `indices`, stacked, read in one call where it can.

  Indices at or past len(source) give weight-0 zero rows (padding). Reading a
  list at once is what makes array_record fast (see `_ReadBatch`); use this
  rather than `source[i]` row by row.
  """
  return _ReadBatch(source)(np.asarray(indices, np.int64))


def make_iterator(config: ml_collections.ConfigDict, split: str, *, shuffle: bool, num_epochs: int | None,
                  seed: int | None = None, drop_remainder: bool = True,
                  process_index: int | None = None, process_count: int | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator over this process's batches of `split`.

  The split (cut to a multiple of process_count, so every process yields the
  same number of batches) is shuffled globally; each process then takes the
  positions equal to process_index mod process_count and yields batches of
  data.batch_size // process_count examples: dicts of numpy `inputs`,
  `targets` (int32[b, t]) and `weights` (float32[b, t]). The order is a
  function of (seed, process_index, process_count) alone; the union of the
  processes' batches at any step does not depend on process_count, and
  `iterator.get_state()` / `set_state()` resume it exactly (checkpoints save
  it with grain's Orbax handler, `grain.checkpoint.CheckpointSave`: wm.resume).

  Args:
    config: a validated config.
    split: "train", "validation", or "test" where the dataset has one.
    shuffle: reshuffle every epoch, seeded by `seed` (default config.seed).
    num_epochs: passes over the split; None repeats forever.
    seed: shuffle seed overriding config.seed.
    drop_remainder: drop the last partial batch; if False it is filled with
      weight-0 padding examples instead, so one epoch scores every example
      exactly once.
    process_index: this process's shard (default jax.process_index()); tests
      set it to simulate several hosts.
    process_count: number of shards (default jax.process_count()).

  Raises:
    DatasetNotPrepared: the dataset is not in its data_dir.
  """
  source = examples(config, split)  # first: a missing dataset fails before JAX starts its backend
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  batch = config.data.batch_size // count
  if batch < 1 or config.data.batch_size % count:
    raise ValueError(f"data.batch_size={config.data.batch_size} must be a positive multiple of the "
                     f"{count} processes")
  if drop_remainder:
    usable = len(source) - len(source) % count
    if usable < batch * count:  # no full batch: an epoch would be empty, and repeating it spin forever
      raise ConfigError(
          f"config.data.batch_size: the {split} split of {_describe(config.data)} has {len(source)} examples, "
          f"fewer than one batch of {config.data.batch_size}; lower data.batch_size, or give the split more "
          f"data (data.train_size/eval_size, or more text)")
  else:
    usable = math.ceil(len(source) / (batch * count)) * batch * count  # the tail filled with padding
  # Shuffle, repeat, shard and batch the *indices*, then read each batch's
  # examples at once (`_ReadBatch`). Shuffling is by index, so the order is
  # the one a dataset of the examples themselves would have.
  ds = grain.MapDataset.range(usable)
  if shuffle:
    ds = ds.shuffle(seed=config.seed if seed is None else seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)  # a new order each epoch
  # Shard after the global shuffle: process p takes every count-th element, so
  # the processes' local batches s together are exactly global batch s of a
  # one-process run, whatever the number of processes.
  ds = ds[index::count]
  ds = ds.batch(batch, drop_remainder=True).map(_ReadBatch(source, BATCH_KEYS))
  # Elements here are whole batches: a small prefetch buffer bounds host memory
  # for large batches; a few threads overlap reading with the train step.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))
  if config.data.worker_count > 0:
    # grain's worker processes read absl flags, which a non-absl program never parses.
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.worker_count))
  return iter(ds)


def bytes_per_token(config: ml_collections.ConfigDict) -> float | None:
  """UTF-8 bytes per token, to turn nats per token into bits per byte; None for synthetic tasks.

  1 for byte-level text. For subword text, the train split's bytes over its
  tokens (a prepared split's mean): exact for the split as a whole, an
  estimate for any part of it. Evaluation counts the bytes of the tokens it
  scores instead (`target_bytes`), which is exact.
  """
  if config.data.task != "text":
    return None
  if config.data.tokenizer == "bytes":
    return 1.0
  train = subword.read_info(tokens_folder(config), subword.parse(config.data.tokenizer))["splits"]["train"]
  return train["bytes"] / train["tokens"]
