"""Inference: the cached AR prefix and DM denoising; text generation from the Reasoner with its KV cache."""
