"""Data: synthetic working-memory tasks and text, as TFDS datasets read through grain.

    tasks.py     synthetic tasks, each example a function of (task config, split, index)
    text.py      byte-level tokenizer, local corpora and their split layouts, packing
    subword.py   SentencePiece BPE tokenizer trained on a train split, token streams
    records.py   blocks of fixed-shape examples as TFDS records, written and read with numpy
    builders.py  TFDS builders for the tasks and local text (array_record, no TensorFlow)
    pipeline.py  prepare(config), make_iterator(config, split, ...): sharded, resumable batches

Submodules are imported by name (`from wm.data import pipeline`), so code that
only needs the tasks does not pay for importing TFDS and grain.
"""
