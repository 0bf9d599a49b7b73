"""Config loading, overrides and validation errors that name the field."""

import glob
import os

import pytest

from wm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_every_config_file_loads_and_validates():
  paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
  assert len(paths) >= 4
  for path in paths:
    for arg in ("", ":quick"):
      config = config_lib.validate(config_lib.load(path + arg))
      assert config.model.name in config_lib.MODELS


def test_quantization_levers_validate():
  for lever in ({"quant.weights": "int8", "quant.qat": "int8", "quant.state": "float8_e4m3fn"},
                {"optim.name": "adamw8bit", "optim.state_block": 2048}, {"model.name": "lstm", "quant.state": "int8"},
                {"quant.state": "int8_static", "quant.calibration_batches": 2}):
    config_lib.validate(config_lib.override(config_lib.base_config(), lever))


def test_override_parses_types():
  c = config_lib.override(config_lib.base_config(), {"model.d": "256", "optim.lr": "3e-4",
                                                     "model.tie_embeddings": "false"})
  assert c.model.d == 256 and c.optim.lr == 3e-4 and c.model.tie_embeddings is False


@pytest.mark.parametrize("assignments, field", [
    ({"model.dd": "3"}, "model.dd"),
    ({"nosuch.d": "3"}, "nosuch"),
])
def test_unknown_field_is_named(assignments, field):
  with pytest.raises(config_lib.ConfigError, match=field):
    config_lib.override(config_lib.base_config(), assignments)


def test_wrong_type_is_named():
  with pytest.raises(config_lib.ConfigError, match="model.d"):
    config_lib.override(config_lib.base_config(), {"model.d": "wide"})
  c = config_lib.base_config()
  with pytest.raises(TypeError):  # ConfigDict itself keeps field types
    c.model.d = "wide"


@pytest.mark.parametrize("assignments, message", [
    ({"model.d": -4}, "model.d"),
    ({"model.heads": 3}, "heads=3 must divide d=128"),
    ({"model.kv_heads": 3}, "kv_heads=3 must divide heads"),
    ({"model.window": 1000}, "window=1000 is longer than data.seq_len"),
    ({"optim.microbatches": 5}, "must divide data.batch_size"),
    ({"data.num_kv_pairs": 40}, "need seq_len"),
    ({"remat.policy": "sometimes"}, "remat.policy"),
    ({"remat.policy": "save:"}, "names no tensors"),
    ({"optim.name": "lion"}, "optim.name"),
    ({"train.budget": "lots"}, "512MiB"),
    ({"optim.b1": 5.0}, r"optim.b1: must be in \[0, 1\)"),
    ({"optim.eps": -1.0}, "optim.eps: must be > 0"),
    ({"optim.min_lr_ratio": -3.0}, r"optim.min_lr_ratio: must be in \[0, 1\]"),
    ({"optim.lr": float("inf")}, "optim.lr=inf must be a finite number"),
    ({"data.worker_count": -3}, "data.worker_count: must be >= 0"),
    ({"seed": -1}, "seed: must be in"),
    ({"remat.policy": "full:qkv"}, "full takes no tensor names"),
    ({"remat.policy": "offload:qkv,,mlp_hidden"}, "empty name"),
    ({"remat.policy": "save:gates"}, r"model 'transformer' has no tensor\(s\) tagged \['gates'\]"),
    ({"model.name": "lstm", "remat.policy": "save:qkv"}, r"tagged \['qkv'\]; it tags \['c', 'gates', 'h'\]"),
    ({"model.name": "vae", "model.encoder": "transformer", "remat.policy": "save:gates"}, "it tags none"),
    ({"mesh.rules": (("batch", "nope"),)}, "'nope' is not a mesh axis"),
    ({"mesh.rules": (("batch",),)}, "each rule is a pair"),
    ({"train.on_nonfinite": "ignore"}, "train.on_nonfinite"),
    ({"optim.name": "adam8bit"}, "optim.name"),
    ({"optim.name": "adamw8bit", "optim.state_block": 4}, "optim.state_block: must be >= 16"),
    ({"quant.weights": "int4"}, "quant.weights: 'int4' is not one of"),
    ({"quant.qat": "fp8"}, "quant.qat: 'fp8' is not one of"),
    ({"quant.state": "int4"}, "quant.state: 'int4' is not one of"),
    # A misspelt static mode names every allowed value, the static one among them.
    ({"quant.state": "int8-static"},
     r"quant.state: 'int8-static' is not one of \('float32', 'bfloat16', 'int8', 'int8_static', 'float8_e4m3fn'\)"),
    ({"quant.state": "int8_static", "quant.calibration_batches": 0}, "quant.calibration_batches: must be >= 1"),
    ({"model.name": "vae", "quant.state": "int8_static"}, "quant.state: applies to the lstm and transformer"),
    ({"model.name": "vae", "quant.state": "int8"}, "quant.state: applies to the lstm and transformer"),
    ({"data.task": "text", "data.text_source": "files", "data.text_files": "/nonexistent/*.txt"},
     "matches no file"),
])
def test_impossible_values_are_named(assignments, message):
  c = config_lib.override(config_lib.base_config(), assignments)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_text_sets_byte_vocabulary():
  c = config_lib.override(config_lib.base_config(), {"data.task": "text"})
  assert config_lib.validate(c).data.vocab_size == 256


@pytest.mark.parametrize("text, expected", [("512MiB", 512 * 2**20), ("8GiB", 8 * 2**30), ("16GB", 16 * 10**9),
                                            ("1e6", 10**6)])
def test_parse_bytes(text, expected):
  assert config_lib.parse_bytes(text) == expected


def test_missing_config_file():
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.load("configs/nope.py:quick")


def test_valid_tag_policies_pass():
  for name, policy in (("transformer", "save:qkv,attn_out"), ("lstm", "offload:gates"), ("vrnn", "save:h,c"),
                       ("vae", "save:gates")):
    config_lib.validate(config_lib.override(config_lib.base_config(), {"model.name": name, "remat.policy": policy}))


@pytest.mark.parametrize("text, message", [
    ("def get_config(arg=None)\n  pass\n", "cannot be loaded: SyntaxError"),
    ("def get_config(arg=None):\n  return {}\n", "must return an ml_collections.ConfigDict"),
    ("def get_config(arg=None):\n  raise ValueError('no such arg')\n", "failed: ValueError: no such arg"),
])
def test_broken_config_files_are_one_error(tmp_path, text, message):
  path = tmp_path / "c.py"
  path.write_text(text)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load(str(path))


def test_override_refuses_sections_and_malformed_lists():
  with pytest.raises(config_lib.ConfigError, match="config.model is a section"):
    config_lib.override(config_lib.base_config(), {"model": "3"})
  with pytest.raises(config_lib.ConfigError, match="config.mesh.rules"):
    config_lib.override(config_lib.base_config(), {"mesh.rules": '{"batch": "data"}'})


def test_command_line_overrides_keep_their_syntax():
  from wm import __main__ as cli
  verb, args = cli.parse(["train", "--config", "configs/mqar_transformer.py:quick", "--config.model.d", "32",
                          "--config.optim.lr=1", "--config.model.tie_embeddings", "no",
                          "--config.mesh.rules", '[["batch", ["data", "fsdp"]], ["latent", null]]'])
  c = args.config
  assert verb == "train" and c.model.d == 32 and c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
  assert c.model.tie_embeddings is False and c.mesh.rules == (["batch", ["data", "fsdp"]], ["latent", None])
