"""Frozen audio VAE: 48 kHz stereo waveform <-> 25 latent tokens per second (hop 1920).

The VAE is a diffusers ``AutoencoderOobleck`` whose ``downsampling_ratios`` multiply to 1920
(e.g. ``[2, 4, 5, 6, 8]``), ``sampling_rate`` 48000 and ``audio_channels`` 2; all three are checked
when loading. One token covers 1920 samples = 40 ms.

Conventions, shared by encode and decode:

- **Waveform**: float ``(channels, samples)``, nominally in ``[-1, 1]``.
- **Channels**: stereo ``(2, S)`` as is; mono ``(1, S)`` is duplicated to both channels (a mono
  recording is the same signal in both ears); any other channel count is a ``ValueError`` (how to
  downmix surround audio is the data pipeline's choice, not the encoder's).
- **Sample rate**: the caller states it; any rate other than 48000 is resampled to 48 kHz with a
  polyphase filter (``scipy.signal.resample_poly``, e.g. 44.1 kHz -> 48 kHz is up 160 / down 147),
  at the exact ratio where its reduced factors are at most ``MAX_POLYPHASE_FACTOR`` (every rate up
  to 64 kHz, and every common one), else at the nearest ratio whose factors are (see
  ``polyphase_factors``). It runs on CPU: resample in the data pipeline before moving audio to GPU.
- **Length**: the 48 kHz waveform is right-padded with zeros to a multiple of 1920, so a clip of
  ``S`` samples gives ``ceil(S / 1920)`` tokens (1 s -> 25, 0.5 s -> 13); ``AudioLatents.num_samples``
  keeps the true length so decode can cut the padding off again.
- **Tokens**: ``(N, latent_dim)`` float32, the posterior mean (deterministic, so online and offline
  encodings agree), not normalised: Oobleck configs carry no latent statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # diffusers takes seconds to import: only a process that loads a VAE pays for it
    from diffusers import AutoencoderOobleck

from megatron_cosmos3.encoders.frozen import (
    FrozenPretrained,
    check_declared_size,
    load_local_diffusers,
    read_diffusers_config,
)

SAMPLE_RATE = 48_000  # Hz
HOP = 1920  # samples per latent token
TOKENS_PER_SECOND = SAMPLE_RATE // HOP  # 25
CHANNELS = 2


@dataclass(frozen=True)
class AudioLatents:
    """One clip's audio latent tokens.

    tokens: (ceil(num_samples / 1920), latent_dim) float32.
    num_samples: length of the clip at 48 kHz before right-padding, in samples.
    """

    tokens: torch.Tensor
    num_samples: int

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def duration_s(self) -> float:
        return self.num_samples / SAMPLE_RATE


def num_audio_tokens(num_samples: int) -> int:
    """Tokens for ``num_samples`` samples at 48 kHz: ``ceil(num_samples / 1920)``."""
    return -(-num_samples // HOP)


# resample_poly designs a filter of 20 * max(up, down) + 1 taps: 767999 Hz -> 48 kHz reduces to
# up 48000 / down 767999, 15 M taps, ~4 s and ~0.7 GB for one second of sound. 2**16 keeps every
# rate's filter under 1.4 M taps (~0.25 s, ~0.1 GB at worst) and 47999 Hz -> 48 kHz exact.
MAX_POLYPHASE_FACTOR = 2**16
# The worst ratio error polyphase_factors leaves in the allowed rates (1 kHz to 768 kHz to 48 kHz:
# 527996 Hz -> 1/11): a clip stretched by 7.6e-6, 76 us over 10 s, 27 ms over an hour (under one
# 40 ms token). A recorder's crystal is off by 20-50 ppm, so its "767999 Hz" is no truer than this.
MAX_RATIO_ERROR = 7.6e-6


def polyphase_factors(from_rate: int, to_rate: int) -> tuple[int, int]:
    """``(up, down)`` for ``from_rate -> to_rate``: the exact reduced ratio where both factors are at
    most ``MAX_POLYPHASE_FACTOR``, else the nearest fraction whose factors are (continued fractions,
    ``Fraction.limit_denominator``), within ``MAX_RATIO_ERROR`` for rates in 1-768 kHz to 48 kHz."""
    ratio = Fraction(int(to_rate), int(from_rate))
    if max(ratio.numerator, ratio.denominator) > MAX_POLYPHASE_FACTOR:
        # Bound the larger factor, the denominator of the ratio taken at most 1; the smaller follows.
        if ratio < 1:
            ratio = ratio.limit_denominator(MAX_POLYPHASE_FACTOR)
        else:
            ratio = 1 / (1 / ratio).limit_denominator(MAX_POLYPHASE_FACTOR)
        if ratio == 0:
            raise ValueError(
                f"cannot resample {from_rate} Hz -> {to_rate} Hz: the ratio is below 1 / {MAX_POLYPHASE_FACTOR}"
            )
    return ratio.numerator, ratio.denominator


def resample(waveform: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """Polyphase resampling of ``(channels, samples)`` along the last axis; dtype/device kept.

    Output length is ``ceil(samples * to_rate / from_rate)`` (at the exact ratio, also where the
    filter runs at ``polyphase_factors``' nearest one: its last samples cut off or zero-padded).
    """
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if from_rate == to_rate:
        return waveform
    from scipy.signal import resample_poly  # seconds of import: only where audio is resampled

    up, down = polyphase_factors(from_rate, to_rate)
    out = resample_poly(waveform.detach().cpu().double().numpy(), up, down, axis=-1)
    length = -(-waveform.shape[-1] * int(to_rate) // int(from_rate))
    # Beyond the clip resample_poly assumes zeros, so a short tail is padded as it would have been.
    out = np.pad(out[..., :length], [(0, 0)] * (out.ndim - 1) + [(0, max(0, length - out.shape[-1]))])
    return torch.from_numpy(np.ascontiguousarray(out)).to(device=waveform.device, dtype=waveform.dtype)


def to_stereo_48k(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Bring a ``(channels, samples)`` clip to ``(2, samples')`` at 48 kHz (rules in module doc)."""
    if waveform.dim() != 2:
        raise ValueError(f"expected audio of shape (channels, samples), got shape {tuple(waveform.shape)}")
    if not waveform.is_floating_point():
        raise ValueError(f"expected a float waveform, got dtype {waveform.dtype}")
    channels, samples = waveform.shape
    if channels == 1:
        waveform = waveform.expand(CHANNELS, samples)
    elif channels != CHANNELS:
        raise ValueError(f"audio has {channels} channels; expected stereo (2) or mono (1)")
    if samples == 0:
        raise ValueError("audio clip has 0 samples")
    return resample(waveform, sample_rate, SAMPLE_RATE)


def _check_config(config: dict, path: str | Path) -> None:
    """Refuse an Oobleck config that is not 48 kHz stereo with hop 1920."""
    ratios = config.get("downsampling_ratios", [2, 4, 4, 8, 8])
    hop = math.prod(ratios)
    if hop != HOP:
        raise ValueError(
            f"{str(path)!r}: downsampling_ratios={ratios} multiply to hop {hop}; expected {HOP} "
            f"({TOKENS_PER_SECOND} tokens/s at {SAMPLE_RATE} Hz)"
        )
    if config.get("sampling_rate", 44100) != SAMPLE_RATE:
        raise ValueError(f"{str(path)!r}: sampling_rate={config.get('sampling_rate', 44100)}; expected {SAMPLE_RATE}")
    if config.get("audio_channels", 2) != CHANNELS:
        raise ValueError(f"{str(path)!r}: audio_channels={config.get('audio_channels')}; expected {CHANNELS}")
    # The encoder emits mean and scale stacked; the decoder consumes the mean half.
    enc, dec = config.get("encoder_hidden_size", 128), config.get("decoder_input_channels", 64)
    if enc != 2 * dec:
        raise ValueError(f"{str(path)!r}: encoder_hidden_size={enc} must be 2 * decoder_input_channels={dec}")


class AudioVAE(FrozenPretrained):
    """Frozen Oobleck audio VAE: 48 kHz stereo <-> 25 tokens/s (see module doc)."""

    def __init__(self, vae: AutoencoderOobleck) -> None:
        super().__init__(vae)
        self.token_dim: int = vae.config.decoder_input_channels

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> AudioVAE:
        """Load a local diffusers ``AutoencoderOobleck`` folder (config.json + safetensors), frozen.

        Raises FileNotFoundError for a missing folder/config/weights, ValueError for a folder of
        another class or a VAE that is not 48 kHz stereo with hop 1920.
        """
        config = read_diffusers_config(path, "AutoencoderOobleck")
        from diffusers import AutoencoderOobleck

        check_declared_size(AutoencoderOobleck, config, path)  # builds as diffusers will, allocating nothing
        _check_config(config, path)

        return cls(load_local_diffusers(AutoencoderOobleck, path, dtype=dtype, device=device))

    @torch.no_grad()
    def encode(self, waveform: torch.Tensor, sample_rate: int) -> AudioLatents:
        """Encode one ``(channels, samples)`` clip recorded at ``sample_rate`` Hz."""
        audio = to_stereo_48k(waveform, sample_rate)
        num_samples = audio.shape[-1]
        padded = num_audio_tokens(num_samples) * HOP
        audio = F.pad(audio, (0, padded - num_samples))  # zeros on the right
        x = audio.unsqueeze(0).to(device=self.device, dtype=self.dtype)
        latents = self.module.encode(x).latent_dist.mode()  # (1, latent_dim, N)
        return AudioLatents(latents[0].transpose(0, 1).float(), num_samples)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """Decode ``(N, latent_dim)`` tokens -> float32 ``(2, num_samples or N * 1920)`` at 48 kHz."""
        if tokens.dim() != 2 or tokens.shape[1] != self.token_dim:
            raise ValueError(f"expected tokens of shape (N, {self.token_dim}), got shape {tuple(tokens.shape)}")
        length = tokens.shape[0] * HOP
        if num_samples is not None and not 0 < num_samples <= length:
            raise ValueError(f"num_samples={num_samples} does not fit {tokens.shape[0]} tokens (at most {length})")
        z = tokens.transpose(0, 1).unsqueeze(0).to(device=self.device, dtype=self.dtype)
        audio = self.module.decode(z).sample[0].float()
        # Transposed convs with odd strides come out a few samples short of N * hop; pad the tail.
        audio = F.pad(audio, (0, max(0, length - audio.shape[-1])))[:, :length]
        return audio[:, : num_samples or length]
