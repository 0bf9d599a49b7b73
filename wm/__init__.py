"""wm: memory-bounded sequence models in JAX.

The package itself imports nothing heavy, so `python -m wm --help` and config
loading start without JAX; `wm.models` sets up Flax when a model is built.
"""

__version__ = "0.1.0"
