"""Synthetic working-memory tasks: each example a pure function of (task config, split, index).

Every task returns one example in the batch format used throughout `wm`:

    inputs   int32[t]    tokens the model reads
    targets  int32[t]    what it must predict at each position (0 where unscored)
    weights  float32[t]  1.0 where the position is scored, 0.0 elsewhere

with t = data.seq_len. The model reads `inputs[:i + 1]` and is scored on
`targets[i]`, so a causal model predicts `targets[i]` from inputs up to and
including position i. Token 0 is padding and never scored.

Reserved tokens: PAD = 0; SEP = 1 (copy separator, induction trigger); BLANK = 2
(selective-copy noise). Each task draws its content tokens above the ones it
reserves; `task_spec(name)` states the content range and the scored positions.

Determinism and disjoint splits. Examples are drawn a block of BLOCK = 1024 at
a time, every generator vectorised over the block: block b of `split` comes from
`np.random.default_rng([task id, split id, b])`, so example i is row i mod BLOCK
of block i // BLOCK. No global state, and `config.seed` plays no part (it only
orders the data). The two splits are disjoint *by content*: a candidate
example belongs to the validation split iff a hash of its inputs is 0 mod
`VALIDATION_SHARE`, and to train otherwise; each block draws candidates from
its stream and keeps, in order, the first BLOCK of its own split. Two distinct
seed streams alone would still let small task spaces (tiny vocabulary, short
sequences) repeat an example across splits; the hash makes that impossible at
any size. The hash is unrelated to the task's structure, so both splits keep
the task's distribution (on a tiny task space, validation is then a fixed
pseudo-random eighth of it).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Callable

import numpy as np

PAD, SEP, BLANK = 0, 1, 2
TRIGGER = SEP  # the induction task's special token
SPLITS = ("train", "validation")
TASKS = ("mqar", "copy", "selective_copy", "nback", "induction")
# One candidate in VALIDATION_SHARE (by the hash of its inputs) is a validation
# example. Small, because train is the split with many examples: train draws
# 8/7 candidates per example, validation 8.
VALIDATION_SHARE = 8
# Bump when any generator below changes what it produces: prepared datasets are
# named by it (wm.data.builders), so stale ones are never read.
GENERATOR_VERSION = 2
# Examples are drawn a block at a time (vectorised over the block); a block is
# the unit of determinism, so changing BLOCK changes the examples.
BLOCK = 1024
_MAX_ROUNDS = 100

Example = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What a task asks and where it is scored.

  Attributes:
    name: task name (`data.task`).
    content: the range [lo, V) of content tokens, as a string.
    scored: which positions carry weight 1.
    fields: the `data` config fields that determine the examples.
  """
  name: str
  content: str
  scored: str
  fields: tuple[str, ...]


_SPECS = {
    "mqar": TaskSpec(
        "mqar", "keys in [1, V/2), values in [V/2, V), noise in [1, V)",
        "the D = num_kv_pairs query positions, each a key repeated after the key-value prefix; "
        "the target there is that key's value",
        ("seq_len", "vocab_size", "num_kv_pairs", "power_a")),
    "copy": TaskSpec(
        "copy", "[2, V)",
        "positions L..2L-1 (L = copy_len): from the separator on, the model reproduces the L tokens",
        ("seq_len", "vocab_size", "copy_len")),
    "selective_copy": TaskSpec(
        "selective_copy", "[3, V)",
        "positions T-L..T-1 (T = seq_len, L = copy_len): from the separator on, the model reproduces "
        "the L content tokens in order, skipping the blanks",
        ("seq_len", "vocab_size", "copy_len")),
    "nback": TaskSpec(
        "nback", "[1, V)",
        "positions n..T-1 (n = nback): the target is the input n positions back",
        ("seq_len", "vocab_size", "nback")),
    "induction": TaskSpec(
        "induction", "[2, V)",
        "position T-1 only: the second trigger, whose target is the token after the first trigger",
        ("seq_len", "vocab_size")),
}


def task_spec(name: str) -> TaskSpec:
  """The `TaskSpec` of task `name` (content tokens, scored positions, fields)."""
  if name not in _SPECS:
    raise ValueError(f"unknown synthetic task {name!r}; one of {TASKS}")
  return _SPECS[name]


def scored_positions(data: Any) -> np.ndarray | None:
  """Positions with weight 1 for every example, or None where they vary (MQAR)."""
  t = data.seq_len
  if data.task == "mqar":
    return None
  if data.task == "copy":
    return np.arange(data.copy_len, 2 * data.copy_len)
  if data.task == "selective_copy":
    return np.arange(t - data.copy_len, t)
  if data.task == "nback":
    return np.arange(data.nback, t)
  if data.task == "induction":
    return np.array([t - 1])
  raise ValueError(f"unknown synthetic task {data.task!r}; one of {TASKS}")


def task_params(data: Any) -> dict[str, Any]:
  """The fields of `data` that determine the examples of `data.task`."""
  return {"task": data.task, **{f: getattr(data, f) for f in task_spec(data.task).fields}}


def _shifted(x: np.ndarray, labels: np.ndarray) -> Example:
  """Language-model shift of length-(T+1) rows: predict x[:, i+1] from x[:, :i+1].

  `labels` holds, per position of x, the token to score there or -1 for none.
  """
  targets = labels[:, 1:]
  return {"inputs": x[:, :-1].astype(np.int32),
          "targets": np.where(targets >= 0, targets, PAD).astype(np.int32),
          "weights": (targets >= 0).astype(np.float32)}


def _distinct(rng: np.random.Generator, n: int, k: int, d: int, ordered: bool = True) -> np.ndarray:
  """n rows of d distinct integers from [0, k): each row a uniform sample without replacement.

  Floyd's algorithm (Bentley & Floyd 1987, "A sample of brilliance"), one
  step for all rows at once: d draws and O(n d^2) work, whatever k is, where
  sorting k random keys per row would cost O(n k log k) (k = 4095 keys at
  V = 8192). Floyd's draws a uniform *set*; when the order matters
  (`ordered`), a uniform shuffle of each row makes it a uniform sequence.
  """
  chosen = np.empty((n, d), np.int64)
  for i, j in enumerate(range(k - d, k)):
    r = rng.integers(0, j + 1, size=n)
    taken = (chosen[:, :i] == r[:, None]).any(axis=1)
    chosen[:, i] = np.where(taken, j, r)
  if ordered:
    chosen = np.take_along_axis(chosen, np.argsort(rng.random((n, d)), axis=1), axis=1)
  return chosen


def mqar(rng: np.random.Generator, n: int, seq_len: int, vocab_size: int, num_kv_pairs: int,
         power_a: float) -> Example:
  """Multi-query associative recall, as `multiquery_ar` in Zoology (Arora et al. 2023).

  A sequence of T + 1 tokens (T = seq_len): D = num_kv_pairs pairs `k1 v1 k2 v2 ...`
  with keys drawn without replacement from [1, V/2) and values from [V/2, V),
  then the D keys again as queries at positions 2D + 2g for gaps g drawn without
  replacement from [0, (T - 2D) // 2) with P(g) proportional to a (g+1)^(a-1)
  (a = power_a; a -> 0 puts queries next to the prefix, a = 1 is uniform). After
  the shift the model reads a query key at input position i and is scored on
  its value as target i. Every other position is noise: uniform tokens from
  [1, V). Zoology draws noise from [0, V); we skip 0 so it stays padding only.
  The noise may contain key tokens at unscored positions, as in Zoology.
  """
  t, d, v = seq_len, num_kv_pairs, vocab_size
  if 4 * d > t or v // 2 - 1 < d:
    raise ValueError(f"mqar: {d} pairs need seq_len >= {4 * d} and vocab_size/2 - 1 >= {d}; "
                     f"got seq_len={t}, vocab_size={v}")
  keys = 1 + _distinct(rng, n, v // 2 - 1, d)
  values = v // 2 + _distinct(rng, n, v - v // 2, d)
  space = (t - 2 * d) // 2
  # Successive draws without replacement with probabilities p (Zoology's
  # np.random.choice(replace=False, p=p)) have the law of the D smallest
  # E_g / p_g, E_g ~ Exp(1), in order: exponential clocks, the same as the top
  # D of log p + Gumbel (Gumbel-top-k; Kool et al. 2019) since -log E is
  # Gumbel, but without the two logarithms per draw.
  p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
  gaps = np.argsort(rng.standard_exponential(size=(n, space)) / p, axis=1)[:, :d]
  x = rng.integers(1, v, size=(n, t + 1), dtype=np.int32)  # the noise, then the pairs and queries over it
  rows = np.arange(n)[:, None]
  x[:, 0:2 * d:2], x[:, 1:2 * d:2] = keys, values
  x[rows, 2 * d + 2 * gaps] = keys
  labels = np.full((n, t + 1), -1, np.int32)
  labels[rows, 2 * d + 2 * gaps + 1] = values
  return _shifted(x, labels)


def copy(rng: np.random.Generator, n: int, seq_len: int, vocab_size: int, copy_len: int) -> Example:
  """Copying: `c1..cL SEP c1..cL` then padding; scored on the second c1..cL.

  Content tokens are uniform in [2, V). With the LM shift the model reads SEP at
  position L and must emit c1 there, then c2 after reading c1, and so on.
  """
  t, m = seq_len, copy_len
  if 2 * m + 1 > t:
    raise ValueError(f"copy: copy_len={m} needs seq_len >= {2 * m + 1}, got {t}")
  content = rng.integers(2, vocab_size, size=(n, m))
  x = np.full((n, t + 1), PAD, np.int32)
  x[:, :m], x[:, m], x[:, m + 1:2 * m + 1] = content, SEP, content
  labels = np.full((n, t + 1), -1, np.int32)
  labels[:, m + 1:2 * m + 1] = content
  return _shifted(x, labels)


def selective_copy(rng: np.random.Generator, n: int, seq_len: int, vocab_size: int,
                   copy_len: int) -> Example:
  """Selective copying (Gu & Dao 2023, Mamba, Sec. 3.1): copy the content, skip the noise.

  The first T - L tokens (T = seq_len, L = copy_len) are BLANK except at L random
  positions holding the content tokens (uniform in [3, V)); then SEP and the
  content in order. Scored on reproducing the content after SEP, so the model
  must remember the tokens and their order but not where they stood.
  """
  t, m = seq_len, copy_len
  if 2 * m + 1 > t:
    raise ValueError(f"selective_copy: copy_len={m} needs seq_len >= {2 * m + 1}, got {t}")
  region = t - m  # tokens before SEP; the sequence has t + 1 tokens before the shift
  content = rng.integers(3, vocab_size, size=(n, m))
  where = np.sort(_distinct(rng, n, region, m, ordered=False), axis=1)
  x = np.full((n, t + 1), BLANK, np.int32)
  x[np.arange(n)[:, None], where] = content
  x[:, region], x[:, region + 1:] = SEP, content
  labels = np.full((n, t + 1), -1, np.int32)
  labels[:, region + 1:] = content
  return _shifted(x, labels)


def nback(rng: np.random.Generator, n: int, seq_len: int, vocab_size: int, nback: int) -> Example:
  """n-back: uniform tokens in [1, V); at every position i >= n the target is inputs[i - n].

  Solving it needs exactly the last n tokens in memory, which makes n a direct
  dial on the working memory a model must hold.
  """
  t, back = seq_len, nback
  if not 1 <= back < t:
    raise ValueError(f"nback: n={back} must be in [1, seq_len={t})")
  inputs = rng.integers(1, vocab_size, size=(n, t)).astype(np.int32)
  targets = np.zeros((n, t), np.int32)
  targets[:, back:] = inputs[:, :-back]
  weights = np.zeros((n, t), np.float32)
  weights[:, back:] = 1.0
  return {"inputs": inputs, "targets": targets, "weights": weights}


def induction(rng: np.random.Generator, n: int, seq_len: int, vocab_size: int) -> Example:
  """Induction heads (Olsson et al. 2022; the H3/Mamba synthetic, Gu & Dao 2023 Sec. 4.1.2).

  Uniform tokens in [2, V) with the TRIGGER token placed at a random position
  p in [0, T-3] and again at the last position T-1; the target at T-1 is the
  token that followed the first trigger (inputs[p + 1], itself a content token).
  """
  t = seq_len
  if t < 3 or vocab_size < 3:
    raise ValueError(f"induction needs seq_len >= 3 and vocab_size >= 3; got {t}, {vocab_size}")
  inputs = rng.integers(2, vocab_size, size=(n, t)).astype(np.int32)
  p = rng.integers(0, t - 2, size=n)
  rows = np.arange(n)
  inputs[rows, p] = TRIGGER
  inputs[:, t - 1] = TRIGGER
  targets = np.zeros((n, t), np.int32)
  targets[:, t - 1] = inputs[rows, p + 1]
  weights = np.zeros((n, t), np.float32)
  weights[:, t - 1] = 1.0
  return {"inputs": inputs, "targets": targets, "weights": weights}


_GENERATORS: dict[str, Callable[..., Example]] = {
    "mqar": mqar, "copy": copy, "selective_copy": selective_copy, "nback": nback, "induction": induction}


def _mix64(z: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser (Steele et al. 2014): a bijection of uint64 that scatters every input bit."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def content_hash(inputs: np.ndarray) -> np.ndarray:
  """A 64-bit hash of each row of `inputs` (int[..., t]), the same on every machine.

  Each token is mixed with its position, the mixes are summed (mod 2^64) and
  mixed again: one vectorised pass over a block of rows, where a
  cryptographic hash would cost a Python call per row.
  """
  x = np.asarray(inputs).astype(np.uint64)
  position = np.arange(1, x.shape[-1] + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
  return _mix64(_mix64(x + position).sum(axis=-1, dtype=np.uint64))


def split_of(inputs: np.ndarray) -> np.ndarray:
  """The split of each example, from a hash of its inputs (see the module docstring)."""
  return np.where(content_hash(inputs) % np.uint64(VALIDATION_SHARE) == 0, "validation", "train")


@functools.lru_cache(maxsize=16)
def _block(name: str, params: tuple[tuple[str, Any], ...], split: str, block: int) -> Example:
  """Examples [block * BLOCK, (block + 1) * BLOCK) of `split`, read-only (cached)."""
  generate = _GENERATORS[name]
  rng = np.random.default_rng([zlib.crc32(name.encode()), SPLITS.index(split), block])
  want_validation = split == "validation"
  share = 1 / VALIDATION_SHARE if want_validation else 1 - 1 / VALIDATION_SHARE
  draws = int(BLOCK / share * 1.1) + 16  # candidates per round: one round is nearly always enough
  kept, count = [], 0
  for _ in range(_MAX_ROUNDS):
    candidates = generate(rng, draws, **dict(params))
    mine = (content_hash(candidates["inputs"]) % np.uint64(VALIDATION_SHARE) == 0) == want_validation
    kept.append({k: v[mine] for k, v in candidates.items()})
    count += int(mine.sum())
    if count >= BLOCK:
      out = {k: np.concatenate([c[k] for c in kept])[:BLOCK] for k in candidates}
      for v in out.values():
        v.flags.writeable = False
      return out
  raise RuntimeError(f"{name} with {dict(params)} drew {_MAX_ROUNDS * draws} candidates and only {count} "
                     f"belonged to the {split} split: the task has too few distinct examples; raise "
                     f"seq_len or vocab_size")


def clear_cache() -> None:
  """Forgets the blocks kept for random access, so the next read generates afresh (benchmarks)."""
  _block.cache_clear()


def _key(data: Any, split: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  params = task_params(data)
  name = params.pop("task")
  return name, tuple(sorted(params.items()))


def example_range(data: Any, split: str, start: int, stop: int) -> Example:
  """Examples start, ..., stop - 1 of `split`, stacked: arrays with a leading axis of stop - start.

  Equal, row for row, to `example(data, split, i)` for i in range(start, stop),
  at a small fraction of the cost: this is how datasets are written.
  """
  name, params = _key(data, split)
  if not 0 <= start <= stop:
    raise ValueError(f"example range [{start}, {stop}) must have 0 <= start <= stop")
  parts = []
  for b in range(start // BLOCK, -(-stop // BLOCK)):
    block = _block(name, params, split, b)
    lo, hi = max(start - b * BLOCK, 0), min(stop - b * BLOCK, BLOCK)
    parts.append({k: v[lo:hi] for k, v in block.items()})
  if not parts:
    spec = _block(name, params, split, 0)
    return {k: v[:0].copy() for k, v in spec.items()}
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def example(data: Any, split: str, index: int) -> Example:
  """Example `index` of `split` for the task `data.task` with the parameters in `data`.

  Args:
    data: the `data` section of a config (or any mapping with its fields).
    split: "train" or "validation".
    index: any non-negative integer (the split sizes only bound what is stored).

  Returns:
    dict with `inputs`, `targets` (int32[t]) and `weights` (float32[t]).
  """
  name, params = _key(data, split)
  block = _block(name, params, split, int(index) // BLOCK)
  return {k: v[int(index) % BLOCK].copy() for k, v in block.items()}
