"""Subword text: a SentencePiece model trained on a corpus's train split, and the token streams it gives.

`data.tokenizer = "spm:N"`: byte-pair encoding (Sennrich et al. 2016) with N
pieces, trained and applied by SentencePiece (Kudo & Richardson 2018). Fewer
tokens per byte of text mean shorter sequences for the same text: fewer
activation and state bytes per byte read. (SentencePiece's unigram model is
left out: on the 11 MB stdlib train split it trained in 175 s against BPE's 4 s,
at vocabulary 512 on this 2-core machine, for 1.5% more validation tokens;
measured once, with a throwaway script.)

Exact round trip. Decoding the ids of any text gives back its bytes: the
model is trained and applied with no normalization (`identity`), no dummy
prefix and no whitespace removal, and with byte fallback (a character outside
the vocabulary becomes its UTF-8 bytes, one piece each). SentencePiece cannot
carry two things, which `Tokenizer.encode` therefore writes as byte pieces
itself: bytes that are not UTF-8 (a few stdlib modules are latin-1) and the
character U+2581, which SentencePiece uses for the space and would decode as
one. Newlines also go straight to byte pieces: SentencePiece learns from the
text between them (its sentences), so no piece spans a newline, and the text
between newlines is encoded in one batched call.

Streams. A split's documents are encoded and laid end to end, each followed by
the end-of-document id, which stands for the NUL separator of the byte-level
stream (`wm.data.text`). Every token covers a known number of bytes of that
stream (`Tokenizer.token_bytes`; the separator covers 1), so bits per byte
over a set of scored tokens is exactly (their summed nats) / (ln 2 * the bytes
they cover), comparable with a byte-level model on the same stream.

Files. Beside the prepared text dataset (its TFDS version directory), a folder
`spm-bpe-<N>-<hash>/` (the hash covers the trainer options and
TOKENIZER_VERSION) holds `spm.model`, one `<split>.tokens.npy` per split and
`info.json` (token and byte counts per split), written last: a folder with
info.json is complete and is used as it is; preparing again trains nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from wm.config import ConfigError

# Bump when the trainer options or `Tokenizer.encode` change what a model or
# stream holds: prepared folders are named by a hash that covers it.
TOKENIZER_VERSION = 1
UNK_ID, EOS_ID = 0, 1  # SentencePiece requires an unknown piece; bos and pad are not used
# Byte fallback reserves 256 pieces, plus unk and end-of-document: the smallest
# vocabulary that leaves room for one learned piece.
MIN_VOCAB = 256 + 2 + 1
# Characters SentencePiece cannot round-trip, and newlines (see the module
# docstring): written as byte pieces directly. \udc80-\udcff are the bytes
# that are not UTF-8, as Python's surrogateescape decodes them.
_RAW = re.compile("([\n\u2581\udc80-\udcff]+)")  # captured: re.split keeps the runs
# Lines longer than this are left out of training (never out of encoding):
# SentencePiece's default (4192 bytes) would drop long lines of prose.
_MAX_SENTENCE_BYTES = 1 << 16

_SPEC = re.compile(r"spm:(-?\d+)")


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed `data.tokenizer`: the vocabulary size of a SentencePiece BPE model."""
  vocab_size: int

  def options(self) -> dict[str, Any]:
    """SentencePiece trainer options: every one that changes the model, fixed here."""
    return {
        "model_type": "bpe", "vocab_size": self.vocab_size,
        "byte_fallback": True, "normalization_rule_name": "identity", "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        # Indentation runs become pieces: most of the stdlib corpus is indented code.
        "allow_whitespace_only_pieces": True,
        # Numbers merge like words: the aim here is fewer tokens per byte.
        "split_digits": False,
        "unk_id": UNK_ID, "eos_id": EOS_ID, "bos_id": -1, "pad_id": -1,
        "max_sentence_length": _MAX_SENTENCE_BYTES,
    }

  def dirname(self) -> str:
    key = json.dumps({"version": TOKENIZER_VERSION, **self.options()}, sort_keys=True)
    return f"spm-bpe-{self.vocab_size}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def parse(tokenizer: str) -> Spec | None:
  """`data.tokenizer` -> Spec, or None for "bytes".

  Raises:
    ConfigError: neither "bytes" nor "spm:N" with N >= MIN_VOCAB.
  """
  if tokenizer == "bytes":
    return None
  match = _SPEC.fullmatch(tokenizer)
  if not match:
    raise ConfigError(f"config.data.tokenizer={tokenizer!r}: expected 'bytes' or 'spm:N' (BPE with N "
                      f"pieces), e.g. 'spm:4096'")
  n = int(match.group(1))
  if n < MIN_VOCAB:
    raise ConfigError(f"config.data.tokenizer={tokenizer!r}: N={n} pieces is too few; byte fallback takes 256 "
                      f"pieces and unk and end-of-document 2 more, so N must be >= {MIN_VOCAB} (try 'spm:4096')")
  return Spec(n)


def _as_str(text: str | bytes) -> str:
  """Text with every byte that is not UTF-8 as a surrogate (\\udc80-\\udcff), so it survives to `_segments`."""
  raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return raw.decode("utf-8", errors="surrogateescape")


def _segments(text: str) -> list[str]:
  """text cut into alternating SentencePiece text (even positions) and _RAW runs (odd positions)."""
  return _RAW.split(text)


def training_sentences(documents: Iterable[str | bytes]) -> Iterator[str]:
  """The text SentencePiece learns from: every non-empty piece of text between _RAW runs."""
  for doc in documents:
    for segment in _segments(_as_str(doc))[::2]:
      if segment:
        yield segment


class Tokenizer:
  """A trained SentencePiece model with exact, byte-level encode and decode.

  Args:
    model_proto: the serialized model (`spm.model`).
  """

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # only runs with data.tokenizer = spm:N need it
    self.model_proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self.sp.get_piece_size()
    pieces = []
    for i in range(self.vocab_size):
      piece = self.sp.id_to_piece(i)
      if self.sp.is_byte(i):  # "<0xNN>"
        pieces.append(bytes([int(piece[3:5], 16)]))
      elif i == EOS_ID:
        pieces.append(b"\0")  # the byte-level stream's document separator
      elif self.sp.is_control(i) or self.sp.is_unknown(i):
        pieces.append(b"")
      else:
        pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
    self.pieces = pieces
    self.token_bytes = np.array([len(p) for p in pieces], np.int32)
    self.byte_ids = np.array([self.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)], np.int32)

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  def encode_many(self, documents: Sequence[str | bytes]) -> list[np.ndarray]:
    """The ids of each document (int32), without separators."""
    per_doc = [_segments(_as_str(d)) for d in documents]
    texts = [s for segs in per_doc for s in segs[::2] if s]
    encoded = iter(self.sp.encode(texts, out_type=int)) if texts else iter(())
    out = []
    for segs in per_doc:
      ids = []
      for i, s in enumerate(segs):
        if not s:
          continue
        if i % 2:  # a _RAW run: its UTF-8 bytes (surrogates back to the bytes they stand for)
          ids.extend(self.byte_ids[np.frombuffer(s.encode("utf-8", "surrogateescape"), np.uint8)].tolist())
        else:
          ids.extend(next(encoded))
      out.append(np.asarray(ids, np.int32))
    return out

  def encode(self, text: str | bytes) -> np.ndarray:
    """The ids of `text` (int32); `decode` gives its UTF-8 bytes back exactly."""
    return self.encode_many([text])[0]

  def decode(self, ids: Any) -> bytes:
    """The bytes the ids stand for (the separator id gives NUL)."""
    return b"".join(self.pieces[int(i)] for i in np.asarray(ids).reshape(-1))


def train(documents: Iterable[str | bytes], spec: Spec, what: str) -> bytes:
  """Trains a SentencePiece model on `documents` (the train split); returns the serialized model.

  Deterministic: the same documents and spec give the same bytes.

  Raises:
    ConfigError: the vocabulary is smaller than the corpus's characters need.
  """
  import sentencepiece as spm
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=training_sentences(documents), model_writer=model,
                                   minloglevel=2, num_threads=os.cpu_count() or 1, **spec.options())
  except RuntimeError as e:
    needed = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
    if needed:
      raise ConfigError(
          f"config.data.tokenizer: the train split of {what} needs at least {needed.group(2)} pieces (256 byte "
          f"pieces, unk, end-of-document and its common characters), but {spec.vocab_size} were asked for; "
          f"raise N in spm:N to {needed.group(2)} or more") from None
    raise
  return model.getvalue()


class TokenSequences:
  """Random access to fixed-length examples of a split's token stream (`<split>.tokens.npy`).

  Example i is tokens [i * (seq_len + 1), (i + 1) * (seq_len + 1)): inputs,
  targets, weights as for byte-level text, and target_bytes, the bytes of the
  byte-level stream each target covers (for exact bits per byte).
  """

  def __init__(self, path: str, seq_len: int, token_bytes: np.ndarray):
    self.path, self.seq_len, self.token_bytes = path, seq_len, token_bytes
    self._open()

  def _open(self) -> None:
    self.tokens = np.load(self.path, mmap_mode="r")  # read on demand: a split can be GBs

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["tokens"]  # grain worker processes map the file themselves
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self.tokens) // (self.seq_len + 1)

  def read_batch(self, keys: Sequence[int]) -> dict[str, np.ndarray]:
    size = self.seq_len + 1
    keys = np.asarray(keys, np.int64)
    if len(keys) and not (0 <= keys.min() and keys.max() < len(self)):
      raise IndexError(f"examples {keys.tolist()} out of range [0, {len(self)})")
    chunks = np.asarray(self.tokens[(keys[:, None] * size + np.arange(size))], np.int32)
    targets = chunks[:, 1:]
    return {"inputs": chunks[:, :-1], "targets": targets, "weights": np.ones(targets.shape, np.float32),
            "target_bytes": self.token_bytes[targets]}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.read_batch([int(index)]).items()}


def _batches(documents: Sequence[Any], size: int) -> Iterator[list[Any]]:
  """The documents, `size` at a time, read in one call where the source allows (TFDS: far faster)."""
  getitems = getattr(documents, "__getitems__", None)
  for start in range(0, len(documents), size):
    index = list(range(start, min(len(documents), start + size)))
    yield getitems(index) if getitems else [documents[i] for i in index]


def _write_npy(path: str, array: np.ndarray) -> None:
  with open(path, "wb") as f:
    np.save(f, array)


def prepare(folder: str, spec: Spec, splits: dict[str, Callable[[], Sequence[Any]]], what: str,
            read_batch: int = 1024) -> dict[str, Any]:
  """Trains the model on the train split and writes every split's token stream into `folder`.

  Skipped when `folder` is complete (has info.json). Written into a temporary
  sibling and renamed, so a crash or a concurrent reader never sees half a folder.

  Args:
    folder: `<dataset dir>/<spec.dirname()>`.
    spec: the tokenizer.
    splits: split name -> a function giving its documents (random access).
    what: the corpus, as messages name it.
    read_batch: documents read and encoded per call.

  Returns:
    The folder's info: spec, and tokens and bytes per split.
  """
  info_path = os.path.join(folder, "info.json")
  if not os.path.exists(info_path):
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
      documents = (d for batch in _batches(splits["train"](), read_batch) for d in batch)
      model = train(documents, spec, what)
      with open(os.path.join(tmp, "spm.model"), "wb") as f:
        f.write(model)
      tokenizer = Tokenizer(model)
      info = {"tokenizer": dataclasses.asdict(spec), "version": TOKENIZER_VERSION, "splits": {}}
      for split, documents in splits.items():
        streams = []
        for batch in _batches(documents(), read_batch):
          for ids in tokenizer.encode_many(batch):
            streams += [ids, np.array([EOS_ID], np.int32)]
        stream = np.concatenate(streams or [np.zeros(0, np.int32)])
        dtype = np.uint16 if spec.vocab_size <= 2**16 else np.int32
        _write_npy(os.path.join(tmp, f"{split}.tokens.npy"), stream.astype(dtype))
        info["splits"][split] = {"tokens": int(len(stream)), "bytes": int(tokenizer.token_bytes[stream].sum())}
      with open(os.path.join(tmp, "info.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
      try:
        os.rename(tmp, folder)
      except OSError:  # another process finished first: its folder is as good as ours
        if not os.path.exists(info_path):
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return read_info(folder, spec)


def read_info(folder: str, spec: Spec) -> dict[str, Any]:
  """The info of a prepared folder, checked against `spec`.

  Raises:
    ConfigError: the folder's model does not have spec.vocab_size pieces.
  """
  with open(os.path.join(folder, "info.json")) as f:
    info = json.load(f)
  size = Tokenizer.load(os.path.join(folder, "spm.model")).vocab_size
  if size != spec.vocab_size or info["tokenizer"] != dataclasses.asdict(spec):
    raise ConfigError(
        f"config.data.tokenizer asks for {spec.vocab_size} pieces, but {folder} holds a model "
        f"with {size} ({info['tokenizer']}); it was changed by hand. Delete that folder and prepare again "
        f"(`python -m wm prepare --config ...`), which retrains it")
  return info


@functools.lru_cache(maxsize=4)
def load_tokenizer(folder: str) -> Tokenizer:
  return Tokenizer.load(os.path.join(folder, "spm.model"))
