"""Media <-> DM latent tokens: encoding for samples whose shards hold pixels and waveforms, decoding
for what the model generates (docs/DESIGN.md, "Generated media").

Two encoders behind one interface (``LatentEncoder``), each with its decoder, so generated latents
are turned back into media by the encoder that made the training latents
(``latent_encoder_from_config`` picks it from ``encoders.kind``):

* ``VAELatentEncoder``: the frozen video and audio VAEs (``encoders/video_vae.py``,
  ``encoders/audio_vae.py``) loaded from local folders — the real thing, online in the loader's
  workers or offline in ``data_pipelines/encode_shards.py``;
* ``PooledLatentEncoder``: an analytic stand-in with no weights, for the CPU demo and benchmarks:
  the same token grids and rates as the VAEs (one video token per 4 frames x 16p x 16p pixels for
  a token patch of p latent cells, 25 audio tokens per second), its values fixed random
  projections of pooled colours, motion and band energies. It keeps what a world model needs to
  see (where things are, when they collide), not what a decoder needs to reconstruct pixels. Its
  decoder is a least-squares inverse: blocky frames and band-shaped noise
  (``PooledLatentEncoder.decode_video`` / ``decode_audio`` say what comes back and what cannot).

Frame counts and sizes the VAE cannot take are cut here, the data transform's job: a clip keeps
its first ``1 + 4k`` frames and its centre ``16p·m x 16p·n`` pixels. The token patch ``p`` is the
model config's ``video_patch_size`` (``latent_encoder_from_config`` takes it; docs/DESIGN.md,
"Model shapes"); each encoder carries it as ``video_patch_size``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from megatron_cosmos3.data.errors import LoaderSetupError
from megatron_cosmos3.encoders.audio_vae import HOP, AudioLatents, num_audio_tokens, to_stereo_48k
from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
from megatron_cosmos3.encoders.video_vae import (
    TOKEN_PATCH,
    VAE_SPATIAL_FACTOR,
    VAE_TEMPORAL_FACTOR,
    VideoLatents,
    largest_encodable_frame_count,
    latents_to_tokens,
    pixels_per_token,
    tokens_to_latents,
)


class LatentEncoder(Protocol):
    kind: str  # the ``encoders.kind`` that builds it
    video_token_dim: int
    video_patch_size: int  # latent cells per video token, each side
    audio_latent_dim: int

    def encode_video(self, frames: np.ndarray, fps: float) -> VideoLatents: ...

    def encode_image(self, image: np.ndarray) -> VideoLatents: ...

    def encode_audio(self, waveform: np.ndarray, sample_rate: int) -> AudioLatents: ...

    def decode_video(self, latents: VideoLatents) -> np.ndarray:
        """Latent tokens -> ``(1 + 4(t-1), 16p h, 16p w, 3)`` uint8 RGB frames (one frame for an image)."""
        ...

    def decode_audio(self, latents: AudioLatents) -> np.ndarray:
        """Latent tokens -> ``(2, num_samples)`` float32 waveform at 48 kHz, nominally in [-1, 1]."""
        ...


def latent_encoder_from_config(
    config: LatentEncoderConfig, video_latent_channels: int, audio_latent_dim: int, video_patch_size: int
) -> LatentEncoder:
    """The encoder (and so the decoder) ``config.kind`` names, at the model's latent widths and
    video token patch.

    ``video_latent_channels`` / ``audio_latent_dim`` / ``video_patch_size``: the model config's; a
    VAE whose widths differ is a ValueError naming both (its latents could not be the ones the
    model learnt).
    """
    config.validate()
    if config.kind == "pooled":
        return PooledLatentEncoder(video_latent_channels, audio_latent_dim, config.pooled_seed, video_patch_size)
    encoder = VAELatentEncoder.from_config(config, video_patch_size)
    for what, vae, width in (
        ("video", encoder.video_vae, video_latent_channels * video_patch_size**2),
        ("audio", encoder.audio_vae, audio_latent_dim),
    ):
        if vae is not None and vae.token_dim != width:
            raise ValueError(
                f"encoders.{what}_vae_path={getattr(config, what + '_vae_path')!r} makes {what} tokens of width "
                f"{vae.token_dim}; the model's {what} tokens have width {width}"
            )
    return encoder


def _check_video_latents(latents: VideoLatents, token_dim: int) -> None:
    t, h, w = latents.grid_thw
    if min(t, h, w) < 1:
        raise ValueError(f"video latents grid_thw={tuple(latents.grid_thw)} must be positive")
    if tuple(latents.tokens.shape) != (t * h * w, token_dim):
        raise ValueError(
            f"video latents tokens of shape {tuple(latents.tokens.shape)} do not fit grid_thw="
            f"{tuple(latents.grid_thw)}: expected ({t * h * w}, {token_dim})"
        )


def _check_audio_latents(latents: AudioLatents, token_dim: int) -> None:
    tokens = latents.tokens
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] != token_dim:
        raise ValueError(f"audio latents tokens must have shape (N >= 1, {token_dim}), got {tuple(tokens.shape)}")
    if not 0 < latents.num_samples <= tokens.shape[0] * HOP:
        raise ValueError(
            f"audio latents num_samples={latents.num_samples} does not fit {tokens.shape[0]} tokens "
            f"(1 to {tokens.shape[0] * HOP})"
        )


def pixels_to_frames(pixels: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] -> (T, H, W, 3) uint8, clipped: the inverse of ``encodable_pixels``."""
    values = ((pixels.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return values.to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


def encodable_pixels(frames: np.ndarray, video_patch_size: int = TOKEN_PATCH) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T', H', W') float32 in [-1, 1]: the first T' = 1 + 4k frames and
    the centre H' x W' pixels, multiples of ``pixels_per_token(video_patch_size)`` (32 at 2).
    ValueError naming the size when a side is smaller than one token."""
    side = pixels_per_token(video_patch_size)
    if min(frames.shape[1:3]) < side:
        raise ValueError(
            f"frames of {frames.shape[2]}x{frames.shape[1]} pixels are smaller than one video token "
            f"({side}x{side} pixels at video_patch_size={video_patch_size})"
        )
    t = largest_encodable_frame_count(frames.shape[0])
    h, w = (size // side * side for size in frames.shape[1:3])
    top, left = (frames.shape[1] - h) // 2, (frames.shape[2] - w) // 2
    clip = torch.from_numpy(np.ascontiguousarray(frames[:t, top : top + h, left : left + w]))
    return clip.permute(3, 0, 1, 2).float() / 127.5 - 1.0


class VAELatentEncoder:
    """The frozen VAEs; either may be None when the data has no such media."""

    kind = "vae"

    def __init__(self, video_vae=None, audio_vae=None) -> None:
        self.video_vae, self.audio_vae = video_vae, audio_vae
        self.video_patch_size = video_vae.patch if video_vae is not None else TOKEN_PATCH
        self.video_token_dim = video_vae.token_dim if video_vae is not None else 0
        self.audio_latent_dim = audio_vae.token_dim if audio_vae is not None else 0

    @classmethod
    def from_config(cls, config: LatentEncoderConfig, video_patch_size: int = TOKEN_PATCH) -> VAELatentEncoder:
        """Loads the VAEs named by ``config`` (local diffusers folders) on CPU; video tokens of
        ``video_patch_size`` latent cells (the model config's)."""
        from megatron_cosmos3.encoders.audio_vae import AudioVAE
        from megatron_cosmos3.encoders.video_vae import VideoVAE

        config.validate()
        dtype = config.torch_dtype
        video = (
            VideoVAE.from_pretrained(config.video_vae_path, dtype=dtype, patch=video_patch_size)
            if config.video_vae_path
            else None
        )
        audio = AudioVAE.from_pretrained(config.audio_vae_path, dtype=dtype) if config.audio_vae_path else None
        return cls(video, audio)

    def _need(self, vae, what: str, doing: str = "encoding"):
        if vae is None:
            held = f"a sample holds raw {what}" if doing == "encoding" else f"decoding {what} latents needs it"
            raise LoaderSetupError(f"{held} but no {what} VAE is configured (data.encoders.{what}_vae_path)")
        return vae

    def encode_video(self, frames: np.ndarray, fps: float) -> VideoLatents:
        return self._need(self.video_vae, "video").encode(encodable_pixels(frames, self.video_patch_size), fps)

    def encode_image(self, image: np.ndarray) -> VideoLatents:
        pixels = encodable_pixels(image[None], self.video_patch_size)[:, 0]
        return self._need(self.video_vae, "video").encode_image(pixels)

    def encode_audio(self, waveform: np.ndarray, sample_rate: int) -> AudioLatents:
        return self._need(self.audio_vae, "audio").encode(torch.from_numpy(waveform), sample_rate)

    def decode_video(self, latents: VideoLatents) -> np.ndarray:
        """The video VAE's decoder: what the VAE keeps of the clip, at its full resolution."""
        vae = self._need(self.video_vae, "video", "decoding")
        _check_video_latents(latents, vae.token_dim)
        return pixels_to_frames(vae.decode(latents.tokens, latents.grid_thw))

    def decode_audio(self, latents: AudioLatents) -> np.ndarray:
        """The audio VAE's decoder, cut to ``latents.num_samples``."""
        vae = self._need(self.audio_vae, "audio", "decoding")
        _check_audio_latents(latents, vae.token_dim)
        return vae.decode(latents.tokens, latents.num_samples).cpu().numpy()


_VIDEO_FEATURES = 24  # per latent cell: 2x2 sub-block mean colours (12) + their change over the frame group (12)
_VIDEO_CHANNELS = 6  # per 8x8 sub-block: mean RGB, then the RGB change over the frame group
_SUB_BLOCK = VAE_SPATIAL_FACTOR // 2  # 8 pixels
_AUDIO_BANDS = 8  # per channel and hop: log energies of 8 log-spaced bands


def _band_edges() -> np.ndarray:
    """Edges of the audio bands, as rfft bins of one hop (bin 0, the DC, is in no band)."""
    return np.unique(np.geomspace(1, HOP // 2 + 1, _AUDIO_BANDS + 1).astype(int))


def _unprojection(projection: torch.Tensor, shared: torch.Tensor, scale: float) -> torch.Tensor:
    """(latent, features) least-squares inverse of ``latent = scale * features @ projection``.

    Where the latent is narrower than the features, the features are assumed to lie in the span
    of ``shared`` (features, k) when that makes the system determined (latent >= k): the solution
    is then exact for features of that form; otherwise the minimum-norm solution is taken.
    """
    features, latent = projection.shape
    basis = torch.eye(features) if latent >= features or latent < shared.shape[1] else shared
    system = scale * basis.T @ projection  # (k, latent)
    return torch.linalg.pinv(system) @ basis.T


class PooledLatentEncoder:
    """Analytic latents with the VAEs' grids and rates (module doc); deterministic given ``seed``."""

    kind = "pooled"

    def __init__(
        self, video_latent_channels: int, audio_latent_dim: int, seed: int = 0, video_patch_size: int = TOKEN_PATCH
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        pixels_per_token(video_patch_size)  # checks it
        if video_latent_channels < 0 or audio_latent_dim < 0:
            raise ValueError(
                f"video_latent_channels={video_latent_channels} and audio_latent_dim={audio_latent_dim} must be >= 0"
            )
        self.video_latent_channels = video_latent_channels
        self.video_patch_size = video_patch_size
        self.video_token_dim = video_latent_channels * video_patch_size**2
        self.audio_latent_dim = audio_latent_dim
        # Orthogonal columns keep unit-variance features at unit variance.
        self._video_projection = _orthonormal(_VIDEO_FEATURES, video_latent_channels, generator)
        self._audio_projection = _orthonormal(2 * _AUDIO_BANDS, audio_latent_dim, generator)
        # The decoders' fallbacks when the latents are narrower than the features: a cell's four
        # sub-blocks alike (feature index = channel * 4 + sub-block), both ears alike (ear * bands + band).
        cell_alike = torch.eye(_VIDEO_CHANNELS).repeat_interleave(4, dim=0)
        ears_alike = torch.eye(_AUDIO_BANDS).repeat(2, 1)
        self._video_unprojection = _unprojection(self._video_projection, cell_alike, 2.0)
        self._audio_unprojection = _unprojection(self._audio_projection, ears_alike, 1.0)

    def _frame_groups(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, 1 + 4k, H, W) -> (t, 24, H/16, W/16) cell features, t = 1 + k (Wan's first frame alone)."""
        later = list(pixels[:, 1:].split(VAE_TEMPORAL_FACTOR, dim=1)) if pixels.shape[1] > 1 else []
        groups = [pixels[:, :1]] + later
        features = []
        for group in groups:
            mean = torch.nn.functional.avg_pool2d(group.mean(1), _SUB_BLOCK)  # (3, 4h', 4w')
            change = torch.nn.functional.avg_pool2d(group[:, -1] - group[:, 0], _SUB_BLOCK)
            # 2x2 sub-blocks of each 16x16 cell become feature channels.
            both = torch.cat([mean, change])  # (6, 2H/16, 2W/16)
            c, hh, ww = both.shape
            cells = both.reshape(c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3).reshape(c * 4, hh // 2, ww // 2)
            features.append(cells)
        return torch.stack(features)

    def _video_tokens(self, pixels: torch.Tensor, fps: float | None) -> VideoLatents:
        p = self.video_patch_size
        features = self._frame_groups(pixels)  # (t, 24, p*h, p*w)
        latents = torch.einsum("tfyx,fc->ctyx", features * 2.0, self._video_projection)
        tokens = latents_to_tokens(latents.unsqueeze(0), p)[0].contiguous()
        t, _, hh, ww = features.shape
        return VideoLatents(tokens, (t, hh // p, ww // p), fps)

    def encode_video(self, frames: np.ndarray, fps: float) -> VideoLatents:
        return self._video_tokens(encodable_pixels(frames, self.video_patch_size), fps)

    def encode_image(self, image: np.ndarray) -> VideoLatents:
        return self._video_tokens(encodable_pixels(image[None], self.video_patch_size), None)

    def encode_audio(self, waveform: np.ndarray, sample_rate: int) -> AudioLatents:
        audio = to_stereo_48k(torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)), sample_rate)
        n = audio.shape[1]
        tokens = num_audio_tokens(n)
        hops = torch.nn.functional.pad(audio, (0, tokens * HOP - n)).reshape(2, tokens, HOP)
        power = torch.fft.rfft(hops).abs().square()  # (2, tokens, HOP // 2 + 1)
        edges = _band_edges()
        bands = torch.stack([power[..., a:b].sum(-1) for a, b in zip(edges[:-1], edges[1:])], dim=-1)
        bands = torch.nn.functional.pad(bands, (0, _AUDIO_BANDS - bands.shape[-1]))
        # log energy around a quiet floor: silence -> about -1, a loud impact -> about +1.
        features = (torch.log10(bands + 1e-6) + 3.0) / 3.0  # (2, tokens, bands)
        features = features.permute(1, 0, 2).reshape(tokens, 2 * _AUDIO_BANDS)
        return AudioLatents((features @ self._audio_projection).contiguous(), n)

    def decode_video(self, latents: VideoLatents) -> np.ndarray:
        """Least-squares inverse of the pooled video encoding: blocky frames.

        What comes back: for every 8x8-pixel sub-block and frame group, its mean colour and its
        colour change over the group, spread as a linear ramp over the group's 4 frames (the first
        frame, a group of its own, is flat). Re-encoding the frames gives the latents back (up to
        uint8 rounding and clipping) when the latent has >= 24 channels. Narrower latents hold
        less than the 24 features of a cell: with >= 6 channels each 16x16 cell is taken as one
        colour and one change (exact for content that is uniform per cell), below 6 the
        minimum-norm guess. What cannot come back: any detail inside a sub-block (edges, texture),
        motion as displacement (a moving object becomes colours fading between blocks), and
        anything that changes within a group other than linearly.
        """
        _check_video_latents(latents, self.video_token_dim)
        t = latents.grid_thw[0]
        tokens = latents.tokens.detach().float().cpu()[None]
        cells = tokens_to_latents(tokens, latents.grid_thw, self.video_patch_size)[0]  # (C, t, p*h, p*w)
        features = torch.einsum("ctyx,cf->tfyx", cells, self._video_unprojection)  # (t, 24, ch, cw)
        ch, cw = features.shape[2:]
        # Feature c * 4 + dy * 2 + dx of cell (y, x) is channel c of sub-block (2y + dy, 2x + dx).
        blocks = features.reshape(t, _VIDEO_CHANNELS, 2, 2, ch, cw).permute(0, 1, 4, 2, 5, 3)
        blocks = blocks.reshape(t, _VIDEO_CHANNELS, 2 * ch, 2 * cw)
        mean, change = blocks[:, :3], blocks[:, 3:]
        # Group 0 is the first frame alone; each later group ramps linearly over its 4 frames, so its
        # mean is ``mean`` and its last minus first frame is ``change``.
        ramp = torch.linspace(-0.5, 0.5, VAE_TEMPORAL_FACTOR)
        groups = [mean[:1]] + [mean[g] + ramp[:, None, None, None] * change[g] for g in range(1, t)]
        frames = torch.cat(groups).permute(1, 0, 2, 3)  # (3, T, 2ch, 2cw)
        pixels = frames.repeat_interleave(_SUB_BLOCK, dim=2).repeat_interleave(_SUB_BLOCK, dim=3)
        return pixels_to_frames(pixels)

    def decode_audio(self, latents: AudioLatents, seed: int = 0) -> np.ndarray:
        """Least-squares inverse of the pooled audio encoding: noise shaped by the band energies.

        What comes back: each 40 ms hop of each ear has, in each of the 8 bands, the energy the
        latents say (flat within the band, random phases drawn from ``seed``), so re-encoding it
        gives the latents back when the latent has >= 16 dims (with 8-15, both ears get the
        least-squares common energies; below 8, the minimum-norm guess). Loudness over time and
        the coarse spectrum survive: a loud hop stays louder than a quiet one. What cannot come
        back: pitch and timbre finer than a band (a tone becomes band noise), phase, the DC
        offset, and smooth joins between hops.
        """
        _check_audio_latents(latents, self.audio_latent_dim)
        tokens = latents.tokens.shape[0]
        features = latents.tokens.detach().float().cpu() @ self._audio_unprojection  # (tokens, 2 * bands)
        energies = (10.0 ** (3.0 * features - 3.0) - 1e-6).clamp(min=0.0)
        energies = energies.reshape(tokens, 2, _AUDIO_BANDS).permute(1, 0, 2)  # (2, tokens, bands)
        magnitude = torch.zeros(2, tokens, HOP // 2 + 1)
        edges = _band_edges()
        for band, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            magnitude[..., a:b] = (energies[..., band] / (b - a)).sqrt()[..., None]
        phase = 2 * torch.pi * torch.rand(magnitude.shape, generator=torch.Generator().manual_seed(seed))
        phase[..., -1] = 0.0  # the Nyquist bin of a real signal is real
        hops = torch.fft.irfft(torch.polar(magnitude, phase), n=HOP)  # (2, tokens, HOP)
        return hops.reshape(2, tokens * HOP)[:, : latents.num_samples].contiguous().numpy()


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
    if sample.video is not None or sample.image is not None:
        # Recorded: a model of another patch or VAE width refuses them at once (data/schema.py).
        out.video_patch_size = encoder.video_patch_size
        tokens = out.video_latents if out.video_latents is not None else out.image_latents
        out.video_latent_channels = tokens.shape[1] // encoder.video_patch_size**2
    if sample.audio is not None:
        audio = encoder.encode_audio(sample.audio, sample.audio_sample_rate)
        out.audio_latents, out.audio_num_samples = audio.tokens.numpy(), audio.num_samples
        out.audio_latent_dim = out.audio_latents.shape[1]
    return out
