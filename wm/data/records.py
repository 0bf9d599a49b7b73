"""Blocks of fixed-shape examples as TFDS records, serialized and written with numpy.

A TFDS array_record dataset stores each example as a serialized
`tf.train.Example`. Through TFDS's own writer that costs about 80 us an
example in Python (feature encoding, one protobuf message per example,
hashing keys): 4.3 s of the 10 s that preparing 50k MQAR examples took on
2 cores. When every feature is a fixed-length byte string (a
`tfds.features.Tensor(..., encoding="bytes")` of static shape), every record
has the same layout: fixed header bytes, then the feature's raw bytes, for
each feature. `serialize` builds a block of records as rows of one uint8
array, headers broadcast beside the data, and `write_split` hands them to
array_record with TFDS's file names, shard sizes and split metadata, so
`tfds.builder_from_directory(...).as_data_source()` reads them like any
TFDS dataset (tests/test_data.py checks our bytes parse to the same proto
as TFDS's serializer gives).

The wire format (protobuf encoding, https://protobuf.dev/programming-guides/encoding/):

    Example   = field 1 (features):   Features
    Features  = field 1 (repeated map entry, one per feature): key = 1 (name), value = 2 (Feature)
    Feature   = field 1 (bytes_list): BytesList
    BytesList = field 1 (value):      the raw bytes

each field a tag byte (field << 3 | 2, length-delimited), the varint length,
then the payload.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import numpy as np
from array_record.python import array_record_module
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming
from tensorflow_datasets.core.utils import shard_utils

# One record per chunk, so any record is read on its own, as TFDS's own
# array_record adapter writes (file_adapters.ArrayRecordFileAdapter), but
# snappy-compressed rather than zstd (the default): measured on 50k MQAR
# records (T=64, 833 bytes each) on 2 loaded cores, zstd wrote in 1.31 s to
# 14.4 MB, snappy in 0.46 s to 17.8 MB, uncompressed in 0.45 s to 44.5 MB; at
# T=256 (3,137 bytes) 2.74 s / 44.5 MB, 0.66 s / 67 MB and 1.93 s / 160 MB.
# Readers need no option: the compression is recorded in the file.
WRITER_OPTIONS = "group_size:1,snappy"


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, length: int) -> bytes:
  """Tag and length of a length-delimited field whose payload (length bytes) follows."""
  return bytes([number << 3 | 2]) + _varint(length)


def _headers(sizes: Mapping[str, int]) -> tuple[bytes, list[bytes]]:
  """(record prefix, per-feature header): record = prefix + header_k + data_k for each k."""
  headers = []
  for name, size in sizes.items():
    key = name.encode()
    bytes_list = len(_field(1, size)) + size
    feature = len(_field(1, bytes_list)) + bytes_list
    entry = len(_field(1, len(key))) + len(key) + len(_field(2, feature)) + feature
    headers.append(_field(1, entry) + _field(1, len(key)) + key + _field(2, feature)
                   + _field(1, bytes_list) + _field(1, size))
  features_len = sum(len(h) + s for h, s in zip(headers, sizes.values()))
  return _field(1, features_len), headers


def serialize(block: Mapping[str, np.ndarray]) -> np.ndarray:
  """Serialized `tf.train.Example` of each row: uint8[n, record_bytes].

  Args:
    block: feature name -> array with a leading axis of n examples; each
      feature is stored as the raw bytes of its row (TFDS `encoding="bytes"`),
      in the array's own dtype, in the order of the mapping.
  """
  rows = {k: np.ascontiguousarray(v).reshape(len(v), -1).view(np.uint8) for k, v in block.items()}
  n = {len(v) for v in rows.values()}
  if len(n) != 1:
    raise ValueError(f"features have different numbers of examples: { {k: len(v) for k, v in rows.items()} }")
  n = n.pop()
  prefix, headers = _headers({k: v.shape[1] for k, v in rows.items()})
  parts = [np.broadcast_to(np.frombuffer(prefix, np.uint8), (n, len(prefix)))]
  for header, data in zip(headers, rows.values()):
    parts += [np.broadcast_to(np.frombuffer(header, np.uint8), (n, len(header))), data]
  return np.concatenate(parts, axis=1)


def write_split(builder: tfds.core.DatasetBuilder, split: str, num_examples: int, record_bytes: int,
                blocks: Iterable[np.ndarray]) -> tfds.core.SplitInfo:
  """Writes a split of fixed-size records into the builder's files; returns its SplitInfo.

  Args:
    builder: the builder being prepared (its `data_path` is the temporary
      directory TFDS renames when preparation succeeds).
    split: split name.
    num_examples: records in the split.
    record_bytes: bytes of every record.
    blocks: uint8[n_i, record_bytes] arrays from `serialize`, num_examples rows in all.
  """
  total = num_examples * record_bytes
  shards = shard_utils.ShardConfig().get_number_shards(total, num_examples)
  bounds = shard_utils.get_shard_boundaries(num_examples, shards)  # end of each shard
  template = naming.ShardedFileTemplate(
      split=split, dataset_name=builder.name, data_dir=builder.data_path,
      filetype_suffix=tfds.core.FileFormat.ARRAY_RECORD.file_suffix)
  paths = template.sharded_filepaths(len(bounds))
  writers = iter(array_record_module.ArrayRecordWriter(os.fspath(p), WRITER_OPTIONS) for p in paths)
  writer, shard, written = next(writers, None), 0, 0
  for block in blocks:
    for record in block:  # a row of a C-contiguous array: tobytes() is one memcpy
      while written == bounds[shard]:
        writer.close()
        writer, shard = next(writers), shard + 1
      writer.write(record.tobytes())
      written += 1
  if written != num_examples:
    raise ValueError(f"split {split}: wrote {written} records, expected {num_examples}")
  if writer is not None:
    writer.close()
  lengths = np.diff([0, *bounds]).tolist()
  return tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=total, filename_template=template)


class FixedRecords:
  """Random access to records written by `serialize`, decoded with numpy.

  TFDS decodes a record by parsing its proto and each feature in Python, about
  90 us an example here; records of one fixed layout decode as a block:
  join the bytes, view them as uint8[n, record_bytes], slice each feature's
  columns. `open` checks the layout on the first record and returns None for
  anything else (TFDS's generic writer, other encodings), so callers fall
  back to TFDS's decoder.

  Args:
    raw: random-access serialized records (`len`, `[i]`, `__getitems__`).
    features: name -> (dtype, shape) of each feature, in record order.
  """

  def __init__(self, raw, features: Mapping[str, tuple[np.dtype, tuple[int, ...]]]):
    self.raw = raw
    self.features = {k: (np.dtype(dt), tuple(shape)) for k, (dt, shape) in features.items()}
    sizes = {k: dt.itemsize * int(np.prod(shape)) for k, (dt, shape) in self.features.items()}
    prefix, headers = _headers(sizes)
    self.columns, self.expected, position = {}, [(0, prefix)], len(prefix)
    for (k, size), header in zip(sizes.items(), headers):
      self.expected.append((position, header))
      position += len(header)
      self.columns[k] = (position, position + size)
      position += size
    self.record_bytes = position

  @classmethod
  def open(cls, raw, features: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> "FixedRecords | None":
    """A FixedRecords over `raw` if its first record has the layout `serialize` writes, else None."""
    records = cls(raw, features)
    if len(raw) == 0:
      return None
    first = raw[0]
    if len(first) != records.record_bytes or any(first[a:a + len(h)] != h for a, h in records.expected):
      return None
    return records

  def __len__(self) -> int:
    return len(self.raw)

  def read_batch(self, keys: list[int]) -> dict[str, np.ndarray]:
    """The examples at `keys`, stacked: name -> array[len(keys), *shape]."""
    block = np.frombuffer(b"".join(self.raw.__getitems__(keys)), np.uint8).reshape(len(keys), self.record_bytes)
    out = {}
    for k, (a, b) in self.columns.items():
      dtype, shape = self.features[k]
      out[k] = np.ascontiguousarray(block[:, a:b]).view(dtype).reshape(len(keys), *shape)
    return out

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.read_batch([int(index)]).items()}

  def __getitems__(self, keys: list[int]) -> list[dict[str, np.ndarray]]:
    batch = self.read_batch(list(keys))
    return [{k: v[i] for k, v in batch.items()} for i in range(len(keys))]
