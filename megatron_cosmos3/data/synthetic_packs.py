"""Random packed batches with the real layout: for tests, benchmarks and the smoke-scale demo.

Each sample is described by a ``SampleSpec`` (what the task puts where); ``build_sample`` fills it
with random values and the real position rules, so a pack made here obeys every invariant a real
packer's pack must obey.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_cosmos3.model import positions as pos
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.packed_batch import IGNORE_INDEX, PackedBatch, PackedSample, action_stream_key
from megatron_cosmos3.tasks.registry import Modality, get_task


@dataclass
class DMSpanSpec:
    """One DM span: ``stream`` key, its token grid (t, h, w) — h = w = 1 for 1-D streams — its
    tokens per second, whether it is a noisy target, and the index of its first temporal token
    within the clip (so a clip split into clean and noisy spans keeps its times)."""

    stream: str
    grid: tuple[int, int, int]
    tokens_per_second: float
    noisy: bool
    first_temporal_index: int = 0

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclass
class SampleSpec:
    task: str
    text_tokens: int
    answer_tokens: int = 0  # the last answer_tokens of the text carry next-token labels
    vision_grid: tuple[int, int, int] | None = None
    add_eos_bog: bool = True  # only meaningful with DM spans
    dm_spans: list[DMSpanSpec] = field(default_factory=list)


def build_sample(spec: SampleSpec, config: MoTConfig, generator: torch.Generator, pixels: bool = False) -> PackedSample:
    """A PackedSample with random contents laid out as ``[text, ViT, EOS, BOG | cond, noisy]``.
    ``pixels``: the ViT rows come as random pictures for the model's own ViT (``config.vision``)
    instead of random embeddings."""
    eos_id, bog_id = config.vocab_size - 2, config.vocab_size - 1
    text = _learnable_text(spec.text_tokens, config.vocab_size - 2, generator)
    ids, position_parts, vision_flags = (
        [text],
        [pos.text_positions(0, spec.text_tokens)],
        [torch.zeros(spec.text_tokens, dtype=torch.bool)],
    )
    start = pos.next_start(position_parts[0])
    vision_embeds = vision_pixels = patch_grid = None
    if spec.vision_grid is not None:
        grid_positions = pos.vision_grid_positions(start, *spec.vision_grid)
        n_vision = grid_positions.shape[1]
        ids.append(torch.zeros(n_vision, dtype=torch.long))
        position_parts.append(grid_positions)
        vision_flags.append(torch.ones(n_vision, dtype=torch.bool))
        if pixels:  # raw uint8 values, as the loader packs them
            vit, (t, h, w) = config.vision, spec.vision_grid
            m = vit.spatial_merge_size
            patch_grid = torch.tensor([[t, h * m, w * m]])
            patch_dim = vit.in_channels * vit.temporal_patch_size * vit.patch_size**2
            vision_pixels = torch.randint(0, 256, (n_vision * m * m, patch_dim), generator=generator).to(torch.uint8)
        else:
            vision_embeds = torch.randn(n_vision, config.hidden_size, generator=generator)
        start = pos.next_start(grid_positions)
    if spec.dm_spans and spec.add_eos_bog:
        ids.append(torch.tensor([eos_id, bog_id]))
        position_parts.append(pos.text_positions(start, 2))
        vision_flags.append(torch.zeros(2, dtype=torch.bool))
    ar_ids = torch.cat(ids)
    ar_positions = torch.cat(position_parts, dim=1)
    labels = torch.full_like(ar_ids, IGNORE_INDEX)
    if spec.answer_tokens:
        first = spec.text_tokens - spec.answer_tokens
        labels[first : spec.text_tokens - 1] = text[first + 1 :]
    dm_offset = pos.next_start(ar_positions)

    streams, dm_positions, noise = [], [], []
    for span in sorted(spec.dm_spans, key=lambda s: s.noisy):  # clean conditioning first
        width = _stream_width(span.stream, config)
        streams.append((span.stream, _learnable_latents(span.num_tokens, width, generator)))
        dm_positions.append(
            pos.dm_span_positions(dm_offset, span.stream, span.grid, span.tokens_per_second, span.first_temporal_index)
        )
        noise.append(torch.full((span.num_tokens,), span.noisy))
    is_vision = torch.cat(vision_flags)
    return PackedSample(
        task=spec.task,
        ar_token_ids=ar_ids,
        ar_labels=labels,
        ar_positions=ar_positions,
        dm_streams=streams,
        dm_positions=torch.cat(dm_positions, dim=1) if dm_positions else None,
        dm_noise_mask=torch.cat(noise) if noise else None,
        ar_vision_embeds=vision_embeds,
        ar_is_vision=is_vision if bool(is_vision.any()) else None,
        vision_pixels=vision_pixels,
        vision_grid_thw=patch_grid,
    )


def _learnable_text(length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Arithmetic sequences mod ``vocab`` (random start, stride 1-3): random-looking, yet each
    token follows from the two before it, so the CE of a trained model can fall far below log(V)."""
    start = int(torch.randint(0, vocab, (1,), generator=generator))
    stride = int(torch.randint(1, 4, (1,), generator=generator))
    return (start + stride * torch.arange(length)) % vocab


def _learnable_latents(num_tokens: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random trajectories (a random sinusoid per channel plus 10% noise): DM tokens that
    a generator can learn to predict from the clean and noisy context around them."""
    time = torch.arange(num_tokens, dtype=torch.float32)[:, None]
    frequency = 0.1 + 0.4 * torch.rand(1, width, generator=generator)
    phase = 6.2832 * torch.rand(1, width, generator=generator)
    return torch.sin(frequency * time + phase) + 0.1 * torch.randn(num_tokens, width, generator=generator)


def _stream_width(stream: str, config: MoTConfig) -> int:
    if stream == "video":
        return config.video_token_dim
    if stream == "audio":
        return config.audio_latent_dim
    embodiment = stream.removeprefix("action/")
    if embodiment not in config.embodiments:
        raise ValueError(f"unknown DM stream {stream!r}")
    return config.embodiments[embodiment].action_dim


# The default mixture of random packs; every registry task can be drawn (SUPPORTED_TASKS).
TASKS = ("understanding", "text_to_video", "image_to_video", "video_to_audio", "forward_dynamics", "policy")
SUPPORTED_TASKS = (*TASKS, "text_to_image", "text_to_audio_video", "inverse_dynamics", "policy_with_future")


# The prompt tokens of a synthetic sample, times ``scale`` (an understanding question draws more):
# every sample holds at least PROMPT_TOKENS[0] * scale tokens (``fewest_sample_tokens``).
PROMPT_TOKENS = (2, 6)


def fewest_sample_tokens(scale: int) -> int:
    """A lower bound of the tokens of any ``random_sample_spec`` sample at ``scale``: its prompt."""
    return PROMPT_TOKENS[0] * scale


def random_sample_spec(task: str, config: MoTConfig, generator: torch.Generator, scale: int = 1) -> SampleSpec:
    """A random sample of ``task`` (one of SUPPORTED_TASKS); ``scale`` multiplies the section lengths."""

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low * scale, high * scale + 1, (1,), generator=generator))

    fps = float([16, 24, 30][int(torch.randint(0, 3, (1,), generator=generator))])
    video_tps = pos.video_tokens_per_second(fps)
    frames, h, w = draw(2, 4), draw(1, 2), draw(1, 3)
    action_key, action_rate = None, None
    if config.embodiments:  # drawn for every task, so a model's other tasks draw the same samples
        embodiment = sorted(config.embodiments)[
            int(torch.randint(0, len(config.embodiments), (1,), generator=generator))
        ]
        action_key, action_rate = action_stream_key(embodiment), config.embodiments[embodiment].rate_hz
    elif Modality.ACTIONS in get_task(task).requires:
        raise ValueError(f"synthetic task {task!r} needs an action stream, but the model has no embodiments")
    if task == "understanding":
        grid = (1, draw(1, 2), draw(1, 2)) if bool(torch.rand(1, generator=generator) < 0.5) else None
        text = draw(4, 12)
        return SampleSpec(task, text, answer_tokens=max(2, text // 2), vision_grid=grid)
    spec = SampleSpec(task, draw(*PROMPT_TOKENS))
    if task == "text_to_video":
        spec.dm_spans = [DMSpanSpec("video", (frames, h, w), video_tps, noisy=True)]
    elif task == "image_to_video":
        spec.dm_spans = [
            DMSpanSpec("video", (1, h, w), video_tps, noisy=False),
            DMSpanSpec("video", (frames - 1, h, w), video_tps, noisy=True, first_temporal_index=1),
        ]
    elif task in ("video_to_audio", "text_to_audio_video"):
        seconds = frames / video_tps
        spec.dm_spans = [
            DMSpanSpec("video", (frames, h, w), video_tps, noisy=task == "text_to_audio_video"),
            DMSpanSpec(
                "audio",
                (max(1, round(seconds * pos.AUDIO_TOKENS_PER_SECOND / 4)), 1, 1),
                pos.AUDIO_TOKENS_PER_SECOND / 4,
                noisy=True,
            ),
        ]
    elif task == "text_to_image":
        spec.dm_spans = [DMSpanSpec("video", (1, h, w), video_tps, noisy=True)]
    elif task == "inverse_dynamics":
        spec.dm_spans = [
            DMSpanSpec("video", (frames, h, w), video_tps, noisy=False),
            DMSpanSpec(action_key, (draw(2, 6), 1, 1), action_rate, noisy=True),
        ]
    elif task == "forward_dynamics":
        past = max(1, frames // 2)
        spec.dm_spans = [
            DMSpanSpec("video", (past, h, w), video_tps, noisy=False),
            DMSpanSpec(action_key, (draw(2, 4), 1, 1), action_rate, noisy=False),
            DMSpanSpec("video", (frames - past, h, w), video_tps, noisy=True, first_temporal_index=past),
        ]
    elif task in ("policy", "policy_with_future"):
        spec.vision_grid = (1, 1, draw(1, 2))
        spec.dm_spans = [
            DMSpanSpec("video", (1, h, w), video_tps, noisy=False),
            DMSpanSpec(action_key, (draw(2, 6), 1, 1), action_rate, noisy=True),
        ]
        if task == "policy_with_future":
            spec.dm_spans.append(DMSpanSpec("video", (frames - 1, h, w), video_tps, noisy=True, first_temporal_index=1))
    else:
        raise ValueError(f"unknown task {task!r}; known: {SUPPORTED_TASKS}")
    return spec


def random_pack(
    config: MoTConfig,
    generator: torch.Generator,
    num_samples: int = 4,
    tasks: tuple[str, ...] = TASKS,
    scale: int = 1,
    pixels: bool = False,
) -> PackedBatch:
    """A pack of ``num_samples`` random samples drawn uniformly from ``tasks`` (``pixels``: see
    ``build_sample``)."""
    specs = [
        random_sample_spec(
            tasks[int(torch.randint(0, len(tasks), (1,), generator=generator))], config, generator, scale
        )
        for _ in range(num_samples)
    ]
    return PackedBatch.from_samples([build_sample(spec, config, generator, pixels) for spec in specs])


def pack_from_lengths(
    config: MoTConfig, lengths: list[tuple[int, int]], generator: torch.Generator, clean_fraction: float = 0.25
) -> PackedBatch:
    """A pack whose sample i has exactly ``lengths[i] = (n_ar, n_dm)`` tokens (edge-case packs).

    The AR section is plain text with labels on every token; the DM section is one video-latent
    stream whose first ``clean_fraction`` of tokens are clean conditioning, the rest noisy.
    """
    samples = []
    for n_ar, n_dm in lengths:
        n_clean = int(n_dm * clean_fraction)
        spans = [
            DMSpanSpec("video", (n, 1, 1), 6.0, noisy=noisy, first_temporal_index=first)
            for n, noisy, first in ((n_clean, False, 0), (n_dm - n_clean, True, n_clean))
            if n
        ]
        spec = SampleSpec(
            "understanding" if not n_dm else "text_to_video",
            n_ar,
            answer_tokens=n_ar,
            add_eos_bog=False,
            dm_spans=spans,
        )
        samples.append(build_sample(spec, config, generator))
    return PackedBatch.from_samples(samples)
