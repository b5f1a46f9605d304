"""Shared by the generation tests: a tiny model with one embodiment, the data path's builder for it
(byte tokenizer, pooled latents: no weights), and a request for every DM task with small random
inputs (64x32 pixels, 5 frames at 8 fps: 2 latent frames, 16 audio tokens, 7 actions)."""

from __future__ import annotations

import numpy as np

from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder
from megatron_cosmos3.data.sample_builder import SampleBuilder
from megatron_cosmos3.data.tokenizer import ByteTokenizer
from megatron_cosmos3.encoders.action_normalization import ActionStats, EmbodimentActionStats
from megatron_cosmos3.inference.requests import GenerationRequest, generation_builder, request_fields
from megatron_cosmos3.model.config import EmbodimentConfig, MoTConfig
from megatron_cosmos3.tasks.registry import TASK_REGISTRY
from megatron_cosmos3.testing.training import tiny_mot_config

GENERATION_TASKS = tuple(name for name, spec in TASK_REGISTRY.items() if spec.dm)
EMBODIMENT = "single_arm"


def generation_config(**changes) -> MoTConfig:
    """The tiny model with a byte vocabulary and one embodiment."""
    fields = dict(vocab_size=256, embodiments={EMBODIMENT: EmbodimentConfig(19, 10.0)})
    return tiny_mot_config(**{**fields, **changes})


def action_stats(seed: int = 0) -> ActionStats:
    """Statistics of random single-arm actions, so generated actions are un-normalised with them."""
    actions = np.random.default_rng(seed).normal(2.0, 3.0, size=(200, 19)).astype(np.float32)
    return ActionStats({EMBODIMENT: EmbodimentActionStats.from_actions(EMBODIMENT, actions)})


def generation_setup(config: MoTConfig, stats: ActionStats | None = None) -> SampleBuilder:
    """The data path's builder for ``config``: byte tokenizer, pooled latents, ``stats``."""
    encoder = PooledLatentEncoder(config.video_latent_channels, config.audio_latent_dim, 0, config.video_patch_size)
    return generation_builder(config, ByteTokenizer(config.vocab_size), encoder, stats)


def request_for(task: str, seed: int = 0, **changes) -> GenerationRequest:
    """A request of ``task`` with every input it reads (``requests.request_fields``), ``changes``
    applied first: a field the task does not read is left out (build a ``GenerationRequest`` to see
    one refused), and a first-frame task gets the video unless ``changes`` name the image."""
    rng = np.random.default_rng(100 + seed)
    inputs = dict(
        prompt=f"a red ball bounces ({task})",
        image=rng.integers(0, 256, (64, 32, 3), dtype=np.uint8),
        video=rng.integers(0, 256, (5, 64, 32, 3), dtype=np.uint8),
        fps=8.0,
        actions=rng.normal(size=(6, 19)).astype(np.float32),
        embodiment=EMBODIMENT,
        num_frames=5,
        resolution=(64, 32),
        seed=seed,
        steps=3,
        guidance=2.0,
    )
    spec = TASK_REGISTRY.get(task)
    reads = request_fields(spec) if spec is not None and spec.dm else {"task", *inputs, *changes}  # to be refused
    given = {**inputs, **changes}
    both = given["image"] is not None and given["video"] is not None
    if spec is not None and spec.dm and spec.vit != "required" and both and not {"image", "video"} <= set(changes):
        # One first frame: the picture ``changes`` names, else the video (both given is refused).
        reads = reads - ({"video"} if "image" in changes else {"image"})
    return GenerationRequest(task, **{k: v for k, v in given.items() if k in reads})
