"""The config schema: every field a run can set, its default, and the values a choice field takes.

Config files in `configs/` start from `base_config()` and change fields; they
never add new ones, so a misspelt field is an error rather than a silently
ignored setting (wm.config.validation checks that, and every value).
"""

from __future__ import annotations

import ml_collections

TASKS = ("mqar", "copy", "selective_copy", "nback", "induction", "text")
MODELS = ("lstm", "transformer", "vae", "mixture", "vrnn")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "sgd", "adagrad")
SCHEDULES = ("cosine", "inverse_sqrt", "constant")
DTYPES = ("float32", "bfloat16")
QUANT_WEIGHTS = ("none", "int8")  # quant.weights
QAT_MODES = ("none", "int8")  # quant.qat
# quant.state, or "" for the compute dtype. "int8": a float32 scale per cached row; "int8_static": calibrated
# per-channel scales held once per model, so each cached element costs exactly 1 byte (wm/compress/quant.py).
STATE_DTYPES = ("float32", "bfloat16", "int8", "int8_static", "float8_e4m3fn")
PRUNE_METHODS = ("", "magnitude", "2:4", "n:m")  # prune.method; "" = off
KL_SCHEDULES = ("constant", "linear", "logistic", "cyclical")
NONFINITE_ACTIONS = ("stop", "skip_batch")
BUDGET_LEVERS = ("adamw8bit", "share_layers")  # train.budget_allow
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
  m.window = 0  # sliding window: each query reads itself and the `window` tokens before it; 0 = full causal attention
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
  # quant.state = "int8_static": train-split batches (data.batch_size each, a fixed-seed sample) whose forward
  # pass calibrates the static scales (the absolute maximum of each cached channel).
  q.calibration_batches = 8

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
  # Levers the planner may add when nothing fits without them, comma-separated from BUDGET_LEVERS: "adamw8bit"
  # (AdamW's moments in 8 bits) and "share_layers" (layers share weights: a smaller model class, so opt-in).
  t.budget_allow = ""
  # A pretrained run's workdir: a fresh run starts from the parameters of its latest verified checkpoint
  # (not its optimizer state or step); "" = random init. Ignored once this run has checkpoints of its own.
  t.init_from = ""
  return c
