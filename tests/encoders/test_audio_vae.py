"""Frozen Oobleck audio VAE: local loading, 25 tokens/s, padding, channel/rate handling, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_cosmos3.encoders.audio_vae import AudioLatents, AudioVAE, resample
from megatron_cosmos3.testing.tiny_vaes import tiny_oobleck_vae

pytestmark = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")

LATENT_DIM = 4


def _save_tiny_oobleck(folder, ratios=(2, 4, 5, 6, 8), **overrides) -> None:
    """A tiny Oobleck with the real hop (ratios multiply to 1920) at 48 kHz stereo."""
    tiny_oobleck_vae(LATENT_DIM, ratios, **overrides).save_pretrained(folder)


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> AudioVAE:
    folder = tmp_path_factory.mktemp("oobleck")
    _save_tiny_oobleck(folder)
    return AudioVAE.from_pretrained(folder)


def _noise(channels: int, samples: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(channels, samples, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- loading -------------------------------------------------------------------------------------


def test_loads_saved_folder_frozen(vae):
    assert vae.token_dim == LATENT_DIM
    assert not any(p.requires_grad for p in vae.module.parameters())
    assert not any(m.training for m in vae.module.modules())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ratios=(2, 4, 4, 8, 8)), r"multiply to hop 2048; expected 1920"),
        (dict(sampling_rate=44_100), "sampling_rate=44100"),
        (dict(audio_channels=1), "audio_channels=1"),
    ],
)
def test_vae_that_is_not_48k_stereo_hop_1920_is_refused(tmp_path, overrides, message):
    _save_tiny_oobleck(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        AudioVAE.from_pretrained(tmp_path)


def test_a_crafted_size_in_the_config_is_refused_before_anything_is_allocated(tmp_path):
    """A decoder of a million channels (a few bytes of config.json) was built, terabytes, before its
    weights were found missing."""
    _save_tiny_oobleck(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "decoder_channels": 10**6}))
    with pytest.raises(ValueError, match=r"declares [\d,]+ parameters of AutoencoderOobleck .* not its weights"):
        AudioVAE.from_pretrained(tmp_path)


def test_folder_that_is_not_an_audio_vae_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        AudioVAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(ValueError, match="_class_name='AutoencoderKLWan'"):
        AudioVAE.from_pretrained(tmp_path)


# --- encode: token counts and padding -------------------------------------------------------------


@pytest.mark.parametrize(
    "samples, tokens",
    [(48_000, 25), (24_000, 13), (96_000, 50), (1920, 1), (1921, 2), (1, 1), (3 * 1920 - 1, 3)],
)
def test_token_count_is_ceil_of_samples_over_hop(vae, samples, tokens):
    latents = vae.encode(_noise(2, samples), sample_rate=48_000)
    assert isinstance(latents, AudioLatents)
    assert latents.tokens.shape == (tokens, LATENT_DIM) and latents.tokens.dtype == torch.float32
    assert latents.num_samples == samples and latents.num_tokens == tokens


def test_one_second_is_25_tokens(vae):
    latents = vae.encode(_noise(2, 48_000), sample_rate=48_000)
    assert latents.num_tokens == 25 and latents.duration_s == 1.0


def test_short_clip_is_right_padded_with_zeros(vae):
    audio = _noise(2, 24_000)
    padded = F.pad(audio, (0, 13 * 1920 - 24_000))
    assert torch.equal(vae.encode(audio, 48_000).tokens, vae.encode(padded, 48_000).tokens)


# --- wrong input: channels and sample rate ------------------------------------------------------------


def test_mono_is_duplicated_to_both_channels(vae):
    mono = _noise(1, 9600)
    assert torch.equal(vae.encode(mono, 48_000).tokens, vae.encode(mono.repeat(2, 1), 48_000).tokens)


def test_mono_44k1_is_upmixed_and_resampled_to_48k(vae):
    mono = _noise(1, 44_100)  # one second
    latents = vae.encode(mono, sample_rate=44_100)
    assert latents.num_samples == 48_000 and latents.num_tokens == 25
    expected = vae.encode(resample(mono.repeat(2, 1), 44_100, 48_000), 48_000)
    assert torch.equal(latents.tokens, expected.tokens)


def test_resample_preserves_a_tone():
    def tone(rate: int) -> torch.Tensor:  # one second of 1 kHz; phases in float64 to stay exact
        return torch.sin(2 * math.pi * 1000 * torch.arange(rate, dtype=torch.float64) / rate).float()

    out = resample(tone(44_100)[None].repeat(2, 1), 44_100, 48_000)
    assert out.shape == (2, 48_000) and out.dtype == torch.float32
    # Away from the edges, where the filter sees zeros beyond the clip; the rest is filter ripple.
    assert torch.allclose(out[:, 100:-100], tone(48_000)[100:-100].expand(2, -1), atol=2e-3)


@pytest.mark.parametrize(
    "waveform, message",
    [
        (torch.zeros(6, 1920), "6 channels"),
        (torch.zeros(1920), r"\(channels, samples\)"),
        (torch.zeros(2, 1920, dtype=torch.int16), "float waveform"),
        (torch.zeros(2, 0), "0 samples"),
    ],
)
def test_unsupported_audio_is_an_error_naming_it(vae, waveform, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(waveform, sample_rate=48_000)


# --- decode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("samples", [48_000, 24_000, 1921])
def test_decode_round_trip_shape(vae, samples):
    latents = vae.encode(_noise(2, samples), 48_000)
    assert vae.decode(latents.tokens, latents.num_samples).shape == (2, samples)
    assert vae.decode(latents.tokens).shape == (2, latents.num_tokens * 1920)


def test_all_even_strides_also_give_25_tokens_per_second(tmp_path):
    _save_tiny_oobleck(tmp_path, ratios=(4, 6, 8, 10))
    vae = AudioVAE.from_pretrained(tmp_path)
    latents = vae.encode(_noise(2, 48_000), 48_000)
    assert latents.num_tokens == 25
    assert vae.decode(latents.tokens).shape == (2, 48_000)


def test_decode_rejects_wrong_token_shape_or_length(vae):
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        vae.decode(torch.zeros(5, LATENT_DIM + 1))
    with pytest.raises(ValueError, match="num_samples=3841"):
        vae.decode(torch.zeros(2, LATENT_DIM), num_samples=3841)


# --- frozen ---------------------------------------------------------------------------------------


def test_encoding_never_builds_a_graph_into_the_vae(vae):
    audio = _noise(2, 3840).requires_grad_(True)
    tokens = vae.encode(audio, 48_000).tokens
    assert not tokens.requires_grad
    (tokens.sum() + audio.sum()).backward()
    assert all(p.grad is None for p in vae.module.parameters())
