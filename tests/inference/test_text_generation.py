"""Text generation from the Reasoner: the KV cache, ragged batches, EOS, sampling and bad arguments."""

import numpy as np
import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.data.tokenizer import ByteTokenizer
from megatron_cosmos3.inference import text_generation
from megatron_cosmos3.inference.text_generation import (
    TextPrompt,
    TextSampling,
    choose_tokens,
    generate_text,
    prompt_batch,
)
from megatron_cosmos3.model.config import VisionConfig
from megatron_cosmos3.model.kv_cache import ReasonerCache
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.packed_batch import IGNORE_INDEX, PackedBatch
from megatron_cosmos3.testing.training import TINY_VISION, tiny_mot_config

NEW_TOKENS = 10


def tiny_model(backend: str = "sdpa", vision: bool = False, **changes) -> MoTModel:
    """The tiny MoT with large enough weights that its next-token choices are far from uniform."""
    torch.manual_seed(0)
    config = tiny_mot_config(attention_backend=backend, init_std=0.3, **changes)
    if vision:
        config.vision = VisionConfig(**TINY_VISION)
    model = MoTModel(config)
    if vision:
        model.add_vision_encoder()
    return model.eval()


def picture(seed: int, height: int = 64, width: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


PROMPTS = [
    TextPrompt([5, 9, 3]),
    TextPrompt([7, 1, 2, 8, 4, 4, 6, 11, 13], picture(1)),
    TextPrompt([21, 22, 23, 24, 25]),
    TextPrompt([30], picture(2, 32, 64)),
]


def with_tokens(batch: PackedBatch, new: list[list[int]]) -> PackedBatch:
    """``batch`` with ``new[s]`` appended to sample s's AR section, at the positions Qwen3-VL gives
    text after a prompt: its largest position + 1, + 1 per token, on all three axes."""
    ids, positions, vision, lengths = [], [], [], []
    for s, tokens in enumerate(new):
        rows = slice(int(batch.ar_cu_seqlens[s]), int(batch.ar_cu_seqlens[s + 1]))
        start = batch.ar_positions[:, rows].max() + 1
        ids += [batch.ar_token_ids[rows], torch.tensor(tokens, dtype=torch.long)]
        positions += [batch.ar_positions[:, rows], (start + torch.arange(len(tokens))).expand(3, -1)]
        flags = batch.ar_is_vision[rows] if batch.ar_is_vision is not None else torch.zeros(rows.stop - rows.start)
        vision += [flags.bool(), torch.zeros(len(tokens), dtype=torch.bool)]
        lengths.append(rows.stop - rows.start + len(tokens))
    ids = torch.cat(ids)
    return batch.replace(
        ar_token_ids=ids,
        ar_labels=torch.full_like(ids, IGNORE_INDEX),
        ar_positions=torch.cat(positions, dim=1),
        ar_is_vision=torch.cat(vision) if batch.ar_is_vision is not None else None,
        ar_cu_seqlens=torch.tensor([0] + lengths).cumsum(0),
        dm_cu_seqlens=torch.zeros(len(new) + 1, dtype=torch.long),
    )


def uncached(model: MoTModel, batch: PackedBatch, sampling: TextSampling, seeds: list[int]) -> list[list[int]]:
    """The reference: each step runs the whole pack of prompts + tokens so far through the model
    (``forward``, no cache) and chooses each sample's token from the logits after its last token
    (sampling: one uniform per step from the sample's own seeded generator)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    new = [[] for _ in range(batch.num_samples)]
    for _ in range(sampling.max_new_tokens):
        grown = with_tokens(batch, new)
        grown.validate()
        with torch.no_grad():
            hidden = model(grown).ar_hidden
        logits = model.lm_logits(hidden[grown.ar_cu_seqlens[1:] - 1])
        uniforms = None if sampling.greedy else torch.stack([torch.rand((), generator=g) for g in generators])
        for tokens, token in zip(new, choose_tokens(logits, sampling, uniforms).tolist()):
            tokens.append(token)
    return new


@pytest.mark.parametrize(
    "backend, vision, changes",
    [("dense", False, {}), ("sdpa", False, {}), ("sdpa", True, {}), ("sdpa", False, dict(num_experts=4))],
    ids=["dense", "sdpa", "own-vit", "moe"],
)
def test_cached_generation_equals_the_uncached_full_forward(backend, vision, changes):
    """Prefill once + one token per step against the cache gives, step for step, what running the
    whole growing sequence through the model gives; with the weight-free picture tokens, the
    model's own ViT (DeepStack included), or mixture-of-experts towers."""
    model = tiny_model(backend, vision, **changes)
    batch = prompt_batch(model.config, PROMPTS)
    assert (batch.vision_pixels is not None) == vision
    seeds = [3, 1, 4, 1]
    samplings = [TextSampling(NEW_TOKENS), TextSampling(NEW_TOKENS, temperature=0.8, top_p=0.9)]
    for sampling in samplings[:1] if vision else samplings:  # the ViT's own pass is the slow part
        got = generate_text(model, batch, sampling, eos_ids=(), seeds=seeds)
        want = uncached(model, batch, sampling, seeds)
        assert [g.token_ids for g in got] == want
        assert all(len(set(tokens)) >= 3 for tokens in want)  # a real sequence, not one token repeated


def test_the_cache_grows_as_tokens_come(monkeypatch):
    """The cache starts with little room and doubles when full: the tokens equal the uncached
    reference's when it grows every few steps, and a crafted max_new_tokens=10**12 allocates nothing
    up front (every token an EOS: one step each)."""
    model = tiny_model("dense")
    batch = prompt_batch(model.config, PROMPTS)
    monkeypatch.setattr(text_generation, "_FIRST_ROOM", 1)
    sampling = TextSampling(NEW_TOKENS)
    got = generate_text(model, batch, sampling, eos_ids=(), seeds=[0] * len(PROMPTS))
    assert [g.token_ids for g in got] == uncached(model, batch, sampling, [0] * len(PROMPTS))
    monkeypatch.undo()
    most = TextSampling(text_generation.MAX_NEW_TOKENS)
    huge = generate_text(model, PROMPTS, most, eos_ids=range(model.config.vocab_size))
    assert all(len(g.token_ids) == 1 and g.stopped_at_eos for g in huge)


def test_generation_never_runs_the_generator():
    """The Reasoner alone generates text: no Generator tower module runs, in prefill or decoding."""
    model = tiny_model()
    calls = []
    for layer in model.layers:
        for module in layer.generator.modules():
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    generate_text(model, PROMPTS, TextSampling(NEW_TOKENS), eos_ids=())
    assert calls == []


def test_decode_step_logits_equal_the_full_forward():
    """Tighter than the tokens: the cached step's logits equal the full forward's at the last row."""
    model = tiny_model("sdpa")
    batch = prompt_batch(model.config, PROMPTS)
    grown = with_tokens(batch, [[3, 4]] * len(PROMPTS))
    cu = batch.ar_cu_seqlens.tolist()
    starts = torch.stack([batch.ar_positions[:, a:b].max() + 1 for a, b in zip(cu, cu[1:])])
    with torch.no_grad():
        prefill = model.forward_ar(batch)
        cache = ReasonerCache.from_prefill(prefill.keys_values, prefill.layout, capacity=20)
        for k, token in enumerate((3, 4)):
            hidden = model.decode_ar(torch.full((len(PROMPTS),), token), (starts + k).expand(3, -1), cache)
        full = model(grown).ar_hidden[grown.ar_cu_seqlens[1:] - 1]
    torch.testing.assert_close(model.lm_logits(hidden), model.lm_logits(full), rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == (batch.ar_cu_seqlens.diff() + 2).tolist()


def test_ragged_batch_gives_each_prompt_its_own_tokens():
    """Prompts of different lengths (with and without pictures) batched give exactly the tokens
    each gives alone: greedy, and sampled with the same per-prompt seed."""
    model = tiny_model()
    seeds = [11, 12, 13, 14]
    for sampling in (TextSampling(NEW_TOKENS), TextSampling(NEW_TOKENS, temperature=1.0, top_p=0.9)):
        together = generate_text(model, PROMPTS, sampling, eos_ids=(), seeds=seeds)
        alone = [generate_text(model, [p], sampling, eos_ids=(), seeds=[s])[0] for p, s in zip(PROMPTS, seeds)]
        assert [g.token_ids for g in together] == [g.token_ids for g in alone]
        assert len({tuple(g.token_ids) for g in together}) == len(PROMPTS)


def test_eos_stops_a_sample_while_the_others_continue():
    model = tiny_model()
    free = [g.token_ids for g in generate_text(model, PROMPTS, TextSampling(NEW_TOKENS), eos_ids=())]
    eos = next(t for t in free[0][1:] if all(t not in tokens for tokens in free[1:]))
    got = generate_text(model, PROMPTS, TextSampling(NEW_TOKENS), eos_ids=[eos, 63])
    first = free[0].index(eos) + 1
    assert got[0].token_ids == free[0][:first] and got[0].stopped_at_eos
    for g, tokens in zip(got[1:], free[1:]):
        stop = next((i + 1 for i, t in enumerate(tokens) if t == 63), len(tokens))
        assert g.token_ids == tokens[:stop] and g.stopped_at_eos == (stop < len(tokens) or tokens[-1] == 63)
    assert any(not g.stopped_at_eos and len(g.token_ids) == NEW_TOKENS for g in got)


def test_text_is_decoded_without_the_eos():
    model = tiny_model(vocab_size=256)
    tokenizer = ByteTokenizer(vocab_size=256)
    prompt = [TextPrompt(tokenizer.encode("a cat"))]
    free = generate_text(model, prompt, TextSampling(NEW_TOKENS), eos_ids=())[0]
    tokenizer.eos_id = free.token_ids[4]  # so that it stops early: the text is what comes before
    got = generate_text(model, prompt, TextSampling(NEW_TOKENS), tokenizer=tokenizer)[0]
    stop = free.token_ids.index(tokenizer.eos_id) + 1
    assert got.token_ids == free.token_ids[:stop] and got.stopped_at_eos
    assert got.text == bytes(free.token_ids[: stop - 1]).decode("utf-8", errors="replace")
    assert ByteTokenizer(256).decode(list("héllo".encode()) + [254]) == "héllo\ufffd"


def test_sampling_is_seeded_and_top_p_to_zero_is_greedy():
    model = tiny_model()
    sampled = TextSampling(NEW_TOKENS, temperature=1.0)
    first = generate_text(model, PROMPTS, sampled, eos_ids=(), seeds=5)
    again = generate_text(model, PROMPTS, sampled, eos_ids=(), seeds=5)
    other = generate_text(model, PROMPTS, sampled, eos_ids=(), seeds=50)
    greedy = generate_text(model, PROMPTS, TextSampling(NEW_TOKENS), eos_ids=())
    narrow = generate_text(model, PROMPTS, TextSampling(NEW_TOKENS, temperature=2.0, top_p=1e-6), eos_ids=())
    tokens = lambda results: [g.token_ids for g in results]  # noqa: E731
    assert tokens(first) == tokens(again)
    assert tokens(first) != tokens(other) and tokens(first) != tokens(greedy)
    assert tokens(narrow) == tokens(greedy)


def test_first_token_follows_the_tempered_nucleus_distribution():
    """Over many seeds, the first token's frequencies match softmax(logits / T) restricted to the
    top-p nucleus and renormalised (5 sigma per token); tokens outside the nucleus never come."""
    model = tiny_model()
    temperature, top_p, draws = 1.5, 0.6, 2500
    prompt = TextPrompt([5, 9, 3])
    with torch.no_grad():
        batch = prompt_batch(model.config, [prompt])
        logits = model.lm_logits(model.forward_ar(batch).hidden[-1]).double()
    p = torch.softmax(logits / temperature, dim=-1)
    order = p.argsort(descending=True)
    inside = int((p[order].cumsum(0) < top_p).sum()) + 1  # the smallest top set reaching top_p
    want = torch.zeros_like(p)
    want[order[:inside]] = p[order[:inside]] / p[order[:inside]].sum()
    assert inside >= 4 and p[order[inside:]].sum() > 0.25  # the nucleus really cuts something
    sampling = TextSampling(max_new_tokens=1, temperature=temperature, top_p=top_p)
    got = generate_text(model, [prompt] * draws, sampling, eos_ids=(), seeds=0)
    counts = torch.bincount(torch.tensor([g.token_ids[0] for g in got]), minlength=p.numel()).double()
    frequency = counts / draws
    assert counts[order[inside:]].sum() == 0
    sigma = (want * (1 - want) / draws).sqrt()
    assert ((frequency - want).abs() <= 5 * sigma + 1e-3).all(), (frequency[order[:inside]], want[order[:inside]])
    # Control: the tempered distribution without the nucleus cut is clearly not what was drawn.
    assert (frequency - p).abs().sum() / 2 > 0.2 > (frequency - want).abs().sum() / 2 * 5


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(sampling=dict(max_new_tokens=0)), r"TextSampling.max_new_tokens must be an integer in \[1, 32768\]"),
        (dict(sampling=dict(max_new_tokens=10**12)), r"max_new_tokens must be an integer in \[1, 32768\] .*got 10+$"),
        (dict(sampling=dict(max_new_tokens=True)), r"TextSampling.max_new_tokens must be an integer .*got True"),
        (dict(sampling=dict(temperature=-0.5)), r"TextSampling.temperature must be a finite number >= 0, got -0.5"),
        # 1e-40 overflowed logits / temperature to inf (NaN probabilities); 1e308 drew uniform noise.
        (dict(sampling=dict(temperature=1e-40)), r"temperature must be 0 \(greedy\) or in \[0.001, 100\] .*got 1e-40"),
        (dict(sampling=dict(temperature=1e308)), r"must be 0 \(greedy\) or in \[0.001, 100\] .*got 1e\+308"),
        (dict(sampling=dict(top_p=0.0)), r"TextSampling.top_p must lie in \(0, 1\], got 0.0"),
        (dict(sampling=dict(top_p=1.5)), r"TextSampling.top_p must lie in \(0, 1\], got 1.5"),
        (dict(seeds=[1, 2]), r"seeds has 2 entries for 4 prompts"),
        (dict(eos_ids=None), r"eos_ids is None and no tokenizer gives one"),
        (dict(eos_ids=[64]), r"eos_ids must be token ids in \[0, 64\), got \[64\]"),
        (
            dict(prompts=[TextPrompt([1, 99])]),
            r"prompts\[0\].token_ids must lie in \[0, vocab_size=64\), got ids from 1 to 99",
        ),
        (dict(prompts=[TextPrompt([1]), TextPrompt([])]), r"prompts\[1\] has no tokens"),
        (dict(prompts=[]), r"prompts is empty"),
    ],
)
def test_bad_arguments_are_clear_errors(change, message):
    model = tiny_model()
    arguments = dict(prompts=PROMPTS, eos_ids=(), seeds=0)
    sampling = change.pop("sampling", None)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        generate_text(model, sampling=TextSampling(**sampling) if sampling else TextSampling(), **arguments)


def test_prompts_with_dm_tokens_and_overfull_caches_are_refused(generator):
    model = tiny_model()
    pack = random_pack(model.config, generator, num_samples=2, tasks=("text_to_video",))
    with pytest.raises(ValueError, match=r"prompts are AR-only, but the pack holds \d+ DM tokens"):
        generate_text(model, pack, eos_ids=())
    batch = prompt_batch(model.config, PROMPTS[:2])
    with torch.no_grad():
        prefill = model.forward_ar(batch)
        with pytest.raises(ValueError, match=r"capacity=2 is below the longest prompt \(15\)"):
            ReasonerCache.from_prefill(prefill.keys_values, prefill.layout, capacity=2)
        cache = ReasonerCache.from_prefill(prefill.keys_values, prefill.layout, capacity=15)
        with pytest.raises(ValueError, match=r"a sequence of the cache is full \(capacity=15\)"):
            model.decode_ar(torch.tensor([1, 2]), torch.zeros(3, 2), cache)
        with pytest.raises(ValueError, match=r"token_ids \(3,\) and positions \(3, 2\) do not match"):
            model.decode_ar(torch.tensor([1, 2, 3]), torch.zeros(3, 2), cache)


@pytest.mark.parametrize("sampling", [TextSampling(NEW_TOKENS), TextSampling(NEW_TOKENS, temperature=1.0)])
def test_logits_holding_nan_are_an_error_naming_the_prompt_not_a_token(sampling):
    """Greedy, argmax of NaN logits chose a token as if it meant one (written as the answer);
    sampled, torch's multinomial raised a RuntimeError naming nothing."""
    model = tiny_model()
    assert len(generate_text(model, PROMPTS, sampling, eos_ids=())) == len(PROMPTS)  # control: finite weights
    with torch.no_grad():
        model.embed_tokens.weight[7].fill_(float("nan"))  # the first token of prompt 1 only
    with pytest.raises(ValueError, match=r"generate_text: prompt 1's logits for new token 0 hold NaN or Inf"):
        generate_text(model, PROMPTS, sampling, eos_ids=())
