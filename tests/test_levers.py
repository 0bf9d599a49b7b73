"""Memory levers on the model: cross-layer sharing (ALBERT) and LoRA fine-tuning from a pretrained run.

References: sharing against an unshared model whose layers are tied by copying
the same weights (same loss; a shared weight's gradient is the sum of the tied
layers'); LoRA against its base model (equal at the start, and after merging
the adapters); init_from against the pretrained checkpoint's arrays.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from wm import __main__ as cli
from wm import checkpoints as ckpt_lib
from wm import config as config_lib
from wm import finetune, models, resume
from wm import step as step_lib
from wm import train
from wm import workdir as workdir_lib
from wm.memory import estimate as estimate_lib
from wm.memory import model_states
from wm.memory import measure
from wm.models import layers as L
from wm.models import sharing
from tests.test_models import FAST, init, tokens
from tests.test_parallel import a_batch
from tests.test_train import read_records, tiny_config


def model_config(name="transformer", *, layers=4, share=1, rank=0, policy="none", **model):
  c = config_lib.base_config()
  c.model.name = name
  c.data.vocab_size, c.data.seq_len = 37, 16
  c.model.d, c.model.layers, c.model.heads, c.model.kv_heads, c.model.mlp_ratio = 16, layers, 4, 2, 2
  c.model.share_layers, c.model.lora_rank = share, rank
  c.remat.policy = policy
  for k, v in model.items():
    c.model[k] = v
  return config_lib.validate(c)


def build(config):
  # A clone: modules merged from init's cached state share its Variables, and these tests change them.
  return nnx.clone(init(lambda: models.build(config, nnx.Rngs(0))))


def _stacked(path) -> bool:
  return any(getattr(k, "key", None) in ("blocks", "stacked") for k in path)


def loss_and_grads(model, batch):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @functools.partial(jax.jit, compiler_options=FAST)
  def run(params, rest, batch):
    def loss(params):
      return nnx.merge(graphdef, params, rest, copy=True).loss(batch, train=False)[0]
    return jax.value_and_grad(loss)(params)

  loss, grads = run(params, rest, batch)
  return float(loss), nnx.to_pure_dict(grads)


forward = jax.jit(lambda gd, st, t: nnx.merge(gd, st)(t), static_argnums=0, compiler_options=FAST)


def a_model_batch(b=2, t=16, vocab=37):
  tok = np.asarray(tokens(b, t, vocab))
  return {"inputs": tok, "targets": np.roll(tok, -1, axis=1), "weights": np.ones((b, t), np.float32)}


# ----------------------------------------------------------------------------- cross-layer sharing


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_shared_path_at_g1_is_the_unshared_scan_bitwise(name):
  """share_layers=1 runs the unshared nnx.scan unchanged; the sharing machinery at g=1 computes the same bits."""
  model = build(model_config(name, layers=2))
  x = model.embed(tokens())

  @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
  def both(graphdef, state, x):
    m = nnx.merge(graphdef, state)
    if name == "transformer":
      plain = m.stack(x)
      body = lambda h, block, key: (block(h, jnp.arange(x.shape[1]), key), None)
      h, _ = sharing.apply_shared(body, x, m.stack.blocks, (None,), share=1, remat_policy="none",
                                  tags=m.REMAT_TAGS)
      return plain, m.stack.final_norm(h)
    plain, _ = m.stack(x)
    zeros = jnp.zeros((2, x.shape[0], m.d))
    body = lambda h, layer, hh, cc: (lambda y: (y[0], y[1]))(layer(h, hh, cc, 0, True))
    h, _ = sharing.apply_shared(body, x, m.stack.stacked, (zeros, zeros), share=1, remat_policy="none",
                                tags=m.REMAT_TAGS)
    return plain, h

  plain, shared = both(*nnx.split(model), x)
  np.testing.assert_array_equal(plain, shared)


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_full_sharing_keeps_one_layer_of_parameters(name):
  counts = {}
  for g in (1, 4):
    state = nnx.state(nnx.eval_shape(lambda: models.build(model_config(name, share=g), nnx.Rngs(0))), nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    counts[g] = (sum(x.size for p, x in leaves if _stacked(p)), sum(x.size for p, x in leaves if not _stacked(p)))
  assert counts[4][0] * 4 == counts[1][0]  # the stack: 1/layers of its parameters
  assert counts[4][1] == counts[1][1]  # embedding, norms, head: unchanged


@pytest.mark.parametrize("name,policy", [("transformer", "none"), ("transformer", "full"),
                                         ("lstm", "none"), ("lstm", "full")])
def test_shared_gradient_is_the_sum_over_tied_layers(name, policy):
  """Sharing equals an unshared model whose layers hold copies of the same weights, and a
  shared weight's gradient is the sum of the gradients of the layers that use it."""
  shared = build(model_config(name, share=2, policy=policy))
  tied = build(model_config(name, share=1, policy=policy))
  values = nnx.to_pure_dict(nnx.state(shared, nnx.Param))
  copies = jax.tree_util.tree_map_with_path(lambda p, x: np.repeat(x, 2, axis=0) if _stacked(p) else x, values)
  state = nnx.state(tied, nnx.Param)
  nnx.replace_by_pure_dict(state, copies)
  nnx.update(tied, state)

  batch = a_model_batch()
  loss_s, grads_s = loss_and_grads(shared, batch)
  loss_t, grads_t = loss_and_grads(tied, batch)
  np.testing.assert_allclose(loss_s, loss_t, rtol=1e-6)

  def check(path, g_shared, g_tied):
    g_tied = np.asarray(g_tied)
    if _stacked(path):  # layers 2s and 2s + 1 apply set s
      g_tied = g_tied.reshape((2, 2) + g_tied.shape[1:]).sum(axis=1)
    np.testing.assert_allclose(g_shared, g_tied, rtol=2e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(check, grads_s, grads_t)


def test_shared_decoding_matches_the_forward_pass():
  model = build(model_config("transformer", share=2))
  tok = tokens()
  cache = model.init_cache(2, 16)
  step = jax.jit(lambda gd, st, t, c: nnx.merge(gd, st).decode_step(t, c), static_argnums=0, compiler_options=FAST)
  logits, cache = step(*nnx.split(model), tok[:, 0], cache)
  assert cache["k"].shape[0] == 4  # the cache stays per layer
  full = forward(*nnx.split(model), tok)
  np.testing.assert_allclose(logits, full[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_estimate_divides_parameter_and_optimizer_bytes_by_the_group(name):
  est = {g: estimate_lib.estimate(model_config(name, share=g), 1) for g in (1, 2, 4)}
  stack = sum(int(np.prod(shape)) for shape, _, names, _ in model_states.param_leaves(model_config(name))
              if "layers" in names)
  for g in (2, 4):
    assert est[1].detail["param_count"] - est[g].detail["param_count"] == stack - stack // g
    assert est[g].optimizer == 2 * est[g].params  # AdamW's two moments, on one device
    assert est[g].detail["saved_activations"] == est[1].detail["saved_activations"]  # activations do not divide


def test_remat_still_saves_memory_under_sharing():
  from tests.test_memory import tiny
  temp = {}
  for policy in ("none", "full"):
    c = config_lib.validate(config_lib.override(tiny(policy=policy), {"model.share_layers": 2}))
    temp[policy] = measure.compiled(c)["temp_size_in_bytes"]
  assert temp["full"] < temp["none"]


# ----------------------------------------------------------------------------- LoRA


def _with_base_of(lora_model, base_model):
  """`lora_model` with `base_model`'s parameters copied into its base weights (the adapters untouched)."""
  nnx.update(lora_model, nnx.state(base_model, finetune.BASE))
  return lora_model


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_lora_model_starts_equal_to_its_base(name):
  base = build(model_config(name, layers=2))
  lora = _with_base_of(build(model_config(name, layers=2, rank=4)), base)
  np.testing.assert_array_equal(forward(*nnx.split(lora), tokens()), forward(*nnx.split(base), tokens()))


@pytest.mark.parametrize("name,share", [("transformer", 1), ("transformer", 2), ("lstm", 1)])
def test_merging_the_adapters_gives_the_adapted_model(name, share):
  config = model_config(name, layers=2, share=share, rank=4, lora_alpha=8.0)
  lora = build(config)
  adapters = nnx.state(lora, nnx.LoRAParam)
  noisy = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapters)
  nnx.update(lora, noisy)  # B != 0: the adapters change the model
  adapted = forward(*nnx.split(lora), tokens())

  merged = nnx.clone(lora)
  L.merge_lora(merged)
  plain = build(finetune.base_config(config))
  nnx.update(plain, nnx.state(merged, finetune.BASE))
  np.testing.assert_allclose(forward(*nnx.split(plain), tokens()), adapted, rtol=1e-4, atol=1e-4)
  base_out = forward(*nnx.split(_with_base_of(build(config), lora)), tokens())  # adapters at init: B = 0
  assert not np.allclose(base_out, adapted, atol=1e-3)


def test_lora_trains_only_the_adapters(tmp_path):
  config = tiny_config(tmp_path, **{"model.lora_rank": "4"})
  setup = step_lib.make_setup(config)
  trainable = jax.tree_util.tree_flatten_with_path(setup.abstract_state["params"])[0]
  assert trainable and all("lora" in jax.tree_util.keystr(p) for p, _ in trainable)
  adapters = sum(x.size for _, x in trainable)
  moments = [x for x in jax.tree.leaves(setup.abstract_state["opt_state"]) if x.ndim]
  assert sum(x.size for x in moments) == 2 * adapters  # AdamW: two moments per adapter value, none for the base
  state = step_lib.init_state(setup)
  before = jax.device_get((state["params"], state["rest"]))
  train_step = step_lib.make_train_step(setup)
  # Step 0 has learning rate 0 (warm-up); step 1 moves B only (A's gradient is 0 while B = 0); step 2 both.
  for seed in range(3):
    state, _ = train_step(state, step_lib.global_batch(setup, a_batch(config, seed)))
  params, rest = jax.device_get((state["params"], state["rest"]))
  jax.tree.map(np.testing.assert_array_equal, rest, before[1])  # the base is frozen
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params, before[0])
  assert all(jax.tree.leaves(changed))


def test_lora_optimizer_state_bytes_on_the_compiled_step():
  """The compiled step's arguments, by part: LoRA's optimizer state is the adapters' share of full fine-tuning's."""
  from tests.test_memory import tiny
  full = measure.compiled(tiny())
  lora = measure.compiled(config_lib.validate(config_lib.override(tiny(), {"model.lora_rank": "2"})))
  for r in (full, lora):
    assert sum(r["argument_bytes"].values()) == r["argument_size_in_bytes"]
  counts = estimate_lib.estimate(config_lib.validate(config_lib.override(tiny(), {"model.lora_rank": "2"})), 1)
  share = counts.detail["trainable_param_count"] / estimate_lib.estimate(tiny(), 1).detail["param_count"]
  scalars = 2 * 4  # AdamW's and clipping's int32 counts
  ratio = (lora["argument_bytes"]["opt_state"] - scalars) / (full["argument_bytes"]["opt_state"] - scalars)
  assert ratio == pytest.approx(share, rel=1e-9)
  assert counts.optimizer == lora["argument_bytes"]["opt_state"] - scalars
  assert counts.grads < estimate_lib.estimate(tiny(), 1).grads


def test_lora_rank8_optimizer_state_is_under_5_percent_at_d384():
  """configs/text_transformer.py (d=384, 6 layers) with rank 8: optimizer state per device, as the step's argument."""
  base = config_lib.load("configs/text_transformer.py")
  sizes = {}
  for rank in (0, 8):
    config = config_lib.validate(config_lib.override(base, {"model.lora_rank": str(rank), "mesh.num_devices": "1"}))
    sizes[rank] = measure.argument_bytes(step_lib.make_setup(config))["opt_state"]
  assert sizes[8] / sizes[0] <= 0.05


# ----------------------------------------------------------------------------- pretrain, then fine-tune


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  root = tmp_path_factory.mktemp("levers")
  config = tiny_config(root, steps=4, **{"train.checkpoint_every": "4", "train.eval_every": "4"})
  workdir = str(root / "base")
  result = train.train_and_evaluate(config, workdir)
  return root, workdir, result


def _restore_params(workdir, step):
  config = finetune.config_from_record(workdir_lib.read_saved_config(workdir))
  setup = step_lib.make_setup(config)
  with ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints"))) as manager:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract_state)))
  return jax.device_get(nnx.to_pure_dict(state["state"]["params"]))


def test_lora_finetune_from_a_pretrained_run(pretrained):
  root, base_dir, base = pretrained
  base_params = _restore_params(base_dir, 4)
  config = tiny_config(root, steps=4, **{"model.lora_rank": "4", "train.init_from": base_dir,
                                         "train.checkpoint_every": "4", "train.eval_every": "4"})
  lora_dir = str(root / "lora")
  result = train.train_and_evaluate(config, lora_dir)

  # Starts at the pretrained model (B = 0): its step-0 evaluation is the base's last one.
  first = [r for r in read_records(lora_dir) if r["split"] == "eval"][0]
  assert first["step"] == 0 and first["loss"] == pytest.approx(base["eval"]["loss"], rel=1e-6)
  # Trains adapters only: the frozen base in the fine-tuned state is the pretrained arrays, bit for bit.
  state = jax.device_get(result["state"])
  assert all("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0])
  rest = nnx.to_pure_dict(state["rest"])
  jax.tree.map(np.testing.assert_array_equal, rest, base_params)
  # The pretrained checkpoint is untouched: same arrays, checksums still verify.
  jax.tree.map(np.testing.assert_array_equal, _restore_params(base_dir, 4), base_params)
  assert ckpt_lib.verify(os.path.join(base_dir, "checkpoints", "4")) is None
  assert workdir_lib.read_saved_config(lora_dir)["init_from_checkpoint"]["step"] == 4

  # Export: adapters merged into the base give the fine-tuned model's evaluation as a plain model.
  out = str(root / "merged")
  assert cli.main(["export", "--workdir", lora_dir, "--out", out]) == 0
  position = os.path.join("4", resume.DATA_ITERATOR, "process_0-of-1.json")  # carried over: DIR can resume training
  with open(os.path.join(lora_dir, "checkpoints", position)) as a, open(os.path.join(out, "checkpoints", position)) as b:
    assert a.read() == b.read()
  assert ckpt_lib.verify(os.path.join(out, "checkpoints", "4")) is None
  merged_config = finetune.config_from_record(workdir_lib.read_saved_config(out))
  assert merged_config.model.lora_rank == 0
  merged = train.train_and_evaluate(merged_config, out)  # finished at step 4: evaluates the merged weights
  assert merged["step"] == 4
  assert merged["eval"]["loss"] == pytest.approx(result["eval"]["loss"], rel=1e-5)
  # A LoRA run is not a base to start from: export it first.
  with pytest.raises(train.WorkdirError, match="export"):
    train.train_and_evaluate(tiny_config(root, **{"train.init_from": lora_dir}), str(root / "again"))


def test_init_from_loads_onto_another_mesh(pretrained):
  """Full fine-tuning from a 1-device checkpoint on a 2-device FSDP mesh: the parameters reshard on load."""
  root, base_dir, _ = pretrained
  config = tiny_config(root, steps=0, **{"train.init_from": base_dir, "mesh.num_devices": "2", "mesh.fsdp": "2",
                                         "mesh.data": "1"})
  result = train.train_and_evaluate(config, str(root / "fsdp"))
  params = result["state"]["params"]
  embedding = params["embed"]["embedding"]
  assert len(embedding.sharding.device_set) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.to_pure_dict(params)), _restore_params(base_dir, 4))


def test_init_from_refuses_what_does_not_fit(pretrained, tmp_path):
  root, base_dir, _ = pretrained
  with pytest.raises(train.IncompatibleWorkdir, match=r"(?s)\['embed'\]\['embedding'\].*model\.d: 32 -> 48"):
    train.train_and_evaluate(tiny_config(root, **{"train.init_from": base_dir, "model.d": "48"}), str(tmp_path / "a"))
  with pytest.raises(train.WorkdirError, match="does not exist"):
    train.train_and_evaluate(tiny_config(root, **{"train.init_from": str(tmp_path / "nowhere")}), str(tmp_path / "b"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(train.WorkdirError, match="no verified checkpoint"):
    train.train_and_evaluate(tiny_config(root, **{"train.init_from": str(tmp_path / "empty")}), str(tmp_path / "c"))
  assert not os.path.exists(tmp_path / "a")  # refused before the workdir was created


# ----------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize("change,message", [
    ({"model.layers": "3", "model.share_layers": "2"}, r"model.share_layers: 2 does not divide model.layers=3.*\[1, 3\]"),
    ({"model.name": "vae", "model.share_layers": "2"}, r"model.share_layers: sharing is built for the lstm and"),
    ({"model.lora_rank": "256"}, r"model.lora_rank: 256 exceeds model.d=128"),
    ({"model.lora_alpha": "16"}, r"model.lora_alpha: is 16.0 but model.lora_rank=0"),
    ({"model.name": "vrnn", "model.lora_rank": "4"}, r"model.lora_rank: adapters are built for"),
    ({"model.share_layers": "0"}, r"model.share_layers: must be >= 1"),
])
def test_config_names_the_field_and_the_fix(change, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config_lib.override(config_lib.base_config(), change))


def test_export_needs_its_flags(capsys):
  assert cli.main(["export", "--workdir", "w"]) == 2
  assert "--out" in capsys.readouterr().err
  assert cli.main(["export", "--workdir", "w", "--out", "o", "--config", "configs/text_lstm.py"]) == 2
  assert cli.main(["train", "--workdir", "w"]) == 2
  assert "needs --config" in capsys.readouterr().err
