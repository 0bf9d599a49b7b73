"""Byte-level Transformer language model on text.

    python -m wm train --config configs/text_transformer.py:quick --workdir runs/text_tf

The default corpus is the running interpreter's standard-library sources, so
it trains anywhere with no download; any TFDS text dataset prepared on the
machine works too: `--config.data.text_source=lm1b --config.data.data_dir=DIR`.
`quick` trains a 2-layer d=128 model for a few minutes on 2 CPU cores.
"""

from wm.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.task = "text"
  c.data.seq_len = 512
  c.data.batch_size = 32
  c.model.name = "transformer"
  c.model.d = 384
  c.model.layers = 6
  c.model.heads = 6
  c.model.kv_heads = 6
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.1
  c.optim.warmup_steps = 500
  c.train.steps = 20_000
  c.train.eval_every = 1000
  c.train.eval_batches = 16
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  if arg == "quick":
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.model.d = 128
    c.model.layers = 2
    c.model.heads = 4
    c.model.kv_heads = 2
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.train.steps = 600
    c.train.eval_every = 200
    c.train.eval_batches = 8
    c.train.log_every = 25
    c.train.checkpoint_every = 200
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use 'quick' or nothing")
  return c
