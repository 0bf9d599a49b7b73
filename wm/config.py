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
OPTIMIZERS = ("adamw", "adafactor", "sgd", "adagrad")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
DTYPES = ("float32", "bfloat16")
KL_SCHEDULES = ("constant", "linear", "logistic", "cyclical")


class ConfigError(ValueError):
  """A config field is missing, has the wrong type, or holds an impossible value."""


def base_config() -> ml_collections.ConfigDict:
  """Every field a run can set, with defaults and one comment each."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init, data order, dropout and latent samples

  c.data = d = ml_collections.ConfigDict()
  d.task = "mqar"  # one of TASKS; "text" reads a text corpus
  d.seq_len = 64  # tokens per example fed to the model
  d.vocab_size = 8192  # synthetic tasks; text is byte-level (256) and sets this itself
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
  d.text_files = ""  # comma-separated paths or globs when text_source == "files"
  d.text_feature = "text"  # feature holding the text in a TFDS dataset
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
  o.name = "adamw"  # one of OPTIMIZERS
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
  t.eval_batches = 8  # 0 = the whole validation split
  t.checkpoint_every = 500
  t.max_to_keep = 3
  t.progress = True  # tqdm progress bar on process 0
  t.budget = ""  # per-device training-memory budget (e.g. "2GiB"); the planner fits the run to it
  return c


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist (expected configs/NAME.py[:ARG])")
  module_spec = importlib.util.spec_from_file_location("wm_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} does not define get_config(arg=None)")
  return module.get_config(arg or None)


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
      return type(old)(json.loads(text))
    return text
  except ValueError:
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
    node[leaf] = _coerce(field, old, value) if isinstance(value, str) and not isinstance(old, str) else value
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
  walk(config, base_config(), "")


def _need(cond: bool, field: str, message: str) -> None:
  if not cond:
    raise ConfigError(f"config.{field}: {message}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field; returns the config with derived fields filled in.

  Derived: `data.vocab_size` is 256 for byte-level text.
  """
  check_schema(config)
  config = ml_collections.ConfigDict(config.to_dict())
  d, m, o, t, r = config.data, config.model, config.optim, config.train, config.remat
  _need(d.task in TASKS, "data.task", f"{d.task!r} is not one of {TASKS}")
  if d.task == "text":
    config.data.vocab_size = 256  # byte-level tokenizer
  _need(d.seq_len >= 2, "data.seq_len", f"must be >= 2, got {d.seq_len}")
  _need(d.vocab_size >= 4, "data.vocab_size", f"must be >= 4, got {d.vocab_size}")
  _need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
  _need(d.train_size >= 1 and d.eval_size >= 1, "data.train_size", "train_size and eval_size must be >= 1")
  if d.task == "mqar":
    _need(d.num_kv_pairs >= 1, "data.num_kv_pairs", "must be >= 1")
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
    _need(bool(d.text_files), "data.text_files", "set it to comma-separated paths or globs")

  _need(m.name in MODELS, "model.name", f"{m.name!r} is not one of {MODELS}")
  for f in ("d", "layers", "heads", "kv_heads", "mlp_ratio", "latent_dim", "components"):
    _need(m[f] >= 1, f"model.{f}", f"must be >= 1, got {m[f]}")
  if m.name == "transformer" or "transformer" in (m.encoder, m.decoder):
    _need(m.d % m.heads == 0, "model.heads", f"heads={m.heads} must divide d={m.d}")
    _need((m.d // m.heads) % 2 == 0, "model.heads", f"head_dim d/heads={m.d // m.heads} must be even for rotary embeddings")
    _need(m.heads % m.kv_heads == 0, "model.kv_heads", f"kv_heads={m.kv_heads} must divide heads={m.heads}")
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

  for f in ("param_dtype", "compute_dtype"):
    _need(config.precision[f] in DTYPES, f"precision.{f}", f"must be one of {DTYPES}")

  _need(o.name in OPTIMIZERS, "optim.name", f"{o.name!r} is not one of {OPTIMIZERS}")
  _need(o.schedule in SCHEDULES, "optim.schedule", f"{o.schedule!r} is not one of {SCHEDULES}")
  _need(o.lr > 0, "optim.lr", "must be > 0")
  _need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  _need(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 = off)")
  _need(o.microbatches >= 1, "optim.microbatches", "must be >= 1")
  _need(d.batch_size % o.microbatches == 0, "optim.microbatches",
        f"{o.microbatches} microbatches must divide data.batch_size={d.batch_size}")

  _need(r.time_chunk >= -1, "remat.time_chunk", "must be -1 (sqrt(T)), 0 (off) or a positive chunk length")
  if r.time_chunk > 0:
    _need(d.seq_len % r.time_chunk == 0, "remat.time_chunk",
          f"{r.time_chunk} must divide data.seq_len={d.seq_len}")
  _check_policy_name(r.policy)

  _need(t.steps >= 0, "train.steps", "must be >= 0")
  for f in ("log_every", "eval_every", "checkpoint_every", "max_to_keep"):
    _need(t[f] >= 1, f"train.{f}", f"must be >= 1, got {t[f]}")
  _need(t.eval_batches >= 0, "train.eval_batches", "must be >= 0")
  if t.budget:
    parse_bytes(t.budget)  # raises a ConfigError naming the format
  return config


def _check_policy_name(policy: str) -> None:
  base = policy.split(":", 1)[0]
  _need(base in ("none", "full", "dots", "dots_no_batch", "save", "offload"), "remat.policy",
        f"{policy!r}: expected none, full, dots, dots_no_batch, save:<names> or offload:<names>")
  if base in ("save", "offload"):
    _need(":" in policy and policy.split(":", 1)[1].strip() != "", "remat.policy",
          f"{policy!r} names no tensors; e.g. save:attn_out,mlp_hidden")


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
