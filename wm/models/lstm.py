"""LSTM language model: embedding -> stacked LSTM -> RMSNorm -> output head.

The cell (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al.
2000) and its time scan with a hand-written backward pass are in
wm/models/lstm_cell.py; x_t W_x + b does not depend on the recurrence, so it
is one big matmul over all time steps before the scan. The forget bias starts
at `forget_bias` (Jozefowicz et al. 2015: 1.0 lets gradients flow through c
early in training; a larger bias keeps c longer, Tallec & Ollivier 2018).

Time chunking (`remat.time_chunk = k`, Chen et al. 2016) comes at two levels:

- The language model (`Model.loss`) runs the whole model one chunk of k
  steps at a time: one scan over the T/k chunks carries every layer's (h, c)
  and the running loss sums, and each chunk (embedding, all layers, norm,
  head, loss) is rematerialized whole. The backward pass keeps only the
  carries at chunk boundaries and recomputes one chunk at a time, so no
  [b, T, ...] tensor but the batch ever exists and the step's temporaries
  grow like T/k + k, i.e. sqrt(T) at k = sqrt(T), on top of what does not
  depend on T (gradients, optimizer update).
- `LSTMStack` on its own (the latent models of wm/models/latent.py) chunks
  each layer's time scan, projecting x W_x inside each rematerialized chunk;
  the layer's input and output sequences, [b, T, d], still exist whole, so
  its temporaries stay linear in T with a smaller slope. Inside the
  language model's chunks the stack runs unchunked.

Levers (wm/models/sharing.py, layers.LoRA): `model.share_layers = g` stacks
layers/g weight sets, each applied to g consecutive layers; `model.lora_rank`
adds a low-rank adapter to W_x (layers.LoRADense) and to W_h, the latter
folded into W_h once per sequence (`LSTMLayer.cell_params`) so the time loop
keeps one matmul per step.

Working memory between tokens is (h, c) per layer: layers * 2 * d values.
Gate nonlinearities run in float32; the carried state is kept in the compute
dtype, and between generation steps in `quant.state` (float32, bfloat16,
int8 with a scale per row, int8 with static calibrated scales, or
float8_e4m3fn: wm.compress.quant), which is what `state_bytes` counts.
Static scales: h = sigmoid(o) tanh(c) lies in (-1, 1), so its scale is 1/127
for every channel without calibration; c is unbounded, and its scale per
layer and channel comes from the largest |c| the model reaches on training
data (`state_amax`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wm import parallel
from wm.compress import quant
from wm.models import layers as L
from wm.models.lstm_cell import lstm_cell, lstm_sequence
from wm.models import remat as R
from wm.models import sharing
from wm.typing import Array, Batch, Float, Hidden, Int, Logits, Tokens

# Per layer (h [b, d], c [b, d]); between generation steps in the state dtype (int8: quant.QArray, a scale per row;
# int8_static: quant.QArray with the layer's calibrated scale [1, d], the same for every sequence).
State = list[tuple[Any, Any]]

REMAT_TAGS = frozenset({"gates", "h", "c"})


class LSTMLayer(nnx.Module):
  """One LSTM layer: input projection and a (chunked) time scan."""

  def __init__(self, d_in: int, d: int, *, forget_bias: float, param_dtype, dtype, rngs: nnx.Rngs,
               lora_rank: int = 0, lora_alpha: float = 0.0):
    self.d, self.dtype = d, dtype
    bias = jnp.zeros((4, d), jnp.float32).at[1].set(forget_bias).reshape(4 * d)  # i, f, g, o
    self.w_x = L.dense(d_in, 4 * d, axes=("embed", "gates"), use_bias=True, bias_init=bias,
                       param_dtype=param_dtype, dtype=dtype, rngs=rngs, lora_rank=lora_rank, lora_alpha=lora_alpha)
    w_h = L.normal(rngs.params(), (d, 4 * d), 1 / math.sqrt(d), param_dtype)
    self.w_h = nnx.Param(w_h, out_sharding=("embed", "gates"))
    self.w_h_lora = (L.LoRA(d, 4 * d, lora_rank, alpha=lora_alpha, axes=("embed", "gates"), param_dtype=param_dtype,
                            dtype=dtype, rngs=rngs) if lora_rank else None)

  def cell_params(self) -> dict[str, jax.Array]:
    # Gathered over the FSDP axis once per sequence, outside the time loop:
    # otherwise every step re-gathers it (and XLA's CPU partitioner got the
    # gradient wrong on a 2x2x2 data/fsdp/tensor mesh, see tests/test_parallel.py).
    w_h = self.w_h.get_value()
    if self.w_h_lora is not None:
      # W_h + (alpha / r) A B formed once per sequence: a [d, 4d] add beside T
      # recurrent matmuls, where h A B inside the loop would add two per step.
      w_h = quant.matmul_weight(w_h, jnp.float32) + self.w_h_lora.delta()
    w_h = quant.matmul_weight(w_h, self.dtype)  # float, or int8 after quantization
    return {"w_h": parallel.constrain(w_h, (None, "gates"))}

  def merge_lora(self) -> None:
    """Folds the recurrent adapter into W_h (W_x's is its LoRADense's own; see layers.merge_lora)."""
    if self.w_h_lora is not None:
      self.w_h[...] = (self.w_h[...].astype(jnp.float32) + self.w_h_lora.delta()).astype(self.w_h.dtype)

  def quant_axes(self) -> dict[str, tuple[int, ...]]:
    """Int8 scales per gate column of W_h (wm.compress.quant): reduce over its input rows."""
    return {"w_h": (-2,)}

  def __call__(self, x: Float[Array, "b t d_in"], h: jax.Array, c: jax.Array, time_chunk: int = 0,
               fused: bool = False) -> tuple[Hidden, tuple[jax.Array, jax.Array]]:
    """Runs the layer over a sequence.

    Args:
      x: inputs [b, t, d_in].
      h, c: initial state [b, d].
      time_chunk: steps per rematerialized chunk (already resolved); 0 = none.
      fused: the hand-written backward (`lstm_sequence`); False differentiates
        the scan of `lstm_cell`, whose gate/h/c tags a remat policy can name.
    """
    params = self.cell_params()
    if fused:
      scan = lambda carry, xp: lstm_sequence(params["w_h"], carry, xp)
    else:
      scan = lambda carry, xp: jax.lax.scan(functools.partial(lstm_cell, params), carry, xp)
    # The input projection runs batch-major and its output is made time-major
    # for the scans (which run over the leading axis): Dense flattens [b, t]
    # into one row dim (layers.matmul_2d), which keeps the batch sharding only
    # when b is the major dim; flattening [t, b] made GSPMD gather the whole
    # sequence on every device under data/FSDP meshes.
    project = lambda x: jnp.swapaxes(self.w_x(x), 0, 1)  # [b, t, d_in] -> [t, b, 4d]
    if not time_chunk:
      carry, ys = scan((h, c), project(x))  # one [b*t, d_in] x [d_in, 4d] matmul for all steps
    else:
      b, t = x.shape[:2]
      chunks = jnp.moveaxis(x.reshape((b, t // time_chunk, time_chunk) + x.shape[2:]), 1, 0)  # [t/k, b, k, d_in]

      # Each chunk projects its own inputs and is rematerialized as a whole:
      # the outer scan keeps only the carry entering each chunk (Chen et al.
      # 2016), and the backward pass of one chunk holds that chunk's
      # projections and residuals alone. The chunk inputs are the layer input.
      def run_chunk(carry, x_chunk):
        return scan(carry, project(x_chunk))

      run_chunk = jax.checkpoint(run_chunk, policy=jax.checkpoint_policies.nothing_saveable,
                                 prevent_cse=False)  # the outer scan already blocks CSE
      carry, ys = jax.lax.scan(run_chunk, (h, c), chunks)
      ys = ys.reshape((t,) + ys.shape[2:])
    return jnp.swapaxes(ys, 0, 1), carry

  def step(self, x_t: Float[Array, "b d_in"], h: jax.Array, c: jax.Array):
    return lstm_cell(self.cell_params(), (h, c), self.w_x(x_t))


class LSTMStack(nnx.Module):
  """`layers` LSTM layers; the d -> d layers are stacked and applied with a scan.

  Why a scan over layers rather than a Python loop: with a loop, XLA (CPU at
  least) schedules every layer's rematerialized forward scan early, so
  per-layer remat saved nothing (measured: 4 layers, T=128, d=64: 10.2 MB
  temp with and without remat); the scan orders the recomputation layer by
  layer (4.0 MB). Layer 0 stands alone when its input width d_in differs
  from d. Each layer is one remat block (`remat_policy`), and inside it the
  time scan is chunked (`time_chunk`, Chen et al. 2016). With share_layers
  = g > 1 (d_in == d only) layers/g weight sets are stacked, each applied to
  g consecutive layers (wm/models/sharing.py).
  """

  REMAT_TAGS = REMAT_TAGS

  def __init__(self, d_in: int, d: int, layers: int, *, forget_bias: float = 1.0, dropout: float = 0.0,
               param_dtype=jnp.float32, dtype=jnp.float32, remat_policy: str = "none", time_chunk: int = 0,
               share_layers: int = 1, lora_rank: int = 0, lora_alpha: float = 0.0, state_dtype: str = "",
               rngs: nnx.Rngs):
    R.checkpoint_policy(remat_policy, REMAT_TAGS)  # fail at construction on a bad policy name
    if share_layers < 1 or layers % share_layers:
      raise ValueError(f"share_layers={share_layers} must be >= 1 and divide layers={layers}")
    if share_layers > 1 and d_in != d:
      raise ValueError(f"share_layers={share_layers} needs every layer to map d -> d; the first maps {d_in} -> {d}")
    self.d, self.num_layers, self.dtype = d, layers, dtype
    # (h, c) storage between generation steps (config quant.state); "" keeps the compute dtype.
    self.state_dtype = quant.check_state_dtype(state_dtype or jnp.dtype(dtype).name)
    self.dropout, self.remat_policy, self.time_chunk = dropout, remat_policy, time_chunk
    self.share = share_layers
    kw = dict(forget_bias=forget_bias, param_dtype=param_dtype, dtype=dtype, lora_rank=lora_rank,
              lora_alpha=lora_alpha)
    self.first = LSTMLayer(d_in, d, rngs=rngs, **kw) if d_in != d else None
    self.num_stacked = layers - (self.first is not None)

    # Stacked parameters get a leading axis named "layers" (see transformer.py);
    # one entry per weight set (per layer without sharing).
    @nnx.split_rngs(splits=max(self.num_stacked // share_layers, 1))
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return LSTMLayer(d, d, rngs=rngs, **kw)

    self.stacked = make(rngs) if self.num_stacked else None

  def zero_state(self, batch: int) -> State:
    """The zero (h, c) of every layer in the compute dtype: where a forward pass over a sequence starts."""
    zeros = jnp.zeros((batch, self.d), self.dtype)
    return [(zeros, zeros) for _ in range(self.num_layers)]

  def init_state(self, batch: int, scales: dict[str, jax.Array] | None = None) -> State:
    """The zero state generation starts from, stored in the state dtype.

    `scales` ({"h", "c": [l, d]}, from `quant.static_scales` of `state_amax`)
    is needed by, and only used for, quant.state = "int8_static".
    """
    def empty(name, i):
      scale = None if scales is None else jnp.asarray(scales[name])[i][None]  # [1, d]
      return quant.empty_state((batch, self.d), self.state_dtype, self.dtype, scale)

    return [(empty("h", i), empty("c", i)) for i in range(self.num_layers)]

  def state_bytes(self, batch: int = 1) -> int:
    """layers * 2 (h, c) * batch rows of d elements in the state dtype."""
    return self.num_layers * 2 * batch * quant.state_row_bytes(self.state_dtype, self.d)

  def state_constant_bytes(self) -> int:
    """Bytes held once per model beside the state: int8_static's float32 scales, layers * 2 * d."""
    return quant.state_constant_bytes(self.state_dtype, self.num_layers * 2 * self.d)

  def layer(self, i: int) -> LSTMLayer:
    """Layer i as a standalone module (a view of its weight set)."""
    if self.first is not None:
      if i == 0:
        return self.first
      i -= 1
    return sharing.layer_view(self.stacked, i, self.share)

  def state_amax(self, x: Float[Array, "b t d_in"]) -> dict[str, jax.Array]:
    """{"h", "c": [l, d]}: the bounds of the stored (h, c) over a forward pass of x from the zero state.

    c: the largest |c_t| each layer reaches over batch and time steps. h:
    sigmoid(o) tanh(c) lies in (-1, 1), so its bound is 1 whatever the data
    (a static scale of exactly 1/127).
    """
    x = x.astype(self.dtype)
    amax = []
    for i in range(self.num_layers):
      layer = self.layer(i)
      params, zeros = layer.cell_params(), jnp.zeros((x.shape[0], self.d), self.dtype)

      def step(carry, xp):
        carry, h = lstm_cell(params, carry, xp)
        return carry, (h, carry[1])

      _, (hs, cs) = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(layer.w_x(x), 0, 1))
      amax.append(jnp.max(jnp.abs(cs.astype(jnp.float32)), axis=(0, 1)))
      x = jnp.swapaxes(hs, 0, 1)
    c = jnp.stack(amax)
    return {"h": jnp.ones_like(c), "c": c}

  def _decoded(self, state: State) -> State:
    return [(quant.decode_state(h, self.dtype), quant.decode_state(c, self.dtype)) for h, c in state]

  def _run(self, body, x, state: State, keys, *, remat: bool) -> tuple[jax.Array, State]:
    """Applies body(x, layer, h, c, key) -> (x, (h, c)) to every layer in order."""
    final = []
    n0 = 0 if self.first is None else 1
    if self.first is not None:
      run = R.remat_block(body, self.remat_policy, REMAT_TAGS) if remat else body
      x, carry = run(x, self.first, *state[0], None if keys is None else keys[0])
      final.append(carry)
    if self.stacked is not None:
      hs = jnp.stack([h for h, _ in state[n0:]]).astype(self.dtype)
      cs = jnp.stack([c for _, c in state[n0:]]).astype(self.dtype)
      ks = None if keys is None else keys[n0:]
      if self.share > 1:
        x, (hs, cs) = sharing.apply_shared(body, x, self.stacked, (hs, cs, ks), share=self.share,
                                           remat_policy=self.remat_policy if remat else "none", tags=REMAT_TAGS)
      else:
        # Under a scan the recomputation cannot merge with the forward pass, so prevent_cse is not needed.
        run = R.remat_block(body, self.remat_policy, REMAT_TAGS, prevent_cse=False) if remat else body
        scan = nnx.scan(run, in_axes=(nnx.Carry, 0, 0, 0, None if ks is None else 0), out_axes=(nnx.Carry, 0),
                        transform_metadata={nnx.PARTITION_NAME: "layers"})
        x, (hs, cs) = scan(x, self.stacked, hs, cs, ks)
      final += [(hs[i], cs[i]) for i in range(self.num_stacked)]
    return x, final

  def __call__(self, x: Float[Array, "b t d_in"], initial_state: State | None = None, *,
               dropout_key: jax.Array | None = None, time_chunk: int | None = None) -> tuple[Hidden, State]:
    """Runs the stack over a sequence.

    Args:
      x: inputs [b, t, d_in].
      initial_state: per-layer (h, c); zeros when None.
      dropout_key: enables dropout on every layer's output (Zaremba et al.
        2014: non-recurrent connections only) when the rate is > 0.
      time_chunk: overrides the stack's `time_chunk` for this call (0: run
        each layer's time scan whole; `Model.loss` passes 0 inside its own
        time chunks).

    Returns:
      (outputs of the last layer [b, t, d], final per-layer (h, c)).
    """
    state = self._decoded(initial_state) if initial_state is not None else self.zero_state(x.shape[0])
    chunk = R.resolve_time_chunk(self.time_chunk if time_chunk is None else time_chunk, x.shape[1])
    keys = None if dropout_key is None or self.dropout <= 0 else jax.random.split(dropout_key, self.num_layers)

    # Layer remat policies name the cell's tagged tensors, which only the
    # autodiff path has; without layer remat the hand-written backward runs.
    fused = self.remat_policy == "none"

    def body(x, layer, h, c, key):
      y, carry = layer(x, h, c, chunk, fused)
      y = parallel.constrain(y, ("batch", "length", None))
      return L.dropout(y, self.dropout, key), carry

    return self._run(body, x.astype(self.dtype), state, keys, remat=True)

  def step(self, x_t: Float[Array, "b d_in"], state: State) -> tuple[Float[Array, "b d"], State]:
    """One time step through all layers (generation); no dropout."""
    def body(x, layer, h, c, key):
      del key
      carry, y = layer.step(x, h, c)
      return y, carry

    y, new = self._run(body, x_t.astype(self.dtype), self._decoded(state), None, remat=False)
    # Stored in the state dtype until the next token (the cell itself always runs in the compute dtype);
    # int8_static keeps each layer's calibrated scales.
    kind = self.state_dtype
    return y, [(quant.update_state(h0, h, kind), quant.update_state(c0, c, kind))
               for (h0, c0), (h, c) in zip(state, new)]


class Model(nnx.Module):
  """LSTM language model (config.model.name = "lstm")."""

  REMAT_TAGS = REMAT_TAGS

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    kw = L.precision_kwargs(config)
    self.dtype = kw["dtype"]
    self.d, self.num_layers, self.rate = m.d, m.layers, m.dropout
    self.embed = L.Embed(config.data.vocab_size, m.d, rngs=rngs, **kw)
    self.stack = LSTMStack(m.d, m.d, m.layers, forget_bias=m.forget_bias, dropout=m.dropout,
                           remat_policy=config.remat.policy, time_chunk=config.remat.time_chunk,
                           share_layers=m.share_layers, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
                           state_dtype=config.quant.state, rngs=rngs, **kw)
    # LSTM outputs lie in (-1, 1) whatever the width; the norm gives the
    # (possibly tied) head unit-scale inputs.
    self.norm = L.RMSNorm(m.d, **kw)
    self.head = L.output_head(m.d, config.data.vocab_size, tied=m.tie_embeddings, rngs=rngs, **kw)

  def _logits(self, x: jax.Array) -> jax.Array:
    return L.head_logits(self.embed, self.head, self.norm(x))

  def _forward(self, tokens: Tokens, state: State | None, dropout_key: jax.Array | None,
               time_chunk: int | None = None) -> tuple[Logits, State]:
    """Logits [b, t, V] and the final per-layer (h, c) from `state` (zeros if None)."""
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    x = parallel.constrain(self.embed(tokens), ("batch", "length", None))
    x = L.dropout(x, self.rate, keys[0])
    x, state = self.stack(x, state, dropout_key=keys[1], time_chunk=time_chunk)
    return self._logits(x), state

  def __call__(self, tokens: Tokens, *, dropout_key: jax.Array | None = None) -> Logits:
    """Logits (float32) [b, t, V] for next-token prediction at every position."""
    return self._forward(tokens, None, dropout_key)[0]

  def loss(self, batch: Batch, *, train: bool, rngs: nnx.Rngs | None = None):
    """Weighted next-token cross-entropy; see layers.lm_loss for the metrics.

    With `remat.time_chunk` = k < T the whole model runs one time chunk at a
    time (`_chunked_loss_sums`); the loss, metrics and gradients are those of
    the whole sequence, except that dropout masks differ (see there).
    """
    key = rngs.dropout() if (train and self.rate > 0 and rngs is not None) else None
    chunk = R.resolve_time_chunk(self.stack.time_chunk, batch["inputs"].shape[1])
    if 0 < chunk < batch["inputs"].shape[1]:
      sums = self._chunked_loss_sums(batch, chunk, key)
    else:
      sums = L.lm_loss_sums(self(batch["inputs"], dropout_key=key), batch["targets"], batch["weights"])
    return L.lm_loss_from_sums(sums)

  def _chunked_loss_sums(self, batch: Batch, chunk: int, dropout_key: jax.Array | None) -> dict[str, jax.Array]:
    """`layers.lm_loss_sums` of the batch, computed in time chunks of `chunk` steps.

    One scan over the T/k chunks carries every layer's (h, c) and the running
    loss sums; each chunk embeds its k tokens, runs all layers over them,
    and applies the norm, the head and the loss. The chunk is one
    `jax.checkpoint` that saves nothing, so the backward pass keeps only the
    carry entering each chunk and recomputes one chunk at a time (Chen et al.
    2016): no [b, T, ...] tensor but the batch itself is ever alive, and the
    step's temporaries grow like T/k carries + one chunk, sqrt(T) at k =
    sqrt(T). Chunking only each layer's time scan (`LSTMStack` with
    `time_chunk`) still keeps every layer's output, the embeddings and the
    [b, T, V] logits with their gradients: the step grew like T^0.94
    (docs/experiments.md, remat).

    Dropout: chunk i draws its masks from fold_in(dropout_key, i), so the
    masks differ from the unchunked path's (same rate and distribution, other
    draws); without dropout both paths compute the same numbers.
    """
    b, t = batch["inputs"].shape
    # Each chunk runs a copy of the model with Variables of its own trace
    # (merge with copy=True): run on `self`, or on a merge that reuses its
    # Variables, the layer scan (nnx.scan) refuses them ("Cannot extract
    # graph node from different trace level").
    graphdef, variables = nnx.split(self)

    def run_chunk(carry, i):
      state, sums = carry
      # Chunk i's columns, sliced here rather than the batch reshaped to
      # [T/k, b, k] for the scan, which would copy it (time-major) up front.
      tok, targets, weights = (jax.lax.dynamic_slice_in_dim(batch[name], i * chunk, chunk, axis=1)
                               for name in ("inputs", "targets", "weights"))
      model = nnx.merge(graphdef, variables, copy=True)
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
      logits, state = model._forward(tok, state, key, time_chunk=0)
      return (state, jax.tree.map(jnp.add, sums, L.lm_loss_sums(logits, targets, weights))), None

    run_chunk = jax.checkpoint(run_chunk, policy=jax.checkpoint_policies.nothing_saveable,
                               prevent_cse=False)  # the scan already keeps XLA from merging the recomputation
    zero = jnp.zeros((), jnp.float32)
    init = (self.stack.zero_state(b), {"xent": zero, "correct": zero, "weight": zero})
    (_, sums), _ = jax.lax.scan(run_chunk, init, jnp.arange(t // chunk))
    return sums

  def num_params(self) -> int:
    return L.param_count(self)

  def state_bytes(self, context_len: int, batch: int = 1) -> int:
    """Working memory (DESIGN.md): layers * 2 * d * bytes * batch, independent of context_len.

    Bytes per element are those of `quant.state` (int8: 1, plus a float32 scale per row of d;
    int8_static: exactly 1, its scales being `state_constant_bytes`).
    """
    del context_len
    return self.stack.state_bytes(batch)

  def state_constant_bytes(self) -> int:
    """Bytes held once per model (not per sequence) beside the state: the int8_static scales, else 0."""
    return self.stack.state_constant_bytes()

  def state_amax(self, tokens: Tokens) -> dict[str, jax.Array]:
    """{"h", "c": [l, d]}: the calibration statistic of int8_static (LSTMStack.state_amax)."""
    return self.stack.state_amax(self.embed(tokens))

  def init_state(self, batch: int, scales: dict[str, jax.Array] | None = None) -> State:
    return self.stack.init_state(batch, scales)

  def decode_step(self, tokens: Int[Array, "b"], state: State) -> tuple[Float[Array, "b v"], State]:
    """Consumes one token per sequence; returns next-token logits and the new state."""
    x, state = self.stack.step(self.embed(tokens), state)
    return self._logits(x), state
