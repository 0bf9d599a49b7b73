"""Validation: every field of a config checked before anything is compiled.

Each error names the field and the fix (`config.model.heads: heads=3 must
divide d=128`). `check_schema` checks names and types against
`base_config()`; `validate` checks values and how fields fit together.
"""

from __future__ import annotations

import math

import ml_collections

from wm.config.schema import (BUDGET_LEVERS, DTYPES, KL_SCHEDULES, MESH_AXES, MODELS, NONFINITE_ACTIONS, OPTIMIZERS,
                              PRUNE_METHODS, QAT_MODES, QUANT_WEIGHTS, SCHEDULES, STATE_DTYPES, TASKS,
                              ConfigError, base_config)
from wm.config.sizes import parse_bytes


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
  _need(q.calibration_batches >= 1, "quant.calibration_batches",
        f"must be >= 1 train batch for the int8_static scales, got {q.calibration_batches}")
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
  for lever in filter(None, (x.strip() for x in t.budget_allow.split(","))):
    _need(lever in BUDGET_LEVERS, "train.budget_allow",
          f"{lever!r} is not a lever the planner can add; use a comma-separated subset of {BUDGET_LEVERS}")
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

