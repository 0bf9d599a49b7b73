"""Configuration: the full schema with defaults, loading, overrides, validation.

Every run is described by one `ml_collections.ConfigDict` whose fields are all
declared in `base_config()`. Config files in `configs/` start from it and
change fields; they never add new ones, so a misspelt field is an error rather
than a silently ignored setting. `validate` checks values before anything is
compiled and names the offending field and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from typing import Any

import ml_collections

TASKS = ("mqar", "copy", "selective_copy", "nback", "induction", "text")
MODELS = ("lstm", "transformer", "vae", "mixture", "vrnn")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "sgd", "adagrad")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
DTYPES = ("float32", "bfloat16")
QUANT_WEIGHTS = ("none", "int8")  # quant.weights
QAT_MODES = ("none", "int8")  # quant.qat
STATE_DTYPES = ("float32", "bfloat16", "int8", "float8_e4m3fn")  # quant.state, or "" for the compute dtype
PRUNE_METHODS = ("", "magnitude", "2:4", "n:m")  # prune.method; "" = off
KL_SCHEDULES = ("constant", "linear", "logistic", "cyclical")
NONFINITE_ACTIONS = ("stop", "skip_batch")
MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(ValueError):
  """A config field is missing, has the wrong type, or holds an impossible value."""


def base_config() -> ml_collections.ConfigDict:
  """Every field a run can set, with defaults and one comment each."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init, data order, dropout and latent samples

  c.data = d = ml_collections.ConfigDict()
  d.task = "mqar"  # one of TASKS; "text" reads a text corpus
  d.seq_len = 64  # tokens per example fed to the model
  d.vocab_size = 8192  # synthetic tasks; text sets this itself from data.tokenizer (256 for bytes, N for spm:N)
  d.batch_size = 32  # global batch, summed over all devices and processes
  d.train_size = 100_000  # synthetic examples in the train split
  d.eval_size = 1_000  # synthetic examples in the validation split
  # MQAR (Arora et al. 2023, Zoology): key-value pairs and the power-law gap exponent.
  d.num_kv_pairs = 4
  d.power_a = 0.01
  # copy / selective copy / n-back / induction
  d.copy_len = 16  # tokens to copy (copy, selective_copy)
  d.nback = 4  # n of the n-back task
  # text
  d.text_source = "stdlib"  # "stdlib" (the interpreter's own sources), "files", or a TFDS dataset name
  # text_source == "files": comma-separated paths, globs (** recurses) or folders. One file splits by position
  # (first 90% of its bytes train, next 5% validation, last 5% test); files all named for a split
  # (ptb.train.txt, wiki.valid.tokens, test.txt; words train/valid/validation/dev/test) go to it; any other
  # set by a hash of each path (5% validation). Or per split: "train=a/*.txt;validation=b.txt;test=c.txt".
  d.text_files = ""
  d.text_feature = "text"  # feature holding the text in a TFDS dataset
  # "bytes" (vocabulary 256), or "spm:N": a SentencePiece BPE model of N pieces trained on the train split by
  # `python -m wm prepare` (wm/data/subword.py), for fewer tokens per byte of text.
  d.tokenizer = "bytes"
  d.data_dir = ""  # where TFDS datasets are prepared; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  d.worker_count = 0  # grain worker processes (0 = in-process; >0 needs a __main__ guard)

  c.model = m = ml_collections.ConfigDict()
  m.name = "transformer"  # one of MODELS
  m.d = 128  # model width
  m.layers = 2
  m.heads = 4  # attention heads (transformer)
  m.kv_heads = 4  # grouped KV heads; must divide heads
  m.mlp_ratio = 4  # MLP hidden = mlp_ratio * d
  m.window = 0  # sliding attention window in tokens; 0 = full causal attention
  m.attention = "xla"  # xla | chunked (online softmax over key blocks) | cudnn (GPU) | splash (TPU); wm/models/attention.py
  m.attention_block = 512  # keys per block for chunked/splash: memory per layer grows as t * block, not t^2
  m.rope_base = 10_000.0
  m.tie_embeddings = True
  m.forget_bias = 1.0  # LSTM forget-gate bias at init (Jozefowicz et al. 2015)
  m.dropout = 0.0
  # Cross-layer parameter sharing (Lan et al. 2020, ALBERT): each group of share_layers consecutive layers
  # uses one set of weights; 1 = no sharing. lstm and transformer; must divide layers.
  m.share_layers = 1
  # Low-rank adapters (Hu et al. 2021, LoRA): W + (lora_alpha / lora_rank) A B on the attention, MLP and LSTM
  # gate projections, with the base weights frozen (only A, B train); 0 = off. lstm and transformer.
  m.lora_rank = 0
  m.lora_alpha = 0.0  # the adapter scale's numerator; 0 = lora_rank (scale 1)
  # latent models (vae, mixture, vrnn)
  m.encoder = "lstm"  # encoder family for the VAE: "lstm" or "transformer"
  m.decoder = "lstm"  # decoder family for the VAE and mixture
  m.latent_dim = 32
  m.components = 4  # K of the mixture
  m.mixture_heads = "shared"  # "shared" body with K heads, or "separate" decoders
  m.mixture_prior = "learned"  # "learned" mixing weights or "gated" from a latent code
  m.kl_schedule = "linear"  # one of KL_SCHEDULES
  m.kl_warmup_steps = 1000  # steps for beta to reach 1 (linear/logistic) or one cycle (cyclical)
  m.free_bits = 0.0  # per-dimension KL floor in nats (Kingma et al. 2016); 0 = off
  m.word_dropout = 0.0  # probability of replacing a decoder input token (Bowman et al. 2016)
  m.iw_samples = 16  # k of the importance-weighted bound at evaluation (Burda et al. 2016)
  m.mixture_anneal_steps = 300  # mixture: gradient responsibilities go uniform -> exact (Ueda & Nakano 1998); 0 = off

  c.precision = p = ml_collections.ConfigDict()
  p.param_dtype = "float32"  # storage of parameters and optimizer state
  p.compute_dtype = "float32"  # matmuls and activations; "bfloat16" for mixed precision

  c.optim = o = ml_collections.ConfigDict()
  o.name = "adamw"  # one of OPTIMIZERS; adamw8bit keeps both moments in 8 bits (wm/compress/adam8bit.py)
  o.lr = 1e-3  # peak learning rate
  o.schedule = "cosine"  # decay after warmup, one of SCHEDULES
  o.warmup_steps = 100
  o.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  o.weight_decay = 0.0
  o.b1 = 0.9
  o.b2 = 0.98
  o.eps = 1e-9
  o.momentum = 0.9  # sgd
  o.clip_norm = 1.0  # global-norm clipping; 0 = off
  o.microbatches = 1  # gradient accumulation: the global batch is split into this many
  o.state_block = 256  # adamw8bit: elements per float32 scale, in blocks along each parameter's last axis

  # Quantization levers (wm/compress/quant.py, docs/compression.md).
  c.quant = q = ml_collections.ConfigDict()
  q.weights = "none"  # "int8": evaluation reports int8-weight metrics too, and generation runs on int8 weights
  q.qat = "none"  # "int8": train on fake-quantized int8 weights (straight-through); stored bytes unchanged
  q.state = ""  # generation state (KV cache, LSTM h/c): "" = compute dtype, or one of STATE_DTYPES

  # Pruning lever (wm/compress/prune.py, docs/compression.md): gradual magnitude pruning of the matmul
  # weights with Zhu & Gupta's (2017) cubic schedule; masks live in the optimizer state.
  c.prune = pr = ml_collections.ConfigDict()
  pr.method = ""  # one of PRUNE_METHODS: "magnitude" (unstructured), "2:4", "n:m" (prune.n of every prune.m)
  pr.sparsity = 0.5  # final fraction s_f of every pruned matrix that is zero; N:M needs 1 - n/m
  pr.start_step = 100  # t0 >= 1, the step of the first mask update (at sparsity 0): let the dense model train first
  pr.end_step = 500  # t0 + n*every: the step from which the sparsity is final; leave steps after it to recover
  pr.every = 100  # steps between mask updates (Zhu & Gupta's delta t)
  pr.n = 2  # "n:m": weights kept in every group of m along the input axis
  pr.m = 4
  pr.embeddings = False  # also prune the token embedding (and so a tied output head); norms and biases never

  c.remat = r = ml_collections.ConfigDict()
  r.policy = "none"  # none, full, dots, dots_no_batch, save:<names>, offload:<names>
  r.time_chunk = 0  # recurrent models: steps per remat chunk; 0 = no time remat, -1 = round(sqrt(T))

  c.mesh = ms = ml_collections.ConfigDict()
  ms.num_devices = 0  # devices the mesh uses (the first N of jax.devices()); 0 = all
  ms.data = -1  # data-parallel axis size; -1 takes the devices left over
  ms.fsdp = 1  # parameters, gradients and optimizer state sharded over this axis (ZeRO-3)
  ms.tensor = 1  # Megatron-style tensor parallelism
  # Logical axis -> mesh axis (or None). Parameters carry logical names where they are created.
  ms.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("vocab", "tensor"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("gates", "tensor"),
      ("latent", None),
      ("head_dim", None),
      ("length", None),
      ("layers", None),
      ("components", None),
  )
  # Multi-process runs: empty = single process, or automatic on TPU VMs/SLURM.
  ms.coordinator_address = ""
  ms.num_processes = 0
  ms.process_id = -1

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1000
  t.log_every = 50
  t.eval_every = 200
  t.eval_batches = 8  # 0 = the whole validation split; N = a fixed seeded sample of N batches drawn from all of it
  t.checkpoint_every = 500
  t.max_to_keep = 3  # newest checkpoints kept; one whose checksums verified is never rotated out
  t.on_nonfinite = "stop"  # non-finite loss or gradient: "stop" the run, or "skip_batch" (drop that update)
  t.max_skipped_in_row = 10  # skip_batch: stop once this many consecutive steps were non-finite
  t.progress = True  # tqdm progress bar on process 0
  t.budget = ""  # per-device training-memory budget (e.g. "2GiB"); the planner fits the run to it
  # A pretrained run's workdir: a fresh run starts from the parameters of its latest verified checkpoint
  # (not its optimizer state or step); "" = random init. Ignored once this run has checkpoints of its own.
  t.init_from = ""
  return c


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist (expected configs/NAME.py[:ARG])")
  if not os.path.isfile(path):
    raise ConfigError(f"config {path!r} is not a file (expected configs/NAME.py[:ARG])")
  module_spec = importlib.util.spec_from_file_location("wm_user_config", path)
  if module_spec is None or module_spec.loader is None:
    raise ConfigError(f"config {path!r} is not a Python file (expected configs/NAME.py[:ARG])")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # SyntaxError, ImportError, ...: the file, not wm, is at fault
    raise ConfigError(f"config file {path} cannot be loaded: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} does not define get_config(arg=None)")
  try:
    config = module.get_config(arg or None)
  except Exception as e:  # a config file is user code: any failure is a bad config, reported in one line
    where = f"{path}:{arg}" if arg else path
    raise ConfigError(f"{where}: get_config({arg or None!r}) failed: {type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict (start from "
                      f"wm.config.base_config()), got {type(config).__name__}")
  return config


def _coerce(field: str, old: Any, text: str) -> Any:
  """Parses a command-line string into the type of the field's default."""
  try:
    if isinstance(old, bool):
      if text.lower() in ("true", "1", "yes"):
        return True
      if text.lower() in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if isinstance(old, int):
      return int(text)
    if isinstance(old, float):
      return float(text)
    if isinstance(old, (tuple, list)):
      value = json.loads(text)
      if not isinstance(value, list):
        raise ValueError(text)
      return type(old)(value)
    return text
  except (ValueError, TypeError, OverflowError):
    raise ConfigError(
        f"config.{field}={text!r}: expected a {type(old).__name__} like {old!r}") from None


def override(config: ml_collections.ConfigDict, assignments: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted fields (`{"model.d": "256"}`); strings are parsed to the field's type.

  Unknown fields raise a `ConfigError` naming the field and its neighbours.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # a copy we may change
  for field, value in assignments.items():
    *parents, leaf = field.split(".")
    node = config
    for i, name in enumerate(parents):
      if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
        raise ConfigError(f"config.{'.'.join(parents[:i + 1])} is not a config section")
      node = node[name]
    if leaf not in node:
      raise ConfigError(
          f"config.{field} does not exist; fields here are: {', '.join(sorted(node.keys()))}")
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
      raise ConfigError(f"config.{field} is a section; set one of its fields: "
                        f"{', '.join(sorted(old.keys()))}")
    value = _coerce(field, old, value) if isinstance(value, str) and not isinstance(old, str) else value
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.{field}={value!r}: expected a {type(old).__name__} like {old!r} ({e})") from None
  return config


def check_schema(config: ml_collections.ConfigDict) -> None:
  """Every field exists in `base_config()` with a compatible type."""
  def walk(got, ref, prefix):
    for key in got.keys():
      name = f"{prefix}{key}"
      if key not in ref:
        raise ConfigError(
            f"config.{name} is not a known field; fields here are: {', '.join(sorted(ref.keys()))}")
      if isinstance(ref[key], ml_collections.ConfigDict):
        if not isinstance(got[key], ml_collections.ConfigDict):
          raise ConfigError(f"config.{name} must be a section, got {got[key]!r}")
        walk(got[key], ref[key], name + ".")
        continue
      want, value = type(ref[key]), got[key]
      ok = (isinstance(value, want) or (want is float and isinstance(value, int))
            or (want in (tuple, list) and isinstance(value, (tuple, list))))
      if isinstance(value, bool) and want is not bool:
        ok = False
      if not ok:
        raise ConfigError(f"config.{name}={value!r} has type {type(value).__name__}; expected {want.__name__}")
      if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config.{name}={value!r} must be a finite number")
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"a config must be an ml_collections.ConfigDict, got {type(config).__name__}")
  walk(config, base_config(), "")


def _need(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(f"config.{field}: {message}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field; returns the config with derived fields filled in.

  Derived: `data.vocab_size` for text is the tokenizer's: 256 for bytes, N for spm:N.
  """
  check_schema(config)
  config = ml_collections.ConfigDict(config.to_dict())
  d, m, o, t, r = config.data, config.model, config.optim, config.train, config.remat
  _need(0 <= config.seed < 2**31, "seed", f"must be in [0, 2**31), got {config.seed}")
  _need(d.task in TASKS, "data.task", f"{d.task!r} is not one of {TASKS}")
  from wm.data import subword  # light: numpy and this module
  tokenizer = subword.parse(d.tokenizer)
  _need(d.task == "text" or tokenizer is None, "data.tokenizer",
        f"{d.tokenizer!r} tokenizes text, but data.task={d.task!r} is a synthetic task with its own tokens; "
        f"set data.tokenizer='bytes' (or data.task='text')")
  if d.task == "text":
    config.data.vocab_size = tokenizer.vocab_size if tokenizer else 256
  _need(d.seq_len >= 2, "data.seq_len", f"must be >= 2, got {d.seq_len}")
  _need(d.vocab_size >= 4, "data.vocab_size", f"must be >= 4, got {d.vocab_size}")
  _need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
  _need(d.train_size >= 1, "data.train_size", f"must be >= 1, got {d.train_size}")
  _need(d.eval_size >= 1, "data.eval_size", f"must be >= 1, got {d.eval_size}")
  _need(d.worker_count >= 0, "data.worker_count", f"must be >= 0 (0 = in-process), got {d.worker_count}")
  # Ranges hold whatever the task, so a nonsense value never waits for the day the task changes.
  _need(d.num_kv_pairs >= 1, "data.num_kv_pairs", f"must be >= 1, got {d.num_kv_pairs}")
  _need(d.power_a > 0, "data.power_a", f"must be > 0, got {d.power_a}")
  _need(d.copy_len >= 1, "data.copy_len", f"must be >= 1, got {d.copy_len}")
  _need(d.nback >= 1, "data.nback", f"must be >= 1, got {d.nback}")
  if d.task == "mqar":
    _need(4 * d.num_kv_pairs <= d.seq_len, "data.num_kv_pairs",
          f"{d.num_kv_pairs} pairs need seq_len >= {4 * d.num_kv_pairs} (2 tokens per pair plus queries); "
          f"got seq_len={d.seq_len}")
    _need(d.vocab_size // 2 - 1 >= d.num_kv_pairs, "data.vocab_size",
          f"keys are drawn without replacement from [1, V/2): need V/2 - 1 >= num_kv_pairs={d.num_kv_pairs}")
    _need(d.power_a > 0, "data.power_a", "must be > 0")
  if d.task in ("copy", "selective_copy"):
    _need(1 <= d.copy_len, "data.copy_len", "must be >= 1")
    _need(2 * d.copy_len + 1 <= d.seq_len, "data.copy_len",
          f"copy_len={d.copy_len} needs seq_len >= {2 * d.copy_len + 1}")
  if d.task == "nback":
    _need(1 <= d.nback < d.seq_len, "data.nback", f"must be in [1, seq_len), got {d.nback}")
  if d.task == "text" and d.text_source == "files":
    _need(bool(d.text_files.strip(",; ")), "data.text_files",
          "set it to comma-separated paths or globs, or to 'train=GLOBS;validation=GLOBS[;test=GLOBS]'")
    _check_text_files(d.text_files)

  _need(m.name in MODELS, "model.name", f"{m.name!r} is not one of {MODELS}")
  for f in ("d", "layers", "heads", "kv_heads", "mlp_ratio", "latent_dim", "components"):
    _need(m[f] >= 1, f"model.{f}", f"must be >= 1, got {m[f]}")
  if m.name == "transformer" or "transformer" in (m.encoder, m.decoder):
    _need(m.d % m.heads == 0, "model.heads", f"heads={m.heads} must divide d={m.d}")
    _need((m.d // m.heads) % 2 == 0, "model.heads", f"head_dim d/heads={m.d // m.heads} must be even for rotary embeddings")
    _need(m.heads % m.kv_heads == 0, "model.kv_heads", f"kv_heads={m.kv_heads} must divide heads={m.heads}")
  _need(m.rope_base > 1, "model.rope_base", f"must be > 1, got {m.rope_base}")
  _need(m.kl_warmup_steps >= 0, "model.kl_warmup_steps", f"must be >= 0, got {m.kl_warmup_steps}")
  _need(m.attention in ("xla", "chunked", "cudnn", "splash"), "model.attention",
        f"{m.attention!r} is not one of xla, chunked, cudnn, splash")
  _need(m.attention_block >= 1, "model.attention_block", f"must be >= 1, got {m.attention_block}")
  _need(m.window >= 0, "model.window", f"must be >= 0 (0 = full attention), got {m.window}")
  _need(m.window <= d.seq_len, "model.window",
        f"window={m.window} is longer than data.seq_len={d.seq_len}, so it changes nothing; use 0 for full attention")
  _need(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
  _need(0.0 <= m.word_dropout < 1.0, "model.word_dropout", "must be in [0, 1)")
  _need(m.encoder in ("lstm", "transformer"), "model.encoder", "must be 'lstm' or 'transformer'")
  _need(m.decoder in ("lstm", "transformer"), "model.decoder", "must be 'lstm' or 'transformer'")
  _need(m.mixture_heads in ("shared", "separate"), "model.mixture_heads", "must be 'shared' or 'separate'")
  _need(m.mixture_prior in ("learned", "gated"), "model.mixture_prior", "must be 'learned' or 'gated'")
  _need(m.kl_schedule in KL_SCHEDULES, "model.kl_schedule", f"must be one of {KL_SCHEDULES}")
  _need(m.free_bits >= 0, "model.free_bits", "must be >= 0")
  _need(m.iw_samples >= 1, "model.iw_samples", "must be >= 1")
  _need(m.mixture_anneal_steps >= 0, "model.mixture_anneal_steps", "must be >= 0 (0 = no annealing)")
  _check_levers(m)

  for f in ("param_dtype", "compute_dtype"):
    _need(config.precision[f] in DTYPES, f"precision.{f}", f"must be one of {DTYPES}")

  _need(o.name in OPTIMIZERS, "optim.name", f"{o.name!r} is not one of {OPTIMIZERS}")
  _need(o.schedule in SCHEDULES, "optim.schedule", f"{o.schedule!r} is not one of {SCHEDULES}")
  _need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
  _need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  _need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
  _need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
  # Adam's moment decays (Kingma & Ba 2015): b = 1 never forgets, and the bias correction divides by 1 - b^t = 0.
  _need(0.0 <= o.b1 < 1.0, "optim.b1", f"must be in [0, 1), got {o.b1}")
  _need(0.0 <= o.b2 < 1.0, "optim.b2", f"must be in [0, 1), got {o.b2}")
  _need(o.eps > 0, "optim.eps", f"must be > 0 (it keeps the update's denominator away from 0), got {o.eps}")
  _need(0.0 <= o.momentum < 1.0, "optim.momentum", f"must be in [0, 1) (0 = plain SGD), got {o.momentum}")
  _need(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 = off)")
  _need(o.microbatches >= 1, "optim.microbatches", "must be >= 1")
  _need(d.batch_size % o.microbatches == 0, "optim.microbatches",
        f"{o.microbatches} microbatches must divide data.batch_size={d.batch_size}")
  # Below 16 elements the float32 scale of a block costs more than 1/4 byte per element,
  # and the 8-bit moments stop being much smaller than bfloat16 ones.
  _need(o.state_block >= 16, "optim.state_block", f"must be >= 16 elements per scale, got {o.state_block}")

  q = config.quant
  _need(q.weights in QUANT_WEIGHTS, "quant.weights", f"{q.weights!r} is not one of {QUANT_WEIGHTS}")
  _need(q.qat in QAT_MODES, "quant.qat", f"{q.qat!r} is not one of {QAT_MODES}")
  _need(q.state == "" or q.state in STATE_DTYPES, "quant.state",
        f"{q.state!r} is not one of {STATE_DTYPES} (or \"\" for the compute dtype)")
  if q.state:
    _need(m.name in ("lstm", "transformer"), "quant.state",
          f"applies to the lstm and transformer language models; model.name={m.name!r} keeps its state in "
          f"the compute dtype (set quant.state to \"\")")

  _check_prune(config)

  _need(r.time_chunk >= -1, "remat.time_chunk", "must be -1 (sqrt(T)), 0 (off) or a positive chunk length")
  if r.time_chunk > 0:
    _need(d.seq_len % r.time_chunk == 0, "remat.time_chunk",
          f"{r.time_chunk} must divide data.seq_len={d.seq_len}")
  _check_policy(config)
  _check_mesh(config.mesh)

  _need(t.steps >= 0, "train.steps", "must be >= 0")
  for f in ("log_every", "eval_every", "checkpoint_every", "max_to_keep"):
    _need(t[f] >= 1, f"train.{f}", f"must be >= 1, got {t[f]}")
  _need(t.eval_batches >= 0, "train.eval_batches", "must be >= 0 (0 = the whole split)")
  _need(t.on_nonfinite in NONFINITE_ACTIONS, "train.on_nonfinite",
        f"{t.on_nonfinite!r} is not one of {NONFINITE_ACTIONS}")
  _need(t.max_skipped_in_row >= 1, "train.max_skipped_in_row", f"must be >= 1, got {t.max_skipped_in_row}")
  if t.budget:
    parse_bytes(t.budget)  # raises a ConfigError naming the format
  return config


def _check_levers(m: ml_collections.ConfigDict) -> None:
  """Cross-layer sharing and LoRA: the model families that have them, and values that mean something."""
  _need(m.share_layers >= 1, "model.share_layers", f"must be >= 1 (1 = no sharing), got {m.share_layers}")
  if m.share_layers > 1:
    _need(m.name in ("lstm", "transformer"), "model.share_layers",
          f"sharing is built for the lstm and transformer stacks, not model.name={m.name!r}; set it to 1")
    divisors = [g for g in range(1, m.layers + 1) if m.layers % g == 0]
    _need(m.layers % m.share_layers == 0, "model.share_layers",
          f"{m.share_layers} does not divide model.layers={m.layers}: groups of consecutive layers share one set "
          f"of weights, so use one of {divisors}")
  _need(m.lora_rank >= 0, "model.lora_rank", f"must be >= 0 (0 = no adapters), got {m.lora_rank}")
  _need(m.lora_alpha >= 0, "model.lora_alpha", f"must be >= 0 (0 = lora_rank), got {m.lora_alpha}")
  if m.lora_rank:
    _need(m.name in ("lstm", "transformer"), "model.lora_rank",
          f"adapters are built for the lstm and transformer models, not model.name={m.name!r}; set it to 0")
    _need(m.lora_rank <= m.d, "model.lora_rank",
          f"{m.lora_rank} exceeds model.d={m.d}: a rank above the projection's width adds parameters and no "
          f"expressive power; use at most {m.d}")
  else:
    _need(m.lora_alpha == 0, "model.lora_alpha",
          f"is {m.lora_alpha} but model.lora_rank=0 (no adapters), so it changes nothing; set model.lora_rank too")


def remat_tags(config: ml_collections.ConfigDict) -> frozenset[str]:
  """The checkpoint names every remat block of `config.model` emits (what save:/offload: may name).

  A latent model applies one policy to each stack it builds, so a tag must
  exist in all of them (a VAE with a Transformer encoder and an LSTM decoder
  has no tag in common). Imports the model modules (and so JAX): called only
  for save:/offload: policies, so plain config loading stays fast.
  """
  from wm.models import lstm, transformer  # pylint: disable=g-import-not-at-top
  tags = {"lstm": lstm.REMAT_TAGS, "transformer": transformer.REMAT_TAGS}
  m = config.model
  if m.name in tags:
    return tags[m.name]
  if m.name == "vrnn":
    return tags["lstm"]
  if m.name == "mixture":
    return tags[m.decoder]
  return tags[m.encoder] & tags[m.decoder]


def _check_policy(config: ml_collections.ConfigDict) -> None:
  policy = config.remat.policy
  base, colon, rest = policy.partition(":")
  _need(base in ("none", "full", "dots", "dots_no_batch", "save", "offload"), "remat.policy",
        f"{policy!r}: expected none, full, dots, dots_no_batch, save:<names> or offload:<names>")
  if base not in ("save", "offload"):
    _need(not colon, "remat.policy", f"{policy!r}: {base} takes no tensor names (only save: and offload: do)")
    return
  names = [n.strip() for n in rest.split(",")]
  _need(any(names), "remat.policy", f"{policy!r} names no tensors; e.g. save:attn_out,mlp_hidden")
  _need(all(names), "remat.policy", f"{policy!r} has an empty name between commas")
  known = remat_tags(config)
  unknown = sorted(set(names) - known)
  _need(not unknown, "remat.policy",
        f"{policy!r}: model {config.model.name!r} has no tensor(s) tagged {unknown}; it tags {sorted(known) or 'none'}")


def _check_prune(config: ml_collections.ConfigDict) -> None:
  pr, steps = config.prune, config.train.steps
  _need(pr.method in PRUNE_METHODS, "prune.method",
        f"{pr.method!r} is not one of {PRUNE_METHODS} (\"\" = no pruning)")
  # Ranges that hold whatever the method, so a bad value is named even while pruning is off.
  _need(pr.every >= 1, "prune.every", f"must be >= 1 (steps between mask updates), got {pr.every}")
  _need(pr.start_step >= 1, "prune.start_step", f"must be >= 1 (steps count from 1), got {pr.start_step}")
  _need(pr.end_step >= 1, "prune.end_step", f"must be >= 1 (steps count from 1), got {pr.end_step}")
  _need(0.0 <= pr.sparsity <= 1.0, "prune.sparsity", f"must be a fraction in [0, 1], got {pr.sparsity}")
  _need(pr.m >= 2, "prune.m", f"must be >= 2 (groups of m weights along the input axis), got {pr.m}")
  _need(1 <= pr.n < pr.m, "prune.n", f"must be in [1, prune.m={pr.m}) (weights kept per group), got {pr.n}")
  if not pr.method:
    return
  # The pruning masks cover the matmul weights the optimizer updates; under LoRA those are frozen.
  _need(not config.model.lora_rank, "prune.method",
        f"{pr.method!r} prunes trained weights, but model.lora_rank={config.model.lora_rank} freezes them; "
        f"prune the base model before fine-tuning, or set prune.method=\"\"")
  if pr.method == "2:4":
    _need((pr.n, pr.m) == (2, 4), "prune.n",
          f"method \"2:4\" keeps 2 of 4, but prune.n={pr.n}, prune.m={pr.m}; use method \"n:m\" for other ratios")
  if pr.method == "magnitude":
    _need(0.0 < pr.sparsity < 1.0, "prune.sparsity", f"must be in (0, 1), got {pr.sparsity}")
  else:
    n, m = (2, 4) if pr.method == "2:4" else (pr.n, pr.m)
    _need(abs(pr.sparsity - (1 - n / m)) < 1e-6, "prune.sparsity",
          f"{n}:{m} keeps {n} of every {m} weights, so the final sparsity is {1 - n / m:g}; "
          f"set prune.sparsity={1 - n / m:g} (got {pr.sparsity})")
  _need(pr.end_step >= pr.start_step, "prune.end_step",
        f"{pr.end_step} is before prune.start_step={pr.start_step}; set it to start_step (one-shot) or later")
  span = pr.end_step - pr.start_step
  _need(span % pr.every == 0, "prune.end_step",
        f"end_step - start_step = {span} must be a multiple of prune.every={pr.every} (masks change at "
        f"start_step + k * every); e.g. prune.end_step={pr.start_step + (span // pr.every + 1) * pr.every}")
  _need(pr.end_step <= steps, "prune.end_step",
        f"{pr.end_step} is after train.steps={steps}, so the run ends before the final sparsity "
        f"{pr.sparsity:g}; lower prune.end_step or raise train.steps")


def _check_mesh(ms: ml_collections.ConfigDict) -> None:
  _need(ms.num_devices >= 0, "mesh.num_devices", f"must be >= 0 (0 = all devices), got {ms.num_devices}")
  for f in ("data", "fsdp", "tensor"):
    _need(ms[f] == -1 or ms[f] >= 1, f"mesh.{f}", f"must be >= 1, or -1 for the devices left over; got {ms[f]}")
  _need(ms.num_processes >= 0, "mesh.num_processes", f"must be >= 0, got {ms.num_processes}")
  _need(ms.process_id >= -1, "mesh.process_id", f"must be >= 0, or -1 when unset; got {ms.process_id}")
  if ms.process_id >= 0:
    _need(ms.num_processes >= 1, "mesh.process_id",
          f"is {ms.process_id}: also set mesh.num_processes (and mesh.coordinator_address)")
  if ms.num_processes:
    _need(ms.process_id < ms.num_processes, "mesh.process_id",
          f"{ms.process_id} is not below mesh.num_processes={ms.num_processes}")
  example = '[["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["latent", null]]'
  seen = set()
  for rule in ms.rules:
    _need(isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str), "mesh.rules",
          f"each rule is a pair (logical axis, mesh axis or list of them or null); got {rule!r}, e.g. {example}")
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else [rule[1]]
    for ax in axes:
      _need(ax is None or ax in MESH_AXES, "mesh.rules",
            f"rule {rule!r}: {ax!r} is not a mesh axis; mesh axes are {MESH_AXES} (or null)")
    _need(rule[0] not in seen, "mesh.rules", f"logical axis {rule[0]!r} has two rules")
    seen.add(rule[0])


def _check_text_files(spec: str) -> None:
  """The corpus layout of `data.text_files` resolves (files exist, are not empty, splits are named), before any build.

  wm.data.corpus raises a CorpusError (a ConfigError) naming the path and the fix.
  """
  from wm.data import corpus  # light: no TFDS or grain
  corpus.layout(spec)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
  """`512MiB`, `8GiB`, `16GB`, `1e9` -> bytes."""
  if isinstance(text, int):
    return text
  match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
  if not match or match.group(2).lower() not in _UNITS:
    raise ConfigError(f"budget {text!r}: expected a size like 512MiB, 8GiB or 16GB")
  value = float(match.group(1)) * _UNITS[match.group(2).lower()]
  if value <= 0 or not math.isfinite(value):
    raise ConfigError(f"budget {text!r} must be positive")
  return int(value)


def format_bytes(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"
