"""Local text corpora: which files, and which of their bytes go to each split.

`data.text_source="files"` with `data.text_files` (see its comment in
wm/config/schema.py), or "stdlib" (the interpreter's own standard-library sources).
`layout(spec)` turns the field into a `Layout`: per split, the documents
(`Piece`s: a file, or a byte range of one) in order. The layouts, in the order
they are tried:

- explicit: `train=PATTERNS;validation=PATTERNS[;test=PATTERNS]`;
- position: a single file (enwik8, text8, tiny shakespeare come as one) is cut
  into its first 90% / next 5% / last 5% of bytes (POSITION_PERCENT);
- names: several files, each named for its split (ptb.train.txt,
  wiki.valid.tokens, test.txt, a folder named train/);
- hash: any other set of files (a source tree), each file to validation or
  train by a hash of its path, as the stdlib corpus is split.

Prepared corpora are named by `layout_fingerprint`, so other files or another
split rule never read a stale preparation. Problems raise `CorpusError`, a
`ConfigError`, whose message names the path and the fix.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import os
import re
import sys
import sysconfig
from typing import Any, Sequence

from wm.config import ConfigError


SPLITS = ("train", "validation", "test")
# Directories left out of the standard-library corpus: third-party packages are
# not the standard library, and the test suites are large and repetitive.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# Share of the files of an unnamed multi-file set (a source tree) that go to
# validation, by a hash of each path.
VALIDATION_PERCENT = 5
# A single file is split by position, in percent of its bytes: the first 90%
# train, the next 5% validation, the last 5% test. These are enwik8's and
# text8's conventional splits (the first 90M / next 5M / last 5M of their 100M
# bytes; Mahoney's Large Text Compression Benchmark files as used since
# Graves 2013 and Mikolov et al. 2012), applied at any size.
POSITION_PERCENT = (90, 5, 5)
# Words in a file or folder name that put it in a split (ptb.train.txt,
# wiki.valid.tokens, validation.txt, dev-clean.txt, data/test/...).
_SPLIT_WORDS = {"train": "train", "valid": "validation", "validation": "validation", "dev": "validation",
                "test": "test"}
# Bump when a layout rule below changes, so corpora prepared under the old rule
# are not read as if split by the new one (prepared datasets are named by it).
LAYOUT_VERSION = 1
# A document is one TFDS record, a protobuf message, and protobuf refuses
# messages of 2 GiB or more: enwik9's 900 MB train split fits, a 3 GB single
# file does not (the error says to cut it into files named for their split).
MAX_DOCUMENT_BYTES = 2**31 - 2**20


class CorpusError(ConfigError):
  """`data.text_files` names files that do not make a usable corpus; the message says how to fix it."""


def stdlib_files() -> tuple[str, tuple[str, ...]]:
  """The running interpreter's own standard-library `.py` sources.

  Returns:
    (root, relative paths, sorted). CPython 3.11 gives about 730 files, 12 MB.
  """
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    found.extend(os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py"))
  if not found:
    raise FileNotFoundError(f"no .py files under the standard library at {root}")
  return root, tuple(sorted(found))


def match_files(patterns: str, field: str = "data.text_files") -> list[str]:
  """Absolute paths, sorted, of comma-separated paths, globs (`**` recurses) or directories.

  A directory stands for every file below it, hidden ones (`.git`, ...) left out.

  Raises:
    CorpusError: a pattern matches no file.
  """
  paths = set()
  for pattern in (p.strip() for p in patterns.split(",")):
    if not pattern:
      continue
    found = set()
    for match in glob.glob(os.path.expanduser(pattern), recursive=True):
      if os.path.isdir(match):
        for folder, dirs, files in os.walk(match):
          dirs[:] = [d for d in dirs if not d.startswith(".")]
          found.update(os.path.join(folder, f) for f in files if not f.startswith("."))
      elif os.path.isfile(match):
        found.add(match)
    if not found:
      raise CorpusError(f"{field}: {pattern!r} matches no file (relative paths are from {os.getcwd()}); "
                        f"fix the path or glob")
    paths.update(found)
  if not paths:
    raise CorpusError(f"{field}={patterns!r} names no files; give comma-separated paths or globs")
  return sorted(os.path.abspath(p) for p in paths)


def _common_root(paths: Sequence[str]) -> str:
  return os.path.commonpath([os.path.dirname(p) for p in paths])


def user_files(spec: str) -> tuple[str, tuple[str, ...]]:
  """Files named by comma-separated paths, globs or directories.

  Returns:
    (root, relative paths, sorted), root being the files' deepest common folder.
  """
  paths = match_files(spec)
  root = _common_root(paths)
  return root, tuple(sorted(os.path.relpath(p, root) for p in paths))


def _percentile(relative_path: str) -> int:
  """A number in [0, 100) from a hash of the path, the same on every machine."""
  digest = hashlib.md5(relative_path.replace(os.sep, "/").encode()).digest()
  return int.from_bytes(digest[:8], "little") % 100


def file_split(relative_path: str) -> str:
  """'validation' for about VALIDATION_PERCENT% of paths (by a hash of the path), else 'train'.

  Hashing the path relative to the corpus root keeps a file in the same split
  on every machine and whatever files are added or removed beside it.
  """
  return "validation" if _percentile(relative_path) < VALIDATION_PERCENT else "train"


def split_files(files: Sequence[str]) -> dict[str, list[str]]:
  """Files per split by `file_split`; both splits non-empty for two or more files.

  When the hash sends no file to one split (likely with a handful of files),
  the file whose hash is closest to that split moves there, so the split is
  still a function of the file set alone.
  """
  if len(files) < 2:
    raise ValueError(f"a hash split needs at least 2 files (one per split), got {list(files)}")
  splits = {"train": [], "validation": []}
  for f in files:
    splits[file_split(f)].append(f)
  if not splits["validation"]:
    moved = min(splits["train"], key=_percentile)
    splits["train"].remove(moved)
    splits["validation"].append(moved)
  if not splits["train"]:
    moved = max(splits["validation"], key=_percentile)
    splits["validation"].remove(moved)
    splits["train"].append(moved)
  return {k: sorted(v) for k, v in splits.items()}


def named_split(relative_path: str) -> str | None:
  """The split a path's name gives, or None.

  The name is cut into words at dots, underscores, hyphens and spaces; a word
  train, valid, validation, dev or test names a split. The file name is read
  first, then its folders from the nearest up; a name with words of two
  splits (`train_test_split.py`) names none.
  """
  parts = relative_path.replace(os.sep, "/").split("/")
  for part in reversed(parts):
    named = {_SPLIT_WORDS[w] for w in re.split(r"[._\-\s]+", part.lower()) if w in _SPLIT_WORDS}
    if len(named) == 1:
      return named.pop()
    if named:
      return None
  return None


@dataclasses.dataclass(frozen=True)
class Piece:
  """Bytes [begin, end) of the file at `path` (relative to the corpus root): one document.

  Attributes:
    whole: the piece is its whole file (`begin == 0`, `end` its size).
  """
  path: str
  begin: int
  end: int
  whole: bool = True

  @property
  def name(self) -> str:
    """The relative path, with the byte range when the piece is part of its file."""
    return self.path if self.whole else f"{self.path}[{self.begin}:{self.end}]"


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a corpus's files make its splits.

  Attributes:
    root: folder the pieces' paths are relative to.
    rule: "position" (one file cut by POSITION_PERCENT), "names" (files named
      for their split), "explicit" (SPLIT=PATTERNS groups) or "hash" (a
      source tree: each file's split by a hash of its path).
    splits: split -> its documents, in order; only the splits the layout gives.
    sizes: bytes of each file.
  """
  root: str
  rule: str
  splits: dict[str, tuple[Piece, ...]]
  sizes: dict[str, int]

  def bytes(self, split: str) -> int:
    return sum(p.end - p.begin for p in self.splits[split])

  def describe(self) -> str:
    return "; ".join(f"{s}: {len(p)} document(s), {self.bytes(s):,} bytes" for s, p in self.splits.items())


def _whole(relative: Sequence[str], sizes: dict[str, int]) -> tuple[Piece, ...]:
  return tuple(Piece(f, 0, sizes[f]) for f in sorted(relative))


def _sizes(root: str, relative: Sequence[str]) -> dict[str, int]:
  return {f: os.path.getsize(os.path.join(root, f)) for f in relative}


def _parse_groups(spec: str) -> dict[str, str] | None:
  """`train=A;validation=B;test=C` -> {split: patterns}; None when spec has no SPLIT= group."""
  groups = [g.strip() for g in spec.split(";") if g.strip()]
  explicit = [re.fullmatch(r"(\w+)\s*=(.*)", g, re.DOTALL) for g in groups]
  explicit = [m if m and m.group(1).lower() in _SPLIT_WORDS else None for m in explicit]
  if not any(explicit):
    if len(groups) > 1:
      raise CorpusError(f"data.text_files={spec!r}: ';' separates SPLIT=PATTERNS groups "
                        f"(train=...;validation=...;test=...); separate plain patterns with ','")
    return None
  out: dict[str, str] = {}
  for g, m in zip(groups, explicit):
    if m is None:
      raise CorpusError(f"data.text_files: group {g!r} has no SPLIT=; once one group names its split, all "
                        f"must, e.g. 'train=a/*.txt;validation=b.txt;test=c.txt'")
    split = _SPLIT_WORDS[m.group(1).lower()]
    if split in out:
      raise CorpusError(f"data.text_files names the {split} split twice; join its patterns with ','")
    out[split] = m.group(2)
  return out


def _need_train_and_validation(splits: dict[str, Any], how: str) -> None:
  missing = [s for s in ("train", "validation") if not splits.get(s)]
  if missing:
    raise CorpusError(
        f"data.text_files: {how}, but no file for the {' and '.join(missing)} split; training needs both. "
        f"Name them per split, e.g. data.text_files='train=DIR/train*.txt;validation=DIR/valid.txt'")


def _explicit_layout(groups: dict[str, str]) -> Layout:
  """Each split the files its patterns match; a file in two splits is an error."""
  _need_train_and_validation(groups, "the SPLIT=PATTERNS groups name some splits")
  matched = {split: match_files(patterns, f"data.text_files ({split}=)") for split, patterns in groups.items()}
  owner: dict[str, str] = {}
  for split, paths in matched.items():
    for p in paths:
      if p in owner:
        raise CorpusError(f"data.text_files: {p} is in both the {owner[p]} and the {split} split; "
                          f"narrow the patterns so each file is in one split")
      owner[p] = split
  root = _common_root(list(owner))
  relative = {s: [os.path.relpath(p, root) for p in ps] for s, ps in matched.items()}
  sizes = _sizes(root, list(itertools.chain(*relative.values())))
  return Layout(root, "explicit", {s: _whole(relative[s], sizes) for s in SPLITS if s in relative}, sizes)


def _detected_layout(spec: str) -> Layout:
  """By position for one file, by name when every file names its split, else by path hash."""
  root, files = user_files(spec)
  sizes = _sizes(root, files)
  if len(files) == 1:
    (f,) = files
    if sizes[f] == 0:
      raise CorpusError(f"data.text_files: {os.path.join(root, f)} is empty (0 bytes); point it at a text file")
    cuts = [0, *(sizes[f] * c // 100 for c in itertools.accumulate(POSITION_PERCENT))]
    pieces = {s: (Piece(f, a, b, whole=False),) for s, a, b in zip(SPLITS, cuts, cuts[1:])}
    return Layout(root, "position", pieces, sizes)
  named = {f: named_split(f) for f in files}
  if all(named.values()):
    by_split = {s: [f for f in files if named[f] == s] for s in SPLITS}
    _need_train_and_validation(by_split, "the file names give their splits")
    return Layout(root, "names", {s: _whole(fs, sizes) for s, fs in by_split.items() if fs}, sizes)
  if {"train", "validation"} <= set(named.values()):
    # Most likely a corpus's split files beside a README or licence: which
    # files the user meant to train on is a guess, so ask.
    some = sorted(f for f in files if named[f])[:4]
    unnamed = sorted(f for f, s in named.items() if s is None)
    raise CorpusError(
        f"data.text_files={spec!r}: some files name their split ({', '.join(some)}) and {len(unnamed)} do not "
        f"({', '.join(unnamed[:4])}{', ...' if len(unnamed) > 4 else ''}). List only the split files, or give "
        f"each split its files: 'train=...;validation=...;test=...'")
  hashed = split_files(files)
  return Layout(root, "hash", {s: _whole(hashed[s], sizes) for s in ("train", "validation")}, sizes)


def layout(spec: str) -> Layout:
  """How the files of `data.text_files` split (see the field's comment in wm/config/schema.py).

  - `train=PATTERNS;validation=PATTERNS[;test=PATTERNS]` (valid and dev are
    accepted for validation): each split is exactly the files its patterns match.
  - One file: split by position, POSITION_PERCENT of its bytes.
  - Files whose names all give a split (`named_split`: ptb.train.txt,
    wiki.valid.tokens, test.txt, ...): each goes to that split.
  - Any other set of two or more files (a source tree): by a hash of each path
    (`split_files`), train and validation only.

  Raises:
    CorpusError: a pattern matches nothing, a file or a split is empty, train
      or validation has no file, or some files name splits and others do not.
  """
  groups = _parse_groups(spec)
  result = _explicit_layout(groups) if groups is not None else _detected_layout(spec)
  for split in result.splits:
    if result.bytes(split) == 0:
      files = sorted({p.path for p in result.splits[split]})
      raise CorpusError(f"data.text_files: the {split} split holds no text: {', '.join(files[:4])} "
                        f"{'is' if len(files) == 1 else 'are'} empty; give it a file with text")
    for p in result.splits[split]:
      if p.end - p.begin > MAX_DOCUMENT_BYTES:
        raise CorpusError(
            f"data.text_files: {os.path.join(result.root, p.name)} would be one {p.end - p.begin:,}-byte document "
            f"of the {split} split; a document (one TFDS record) must stay under {MAX_DOCUMENT_BYTES:,} bytes. "
            f"Cut the file into several (e.g. split -C 1G) and name the parts for their splits, or list them as "
            f"'train=...;validation=...;test=...'")
  return result


def stdlib_layout() -> Layout:
  """The standard-library corpus: `stdlib_files` split by a hash of each path."""
  root, files = stdlib_files()
  sizes = _sizes(root, files)
  hashed = split_files(files)
  return Layout(root, "hash", {s: _whole(hashed[s], sizes) for s in ("train", "validation")}, sizes)


def check_fits(split: str, packed_bytes: int, seq_len: int, what: str) -> None:
  """Raises a CorpusError when a split packs into no example of seq_len + 1 bytes.

  Args:
    packed_bytes: the split's stream: its documents' bytes plus one separator each.
    what: the corpus, as the message should name it.
  """
  if packed_bytes < seq_len + 1:
    raise CorpusError(
        f"{what}: the {split} split packs into {packed_bytes:,} bytes (its text plus a separator after each "
        f"document), shorter than one example: data.seq_len={seq_len} needs {seq_len + 1:,}. Lower "
        f"data.seq_len or give the {split} split more text.")


def fingerprint(root: str, files: Sequence[str]) -> str:
  """A short hash of the file set: relative paths, sizes and modification times.

  Prepared corpora are named by it, so another file set (or an edited file)
  prepares anew instead of silently reading stale text.
  """
  h = hashlib.sha256()
  for f in files:
    st = os.stat(os.path.join(root, f))
    h.update(f"{f.replace(os.sep, '/')}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:10]


def layout_fingerprint(corpus: Layout) -> str:
  """A short hash of the files (as `fingerprint`) and of where every byte of them goes.

  Another split rule, another assignment of files to splits or other cut
  points give another name, so a corpus is never read under a layout it was
  not prepared with.
  """
  h = hashlib.sha256(f"layout {LAYOUT_VERSION} {corpus.rule}\n".encode())
  h.update(fingerprint(corpus.root, sorted(corpus.sizes)).encode())
  for split, pieces in corpus.splits.items():
    for p in pieces:
      h.update(f"{split}\0{p.path.replace(os.sep, '/')}\0{p.begin}\0{p.end}\n".encode())
  return h.hexdigest()[:10]


def stdlib_tag() -> str:
  """`py311`-style tag of the interpreter whose stdlib is the corpus."""
  return f"py{sys.version_info.major}{sys.version_info.minor}"
