"""Compression levers that trade bytes for quality, each a config field the memory estimate counts.

    quant.py          int8 weights (post-training and fake-quantized for QAT), int8/fp8 generation state
    adam8bit.py       AdamW with block-wise 8-bit moments (Dettmers et al. 2022)
    prune.py          gradual magnitude pruning, unstructured and N:M (Zhu & Gupta 2017): schedule, optimizer wrapper
    prune_masks.py    its masks: the k smallest magnitudes of each matrix, or of the N:M candidates
    sparse_export.py  the compressed export where pruning saves bytes
    leaves.py         parameter leaves that are nnx.Variables or plain arrays, read and rebuilt alike

All sit below `wm.models` (models read a quantized weight through
`quant.QArray`), so nothing here imports a model. docs/compression.md says
what each lever saves, what it costs, and why this is our own code rather than Qwix
(or, for pruning, JaxPruner).
"""
