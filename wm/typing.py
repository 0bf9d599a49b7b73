"""Dimension notation and array aliases used in signatures across `wm`.

    b  batch                     t  time (sequence length)
    d  model width               f  MLP hidden width
    h  attention heads           k  key/value heads (grouped-query attention)
    e  head dimension            v  vocabulary size
    l  layers                    z  latent dimension
    c  mixture components        s  importance samples
"""

from jaxtyping import Array, Float, Int

Tokens = Int[Array, "b t"]
Weights = Float[Array, "b t"]
Logits = Float[Array, "b t v"]
Hidden = Float[Array, "b t d"]
Batch = dict[str, Array]  # {"inputs": Tokens, "targets": Tokens, "weights": Weights}
