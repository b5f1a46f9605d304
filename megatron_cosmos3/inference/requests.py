"""Generation requests -> the packed samples the sampler denoises (docs/DESIGN.md, "Generation").

A ``GenerationRequest`` names a task of ``tasks/registry.py`` and gives what its layout conditions
on. ``prepare_request`` turns it into a ``data.schema.Sample`` — conditioning streams encoded by the
run's latent encoder, every noisy span a placeholder of zeros of the right shape — and builds it
with the training data path's own ``SampleBuilder``, twice: with the prompt, and with it dropped
(the unconditional pass of classifier-free guidance, laid out as training dropped it). Nothing here
branches on task names: which inputs are needed and which spans are placeholders is read from the
task's ``DMRole`` spans.

Clip length: the target's video latent frames T come from ``num_frames`` (1 + 4k pixel frames), else
``duration_s`` (the nearest 1 + 4k frames at ``fps``; one shorter than a frame is refused), else the
given video (its length when it is the whole conditioning, twice it when it is the past of a
forward-dynamics clip). The clip lasts
D = frames / fps; audio gets ceil(25 D) tokens (round(48000 D) samples) and actions ceil(rate D)
steps at their embodiment's rate (``tasks.layout.steps_before``: the steps that start while the
frames show), as training cuts a clip's audio and actions to its encoded frames.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from megatron_cosmos3.data.clips import check_clip_bytes
from megatron_cosmos3.data.determinism import seed_problem
from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.latent_encoders import LatentEncoder, encodable_pixels
from megatron_cosmos3.data.sample_builder import BuildLimits, BuiltSample, SampleBuilder
from megatron_cosmos3.data.schema import DURATION_RANGE_S, FPS_RANGE, Sample, float_rows, rate_value
from megatron_cosmos3.data.tokenizer import Tokenizer
from megatron_cosmos3.data.vision_features import vision_featurizer
from megatron_cosmos3.encoders.action_normalization import ActionStats
from megatron_cosmos3.encoders.audio_vae import SAMPLE_RATE, num_audio_tokens
from megatron_cosmos3.encoders.video_vae import (
    VAE_TEMPORAL_FACTOR,
    encoded_frame_count,
    num_latent_frames,
    pixels_per_token,
)
from megatron_cosmos3.inference.solvers import MAX_STEPS, SOLVERS, SamplerConfig
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.packed_batch import action_stream_key
from megatron_cosmos3.tasks.layout import exact, past_frames, steps_before
from megatron_cosmos3.tasks.registry import TaskSpec, get_task

DEFAULT_FPS = 24.0
# The largest classifier-free guidance scale: v_u + g (v_c - v_u) leaves the data's range long before
# it (samples saturate at tens); past it a typo's scale only amplifies noise toward Inf.
MAX_GUIDANCE = 100.0
# Latent frames a clean video span takes of a clip of T latent frames.
_CONDITIONING_FRAMES = {"all": lambda t: t, "first_frame": lambda t: 1, "past": past_frames}
# The clip length (latent frames) a given video of c latent frames implies, where it can.
_LENGTH_FROM_CONDITIONING = {"all": lambda c: c, "past": lambda c: 2 * c}


@dataclass
class GenerationRequest:
    """One sample to generate.

    task: a task of ``tasks/registry.py`` with DM targets. prompt: the caption / instruction.
    image: (H, W, 3) uint8 — the first frame a clip continues, and the observation a policy sees.
    video: (T, H, W, 3) uint8 at ``fps`` — the conditioning clip (all of it, or its past).
    fps: a number, or a fraction (``Fraction(30000, 1001)``, "30000/1001") kept as its float; None
        (unset) is ``DEFAULT_FPS`` (``frame_rate``), so an fps given equal to it still counts as given.
    audio / audio_sample_rate: (channels, samples) float32 at that rate — conditioning audio.
    actions: (N, dim) float32 pseudo-actions of ``embodiment``, un-normalised — conditioning actions.
    embodiment: whose actions are conditioned on or generated.
    duration_s / num_frames / fps: the length of the clip (module doc); num_frames wins.
    resolution: (height, width) in pixels, multiples of one video token (``16 * model.video_patch_size``:
        32 at 2); default: that of the given picture, cut to whole tokens.
    seed, steps, solver, guidance, shift: the sampler (``SamplerConfig``; classifier-free guidance
        scale, 1 = conditional only).
    """

    task: str
    prompt: str = ""
    image: np.ndarray | None = None
    video: np.ndarray | None = None
    fps: float | None = None
    audio: np.ndarray | None = None
    audio_sample_rate: int | None = None
    actions: np.ndarray | None = None
    embodiment: str | None = None
    duration_s: float | None = None
    num_frames: int | None = None
    resolution: tuple[int, int] | None = None
    seed: int = 0
    steps: int = 8
    solver: str = "euler"
    guidance: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        # A rate given as a fraction (30000/1001, "24000/1001") is its float: exact() reads it back.
        if isinstance(self.fps, (Fraction, str)) and rate_value(self.fps) is not None:
            self.fps = rate_value(self.fps)

    @property
    def frame_rate(self) -> float:
        """The clip's frame rate: ``fps``, else ``DEFAULT_FPS`` where the request gives none."""
        return DEFAULT_FPS if self.fps is None else self.fps

    @property
    def sampler(self) -> SamplerConfig:
        return sampler_settings(self.solver, self.steps, self.shift, self.guidance)


def sampler_settings(solver: Any, steps: Any, shift: Any, guidance: Any) -> SamplerConfig:
    """The ``SamplerConfig`` of a request's sampler settings, each checked under the request's own
    field names: ``steps`` an integer in [1, ``solvers.MAX_STEPS``], ``guidance`` a number in [0,
    ``MAX_GUIDANCE``] (0: unconditional, 1: conditional only), ``shift`` finite > 0, ``solver`` one
    of ``solvers.SOLVERS``; ValueError naming the field and value. The one check of generation
    requests, the eval suite's config and exported request files (docs/DESIGN.md, "Generation")."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} must be one of {list(SOLVERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps={steps!r} must be an integer in [1, {MAX_STEPS}] (solvers.MAX_STEPS)")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= MAX_GUIDANCE:
        raise ValueError(
            f"guidance={guidance!r} must be a finite number in [0, {MAX_GUIDANCE:g}] (requests.MAX_GUIDANCE; "
            "1 = conditional only)"
        )
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < math.inf:
        raise ValueError(f"shift={shift!r} must be a finite number > 0 (1 = uniform steps)")
    return SamplerConfig(solver, steps, shift)


@dataclass
class PreparedRequest:
    """A request built as the training data path builds a sample.

    conditional / unconditional: the sample with its prompt and with the prompt dropped.
    outputs: per registry stream with noisy rows ("image", "video", "audio", "actions"), the
        model's stream key; also "video" where only the audio is generated (the clip it sounds in).
    video_grid: (T, h, w) of the whole clip; audio_num_samples at 48 kHz.
    """

    request: GenerationRequest
    task: TaskSpec
    conditional: BuiltSample
    unconditional: BuiltSample
    outputs: dict[str, str]
    video_grid: tuple[int, int, int] | None
    audio_num_samples: int | None


def generation_builder(
    model_config: MoTConfig,
    tokenizer: Tokenizer,
    latent_encoder: LatentEncoder | None = None,
    action_stats: ActionStats | None = None,
    max_text_tokens: int = 256,
) -> SampleBuilder:
    """The training path's ``SampleBuilder`` for generation: the same tokenizer, ViT input, latent
    encoder and action statistics as the run, and no crop (a request is generated whole); prompts
    cut at ``max_text_tokens`` (an integer >= 1, ValueError naming it otherwise)."""
    if isinstance(max_text_tokens, bool) or not isinstance(max_text_tokens, int) or max_text_tokens < 1:
        raise ValueError(f"max_text_tokens={max_text_tokens!r} must be an integer >= 1")
    limits = BuildLimits(max_sample_tokens=sys.maxsize, max_text_tokens=max_text_tokens)
    return SampleBuilder(model_config, tokenizer, vision_featurizer(model_config), limits, latent_encoder, action_stats)


def required_inputs(task: TaskSpec) -> list[str]:
    """What a request of ``task`` must give besides its prompt, read from its spans as
    ``prepare_request`` reads them, e.g. ["image (first frame)", "embodiment", "duration"]."""
    clean = {role.stream: role.part for role in task.dm if not role.noisy}
    streams = {role.stream for role in task.dm}
    needs = []
    if clean.get("video") == "first_frame":
        needs.append("image (first frame" + (", the observation)" if task.vit == "required" else ")"))
    elif "video" in clean:
        needs.append(f"video ({clean['video']} frames)")
    elif task.vit == "required":
        needs.append("image (the observation)")
    needs += [stream for stream in ("audio", "actions") if stream in clean]
    if "actions" in streams:
        needs.append("embodiment")
    if "video" in streams and clean.get("video") not in _LENGTH_FROM_CONDITIONING:
        needs.append("duration")
    if streams & {"image", "video"} and "video" not in clean:
        needs.append("resolution")
    return needs


# What every request of a task with DM targets reads: its prompt and the sampler.
_ALWAYS_READ = ("task", "prompt", "seed", "steps", "solver", "guidance", "shift")


def request_fields(task: TaskSpec) -> frozenset[str]:
    """The ``GenerationRequest`` fields a request of ``task`` reads, from its spans as
    ``prepare_request`` reads them: the prompt and sampler; the image where the first frame or the
    observation is given (a video may give the first frame too); the video where its frames are
    clean; audio (with its rate) and actions where clean; the embodiment where actions are
    generated or given; the length (fps, num_frames, duration_s) of a clip, its sound or actions;
    the resolution of pictures. Another field given is an error naming it (``unread_fields``)."""
    clean = {role.stream: role.part for role in task.dm if not role.noisy}
    streams = {role.stream for role in task.dm}
    read = set(_ALWAYS_READ)
    if clean.get("video") == "first_frame":
        read |= {"image", "video"}
    elif "video" in clean:
        read.add("video")
    if task.vit == "required":
        read.add("image")
    if "audio" in clean:
        read |= {"audio", "audio_sample_rate"}
    if "actions" in clean:
        read.add("actions")
    if "actions" in streams:
        read.add("embodiment")
    if streams & {"video", "audio", "actions"}:
        read |= {"fps", "num_frames", "duration_s"}
    if streams & {"image", "video"}:
        read.add("resolution")
    return frozenset(read)


def unread_fields(request: GenerationRequest, task: TaskSpec) -> list[str]:
    """The fields ``request`` gives that a request of ``task`` does not read (``request_fields``):
    those not None (an fps equal to ``DEFAULT_FPS`` too: given is given, as the command's keys)."""
    given = [f.name for f in fields(request) if f.default is None and getattr(request, f.name) is not None]
    return sorted(set(given) - request_fields(task))


def _error(request: GenerationRequest, message: str) -> ValueError:
    return ValueError(f"task {request.task!r}: {message}")


def _num_frames(request: GenerationRequest) -> int | None:
    """Pixel frames of the clip asked for (module doc), or None when the request names no length."""
    if request.num_frames is not None:
        try:
            num_latent_frames(request.num_frames)  # ValueError unless 1 + 4k
        except ValueError as error:
            raise _error(request, f"num_frames={request.num_frames}: {error}") from None
        if request.num_frames / request.frame_rate > DURATION_RANGE_S[1]:
            raise _error(
                request,
                f"num_frames={request.num_frames} at fps={request.frame_rate:g} last longer than the longest clip "
                f"({DURATION_RANGE_S[1]:g} s, schema.DURATION_RANGE_S)",
            )
        return request.num_frames
    if request.duration_s is not None:
        if not 0 < request.duration_s <= DURATION_RANGE_S[1]:  # a clip's range, as in the shards
            raise _error(request, f"duration_s must be in (0, {DURATION_RANGE_S[1]:g}] s, got {request.duration_s!r}")
        frames = request.duration_s * request.frame_rate
        if frames < 1:  # the shortest clip is one frame: 0.01 s was one of 1 / fps, four times longer
            raise _error(
                request,
                f"duration_s={request.duration_s!r} is shorter than one frame at fps={request.frame_rate:g} "
                f"({1 / request.frame_rate:.4g} s); the shortest clip is num_frames=1",
            )
        return 1 + VAE_TEMPORAL_FACTOR * max(0, round((frames - 1) / VAE_TEMPORAL_FACTOR))
    return None


class _Streams:
    """The DM streams of one request, as a ``Sample``'s fields."""

    def __init__(self, request: GenerationRequest, task: TaskSpec, builder: SampleBuilder) -> None:
        self.request, self.task, self.builder = request, task, builder
        self.config = builder.config
        self.clean = {role.stream: role.part for role in task.dm if not role.noisy}
        self.noisy = {role.stream for role in task.dm if role.noisy}

    def encoder(self) -> LatentEncoder:
        if self.builder.latent_encoder is None:
            raise _error(self.request, "conditioning on pictures needs a latent encoder (the run's VAEs)")
        return self.builder.latent_encoder

    def conditioning_pictures(self) -> np.ndarray | None:
        """(T, H, W, 3) the frames a clean video span is encoded from: the video, else the image."""
        request = self.request
        if request.video is not None:
            return request.video
        if request.image is not None and self.clean.get("video") == "first_frame":
            return request.image[None]
        return None

    def grid_hw(self, frames: np.ndarray | None) -> tuple[int, int]:
        """The token grid's (h, w): of the pictures cut to whole tokens, else of ``resolution``, in
        tokens of the model's ``video_patch_size``."""
        request = self.request
        patch = self.config.video_patch_size
        side = pixels_per_token(patch)
        size = None
        if frames is not None:
            try:
                size = tuple(encodable_pixels(frames[:1], patch).shape[2:])
            except ValueError as error:
                raise _error(request, f"the conditioning picture: {error}") from None
        if request.resolution is not None:
            height, width = request.resolution
            if height <= 0 or width <= 0 or height % side or width % side:
                raise _error(
                    request,
                    f"resolution={request.resolution} must be positive multiples of {side} pixels "
                    f"(one video token at model.video_patch_size={patch})",
                )
            if size is not None and size != (height, width):
                raise _error(request, f"resolution={request.resolution} differs from the given pictures' {size}")
            size = (height, width)
        if size is None:
            raise _error(request, "resolution (height, width) is needed: no picture gives it")
        return size[0] // side, size[1] // side

    def video(self) -> tuple[torch.Tensor, tuple[int, int, int], Fraction]:
        """The whole clip's tokens (conditioning frames encoded, the rest zeros), grid, duration (s)."""
        request = self.request
        part = self.clean.get("video")
        pictures = self.conditioning_pictures() if part is not None else None
        if part is not None and pictures is None:
            need = "image or video" if part == "first_frame" else "video"
            raise _error(request, f"needs a conditioning {need} (its {part!r} video frames are clean)")
        h, w = self.grid_hw(pictures)
        given = None
        if pictures is not None:
            given = self.encoder().encode_video(pictures, request.frame_rate)
            if given.tokens.shape[1] != self.config.video_token_dim:
                raise _error(
                    request,
                    f"the latent encoder makes {given.tokens.shape[1]}-wide video tokens; the model takes "
                    f"{self.config.video_token_dim}",
                )
        frames = _num_frames(request)
        if frames is not None:
            t = num_latent_frames(frames)
        elif given is not None and part in _LENGTH_FROM_CONDITIONING:
            t = _LENGTH_FROM_CONDITIONING[part](given.grid_thw[0])
            frames = encoded_frame_count(t)
        else:
            raise _error(request, "the clip length is needed: set num_frames or duration_s")
        if t < self.task.min_latent_frames:
            need = self.task.min_latent_frames
            raise _error(request, f"{frames} frames make {t} latent frames; the task needs {need}")
        self.check_pixels(frames, h, w)
        tokens = torch.zeros(t * h * w, self.config.video_token_dim)
        if given is not None:
            keep = _CONDITIONING_FRAMES[part](t)
            if given.grid_thw[0] < keep:
                raise _error(request, f"the conditioning video gives {given.grid_thw[0]} latent frames; {keep} needed")
            tokens[: keep * h * w] = given.tokens[: keep * h * w]
        return tokens, (t, h, w), frames / exact(request.frame_rate)

    def check_pixels(self, frames: int, h: int, w: int) -> None:
        """The clip decodes to at most clips.MAX_CLIP_BYTES, as any clip of the shards: a crafted
        length or resolution cannot allocate without bound."""
        side = pixels_per_token(self.config.video_patch_size)
        try:
            check_clip_bytes(frames * h * side * w * side * 3, f"{frames} frames of {w * side}x{h * side}", "request")
        except SampleError as error:
            raise _error(self.request, str(error)) from None

    def actions(self, duration_s: Fraction) -> tuple[torch.Tensor, float]:
        request = self.request
        embodiment = request.embodiment
        if embodiment is None:
            raise _error(request, "needs an embodiment (whose actions the task generates or conditions on)")
        if embodiment not in self.config.embodiments:
            known = sorted(self.config.embodiments)
            raise _error(request, f"unknown embodiment {embodiment!r}; the model knows {known}")
        spec = self.config.embodiments[embodiment]
        if "actions" in self.clean:
            if request.actions is None:
                raise _error(request, "needs conditioning actions (actions with their embodiment)")
            actions = np.asarray(request.actions, dtype=np.float32)
            if actions.ndim != 2 or actions.shape[1] != spec.action_dim or actions.shape[0] == 0:
                raise _error(
                    request, f"actions of shape {actions.shape}; embodiment {embodiment!r} takes (n, {spec.action_dim})"
                )
            try:  # a NaN or a 1e30 step would make every generated token NaN, without a word
                float_rows(np.asarray(request.actions, dtype=np.float64), "conditioning actions", spec.action_dim)
            except SampleError as error:
                raise _error(request, str(error)) from None
            # The actions span the clip, as in training: a step and a frame of slack (a clip of T
            # frames lasts T / fps, its actions' steps start at frames 0 .. T - 1).
            span = actions.shape[0] / spec.rate_hz
            if abs(span - duration_s) > 1.0 / spec.rate_hz + 1.0 / request.frame_rate:
                raise _error(
                    request,
                    f"the actions span {span:.3f} s ({actions.shape[0]} steps at {spec.rate_hz:g} Hz, "
                    f"embodiment {embodiment!r}) but the clip lasts {float(duration_s):.3f} s; give "
                    f"{steps_before(duration_s, spec.rate_hz)} steps, or a clip length (num_frames or duration_s) "
                    "they span",
                )
            return torch.from_numpy(actions), spec.rate_hz
        return torch.zeros(max(1, steps_before(duration_s, spec.rate_hz)), spec.action_dim), spec.rate_hz


def delivered_streams(task: TaskSpec) -> set[str]:
    """The registry streams a generated sample of ``task`` delivers: the generated ones, and a
    generated sound's clip (video->audio gives the clip with its new sound)."""
    noisy = {role.stream for role in task.dm if role.noisy}
    return noisy | ({"video"} if "audio" in noisy else set())


def _check_pictures(request: GenerationRequest) -> None:
    """The image is (H, W, 3) and the video (T, H, W, 3) uint8 RGB, as the shards' decoders give them:
    floats (NaN too) were encoded as if 0..255, four channels or grey failed inside the encoder."""
    for name, value, ndim in (("image", request.image, 3), ("video", request.video, 4)):
        if value is None:
            continue
        array = np.asarray(value)
        if array.dtype != np.uint8 or array.ndim != ndim or array.shape[-1] != 3:
            want = "(H, W, 3)" if ndim == 3 else "(T, H, W, 3)"
            raise _error(request, f"{name} of dtype {array.dtype} and shape {array.shape}; want {want} uint8 RGB")


def prepare_request(request: GenerationRequest, builder: SampleBuilder) -> PreparedRequest:
    """The request as the training path's samples (module doc). ValueError naming the task and the
    problem: an unknown task or one without DM targets, a field the task does not read
    (``unread_fields``), a missing conditioning input, an unknown embodiment, a bad length or
    resolution, a bad sampler setting."""
    task = get_task(request.task)
    if not task.dm:
        raise _error(request, "has no DM targets to generate (text generation is the Reasoner's)")
    try:
        _ = request.sampler  # validates solver, steps, shift and guidance
    except ValueError as error:
        raise _error(request, str(error)) from None
    fps = request.frame_rate
    if isinstance(fps, (bool, str)) or not (math.isfinite(fps) and fps > 0):
        raise _error(request, f"fps must be a positive number, got {fps!r}")
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:  # the rates training data may have (the RoPE step)
        raise _error(request, f"fps={fps!r} is outside [{FPS_RANGE[0]}, {FPS_RANGE[1]}], the shards' range")
    problem = seed_problem("seed", request.seed)  # torch's 'Overflow when unpacking long long', deep in sampling
    if problem:
        raise _error(request, problem)
    unread = unread_fields(request, task)
    if unread:  # given and silently ignored, a user believed it shaped the sample
        raise _error(request, f"does not read {unread}; it reads {sorted(request_fields(task))}")
    _check_pictures(request)
    streams = _Streams(request, task, builder)
    if request.image is not None and request.video is not None and task.vit != "required":
        # Both can give a first frame; the video's was taken and the image silently dropped.
        raise _error(request, "gives both image and video, and reads only one as its first frame: give one of them")
    sample = Sample(key=f"request_{request.seed}", caption=request.prompt, instruction=request.prompt)
    if task.vit == "required":
        if request.image is None:
            raise _error(request, "needs an image: the observation the Reasoner sees")
        sample.observation = request.image
    outputs: dict[str, str] = {}
    video_grid, audio_samples = None, None
    needed = {role.stream for role in task.dm}
    duration = None
    if "video" in needed:
        tokens, video_grid, duration = streams.video()
        sample.video_latents, sample.video_latent_grid, sample.fps = tokens.numpy(), video_grid, request.frame_rate
        outputs["video"] = "video"
    if "image" in needed:
        h, w = streams.grid_hw(None)
        streams.check_pixels(1, h, w)
        video_grid = (1, h, w)
        sample.image_latents = np.zeros((h * w, builder.config.video_token_dim), np.float32)
        sample.image_latent_grid = video_grid
        outputs["image"] = "video"
    if duration is None:
        frames = _num_frames(request)
        if frames is None and not needed <= {"image"}:
            raise _error(request, "the clip length is needed: set num_frames or duration_s")
        duration = (frames or 1) / exact(request.frame_rate)
    if "audio" in needed:
        if "audio" in streams.clean:
            if request.audio is None or request.audio_sample_rate is None:
                raise _error(request, "needs conditioning audio (audio with audio_sample_rate)")
            latents = streams.encoder().encode_audio(request.audio, request.audio_sample_rate)
            sample.audio_latents, audio_samples = latents.tokens.numpy(), latents.num_samples
        else:
            audio_samples = round(duration * SAMPLE_RATE)
            shape = (num_audio_tokens(audio_samples), builder.config.audio_latent_dim)
            sample.audio_latents = np.zeros(shape, np.float32)
        sample.audio_num_samples = audio_samples
        outputs["audio"] = "audio"
    if "actions" in needed:
        actions, rate = streams.actions(duration)
        sample.actions, sample.embodiment, sample.action_rate_hz = actions.numpy(), request.embodiment, rate
        outputs["actions"] = action_stream_key(request.embodiment)
    delivered = delivered_streams(task)
    outputs = {name: key for name, key in outputs.items() if name in delivered}
    conditional = builder.build(sample, task)
    unconditional = builder.build(sample, task, drop_prompt=True)
    return PreparedRequest(request, task, conditional, unconditional, outputs, video_grid, audio_samples)
