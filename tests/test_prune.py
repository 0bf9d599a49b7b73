"""Pruning (wm/compress/prune.py): the schedule against Zhu & Gupta's formula, exact masks, weights held at
zero under AdamW, masks through a checkpoint, training at 50% sparsity, the export's bytes, the config."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import wm  # noqa: F401
from wm import config as config_lib
from wm import parallel
from wm import step as step_lib
from wm import train
from wm.compress import leaves, prune, prune_masks, quant, sparse_export
from tests.test_compress import _toy_batches


def pruning(sparsity=0.5, start=0, end=0, every=1, n=0, m=0, weights=None):
  return prune.Pruning(weights or {}, sparsity, start, end, every, n, m)


# ----------------------------------------------------------------------------- schedule


def zhu_gupta(t, s_f, t0, n, dt, s_i=0.0):
  """Zhu & Gupta 2017, eq. 1, at the update steps t0 + k dt, written out independently."""
  return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


def test_schedule_equals_the_formula_at_update_steps_and_holds_between():
  p = pruning(0.8, start=10, end=50, every=10)  # n = 4 updates after t0
  for t in (10, 20, 30, 40, 50):
    assert float(prune.sparsity_at(t, p)) == pytest.approx(zhu_gupta(t, 0.8, 10, 4, 10), abs=1e-7)
    assert bool(prune.is_update_step(t, p))
  assert float(prune.sparsity_at(10, p)) == 0.0  # s_i
  assert float(prune.sparsity_at(30, p)) == pytest.approx(0.8 * (1 - 0.5 ** 3))  # 0.7: fast early, slow late
  for t in (0, 9):
    assert float(prune.sparsity_at(t, p)) == 0.0 and not bool(prune.is_update_step(t, p))
  for t, held in ((15, 10), (29, 20), (49, 40)):  # between updates the last update's value holds
    assert float(prune.sparsity_at(t, p)) == float(prune.sparsity_at(held, p))
    assert not bool(prune.is_update_step(t, p))
  for t in (51, 60, 10_000):
    assert float(prune.sparsity_at(t, p)) == pytest.approx(0.8) and not bool(prune.is_update_step(t, p))
  one_shot = pruning(0.5, start=7, end=7)
  assert [float(prune.sparsity_at(t, one_shot)) for t in (6, 7, 8)] == [0.0, 0.5, 0.5]


# ----------------------------------------------------------------------------- masks


new_mask = jax.jit(prune_masks.new_mask, static_argnames=("axes", "nm"))


def magnitudes(shape, dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])  # bfloat16: many tied magnitudes
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.73, 0.95])
def test_magnitude_masks_hit_the_target_per_matrix_and_prune_the_smallest(dtype, sparsity):
  w = magnitudes((3, 24, 17), dtype)  # 3 stacked matrices of 408
  mask = new_mask(w, jnp.ones(w.shape, jnp.uint8), jnp.float32(sparsity), axes=(1, 2))
  mask, a = np.asarray(mask), np.abs(np.asarray(w.astype(jnp.float32)))
  assert mask.dtype == np.uint8
  for i in range(3):
    assert (mask[i] == 0).sum() == round(sparsity * 408)  # exactly, per matrix
    assert a[i][mask[i] == 0].max() <= a[i][mask[i] == 1].min()


def test_masks_only_grow_and_reach_the_target_from_a_partial_mask():
  w = magnitudes((64, 48))
  masks = [jnp.ones(w.shape, jnp.uint8)]
  for s in (0.2, 0.4, 0.6):
    masks.append(new_mask(w, masks[-1], jnp.float32(s), axes=(0, 1)))
  for before, after in zip(masks[1:], masks[2:]):
    assert np.all(np.asarray(after) <= np.asarray(before))  # nothing pruned comes back
  assert int((np.asarray(masks[-1]) == 0).sum()) == round(0.6 * 64 * 48)
  # A pruned weight stays pruned even at a lower target than it was pruned at (the schedule never asks).
  zeroed = w * masks[-1]
  again = new_mask(zeroed, masks[-1], jnp.float32(0.3), axes=(0, 1))
  np.testing.assert_array_equal(np.asarray(again), np.asarray(masks[-1]))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8)])
def test_nm_masks_keep_exactly_n_in_every_group_along_the_input_axis(n, m):
  # A stacked [layers, heads, head_dim, d] kernel contracting (heads, head_dim): groups run along head_dim.
  w = magnitudes((2, 3, 16, 10), seed=n + m)
  axis = prune_masks.group_axis((-3, -2), w.ndim)
  assert axis == 2
  final = new_mask(w, jnp.ones(w.shape, jnp.uint8), jnp.float32(1 - n / m), (1, 2, 3), nm=(axis, n, m))
  groups = np.moveaxis(np.asarray(final), axis, -1).reshape(-1, m)
  assert np.all(groups.sum(axis=1) == n)
  a = np.moveaxis(np.abs(np.asarray(w)), axis, -1).reshape(-1, m)
  assert np.all(np.where(groups == 0, a, -np.inf).max(axis=1) <= np.where(groups == 1, a, np.inf).min(axis=1))
  # On the way there, a partial sparsity prunes only within the pattern: every group keeps at least n.
  half = new_mask(w, jnp.ones(w.shape, jnp.uint8), jnp.float32((1 - n / m) / 2), (1, 2, 3),
                        nm=(axis, n, m))
  half_groups = np.moveaxis(np.asarray(half), axis, -1).reshape(-1, m)
  assert half_groups.sum(axis=1).min() >= n
  for i in range(2):
    assert (np.asarray(half)[i] == 0).sum() == round((1 - n / m) / 2 * 3 * 16 * 10)
  again = new_mask(w * half, half, jnp.float32(1 - n / m), (1, 2, 3), nm=(axis, n, m))
  assert np.all(np.asarray(again) <= np.asarray(half))
  assert np.all(np.moveaxis(np.asarray(again), axis, -1).reshape(-1, m).sum(axis=1) == n)


@pytest.mark.parametrize("name, fields, per_matrix", [
    ("lstm", {}, {"stack/stacked/w_h": (2,), "stack/stacked/w_x/kernel": (2,)}),
    ("mixture", {"model.mixture_heads": "separate"},
     {"decoder/body/stacked/w_h": (4, 2), "decoder/body/stacked/w_x/kernel": (4, 2)}),
    ("transformer", {"prune.embeddings": True},
     {"embed/embedding": ()} | {f"stack/blocks/{w}/kernel": (2,) for w in ("q", "k", "v", "o", "up", "down")}),
])
def test_every_matmul_weight_is_pruned_per_stacked_matrix(name, fields, per_matrix):
  """Kernels only (norms, biases and, unless asked, embeddings never), one target per layer (and component)."""
  c = config_lib.base_config()
  c.model.name, c.model.d, c.data.vocab_size, c.mesh.num_devices = name, 32, 64, 1
  c = config_lib.validate(config_lib.override(c, {"prune.method": "2:4", **fields}))
  setup = step_lib.make_setup(c, parallel.make_mesh(c.mesh, jax.devices()[:1]))
  masks = prune.find_state(setup.abstract_state["opt_state"]).masks
  shapes = {k: v.shape for k, v in jax.eval_shape(prune.layer_sparsity, masks).items()}
  assert shapes == per_matrix


# ----------------------------------------------------------------------------- the optimizer


def _regression(tx, steps, seed=0):
  """A 32 -> 16 linear regression trained by `tx`; yields (params, state) after every step."""
  rng = np.random.default_rng(seed)
  x, y = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32), jnp.asarray(rng.standard_normal((64, 16)),
                                                                              jnp.float32)
  params = {"w": jnp.asarray(rng.standard_normal((32, 16)) * 0.3, jnp.float32), "b": jnp.zeros(16)}
  loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  @jax.jit
  def step(p, s):
    value, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, value

  state = tx.init(params)
  for _ in range(steps):
    params, state, value = step(params, state)
    yield params, state, float(value)


def test_pruned_weights_stay_exactly_zero_through_adamw_with_weight_decay():
  p = pruning(0.75, start=4, end=24, every=4, weights={("w",): (0,)})
  tx = prune.pruned(optax.adamw(1e-2, weight_decay=0.1), p)
  losses, momentum_at_pruned = [], 0
  for i, (params, state, value) in enumerate(_regression(tx, 80)):
    losses.append(value)
    mask = np.asarray(state.masks["w"])
    w = np.asarray(params["w"])
    assert np.all(w[mask == 0] == 0.0), i  # exactly zero after every update
    assert np.all(w[mask == 1] != 0.0)
    assert (mask == 0).sum() == round(float(prune.sparsity_at(i + 1, p)) * 32 * 16), i  # i + 1 steps done
    mu = np.asarray(state.inner[0].mu["w"])  # optax.adamw: (scale_by_adam, decay, lr)
    momentum_at_pruned = max(momentum_at_pruned, np.abs(mu[mask == 0]).max(initial=0))
  assert state.masks["b"].shape == ()  # never pruned
  # Control: AdamW's momentum at just-pruned weights is not zero, so without the output mask they would move.
  assert momentum_at_pruned > 1e-4
  assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- in the train loop


def tiny(tmp_path, steps=24, **overrides):
  c = config_lib.base_config()
  c.data.task = "mqar"
  c.data.seq_len, c.data.vocab_size, c.data.num_kv_pairs = 32, 64, 4
  c.data.batch_size, c.data.train_size, c.data.eval_size = 8, 500, 16
  c.data.data_dir = str(tmp_path / "tfds")
  c.model.d, c.model.layers, c.model.heads, c.model.kv_heads = 32, 2, 2, 2
  c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 3e-3, 4, 0.1
  c.train.steps, c.train.log_every, c.train.eval_every = steps, 4, 12
  c.train.eval_batches, c.train.checkpoint_every, c.train.progress = 1, 100, False
  c.mesh.num_devices = 1
  c.prune.method, c.prune.start_step, c.prune.end_step, c.prune.every = "magnitude", 4, 12, 4
  return config_lib.validate(config_lib.override(c, overrides))


def _leaves_by_path(tree):
  return {"/".join(quant.path_key(p)): np.asarray(leaves.value(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]}


def test_masks_survive_a_checkpoint_and_the_run_resumes_with_them(tmp_path):
  config = tiny(tmp_path, **{"prune.method": "2:4"})
  workdir = str(tmp_path / "run")
  # Masks change in steps 4, 8, 12 (s = 0, 0.4375, 0.5): stopped after step 10, they are saved half-way.
  first = train.train_and_evaluate(config, workdir, stop_after_step=10)
  saved = prune.find_state(first["state"]["opt_state"])
  # The checkpoint holds them bit for bit, through the project's restore path (abstract state with shardings).
  setup = step_lib.make_setup(config)
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints")) as manager:
    restored = manager.restore(10, args=ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state)))
  back = prune.find_state(restored["state"]["opt_state"])
  assert int(back.count) == int(saved.count) == 10
  got, want = _leaves_by_path(back.masks), _leaves_by_path(saved.masks)
  assert got.keys() == want.keys() and all(got[k].dtype == np.uint8 for k in got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert float(prune.sparsity(back.masks)) == 0.5 * (1 - 0.5 ** 3)
  rest = train.train_and_evaluate(config, workdir)  # resumes at 10 and prunes on to 0.5
  assert rest["step"] == 24
  masks = _leaves_by_path(prune.find_state(rest["state"]["opt_state"]).masks)
  params = _leaves_by_path(rest["state"]["params"])
  kernels = [k for k, v in masks.items() if v.ndim]
  assert len(kernels) == 6 and all(k.endswith("kernel") for k in kernels)  # q, k, v, o, up, down
  for k in kernels:
    assert np.all(params[k][masks[k] == 0] == 0) and (masks[k] == 0).mean() == 0.5
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if r["split"] == "eval"]
  assert evals[-1]["sparsity"] == 0.5
  assert evals[-1]["sparsity_layers"]["stack/blocks/up/kernel"] == [0.5, 0.5]
  train_sparsity = [r["sparsity"] for r in records if r["split"] == "train"]
  assert train_sparsity == sorted(train_sparsity) and train_sparsity[-1] == 0.5


@functools.lru_cache(maxsize=None)
def _trained(method: str, steps=60):
  c = config_lib.base_config()
  c.data.vocab_size, c.data.seq_len, c.data.batch_size = 37, 16, 8
  c.model.d, c.model.layers, c.model.heads, c.model.kv_heads, c.model.mlp_ratio = 32, 2, 2, 2, 2
  c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay, c.train.steps = 1e-2, 5, 0.1, steps
  c.mesh.num_devices = 1
  if method:
    c.prune.method, c.prune.start_step, c.prune.end_step, c.prune.every = method, 10, 30, 5
  c = config_lib.validate(c)
  setup = step_lib.make_setup(c, parallel.make_mesh(c.mesh, jax.devices()[:1]))
  state, train_step = step_lib.init_state(setup), step_lib.make_train_step(setup)
  losses = []
  for batch in _toy_batches(c, steps):
    state, metrics = train_step(state, step_lib.global_batch(setup, batch))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state), setup


@pytest.mark.parametrize("method", ["magnitude", "2:4"])
def test_a_half_pruned_model_trains_and_its_export_halves_the_pruned_bytes(method):
  dense, _, _ = _trained("")
  losses, state, setup = _trained(method)
  # It learns through the pruning (steps 10-30) and after: loss falls well below the uniform guess.
  assert losses[-1] < 0.5 * math.log(37) and losses[-1] < losses[0] - 2, (losses[0], losses[-1])
  assert losses[-1] < dense[-1] + 0.3, (losses[-1], dense[-1])
  masks = prune.find_state(state["opt_state"]).masks
  assert float(prune.sparsity(masks)) == 0.5
  # Export: float32 values of the kept half + 1 bit (bitmap) or 2 bits per kept value (2:4) = 2.125 bytes
  # per pruned-weight element instead of 4.
  p = prune.Pruning.from_config(setup.config.prune, setup.weight_axes)
  exported = sparse_export.export_sparse(state["params"], masks, p)
  w, mk = _leaves_by_path(state["params"]), _leaves_by_path(masks)
  pruned_elems = sum(v.size for v in mk.values() if v.ndim)
  other_bytes = sum(w[k].nbytes for k, v in mk.items() if not v.ndim)
  assert exported["bytes"] == other_bytes + pruned_elems * 2.125
  assert exported["dense_bytes"] == sum(v.nbytes for v in w.values())
  formats = {e["format"] for e in exported["tensors"].values()}
  assert formats == {"dense", "bitmap" if method == "magnitude" else "n:m"}
  for name, value in sparse_export.densify(exported).items():  # the export is lossless
    np.testing.assert_array_equal(value, w[name])


def test_export_writes_the_bytes_it_counts(tmp_path):
  _, state, setup = _trained("2:4")
  masks = prune.find_state(state["opt_state"]).masks
  exported = sparse_export.export_sparse(state["params"], masks, prune.Pruning.from_config(setup.config.prune,
                                                                                   setup.weight_axes),
                                 path=str(tmp_path / "sparse.npz"))
  size = os.path.getsize(tmp_path / "sparse.npz")
  arrays = sum(isinstance(v, np.ndarray) for e in exported["tensors"].values() for v in e.values())
  assert exported["bytes"] < size < exported["bytes"] + 300 * arrays  # + npy and zip headers


# ----------------------------------------------------------------------------- config


def test_pruning_levers_validate():
  for lever in ({"prune.method": "magnitude", "prune.sparsity": 0.9},
                {"prune.method": "2:4", "prune.start_step": 1, "prune.end_step": 1},
                {"prune.method": "n:m", "prune.n": 1, "prune.m": 4, "prune.sparsity": 0.75,
                 "prune.embeddings": True}):
    config_lib.validate(config_lib.override(config_lib.base_config(), lever))


@pytest.mark.parametrize("lever, message", [
    ({"prune.method": "random"}, "prune.method: 'random' is not one of"),
    ({"prune.method": "magnitude", "prune.sparsity": 1.0}, r"prune.sparsity: must be in \(0, 1\)"),
    ({"prune.method": "2:4", "prune.sparsity": 0.6}, "prune.sparsity: 2:4 keeps 2 of every 4 .* set prune.sparsity=0.5"),
    ({"prune.method": "2:4", "prune.m": 8}, "prune.n: method \"2:4\" keeps 2 of 4"),
    ({"prune.method": "n:m", "prune.n": 4, "prune.m": 4}, r"prune.n: must be in \[1, prune.m=4\)"),
    ({"prune.method": "magnitude", "prune.every": 0}, "prune.every: must be >= 1"),
    ({"prune.method": "magnitude", "prune.end_step": 50}, "prune.end_step: 50 is before prune.start_step"),
    ({"prune.method": "magnitude", "prune.end_step": 650}, "prune.end_step: .* multiple of prune.every=100.* "
                                                            "e.g. prune.end_step=700"),
    ({"prune.method": "magnitude", "train.steps": 400}, "prune.end_step: 500 is after train.steps=400"),
    ({"prune.method": "magnitude", "prune.start_step": 0}, "prune.start_step: must be >= 1"),
])
def test_bad_pruning_values_name_the_field_and_the_fix(lever, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config_lib.override(config_lib.base_config(), lever))


def test_nm_groups_that_do_not_divide_the_input_axis_are_refused_naming_the_weight():
  c = config_lib.override(config_lib.base_config(), {"prune.method": "n:m", "prune.n": 1, "prune.m": 3,
                                                     "prune.sparsity": 2 / 3, "model.d": 32,
                                                     "data.vocab_size": 64, "mesh.num_devices": 1})
  with pytest.raises(config_lib.ConfigError, match=r"input axis of stack/blocks/\w+/kernel .* prune.m=3"):
    step_lib.make_setup(config_lib.validate(c), parallel.make_mesh(c.mesh, jax.devices()[:1]))
