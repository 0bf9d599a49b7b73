"""wm.data.subword: exact round trip, the prepared model and streams, bits per byte against its definition."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from wm import config as config_lib
from wm import evaluation
from wm import step as step_lib
from wm import train
from wm.data import pipeline, subword

# The smallest vocabulary the stdlib corpus allows is 347 (256 byte pieces,
# unk, end-of-document and its common characters); 512 trains in a few seconds.
VOCAB = 512


def spm_config(data_dir, tokenizer=f"spm:{VOCAB}", **overrides):
  c = config_lib.base_config()
  c.data.update(dict(task="text", text_source="stdlib", tokenizer=tokenizer, seq_len=32, batch_size=8,
                     data_dir=str(data_dir)))
  c.model.update(dict(name="transformer", d=32, layers=1, heads=2, kv_heads=2))
  c.optim.warmup_steps = 2
  c.train.update(dict(steps=4, log_every=2, eval_every=2, eval_batches=2, checkpoint_every=4, progress=False))
  c.mesh.num_devices = 1
  return config_lib.validate(config_lib.override(c, overrides))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  config = spm_config(tmp_path_factory.mktemp("tfds"))
  pipeline.prepare(config)
  return config


def documents(config, split):
  source = tfds.builder_from_directory(pipeline.dataset_path(config)).as_data_source(split=split)
  return [r["text"] for r in source]


def test_config_errors_name_the_field_and_the_fix():
  for bad, fix in [("spm:0", "must be >= 259"), ("spm:-3", "must be >= 259"), ("spm", "'spm:N'"),
                   ("sentencepiece:4096", "'spm:N'")]:
    with pytest.raises(config_lib.ConfigError, match="data.tokenizer") as e:
      spm_config("", tokenizer=bad)
    assert fix in str(e.value)
  with pytest.raises(config_lib.ConfigError, match="data.tokenizer") as e:
    spm_config("", **{"data.task": "mqar"})
  assert "set data.tokenizer='bytes'" in str(e.value)
  # The vocabulary is the tokenizer's, whatever data.vocab_size said (as 256 is for bytes).
  assert spm_config("", **{"data.vocab_size": 64}).data.vocab_size == VOCAB
  assert spm_config("", tokenizer="bytes").data.vocab_size == 256


def test_a_vocabulary_too_small_for_the_corpus_says_how_large(prepared):
  with pytest.raises(config_lib.ConfigError, match=r"data.tokenizer: the train split of stdlib needs at least \d+ pieces"):
    subword.train(documents(prepared, "validation"), subword.Spec(subword.MIN_VOCAB), "stdlib")


def test_the_corpus_round_trips_exactly(prepared):
  folder = pipeline.tokens_folder(prepared)
  tokenizer = subword.load_tokenizer(folder)
  assert tokenizer.vocab_size == VOCAB
  docs = documents(prepared, "validation")
  assert all(tokenizer.decode(tokenizer.encode(d)) == d for d in docs)
  # The stored stream is the documents, each followed by the separator, and
  # every token's byte count is what it decodes to.
  stream = np.load(os.path.join(folder, "validation.tokens.npy"))
  assert tokenizer.decode(stream) == b"".join(d + b"\0" for d in docs)
  info = json.load(open(os.path.join(folder, "info.json")))["splits"]["validation"]
  assert info == {"tokens": len(stream), "bytes": sum(len(d) + 1 for d in docs)}
  assert info["tokens"] < 0.6 * info["bytes"]  # subwords are shorter than bytes


@pytest.mark.parametrize("text", [
    "", "x", "def f(x):\n    return  x + 1\n\n\n", "  leading and trailing   \t\t \r\n",
    "h\u00e9llo w\u00f6rld \u65e5\u672c\u8a9e \U0001F600 \u0645\u0631\u062d\u0628\u0627", "a\u2581b \u2581\u2581 c",
    "nul\x00inside\x00\x00", "\u2028line\u2029sep\x0b\x0c\x85", " " * 40 + "\n" * 5,
])
def test_odd_text_round_trips_exactly(prepared, text):
  tokenizer = subword.load_tokenizer(pipeline.tokens_folder(prepared))
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text.encode("utf-8")
  assert int(tokenizer.token_bytes[ids].sum()) == len(text.encode("utf-8"))
  if "\u2581" not in text:  # SentencePiece's own decoder agrees (it reads U+2581 as a space)
    assert tokenizer.sp.decode(ids.tolist()) == text


def test_bytes_that_are_not_utf8_round_trip(prepared):
  tokenizer = subword.load_tokenizer(pipeline.tokens_folder(prepared))
  for raw in [b"caf\xe9", b"\xff\xfe\x00ok", b"# -*- coding: latin-1 -*-\n\xa9 1999\n", b"\xe6\x97"]:
    assert tokenizer.decode(tokenizer.encode(raw)) == raw


def test_training_is_deterministic_and_prepare_reuses_the_model(prepared):
  folder = pipeline.tokens_folder(prepared)
  assert os.path.dirname(folder) == pipeline.dataset_path(prepared)  # beside the prepared dataset
  model_path = os.path.join(folder, "spm.model")
  before = os.stat(model_path).st_mtime_ns
  pipeline.prepare(prepared)  # present and matching: nothing is trained again
  assert os.stat(model_path).st_mtime_ns == before
  again = subword.train(documents(prepared, "train"), subword.Spec(VOCAB), "stdlib")
  assert again == open(model_path, "rb").read()


def test_a_model_that_does_not_match_is_refused(prepared, tmp_path):
  # A folder named for 1024 pieces holding a 512-piece model (copied by hand).
  copy = str(tmp_path / "spm-bpe-1024-copy")
  shutil.copytree(pipeline.tokens_folder(prepared), copy)
  with pytest.raises(config_lib.ConfigError, match="data.tokenizer asks for 1024 pieces") as e:
    subword.read_info(copy, subword.Spec(1024))
  assert "Delete that folder and prepare again" in str(e.value)


def test_examples_carry_the_bytes_of_their_targets(prepared):
  source = pipeline.examples(prepared, "validation")
  tokenizer = subword.load_tokenizer(pipeline.tokens_folder(prepared))
  rows = pipeline.read_rows(source, [0, 3, len(source)])  # the last is padding
  assert rows["inputs"].shape == (3, 32) and rows["inputs"].max() < VOCAB
  np.testing.assert_array_equal(rows["inputs"][:, 1:], rows["targets"][:, :-1])
  np.testing.assert_array_equal(rows["target_bytes"][:2], tokenizer.token_bytes[rows["targets"][:2]])
  assert rows["weights"][2].sum() == 0 and rows["target_bytes"][2].sum() == 0
  # Training batches hold what models read, no more.
  batch = next(pipeline.make_iterator(prepared, "train", shuffle=True, num_epochs=None))
  assert sorted(batch) == ["inputs", "targets", "weights"]


def test_bits_per_byte_is_nats_over_the_bytes_the_scored_tokens_cover(prepared):
  setup = step_lib.make_setup(prepared)
  state, eval_step = step_lib.init_state(setup), step_lib.make_eval_step(setup)
  metrics = evaluation.evaluate(prepared, setup, state, eval_step)
  model = step_lib.model_from_state(setup, state)
  nats = nbytes = tokens = 0.0
  for batch in evaluation.eval_batches(prepared):
    logits = np.asarray(model(batch["inputs"]), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    xent = logz - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    nats += float(np.sum(xent * batch["weights"]))
    nbytes += float(np.sum(batch["target_bytes"] * batch["weights"]))
    tokens += float(np.sum(batch["weights"]))
  assert metrics["eval_bytes"] == nbytes and metrics["eval_tokens"] == tokens == 2 * 8 * 32
  assert metrics["bits_per_byte"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)
  assert metrics["tokens_per_byte"] == pytest.approx(tokens / nbytes)


def test_a_short_run_on_subword_text_records_tokens_per_byte(prepared, tmp_path):
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(prepared, workdir)
  evals = [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [0, 2, 4]
  for r in evals:
    assert 0.2 < r["tokens_per_byte"] < 0.6 and r["tokens_per_byte"] == r["eval_tokens"] / r["eval_bytes"]
    assert math.isfinite(r["bits_per_byte"])
  assert result["eval"]["tokens_per_byte"] == evals[-1]["tokens_per_byte"]
  # Train lines convert with the train split's mean bytes per token.
  info = json.load(open(os.path.join(pipeline.tokens_folder(prepared), "info.json")))["splits"]["train"]
  line = next(r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if r["split"] == "train")
  assert line["bits_per_byte"] == pytest.approx(line["nll"] / math.log(2) * info["tokens"] / info["bytes"])
