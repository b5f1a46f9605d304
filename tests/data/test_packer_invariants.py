"""Every packed micro-batch obeys the layout and mask invariants, for any mix of samples and
tasks (property-based): [text, ViT, EOS, BOG | clean, noisy] per sample, EOS/BOG exactly where
they belong, labels only on answers, clean conditioning before noisy targets with timestep 0,
the FPS rule on DM positions, the token budget, and no sample split across packs or lost."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from world_helpers import AUDIO_LATENT_DIM, VIDEO_LATENT_CHANNELS, model_config

from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.packer import Packer
from megatron_cosmos3.data.sample_builder import BuildLimits, SampleBuilder, picture_of
from megatron_cosmos3.data.schema import Sample
from megatron_cosmos3.data.tokenizer import ByteTokenizer
from megatron_cosmos3.data.vision_features import PatchVisionFeatures
from megatron_cosmos3.model.config import TPS_BASE
from megatron_cosmos3.model.packed_batch import IGNORE_INDEX, PackedBatch
from megatron_cosmos3.tasks.mixture import TaskMixture
from megatron_cosmos3.tasks.registry import TASK_REGISTRY

CONFIG = model_config()
TOKENIZER = ByteTokenizer(CONFIG.vocab_size)
VISION = PatchVisionFeatures(CONFIG.hidden_size)
VIDEO_DIM = VIDEO_LATENT_CHANNELS * 4


def _builder(max_sample_tokens: int, max_text_tokens: int = 64) -> SampleBuilder:
    return SampleBuilder(CONFIG, TOKENIZER, VISION, BuildLimits(max_sample_tokens, max_text_tokens))


@st.composite
def samples(draw, index: int = 0) -> Sample:
    """A random sample in latent form: any subset of text, image, video, audio, actions, picture."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    text = st.text(min_size=0, max_size=40)
    sample = Sample(key=f"k{index}", caption=draw(st.none() | text), instruction=draw(st.none() | text))
    if draw(st.booleans()):
        sample.question, sample.answer = draw(text), draw(text)
    if draw(st.booleans()):
        grid = (draw(st.integers(1, 8)), draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        sample.video_latents = rng.normal(size=(math.prod(grid), VIDEO_DIM)).astype(np.float32)
        sample.video_latent_grid, sample.fps = grid, float(draw(st.sampled_from([16, 24, 30])))
    if draw(st.booleans()):
        grid = (1, draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        sample.image_latents = rng.normal(size=(math.prod(grid), VIDEO_DIM)).astype(np.float32)
        sample.image_latent_grid = grid
    if draw(st.booleans()):
        count = draw(st.integers(1, 60))
        sample.audio_latents = rng.normal(size=(count, AUDIO_LATENT_DIM)).astype(np.float32)
        sample.audio_num_samples = count * 1920
    if draw(st.booleans()):
        sample.embodiment = draw(st.sampled_from(sorted(CONFIG.embodiments)))
        width = CONFIG.embodiments[sample.embodiment].action_dim
        sample.actions = rng.normal(size=(draw(st.integers(1, 40)), width)).astype(np.float32)
        sample.action_rate_hz = float(draw(st.sampled_from([5, 10, 30])))
    if draw(st.booleans()):
        side = draw(st.sampled_from([32, 64]))
        sample.observation = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    return sample


@st.composite
def mixes(draw):
    """A task mixture, packing limits, and a list of samples with their task draws."""
    names = draw(st.lists(st.sampled_from(sorted(TASK_REGISTRY)), min_size=1, max_size=len(TASK_REGISTRY), unique=True))
    mixture = TaskMixture({name: draw(st.floats(0.1, 5.0)) for name in names})
    tokens_per_pack = draw(st.integers(96, 1024))
    limits = (tokens_per_pack, draw(st.integers(1, 12)), draw(st.sampled_from([0, 1, 3, 8])))
    items = [(draw(samples(i)), draw(st.floats(0, 0.999))) for i in range(draw(st.integers(1, 14)))]
    return mixture, limits, items


def _check_sample(batch: PackedBatch, i: int, has_dm: bool, answer: bool) -> None:
    a0, a1 = int(batch.ar_cu_seqlens[i]), int(batch.ar_cu_seqlens[i + 1])
    d0, d1 = int(batch.dm_cu_seqlens[i]), int(batch.dm_cu_seqlens[i + 1])
    ids, labels = batch.ar_token_ids[a0:a1], batch.ar_labels[a0:a1]
    eos, bog = TOKENIZER.eos_id, TOKENIZER.bog_id
    # EOS/BOG: exactly one EOS; BOG exactly when a DM section follows; both at the very end.
    assert int((ids == eos).sum()) == 1 and int((ids == bog).sum()) == int(has_dm)
    assert ids[-2:].tolist() == [eos, bog] if has_dm else ids[-1] == eos
    assert (d1 > d0) == has_dm
    # ViT tokens form one block before EOS.
    if batch.ar_is_vision is not None:
        vision = batch.ar_is_vision[a0:a1].nonzero().flatten()
        if vision.numel():
            assert vision.tolist() == list(range(int(vision[0]), int(vision[-1]) + 1))
            assert vision[-1] < (ids == eos).nonzero()[0, 0]
    # Labels: only understanding trains the Reasoner, on the answer and its EOS; the EOS itself predicts nothing.
    trained = labels != IGNORE_INDEX
    assert labels[-1] == IGNORE_INDEX
    if answer:
        assert labels[(ids == eos).nonzero()[0, 0] - 1] == eos
        assert torch.equal(labels[trained], ids[1:][trained[:-1]])
    else:
        assert not trained.any()
    if not has_dm:
        return
    # Clean conditioning first, noisy targets after, all at timestep 0 until noise is added.
    noisy = batch.dm_noise_mask[d0:d1]
    assert noisy.any() and not noisy[: int(noisy.int().argmax())].any() and noisy[int(noisy.int().argmax()) :].all()
    assert not batch.dm_timesteps[d0:d1].any()
    # The DM section starts after the AR section, every stream at the same offset.
    offset = float(batch.ar_positions[:, a0:a1].max()) + 1
    assert float(batch.dm_positions[0, d0:d1].min()) == offset


def _check_fps_rule(packed, source: Sample) -> None:
    """Every DM row of a stream sits at offset + 6 x (an integer step) / (its tokens per second)."""
    offset = float(packed.ar_positions.max()) + 1
    rates = {"video": source.fps / 4 if source.fps else TPS_BASE, "audio": 25.0}
    row = 0
    for key, values in packed.dm_streams:
        n = values.shape[0]
        t = packed.dm_positions[0, row : row + n].double()
        rate = rates.get(key, source.action_rate_hz)
        if key == "video" and source.video_latents is None:  # an image: one instant, time 0
            rate = None
        steps = (t - offset) * (rate or 1.0) / TPS_BASE
        assert torch.allclose(steps, steps.round(), atol=1e-4) and (steps >= 0).all()
        if rate is None:
            assert (steps == 0).all()
        row += n


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mixes())
def test_packs_of_random_sample_mixes_keep_every_invariant(mix):
    mixture, (tokens_per_pack, pool_size, max_samples), items = mix
    builder = _builder(tokens_per_pack)
    built = []
    for sample, u in items:
        task = mixture.choose(sample.modalities, sample.latent_frames, u, has_picture=picture_of(sample) is not None)
        if task is None:
            continue
        try:
            built.append((task, builder.build(sample, task), sample))
        except SampleError as error:
            assert error.reason == "too_long"
    packer = Packer(tokens_per_pack, pool_size, max_samples)
    for i, (_, b, _) in enumerate(built):
        assert b.num_tokens <= tokens_per_pack and b.num_tokens == b.sample.num_ar_tokens + b.sample.num_dm_tokens
        packer.add(i, b.num_tokens)
    seen = []
    while packer.has_pack(final=True):
        entries = packer.pop_pack()
        order = [e.item for e in entries]
        assert order == sorted(order), "a pack keeps arrival order"
        assert sum(e.num_tokens for e in entries) <= tokens_per_pack
        assert not max_samples or len(entries) <= max_samples
        batch = PackedBatch.from_samples([built[i][1].sample for i in order])  # validates the layout
        for slot, i in enumerate(order):
            task, b, source = built[i]
            _check_sample(batch, slot, bool(task.dm), task.answer)
            _check_fps_rule(b.sample, source)
            assert int(batch.ar_cu_seqlens[slot + 1] - batch.ar_cu_seqlens[slot]) == built[i][1].sample.num_ar_tokens
            assert int(batch.dm_cu_seqlens[slot + 1] - batch.dm_cu_seqlens[slot]) == built[i][1].sample.num_dm_tokens
        seen += order
    assert sorted(seen) == list(range(len(built))), "every sample lands in exactly one pack, whole"


def test_the_oldest_waiting_sample_always_goes_next():
    packer = Packer(tokens_per_pack=100, pool_size=4)
    for i, size in enumerate([90, 60, 50, 40, 30, 20, 10, 95]):
        packer.add(i, size)
    first = [e.item for e in packer.pop_pack()]
    assert first == [0, 6]  # the oldest, then the largest that still fits
    assert [e.item for e in packer.pop_pack()] == [1, 3]
    with pytest.raises(ValueError, match="cannot go into packs"):
        packer.add(99, 101)


def _long_clip() -> Sample:
    rng = np.random.default_rng(0)
    return Sample(
        key="long",
        caption="a long clip",
        video_latents=rng.normal(size=(40 * 4, VIDEO_DIM)).astype(np.float32),
        video_latent_grid=(40, 2, 2),
        fps=24.0,
        audio_latents=rng.normal(size=(167, AUDIO_LATENT_DIM)).astype(np.float32),
        audio_num_samples=167 * 1920,
        actions=rng.normal(size=(66, 19)).astype(np.float32),
        embodiment="single_arm",
        action_rate_hz=10.0,
    )


@pytest.mark.parametrize("task", ["text_to_audio_video", "forward_dynamics", "image_to_video"])
def test_over_long_samples_are_cropped_in_time_with_streams_in_sync(task):
    built = _builder(max_sample_tokens=120).build(_long_clip(), TASK_REGISTRY[task])
    assert built.cropped and built.num_tokens <= 120
    steps = {}
    for key, values in built.sample.dm_streams:
        steps[key] = steps.get(key, 0) + (values.shape[0] // 4 if key == "video" else values.shape[0])
    rates = {"video": 6.0, "audio": 25.0, "action/single_arm": 10.0}
    # One instant D cuts every stream: each keeps the steps that start before D.
    low = max((n - 1) / rates[k] for k, n in steps.items())
    high = min(n / rates[k] for k, n in steps.items())
    assert low < high


def test_a_sample_that_cannot_fit_even_cropped_is_too_long():
    with pytest.raises(SampleError, match="too_long"):
        _builder(max_sample_tokens=10).build(_long_clip(), TASK_REGISTRY["video_to_audio"])


def test_understanding_trains_on_the_answer_and_its_eos_only():
    sample = Sample(key="qa", question="q?", answer="ab", observation=np.zeros((32, 64, 3), np.uint8))
    built = _builder(256).build(sample, TASK_REGISTRY["understanding"]).sample
    eos = TOKENIZER.eos_id
    # [q ? | 2 ViT tokens | a b EOS]
    assert built.ar_token_ids.tolist() == [ord("q"), ord("?"), 0, 0, ord("a"), ord("b"), eos]
    assert built.ar_labels.tolist() == [IGNORE_INDEX] * 3 + [ord("a"), ord("b"), eos, IGNORE_INDEX]
    assert built.ar_is_vision.tolist() == [False, False, True, True, False, False, False]
    # Qwen3-VL positions: text 0, 1; the 1x2 grid starts at 2 on every axis; text resumes at 2 + max(h, w).
    assert built.ar_positions[:, 2:4].tolist() == [[2, 2], [2, 2], [2, 3]]
    assert built.ar_positions[0, 4:].tolist() == [4, 5, 6]


def test_fps_rule_one_second_is_six_units_in_every_stream():
    """Forward dynamics at 30 fps: the future frames keep their clip times; actions and audio align."""
    clip = _long_clip()
    clip.fps = 30.0  # 7.5 latent frames per second
    built = _builder(4096).build(clip, TASK_REGISTRY["forward_dynamics"]).sample
    offset = float(built.ar_positions.max()) + 1
    (past_key, past), (act_key, actions), (future_key, future) = built.dm_streams
    t = built.dm_positions[0] - offset
    n_past = past.shape[0]
    assert torch.allclose(t[:n_past:4], torch.arange(n_past // 4) * (6 / 7.5))  # one latent frame = 0.8 units
    # 40 latent frames are 157 frames, 5.233 s at 30 fps: the 10 Hz actions that start in them.
    assert actions.shape[0] == 53
    assert torch.allclose(t[n_past : n_past + 53], torch.arange(53) * 0.6)  # 10 Hz actions
    assert torch.allclose(t[n_past + 53 :: 4][:1], torch.tensor([n_past // 4 * 0.8]))  # the future continues


@pytest.mark.parametrize(
    ("fps", "action_rate_hz", "frames"),
    [(10, 5, 24), (12.5, 7.5, 31), (15, 20, 36), (25, 50, 12), (29.97, 7, 75), (60, 15, 128), (16, 10, 20)],
)
@pytest.mark.parametrize("task", ["text_to_audio_video", "inverse_dynamics", "forward_dynamics"])
@pytest.mark.parametrize("crop", [False, True])
def test_audio_and_actions_cover_the_seconds_of_the_encoded_frames(fps, action_rate_hz, frames, task, crop):
    """A clip of ``frames`` frames is encoded as its first 1 + 4k (up to 3 cropped): its audio
    tokens (25/s) and action steps keep those that start while the encoded frames show, at any
    frame and action rate, and each sits at 6 units per second; so do those of a sample cropped
    in time to fit one token fewer (the latent frames it keeps show for 1 + 4(t - 1) frames)."""
    rng = np.random.default_rng(0)
    latent_frames = (frames - 1) // 4 + 1
    seconds = Fraction(frames) / Fraction(str(fps))  # the whole clip, which audio and actions span
    audio_samples = math.ceil(seconds * 48000)
    clip = Sample(
        key="clip",
        caption="a clip",
        instruction="act",
        video_latents=rng.normal(size=(latent_frames, VIDEO_DIM)).astype(np.float32),
        video_latent_grid=(latent_frames, 1, 1),
        fps=float(fps),
        audio_latents=rng.normal(size=(math.ceil(Fraction(audio_samples, 1920)), AUDIO_LATENT_DIM)).astype(np.float32),
        audio_num_samples=audio_samples,
        actions=rng.normal(size=(math.ceil(seconds * Fraction(str(action_rate_hz))), 19)).astype(np.float32),
        embodiment="single_arm",
        action_rate_hz=float(action_rate_hz),
    )
    built = _builder(4096).build(clip, TASK_REGISTRY[task])
    if crop:
        built = _builder(built.num_tokens - 1).build(clip, TASK_REGISTRY[task])
        assert built.cropped
    built = built.sample
    kept = sum(values.shape[0] for key, values in built.dm_streams if key == "video")  # grid (t, 1, 1)
    assert kept == latent_frames or crop
    shown = Fraction(1 + 4 * (kept - 1)) / Fraction(str(fps))  # how long the encoded frames show
    want = {"audio": math.ceil(shown * 25), "action/single_arm": math.ceil(shown * Fraction(str(action_rate_hz)))}
    rates = {"audio": 25.0, "action/single_arm": float(action_rate_hz)}
    offset = float(built.ar_positions.max()) + 1
    row = 0
    for key, values in built.dm_streams:
        if key in want:
            # A crop cuts every stream at one instant D in the last kept frame's showing (its
            # start, 4(t - 1) / fps, to its end): no step past that frame, none lost before it.
            fewest = math.ceil((shown - 1 / Fraction(str(fps))) * Fraction(str(rates[key]))) if crop else want[key]
            assert fewest <= values.shape[0] <= want[key], key
            times = (built.dm_positions[0, row : row + values.shape[0]] - offset) / TPS_BASE
            assert torch.allclose(times, torch.arange(values.shape[0]) / rates[key], atol=1e-5)
            assert float(times[-1]) < shown  # the last step starts while a frame shows
        row += values.shape[0]
    assert row == built.dm_positions.shape[1]
