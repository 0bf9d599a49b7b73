"""Byte-level text: the tokenizer, and packing documents into sequences.

Which documents make each split of a local corpus is `wm.data.corpus`.

Tokens are the bytes of the UTF-8 text (vocabulary 256), so any text encodes
without an out-of-vocabulary token and a model's nats per token convert
straight to bits per byte.

Packing. The documents of a split are laid end to end, each followed by the
separator byte 0 (NUL), into one stream; the stream is cut into consecutive,
non-overlapping chunks of seq_len + 1 bytes, and chunk i gives the example
inputs = chunk[:-1], targets = chunk[1:], weights = 1. NUL rather than a newline
separates documents because newlines occur inside every text file, while NUL
does not occur in text: it is an unambiguous end-of-document token for the
model to learn. The tail of the stream shorter than a chunk is dropped. Any
chunk is read on its own (random access), which is what a shuffled, sharded,
resumable loader needs.
"""

from __future__ import annotations

import bisect
import functools
from typing import Any, Sequence

import numpy as np

VOCAB_SIZE = 256
SEPARATOR = 0  # NUL: ends every document in the packed stream


def encode(text: str | bytes) -> np.ndarray:
  """UTF-8 bytes of `text` as uint8 tokens (bytes are taken as they are)."""
  raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(raw, dtype=np.uint8).copy()


def decode(tokens: Any) -> str:
  """Text of byte tokens; a byte sequence that is not valid UTF-8 decodes to U+FFFD."""
  return np.asarray(tokens, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


def document_lengths(documents: Sequence[Any], read_batch: int = 1024) -> np.ndarray:
  """Byte length of every document (reads each once, in batches where the source allows)."""
  n = len(documents)
  lengths = np.zeros(n, np.int64)
  getitems = getattr(documents, "__getitems__", None)
  for start in range(0, n, read_batch):
    stop = min(n, start + read_batch)
    docs = getitems(list(range(start, stop))) if getitems else [documents[i] for i in range(start, stop)]
    lengths[start:stop] = [len(d.encode("utf-8") if isinstance(d, str) else d) for d in docs]
  return lengths


class PackedSequences:
  """Random access to the fixed-length chunks of a packed document stream.

  Args:
    documents: random-access documents (`len`, `[i]` -> str, bytes or uint8 array).
    seq_len: tokens per example; chunks hold seq_len + 1 bytes.
    lengths: byte length of every document, if known (`document_lengths`);
      computing it reads the whole split once, so callers cache it for large sets.
  """

  def __init__(self, documents: Sequence[Any], seq_len: int, lengths: np.ndarray | None = None):
    self.documents = documents
    self.seq_len = seq_len
    lengths = document_lengths(documents) if lengths is None else np.asarray(lengths, np.int64)
    if len(lengths) != len(documents):
      raise ValueError(f"{len(lengths)} lengths for {len(documents)} documents")
    # starts[j]: stream offset of document j; each document occupies len + 1 (its separator).
    self.starts = np.concatenate([[0], np.cumsum(lengths + 1)])
    self.num_chunks = int(self.starts[-1] // (seq_len + 1))
    self._init_cache()

  def _init_cache(self) -> None:
    # A long document (tiny_shakespeare's split is one) spans many chunks;
    # caching a few recent ones avoids re-reading it for each. lru_cache is
    # thread-safe, which grain's reader threads need.
    self._document = functools.lru_cache(maxsize=16)(self._read_document)

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_document"]  # functools caches do not pickle (grain worker processes)
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._init_cache()

  def _read_document(self, j: int) -> np.ndarray:
    return np.concatenate([encode(self.documents[j]), np.array([SEPARATOR], np.uint8)])

  def __len__(self) -> int:
    return self.num_chunks

  def chunk(self, index: int) -> np.ndarray:
    """Bytes [index * (seq_len + 1), (index + 1) * (seq_len + 1)) of the stream."""
    if not 0 <= index < self.num_chunks:
      raise IndexError(f"chunk {index} out of range [0, {self.num_chunks})")
    size = self.seq_len + 1
    begin, end = index * size, (index + 1) * size
    j = bisect.bisect_right(self.starts, begin) - 1
    pieces, pos = [], begin
    while pos < end:
      doc = self._document(j)
      offset = pos - int(self.starts[j])
      piece = doc[offset:offset + end - pos]
      pieces.append(piece)
      pos += len(piece)
      j += 1
    return np.concatenate(pieces)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    x = self.chunk(int(index)).astype(np.int32)
    return {"inputs": x[:-1], "targets": x[1:], "weights": np.ones(self.seq_len, np.float32)}
