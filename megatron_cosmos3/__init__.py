"""megatron_cosmos3: distributed training of a Cosmos-3-style omnimodal Mixture-of-Transformers."""

__version__ = "0.1.0"
