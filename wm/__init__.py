"""wm: memory-bounded sequence models in JAX."""

from flax import nnx

# Parameters carry *logical* axis names ("embed", "mlp", ...) that only mean
# something once the config's rules map them to mesh axes (wm.parallel). Flax's
# eager sharding would try to place them at creation time, outside any mesh.
nnx.use_eager_sharding(False)

__version__ = "0.1.0"
