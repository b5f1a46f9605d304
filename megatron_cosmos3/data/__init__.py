"""Data: from samples to packed micro-batches."""
