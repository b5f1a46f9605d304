"""The Mixture-of-Transformers backbone and its trained ViT: plain PyTorch math, no process groups."""
