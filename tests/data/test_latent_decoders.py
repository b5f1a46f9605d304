"""Latents -> media with the encoder that made them: the frozen VAEs' decoders (tiny random VAEs:
shapes and durations) and the pooled encoder's least-squares inverse (what it promises to bring
back comes back; what it cannot is stated, and a control shows it is really lost)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_cosmos3.data.errors import LoaderSetupError
from megatron_cosmos3.data.latent_encoders import (
    PooledLatentEncoder,
    VAELatentEncoder,
    latent_encoder_from_config,
)
from megatron_cosmos3.encoders.audio_vae import AudioLatents
from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
from megatron_cosmos3.encoders.video_vae import VideoLatents, tokens_to_latents
from megatron_cosmos3.testing.tiny_vaes import tiny_oobleck_vae, tiny_wan_vae

pytestmark = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")

VIDEO_CHANNELS, AUDIO_DIM = 4, 8  # the tiny VAEs' widths


@pytest.fixture(scope="module")
def vae_config(tmp_path_factory) -> LatentEncoderConfig:
    root = tmp_path_factory.mktemp("vaes")
    tiny_wan_vae(
        VIDEO_CHANNELS, latents_mean=[0.1] * VIDEO_CHANNELS, latents_std=[2.0] * VIDEO_CHANNELS
    ).save_pretrained(root / "video")
    tiny_oobleck_vae(AUDIO_DIM).save_pretrained(root / "audio")
    return LatentEncoderConfig(video_vae_path=str(root / "video"), audio_vae_path=str(root / "audio"), dtype="float32")


def blocky_clip(frames: int, height: int, width: int, block: int, seed: int = 0) -> np.ndarray:
    """Random colours constant over ``block x block`` squares, brightening linearly after frame 0."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 180, (height // block, width // block, 3))
    cells = colours.repeat(block, 0).repeat(block, 1)
    clip = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        clip[t] = cells + (0 if t == 0 else 12 * ((t - 1) % 4))  # a ramp within each group of 4 frames
    return clip


# --- the frozen VAEs ------------------------------------------------------------------------------


def test_vae_decoding_gives_frames_and_waveform_of_the_encoded_shape_and_duration(vae_config):
    encoder = latent_encoder_from_config(vae_config, VIDEO_CHANNELS, AUDIO_DIM, 2)
    assert isinstance(encoder, VAELatentEncoder)
    clip = blocky_clip(9, 64, 96, 16)
    latents = encoder.encode_video(clip, 12.5)
    frames = encoder.decode_video(latents)
    assert frames.dtype == np.uint8 and frames.shape == clip.shape
    image = encoder.decode_video(encoder.encode_image(clip[0]))
    assert image.shape == (1, 64, 96, 3)

    waveform = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 12_345)).astype(np.float32)  # 0.257 s
    sound = encoder.decode_audio(encoder.encode_audio(waveform, 48_000))
    assert sound.dtype == np.float32 and sound.shape == (2, 12_345)
    # 44.1 kHz in, 48 kHz out: the duration is kept.
    sound = encoder.decode_audio(encoder.encode_audio(waveform[:, :4410], 44_100))
    assert sound.shape == (2, 4800)


def test_vae_widths_that_differ_from_the_model_are_an_error_naming_both(vae_config):
    with pytest.raises(
        ValueError, match=r"encoders.video_vae_path=.* width 16; the model's video tokens have width 32"
    ):
        latent_encoder_from_config(vae_config, 8, AUDIO_DIM, 2)


def test_decoding_without_the_vae_is_an_error_naming_the_config_field():
    encoder = VAELatentEncoder()
    with pytest.raises(LoaderSetupError, match=r"decoding audio latents needs it .*data.encoders.audio_vae_path"):
        encoder.decode_audio(AudioLatents(torch.zeros(2, AUDIO_DIM), 3000))


# --- the pooled stand-in's inverse ----------------------------------------------------------------


@pytest.mark.parametrize("channels", [8, 32])  # the tiny model's (narrower than a cell's 24 features) and wider
@pytest.mark.parametrize("patch", [1, 2, 4])
def test_pooled_flat_colour_clip_comes_back_its_colour(channels, patch):
    encoder = latent_encoder_from_config(LatentEncoderConfig(kind="pooled"), channels, 16, patch)
    assert isinstance(encoder, PooledLatentEncoder)
    clip = np.empty((9, 64, 128, 3), np.uint8)
    clip[...] = (200, 50, 120)
    latents = encoder.encode_video(clip, 24.0)
    assert latents.grid_thw == (3, 4 // patch, 8 // patch) and latents.tokens.shape[1] == channels * patch**2
    frames = encoder.decode_video(latents)
    assert frames.shape == clip.shape
    assert np.abs(frames.astype(int) - clip).max() <= 1
    # The same cells whatever the patch: the patch only groups them into tokens.
    reference = PooledLatentEncoder(channels, 16, 0, 1).encode_video(clip, 24.0)
    cells = tokens_to_latents(latents.tokens[None], latents.grid_thw, patch)
    assert torch.equal(cells, tokens_to_latents(reference.tokens[None], reference.grid_thw, 1))
    # A picture smaller than one token of this patch is refused, naming both.
    with pytest.raises(ValueError, match=rf"smaller than one video token \({16 * patch}x{16 * patch} pixels"):
        encoder.encode_image(np.zeros((16 * patch - 8, 64, 3), np.uint8))


def test_the_vae_encoder_makes_and_decodes_tokens_of_the_models_patch(vae_config):
    encoder = latent_encoder_from_config(vae_config, VIDEO_CHANNELS, AUDIO_DIM, 1)
    assert encoder.video_patch_size == 1 and encoder.video_token_dim == VIDEO_CHANNELS
    latents = encoder.encode_video(blocky_clip(5, 48, 32, 16), 12.5)
    assert latents.grid_thw == (2, 3, 2) and encoder.decode_video(latents).shape == (5, 48, 32, 3)


def test_pooled_video_inverse_is_exact_for_what_it_keeps_and_loses_the_rest():
    encoder = PooledLatentEncoder(32, 16)  # 32 >= 24 channels: every feature is kept
    blocky = blocky_clip(9, 64, 64, 8)  # uniform 8x8 blocks, colour ramping linearly in each group
    latents = encoder.encode_video(blocky, 12.5)
    frames = encoder.decode_video(latents)
    assert np.abs(frames.astype(int) - blocky).max() <= 1
    torch.testing.assert_close(encoder.encode_video(frames, 12.5).tokens, latents.tokens, atol=0.05, rtol=0)
    # Control: detail inside a block cannot come back, only each 8x8 block's mean.
    rng = np.random.default_rng(1)
    detailed = np.clip(blocky.astype(int) + rng.integers(-30, 31, blocky.shape), 0, 255).astype(np.uint8)
    frames = encoder.decode_video(encoder.encode_video(detailed, 12.5))
    assert np.abs(frames.astype(int) - detailed).mean() > 10
    block_means = detailed.reshape(9, 8, 8, 8, 8, 3).mean((2, 4))
    assert np.abs(frames.reshape(9, 8, 8, 8, 8, 3).mean((2, 4)) - block_means)[0].max() <= 1.0


def test_pooled_narrow_latents_keep_each_cells_colour():
    encoder = PooledLatentEncoder(8, 16)  # 8 channels: one colour and one change per 16x16 cell
    clip = blocky_clip(5, 64, 64, 16, seed=3)
    frames = encoder.decode_video(encoder.encode_video(clip, 24.0))
    assert np.abs(frames.astype(int) - clip).max() <= 1
    # Control: 8x8 detail is beyond 8 channels.
    finer = blocky_clip(5, 64, 64, 8, seed=3)
    assert np.abs(encoder.decode_video(encoder.encode_video(finer, 24.0)).astype(int) - finer).mean() > 10


def test_pooled_audio_keeps_loudness_over_time_and_its_band_energies():
    encoder = PooledLatentEncoder(8, 16)
    rng = np.random.default_rng(0)
    waveform = (0.01 * rng.standard_normal((2, 9600))).astype(np.float32)  # 5 hops
    waveform[:, 3840:5760] *= 30  # hop 2 loud
    latents = encoder.encode_audio(waveform, 48_000)
    sound = encoder.decode_audio(latents)
    assert sound.shape == (2, 9600) and sound.dtype == np.float32
    rms = np.sqrt((sound.reshape(2, 5, 1920) ** 2).mean((0, 2)))
    assert rms[2] > 10 * np.delete(rms, 2).max()
    # Re-encoding gives the same latents (16 dims hold all 16 band energies), whatever the phases.
    torch.testing.assert_close(encoder.encode_audio(sound, 48_000).tokens, latents.tokens, atol=1e-4, rtol=0)
    other = encoder.decode_audio(latents, seed=1)
    assert not np.allclose(other, sound)
    torch.testing.assert_close(encoder.encode_audio(other, 48_000).tokens, latents.tokens, atol=1e-4, rtol=0)
    # Control: a tone comes back as band noise, not as the tone.
    t = np.arange(9600) / 48_000
    tone = np.stack([0.5 * np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32)
    assert np.corrcoef(encoder.decode_audio(encoder.encode_audio(tone, 48_000))[0], tone[0])[0, 1] < 0.5


def test_pooled_decoding_of_ill_shaped_latents_is_an_error_naming_the_field():
    encoder = PooledLatentEncoder(8, 16)
    with pytest.raises(ValueError, match=r"tokens of shape \(5, 32\) do not fit grid_thw=\(2, 2, 2\)"):
        encoder.decode_video(VideoLatents(torch.zeros(5, 32), (2, 2, 2), 24.0))
    with pytest.raises(ValueError, match=r"num_samples=5000 does not fit 2 tokens"):
        encoder.decode_audio(AudioLatents(torch.zeros(2, 16), 5000))
    with pytest.raises(ValueError, match=r"audio latents tokens must have shape \(N >= 1, 16\), got \(2, 8\)"):
        encoder.decode_audio(AudioLatents(torch.zeros(2, 8), 100))
