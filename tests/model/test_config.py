import pytest
import torch

from megatron_cosmos3.encoders.video_vae import TOKEN_PATCH
from megatron_cosmos3.model.config import VIDEO_PATCH_SIZE, EmbodimentConfig, MoTConfig, scaled_mrope_section
from megatron_cosmos3.model.mot import MoTModel


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
        (
            {"head_dim": 24, "mrope_section": [4, 2, 2]},
            r"mrope_section=\[4, 2, 2\] must have 3 entries summing to head_dim/2=12",
        ),
        ({"attention_backend": "flash2"}, r"attention_backend='flash2' is not one of \('dense', 'sdpa'"),
        ({"video_patch_size": 0}, "video_patch_size must be a positive int, got 0"),
        ({"video_latent_channels": 0}, "video_latent_channels must be a positive int, got 0"),
        ({"head_dim": 16, "mrope_section": [5, -1, 4]}, r"mrope_section=\[5, -1, 4\] must not have a negative entry"),
        # w's frequencies 2, 5, 8 at head_dim/2 = 8: the third does not exist ([3, 3, 2] does fit).
        ({"head_dim": 16, "mrope_section": [2, 3, 3]}, r"mrope_section=\[2, 3, 3\]: the interleaved h/w frequencies"),
        ({"moe_ffn_hidden_size": -8}, "moe_ffn_hidden_size=-8 must be >= 0"),
        ({"rms_norm_eps": -1e-6}, r"rms_norm_eps=-1e-06 must be a finite number > 0"),
        ({"rope_theta": 0.0}, r"rope_theta=0.0 must be a finite number > 0"),
    ],
)
def test_invalid_model_configs_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        MoTConfig(**changes)


def test_the_one_video_patch_size_is_the_one_the_data_path_makes():
    assert VIDEO_PATCH_SIZE == TOKEN_PATCH and MoTConfig().video_token_dim == MoTConfig().video_latent_channels * 4


@pytest.mark.parametrize("head_dim, split", [(16, [4, 2, 2]), (24, [6, 3, 3]), (40, [8, 6, 6]), (128, [24, 20, 20])])
def test_an_unset_mrope_section_is_qwen3_vl_split_scaled_to_the_head_dim(head_dim, split):
    config = MoTConfig(head_dim=head_dim)
    assert config.mrope_section == [] and config.rope_sections == scaled_mrope_section(head_dim) == split
    explicit = MoTModel(MoTConfig(head_dim=head_dim, mrope_section=split)).rotary
    assert torch.equal(MoTModel(config).rotary.frequency_axis, explicit.frequency_axis)
