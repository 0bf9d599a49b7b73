"""Sharded train state and the jitted train/eval steps.

Everything here is a pure function of (config, mesh): `wm.train` runs these
steps and `wm.memory` compiles the very same ones on abstract inputs to read
the compiler's byte counts. The state is a plain dict pytree:

    {"params": nnx.State, "rest": nnx.State (non-trainable variables),
     "opt_state": optax state, "step": int32[], "rng": key}

State is created directly sharded (abstract init with `nnx.eval_shape`,
shardings from each variable's logical axes, then `jax.jit` with
`out_shardings`), so under FSDP no device ever holds the full state.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wm import models, optim, parallel

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the loop and the memory tools need to run or compile a config."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  rules: tuple
  graphdef: Any
  tx: optax.GradientTransformation
  abstract_state: State  # ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  batch_sharding: NamedSharding
  takes_step: bool  # the model's loss wants the training step (KL annealing)

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    b = batch_size or self.config.data.batch_size
    t = self.config.data.seq_len
    sd = lambda dtype: jax.ShapeDtypeStruct((b, t), dtype, sharding=self.batch_sharding)
    return {"inputs": sd(jnp.int32), "targets": sd(jnp.int32), "weights": sd(jnp.float32)}


def _as_tuple(axes) -> tuple:
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _split(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def _variable_shardings(tree, mesh: Mesh, rules) -> Any:
  """Shardings for every leaf of a state tree (params, optimizer moments, scalars).

  Optimizer moments inherit the parameters' logical names (optax maps over the
  same Variables), so they shard like the parameters: ZeRO-3 under FSDP.
  Factored statistics (Adafactor's row/column vectors) have fewer dimensions
  than their parameter's names; they are small and stay replicated.
  """
  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
      spec = P()
      names = leaf.get_metadata().get("out_sharding")
      if names and len(names) == len(value.shape):
        spec = parallel.logical_to_spec(names, rules)
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_setup(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Setup:
  """Abstract state and shardings for `config` on `mesh` (all local devices by default)."""
  mesh = mesh or parallel.make_mesh(config.mesh)
  rules = parallel.rules(config)
  batch_ways = math.prod(mesh.shape[a] for a in _as_tuple(dict(rules).get("batch")))
  per_step = config.data.batch_size // config.optim.microbatches
  if per_step % batch_ways:
    raise parallel.ConfigError(
        f"config.data.batch_size={config.data.batch_size} (over {config.optim.microbatches} microbatches) cannot be "
        f"split over the {batch_ways} devices of the batch mesh axes; make each microbatch a multiple of {batch_ways}")
  tx = optim.make_optimizer(config.optim, config.train.steps)

  def init_abstract():
    model = models.build(config, nnx.Rngs(config.seed))
    graphdef, params, rest = _split(model)
    return params, rest, tx.init(params)

  with parallel.activate(mesh, rules):
    model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(config.seed)))
    graphdef, _, _ = _split(model)
    params, rest, opt_state = jax.eval_shape(init_abstract)
  # Parameters: a wrong mesh for the model (e.g. tensor=3 with d=128) fails here, naming the parameter.
  param_sh = parallel.state_shardings(params, mesh, rules)
  shardings = {
      "params": param_sh,
      "rest": _variable_shardings(rest, mesh, rules),
      "opt_state": _variable_shardings(opt_state, mesh, rules),
      "step": NamedSharding(mesh, P()),
      "rng": NamedSharding(mesh, P()),
  }
  abstract = {"params": params, "rest": rest, "opt_state": opt_state,
              "step": jax.ShapeDtypeStruct((), jnp.int32),
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  takes_step = "step" in inspect.signature(models.model_class(config.model.name).loss).parameters
  return Setup(config, mesh, rules, graphdef, tx, abstract, shardings,
               parallel.batch_sharding(mesh, rules), takes_step)


def init_state(setup: Setup) -> State:
  """Parameters, optimizer state, step and RNG, created sharded on the mesh."""
  config = setup.config

  def init():
    model = models.build(config, nnx.Rngs(config.seed))
    _, params, rest = _split(model)
    # Created inside the jit so scalars like Adam's count land on the mesh, not on device 0.
    return {"params": params, "rest": rest, "opt_state": setup.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            # A raw uint32 key rather than a typed key array: it checkpoints as plain data.
            "rng": jax.random.PRNGKey(config.seed + 1)}

  with parallel.activate(setup.mesh, setup.rules):
    return jax.jit(init, out_shardings=setup.state_shardings)()


def _loss_kwargs(setup: Setup, step) -> dict[str, Any]:
  return {"step": step} if setup.takes_step else {}


def _weighted_sum(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  w = metrics["weight"]
  return {k: (v if k == "weight" else v * w) for k, v in metrics.items()}


def _finish(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  w = jnp.maximum(sums["weight"], 1e-9)
  return {k: (v if k == "weight" else v / w) for k, v in sums.items()}


def _microbatches(batch, m: int, rules):
  """[B, ...] -> [m, B/m, ...] taking every m-th row.

  Strided rather than contiguous: the batch is sharded in contiguous blocks
  over the data axes, so every device keeps holding a slice of every microbatch.
  """
  batch_axes = dict(rules).get("batch")

  def split(x):
    x = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
    return parallel.constrain(x, (None, "batch") + (None,) * (x.ndim - 2)) if batch_axes else x

  return jax.tree.map(split, batch)


def make_train_step(setup: Setup) -> Callable[[State, dict], tuple[State, dict]]:
  """The jitted train step: microbatched gradients, clipping, optimizer update.

  Gradient accumulation sums d(loss * weight) over microbatches and divides by
  the total weight, so it equals one large batch exactly (not just for equal
  token counts per microbatch).
  """
  config, graphdef, tx = setup.config, setup.graphdef, setup.tx
  m = config.optim.microbatches
  schedule = optim.learning_rate_schedule(config.optim, config.train.steps)

  def step_fn(state: State, batch: dict) -> tuple[State, dict]:
    key = jax.random.fold_in(state["rng"], state["step"])

    def weighted_loss(params, microbatch, k):
      model = nnx.merge(graphdef, params, state["rest"])
      loss, metrics = model.loss(microbatch, train=True, rngs=nnx.Rngs(k), **_loss_kwargs(setup, state["step"]))
      return loss * metrics["weight"], _weighted_sum(metrics)

    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)
    if m == 1:
      (_, sums), grads = grad_fn(state["params"], batch, key)
    else:
      def body(carry, xs):
        grads_acc, sums_acc = carry
        i, microbatch = xs
        (_, sums), grads = grad_fn(state["params"], microbatch, jax.random.fold_in(key, i))
        return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, state["params"])
      first = jax.tree.map(lambda x: x[0], _microbatches(batch, m, setup.rules))
      sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state["params"], first, key)[0][1]))
      (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), (jnp.arange(m), _microbatches(batch, m, setup.rules)))
    total = jnp.maximum(sums["weight"], 1e-9)
    grads = jax.tree.map(lambda g: g / total, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = _finish(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = schedule(state["step"])
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    return new_state, metrics

  def run(state, batch):
    with parallel.activate(setup.mesh, setup.rules):
      return jitted(state, batch)

  jitted = jax.jit(step_fn, in_shardings=(setup.state_shardings, setup.batch_sharding),
                   out_shardings=(setup.state_shardings, parallel.replicated(setup.mesh)),
                   donate_argnums=0)
  run.jitted = jitted  # for .lower(...) by wm.memory
  return run


def make_eval_step(setup: Setup) -> Callable[[State, dict, jax.Array], dict]:
  """Metrics of the model on one batch, weighted sums (combine with `finish_sums`)."""
  graphdef = setup.graphdef

  def eval_fn(params, rest, batch, key):
    model = nnx.merge(graphdef, params, rest)
    _, metrics = model.loss(batch, train=False, rngs=nnx.Rngs(key))
    return _weighted_sum(metrics)

  jitted = jax.jit(eval_fn, in_shardings=(setup.state_shardings["params"], setup.state_shardings["rest"],
                                          setup.batch_sharding, parallel.replicated(setup.mesh)),
                   out_shardings=parallel.replicated(setup.mesh))

  def run(state, batch, key):
    with parallel.activate(setup.mesh, setup.rules):
      return jitted(state["params"], state["rest"], batch, key)

  return run


def finish_sums(sums: dict[str, Any]) -> dict[str, Any]:
  """Weighted sums accumulated over batches -> means (weight stays a total).

  Vector metrics (e.g. a mixture's per-component usage) become lists.
  """
  w = max(float(sums["weight"]), 1e-9)
  out = {}
  for k, v in sums.items():
    v = np.asarray(v, np.float64) if k == "weight" else np.asarray(v, np.float64) / w
    out[k] = float(v) if v.ndim == 0 else v.tolist()
  return out


def global_batch(setup: Setup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's slice of the batch -> one global array sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding, np.asarray(v))
          for k, v in local.items()}


def model_from_state(setup: Setup, state: State) -> nnx.Module:
  return nnx.merge(setup.graphdef, state["params"], state["rest"])

