"""The paper reproductions in experiments/: their grids, their plots and tables from records, their arithmetic.

Nothing here trains: grids are checked by validating every point's config,
plots run on synthetic records. The one compile is a tiny LSTM through
remat_tradeoff's measurement (the code path its records come from).
"""

import importlib.util
import math
import os

import pytest

from wm import config as config_lib
from wm import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  spec = importlib.util.spec_from_file_location(f"experiment_{name}", os.path.join(REPO, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(autouse=True)
def repo_cwd(monkeypatch):
  monkeypatch.chdir(REPO)  # points name their configs relative to the repository


def validated(point):
  return config_lib.validate(config_lib.override(config_lib.load(point.config), point.overrides))


# ---------------------------------------------------------------------------
# Grids: every point is a valid config, names are unique, the design holds.

@pytest.mark.parametrize("name", ["working_memory_tasks", "vae_table", "remat_tradeoff", "techniques"])
@pytest.mark.parametrize("preset", ["quick", "full"])
def test_grid_points_are_valid_configs(name, preset):
  module = load(name)
  points = {"quick": module.quick_grid, "full": module.full_grid}[preset]()
  sweep.check_grid(points)
  assert points
  for p in points:
    validated(p)  # raises a ConfigError naming the field


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_nback_windows_straddle_the_step(preset):
  wmt = load("working_memory_tasks")
  points = {"quick": wmt.quick_grid, "full": wmt.full_grid}[preset]()
  nback = [validated(p) for p in points if p.labels["task"] == "nback" and p.labels["family"] == "transformer"]
  n = nback[0].data.nback
  windows = sorted(c.model.window for c in nback)
  # One layer: a window of w reaches w back, so the step is between n - 1 and n.
  assert all(c.model.layers == 1 for c in nback)
  assert n - 1 in windows and n in windows and min(windows) < n - 1 and max(windows) > n


def test_nback_reach_matches_the_attention_mask():
  """The window semantics the n-back grid relies on, read off the attention function itself."""
  import jax
  import jax.numpy as jnp
  from wm.models.transformer import attention

  t, n = 12, 5
  pos = jnp.arange(t)[None]
  k = jax.random.normal(jax.random.PRNGKey(0), (1, t, 1, 4))
  for window, reaches in ((n - 1, False), (n, True)):
    grad = jax.grad(lambda v: attention(k, k, v, pos, pos, window=window)[0, t - 1, 0, 0])(jnp.ones((1, t, 1, 4)))
    assert bool(grad[0, t - 1 - n, 0, 0] != 0) == reaches, window


def test_vae_rows_share_width_data_and_steps():
  vae = load("vae_table")
  configs = {p.name: validated(p) for p in vae.quick_grid()}
  assert set(configs) == {"lstm_lm", *vae.ROWS}
  shared = {(c.model.d, c.model.layers, c.data.seq_len, c.data.batch_size, c.train.steps, c.data.text_source,
             c.optim.lr, c.train.eval_batches) for c in configs.values()}
  assert len(shared) == 1
  plain = configs["vae"].model
  assert (plain.kl_schedule, plain.word_dropout, plain.free_bits) == ("constant", 0.0, 0.0)
  tricks = configs["vae_anneal_wd_fb"].model
  assert tricks.kl_schedule == "linear" and tricks.word_dropout > 0 and tricks.free_bits > 0
  assert configs["vae_cyclical"].model.kl_schedule == "cyclical"


def test_remat_points_train_nothing_and_cover_every_policy():
  remat = load("remat_tradeoff")
  points = remat.quick_grid()
  assert all(validated(p).train.steps == 0 for p in points)
  policies = {policy.split(":")[0] for _, policy, _ in remat.TRANSFORMER_VARIANTS}
  assert policies == {"none", "full", "dots", "dots_no_batch", "save", "offload"}
  assert (-1 in {chunk for _, _, chunk in remat.LSTM_VARIANTS})  # k = sqrt(T)
  lstm_lengths = sorted(p.labels["seq_len"] for p in points if p.labels["family"] == "lstm")
  assert lstm_lengths[0] == 256 and lstm_lengths[-1] == 4096


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_technique_rows_change_one_lever_of_the_baseline(preset):
  """Each row is the baseline's model, data and evaluation sample with its levers; eval rows read the baseline."""
  tech = load("techniques")
  points = {"quick": tech.quick_grid, "full": tech.full_grid}[preset]()
  names = [p.name for p in points]
  levers = ("quant.", "optim.name", "prune.", "model.share_layers", "model.lora_rank", "train.init_from",
            "train.steps", "optim.warmup_steps")
  for section, base_name in (("text", "baseline"), ("mqar", "mqar_baseline")):
    rows = [p for p in points if p.labels["section"] == section]
    base = next(p for p in rows if p.name == base_name)
    shared = lambda c: (c.data.to_dict(), c.train.eval_batches, c.seed, {k: v for k, v in c.model.items()
                                                                        if k not in ("share_layers", "lora_rank")})
    for p in rows:
      # The subword row's lever is the data's tokens: shorter sequences over about the same bytes of text.
      data = ("data.tokenizer", "data.seq_len") if p.name.startswith("spm") else ()
      assert {k for k in set(p.overrides) ^ set(base.overrides) if not k.startswith(levers + data)} == set(), p.name
      same = lambda c, p=p: (({k: v for k, v in c[0].items() if k not in ("tokenizer", "seq_len", "vocab_size")},
                              *c[1:]) if p.name.startswith("spm") else c)
      assert same(shared(validated(p))) == same(shared(validated(base))), p.name
      source = p.overrides.get("train.init_from")
      if source:  # reads the baseline's checkpoint: the baseline runs first, and eval rows train nothing
        assert source == f"{{out}}/runs/{base_name}" and names.index(p.name) > names.index(base_name)
        assert p.overrides["train.steps"] == 0 or p.overrides.get("model.lora_rank")
  assert {"kv_bfloat16", "kv_int8", "kv_float8_e4m3fn", "int8_weights", "qat_int8", "adamw8bit", "prune_50",
          "prune_2of4", "share_layers_2", "lora_r8", "spm_1024"} <= set(names)


# ---------------------------------------------------------------------------
# Arithmetic the tables rest on.

def test_fit_exponent_recovers_a_power_law():
  remat = load("remat_tradeoff")
  lengths = [256, 512, 1024, 2048, 4096]
  assert remat.fit_exponent(lengths, [3.0 * t ** 0.5 for t in lengths]) == pytest.approx(0.5)
  assert remat.fit_exponent(lengths, [7.0 * t for t in lengths]) == pytest.approx(1.0)


def test_vae_active_units_are_counted_over_the_evaluated_sequences(tmp_path):
  """record_extra encodes exactly the sequences evaluation.evaluate scores (the fixed sample, without padding rows)."""
  from wm import step as step_lib
  from wm.data import pipeline
  vae = load("vae_table")
  point = next(p for p in vae.quick_grid() if p.name == "vae")
  config = config_lib.validate(config_lib.override(config_lib.load(point.config), {
      **point.overrides, "data.data_dir": str(tmp_path), "data.seq_len": 16, "data.batch_size": 4,
      "model.d": 16, "model.latent_dim": 4, "train.eval_batches": 3}))
  pipeline.prepare(config)
  setup = step_lib.make_setup(config)
  extra = vae.record_extra(config, {"state": step_lib.init_state(setup)})
  assert extra["active_units_sequences"] == 12 and extra["latent_dim"] == 4
  assert 0 <= extra["active_units"] <= 4 and len(extra["posterior_mean_variance"]) == 4
  assert extra["bytes_per_token"] == pytest.approx(1.0)


def test_vae_summary_puts_every_row_in_nats_per_sequence():
  vae = load("vae_table")
  lm = {"row": "lstm_lm", "bytes_per_token": 1.0, "eval": {"nll": 1.5, "eval_tokens": 640, "eval_examples": 10}}
  v = {"row": "vae", "bytes_per_token": 1.0, "active_units": 3,
       "eval": {"nll": 1.6, "iw_nll_per_token": 1.55, "kl": 2.0, "eval_tokens": 640, "eval_examples": 10}}
  assert vae.summary(lm)["nll"] == pytest.approx(1.5 * 64)
  assert vae.summary(v)["nll"] == pytest.approx(1.55 * 64)
  assert vae.summary(v)["elbo_nll"] == pytest.approx(1.6 * 64)
  assert vae.summary(v)["bits_per_byte"] == pytest.approx(1.55 / math.log(2))


# ---------------------------------------------------------------------------
# Plots and tables from synthetic records (no JAX work).

COMMON = {"jax_version": "0", "backend": "cpu", "device_kind": "cpu", "num_devices": 1, "tokens_per_s": 1000.0,
          "param_count": 12345, "steps": 10, "model": {"d": 64, "layers": 1}}


def outputs(out, stems):
  for stem in stems:
    for ext in ("png", "svg"):
      assert (out / f"{stem}.{ext}").stat().st_size > 0
  return (out / "table.md").read_text()


def test_working_memory_plot(tmp_path):
  wmt = load("working_memory_tasks")
  records = []
  for p in wmt.quick_grid():
    w = p.labels["window"]
    acc = 0.9 if p.labels["family"] == "lstm" else float(w is not None and w > 8)
    records.append({**COMMON, "name": p.name, **p.labels, "overrides": p.overrides, "state_bytes": 64 * (w or 2),
                    "eval": {"accuracy": acc, "loss": 0.1, "eval_tokens": 100}})
  wmt.plot(records, str(tmp_path), "quick")
  text = outputs(tmp_path, ["accuracy_vs_state_bytes"])
  assert text.count("\n| ") == len(records)
  assert "8-back, T=32, V=16" in text


def test_vae_plot(tmp_path):
  vae = load("vae_table")
  records = []
  for i, p in enumerate(vae.quick_grid()):
    ev = {"nll": 1.5 + 0.01 * i, "eval_tokens": 640, "eval_examples": 10, "kl": 0.5 * i,
          "iw_nll_per_token": 1.5 + 0.005 * i}
    records.append({**COMMON, "name": p.name, **p.labels, "overrides": p.overrides, "eval": ev,
                    "bytes_per_token": 1.0, "active_units": i, "latent_dim": 16})
  vae.plot(records, str(tmp_path), "quick")
  text = outputs(tmp_path, ["vae_table"])
  # The last row's bound is 5 * 0.005 / 1.5 above the LM's.
  assert f"{100 * 0.025 / 1.5:+.2f}%" in text
  assert "5/16" in text


def test_remat_plot(tmp_path):
  remat = load("remat_tradeoff")
  records = []
  floor = 500  # LSTM records carry the temp of the same step at T=2; the Transformer's (older) do not
  for p in remat.quick_grid():
    t, lstm = p.labels["seq_len"], p.labels["family"] == "lstm"
    variants = []
    for name, policy, chunk in remat.variants(p.labels["family"]):
      temp = t if name in ("none", "no chunks") else 10 * t ** 0.5
      temp += floor if lstm else 0
      variants.append({"name": name, "policy": policy, "time_chunk": chunk, "chunk": None, "temp_size_in_bytes": temp,
                       "total_bytes": temp + 100, "step_time": 0.1 if name in ("none", "no chunks") else 0.13,
                       "compile_seconds": 1.0})
    extra = {"floor": {"seq_len": 2, "temp_size_in_bytes": floor, "total_bytes": floor + 100}} if lstm else {}
    records.append({**COMMON, "name": p.name, **p.labels, "variants": variants, **extra})
  remat.plot(records, str(tmp_path), "quick")
  text = outputs(tmp_path, ["remat_vs_length", "remat_frontier"])
  assert "transformer full: temp ~ T^0.500" in text
  # The floor pulls the whole temp's exponent down (500 + 10 sqrt(T) fits T^0.197 over T = 256-4096);
  # above the floor the growth is the variant's own.
  assert "lstm k=sqrt(T): temp ~ T^0.197, total ~ T^0.176, temp - temp at T=2 ~ T^0.500" in text
  assert "lstm no chunks: temp ~ T^0.654, total ~ T^0.616, temp - temp at T=2 ~ T^1.000" in text
  assert "temp - temp at T=2" not in text.split("transformer full:")[1].split("\n")[0]


# ---------------------------------------------------------------------------
# The measurement itself, on a tiny LSTM.

def test_remat_measure_variants_on_a_tiny_lstm():
  remat = load("remat_tradeoff")
  config = config_lib.validate(config_lib.override(config_lib.load("configs/text_lstm.py:quick"), {
      "data.seq_len": 64, "data.batch_size": 2, "model.d": 8, "model.layers": 1, "mesh.num_devices": 1,
      "train.steps": 0}))
  measured = remat.measure_variants(config, timed_steps=1, names=["no chunks", "k=sqrt(T)"])
  runs, floor = measured["variants"], measured["floor"]
  assert [r["name"] for r in runs] == ["no chunks", "k=sqrt(T)"]
  assert [r["chunk"] for r in runs] == [0, 8]  # k = sqrt(64)
  for r in runs:
    assert r["temp_size_in_bytes"] > 0 and len(r["step_times"]) == 1 and r["step_time"] > 0
  # k = sqrt(64) keeps less than no chunks, and both more than the same step at T = 2.
  assert runs[1]["temp_size_in_bytes"] < runs[0]["temp_size_in_bytes"]
  assert 0 < floor["temp_size_in_bytes"] < runs[1]["temp_size_in_bytes"] and floor["seq_len"] == 2


def test_techniques_plot(tmp_path):
  """One line per technique (two for QAT and 2:4: float and int8 weights), ratios against the baseline."""
  tech = load("techniques")
  records = []
  for p in tech.quick_grid():
    o, text = p.overrides, p.labels["section"] == "text"
    int8w, kind = o.get("quant.weights") == "int8", o.get("quant.state")
    ev = ({"nll": 1.6 * math.log(2), "bits_per_byte": 1.6} if text else {"nll": 0.01, "accuracy": 1.0})
    ev.update({"eval_tokens": 1000, **({"int8_nll": ev["nll"] * 1.01, "int8_accuracy": 0.99} if int8w else {})})
    r = {**COMMON, "name": p.name, **p.labels, "overrides": o, "eval": ev, "estimate_bytes": 100 * 2**20,
         "compiled_bytes": 96 * 2**20, "estimate_terms": {"optimizer": 3 * 2**20},
         "argument_bytes": {"opt_state": (2**20 if o.get("optim.name") == "adamw8bit" else 3 * 2**20)},
         "serving": {"params": (2**20 // 4 if int8w else 2**20), "state": (2**16 if kind in ("int8", "int8_static")
                                                                            else 2**18)}}
    if kind == "int8_static":
      r["serving"]["state_constant"] = 2**10
    if int8w:
      r["param_bytes_float"] = 2**20
    if kind:
      r["decoded"] = {**ev, **({"nll": ev["nll"] * 1.02, "bits_per_byte": 1.6 * 1.02} if kind != "float32" else {})}
      if kind != "float32":
        r["decoded_float32"] = ev
    if "data.tokenizer" in o:
      r["eval"]["tokens_per_byte"] = 0.41
    if "prune.method" in o:
      r["eval"]["sparsity"] = 0.5
      r["export"] = {"bytes": 2**19, "dense_bytes": 2**20, "ratio": 0.5}
      if int8w:
        r["export_int8"] = {"bytes": 2**17}
    records.append(r)
  tech.plot(records, str(tmp_path), "quick")
  text = outputs(tmp_path, ["techniques"])
  table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
  # 20 points: QAT and 2:4 give a float and an int8 line, each baseline its decode-path line, MQAR a heading.
  assert len(table) == 20 + 2 + 2 + 1
  heading = next(i for i, line in enumerate(table) if "MQAR" in line)
  row = {line.split(" | ")[0][2:]: line.split(" | ") for line in table[:heading]}  # the text section
  mqar = {line.split(" | ")[0][2:]: line.split(" | ") for line in table[heading + 1:]}
  assert list(mqar) == ["baseline (float32, AdamW)", "baseline, scored through the decode path (float32 cache)",
                        "KV cache int8", "KV cache int8 (static scales)", "int8 weights (post-training)"]
  assert mqar["int8 weights (post-training)"][-2:] == ["0.9900 [forward]", "0.990 |"]
  assert row["2:4 pruning + int8 weights (sparsity 0.500)"][1:3] == ["0.125", "0.125"]
  assert row["8-bit Adam"][5:7] == ["3.000 / 1.000", "0.333"]
  assert row["KV cache int8"][7:9] == ["64.0", "0.250"]
  assert row["KV cache int8"][10].startswith("1.6320 (f32 cache 1.6000) [decode path]")
  # Static int8 scales: per-sequence bytes and their ratio, the per-model scales shown beside them.
  assert row["KV cache int8 (static scales)"][7:9] == ["64.0 + 1.0 per model", "0.250"]
  assert row["int8 weights + int8 static KV"][7:9] == ["64.0 + 1.0 per model", "0.250"]
  assert row["QAT, int8 weights"][-1] == "1.010 |"
  assert "subword tokens (SentencePiece BPE, 1024) (0.410 tokens/byte, T=53)" in row


def test_recall_recipe_preset_varies_the_quick_lstm_point_one_factor_at_a_time():
  """The recipe preset's first point is the quick grid's T=64, d=128, lr 3e-3 LSTM point itself (same
  config and resolved settings), and its other points differ from it only in layers and forget bias."""
  exp = load("recall_vs_state")
  quick = next(p for p in exp.quick_grid() if p.name == "T=64_lstm_d=128_lr=0.003")
  recipe = exp.recipe_grid()
  resolve = lambda p: config_lib.override(config_lib.load(p.config), p.overrides).to_dict()
  assert resolve(recipe[0]) == resolve(quick)
  assert {(p.overrides["model.layers"], p.overrides["model.forget_bias"]) for p in recipe} == {
      (1, 3.0), (1, 1.0), (2, 3.0), (2, 1.0)}
  base = {k: v for k, v in resolve(quick).items() if k != "model"}
  for p in recipe[1:]:
    resolved = resolve(p)
    assert {k: v for k, v in resolved.items() if k != "model"} == base
    changed = {k for k, v in resolved["model"].items() if v != resolve(quick)["model"][k]}
    assert changed <= {"layers", "forget_bias"} and changed
