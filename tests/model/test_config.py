import pytest

from megatron_cosmos3.model.config import EmbodimentConfig, MoTConfig


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_attention_heads": 6, "num_kv_heads": 4}, "num_attention_heads=6 must be a multiple of num_kv_heads=4"),
        (
            {"head_dim": 16, "mrope_section": [4, 2, 1]},
            r"mrope_section=\[4, 2, 1\] must have 3 entries summing to head_dim/2=8",
        ),
        ({"hidden_size": 0}, "hidden_size must be a positive int, got 0"),
        ({"embodiments": {"arm": EmbodimentConfig(action_dim=0)}}, "embodiments.arm.action_dim must be > 0"),
        ({"attention_backend": "flash2"}, r"attention_backend='flash2' is not one of \('dense', 'sdpa'"),
        ({"rms_norm_eps": -1e-6}, r"rms_norm_eps=-1e-06 must be a finite number > 0"),
        ({"rope_theta": 0.0}, r"rope_theta=0.0 must be a finite number > 0"),
    ],
)
def test_invalid_model_configs_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        MoTConfig(**changes)
