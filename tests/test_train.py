"""The training loop: learning, exact resume, accumulation, records, refusals."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wm import config as config_lib
from wm import evaluation
from wm import models
from wm import step as step_lib
from wm import train
from wm.data import pipeline
from tests.test_parallel import a_batch


def tiny_config(tmp_path, model="transformer", steps=40, **overrides):
  c = config_lib.base_config()
  c.data.task = "mqar"
  c.data.seq_len = 32
  c.data.vocab_size = 64
  c.data.num_kv_pairs = 4
  c.data.batch_size = 16
  c.data.train_size = 2000
  c.data.eval_size = 64
  c.data.data_dir = str(tmp_path / "tfds")
  c.model.name = model
  c.model.d = 32
  c.model.layers = 2
  c.model.heads = 2
  c.model.kv_heads = 2
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 5
  c.train.steps = steps
  c.train.log_every = 10
  c.train.eval_every = 20
  c.train.eval_batches = 2
  c.train.checkpoint_every = 10
  c.train.progress = False
  c.mesh.num_devices = 1
  c = config_lib.override(c, overrides)
  return config_lib.validate(c)


def read_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_gradient_accumulation_equals_one_batch(tmp_path, model):
  results = []
  for m in (1, 4):
    config = tiny_config(tmp_path, model, **{"optim.microbatches": m})
    setup = step_lib.make_setup(config)
    state, metrics = step_lib.make_train_step(setup)(step_lib.init_state(setup),
                                                     step_lib.global_batch(setup, a_batch(config)))
    results.append((jax.device_get(state["params"]), float(metrics["loss"])))
  (p1, l1), (p4, l4) = results
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _sgd_gradient(config, monkeypatch):
  """The gradient the train step applies, read off one SGD step with lr 1 (p_new = p - g)."""
  setup = step_lib.make_setup(config)
  state = step_lib.init_state(setup)
  before = jax.device_get(state["params"])
  with monkeypatch.context() as patch:
    # Zero posterior noise (z = mu): the latent sample then no longer depends on how the batch
    # is split into microbatches (each draws from its own key), and gradients can be compared exactly.
    patch.setattr(jax.random, "normal", lambda key, shape=(), dtype=jnp.float32: jnp.zeros(shape, dtype))
    state, _ = step_lib.make_train_step(setup)(state, step_lib.global_batch(setup, a_batch(config)))
  return [a - b for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state["params"])))]


# Floors near the per-dimension KL at init, so microbatch means fall on both sides of them.
@pytest.mark.parametrize("model, free_bits", [("vae", 0.6), ("vrnn", 0.18)])
def test_latent_accumulation_keeps_free_bits_global(tmp_path, model, free_bits, monkeypatch):
  """Free bits floor the KL's mean over the *global* batch: 4 microbatches give one batch's gradient."""
  overrides = {"model.latent_dim": 8, "model.free_bits": free_bits, "model.kl_schedule": "constant",
               "optim.name": "sgd", "optim.momentum": 0.0, "optim.lr": 1.0, "optim.warmup_steps": 0,
               "optim.clip_norm": 0.0, "optim.schedule": "constant"}
  grads = {m: _sgd_gradient(tiny_config(tmp_path, model, **overrides, **{"optim.microbatches": m}), monkeypatch)
           for m in (1, 4)}
  for a, b in zip(grads[1], grads[4]):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)
  # Control: free bits applied per microbatch (the old accumulation) give a different gradient,
  # so the comparison above can fail.
  cls = type(models.build(tiny_config(tmp_path, model, **overrides), nnx.Rngs(0)))
  monkeypatch.setattr(cls, "needs_batch_statistics", property(lambda self: False))
  local = _sgd_gradient(tiny_config(tmp_path, model, **overrides, **{"optim.microbatches": 4}), monkeypatch)
  assert any(not np.allclose(a, b, rtol=2e-4, atol=2e-6) for a, b in zip(grads[1], local))


def test_short_run_learns_and_leaves_records(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(tmp_path, steps=60), workdir)
  records = read_records(workdir)
  train_lines = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert {"step", "split", "loss", "accuracy", "tokens_per_s"} <= set(train_lines[0])
  assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
  assert train_lines[-1]["loss"] < train_lines[0]["loss"] - 0.3
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_resume_matches_uninterrupted_run(tmp_path):
  config = tiny_config(tmp_path, steps=30)
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
  first = train.train_and_evaluate(config, str(tmp_path / "parts"), stop_after_step=12)
  assert first["step"] == 12
  rest = train.train_and_evaluate(config, str(tmp_path / "parts"))
  assert rest["step"] == 30
  for a, b in zip(jax.tree.leaves(jax.device_get(whole["state"])), jax.tree.leaves(jax.device_get(rest["state"]))):
    np.testing.assert_array_equal(a, b)
  # the resumed run logged from step 13 on, not from 0 again
  steps = [r["step"] for r in read_records(str(tmp_path / "parts")) if r["split"] == "train"]
  assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_resume_cuts_records_logged_after_the_checkpoint(tmp_path):
  config = tiny_config(tmp_path, steps=30)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir, stop_after_step=20)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:  # what a run killed at step 27 had logged
    f.write(json.dumps({"step": 25, "split": "train", "loss": 9.0}) + "\n")
    f.write('{"step": 27, "split": "tr')  # a line cut short by the kill
  train.train_and_evaluate(config, workdir)
  lines = read_records(workdir)
  assert [r["step"] for r in lines if r["split"] == "train"] == [10, 20, 30]
  assert 9.0 not in [r["loss"] for r in lines]


def test_harmless_change_resumes_and_appends_to_the_config_history(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(tmp_path, steps=10), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    original = f.read()
  changed = {"model.dropout": 0.1, "train.steps": 20, "train.eval_batches": 0, "optim.lr": 1e-3,
             "remat.policy": "full"}
  result = train.train_and_evaluate(tiny_config(tmp_path, steps=20, **changed), workdir)
  assert result["step"] == 20
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == original  # the creating run's record is never rewritten
  with open(os.path.join(workdir, "config_history.jsonl")) as f:
    history = [json.loads(line) for line in f]
  assert len(history) == 1 and history[0]["resumed_from_step"] == 10
  assert history[0]["changed"]["model.dropout"] == [0.0, 0.1]
  assert history[0]["config"]["remat"]["policy"] == "full"


@pytest.mark.parametrize("change, named", [
    ({"optim.clip_norm": 0.0}, r"state\['opt_state'\]"),  # clipping adds optimizer state: a structural change
    ({"data.seq_len": 16}, "data.seq_len: checkpoint 32, now 16"),  # another data stream
    ({"seed": 1}, "seed: checkpoint 0, now 1"),
    ({"precision.param_dtype": "bfloat16"}, "float32, now .* bfloat16"),
])
def test_structural_or_data_change_is_refused(tmp_path, change, named):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(tmp_path, steps=10), workdir)
  with pytest.raises(train.IncompatibleWorkdir, match=named):
    train.train_and_evaluate(tiny_config(tmp_path, steps=20, **change), workdir)
  assert not os.path.exists(os.path.join(workdir, "config_history.jsonl"))


def test_eval_scores_the_whole_split_or_a_fixed_sample_spread_over_it(tmp_path):
  # eval_size=40 is not a multiple of the batch (16): the whole-split pass pads its last batch.
  config = tiny_config(tmp_path, steps=0, **{"data.eval_size": 40, "train.eval_batches": 0})
  pipeline.prepare(config)
  setup = step_lib.make_setup(config)
  state, eval_step = step_lib.init_state(setup), step_lib.make_eval_step(setup)
  examples = pipeline.examples(config, "validation")
  tokens = lambda rows: sum(float(np.sum(examples[i]["weights"])) for i in rows)
  whole = evaluation.evaluate(config, setup, state, eval_step)
  assert whole["eval_examples"] == 40 and whole["eval_tokens"] == tokens(range(40))

  sampled = config_lib.override(config, {"train.eval_batches": 2})
  first = evaluation.evaluate(sampled, setup, state, eval_step)
  assert first == evaluation.evaluate(sampled, setup, state, eval_step)  # the same sample every time
  assert first["eval_examples"] == 32
  # The 32 examples are drawn from all 40, not the first 32 in file order.
  picked = sorted(evaluation.eval_indices(40, 16, 2))
  assert len(picked) == len(set(picked)) == 32 and max(picked) >= 32
  scored = {tuple(r) for b in evaluation.eval_batches(sampled) for r, w in zip(b["targets"], b["weights"]) if w.any()}
  assert scored == {tuple(examples[i]["targets"]) for i in picked}
  assert first["eval_tokens"] == tokens(picked)
