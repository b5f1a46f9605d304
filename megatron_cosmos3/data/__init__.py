"""Data: WebDataset shards -> decode -> encode -> task -> packer -> ``PackedBatch``
(docs/DESIGN.md, "The data path").

Entry points: ``PackedLoader`` (``loader.py``) with its ``DataConfig`` (``config.py``); the sample
schema and shard writer for producers (``schema.py``, ``shard_writer.py``). ``synthetic_packs``
makes random packs with the real layout, for model tests that need no shards.
"""
