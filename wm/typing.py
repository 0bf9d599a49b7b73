"""Dimension notation and array aliases used in signatures across `wm`.

    b  batch                     t  time (sequence length)
    d  model width               f  MLP hidden width
    h  attention heads           k  key/value heads (grouped-query attention)
    e  head dimension            v  vocabulary size
    l  layers                    z  latent dimension
    c  mixture components        s  importance samples (in attention: key positions)

Annotations may relate sizes (`Float[Array, "b 4*d"]`: four times the `d`
bound by another argument). They are checked, not only read:
tests/test_typing.py runs every model family's losses, forward pass and
generation under jax.jit with jaxtyping's import hook and beartype, so an
annotation that disagrees with the shapes the code passes fails there.
"""

from jaxtyping import Array, Float, Int

Tokens = Int[Array, "b t"]
Weights = Float[Array, "b t"]
Logits = Float[Array, "b t v"]
Hidden = Float[Array, "b t d"]
Batch = dict[str, Array]  # {"inputs": Tokens, "targets": Tokens, "weights": Weights}
