"""Frame fidelity of a predicted clip against the true one: PSNR and SSIM (docs/DESIGN.md,
"Evaluation"). Both take ``(T, H, W, 3)`` uint8 clips of one shape and average over frames."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from megatron_cosmos3.data.media_writers import check_frames

# Identical frames have MSE 0 and an infinite PSNR; JSON and MLflow want a number. 100 dB is an
# MSE of 1e-10 * 255^2, far below one uint8 step, so no imperfect clip reaches it.
PSNR_MAX_DB = 100.0
# Wang et al. 2004: an 11-tap Gaussian window of sigma 1.5 (truncated at 3.5 sigma), K1, K2.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_MIN_SIDE = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1  # the window: 11 pixels


def check_clip_pair(predicted: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as ``(T, H, W, 3)`` uint8 of one shape; ValueError naming the field otherwise."""
    check_frames(predicted, "predicted")
    check_frames(true, "true")
    if predicted.shape != true.shape:
        raise ValueError(f"predicted has shape {predicted.shape} but true has shape {true.shape}; they must match")
    return predicted, true


def psnr_per_frame(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(T,) PSNR in dB of each frame (peak 255), capped at ``PSNR_MAX_DB`` for identical frames."""
    predicted, true = check_clip_pair(predicted, true)
    mse = ((predicted.astype(np.float64) - true.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(255.0**2 / mse)
    return np.minimum(db, PSNR_MAX_DB)


def psnr(predicted: np.ndarray, true: np.ndarray) -> float:
    """Mean over frames of each frame's PSNR (dB)."""
    return float(psnr_per_frame(predicted, true).mean())


def ssim_per_frame(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(T,) SSIM of each frame: the Gaussian-window SSIM of Wang et al. (2004) per colour channel
    (population statistics, dynamic range 255), the mean over pixels at least half a window from
    the border, then over channels. 1 for identical frames, about 0 for unrelated ones."""
    predicted, true = check_clip_pair(predicted, true)
    side = min(true.shape[1:3])
    if side < SSIM_MIN_SIDE:
        raise ValueError(f"true frames of shape {true.shape[1:3]} are smaller than the SSIM window ({SSIM_MIN_SIDE})")
    x, y = predicted.astype(np.float64), true.astype(np.float64)
    # Blur over rows and columns only: frames and channels stay separate.
    blur = lambda a: gaussian_filter(a, sigma=(0, SSIM_SIGMA, SSIM_SIGMA, 0), truncate=SSIM_TRUNCATE, mode="reflect")  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = (SSIM_MIN_SIDE - 1) // 2
    return ssim_map[:, pad:-pad, pad:-pad].mean(axis=(1, 2, 3))


def ssim(predicted: np.ndarray, true: np.ndarray) -> float:
    """Mean over frames of each frame's SSIM."""
    return float(ssim_per_frame(predicted, true).mean())
