"""Generation in every DM mode: requests in, latents of the encoders' own types out, ready for
``inference/media_outputs.py`` (docs/DESIGN.md, "Generation").

``generate`` prepares each request through the training data path (``inference/requests.py``),
packs requests that share a solver, step count and shift into one pack where they fit (the data
path's ``Packer``), denoises each pack (``inference/denoising.py``: the AR section once, guidance
per sample) and cuts every sample's streams out of the pack. Under a ``ParallelPlan`` the same
calls run on every rank of a split model: tensor parallelism keeps the AR cache; a model split by
layers or rows takes each step's velocities from the plan's driver (``ParallelPlan.velocity``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from megatron_cosmos3.data.packer import Packer
from megatron_cosmos3.data.sample_builder import SampleBuilder
from megatron_cosmos3.encoders.action_normalization import ActionStats, denormalize_actions
from megatron_cosmos3.encoders.audio_vae import HOP, SAMPLE_RATE, AudioLatents
from megatron_cosmos3.encoders.video_vae import VideoLatents, encoded_frame_count
from megatron_cosmos3.inference.denoising import full_forward_velocity, sample_dm_tokens, sample_rows
from megatron_cosmos3.inference.media_outputs import GeneratedSample, GenerationRecord
from megatron_cosmos3.inference.requests import (
    DEFAULT_FPS,
    GenerationRequest,
    PreparedRequest,
    delivered_streams,
    prepare_request,
    request_fields,
)
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.packed_batch import PackedBatch
from megatron_cosmos3.model.positions import video_fps_from_times
from megatron_cosmos3.parallel.plan import ParallelPlan
from megatron_cosmos3.tasks.registry import get_task


@dataclass
class GenerationResult:
    """One request's result: ``sample`` holds what ``media_outputs.write_generated_sample`` writes —
    ``video``: ``VideoLatents`` of the whole clip (conditioning frames included, so it plays from its
    first frame) with its fps, or of a generated image (one latent frame, fps None); ``audio``:
    ``AudioLatents`` (``num_samples`` at 48 kHz: the clip's duration); ``actions``: (steps, dim)
    float32 of ``embodiment`` at ``action_rate_hz``, un-normalised with the run's action statistics
    where training normalised them. Only the streams the task generates are set, and the clip a
    generated sound belongs to (video->audio: the conditioning clip, to play with its new sound).
    """

    request: GenerationRequest
    sample: GeneratedSample

    def record(
        self, checkpoint: str, checkpoint_step: int | None = None, conditioning: dict[str, str] | None = None
    ) -> GenerationRecord:
        """The sidecar record of how the sample was made (``conditioning``: role -> input file)."""
        r = self.request
        reads = request_fields(get_task(r.task))  # an image records no frame rate, a clip no embodiment
        made_with = {"shift": r.shift, "fps": r.frame_rate, "embodiment": r.embodiment}  # fps: given or default
        settings = {key: value for key, value in made_with.items() if key in reads}
        if r.duration_s is not None or r.num_frames is not None:
            settings.update(duration_s=r.duration_s, num_frames=r.num_frames)
        return GenerationRecord(
            task=r.task,
            prompt=r.prompt,
            seed=r.seed,
            solver=r.solver,
            steps=r.steps,
            guidance=r.guidance,
            checkpoint=checkpoint,
            checkpoint_step=checkpoint_step,
            conditioning=dict(conditioning or {}),
            settings=settings,
        )


@dataclass
class SampleStreams:
    """What one packed sample generates and how its rows become media (``generated_sample``).

    outputs: per registry stream delivered ("image", "video", "audio", "actions":
    ``requests.delivered_streams``), the model's stream key. video_grid: (T, h, w) latent grid of
    the whole clip (conditioning frames included); fps: its frame rate (an image has none).
    audio_num_samples: the audio's length at 48 kHz.
    embodiment / action_rate_hz: whose actions, sampled how often.
    """

    outputs: dict[str, str]
    video_grid: tuple[int, int, int] | None = None
    fps: float | None = None
    audio_num_samples: int | None = None
    embodiment: str | None = None
    action_rate_hz: float | None = None


def generated_sample(
    streams: SampleStreams,
    batch: PackedBatch,
    tokens: dict[str, torch.Tensor],
    index: int,
    action_stats: ActionStats | None = None,
) -> GeneratedSample:
    """Sample ``index`` of ``batch``, its DM streams at ``tokens`` (``sample_dm_tokens``' output), as
    the encoders' types: every row of each output stream (clean conditioning frames included, so a
    clip plays from its first frame); actions un-normalised with ``action_stats`` where they hold the
    embodiment's."""
    sample = GeneratedSample()
    for name, key in streams.outputs.items():
        rows = tokens[key][sample_rows(batch, key) == index].float().cpu()
        if name in ("video", "image"):
            sample.video = VideoLatents(rows, streams.video_grid, streams.fps if name == "video" else None)
        elif name == "audio":
            sample.audio = AudioLatents(rows, streams.audio_num_samples)
        else:
            if action_stats is not None and streams.embodiment in action_stats.embodiments:
                rows = denormalize_actions(rows, action_stats[streams.embodiment])
            sample.actions, sample.embodiment = rows, streams.embodiment
            sample.action_rate_hz = streams.action_rate_hz
    return sample


def packed_sample_streams(batch: PackedBatch, index: int, config: MoTConfig) -> SampleStreams:
    """The ``SampleStreams`` of sample ``index`` of a pack made by the data path (a training or
    held-out pack), read from the pack itself: the streams its task delivers
    (``requests.delivered_streams``), the video grid from its rows' (t, h, w) positions and the
    frame rate from their temporal step (one latent frame every 4 frames, TPS_BASE units per second:
    docs/DESIGN.md, "The packed batch"), the audio's length from its clip (frames / fps at 48 kHz, as
    training cut it; its tokens, one per ``HOP`` samples, hold up to 40 ms more, which played past
    the last frame: 37 ms, two frames at 60 fps) or, without one, from its tokens, the embodiment
    from its action stream and that embodiment's rate from ``config``."""
    task = get_task(batch.task_names[int(batch.sample_task[index])])
    delivered = delivered_streams(task)
    first, last = int(batch.dm_cu_seqlens[index]), int(batch.dm_cu_seqlens[index + 1])
    streams = SampleStreams({})
    clip_s = None  # the video's length (s), where it has a frame rate
    for key, rows in batch.dm_token_index.items():
        rows = rows.cpu()
        rows = rows[(rows >= first) & (rows < last)]
        if not rows.numel():
            continue
        positions = batch.dm_positions[:, rows].cpu()
        if key == "video":
            h, w = positions[1].unique().numel(), positions[2].unique().numel()
            times = positions[0].unique()
            streams.video_grid = (rows.numel() // (h * w), h, w)
            fps = video_fps_from_times(times)
            if fps is not None:
                clip_s = encoded_frame_count(streams.video_grid[0]) / fps
            if "video" in delivered:
                streams.outputs["video"] = key
                streams.fps = DEFAULT_FPS if fps is None else fps
            elif "image" in delivered:
                streams.outputs["image"] = key
        elif key == "audio":
            streams.audio_num_samples = rows.numel() * HOP
            if "audio" in delivered:
                streams.outputs["audio"] = key
        else:
            streams.embodiment = key.removeprefix("action/")
            streams.action_rate_hz = config.embodiments[streams.embodiment].rate_hz
            if "actions" in delivered:
                streams.outputs["actions"] = key
    if streams.audio_num_samples is not None and clip_s is not None:
        streams.audio_num_samples = min(streams.audio_num_samples, round(clip_s * SAMPLE_RATE))
    return streams


def _check_trained(request: GenerationRequest, trained_tasks: Collection[str] | None) -> None:
    if trained_tasks is not None and request.task not in trained_tasks:
        raise ValueError(f"task {request.task!r}: the model was not trained for it (trained: {sorted(trained_tasks)})")


def _check_heads(prepared: PreparedRequest, model: MoTModel) -> None:
    request = prepared.request
    uses_actions = any(role.stream == "actions" for role in prepared.task.dm)
    if uses_actions and request.embodiment not in model.config.embodiments:
        raise ValueError(
            f"task {request.task!r}: the model has no action head for embodiment {request.embodiment!r} "
            f"(it has {sorted(model.config.embodiments)})"
        )


def _packs(prepared: list[PreparedRequest], tokens_per_pack: int | None) -> list[list[int]]:
    """Request indices per pack: one sampler setting per pack, as many as fit ``tokens_per_pack``."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prepared):
        groups.setdefault((p.request.solver, p.request.steps, p.request.shift), []).append(i)
    packs = []
    for members in groups.values():
        sizes = [prepared[i].conditional.num_tokens for i in members]
        budget = max(tokens_per_pack or sum(sizes), max(sizes))  # a request longer than a pack gets its own
        packer: Packer[int] = Packer(budget, pool_size=len(members))
        for i, size in zip(members, sizes):
            packer.add(i, size)
        while packer.has_pack(final=True):
            packs.append([entry.item for entry in packer.pop_pack()])
    return packs


def _result(prepared: PreparedRequest, batch: PackedBatch, tokens: dict, index: int, builder: SampleBuilder):
    """Sample ``index`` of the pack's generated streams, as the encoders' types."""
    request = prepared.request
    embodiment = request.embodiment if "actions" in prepared.outputs else None
    streams = SampleStreams(
        prepared.outputs,
        prepared.video_grid,
        request.frame_rate,
        prepared.audio_num_samples,
        embodiment,
        builder.config.embodiments[embodiment].rate_hz if embodiment is not None else None,
    )
    return GenerationResult(request, generated_sample(streams, batch, tokens, index, builder.action_stats))


@torch.no_grad()
def generate(
    model: MoTModel,
    requests: Sequence[GenerationRequest],
    builder: SampleBuilder,
    *,
    plan: ParallelPlan | None = None,
    cached: bool = True,
    tokens_per_pack: int | None = None,
    trained_tasks: Collection[str] | None = None,
) -> list[GenerationResult]:
    """Generates every request (in order); see the module doc.

    builder: the run's ``SampleBuilder`` (``requests.generation_builder``). plan: the layout of a
    model split over ranks (collective: every rank of the model calls with the same requests).
    cached: False runs a whole forward pass per step (the reference and the latency bench).
    tokens_per_pack: AR + DM tokens per pack (an integer >= 1); None = every request of one sampler
    setting in one.
    trained_tasks: the tasks the checkpoint trained (its stage mixture); others are refused.
    ValueError naming the task and the problem for a request that cannot be generated.
    """
    if tokens_per_pack is not None and (
        isinstance(tokens_per_pack, bool) or not isinstance(tokens_per_pack, int) or tokens_per_pack < 1
    ):
        raise ValueError(f"tokens_per_pack={tokens_per_pack!r} must be None or an integer >= 1")
    for request in requests:
        _check_trained(request, trained_tasks)
    prepared = [prepare_request(request, builder) for request in requests]
    for p in prepared:
        _check_heads(p, model)
    owner = plan.state_owner if plan is not None and plan.model is not None else model
    device = next(p.device for p in owner.parameters() if not p.is_meta)  # a pipeline rank holds its chunks
    results: list[GenerationResult | None] = [None] * len(prepared)
    was_training = model.training
    model.eval()
    try:
        for members in _packs(prepared, tokens_per_pack):
            chosen = [prepared[i] for i in members]
            batch = PackedBatch.from_samples([p.conditional.sample for p in chosen]).to(device)
            guidance = [p.request.guidance for p in chosen]
            unconditional = None
            if any(g != 1.0 for g in guidance):
                unconditional = PackedBatch.from_samples([p.unconditional.sample for p in chosen]).to(device)
            velocity_of = None
            if plan is not None:
                velocity_of = plan.velocity({k: torch.zeros_like(v) for k, v in batch.dm_tokens.items()})
            if velocity_of is None and not cached:
                velocity_of = full_forward_velocity(model)
            seeds = [p.request.seed for p in chosen]
            tokens = sample_dm_tokens(
                model, batch, chosen[0].request.sampler, seeds, velocity_of, unconditional, guidance
            )
            for index, (i, p) in enumerate(zip(members, chosen)):
                results[i] = _result(p, batch, tokens, index, builder)
    finally:
        model.train(was_training)
    return results
