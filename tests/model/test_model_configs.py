"""Nano / Super / tiny model configs: Qwen3-VL dimensions, instant meta-device build, parameter counts."""

from pathlib import Path

import pytest
import torch

from megatron_cosmos3.model.config import MoTConfig, VisionConfig, load_model_config
from megatron_cosmos3.model.summary import build_on_meta, count_parameters, main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"

# Values of the config.json of Qwen/Qwen3-VL-8B-Instruct and Qwen/Qwen3-VL-32B-Instruct, and the
# published sizes (8.77B and 33.4B parameters).
QWEN3_VL = {
    "nano": dict(hidden_size=4096, num_layers=36, num_attention_heads=32, ffn_hidden_size=12288, size=8.77e9),
    "super": dict(hidden_size=5120, num_layers=64, num_attention_heads=64, ffn_hidden_size=25600, size=33.4e9),
}


@pytest.mark.parametrize("name", ["nano", "super"])
def test_config_has_qwen3_vl_dimensions_and_sizes(name):
    expected = dict(QWEN3_VL[name])
    size = expected.pop("size")
    config = load_model_config(CONFIGS / f"{name}.yaml")
    for key, value in expected.items():
        assert getattr(config, key) == value, key
    assert (
        config.vocab_size,
        config.num_kv_heads,
        config.head_dim,
        config.rope_theta,
        config.mrope_section,
        config.tie_word_embeddings,
    ) == (151936, 8, 128, 5e6, [24, 20, 20], False)
    assert config.vision.depth == 27 and config.vision.deepstack_visual_indexes == [8, 16, 24]

    model, vision = build_on_meta(config)
    # Nothing allocated: every tensor is a meta tensor (how long the build takes is a benchmark's business).
    tensors = [*model.parameters(), *model.buffers(), *vision.parameters(), *vision.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    counts = count_parameters(model, vision)
    assert counts.reasoner == counts.generator
    assert counts.qwen3_vl_equivalent == pytest.approx(size, rel=2e-3)
    assert counts.total == counts.qwen3_vl_equivalent + counts.generator + counts.dm_streams


@pytest.mark.parametrize("name", ["nano", "super", "tiny"])
def test_qwen3_vl_equivalent_is_exactly_the_transformers_model(name):
    from transformers import Qwen3VLForConditionalGeneration

    from megatron_cosmos3.conversion.hf_qwen3_vl import hf_config_from_mot

    config = load_model_config(CONFIGS / f"{name}.yaml")
    with torch.device("meta"):
        reference = Qwen3VLForConditionalGeneration(hf_config_from_mot(config, torch.bfloat16))
    ours = count_parameters(*build_on_meta(config)).qwen3_vl_equivalent
    assert ours == sum(p.numel() for p in reference.parameters())


def test_summary_prints_counts_per_tower(capsys):
    counts = main([str(CONFIGS / "nano.yaml")])
    printed = capsys.readouterr().out
    for row in ("built on the meta device", "vision", "reasoner tower", "generator tower", "total"):
        assert row in printed
    assert f"{counts.total:,}" in printed


def test_model_config_files_merge_into_the_training_config():
    from megatron_cosmos3.training.config import load_config

    train = load_config(str(CONFIGS / "tiny.yaml"), ["steps=1"])
    assert train.model == load_model_config(CONFIGS / "tiny.yaml")
    assert isinstance(train.model.vision, VisionConfig)


@pytest.mark.parametrize(
    "vision, message",
    [
        (dict(out_hidden_size=32), "vision.out_hidden_size=32 must equal hidden_size=64"),
        (dict(image_token_id=400), r"vision.image_token_id=400 is outside the vocabulary \(vocab_size=320\)"),
    ],
)
def test_vision_config_must_fit_the_backbone(vision, message):
    base = load_model_config(CONFIGS / "tiny.yaml")
    fields = {**vars(base.vision), **vision}
    with pytest.raises(ValueError, match=message):
        MoTConfig(**{**vars(base), "vision": VisionConfig(**fields)})


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(deepstack_visual_indexes=[0, 3]),
            r"deepstack_visual_indexes=\[0, 3\] must be distinct ViT blocks in \[0, depth=3\)",
        ),
        (dict(num_position_embeddings=60), "num_position_embeddings=60 must be a square number"),
        # One id for images and videos: an image prompt's placeholders were all counted as video ones.
        (
            dict(deepstack_visual_indexes=[0], video_token_id=151655),
            r"model.vision.image_token_id/video_token_id/vision_start_token_id/vision_end_token_id="
            r"\[151655, 151655, 151652, 151653\] must be distinct ids",
        ),
        (
            dict(deepstack_visual_indexes=[0], vision_end_token_id=151652),
            r"model.vision.image_token_id/.*=\[151655, 151656, 151652, 151652\] must be distinct ids",
        ),
    ],
)
def test_invalid_vision_configs_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        VisionConfig(depth=3, **changes)


def test_a_model_yaml_holding_a_scalar_is_an_error_naming_the_file(tmp_path):
    """OmegaConf raised OSError('Invalid loaded object type: int'), which the loader let through as a
    missing file's error: no file named."""
    (tmp_path / "model.yaml").write_text("5\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'model.yaml'}: Invalid loaded object type: int"):
        load_model_config(tmp_path / "model.yaml")
    # A missing file: named with the setting and what the path is (it was FileNotFoundError's text).
    with pytest.raises(ValueError, match=r"^model config='.*none.yaml': missing \(no such file\)$"):
        load_model_config(tmp_path / "none.yaml")
