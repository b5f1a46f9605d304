"""PSNR and SSIM: SSIM equals scikit-image's implementation, PSNR the formula; the truth scores
perfectly, uniform noise scores what the formula expects of chance, a clip one frame late scores
worse than the truth, and bad clips are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from megatron_cosmos3.evaluation.video import PSNR_MAX_DB, psnr, psnr_per_frame, ssim, ssim_per_frame


def test_ssim_and_psnr_equal_scikit_image_per_frame(world_clips):
    true = world_clips[2].frames[:4]
    rng = np.random.default_rng(0)
    noisy = np.clip(true.astype(int) + rng.integers(-30, 31, true.shape), 0, 255).astype(np.uint8)
    for predicted in (noisy, true[::-1].copy()):
        reference = [
            structural_similarity(
                predicted[t],
                true[t],
                channel_axis=-1,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=255,
            )  # fmt: skip
            for t in range(len(true))
        ]
        np.testing.assert_allclose(ssim_per_frame(predicted, true), reference, rtol=1e-9, atol=1e-12)
        psnr_reference = [peak_signal_noise_ratio(true[t], predicted[t], data_range=255) for t in range(len(true))]
        np.testing.assert_allclose(psnr_per_frame(predicted, true), psnr_reference, rtol=1e-12)


def test_truth_is_perfect_noise_is_chance_and_a_late_clip_is_worse(world_clips):
    true = np.concatenate([c.frames for c in world_clips])
    assert psnr(true, true) == PSNR_MAX_DB and ssim(true, true) == pytest.approx(1.0)

    noise = np.random.default_rng(1).integers(0, 256, true.shape, dtype=np.uint8)
    # Uniform noise U on 0..255 against x: E[(U - x)^2] = var(U) + (mean(U) - x)^2.
    expected_mse = ((256**2 - 1) / 12 + (127.5 - true.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(psnr_per_frame(noise, true), 10 * np.log10(255**2 / expected_mse), atol=0.15)
    assert abs(ssim(noise, true)) < 0.05

    late = np.concatenate([true[:1], true[:-1]])  # every frame shown one step late
    assert psnr(late, true) < PSNR_MAX_DB and ssim(late, true) < ssim(true, true)
    assert psnr(noise, true) < psnr(late, true) and ssim(noise, true) < ssim(late, true)


@pytest.mark.parametrize(
    ("predicted", "true", "message"),
    [
        (np.zeros((2, 16, 16, 3), np.float32), np.zeros((2, 16, 16, 3), np.uint8), "predicted must have dtype uint8"),
        (np.zeros((2, 16, 16, 3), np.uint8), np.zeros((2, 16, 16), np.uint8), r"true must have shape \(T, H, W, 3\)"),
        (np.zeros((0, 16, 16, 3), np.uint8), np.zeros((0, 16, 16, 3), np.uint8), "predicted is empty"),
        (
            np.zeros((2, 16, 16, 3), np.uint8),
            np.zeros((3, 16, 16, 3), np.uint8),
            r"predicted has shape \(2, 16, 16, 3\)",
        ),
        (np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8), "smaller than the SSIM window"),
    ],
)
def test_bad_clips_are_refused_by_name(predicted, true, message):
    with pytest.raises(ValueError, match=message):
        ssim(predicted, true)
