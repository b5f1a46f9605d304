"""The Mixture-of-Transformers backbone: plain PyTorch math, no process groups."""
