"""Import: our Reasoner reproduces transformers' Qwen3-VL on text, text+image and text+video."""

import dataclasses

import pytest
import torch
from qwen3_vl_tiny import TINY_YAML, processor_like_inputs, random_qwen3_vl, tiny_hf_config

from megatron_cosmos3.conversion import load_qwen3_vl, reasoner_logits, understanding_batch
from megatron_cosmos3.model.config import load_model_config


@pytest.fixture(scope="module")
def converted(hf_folder):
    return load_qwen3_vl(hf_folder, config=load_model_config(TINY_YAML))


def test_imported_config_is_the_tiny_yaml(converted):
    model, vision = converted
    assert model.config == load_model_config(TINY_YAML)
    assert vision.config == model.config.vision


# Another shape: head_dim 24 != hidden/heads = 16, one KV head (MQA), tied embeddings, an odd vocabulary,
# and transformers' default rotary parameters: its mrope_section [24, 20, 20] cut to head_dim/2 = 12.
ODD_SHAPE = dict(vocab_size=331, num_key_value_heads=1, head_dim=24, rope_parameters=None)


@pytest.fixture(scope="module")
def odd_shape(tmp_path_factory):
    """(transformers' model, our import of it) at ODD_SHAPE."""
    hf = random_qwen3_vl(tiny_hf_config(tie_word_embeddings=True, **ODD_SHAPE), seed=1)
    folder = tmp_path_factory.mktemp("qwen3_vl_odd")
    hf.save_pretrained(str(folder))
    return hf, load_qwen3_vl(folder)


@pytest.mark.parametrize("shape", ["tiny", "odd"])
@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_reasoner_reproduces_transformers_logits(request, shape, kind):
    if shape == "tiny":
        hf_model, (model, vision) = request.getfixturevalue("hf_model"), request.getfixturevalue("converted")
    else:
        hf_model, (model, vision) = request.getfixturevalue("odd_shape")
        assert model.config.tie_word_embeddings and model.config.head_dim * 4 != model.config.hidden_size
        assert model.config.mrope_section == [4, 4, 4]  # h: 1, 4, 7, 10; w: 2, 5, 8, 11
    inputs = processor_like_inputs(kind)
    with torch.no_grad():
        want = hf_model(**inputs).logits
        got = reasoner_logits(model, vision, **inputs)
    real = inputs["attention_mask"].bool()
    assert want[real].abs().max() > 1.0  # the random model is far from trivial
    diff = (got[real] - want[real]).abs().max().item()
    assert diff <= 1e-4, f"{kind}: max abs logit difference {diff:.3g}"


@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_positions_equal_qwen3_vl_get_rope_index(hf_model, converted, kind):
    _, vision = converted
    inputs = processor_like_inputs(kind)
    batch = understanding_batch(vision, **inputs)
    mask = inputs["attention_mask"].bool()
    if kind == "text":  # Qwen3-VL uses plain 0..L-1 positions when there is no image or video
        want = torch.arange(mask.shape[1]).expand(3, *mask.shape)
    else:
        want, _ = hf_model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"),
            inputs["attention_mask"],
        )
    assert torch.equal(batch.ar_positions, want[:, mask].float())


def test_deepstack_features_reach_the_reasoner(converted):
    """DeepStack is really in play: dropping its features changes the logits of ViT and later rows."""
    model, vision = converted
    batch = understanding_batch(vision, **processor_like_inputs("video"))
    assert batch.ar_deepstack_embeds.shape == (2, batch.ar_vision_embeds.shape[0], model.config.hidden_size)
    with torch.no_grad():
        full = model.lm_logits(model.forward_ar(batch).hidden)
        without = model.lm_logits(model.forward_ar(dataclasses.replace(batch, ar_deepstack_embeds=None)).hidden)
    assert (full - without).abs().max() > 1e-2


def test_mismatched_placeholders_are_clear_errors(converted):
    _, vision = converted
    inputs = processor_like_inputs("image")
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:2]
    inputs["pixel_values"] = inputs["pixel_values"][: int(inputs["image_grid_thw"].prod(-1).sum())]
    with pytest.raises(ValueError, match="image placeholder tokens in input_ids but the ViT gave"):
        understanding_batch(vision, **inputs)


def test_import_streams_one_checkpoint_tensor_at_a_time(hf_folder, monkeypatch):
    """No checkpoint tensor is still alive when the next one is read: memory is the model plus one
    tensor, never a second copy of the model."""
    import weakref

    from megatron_cosmos3.conversion import safetensors_io

    alive, most = [], 0
    stream = safetensors_io.iter_tensors

    def watched(folder):
        nonlocal most
        for shard, key, tensor in stream(folder):
            alive[:] = [ref for ref in alive if ref() is not None]
            most = max(most, len(alive))
            alive.append(weakref.ref(tensor))
            yield shard, key, tensor
            del tensor

    monkeypatch.setattr(safetensors_io, "iter_tensors", watched)
    model, _ = load_qwen3_vl(hf_folder)
    assert most == 0
    assert all(p.device.type == "cpu" for p in model.parameters())
