"""Media -> DM latent tokens, for samples whose shards hold pixels and waveforms.

Two encoders behind one interface (``LatentEncoder``):

* ``VAELatentEncoder``: the frozen video and audio VAEs (``encoders/video_vae.py``,
  ``encoders/audio_vae.py``) loaded from local folders — the real thing, online in the loader's
  workers or offline in ``data_pipelines/encode_shards.py``;
* ``PooledLatentEncoder``: an analytic stand-in with no weights, for the CPU demo and benchmarks:
  the same token grids and rates as the VAEs (one video token per 4 frames x 32 x 32 pixels, 25
  audio tokens per second), its values fixed random projections of pooled colours, motion and
  band energies. It keeps what a world model needs to see (where things are, when they collide),
  not what a decoder needs to reconstruct pixels.

Frame counts and sizes the VAE cannot take are cut here, the data transform's job: a clip keeps
its first ``1 + 4k`` frames and its centre ``32·m x 32·n`` pixels.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from megatron_cosmos3.data.errors import LoaderSetupError
from megatron_cosmos3.encoders.audio_vae import HOP, AudioLatents, num_audio_tokens, to_stereo_48k
from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
from megatron_cosmos3.encoders.video_vae import (
    PIXELS_PER_TOKEN,
    VAE_SPATIAL_FACTOR,
    VAE_TEMPORAL_FACTOR,
    VideoLatents,
    largest_encodable_frame_count,
    latents_to_tokens,
)


class LatentEncoder(Protocol):
    video_token_dim: int
    audio_latent_dim: int

    def encode_video(self, frames: np.ndarray, fps: float) -> VideoLatents: ...

    def encode_image(self, image: np.ndarray) -> VideoLatents: ...

    def encode_audio(self, waveform: np.ndarray, sample_rate: int) -> AudioLatents: ...


def encodable_pixels(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T', H', W') float32 in [-1, 1]: the first T' = 1 + 4k frames and
    the centre H' x W' pixels, multiples of 32."""
    t = largest_encodable_frame_count(frames.shape[0])
    h, w = (size // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN for size in frames.shape[1:3])
    top, left = (frames.shape[1] - h) // 2, (frames.shape[2] - w) // 2
    clip = torch.from_numpy(np.ascontiguousarray(frames[:t, top : top + h, left : left + w]))
    return clip.permute(3, 0, 1, 2).float() / 127.5 - 1.0


class VAELatentEncoder:
    """The frozen VAEs; either may be None when the data has no such media."""

    def __init__(self, video_vae=None, audio_vae=None) -> None:
        self.video_vae, self.audio_vae = video_vae, audio_vae
        self.video_token_dim = video_vae.token_dim if video_vae is not None else 0
        self.audio_latent_dim = audio_vae.token_dim if audio_vae is not None else 0

    @classmethod
    def from_config(cls, config: LatentEncoderConfig) -> VAELatentEncoder:
        """Loads the VAEs named by ``config`` (local diffusers folders) on CPU."""
        from megatron_cosmos3.encoders.audio_vae import AudioVAE
        from megatron_cosmos3.encoders.video_vae import VideoVAE

        config.validate()
        dtype = config.torch_dtype
        video = VideoVAE.from_pretrained(config.video_vae_path, dtype=dtype) if config.video_vae_path else None
        audio = AudioVAE.from_pretrained(config.audio_vae_path, dtype=dtype) if config.audio_vae_path else None
        return cls(video, audio)

    def _need(self, vae, what: str):
        if vae is None:
            raise LoaderSetupError(
                f"a sample holds raw {what} but no {what} VAE is configured (data.encoders.{what}_vae_path)"
            )
        return vae

    def encode_video(self, frames: np.ndarray, fps: float) -> VideoLatents:
        return self._need(self.video_vae, "video").encode(encodable_pixels(frames), fps)

    def encode_image(self, image: np.ndarray) -> VideoLatents:
        return self._need(self.video_vae, "video").encode_image(encodable_pixels(image[None])[:, 0])

    def encode_audio(self, waveform: np.ndarray, sample_rate: int) -> AudioLatents:
        return self._need(self.audio_vae, "audio").encode(torch.from_numpy(waveform), sample_rate)


_VIDEO_FEATURES = 24  # per latent cell: 2x2 sub-block mean colours (12) + their change over the frame group (12)
_AUDIO_BANDS = 8  # per channel and hop: log energies of 8 log-spaced bands


class PooledLatentEncoder:
    """Analytic latents with the VAEs' grids and rates (module doc); deterministic given ``seed``."""

    def __init__(self, video_latent_channels: int, audio_latent_dim: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.video_latent_channels = video_latent_channels
        self.video_token_dim = video_latent_channels * 4
        self.audio_latent_dim = audio_latent_dim
        # Orthogonal columns keep unit-variance features at unit variance.
        self._video_projection = _orthonormal(_VIDEO_FEATURES, video_latent_channels, generator)
        self._audio_projection = _orthonormal(2 * _AUDIO_BANDS, audio_latent_dim, generator)

    def _frame_groups(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, 1 + 4k, H, W) -> (t, 24, 2h, 2w) cell features, t = 1 + k (Wan's first frame alone)."""
        later = list(pixels[:, 1:].split(VAE_TEMPORAL_FACTOR, dim=1)) if pixels.shape[1] > 1 else []
        groups = [pixels[:, :1]] + later
        features = []
        for group in groups:
            mean = torch.nn.functional.avg_pool2d(group.mean(1), VAE_SPATIAL_FACTOR // 2)  # (3, 4h', 4w')
            change = torch.nn.functional.avg_pool2d(group[:, -1] - group[:, 0], VAE_SPATIAL_FACTOR // 2)
            # 2x2 sub-blocks of each 16x16 cell become feature channels.
            both = torch.cat([mean, change])  # (6, 2H/16, 2W/16)
            c, hh, ww = both.shape
            cells = both.reshape(c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3).reshape(c * 4, hh // 2, ww // 2)
            features.append(cells)
        return torch.stack(features)

    def _video_tokens(self, pixels: torch.Tensor, fps: float | None) -> VideoLatents:
        features = self._frame_groups(pixels)  # (t, 24, 2h, 2w)
        latents = torch.einsum("tfyx,fc->ctyx", features * 2.0, self._video_projection)
        tokens = latents_to_tokens(latents.unsqueeze(0))[0].contiguous()
        t, _, hh, ww = features.shape
        return VideoLatents(tokens, (t, hh // 2, ww // 2), fps)

    def encode_video(self, frames: np.ndarray, fps: float) -> VideoLatents:
        return self._video_tokens(encodable_pixels(frames), fps)

    def encode_image(self, image: np.ndarray) -> VideoLatents:
        return self._video_tokens(encodable_pixels(image[None]), None)

    def encode_audio(self, waveform: np.ndarray, sample_rate: int) -> AudioLatents:
        audio = to_stereo_48k(torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)), sample_rate)
        n = audio.shape[1]
        tokens = num_audio_tokens(n)
        hops = torch.nn.functional.pad(audio, (0, tokens * HOP - n)).reshape(2, tokens, HOP)
        power = torch.fft.rfft(hops).abs().square()  # (2, tokens, HOP // 2 + 1)
        edges = np.unique(np.geomspace(1, power.shape[-1], _AUDIO_BANDS + 1).astype(int))
        bands = torch.stack([power[..., a:b].sum(-1) for a, b in zip(edges[:-1], edges[1:])], dim=-1)
        bands = torch.nn.functional.pad(bands, (0, _AUDIO_BANDS - bands.shape[-1]))
        # log energy around a quiet floor: silence -> about -1, a loud impact -> about +1.
        features = (torch.log10(bands + 1e-6) + 3.0) / 3.0  # (2, tokens, bands)
        features = features.permute(1, 0, 2).reshape(tokens, 2 * _AUDIO_BANDS)
        return AudioLatents((features @ self._audio_projection).contiguous(), n)


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, cols) with orthonormal columns where cols <= rows, else orthonormal rows."""
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=generator))
    return q if rows >= cols else q.T


def latent_sample(sample, encoder: LatentEncoder):
    """A copy of a ``Sample`` with pixels and waveform replaced by their latents (offline
    pre-encoding). The ViT's picture (observation, else image, else first frame) is kept as
    ``observation`` so that tasks that show the Reasoner a picture still can."""
    from dataclasses import replace

    picture = next(
        (
            p
            for p in (sample.observation, sample.image, None if sample.video is None else sample.video[0])
            if p is not None
        ),
        None,
    )
    out = replace(sample, image=None, video=None, audio=None, audio_sample_rate=None, observation=picture)
    if sample.video is not None:
        video = encoder.encode_video(sample.video, sample.fps)
        out.video_latents, out.video_latent_grid = video.tokens.numpy(), tuple(video.grid_thw)
    if sample.image is not None:
        image = encoder.encode_image(sample.image)
        out.image_latents, out.image_latent_grid = image.tokens.numpy(), tuple(image.grid_thw)
    if sample.audio is not None:
        audio = encoder.encode_audio(sample.audio, sample.audio_sample_rate)
        out.audio_latents, out.audio_num_samples = audio.tokens.numpy(), audio.num_samples
    return out
