"""Sharded, reshardable checkpoints (``checkpointer``, ``sharded_state``, ``safe_reader``) and the
weights folders written by ``conversion`` (``weights_folder``); format in docs/DESIGN.md, "Checkpoints".
"""
