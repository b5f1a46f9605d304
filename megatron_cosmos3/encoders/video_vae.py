"""Frozen Wan2.2-style video VAE: pixels <-> normalised latent tokens of ``16p x 16p`` pixels each.

The VAE (diffusers ``AutoencoderKLWan``, as in Wan2.2 TI2V: ``patch_size=2``, residual blocks,
``z_dim=48``) compresses 4x in time and 16x16 in space. Its latent is then patchified ``p x p``
(the token patch: the model config's ``video_patch_size``, 2 by default as in Wan2.2), so one token
covers 4 frames x 16p x 16p pixels (32 x 32 at p = 2) and has ``z_dim * p**2`` features (192 for
Wan2.2 at p = 2). Every function and class below takes ``p``; the model config is its one source.

Conventions, shared by encode and decode:

- **Pixels**: float, channels first, ``(3, T, H, W)`` for one clip, values in ``[-1, 1]``.
  An image is a one-frame video ``(3, H, W)`` -> ``T = 1``.
- **Frames**: Wan encodes the first frame alone and every later group of 4 frames together, so a
  clip must have ``T = 1 + 4k`` frames and gives ``1 + k`` latent frames. Other counts are a
  ``ValueError`` (the VAE itself would silently drop the trailing frames): choosing *which* frames
  to keep is the clip sampler's job; ``largest_encodable_frame_count`` tells it how many.
- **Size**: ``H`` and ``W`` must be multiples of ``16p`` (``ValueError`` otherwise); resizing or
  cropping is the data transform's job, not the encoder's.
- **Tokens**: ``(N, z_dim * p**2)`` with ``N = t * h * w`` and token grid ``(t, h, w) =
  (1 + (T - 1) / 4, H / 16p, W / 16p)``, flattened row-major over ``(t, h, w)``. Feature index
  ``(c * p + dy) * p + dx`` holds latent channel ``c`` at sub-position ``(dy, dx)`` of the patch.
- **Normalisation**: tokens are normalised latents ``(z - latents_mean[c]) / latents_std[c]`` with
  the per-channel statistics from the checkpoint's config, so they are near unit scale for flow
  matching. Encoding takes the posterior mean (deterministic, so online and offline encoding of
  the same clip agree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # diffusers takes seconds to import: only a process that loads a VAE pays for it
    from diffusers import AutoencoderKLWan

from megatron_cosmos3.encoders.frozen import (
    FrozenPretrained,
    check_declared_size,
    load_local_diffusers,
    read_diffusers_config,
)

VAE_TEMPORAL_FACTOR = 4  # frames per latent frame (after the first)
VAE_SPATIAL_FACTOR = 16  # pixels per latent cell, each side
# Latent cells per token, each side, where no model config says (Wan2.2's; the tools' default).
TOKEN_PATCH = 2


def pixels_per_token(patch: int) -> int:
    """Pixels per video token, each side, for a token patch of ``patch`` latent cells (32 at 2)."""
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"video_patch_size must be a positive int, got {patch!r}")
    return VAE_SPATIAL_FACTOR * patch


@dataclass(frozen=True)
class VideoLatents:
    """One clip's latent tokens.

    tokens: (t * h * w, z_dim * p**2) float32 normalised latents, row-major over the grid.
    grid_thw: token grid (t, h, w).
    fps: frame rate of the source clip in frames per second; ``None`` for a still image.
    """

    tokens: torch.Tensor
    grid_thw: tuple[int, int, int]
    fps: float | None

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


def num_latent_frames(num_frames: int) -> int:
    """Latent frames for a clip of ``num_frames`` pixel frames; ValueError unless ``1 + 4k``."""
    if num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL_FACTOR != 0:
        hint = ""
        if num_frames > 1:
            hint = f" (crop to {largest_encodable_frame_count(num_frames)})"
        raise ValueError(
            f"video has {num_frames} frames; the VAE encodes 1 + {VAE_TEMPORAL_FACTOR}k frames (1, 5, 9, 13, ...){hint}"
        )
    return 1 + (num_frames - 1) // VAE_TEMPORAL_FACTOR


def encoded_frame_count(latent_frames: int) -> int:
    """Pixel frames behind ``latent_frames`` latent frames: ``1 + 4(t - 1)`` (the inverse of
    ``num_latent_frames``); at ``fps`` they last ``encoded_frame_count(t) / fps`` seconds."""
    if latent_frames < 1:
        raise ValueError(f"a clip has at least 1 latent frame, got {latent_frames}")
    return 1 + VAE_TEMPORAL_FACTOR * (latent_frames - 1)


def largest_encodable_frame_count(num_frames: int) -> int:
    """The largest ``1 + 4k`` not above ``num_frames`` (>= 1): how many frames a sampler may keep."""
    if num_frames < 1:
        raise ValueError(f"a clip needs at least 1 frame, got {num_frames}")
    return 1 + (num_frames - 1) // VAE_TEMPORAL_FACTOR * VAE_TEMPORAL_FACTOR


def token_grid(num_frames: int, height: int, width: int, patch: int = TOKEN_PATCH) -> tuple[int, int, int]:
    """Token grid (t, h, w) of a ``(3, num_frames, height, width)`` clip cut into tokens of ``patch``
    latent cells; ValueError if not encodable."""
    side = pixels_per_token(patch)
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % side != 0:
            raise ValueError(
                f"video {name} is {size}; it must be a positive multiple of {side} (video_patch_size={patch})"
            )
    return num_latent_frames(num_frames), height // side, width // side


def latents_to_tokens(latents: torch.Tensor, patch: int = TOKEN_PATCH) -> torch.Tensor:
    """(B, C, t, p*h, p*w) latents -> (B, t*h*w, C*p*p) tokens (p x p patchify, layout in module doc).
    ValueError naming the shape when the latent height or width is not a multiple of p."""
    pixels_per_token(patch)  # checks patch
    if latents.dim() != 5 or latents.shape[3] % patch or latents.shape[4] % patch:
        raise ValueError(
            f"latents of shape {tuple(latents.shape)}: expected (B, C, t, H, W) with H and W multiples of "
            f"{patch} (a token is a {patch}x{patch} patch of latents)"
        )
    b, c, t, hh, ww = latents.shape
    h, w = hh // patch, ww // patch
    x = latents.reshape(b, c, t, h, patch, w, patch)
    x = x.permute(0, 2, 3, 5, 1, 4, 6)  # b, t, h, w, c, dy, dx
    return x.reshape(b, t * h * w, c * patch * patch)


def tokens_to_latents(tokens: torch.Tensor, grid_thw: tuple[int, int, int], patch: int = TOKEN_PATCH) -> torch.Tensor:
    """(B, t*h*w, C*p*p) tokens -> (B, C, t, p*h, p*w) latents; exact inverse of ``latents_to_tokens``.
    ValueError naming the shapes when the tokens do not fit the grid or are not C*p*p wide."""
    pixels_per_token(patch)
    t, h, w = grid_thw
    if tokens.dim() != 3 or tokens.shape[1] != t * h * w or tokens.shape[2] % patch**2:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not fit grid {tuple(grid_thw)}: expected "
            f"(B, {t * h * w}, C*{patch**2}) (video_patch_size={patch})"
        )
    b, n, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.reshape(b, t, h, w, c, patch, patch)
    x = x.permute(0, 4, 1, 2, 5, 3, 6)  # b, c, t, h, dy, w, dx
    return x.reshape(b, c, t, h * patch, w * patch)


def _check_architecture(config: dict, path: str | Path) -> None:
    """Refuse a Wan VAE whose structure does not compress 4x in time and 16x16 in space."""
    levels = len(config.get("dim_mult", [1, 2, 4, 4]))
    # One 2x spatial downsample between consecutive levels, some of them also 2x in time
    # (see WanEncoder3d); a patch_size pixel-unshuffle comes before the encoder.
    spatial = (config.get("patch_size") or 1) * 2 ** (levels - 1)
    temporal = 2 ** sum(bool(x) for x in config.get("temperal_downsample", [False, True, True])[: levels - 1])
    if spatial != VAE_SPATIAL_FACTOR:
        raise ValueError(
            f"{str(path)!r}: VAE compresses {spatial}x spatially (patch_size={config.get('patch_size')}, "
            f"{levels} dim_mult levels); expected {VAE_SPATIAL_FACTOR}x as in Wan2.2"
        )
    if temporal != VAE_TEMPORAL_FACTOR:
        raise ValueError(
            f"{str(path)!r}: VAE compresses {temporal}x in time (temperal_downsample="
            f"{config.get('temperal_downsample')}); expected {VAE_TEMPORAL_FACTOR}x"
        )
    # The config's declared factors are what diffusers pipelines trust; they must agree.
    for field, expected in (("scale_factor_spatial", spatial), ("scale_factor_temporal", temporal)):
        if field in config and config[field] != expected:
            raise ValueError(f"{str(path)!r}: config {field}={config[field]} but the architecture gives {expected}")
    z_dim = config.get("z_dim", 16)
    for field in ("latents_mean", "latents_std"):
        values = config.get(field)
        # NaN or inf (json takes them) would make every latent NaN, in training data and generation alike
        finite = isinstance(values, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        )
        if not finite or len(values) != z_dim:
            raise ValueError(f"{str(path)!r}: config {field} must list z_dim={z_dim} finite numbers, got {values!r}")
    if any(s <= 0 for s in config["latents_std"]):
        raise ValueError(f"{str(path)!r}: config latents_std must be positive, got {config['latents_std']}")


class VideoVAE(FrozenPretrained):
    """Frozen Wan2.2-style video VAE producing tokens of ``patch x patch`` latent cells (module doc)."""

    def __init__(self, vae: AutoencoderKLWan, patch: int = TOKEN_PATCH) -> None:
        super().__init__(vae)
        self.patch = patch
        self.pixels_per_token = pixels_per_token(patch)
        config = vae.config
        # (1, C, 1, 1, 1) to broadcast over (B, C, t, h, w) latents; kept float32 on CPU and moved
        # per call, so they follow the VAE wherever FrozenPretrained.to puts it.
        self._mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.z_dim: int = config.z_dim
        self.token_dim: int = config.z_dim * patch * patch

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        patch: int = TOKEN_PATCH,
    ) -> VideoVAE:
        """Load a local diffusers ``AutoencoderKLWan`` folder (config.json + safetensors), frozen,
        making tokens of ``patch x patch`` latent cells.

        Raises FileNotFoundError for a missing folder/config/weights, ValueError for a folder of
        another class or a VAE that is not 4x temporal / 16x spatial with per-channel statistics.
        """
        config = read_diffusers_config(path, "AutoencoderKLWan")
        from diffusers import AutoencoderKLWan

        check_declared_size(AutoencoderKLWan, config, path)  # builds as diffusers will, allocating nothing
        _check_architecture(config, path)

        return cls(load_local_diffusers(AutoencoderKLWan, path, dtype=dtype, device=device), patch)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, fps: float) -> VideoLatents:
        """Encode one clip ``(3, T, H, W)`` in [-1, 1] (T = 1 + 4k, H, W multiples of ``pixels_per_token``)."""
        if video.dim() != 4:
            raise ValueError(f"expected one clip of shape (3, T, H, W), got shape {tuple(video.shape)}")
        return self.encode_batch(video.unsqueeze(0), fps)[0]

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> VideoLatents:
        """Encode one image ``(3, H, W)`` in [-1, 1] as a one-frame video; ``fps`` is None."""
        if image.dim() != 3:
            raise ValueError(f"expected one image of shape (3, H, W), got shape {tuple(image.shape)}")
        latents = self.encode_batch(image.unsqueeze(0).unsqueeze(2), 0.0)[0]
        return VideoLatents(latents.tokens, latents.grid_thw, fps=None)

    @torch.no_grad()
    def encode_batch(self, videos: torch.Tensor, fps: float | Sequence[float]) -> list[VideoLatents]:
        """Encode ``(B, 3, T, H, W)`` same-shape clips in one VAE call; one ``VideoLatents`` each.

        ``fps`` is one rate for all clips or one per clip.
        """
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"expected clips of shape (B, 3, T, H, W), got shape {tuple(videos.shape)}")
        if not videos.is_floating_point():
            raise ValueError(f"expected float pixels in [-1, 1], got dtype {videos.dtype}")
        batch = videos.shape[0]
        rates = [float(fps)] * batch if isinstance(fps, (int, float)) else [float(r) for r in fps]
        if len(rates) != batch:
            raise ValueError(f"got {len(rates)} fps values for {batch} clips")
        grid = token_grid(*videos.shape[2:], self.patch)

        vae = self.module
        x = videos.to(device=self.device, dtype=self.dtype)
        latents = vae.encode(x).latent_dist.mode().float()
        latents = (latents - self._mean.to(latents.device)) / self._std.to(latents.device)
        tokens = latents_to_tokens(latents, self.patch)
        return [VideoLatents(tokens[i], grid, rate) for i, rate in enumerate(rates)]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """Decode ``(t*h*w, token_dim)`` tokens on grid ``(t, h, w)`` -> ``(3, 1 + 4(t-1), 16p h, 16p w)``.

        Returns float32 pixels in [-1, 1].
        """
        t, h, w = grid_thw
        if tokens.dim() != 2 or tokens.shape != (t * h * w, self.token_dim):
            raise ValueError(
                f"tokens of shape {tuple(tokens.shape)} do not fit grid {tuple(grid_thw)}: "
                f"expected ({t * h * w}, {self.token_dim})"
            )
        latents = tokens.unsqueeze(0).to(device=self.device, dtype=torch.float32)
        latents = tokens_to_latents(latents, grid_thw, self.patch)
        latents = latents * self._std.to(latents.device) + self._mean.to(latents.device)
        return self.module.decode(latents.to(self.dtype)).sample[0].float()
