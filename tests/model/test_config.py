import pytest
import torch

from megatron_cosmos3.encoders.video_vae import TOKEN_PATCH
from megatron_cosmos3.model.config import (
    VIDEO_PATCH_SIZE,
    EmbodimentConfig,
    MoTConfig,
    VisionConfig,
    scaled_mrope_section,
)
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.vision import VisionEncoder
from megatron_cosmos3.testing.training import TINY_VISION


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_attention_heads": 6, "num_kv_heads": 4}, "num_attention_heads=6 must be a multiple of num_kv_heads=4"),
        (
            {"head_dim": 16, "mrope_section": [4, 2, 1]},
            r"mrope_section=\[4, 2, 1\] must have 3 entries summing to head_dim/2=8",
        ),
        ({"hidden_size": 0}, "hidden_size must be a positive int, got 0"),
        (
            {"embodiments": {"arm": EmbodimentConfig(action_dim=0)}},
            "embodiments.arm.action_dim must be a positive int, got 0",
        ),
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
        ({"moe_ffn_hidden_size": -8}, "moe_ffn_hidden_size=-8 must be 0 or an int in 1..262,144"),
        # Sizes far beyond any real model (a crafted YAML or meta.json) are refused by name, not built.
        ({"num_layers": 10**9}, "num_layers=1000000000 is above 1,024, far beyond any real model"),
        ({"hidden_size": 2**20}, "hidden_size=1048576 is above 65,536"),
        ({"vocab_size": 10**12}, "vocab_size=1000000000000 is above 4,194,304"),
        ({"ffn_hidden_size": 10**9}, "ffn_hidden_size=1000000000 is above 262,144"),
        ({"num_experts": 10**6, "moe_top_k": 1}, "num_experts=1000000 must be 0 or an int in 1..4,096"),
        ({"embodiments": {"arm": EmbodimentConfig(action_dim=10**8)}}, "embodiments.arm.action_dim=100000000 is above"),
        ({"num_layers": True}, "num_layers must be a positive int, got True"),
        # Each size within its bound, together beyond any memory: the parameter count is refused.
        (
            {"num_layers": 1024, "hidden_size": 65_536, "ffn_hidden_size": 262_144},
            r"make at least 1.06e\+14 parameters, above 1e\+13",
        ),
        ({"rms_norm_eps": -1e-6}, r"rms_norm_eps=-1e-06 must be a finite number > 0"),
        ({"rope_theta": 0.0}, r"rope_theta=0.0 must be a finite number > 0"),
        # A model.yaml's .inf (load_model_config, the release folder's reader) put every action at one time.
        ({"embodiments": {"arm": EmbodimentConfig(rate_hz=float("inf"))}}, r"embodiments.arm.rate_hz must be a finite"),
    ],
)
def test_invalid_model_configs_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        MoTConfig(**changes)


def test_a_vit_beyond_any_real_model_is_refused_by_name():
    with pytest.raises(ValueError, match="model.vision.depth=1000000 is above 1,024"):
        VisionConfig(depth=10**6)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tie_word_embeddings": True, "num_kv_heads": 1},
        {"num_experts": 4, "moe_ffn_hidden_size": 48, "moe_towers": ["generator"]},
        {"vision": VisionConfig(**{**TINY_VISION, "hidden_size": 64, "intermediate_size": 128, "out_hidden_size": 64})},
    ],
)
def test_the_parameter_bound_never_exceeds_the_built_models_count(changes):
    config = MoTConfig(**changes)
    with torch.device("meta"):
        built = sum(p.numel() for p in MoTModel(config).parameters())
        if config.vision is not None:
            built += sum(p.numel() for p in VisionEncoder(config.vision).parameters())
    bound = config.parameter_count_lower_bound()
    assert bound <= built  # a lower bound: it refuses no model that fits
    if config.vision is None:  # and close: what it leaves out of the towers (norms, routers, DM-stream
        # projections) is small; a tiny ViT's patch embedding and mergers are not, a real one's are
        assert bound > 0.5 * built


def test_the_one_video_patch_size_is_the_one_the_data_path_makes():
    assert VIDEO_PATCH_SIZE == TOKEN_PATCH and MoTConfig().video_token_dim == MoTConfig().video_latent_channels * 4


@pytest.mark.parametrize("head_dim, split", [(16, [4, 2, 2]), (24, [6, 3, 3]), (40, [8, 6, 6]), (128, [24, 20, 20])])
def test_an_unset_mrope_section_is_qwen3_vl_split_scaled_to_the_head_dim(head_dim, split):
    config = MoTConfig(head_dim=head_dim)
    assert config.mrope_section == [] and config.rope_sections == scaled_mrope_section(head_dim) == split
    explicit = MoTModel(MoTConfig(head_dim=head_dim, mrope_section=split)).rotary
    assert torch.equal(MoTModel(config).rotary.frequency_axis, explicit.frequency_axis)
