"""The train and eval steps compile once per shape: no recompiles or host round-trips in the loop.

A second compile of the train step on a CPU quick config costs as much as
hundreds of steps, and happens silently when, e.g., the step counter comes
back weakly typed, a Python scalar reaches the jitted function, or the
output shardings differ from the input ones. These tests run the steps the
way the loop does (`wm.step`, state fed back, fresh batches) and count XLA
compiles through jax.monitoring.
"""

import jax
import jax.monitoring
import numpy as np
import pytest

from wm import config as config_lib
from wm import step as step_lib

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = []


def _listen(event, duration, **kwargs):
  del duration, kwargs
  if event == _COMPILE_EVENT:
    _compiles.append(event)


jax.monitoring.register_event_duration_secs_listener(_listen)


def tiny(model):
  c = config_lib.base_config()
  c.data.task = "text"
  c.data.seq_len, c.data.vocab_size, c.data.batch_size = 16, 64, 4
  c.model.name, c.model.d, c.model.layers, c.model.heads, c.model.kv_heads = model, 16, 2, 2, 1
  c.optim.warmup_steps, c.train.steps = 2, 10
  c.mesh.num_devices = 1
  return config_lib.validate(c)


def batch(config, seed):
  rng = np.random.default_rng(seed)
  b, t = config.data.batch_size, config.data.seq_len
  tok = rng.integers(0, config.data.vocab_size, (b, t + 1), dtype=np.int32)
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "weights": np.ones((b, t), np.float32)}


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_train_and_eval_steps_compile_once(model):
  config = tiny(model)
  setup = step_lib.make_setup(config)
  state = step_lib.init_state(setup)
  train_step, eval_step = step_lib.make_train_step(setup), step_lib.make_eval_step(setup)
  keys = [jax.random.fold_in(jax.random.key(0), i) for i in range(4)]  # eager ops compile too: before counting

  state, metrics = train_step(state, step_lib.global_batch(setup, batch(config, 0)))
  eval_step(state, step_lib.global_batch(setup, batch(config, 0)), keys[0])
  jax.block_until_ready((state, metrics))
  del _compiles[:]
  for i in range(1, 4):  # the state fed back, new batch values: the loop's pattern
    state, metrics = train_step(state, step_lib.global_batch(setup, batch(config, i)))
    sums = eval_step(state, step_lib.global_batch(setup, batch(config, i)), keys[i])
    jax.block_until_ready((state, metrics, sums))
  assert _compiles == [], f"{len(_compiles)} XLA compiles after the first step"
  assert train_step.jitted._cache_size() == 1
  assert int(state["step"]) == 4
