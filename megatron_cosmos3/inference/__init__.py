"""Inference: the cached AR prefix and DM denoising."""
