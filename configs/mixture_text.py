"""Mixture of K byte-level LSTM language models, p(x) = sum_k pi_k p_k(x), on text.

    python -m wm train --config configs/mixture_text.py:quick --workdir runs/mixture_text

Default corpus: the interpreter's standard-library sources (no download).
One LSTM body with K output heads (`model.mixture_heads="separate"` for K
whole decoders), learned mixing weights, trained on the exact marginal
log-likelihood of each sequence. Records show per-component usage (mean
responsibility), the mixing weights and how many components carry more than
5% of the data. `quick` trains d=256, K=4 in a few minutes on 2 CPU cores.
"""

from wm.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.task = "text"
  c.data.seq_len = 128
  c.data.batch_size = 32
  c.model.name = "mixture"
  c.model.decoder = "lstm"
  c.model.d = 512
  c.model.layers = 1
  c.model.components = 8
  c.model.mixture_heads = "shared"
  c.model.mixture_prior = "learned"
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 200
  c.train.steps = 20_000
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  if arg == "quick":
    c.data.seq_len = 64
    c.data.batch_size = 32
    c.model.d = 256
    c.model.components = 4
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.train.steps = 800
    c.train.eval_every = 200
    c.train.eval_batches = 4
    c.train.log_every = 50
    c.train.checkpoint_every = 400
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'quick' or nothing")
  return c
