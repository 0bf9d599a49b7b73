"""Byte-level stacked LSTM language model on text.

    python -m wm train --config configs/text_lstm.py:quick --workdir runs/text_lstm

Default corpus: the interpreter's standard-library sources (no download).
`quick` trains a 2-layer d=256 LSTM for a few minutes on 2 CPU cores.
"""

from wm.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.task = "text"
  c.data.seq_len = 256
  c.data.batch_size = 32
  c.model.name = "lstm"
  c.model.d = 1024
  c.model.layers = 2
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 200
  c.train.steps = 20_000
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  if arg == "quick":
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.model.d = 256
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.train.steps = 600
    c.train.eval_every = 200
    c.train.eval_batches = 8
    c.train.log_every = 25
    c.train.checkpoint_every = 200
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'quick' or nothing")
  return c
