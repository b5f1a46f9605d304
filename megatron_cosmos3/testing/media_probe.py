"""Reading media back with tools that are not ours: the ffprobe and ffmpeg command-line programs
(Debian's ffmpeg package, installed by launch/setup_env.sh), for tests of the media writers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # a failure, not a skip: the tests that use it are the only check of our mp4 files
        raise RuntimeError(f"{name} is not installed; launch/setup_env.sh installs Debian's ffmpeg package")
    return path


def ffprobe_streams(path: str | Path) -> dict[str, dict]:
    """Stream facts by codec type ("video", "audio"), frames counted by decoding (``nb_read_frames``),
    not taken from the container's header."""
    out = subprocess.run(
        [_tool("ffprobe"), "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {s["codec_type"]: s for s in json.loads(out)["streams"]}


def ffmpeg_frames(path: str | Path, height: int, width: int) -> np.ndarray:
    """Every decoded video frame as (T, H, W, 3) uint8 RGB."""
    raw = subprocess.run(
        [_tool("ffmpeg"), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 arrays, in dB."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))
