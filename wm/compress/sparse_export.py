"""Where sparsity saves bytes: a compressed copy of pruned weights, and the exact way back.

In training a pruned weight is stored dense, zeros and all, plus its mask
(wm.compress.prune); only this export stores fewer bytes than the dense
model (docs/compression.md, "Pruning").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from wm.compress import leaves, prune, prune_masks


def _index_bits(m: int) -> int:
  return max(math.ceil(math.log2(m)), 1)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes < 2**bits, `bits` bits each, little-endian within a byte, packed into uint8."""
  flat = codes.reshape(-1).astype(np.uint8)
  planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1), bitorder="little")


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  planes = np.unpackbits(packed, bitorder="little")[:count * bits].reshape(count, bits)
  return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1).astype(np.uint8)


def export_sparse(params: Any, masks: Any, pruning: prune.Pruning | None = None,
                  path: str | None = None) -> dict[str, Any]:
  """A compressed copy of the weights and its byte count (host memory, NumPy).

  Pruned weights are stored as their kept values plus where they sit:
    - "bitmap" (unstructured): values in row-major order + one bit per element;
      bytes = nnz * itemsize + N / 8.
    - "n:m" (when `pruning` is N:M and every group keeps at most n): n values
      per group of m along the input axis + ceil(log2 m) bits per value for
      its position in the group (NVIDIA's 2:4 layout: 2 bits per kept value);
      bytes = N n/m * itemsize + N n/m * ceil(log2 m) / 8.
  Everything else is stored dense. CSR (int32 column indices and row
  pointers) would cost nnz * (itemsize + 4) + 4 (rows + 1): at 50% float32,
  as many bytes as dense, which is why the bitmap is the format here.

  Args:
    params: the parameters (an nnx.State or a pytree of arrays).
    masks: the masks from the optimizer state (`find_state(opt_state).masks`).
    pruning: the run's pruning (for N:M); None = every pruned weight as a bitmap.
    path: if given, the arrays are also written there with `np.savez` (uncompressed).

  Returns:
    {"tensors": {name: {"format", "shape", "dtype", arrays...}}, "bytes": exported bytes (the arrays'
     nbytes, headers not counted), "dense_bytes": the same parameters stored dense,
     "ratio": bytes / dense_bytes}.
  """
  paths, p_leaves, _ = leaves.flatten(params)
  _, m_leaves, _ = leaves.flatten(masks)
  tensors: dict[str, dict[str, Any]] = {}
  for key, p, m in zip(paths, p_leaves, m_leaves):
    w, mask = np.asarray(leaves.value(p)), np.asarray(leaves.value(m))
    name = "/".join(key)
    entry: dict[str, Any] = {"shape": list(w.shape), "dtype": str(w.dtype)}
    if not mask.ndim:
      entry.update(format="dense", values=w)
    else:
      keep = mask.astype(bool)
      nm = None
      if pruning is not None and pruning.m and key in pruning.weights:
        axis = prune_masks.group_axis(pruning.weights[key], w.ndim)
        groups = np.moveaxis(keep, axis, -1).reshape(-1, pruning.m)
        if groups.sum(axis=1).max(initial=0) <= pruning.n:
          nm = axis
      if nm is not None:
        n, m = pruning.n, pruning.m
        wg = np.moveaxis(w, nm, -1).reshape(-1, m)
        kg = np.moveaxis(keep, nm, -1).reshape(-1, m)
        # The kept positions first (stable), then pruned ones to fill a group that kept fewer than n (zeros).
        idx = np.argsort(~kg, axis=1, kind="stable")[:, :n]
        values = np.where(np.take_along_axis(kg, idx, axis=1), np.take_along_axis(wg, idx, axis=1), 0).astype(w.dtype)
        entry.update(format="n:m", n=n, m=m, axis=nm, values=values.reshape(-1),
                     index=_pack(idx, _index_bits(m)))
      else:
        entry.update(format="bitmap", values=w[keep], bitmap=np.packbits(keep.reshape(-1)))
    tensors[name] = entry
  stored = sum(sum(v.nbytes for v in e.values() if isinstance(v, np.ndarray)) for e in tensors.values())
  dense = sum(np.asarray(leaves.value(p)).nbytes for p in p_leaves)
  if path is not None:
    np.savez(path, **{f"{name}/{k}": v for name, e in tensors.items() for k, v in e.items()
                      if isinstance(v, np.ndarray)})
  return {"tensors": tensors, "bytes": int(stored), "dense_bytes": int(dense), "ratio": stored / max(dense, 1)}


def densify(exported: dict[str, Any]) -> dict[str, np.ndarray]:
  """{name: dense array} back from `export_sparse` (pruned entries zero): the round trip is exact."""
  out = {}
  for name, e in exported["tensors"].items():
    shape, dtype = tuple(e["shape"]), np.dtype(e["dtype"])
    if e["format"] == "dense":
      out[name] = e["values"]
    elif e["format"] == "bitmap":
      keep = np.unpackbits(e["bitmap"])[:math.prod(shape)].astype(bool).reshape(shape)
      w = np.zeros(shape, dtype)
      w[keep] = e["values"]
      out[name] = w
    else:
      n, m, axis = e["n"], e["m"], e["axis"]
      moved = tuple(np.moveaxis(np.empty(shape, np.uint8), axis, -1).shape)
      groups = math.prod(shape) // m
      idx = _unpack(e["index"], _index_bits(m), groups * n).reshape(groups, n).astype(np.int64)
      wg = np.zeros((groups, m), dtype)
      np.put_along_axis(wg, idx, e["values"].reshape(groups, n), axis=1)
      out[name] = np.moveaxis(wg.reshape(moved), -1, axis)
  return out
