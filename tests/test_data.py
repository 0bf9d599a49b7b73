"""wm.data: task structure against reference rules, packing, TFDS builders, grain iterators."""

import os
import time

import numpy as np
import pytest

from wm import config as config_lib
from wm.data import corpus, pipeline, tasks, text


def make_config(task="mqar", data_dir="", **data):
  c = config_lib.base_config()
  c.data.task = task
  c.data.update(dict(seq_len=32, vocab_size=64, num_kv_pairs=4, copy_len=5, nback=3,
                     train_size=256, eval_size=40, batch_size=8, data_dir=str(data_dir)))
  c.data.update(data)
  return config_lib.validate(c)


def examples(data, split, n, start=0):
  return [tasks.example(data, split, i) for i in range(start, start + n)]


# ---------------------------------------------------------------------------
# Synthetic tasks

@pytest.mark.parametrize("seq_len,vocab_size,pairs,power_a", [(32, 64, 4, 0.01), (64, 8192, 8, 1.0), (17, 20, 4, 0.3)])
def test_mqar_structure(seq_len, vocab_size, pairs, power_a):
  data = make_config(seq_len=seq_len, vocab_size=vocab_size, num_kv_pairs=pairs, power_a=power_a).data
  half = vocab_size // 2
  for split in tasks.SPLITS:
    for e in examples(data, split, 200):
      x, y, w = e["inputs"], e["targets"], e["weights"]
      assert x.dtype == y.dtype == np.int32 and w.dtype == np.float32 and x.shape == (seq_len,)
      keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
      assert np.all((1 <= keys) & (keys < half)) and np.all((half <= values) & (values < vocab_size))
      assert len(set(keys.tolist())) == pairs
      assert np.all(x >= 1)  # noise avoids the padding token
      scored = np.flatnonzero(w)
      assert w.sum() == pairs and set(np.unique(w)) <= {0.0, 1.0}
      # Queries sit after the prefix at even offsets (Zoology's 2D + 2 * gap), one per key...
      assert np.all(scored >= 2 * pairs) and np.all((scored - 2 * pairs) % 2 == 0)
      assert sorted(x[scored].tolist()) == sorted(keys.tolist())
      # ...and the target at a query is the value paired with that key; 0 wherever unscored.
      value_of = dict(zip(keys.tolist(), values.tolist()))
      assert [y[i] for i in scored] == [value_of[x[i]] for i in scored]
      assert np.all(y[w == 0] == 0)


def test_mqar_gaps_follow_zoology_power_law():
  """Query gaps have the law of Zoology's np.random.choice(space, D, replace=False, p=a*g^(a-1))."""
  data = make_config(seq_len=32, vocab_size=64, num_kv_pairs=4, power_a=0.3).data
  pairs, space, n = 4, (32 - 8) // 2, 3000
  ours = np.zeros(space)
  for e in examples(data, "train", n):
    ours[(np.flatnonzero(e["weights"]) - 2 * pairs) // 2] += 1
  p = 0.3 * np.arange(1, space + 1) ** (0.3 - 1)
  rng = np.random.default_rng(0)
  reference = np.zeros(space)
  for _ in range(n):
    reference[rng.choice(space, size=pairs, replace=False, p=p / p.sum())] += 1
  # Inclusion frequency per gap; binomial sd <= 0.009 at n=3000, so 0.04 is > 3 sd of the difference.
  np.testing.assert_allclose(ours / n, reference / n, atol=0.04)
  assert ours[0] > 2 * ours[-1]  # and a < 1 does favour short gaps


def test_copy_reproduces_the_tokens_after_the_separator():
  data = make_config("copy", seq_len=16, copy_len=5).data
  for e in examples(data, "train", 100) + examples(data, "validation", 50):
    x, y, w = e["inputs"], e["targets"], e["weights"]
    assert x[5] == tasks.SEP and np.all(x[:5] >= 2)
    for j in range(5):  # reference: the j-th reproduced token is the j-th input token
      assert y[5 + j] == x[j]
      if j > 0:
        assert x[5 + j] == x[j - 1]  # teacher forcing: the model reads its previous answer
    np.testing.assert_array_equal(np.flatnonzero(w), tasks.scored_positions(data))
    assert np.all(y[w == 0] == 0) and np.all(x[11:] == tasks.PAD)


def test_selective_copy_skips_the_blanks():
  data = make_config("selective_copy", seq_len=20, copy_len=4, vocab_size=10).data
  spread = []
  for e in examples(data, "train", 200):
    x, y, w = e["inputs"], e["targets"], e["weights"]
    region = 20 - 4
    content = [int(t) for t in x[:region] if t != tasks.BLANK]  # reference: drop the noise
    assert len(content) == 4 and all(3 <= t < 10 for t in content)
    assert x[region] == tasks.SEP
    assert y[region:].tolist() == content
    np.testing.assert_array_equal(np.flatnonzero(w), tasks.scored_positions(data))
    assert np.all(y[w == 0] == 0)
    spread.append(np.flatnonzero(x[:region] != tasks.BLANK)[-1])
  assert min(spread) < 10 and max(spread) == 15  # content positions vary over the whole region


@pytest.mark.parametrize("n", [1, 3, 7])
def test_nback_target_is_the_input_n_back(n):
  data = make_config("nback", seq_len=16, nback=n, vocab_size=8).data
  for e in examples(data, "train", 50):
    x, y, w = e["inputs"], e["targets"], e["weights"]
    for t in range(16):
      assert w[t] == (1.0 if t >= n else 0.0)
      assert y[t] == (x[t - n] if t >= n else 0)


def test_induction_target_follows_the_first_trigger():
  data = make_config("induction", seq_len=12, vocab_size=6).data
  firsts = set()
  for e in examples(data, "train", 300):
    x, y, w = e["inputs"], e["targets"], e["weights"]
    triggers = np.flatnonzero(x == tasks.TRIGGER)
    assert len(triggers) == 2 and triggers[1] == 11 and triggers[0] <= 9
    assert y[11] == x[triggers[0] + 1] and x[triggers[0] + 1] >= 2
    assert w.tolist() == [0.0] * 11 + [1.0] and np.all(y[:11] == 0)
    firsts.add(int(triggers[0]))
  assert firsts == set(range(10))


@pytest.mark.parametrize("task", tasks.TASKS)
def test_examples_are_deterministic(task):
  data = make_config(task).data
  for split in tasks.SPLITS:
    a, b = examples(data, split, 20), examples(data, split, 20)
    for ea, eb in zip(a, b):
      for k in ("inputs", "targets", "weights"):
        np.testing.assert_array_equal(ea[k], eb[k])
    assert len({e["inputs"].tobytes() for e in a}) == 20  # and index matters


@pytest.mark.parametrize("task,small", [
    ("mqar", dict(seq_len=8, vocab_size=6, num_kv_pairs=2)),  # 2 pairs from 2 keys: few examples
    ("copy", dict(seq_len=7, vocab_size=6, copy_len=3)),  # 64 distinct examples
    ("selective_copy", dict(seq_len=7, vocab_size=5, copy_len=2)),
    ("nback", dict(seq_len=6, vocab_size=4, nback=2)),
    ("induction", dict(seq_len=6, vocab_size=5)),
])
def test_splits_never_share_an_example(task, small):
  """Tiny task spaces, where independent draws would collide across splits within a few examples."""
  data = make_config(task, **small).data
  train = {e["inputs"].tobytes() for e in examples(data, "train", 1500)}
  validation = {e["inputs"].tobytes() for e in examples(data, "validation", 300)}
  assert train and validation and not train & validation


def test_mqar_splits_disjoint_at_default_size():
  data = make_config(seq_len=64, vocab_size=8192, num_kv_pairs=4).data
  train = {e["inputs"].tobytes() for e in examples(data, "train", 3000)}
  validation = {e["inputs"].tobytes() for e in examples(data, "validation", 300)}
  assert len(train) == 3000 and not train & validation


@pytest.mark.parametrize("task", tasks.TASKS)
def test_example_range_is_the_examples_stacked(task):
  """The block path that writes datasets gives example(i) row for row, across block boundaries."""
  data = make_config(task).data
  start, stop = tasks.BLOCK - 3, tasks.BLOCK + 5
  for split in tasks.SPLITS:
    block = tasks.example_range(data, split, start, stop)
    for k in ("inputs", "targets", "weights"):
      np.testing.assert_array_equal(block[k], np.stack([e[k] for e in examples(data, split, stop - start, start)]))
    assert np.all(tasks.split_of(block["inputs"]) == split)


def test_distinct_draws_are_uniform_samples_without_replacement():
  rng = np.random.default_rng(0)
  drawn = tasks._distinct(rng, 20_000, 5, 3)
  assert all(len(set(row)) == 3 for row in drawn.tolist()) and drawn.min() == 0 and drawn.max() == 4
  # All 5*4*3 = 60 ordered triples equally likely: 333 each, binomial sd 18; 5 sd bounds.
  counts = np.unique(drawn @ np.array([25, 5, 1]), return_counts=True)[1]
  assert len(counts) == 60 and np.all(np.abs(counts - 20_000 / 60) < 5 * 18)


def test_task_spec_names_every_task():
  for name in tasks.TASKS:
    spec = tasks.task_spec(name)
    assert spec.name == name and spec.scored and "seq_len" in spec.fields
  with pytest.raises(ValueError, match="unknown synthetic task"):
    tasks.task_spec("sorting")


# ---------------------------------------------------------------------------
# Text

def test_byte_tokenizer_round_trip():
  s = "plain, ünïcödé, 日本語, emoji 🙂\n\ttabs"
  tokens = text.encode(s)
  assert tokens.dtype == np.uint8 and len(tokens) == len(s.encode("utf-8"))
  assert text.decode(tokens) == s
  assert text.decode(text.encode(b"\xff\xfeabc")) == "\ufffd\ufffdabc"


def test_packing_is_the_document_stream_cut_into_chunks():
  docs = ["first document", "", "ünïcödé " * 9, b"bytes \x00-free", "x" * 40, "last"]
  seq_len = 7
  packed = text.PackedSequences(docs, seq_len)
  stream = b"".join((d.encode() if isinstance(d, str) else d) + b"\0" for d in docs)
  assert len(packed) == len(stream) // (seq_len + 1)
  chunks = [packed.chunk(i) for i in range(len(packed))]
  assert b"".join(c.tobytes() for c in chunks) == stream[:len(packed) * (seq_len + 1)]
  assert text.decode(np.concatenate(chunks)) == stream[:len(packed) * (seq_len + 1)].decode("utf-8", "replace")
  for i in (0, 5, len(packed) - 1):  # random access agrees, and the example is the LM shift of its chunk
    e = packed[i]
    np.testing.assert_array_equal(e["inputs"], chunks[i][:-1])
    np.testing.assert_array_equal(e["targets"], chunks[i][1:])
    assert e["inputs"].dtype == np.int32 and e["weights"].tolist() == [1.0] * seq_len
  with pytest.raises(IndexError):
    packed.chunk(len(packed))


def test_file_split_is_by_path_and_keeps_both_splits():
  many = [f"pkg/module_{i}.py" for i in range(2000)]
  splits = corpus.split_files(many)
  share = len(splits["validation"]) / 2000
  assert 0.03 < share < 0.07
  assert all(corpus.file_split(f) == "validation" for f in splits["validation"])
  assert corpus.split_files(list(reversed(many))) == splits
  few = corpus.split_files(["a.txt", "b.txt", "c.txt"])
  assert few["train"] and few["validation"] and sorted(few["train"] + few["validation"]) == ["a.txt", "b.txt", "c.txt"]


# ---------------------------------------------------------------------------
# Builders and the pipeline

@pytest.fixture(scope="module")
def mqar_config(tmp_path_factory):
  config = make_config(data_dir=tmp_path_factory.mktemp("tfds"), train_size=250, eval_size=37, batch_size=8)
  pipeline.prepare(config)
  return config


def write_corpus(folder):
  folder.mkdir()
  docs = {f"doc{i}.txt": ("line of text %d\n" % i) * (3 + 5 * i) for i in range(6)}
  docs["unicode.txt"] = "ünïcödé ✓\n" * 7
  for name, body in docs.items():
    (folder / name).write_text(body, encoding="utf-8")
  return {k: v.encode("utf-8") for k, v in docs.items()}


def test_synthetic_builder_stores_the_task_examples(mqar_config):
  import tensorflow_datasets as tfds
  path = pipeline.dataset_path(mqar_config)
  source = tfds.builder_from_directory(path).as_data_source()
  assert len(source["train"]) == 250 and len(source["validation"]) == 37
  for split, i in [("train", 0), ("train", 249), ("validation", 36)]:
    want = tasks.example(mqar_config.data, split, i)
    for k in want:
      np.testing.assert_array_equal(source[split][i][k], want[k])
  other = make_config(data_dir=mqar_config.data.data_dir, num_kv_pairs=3, train_size=250, eval_size=37)
  assert pipeline.dataset_path(other) != path  # a parameter set has its own config name


def test_fast_records_parse_like_tfds_serialized_ones(mqar_config):
  """Our numpy-built records are the proto TFDS's own serializer makes, and decode to the examples."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import example_serializer
  from tensorflow_datasets.proto import tf_example_pb2
  from wm.data import builders, records
  builder = builders.builder_for(mqar_config.data, mqar_config.data.data_dir)
  features = builder.info.features
  reference = example_serializer.ExampleSerializer(features.get_serialized_info())
  block = tasks.example_range(mqar_config.data, "validation", 0, 5)
  ours = records.serialize({k: block[k] for k in features.keys()})
  for i, row in enumerate(ours):
    want = reference.serialize_example(features.encode_example({k: v[i] for k, v in block.items()}))
    assert tf_example_pb2.Example.FromString(row.tobytes()) == tf_example_pb2.Example.FromString(want)
  # The prepared files hold exactly these bytes, read back through TFDS...
  source = tfds.builder_from_directory(pipeline.dataset_path(mqar_config)).as_data_source()
  for i in range(5):
    for k in block:
      np.testing.assert_array_equal(source["validation"][i][k], block[k][i])
  # ...and through the numpy decoder the loader uses, a batch at a time.
  fast = pipeline.examples(mqar_config, "validation")
  assert isinstance(fast, records.FixedRecords) and len(fast) == 37
  got = fast.read_batch([3, 0, 4])
  for k in block:
    np.testing.assert_array_equal(got[k], block[k][[3, 0, 4]])
    assert got[k].dtype == block[k].dtype
  # Records of another layout are not ours to slice: TFDS decodes them.
  assert records.FixedRecords.open(source["validation"].data_source, {"inputs": (np.int64, (32,))}) is None


def test_text_files_builder_and_packed_batches(tmp_path):
  import tensorflow_datasets as tfds
  docs = write_corpus(tmp_path / "corpus")
  config = make_config("text", tmp_path / "tfds", text_source="files", seq_len=16, batch_size=4,
                       text_files=str(tmp_path / "corpus" / "*.txt"))
  pipeline.prepare(config)
  source = tfds.builder_from_directory(pipeline.dataset_path(config)).as_data_source()
  want = corpus.split_files(sorted(docs))
  for split in ("train", "validation"):
    records = [source[split][i] for i in range(len(source[split]))]
    assert [r["path"].decode() for r in records] == want[split]
    assert [r["text"] for r in records] == [docs[f] for f in want[split]]
  # Batches in order are the split's stream of documents, NUL after each, cut into 17-byte chunks.
  stream = b"".join(docs[f] + b"\0" for f in want["train"])
  batches = list(pipeline.make_iterator(config, "train", shuffle=False, num_epochs=1))
  got = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches])
  assert got.shape[1] == 17 and len(batches) == (len(stream) // 17) // 4
  assert got.astype(np.uint8).tobytes() == stream[:got.size]
  assert pipeline.bytes_per_token(config) == 1.0 and config.data.vocab_size == 256
  # Padded to whole batches, an epoch scores every chunk once, on two processes too.
  chunks = len(stream) // 17
  for count in (1, 2):
    padded = [b for p in range(count) for b in pipeline.make_iterator(
        config, "train", shuffle=True, num_epochs=1, drop_remainder=False, process_index=p, process_count=count)]
    assert sum(b["weights"].sum() for b in padded) == chunks * 16 and chunks % 4 != 0


def split_texts(config):
  """Each prepared split's documents: [(path, text bytes)]."""
  import tensorflow_datasets as tfds
  source = tfds.builder_from_directory(pipeline.dataset_path(config)).as_data_source()
  return {s: [(r["path"].decode(), r["text"]) for r in (source[s][i] for i in range(len(source[s])))]
          for s in source}


def stream_of(config, split):
  """The bytes a split's batches hold, in order (no shuffle), each chunk rebuilt from inputs + last target."""
  batches = list(pipeline.make_iterator(config, split, shuffle=False, num_epochs=1))
  got = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches])
  return got.astype(np.uint8).tobytes()


def test_penn_treebank_layout_trains_on_the_train_file(tmp_path):
  """ptb.train.txt (large), ptb.valid.txt (small), ptb.test.txt go to their splits, whatever their hashes."""
  rng = np.random.default_rng(0)
  words = [b"the", b"market", b"n't", b"<unk>", b"$", b"N", b"stock", b"said"]
  def sentences(n):
    return b"".join(b" " + b" ".join(words[i] for i in rng.integers(0, len(words), 12)) + b" \n" for _ in range(n))
  files = {"ptb.train.txt": sentences(400), "ptb.valid.txt": sentences(30), "ptb.test.txt": sentences(40)}
  (tmp_path / "ptb").mkdir()
  for name, body in files.items():
    (tmp_path / "ptb" / name).write_bytes(body)
  for spec in (str(tmp_path / "ptb"), str(tmp_path / "ptb" / "ptb.*.txt")):
    config = make_config("text", tmp_path / "tfds", text_source="files", text_files=spec, seq_len=32, batch_size=4)
    pipeline.prepare(config)
    assert split_texts(config) == {"train": [("ptb.train.txt", files["ptb.train.txt"])],
                                   "validation": [("ptb.valid.txt", files["ptb.valid.txt"])],
                                   "test": [("ptb.test.txt", files["ptb.test.txt"])]}
    for split, name in (("train", "ptb.train.txt"), ("validation", "ptb.valid.txt"), ("test", "ptb.test.txt")):
      stream = stream_of(config, split)
      assert len(stream) > 0 and stream == (files[name] + b"\0")[:len(stream)]
  assert "-names-" in pipeline.dataset_path(config)


def test_a_single_file_splits_by_position(tmp_path):
  body = np.random.default_rng(1).integers(1, 256, 10_007, dtype=np.uint8).tobytes()
  (tmp_path / "enwik8").write_bytes(body)
  config = make_config("text", tmp_path / "tfds", text_source="files", text_files=str(tmp_path / "enwik8"),
                       seq_len=16, batch_size=2)
  layout = corpus.layout(config.data.text_files)
  assert layout.rule == "position"
  cuts = [(p.begin, p.end) for s in ("train", "validation", "test") for p in layout.splits[s]]
  assert cuts == [(0, 9006), (9006, 9506), (9506, 10_007)]  # 90 / 5 / 5 percent, floor of each cut
  pipeline.prepare(config)
  texts = split_texts(config)
  assert [p for s in ("train", "validation", "test") for p, _ in texts[s]] == [
      "enwik8[0:9006]", "enwik8[9006:9506]", "enwik8[9506:10007]"]
  # No overlap and full coverage: the three splits laid end to end are the file.
  assert b"".join(texts[s][0][1] for s in ("train", "validation", "test")) == body
  for split, (begin, end) in zip(("train", "validation", "test"), cuts):
    stream = stream_of(config, split)
    assert len(stream) == ((end - begin + 1) // 17 // 2) * 2 * 17 and stream == body[begin:begin + len(stream)]


def test_explicit_split_patterns(tmp_path):
  for folder in ("a", "b", "c"):
    (tmp_path / folder).mkdir()
  bodies = {"a/one.txt": b"first training file\n" * 5, "a/two.txt": b"second training file\n" * 5,
            "b/held_out.txt": b"validation text here\n" * 3, "c/final.txt": b"test text here\n" * 3}
  for name, body in bodies.items():
    (tmp_path / name).write_bytes(body)
  spec = f"train={tmp_path}/a/*.txt; valid={tmp_path}/b/held_out.txt; test={tmp_path}/c/final.txt"
  config = make_config("text", tmp_path / "tfds", text_source="files", text_files=spec, seq_len=8, batch_size=2)
  pipeline.prepare(config)
  assert split_texts(config) == {"train": [("a/one.txt", bodies["a/one.txt"]), ("a/two.txt", bodies["a/two.txt"])],
                                 "validation": [("b/held_out.txt", bodies["b/held_out.txt"])],
                                 "test": [("c/final.txt", bodies["c/final.txt"])]}
  assert stream_of(config, "test") == (bodies["c/final.txt"] + b"\0")[:len(stream_of(config, "test"))]
  with pytest.raises(corpus.CorpusError, match="in both the train and the validation split"):
    corpus.layout(f"train={tmp_path}/a/*.txt;validation={tmp_path}/a/one.txt")
  with pytest.raises(corpus.CorpusError, match="no file for the validation split"):
    corpus.layout(f"train={tmp_path}/a/*.txt;test={tmp_path}/c/final.txt")
  with pytest.raises(corpus.CorpusError, match="has no SPLIT="):
    corpus.layout(f"train={tmp_path}/a/*.txt;{tmp_path}/b/held_out.txt")
  with pytest.raises(corpus.CorpusError, match="separate plain patterns with ','"):
    corpus.layout(f"{tmp_path}/a/one.txt;{tmp_path}/a/two.txt")


@pytest.mark.parametrize("path,split", [
    ("ptb.train.txt", "train"), ("ptb.valid.txt", "validation"), ("ptb.test.txt", "test"),
    ("wiki.train.tokens", "train"), ("wiki.valid.tokens", "validation"), ("validation.txt", "validation"),
    ("dev-clean.txt", "validation"), ("train_00001.txt", "train"), ("data/test/0001.txt", "test"),
    ("data/TRAIN/doc.txt", "train"), ("trainer.py", None), ("contest.txt", None), ("train_test_split.py", None),
    ("enwik8", None), ("test/valid/x.txt", "validation")])
def test_split_names(path, split):
  assert corpus.named_split(path) == split


def test_corpus_errors_name_the_path_and_the_fix(tmp_path, monkeypatch):
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "ptb").mkdir()
  (tmp_path / "ptb" / "ptb.train.txt").write_bytes(b"x" * 5000)
  (tmp_path / "ptb" / "ptb.valid.txt").write_bytes(b"tiny")
  missing = str(tmp_path / "nothing" / "*.txt")
  with pytest.raises(corpus.CorpusError) as e:
    corpus.layout(missing)
  assert missing in str(e.value) and "matches no file" in str(e.value)
  with pytest.raises(corpus.CorpusError, match=f"{tmp_path / 'empty.txt'} is empty"):
    corpus.layout(str(tmp_path / "empty.txt"))
  short = make_config("text", tmp_path / "tfds", text_source="files", text_files=str(tmp_path / "ptb"), seq_len=64)
  with pytest.raises(corpus.CorpusError) as e:
    pipeline.prepare(short)
  assert "validation split packs into 5 bytes" in str(e.value) and "data.seq_len=64 needs 65" in str(e.value)
  # A README beside the named files is ambiguous: say so rather than guess.
  (tmp_path / "ptb" / "README").write_text("Penn Treebank, Mikolov's version\n")
  with pytest.raises(corpus.CorpusError, match="do not \\(README\\)"):
    corpus.layout(str(tmp_path / "ptb"))
  # A document must fit in one protobuf record (2 GiB); here the limit is lowered to 100 bytes.
  monkeypatch.setattr(corpus, "MAX_DOCUMENT_BYTES", 100)
  with pytest.raises(corpus.CorpusError, match=r"ptb.train.txt would be one 5,000-byte document of the train split"):
    corpus.layout(f"train={tmp_path}/ptb/ptb.train.txt;validation={tmp_path}/ptb/ptb.valid.txt")
  # All of them are configuration errors: the command line prints the message, not a traceback.
  assert issubclass(corpus.CorpusError, config_lib.ConfigError)


def test_prepared_corpus_name_follows_the_files_and_the_split_rule(tmp_path):
  (tmp_path / "train.txt").write_bytes(b"some training text\n" * 50)
  (tmp_path / "valid.txt").write_bytes(b"some validation text\n" * 10)
  def name(spec):
    return pipeline.dataset_path(make_config("text", tmp_path, text_source="files", text_files=spec))
  by_names = name(str(tmp_path / "*.txt"))
  swapped = name(f"train={tmp_path}/valid.txt;validation={tmp_path}/train.txt")
  one_file = name(str(tmp_path / "train.txt"))
  assert len({by_names, swapped, one_file}) == 3
  assert name(str(tmp_path / "*.txt")) == by_names  # a function of the files and the rule alone
  os.utime(tmp_path / "valid.txt", ns=(0, 0))
  assert name(str(tmp_path / "*.txt")) != by_names  # an edited file prepares anew


def test_stdlib_corpus_prepares_offline(tmp_path):
  import tensorflow_datasets as tfds
  config = make_config("text", tmp_path, text_source="stdlib", seq_len=64, batch_size=4)
  start = time.perf_counter()
  pipeline.prepare(config)
  assert time.perf_counter() - start < 30
  root, files = corpus.stdlib_files()
  assert len(files) > 100 and not any("site-packages" in f or f.startswith("test/") for f in files)
  # The corpus is as it was before layouts: its name, its split by path hash.
  assert os.path.basename(os.path.dirname(pipeline.dataset_path(config))) == (
      f"stdlib-{corpus.stdlib_tag()}-{corpus.fingerprint(root, files)}")
  source = tfds.builder_from_directory(pipeline.dataset_path(config)).as_data_source()
  assert len(source["train"]) + len(source["validation"]) == len(files) and len(source["validation"]) > 0
  assert [r["path"].decode() for r in source["validation"]] == corpus.split_files(files)["validation"]
  assert sum(len(r["text"]) for r in source["validation"]) == sum(
      os.path.getsize(os.path.join(root, f)) for f in corpus.split_files(files)["validation"])
  batch = next(pipeline.make_iterator(config, "validation", shuffle=True, num_epochs=None))
  assert batch["inputs"].shape == (4, 64) and batch["inputs"].max() < 256


def test_a_registered_dataset_is_read_from_data_dir(tmp_path):
  """A prepared TFDS directory under DATA_DIR/NAME/VERSION is read as it is (here a copy of ours)."""
  import shutil
  docs = write_corpus(tmp_path / "corpus")
  local = make_config("text", tmp_path / "build", text_source="files", text_files=str(tmp_path / "corpus"))
  pipeline.prepare(local)
  shutil.copytree(pipeline.dataset_path(local), tmp_path / "tfds" / "my_corpus" / "1.0.0")
  config = make_config("text", tmp_path / "tfds", text_source="my_corpus", seq_len=8, batch_size=2)
  pipeline.prepare(config)  # checks only
  got = list(pipeline.make_iterator(config, "train", shuffle=False, num_epochs=1))
  stream = b"".join(docs[f] + b"\0" for f in corpus.split_files(sorted(docs))["train"])
  assert got[0]["inputs"][0].astype(np.uint8).tobytes() == stream[:8]
  bad = make_config("text", tmp_path / "tfds", text_source="my_corpus", text_feature="content")
  with pytest.raises(ValueError, match="text_feature='content' is not a feature"):
    pipeline.make_iterator(bad, "train", shuffle=False, num_epochs=1)


def test_missing_datasets_fail_fast_with_the_fix(tmp_path):
  local = make_config(data_dir=tmp_path)
  start = time.perf_counter()
  with pytest.raises(pipeline.DatasetNotPrepared) as e:
    pipeline.make_iterator(local, "train", shuffle=True, num_epochs=None)
  assert time.perf_counter() - start < 1.0
  assert isinstance(e.value, FileNotFoundError)
  assert str(tmp_path) in str(e.value) and "python -m wm prepare --config" in str(e.value)
  with pytest.raises(pipeline.DatasetNotPrepared, match="mqar"):
    pipeline.prepare(local, allow_build=False)

  registered = make_config("text", tmp_path, text_source="lm1b")
  start = time.perf_counter()
  with pytest.raises(pipeline.DatasetNotPrepared) as e:
    pipeline.prepare(registered)
  assert time.perf_counter() - start < 1.0
  message = str(e.value)
  assert "'lm1b'" in message and str(tmp_path) in message and f"tfds build lm1b --data_dir {tmp_path}" in message
  assert not os.path.exists(tmp_path / "lm1b") and not os.path.exists(tmp_path / "downloads")
  with pytest.raises(pipeline.DatasetNotPrepared, match="tiny_shakespeare"):
    pipeline.make_iterator(make_config("text", tmp_path, text_source="tiny_shakespeare"), "train",
                           shuffle=False, num_epochs=1)


def test_data_dir_default_order(monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", "/somewhere/tfds")
  assert pipeline.data_dir(make_config(data_dir="/explicit")) == "/explicit"
  assert pipeline.data_dir(make_config()) == "/somewhere/tfds"
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert pipeline.data_dir(make_config()) == os.path.expanduser("~/tensorflow_datasets")


def indices_of(batches, config, split):
  """Recovers each batch row's example index by content (examples are distinct at these sizes)."""
  size = config.data.train_size if split == "train" else config.data.eval_size
  index = {tasks.example(config.data, split, i)["inputs"].tobytes(): i for i in range(size)}
  return [index[row.tobytes()] for b in batches for row in b["inputs"]]


def test_iterator_batches_and_process_shards(mqar_config):
  config = mqar_config
  batches = [b for _, b in zip(range(3), pipeline.make_iterator(config, "train", shuffle=True, num_epochs=None))]
  for b in batches:
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (8, 32)
    assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32 and b["weights"].dtype == np.float32
  shards = []
  for p in (0, 1):
    it = pipeline.make_iterator(config, "train", shuffle=True, num_epochs=1, process_index=p, process_count=2)
    got = list(it)
    assert all(b["inputs"].shape == (4, 32) for b in got)  # global batch 8 over 2 processes
    assert len(got) == 125 // 4  # 250 examples -> 125 per process -> 31 full batches
    shards.append(indices_of(got, config, "train"))
  assert not set(shards[0]) & set(shards[1])
  assert len(set(shards[0])) == len(shards[0]) == 124
  # Sharded after a global shuffle: the two processes' batch s together are the
  # one-process run's batch s, so a run's batches do not depend on the process count.
  whole = indices_of(list(pipeline.make_iterator(config, "train", shuffle=True, num_epochs=1)), config, "train")
  for s in range(len(shards[0]) // 4):
    assert sorted(shards[0][4 * s:4 * s + 4] + shards[1][4 * s:4 * s + 4]) == sorted(whole[8 * s:8 * s + 8])
  # The shuffle is seeded: same seed, same order; another seed, another order.
  again = pipeline.make_iterator(config, "train", shuffle=True, num_epochs=1, process_index=0, process_count=2)
  assert indices_of(list(again), config, "train") == shards[0]
  other = pipeline.make_iterator(config, "train", shuffle=True, num_epochs=1, seed=7, process_index=0,
                                 process_count=2)
  assert indices_of(list(other), config, "train") != shards[0]


def test_epochs_are_reshuffled_permutations(mqar_config):
  config = make_config(data_dir=mqar_config.data.data_dir, train_size=250, eval_size=37, batch_size=10)
  seen = indices_of(list(pipeline.make_iterator(config, "train", shuffle=True, num_epochs=2)), config, "train")
  first, second = seen[:250], seen[250:]
  assert sorted(first) == sorted(second) == list(range(250)) and first != second


def test_validation_once_in_order_with_optional_padding(mqar_config):
  config = mqar_config
  dropped = list(pipeline.make_iterator(config, "validation", shuffle=False, num_epochs=1))
  assert indices_of(dropped, config, "validation") == list(range(32))  # 37 -> 4 full batches of 8
  rows = pipeline.read_rows(pipeline.examples(config, "validation"), [36, 2, 37, 40])  # two past the end: padding
  for k, v in tasks.example_range(config.data, "validation", 0, 37).items():
    np.testing.assert_array_equal(rows[k][:2], v[[36, 2]])
    assert np.all(rows[k][2:] == 0)
  padded = list(pipeline.make_iterator(config, "validation", shuffle=False, num_epochs=1, drop_remainder=False))
  assert len(padded) == 5 and padded[-1]["inputs"].shape == (8, 32)
  total = sum(tasks.example(config.data, "validation", i)["weights"].sum() for i in range(37))
  assert sum(b["weights"].sum() for b in padded) == total  # every example scored once, padding weighs 0
  assert np.all(padded[-1]["weights"][5:] == 0)


def test_restored_iterator_continues_exactly(mqar_config, tmp_path):
  import orbax.checkpoint as ocp
  from wm import resume
  config = mqar_config
  it = pipeline.make_iterator(config, "train", shuffle=True, num_epochs=None, process_index=1, process_count=2)
  for _ in range(40):  # past the end of the first epoch (31 batches)
    next(it)
  with ocp.CheckpointManager(str(tmp_path), item_handlers=resume.item_handlers()) as manager:  # as wm.train saves
    manager.save(40, args=resume.save_args({"x": np.zeros(1)}, {"step": 40}, it))
    expected = [next(it) for _ in range(5)]  # drawn while the save may still be committing
    manager.wait_until_finished()
  assert (tmp_path / "40" / resume.DATA_ITERATOR / "process_0-of-1.json").exists()  # grain's one file per process
  resumed = pipeline.make_iterator(config, "train", shuffle=True, num_epochs=None, process_index=1, process_count=2)
  with ocp.CheckpointManager(str(tmp_path)) as manager:
    resume.restore_iterator(manager, 40, {}, resumed)
  for want, got in zip(expected, (next(resumed) for _ in range(5))):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
