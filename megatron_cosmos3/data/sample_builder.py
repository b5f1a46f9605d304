"""One decoded sample + its task -> a ``PackedSample``: the packer's per-sample half.

Layout ``[prompt, ViT, EOS, BOG | clean conditioning DM, noisy DM targets]`` (understanding:
``[question, ViT, answer, EOS]`` with cross-entropy on the answer and its EOS). Positions come
from ``model/positions.py``: Qwen3-VL's rule for the AR section, the FPS rule for the DM section,
whose streams all start at the first free unit after the AR section. Timesteps are left to the
batch (zeros: ``objectives/flow_matching.py`` draws them and adds the noise).

A clip's video is encoded as 1 + 4k frames (the VAE's temporal factor; up to 3 last frames are
cropped), so its audio tokens and action steps are cut to the steps that start while those frames
show (``within_video``; after a crop in time too): every stream covers the same seconds, as
generation lays a clip out (docs/DESIGN.md, "The data path, from shard to loss").

Over-long samples are cropped in time: every temporal stream (video latent frames, audio tokens,
actions) keeps the steps that start in the clip's first D seconds — the same D for all, so the
streams stay in sync — with D the longest that fits ``max_sample_tokens`` and still lays out the
task (e.g. image-to-video keeps at least two latent frames). Images are never cropped and text is
capped at ``max_text_tokens`` beforehand; a sample that cannot fit even so is ``too_long``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from megatron_cosmos3.data.errors import TOO_LONG, LoaderSetupError, SampleError
from megatron_cosmos3.data.latent_encoders import LatentEncoder
from megatron_cosmos3.data.schema import Sample
from megatron_cosmos3.data.tokenizer import Tokenizer
from megatron_cosmos3.data.vision_features import VisionFeaturizer
from megatron_cosmos3.encoders.action_normalization import ActionStats, normalize_actions
from megatron_cosmos3.encoders.video_vae import VAE_TEMPORAL_FACTOR, encoded_frame_count
from megatron_cosmos3.model import positions as pos
from megatron_cosmos3.model.config import TPS_BASE, MoTConfig
from megatron_cosmos3.model.packed_batch import IGNORE_INDEX, PackedSample, action_stream_key
from megatron_cosmos3.tasks.layout import Stream, dm_layout, exact, noise_mask
from megatron_cosmos3.tasks.registry import DEFAULT_QUESTION, TaskSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildLimits:
    """max_sample_tokens: AR + DM tokens of one sample after cropping; max_text_tokens: per text."""

    max_sample_tokens: int
    max_text_tokens: int = 256


@dataclass
class BuiltSample:
    sample: PackedSample
    num_tokens: int
    cropped: bool
    prompt_dropped: bool = False


def within_video(streams: dict[str, Stream]) -> dict[str, Stream]:
    """``streams`` with the audio and actions cut to the steps that start while the video's encoded
    frames show (module doc): t latent frames are 1 + 4(t - 1) frames, up to 3 frames shorter than
    the clip (or the crop) the other streams were cut to. Unchanged without a video stream."""
    if "video" not in streams:
        return streams
    video = streams["video"]
    fps = exact(video.tokens_per_second) * VAE_TEMPORAL_FACTOR
    seconds = encoded_frame_count(video.first_temporal_index + video.num_steps) / fps
    return {name: s.first_seconds(seconds) if name in ("audio", "actions") else s for name, s in streams.items()}


def picture_of(sample: Sample) -> np.ndarray | None:
    """What the ViT sees: the observation, else the image, else the first video frame."""
    if sample.observation is not None:
        return sample.observation
    if sample.image is not None:
        return sample.image
    return sample.video[0] if sample.video is not None else None


class SampleBuilder:
    """Builds PackedSamples for one model (its vocabulary, stream widths and embodiments)."""

    def __init__(
        self,
        model_config: MoTConfig,
        tokenizer: Tokenizer,
        vision: VisionFeaturizer,
        limits: BuildLimits,
        latent_encoder: LatentEncoder | None = None,
        action_stats: ActionStats | None = None,
    ) -> None:
        self.config, self.tokenizer, self.vision, self.limits = model_config, tokenizer, vision, limits
        self.latent_encoder, self.action_stats = latent_encoder, action_stats
        patch = None if latent_encoder is None else latent_encoder.video_patch_size
        if patch is not None and patch != model_config.video_patch_size:
            raise LoaderSetupError(
                f"the latent encoder makes video tokens of {patch}x{patch} latent cells (video_patch_size={patch}), "
                f"but model.video_patch_size={model_config.video_patch_size}"
            )
        vision_config = getattr(model_config, "vision", None)
        # The AR id under each ViT token is a placeholder the embeddings replace.
        self.vision_token_id = vision_config.image_token_id if vision_config is not None else 0
        self._unnormalized_warned: set[str] = set()

    # --- AR section --------------------------------------------------------------------------------

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)[: self.limits.max_text_tokens]

    def _ar_section(self, sample: Sample, task: TaskSpec, drop_prompt: bool = False):
        """ids (n,), labels (n,), positions (3, n), is_vision (n,) and the picture's PictureTokens (or None).
        ``drop_prompt``: the prompt is empty; the rest of the layout (ViT, EOS, BOG) stays."""
        ids: list[int] = []
        is_target: list[bool] = []  # answer tokens: the ones next-token cross-entropy predicts
        is_vision: list[bool] = []

        def add(tokens: list[int], target: bool = False, vision: bool = False) -> None:
            ids.extend(tokens)
            is_target.extend([target] * len(tokens))
            is_vision.extend([vision] * len(tokens))

        prompt = {
            "caption": sample.caption or sample.instruction,
            "instruction": sample.instruction or sample.caption,
            "question": sample.question or DEFAULT_QUESTION,
        }[task.prompt]
        add(self._text("" if drop_prompt else prompt or ""))
        grids, tokens = [], None
        picture = picture_of(sample) if task.vit != "none" else None
        if picture is not None:
            tokens = self.vision(picture)
            grids.append(tokens.grid)
            add([self.vision_token_id] * (tokens.grid[0] * tokens.grid[1] * tokens.grid[2]), vision=True)
        if task.answer:
            answer = sample.answer if sample.question is not None else (sample.caption or sample.instruction)
            add(self._text(answer) + [self.tokenizer.eos_id], target=True)
        else:
            add([self.tokenizer.eos_id, self.tokenizer.bog_id])
        ids_t = torch.tensor(ids, dtype=torch.long)
        vision_t = torch.tensor(is_vision, dtype=torch.bool)
        labels = torch.full_like(ids_t, IGNORE_INDEX)
        next_is_target = torch.tensor(is_target[1:], dtype=torch.bool)
        labels[:-1][next_is_target] = ids_t[1:][next_is_target]  # token i predicts answer token i + 1
        return ids_t, labels, pos.qwen3_vl_positions(vision_t, grids), vision_t, tokens

    # --- DM streams ----------------------------------------------------------------------------------

    def _encoder(self) -> LatentEncoder:
        if self.latent_encoder is None:
            raise LoaderSetupError(
                "a sample holds raw media but the loader has no latent encoder (set "
                "data.encoders.online with VAE paths, or pre-encode the shards with "
                "data_pipelines/encode_shards.py)"
            )
        return self.latent_encoder

    def _streams(self, sample: Sample, task: TaskSpec) -> dict[str, Stream]:
        needed = {role.stream for role in task.dm}
        streams: dict[str, Stream] = {}
        if "video" in needed:
            if sample.video_latents is not None:
                values, grid = torch.from_numpy(sample.video_latents), sample.video_latent_grid
            else:
                latents = self._encoder().encode_video(sample.video, sample.fps)
                values, grid = latents.tokens, latents.grid_thw
            streams["video"] = Stream("video", values, tuple(grid), pos.video_tokens_per_second(sample.fps))
        if "image" in needed:
            if sample.image_latents is not None:
                values, grid = torch.from_numpy(sample.image_latents), sample.image_latent_grid
            else:
                latents = self._encoder().encode_image(sample.image)
                values, grid = latents.tokens, latents.grid_thw
            # A still sits at time 0; any rate gives the same positions.
            streams["image"] = Stream("video", values, tuple(grid), TPS_BASE)
        if "audio" in needed:
            if sample.audio_latents is not None:
                values = torch.from_numpy(sample.audio_latents)
            else:
                values = self._encoder().encode_audio(sample.audio, sample.audio_sample_rate).tokens
            streams["audio"] = Stream("audio", values, (values.shape[0], 1, 1), pos.AUDIO_TOKENS_PER_SECOND)
        if "actions" in needed:
            values = self._normalized_actions(sample)
            streams["actions"] = Stream(
                action_stream_key(sample.embodiment), values, (values.shape[0], 1, 1), sample.action_rate_hz
            )
        return within_video(streams)

    def _normalized_actions(self, sample: Sample) -> torch.Tensor:
        actions = torch.from_numpy(sample.actions)
        if self.action_stats is not None and sample.embodiment in self.action_stats.embodiments:
            return normalize_actions(actions, self.action_stats[sample.embodiment])
        if sample.embodiment not in self._unnormalized_warned:
            self._unnormalized_warned.add(sample.embodiment)
            log.warning(
                "no action statistics for embodiment %r: its actions enter the model unnormalised", sample.embodiment
            )
        return actions

    def _fit(self, task: TaskSpec, streams: dict[str, Stream], n_ar: int, key: str) -> tuple[list, bool]:
        """The task's DM spans, cropped in time if needed (module doc); (spans, cropped)."""
        limit = self.limits.max_sample_tokens

        def spans_within(seconds: Fraction | None):
            cut = (
                streams
                if seconds is None
                else within_video(
                    {name: s if name == "image" else s.first_seconds(seconds) for name, s in streams.items()}
                )
            )
            try:
                spans = dm_layout(task, cut)
            except ValueError:
                return None
            return spans if n_ar + sum(piece.num_tokens for piece, _ in spans) <= limit else None

        if n_ar > limit:
            raise SampleError(TOO_LONG, f"{n_ar} AR tokens exceed max_sample_tokens={limit}")
        spans = spans_within(None)
        if spans is not None:
            return spans, False
        temporal = [s for name, s in streams.items() if name != "image"]
        cuts = sorted({k / exact(s.tokens_per_second) for s in temporal for k in range(1, s.num_steps + 1)})
        low, high, best = 0, len(cuts) - 1, None
        while low <= high:  # the token count grows with the duration: bisect for the longest that fits
            middle = (low + high) // 2
            spans = spans_within(cuts[middle])
            if spans is None:
                high = middle - 1
            else:
                best, low = spans, middle + 1
        if best is None:
            total = n_ar + sum(s.num_tokens for s in streams.values())
            raise SampleError(TOO_LONG, f"{key}: {total} tokens and no crop in time fits max_sample_tokens={limit}")
        return best, True

    # --- the whole sample ------------------------------------------------------------------------------

    def build(self, sample: Sample, task: TaskSpec, drop_prompt: bool = False) -> BuiltSample:
        """The PackedSample of ``sample`` laid out as ``task`` (which must allow it). ``drop_prompt``:
        with an empty prompt, for the unconditional model of classifier-free guidance; only a task
        with DM targets drops it (an understanding sample's question is what its answer answers)."""
        if drop_prompt and not task.dm:
            raise ValueError(f"task {task.name!r} has no DM targets: its prompt is never dropped")
        ids, labels, ar_positions, is_vision, picture = self._ar_section(sample, task, drop_prompt)
        spans, cropped = self._fit(task, self._streams(sample, task), len(ids), sample.key)
        offset = pos.next_start(ar_positions)
        dm_positions = [
            pos.dm_span_positions(offset, piece.key, piece.grid, piece.tokens_per_second, piece.first_temporal_index)
            for piece, _ in spans
        ]
        pixels = picture.pixels if picture is not None else None
        packed = PackedSample(
            task=task.name,
            ar_token_ids=ids,
            ar_labels=labels,
            ar_positions=ar_positions,
            dm_streams=[(piece.key, piece.values.float()) for piece, _ in spans],
            dm_positions=torch.cat(dm_positions, dim=1) if dm_positions else None,
            dm_noise_mask=noise_mask(spans) if spans else None,
            ar_vision_embeds=picture.embeds if picture is not None else None,
            ar_is_vision=is_vision if picture is not None else None,
            vision_pixels=pixels,
            vision_grid_thw=torch.tensor([picture.patch_grid]) if pixels is not None else None,
        )
        n_dm = sum(piece.num_tokens for piece, _ in spans)
        return BuiltSample(packed, len(ids) + n_dm, cropped, drop_prompt)
