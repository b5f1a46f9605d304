"""Frozen Wan2.2-style video VAE: local loading, token grids, normalisation, errors, frozen online use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKLWan, AutoencoderOobleck
from torch import nn

from megatron_cosmos3.encoders.video_vae import (
    VideoLatents,
    VideoVAE,
    largest_encodable_frame_count,
    latents_to_tokens,
    tokens_to_latents,
)
from megatron_cosmos3.testing.tiny_vaes import tiny_wan_vae

pytestmark = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")

Z_DIM = 4


def _tiny_wan(**overrides) -> AutoencoderKLWan:
    """Wan2.2 TI2V structure (patch_size 2 + residual blocks + 3 downsamples = 16x, 4x in time), tiny widths."""
    gen = torch.Generator().manual_seed(0)
    # Far from (0, 1) so a missing normalisation shows up in the tests.
    mean = (torch.randn(Z_DIM, generator=gen) * 3).tolist()
    std = (torch.rand(Z_DIM, generator=gen) * 2 + 0.5).tolist()
    return tiny_wan_vae(Z_DIM, latents_mean=mean, latents_std=std, **overrides)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan_vae")
    _tiny_wan().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae(wan_folder) -> VideoVAE:
    return VideoVAE.from_pretrained(wan_folder)


def _video(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _edit_config(folder, **changes) -> None:
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


# --- loading -------------------------------------------------------------------------------------


def test_loads_saved_folder_frozen_with_its_weights(wan_folder, vae):
    reference = _tiny_wan()
    assert vae.z_dim == Z_DIM and vae.token_dim == Z_DIM * 4
    for (name, loaded), (_, original) in zip(vae.module.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(loaded, original), name
    assert not any(p.requires_grad for p in vae.module.parameters())
    assert not any(m.training for m in vae.module.modules())


def test_missing_folder_or_config_is_a_clear_error(tmp_path, wan_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoVAE.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        VideoVAE.from_pretrained(tmp_path)
    shutil.copytree(wan_folder, tmp_path / "pipeline" / "vae")
    with pytest.raises(FileNotFoundError, match="pipeline folder"):
        VideoVAE.from_pretrained(tmp_path / "pipeline")


def test_folder_of_another_model_is_refused(tmp_path):
    AutoencoderOobleck(
        encoder_hidden_size=4,
        downsampling_ratios=[2],
        channel_multiples=[1],
        decoder_channels=2,
        decoder_input_channels=2,
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="_class_name='AutoencoderOobleck'"):
        VideoVAE.from_pretrained(tmp_path)


def test_missing_or_pickled_weights_are_refused(tmp_path):
    _tiny_wan().save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="weights"):
        VideoVAE.from_pretrained(tmp_path / "pickled")


def test_weights_that_do_not_fill_the_config_are_refused(tmp_path, wan_folder):
    folder = tmp_path / "vae"
    shutil.copytree(wan_folder, folder)
    _edit_config(folder, num_res_blocks=2)  # the model now has layers the checkpoint lacks
    with pytest.raises(ValueError, match="lacks"):
        VideoVAE.from_pretrained(folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(patch_size=None, scale_factor_spatial=8), "8x spatially"),
        (dict(temperal_downsample=[False, False, True]), "2x in time"),
        (dict(scale_factor_spatial=8), "scale_factor_spatial=8"),
        (dict(latents_std=[1.0, 1.0]), "latents_std"),
        # NaN statistics made every latent NaN (refused by the JSON reader, naming the field); a width
        # of a million allocated terabytes before any weight was read; a list where a number belongs
        # was a raw TypeError from diffusers' layers.
        (dict(latents_std=[float("nan")] * Z_DIM), r"config.json: latents_std\[0\]=NaN is not a finite number"),
        (dict(latents_mean=[float("inf")] * Z_DIM), r"config.json: latents_mean\[0\]=Infinity is not a finite"),
        (dict(base_dim=10**6), r"config.json' declares [\d,]+ parameters of AutoencoderKLWan .* not its weights"),
        (dict(dim_mult=4), r"config.json': not an AutoencoderKLWan config \(TypeError"),
    ],
)
def test_vae_that_is_not_wan22_shaped_is_refused(tmp_path, wan_folder, changes, message):
    folder = tmp_path / "vae"
    shutil.copytree(wan_folder, folder)
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        VideoVAE.from_pretrained(folder)


# --- encode: grids, layout, normalisation -------------------------------------------------------


@pytest.mark.parametrize(
    "thw, grid",
    [
        ((1, 32, 32), (1, 1, 1)),
        ((5, 32, 32), (2, 1, 1)),
        ((9, 32, 32), (3, 1, 1)),
        ((1, 64, 96), (1, 2, 3)),
        ((5, 64, 96), (2, 2, 3)),
    ],
)
def test_token_count_and_grid(vae, thw, grid):
    latents = vae.encode(_video(*thw), fps=24.0)
    t, h, w = grid
    assert isinstance(latents, VideoLatents)
    assert latents.grid_thw == grid and latents.num_tokens == t * h * w
    assert latents.tokens.shape == (t * h * w, Z_DIM * 4) and latents.tokens.dtype == torch.float32
    assert latents.fps == 24.0


def test_tokens_are_normalised_latents_in_documented_layout(vae):
    video = _video(5, 64, 96)
    latents = vae.encode(video, fps=30.0)
    raw = vae.module.encode(video[None]).latent_dist.mode()[0]  # (C, t, 2h, 2w)
    mean = torch.tensor(vae.module.config.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(vae.module.config.latents_std).view(-1, 1, 1, 1)
    norm = (raw - mean) / std
    _, h, w = latents.grid_thw
    for ti, hi, wi, c, dy, dx in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 1, 0), (1, 0, 1, 2, 0, 1), (0, 1, 0, 1, 1, 1)]:
        token = latents.tokens[(ti * h + hi) * w + wi]
        assert torch.allclose(token[c * 4 + dy * 2 + dx], norm[c, ti, 2 * hi + dy, 2 * wi + dx], atol=1e-5)


def test_patchify_round_trip_is_exact():
    latents = torch.randn(2, Z_DIM, 3, 4, 6)
    tokens = latents_to_tokens(latents)
    assert tokens.shape == (2, 3 * 2 * 3, Z_DIM * 4)
    assert torch.equal(tokens_to_latents(tokens, (3, 2, 3)), latents)
    # Latents of an odd height or width have no whole 2x2 patches; tokens must fit their grid.
    with pytest.raises(ValueError, match=r"latents of shape \(2, 3, 3, 5, 6\): .* multiples of 2"):
        latents_to_tokens(torch.randn(2, 3, 3, 5, 6))
    with pytest.raises(ValueError, match=r"tokens of shape \(2, 18, 16\) do not fit grid \(3, 2, 2\)"):
        tokens_to_latents(tokens, (3, 2, 2))
    with pytest.raises(ValueError, match=r"tokens of shape \(1, 4, 6\) do not fit grid \(1, 2, 2\)"):
        tokens_to_latents(torch.randn(1, 4, 6), (1, 2, 2))


@pytest.mark.parametrize("patch", [1, 2, 3, 4])
def test_patchify_round_trips_and_keeps_the_documented_layout_at_every_patch_size(patch):
    latents = torch.randn(2, Z_DIM, 3, 2 * patch, 3 * patch)
    tokens = latents_to_tokens(latents, patch)
    assert tokens.shape == (2, 3 * 2 * 3, Z_DIM * patch * patch)
    assert torch.equal(tokens_to_latents(tokens, (3, 2, 3), patch), latents)
    # Feature (c * p + dy) * p + dx of token (t, h, w) is channel c at latent cell (p*h + dy, p*w + dx):
    # an independent loop over the module doc's rule.
    for b, t, h, w, c, dy, dx in [(0, 0, 0, 0, 0, 0, 0), (1, 2, 1, 2, 3, patch - 1, 0), (0, 1, 0, 1, 2, 0, patch - 1)]:
        token = tokens[b, (t * 2 + h) * 3 + w]
        assert token[(c * patch + dy) * patch + dx] == latents[b, c, t, patch * h + dy, patch * w + dx]
    if patch > 1:  # a latent side that is not whole patches is refused, naming the size
        with pytest.raises(ValueError, match=rf"multiples of {patch} \(a token is a {patch}x{patch} patch"):
            latents_to_tokens(torch.randn(1, Z_DIM, 1, patch + 1, patch), patch)
    with pytest.raises(ValueError, match=r"video_patch_size must be a positive int, got 0"):
        latents_to_tokens(latents, 0)


@pytest.mark.parametrize("patch", [1, 4])
def test_the_vae_makes_and_decodes_tokens_of_its_patch(wan_folder, patch):
    vae = VideoVAE.from_pretrained(wan_folder, patch=patch)
    side = 16 * patch
    video = _video(5, 2 * side, 3 * side)
    latents = vae.encode(video, fps=24.0)
    assert latents.grid_thw == (2, 2, 3) and latents.tokens.shape == (12, Z_DIM * patch * patch)
    raw = vae.module.encode(video[None]).latent_dist.mode()  # (1, C, t, 2p, 3p)
    mean = torch.tensor(vae.module.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.module.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents.tokens, latents_to_tokens((raw - mean) / std, patch)[0], atol=1e-5, rtol=0)
    assert vae.decode(latents.tokens, latents.grid_thw).shape == (3, 5, 2 * side, 3 * side)
    with pytest.raises(ValueError, match=rf"video height is {side + 8}; it must be a positive multiple of {side}"):
        vae.encode(_video(1, side + 8, side), fps=24.0)


def test_image_is_a_one_frame_video_without_fps(vae):
    image = _video(1, 32, 64)[:, 0]
    as_image = vae.encode_image(image)
    as_video = vae.encode(image[:, None], fps=24.0)
    assert as_image.grid_thw == (1, 1, 2) and as_image.fps is None
    assert torch.equal(as_image.tokens, as_video.tokens)


def test_batch_encode_matches_single_clips(vae):
    clips = torch.stack([_video(5, 32, 32, seed=1), _video(5, 32, 32, seed=2)])
    batch = vae.encode_batch(clips, fps=[24.0, 30.0])
    assert [b.fps for b in batch] == [24.0, 30.0]
    for clip, latents in zip(clips, batch):
        assert torch.allclose(latents.tokens, vae.encode(clip, fps=24.0).tokens, atol=1e-5)


# --- wrong input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [2, 4, 6, 8])
def test_frame_count_not_1_plus_4k_is_an_error_naming_it(vae, frames):
    with pytest.raises(ValueError, match=rf"has {frames} frames.*1 \+ 4k"):
        vae.encode(_video(frames, 32, 32), fps=24.0)


def test_largest_encodable_frame_count_for_samplers():
    assert [largest_encodable_frame_count(n) for n in (1, 4, 5, 8, 9, 12, 121)] == [1, 1, 5, 5, 9, 9, 121]


@pytest.mark.parametrize(
    "hw, message", [((48, 32), "height is 48"), ((32, 40), "width is 40"), ((16, 16), "height is 16")]
)
def test_size_not_multiple_of_32_is_an_error_naming_it(vae, hw, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(_video(1, *hw), fps=24.0)


def test_wrong_layout_or_dtype_is_an_error(vae):
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        vae.encode(torch.zeros(3, 1, 32, 32, dtype=torch.uint8), fps=24.0)
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        vae.encode(torch.zeros(1, 3, 1, 32, 32), fps=24.0)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        vae.encode(torch.zeros(4, 1, 32, 32), fps=24.0)


# --- decode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("thw", [(1, 32, 32), (5, 64, 96), (9, 32, 32)])
def test_decode_returns_the_encoded_shape(vae, thw):
    latents = vae.encode(_video(*thw), fps=24.0)
    pixels = vae.decode(latents.tokens, latents.grid_thw)
    assert pixels.shape == (3, *thw) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_decode_rejects_tokens_that_do_not_fit_the_grid(vae):
    with pytest.raises(ValueError, match=r"do not fit grid \(2, 1, 1\)"):
        vae.decode(torch.zeros(3, Z_DIM * 4), (2, 1, 1))


# --- frozen in online training --------------------------------------------------------------------


class _OnlineGenerator(nn.Module):
    """A trained model that owns the VAE for online encoding, as a trainer would build it."""

    def __init__(self, video_vae: VideoVAE) -> None:
        super().__init__()
        self.video_vae = video_vae
        self.head = nn.Linear(video_vae.token_dim, video_vae.token_dim)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        tokens = self.video_vae.encode(video, fps=24.0).tokens
        return (self.head(tokens) - tokens).pow(2).mean()


def test_online_vae_is_outside_parameters_state_dict_and_train(vae):
    model = _OnlineGenerator(vae)
    vae_ids = {id(p) for p in vae.module.parameters()}
    assert vae_ids.isdisjoint(id(p) for p in model.parameters())
    assert set(model.state_dict()) == {"head.weight", "head.bias"}
    model.train()
    assert model.head.training and not any(m.training for m in vae.module.modules())
    model.to(torch.float64)  # the owner's cast does not reach the frozen weights
    assert vae.dtype == torch.float32


def test_online_training_step_leaves_vae_without_grads_and_bit_identical(vae):
    model = _OnlineGenerator(vae)
    before = {k: v.clone() for k, v in vae.module.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    video = _video(5, 32, 32).requires_grad_(True)

    loss = model(video)
    loss.backward()
    optimizer.step()

    assert video.grad is None  # encoding under no_grad: nothing flows back through the VAE
    assert all(p.grad is None for p in vae.module.parameters())
    assert not torch.equal(model.head.weight, head_before)
    for name, value in vae.module.state_dict().items():
        assert torch.equal(value, before[name]), name
