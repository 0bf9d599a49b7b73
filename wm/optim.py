"""Optimizers and learning-rate schedules from the config (optax).

Gradient accumulation lives in `wm.step` (microbatches inside one jitted step,
so the memory saving is visible to the compiler); precision lives in the
models (parameters stored in `param_dtype`, matmuls in `compute_dtype`).
"""

from __future__ import annotations

import ml_collections
import optax

from wm.compress import adam8bit, prune as prune_lib


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `optim.lr`, then cosine, inverse-sqrt or constant.

  Cosine is optax's `warmup_cosine_decay_schedule`: it decays over the
  `total_steps - warmup` steps after warmup to `lr * min_lr_ratio`
  (Loshchilov & Hutter 2017, without restarts). Inverse-sqrt is the schedule
  of Vaswani et al. 2017: lr * sqrt(warmup / step) after warmup, continuous at
  the end of warmup.
  """
  warmup = max(int(optim.warmup_steps), 0)
  peak = float(optim.lr)
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, warmup + max(total_steps - warmup, 1),
                                              end_value=peak * float(optim.min_lr_ratio))
  if optim.schedule == "inverse_sqrt":
    scale = max(warmup, 1)
    after = lambda step: peak * (scale / (step + scale)) ** 0.5
  else:
    after = optax.constant_schedule(peak)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], boundaries=[warmup])


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The config's optimizer with clipping and schedule.

  State per parameter: adamw 2 values (first and second moments), adamw8bit
  the same two as int8 codes plus a float32 scale per `state_block` elements
  (Dettmers et al. 2022; wm/compress/adam8bit.py), sgd with momentum 1,
  adagrad 1, adafactor about (rows + cols) / (rows * cols) for matrices
  (Shazeer & Stern 2018); `wm.memory.estimate` counts the real state.
  """
  schedule = learning_rate_schedule(optim, total_steps)
  if optim.name == "adamw":
    opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
  elif optim.name == "adamw8bit":
    opt = adam8bit.adamw8bit(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                             block=optim.state_block)
  elif optim.name == "adafactor":
    # multiply_by_parameter_scale=False keeps `lr` an absolute step size, as for the others.
    opt = optax.adafactor(schedule, multiply_by_parameter_scale=False, weight_decay_rate=optim.weight_decay or None)
  elif optim.name == "sgd":
    opt = optax.sgd(schedule, momentum=optim.momentum or None)
  elif optim.name == "adagrad":
    opt = optax.adagrad(schedule, eps=max(optim.eps, 1e-10))
  else:
    raise ValueError(f"config.optim.name={optim.name!r} is not a known optimizer")
  if optim.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(optim.clip_norm), opt)
  return opt


def with_pruning(tx: optax.GradientTransformation, prune: ml_collections.ConfigDict,
                 weight_axes: dict) -> optax.GradientTransformation:
  """`tx` wrapped in gradual magnitude pruning (config.prune; wm/compress/prune.py), or `tx` when it is off.

  The wrapper goes outside the whole chain (clipping included): gradients are
  masked before anything reads them, and its last act holds pruned weights at
  exactly zero whatever the chain added. Which weights and along which axes
  N:M groups run come from the model (`quant.weight_axes(model)`), which is
  why this is a second call after `make_optimizer`.
  """
  pruning = prune_lib.Pruning.from_config(prune, weight_axes)
  return tx if pruning is None else prune_lib.pruned(tx, pruning)
