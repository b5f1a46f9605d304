import pytest

from megatron_cosmos3.encoders.video_vae import TOKEN_PATCH
from megatron_cosmos3.model.config import VIDEO_PATCH_SIZE, EmbodimentConfig, MoTConfig


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
        ({"video_patch_size": 1}, r"video_patch_size=1: video tokens are 2x2 patches of VAE latents"),
        ({"video_latent_channels": 0}, "video_latent_channels must be a positive int, got 0"),
        ({"head_dim": 16, "mrope_section": [5, -1, 4]}, r"mrope_section=\[5, -1, 4\] must not have a negative entry"),
        ({"moe_ffn_hidden_size": -8}, "moe_ffn_hidden_size=-8 must be >= 0"),
    ],
)
def test_invalid_model_configs_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        MoTConfig(**changes)


def test_the_one_video_patch_size_is_the_one_the_data_path_makes():
    assert VIDEO_PATCH_SIZE == TOKEN_PATCH and MoTConfig().video_token_dim == MoTConfig().video_latent_channels * 4
