"""Model lookup by name: `config.model.name` -> a module in this package.

A model family is one file here. Each exposes a class that every step,
memory estimate and experiment uses the same way:

    model = Model(config, rngs=nnx.Rngs(seed))
    loss, metrics = model.loss(batch, train=True, rngs=nnx.Rngs(step_key))
    model.state_bytes(context_len, batch=1)  # working memory, DESIGN.md definition

`metrics` holds scalar means over the batch's scored tokens plus "weight",
the number of scored tokens, so metrics of several batches average exactly.
"""

import importlib

import ml_collections
from flax import nnx

# Parameters carry *logical* axis names ("embed", "mlp", ...) that only mean
# something once the config's rules map them to mesh axes (wm.parallel). Flax's
# eager sharding would try to place them at creation time, outside any mesh.
# Set here rather than in wm/__init__.py so that importing wm (the CLI, config
# loading) does not import JAX; every model is built through this package.
nnx.use_eager_sharding(False)

# name -> (module, class). The latent families share latent.py.
FAMILIES = {
    "lstm": ("lstm", "Model"),
    "transformer": ("transformer", "Model"),
    "vae": ("vae", "SequenceVAE"),
    "mixture": ("mixture", "Mixture"),
    "vrnn": ("vrnn", "VRNN"),
}


def model_class(name: str):
  if name not in FAMILIES:
    raise ValueError(f"config.model.name={name!r}: known models are {sorted(FAMILIES)}")
  module, cls = FAMILIES[name]
  return getattr(importlib.import_module(f"wm.models.{module}"), cls)


def build(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  return model_class(config.model.name)(config, rngs=rngs)
