"""Variational RNN (Chung et al. 2015) on byte-level text: a latent z_t at every step.

    python -m wm train --config configs/vrnn_text.py:quick --workdir runs/vrnn_text

Default corpus: the interpreter's standard-library sources (no download).
Prior p(z_t|h_{t-1}), posterior q(z_t|x_t, h_{t-1}) and decoder
p(x_t|z_t, h_{t-1}) around an LSTM whose input is [x_t, z_t]. The time scan
is rematerialised in chunks of ~sqrt(T) steps (`remat.time_chunk=-1`, Chen
et al. 2016). KL annealing and free bits keep the per-step codes in use.
Evaluation reports rec, kl, elbo (nats per sequence) and iw_nll (whole
trajectories as importance samples). `quick` trains d=256 in a few minutes
on 2 CPU cores.
"""

from wm.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.task = "text"
  c.data.seq_len = 128
  c.data.batch_size = 32
  c.model.name = "vrnn"
  c.model.d = 512
  c.model.layers = 1
  c.model.latent_dim = 16
  c.model.kl_schedule = "linear"
  c.model.kl_warmup_steps = 5000
  c.model.free_bits = 0.01  # nats per dimension and per token
  c.model.iw_samples = 16
  c.remat.time_chunk = -1  # sqrt(T) chunks: saved state ~ sqrt(T) for one extra forward pass
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
    c.model.kl_warmup_steps = 400
    c.model.iw_samples = 8  # each sample is a whole sequential pass at evaluation
    c.remat.time_chunk = 0  # at T=64 the saved activations are small; skip the recompute
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
