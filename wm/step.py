"""Sharded train state and the jitted train/eval steps.

Everything here is a pure function of (config, mesh): `wm.train` runs these
steps and `wm.memory` compiles the very same ones on abstract inputs to read
the compiler's byte counts. The state is a plain dict pytree:

    {"params": nnx.State (the trainable parameters), "rest": nnx.State (every
     other variable), "opt_state": optax state, "step": int32[], "rng": key}

With `model.lora_rank > 0` only the adapters train (Hu et al. 2021): "params"
holds the LoRA parameters and the frozen base weights sit in "rest", so
gradients and optimizer state exist for the adapters only (`trainable`; the
equivalent of `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` in our own step).

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
from wm.compress import prune, quant

State = dict[str, Any]

# Metrics that are counts summed over batches, not weighted means.
TOTALS = ("weight", "examples", "bytes")


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
  # {param path: axes its int8 scale reduces over}: the weights quant.qat and quant.weights quantize.
  weight_axes: dict = dataclasses.field(default_factory=dict)

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    b = batch_size or self.config.data.batch_size
    t = self.config.data.seq_len
    sd = lambda dtype: jax.ShapeDtypeStruct((b, t), dtype, sharding=self.batch_sharding)
    return {"inputs": sd(jnp.int32), "targets": sd(jnp.int32), "weights": sd(jnp.float32)}


def _as_tuple(axes) -> tuple:
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def trainable(config: ml_collections.ConfigDict):
  """The nnx filter of the variables the optimizer updates: the LoRA adapters if the model has them, else every Param."""
  return nnx.LoRAParam if config.model.get("lora_rank", 0) else nnx.Param


def _split(model: nnx.Module, config: ml_collections.ConfigDict):
  graphdef, params, rest = nnx.split(model, trainable(config), ...)
  return graphdef, params, rest


def _variable_shardings(tree, mesh: Mesh, rules) -> Any:
  """Shardings for every leaf of a state tree (params, optimizer moments, scalars).

  Optimizer moments inherit the parameters' logical names (optax maps over the
  same Variables), so they shard like the parameters: ZeRO-3 under FSDP.
  Factored statistics (Adafactor's row/column vectors) have fewer dimensions
  than their parameter's names; they are small and stay replicated. So do
  statistics whose shape differs from their parameter's on a sharded
  dimension (Adafactor keeps a (1,) placeholder row/column for a vector
  parameter: sharding it over fsdp failed the compile with IndivisibleError).
  """
  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
      spec = P()
      names = leaf.get_metadata().get("out_sharding")
      if names and len(names) == len(value.shape):
        spec = parallel.logical_to_spec(names, rules)
        if any(dim % math.prod(mesh.shape[a] for a in _as_tuple(axes)) for dim, axes in zip(value.shape, spec)):
          spec = P()
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
    graphdef, params, rest = _split(model, config)
    return params, rest, tx.init(params)

  with parallel.activate(mesh, rules):
    model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(config.seed)))
    graphdef, _, _ = _split(model, config)
    # Pruning (config.prune) wraps the optimizer; which weights it prunes is known once the model is.
    tx = optim.with_pruning(tx, config.prune, quant.weight_axes(model))
    params, rest, opt_state = jax.eval_shape(init_abstract)
  # Parameters: a wrong mesh for the model (e.g. tensor=3 with d=128) fails here, naming the parameter.
  param_sh = parallel.state_shardings(params, mesh, rules)
  if config.model.get("lora_rank", 0):  # the frozen base weights (in "rest") are checked the same way
    parallel.state_shardings(nnx.state(model, nnx.Param), mesh, rules)
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
               parallel.batch_sharding(mesh, rules), takes_step, quant.weight_axes(model))


def init_state(setup: Setup) -> State:
  """Parameters, optimizer state, step and RNG, created sharded on the mesh."""
  config = setup.config

  def init():
    model = models.build(config, nnx.Rngs(config.seed))
    _, params, rest = _split(model, config)
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


def _global_batch_stats(graphdef, state: State, micro: dict, keys: jax.Array, kwargs: dict) -> Any:
  """Sums over the whole global batch of the statistics a model's loss is nonlinear in, or None.

  A loss term that is nonlinear in a batch mean (free bits: sum_d max(lambda,
  mean_b KL_bd), Kingma et al. 2016) is not a sum over examples, so summing
  microbatch gradients would apply it per microbatch and change the
  objective. Models with such terms expose `batch_statistics(batch, rngs,
  **kwargs)` (additive sums, computed with the same latent samples as the
  loss) and accept them back as `loss(..., batch_stats=...)`. This costs one
  extra forward pass over the microbatches, only for models that ask for it.
  """
  model = nnx.merge(graphdef, state["params"], state["rest"])
  if not getattr(model, "needs_batch_statistics", False):
    return None

  def stats_of(params, rest, microbatch, k):
    return nnx.merge(graphdef, params, rest).batch_statistics(microbatch, rngs=nnx.Rngs(k), **kwargs)

  # The parameters ride in the carry so the model is merged from values of the
  # scan's own trace level (NNX refuses to mix levels inside its transforms).
  def body(carry, xs):
    acc, params, rest = carry
    k, microbatch = xs
    return (jax.tree.map(jnp.add, acc, stats_of(params, rest, microbatch, k)), params, rest), None

  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(stats_of, state["params"], state["rest"], first, keys[0]))
  (stats, _, _), _ = jax.lax.scan(body, (zeros, state["params"], state["rest"]), (keys, micro))
  return jax.lax.stop_gradient(stats)


def make_train_step(setup: Setup) -> Callable[[State, dict], tuple[State, dict]]:
  """The jitted train step: microbatched gradients, clipping, optimizer update.

  Gradient accumulation sums d(loss * weight) over microbatches and divides by
  the total weight, so it equals one large batch exactly (not just for equal
  token counts per microbatch).

  With `quant.qat = "int8"` the forward pass sees the weights rounded to
  their int8 grid, and the gradient reaches the float weights through a
  straight-through estimator (wm.compress.quant.fake_quantize).
  """
  config, graphdef, tx = setup.config, setup.graphdef, setup.tx
  m = config.optim.microbatches
  qat = config.quant.qat == "int8"
  schedule = optim.learning_rate_schedule(config.optim, config.train.steps)

  def step_fn(state: State, batch: dict) -> tuple[State, dict]:
    key = jax.random.fold_in(state["rng"], state["step"])
    kwargs = _loss_kwargs(setup, state["step"])

    def weighted_loss(params, microbatch, k, batch_stats):
      if qat:
        params = quant.fake_quantize_params(params, setup.weight_axes)
      # copy=True: fresh Variables at this (grad) trace level. The "rest"
      # Variables belong to the jit's trace, and NNX's transforms inside the
      # model (nnx.scan over layers) refuse those; "rest" is empty unless
      # frozen weights live there (LoRA's base).
      model = nnx.merge(graphdef, params, state["rest"], copy=True)
      extra = {} if batch_stats is None else {"batch_stats": batch_stats}
      loss, metrics = model.loss(microbatch, train=True, rngs=nnx.Rngs(k), **kwargs, **extra)
      return loss * metrics["weight"], _weighted_sum(metrics)

    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)
    if m == 1:
      (_, sums), grads = grad_fn(state["params"], batch, key, None)
    else:
      micro = _microbatches(batch, m, setup.rules)
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(m))
      batch_stats = _global_batch_stats(graphdef, state, micro, keys, kwargs)

      def body(carry, xs):
        grads_acc, sums_acc = carry
        k, microbatch = xs
        (_, sums), grads = grad_fn(state["params"], microbatch, k, batch_stats)
        return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, state["params"])
      first = jax.tree.map(lambda x: x[0], micro)
      sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state["params"], first, key, batch_stats)[0][1]))
      (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), (keys, micro))
    total = jnp.maximum(sums["weight"], 1e-9)
    grads = jax.tree.map(lambda g: g / total, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    # With bfloat16 parameters the optimizer's arithmetic (bf16 moments with the f32 gradients divided by the
    # f32 total weight) returns float32 state; cast it back, so the state leaves the step in the dtypes it came
    # in: otherwise the donated buffers cannot hold the new state (a second copy of it, unaliased) and step 2
    # recompiles for the new dtypes.
    opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state["opt_state"])
    params = optax.apply_updates(state["params"], updates)
    metrics = _finish(sums)
    # Non-finite guard, decided here so the host needs no extra round trip: a step
    # whose loss, gradient norm or new parameters are not finite keeps the old
    # parameters and optimizer state (a select, no branch), so the train state is
    # finite by construction and a checkpoint of non-finite state cannot be
    # written. The host reads the "nonfinite" flag one step late (see wm.train)
    # and stops or counts the skip.
    param_norm = optax.tree.norm(params)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
    metrics["grad_norm"] = grad_norm
    metrics["param_norm"] = param_norm
    metrics["lr"] = schedule(state["step"])
    metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.int32)
    pruning = prune.find_state(opt_state)
    if pruning is not None:  # fraction of the pruned weights' elements at zero (wm/compress/prune.py)
      metrics["sparsity"] = prune.sparsity(pruning.masks)
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


def _model_metrics(model: nnx.Module, batch: dict, key: jax.Array) -> dict[str, jax.Array]:
  return model.loss(batch, train=False, rngs=nnx.Rngs(key))[1]


def make_eval_step(setup: Setup, score: Callable[[nnx.Module, dict, jax.Array], dict] | None = None,
                   int8_score: Callable[[nnx.Module, dict, jax.Array], dict] | None = None
                   ) -> Callable[[State, dict, jax.Array], dict]:
  """Metrics of the model on one batch, weighted sums (combine with `finish_sums`).

  With `quant.weights = "int8"` the same batch is scored again with the
  weights quantized to int8 (wm.compress.quant.quantize_params), reported as
  `int8_<metric>` next to the float model's metrics: the quality cost of
  serving the int8 model, measured on the same examples and latent samples.

  Args:
    setup: the run's setup.
    score: score(model, batch, key) -> the model's metrics (with "weight");
      default the model's own loss (the forward pass). wm.generate.decode_metrics
      scores through the decode path instead.
    int8_score: the same for the int8-weight model; default `score` (the
      decode path gives each model its own calibrated int8_static scales).
  """
  graphdef = setup.graphdef
  int8 = setup.config.quant.weights == "int8"
  score = score or _model_metrics
  int8_score = int8_score or score

  def eval_fn(params, rest, batch, key):
    # Subword text carries the bytes each target covers: their total over the
    # scored targets makes bits per byte exact (wm/data/subword.py). Summed as
    # integers, exact however many batches an evaluation adds up.
    target_bytes = batch.get("target_bytes")
    batch = {k: v for k, v in batch.items() if k != "target_bytes"}
    model = nnx.merge(graphdef, params, rest)
    sums = _weighted_sum(score(model, batch, key))
    if int8:
      quantized = nnx.merge(graphdef, quant.quantize_params(params, setup.weight_axes), rest)
      q_metrics = int8_score(quantized, batch, key)
      sums.update({f"int8_{k}": v for k, v in _weighted_sum(q_metrics).items() if k != "weight"})
    # Examples with at least one scored token; weight-0 padding rows do not count.
    sums["examples"] = jnp.sum((jnp.sum(batch["weights"], axis=-1) > 0).astype(jnp.float32))
    if target_bytes is not None:
      sums["bytes"] = jnp.sum(jnp.where(batch["weights"] > 0, target_bytes, 0))
    return sums

  jitted = jax.jit(eval_fn, in_shardings=(setup.state_shardings["params"], setup.state_shardings["rest"],
                                          setup.batch_sharding, parallel.replicated(setup.mesh)),
                   out_shardings=parallel.replicated(setup.mesh))

  def run(state, batch, key):
    with parallel.activate(setup.mesh, setup.rules):
      return jitted(state["params"], state["rest"], batch, key)

  return run


def finish_sums(sums: dict[str, Any]) -> dict[str, Any]:
  """Weighted sums accumulated over batches -> means (weight and examples stay totals).

  Vector metrics (e.g. a mixture's per-component usage) become lists.
  """
  w = max(float(sums["weight"]), 1e-9)
  out = {}
  for k, v in sums.items():
    v = np.asarray(v, np.float64) if k in TOTALS else np.asarray(v, np.float64) / w
    out[k] = float(v) if v.ndim == 0 else v.tolist()
  return out


def global_batch(setup: Setup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's slice of the batch -> one global array sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(setup.batch_sharding, np.asarray(v))
          for k, v in local.items()}


def model_from_state(setup: Setup, state: State) -> nnx.Module:
  return nnx.merge(setup.graphdef, state["params"], state["rest"])

