"""Text generation of a converted Qwen3-VL equals transformers' greedy ``generate``, token for token."""

import pytest
import torch
from qwen3_vl_tiny import TINY_YAML, processor_like_inputs

from megatron_cosmos3.conversion import load_qwen3_vl, understanding_batch
from megatron_cosmos3.inference.text_generation import TextSampling, generate_text
from megatron_cosmos3.model.config import load_model_config

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def converted(hf_folder):
    return load_qwen3_vl(hf_folder, config=load_model_config(TINY_YAML))


def hf_greedy(hf_model, inputs, **options) -> torch.Tensor:
    """transformers' greedy generation: (B, NEW_TOKENS) new tokens (pad_token_id after an EOS)."""
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **options)
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_greedy_generation_equals_transformers(hf_model, converted, kind):
    """Text-only prompts, left-padded prompts with images (several grids per prompt), and videos
    with an image: the KV cache, DeepStack and MRoPE positions after the pictures all agree."""
    model, vision = converted
    inputs = processor_like_inputs(kind)
    want = hf_greedy(hf_model, inputs)
    batch = understanding_batch(vision, **inputs)
    got = generate_text(model, batch, TextSampling(max_new_tokens=NEW_TOKENS), eos_ids=())
    assert [g.token_ids for g in got] == want.tolist()
    assert not any(g.stopped_at_eos for g in got)
    assert all(len(set(g.token_ids)) >= 3 for g in got)  # not one token repeated
    if kind != "text":
        # Positions after a picture continue at its largest + 1, not at the token count: the two
        # rules differ here, so the agreement above tells them apart.
        for s in range(batch.num_samples):
            rows = slice(int(batch.ar_cu_seqlens[s]), int(batch.ar_cu_seqlens[s + 1]))
            assert batch.ar_positions[:, rows].max() + 1 < rows.stop - rows.start


def test_eos_stops_one_sample_as_transformers_does(hf_model, converted):
    """An EOS id that one prompt generates early ends that prompt (EOS included) while the other
    runs on, exactly as transformers stops it (which pads the finished row)."""
    model, vision = converted
    inputs = processor_like_inputs("image")
    free = hf_greedy(hf_model, inputs).tolist()
    eos = next(t for t in free[0][1:6] if t not in free[1])  # early in row 0, never in row 1
    pad = next(t for t in range(300) if t not in free[0] + free[1])
    want = hf_greedy(hf_model, inputs, eos_token_id=eos, pad_token_id=pad).tolist()
    got = generate_text(model, understanding_batch(vision, **inputs), TextSampling(NEW_TOKENS), eos_ids=[eos])
    first = free[0].index(eos) + 1
    assert got[0].token_ids == want[0][:first] == free[0][:first] and got[0].stopped_at_eos
    assert set(want[0][first:]) == {pad}
    assert got[1].token_ids == want[1] == free[1] and not got[1].stopped_at_eos


def test_the_picture_reaches_the_generated_text(converted):
    """Control: other pixels under the same prompt tokens give other text."""
    model, vision = converted
    inputs = processor_like_inputs("image")
    sampling = TextSampling(max_new_tokens=NEW_TOKENS)
    same = generate_text(model, understanding_batch(vision, **inputs), sampling, eos_ids=())
    inputs["pixel_values"] = inputs["pixel_values"].flip(0)
    other = generate_text(model, understanding_batch(vision, **inputs), sampling, eos_ids=())
    assert all(a.token_ids != b.token_ids for a, b in zip(same, other))
