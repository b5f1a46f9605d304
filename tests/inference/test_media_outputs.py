"""One generated sample -> the files a person watches, hears and reads, each with a sidecar that
records how it was made; checked with readers that are not ours (ffprobe, ``wave``, Pillow)."""

from __future__ import annotations

import dataclasses
import json
import math
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder
from megatron_cosmos3.encoders.pseudo_actions import BodyPoses, EmbodimentTrajectory, encode_pseudo_actions
from megatron_cosmos3.encoders.rotations import quaternion_to_matrix
from megatron_cosmos3.inference.media_outputs import (
    GeneratedSample,
    GenerationRecord,
    integrate_actions,
    sidecar_path,
    write_generated_sample,
)
from megatron_cosmos3.testing.media_probe import ffprobe_streams

RECORD = GenerationRecord(
    task="text_to_audio_video",
    prompt="a red ball bounces twice",
    seed=7,
    solver="heun",
    steps=12,
    guidance=3.5,
    checkpoint="/runs/demo/checkpoints/step_200",
    checkpoint_step=200,
    conditioning={"image": "first_frame.png"},
    settings={"timestep_shift": 3.0},
)
SIDECAR_FIELDS = {
    "task",
    "prompt",
    "seed",
    "solver",
    "steps",
    "guidance",
    "checkpoint",
    "checkpoint_step",
    "conditioning",
    "settings",
    "decoder",
    "sample_files",
    "file",
    "media",
}


@pytest.fixture(scope="module")
def decoder() -> PooledLatentEncoder:
    return PooledLatentEncoder(8, 16)  # the tiny model's widths


def rotations_about(axis: int, angles: torch.Tensor) -> torch.Tensor:
    """(T, 3, 3) rotations by ``angles`` radians about coordinate axis ``axis``."""
    quaternions = torch.zeros(len(angles), 4, dtype=torch.float64)
    quaternions[:, axis], quaternions[:, 3] = torch.sin(angles / 2), torch.cos(angles / 2)
    return quaternion_to_matrix(quaternions)


def known_trajectory(kind: str, frames: int = 21) -> EmbodimentTrajectory:
    """A base driving a quarter circle while turning, and parts circling, tilting and closing."""
    t = torch.linspace(0, 1, frames, dtype=torch.float64)
    ego = BodyPoses(
        torch.stack([torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2), 0 * t], -1), rotations_about(2, t * 1.5)
    )
    poses, joints = {"ego": ego}, {}
    parts = {"single_arm": ["end_effector"], "humanoid": ["left_wrist", "right_wrist"]}[kind]
    for i, part in enumerate(parts):
        sign = 1 - 2 * i
        positions = torch.stack([0.5 + 0.1 * torch.cos(4 * t), sign * 0.2 + 0.1 * torch.sin(4 * t), 1.0 + 0.3 * t], -1)
        poses[part] = BodyPoses(positions, rotations_about(0, sign * t) @ rotations_about(1, 0.5 * t))
    if kind == "single_arm":
        joints["gripper"] = (0.08 * (1 - t))[:, None]
    else:
        joints = {
            f"{side}_fingers": torch.outer(t, torch.linspace(0, 1.2, 15, dtype=torch.float64))
            for side in ("left", "right")
        }
    return EmbodimentTrajectory(kind, poses, joints)


def test_a_generated_clip_with_sound_actions_and_text_becomes_files_with_sidecars(tmp_path, decoder):
    fps, frames = 12.5, 9  # 0.72 s
    clip = np.zeros((frames, 64, 96, 3), np.uint8)
    clip[..., 0] = np.linspace(30, 220, frames)[:, None, None]  # reddening over time
    seconds = frames / fps
    samples = round(seconds * 48_000)
    waveform = (0.05 * np.random.default_rng(0).standard_normal((2, samples))).astype(np.float32)
    trajectory = known_trajectory("single_arm", frames=8)
    sample = GeneratedSample(
        video=decoder.encode_video(clip, fps),
        audio=decoder.encode_audio(waveform, 48_000),
        actions=encode_pseudo_actions(trajectory).float(),
        embodiment="single_arm",
        action_rate_hz=10.0,
        text="The ball bounces.",
    )
    files = write_generated_sample(tmp_path, sample, RECORD, decoder, start=trajectory.frames(0, 1))
    names = {"video.mp4", "audio.wav", "actions.npy", "poses.npy", "joints.npy", "poses_plot.png", "text.json"}
    assert set(files) == names
    assert {p.name for p in tmp_path.iterdir()} == names | {sidecar_path(n).name for n in names}

    streams = ffprobe_streams(files["video.mp4"])
    assert int(streams["video"]["nb_read_frames"]) == frames and streams["video"]["r_frame_rate"] == "25/2"
    assert (int(streams["video"]["height"]), int(streams["video"]["width"])) == (64, 96)
    assert float(streams["video"]["duration"]) == pytest.approx(seconds, abs=1e-3)
    assert abs(float(streams["audio"]["duration"]) - float(streams["video"]["duration"])) <= 0.040
    with wave.open(str(files["audio.wav"])) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getnframes()) == (48_000, 2, samples)
    assert json.loads(files["text.json"].read_text()) == {"text": "The ball bounces."}
    assert np.load(files["actions.npy"]).shape == (7, 19)

    for name in names:
        sidecar = json.loads(sidecar_path(files[name]).read_text())
        assert set(sidecar) == SIDECAR_FIELDS, name
        assert sidecar["file"] == name and sidecar["sample_files"] == sorted(names)
        assert {k: sidecar[k] for k in ("task", "prompt", "seed", "solver", "steps", "guidance")} == {
            "task": "text_to_audio_video",
            "prompt": "a red ball bounces twice",
            "seed": 7,
            "solver": "heun",
            "steps": 12,
            "guidance": 3.5,
        }
        assert sidecar["checkpoint_step"] == 200 and sidecar["conditioning"] == {"image": "first_frame.png"}
        assert sidecar["decoder"] == "pooled" and sidecar["settings"] == {"timestep_shift": 3.0}
    video = json.loads(sidecar_path(files["video.mp4"]).read_text())["media"]
    assert video["fps"] == 12.5 and video["fps_fraction"] == "25/2" and video["frame_count"] == frames
    assert video["duration_s"] == pytest.approx(seconds) and video["audio"]["sample_rate"] == 48_000
    assert video["audio"]["duration_s"] == pytest.approx(seconds, abs=1 / 48_000)
    audio = json.loads(sidecar_path(files["audio.wav"]).read_text())["media"]
    assert (audio["sample_rate"], audio["channels"], audio["num_samples"]) == (48_000, 2, samples)
    actions = json.loads(sidecar_path(files["actions.npy"]).read_text())["media"]
    assert actions["rate_hz"] == 10.0 and actions["duration_s"] == pytest.approx(0.7)


@pytest.mark.parametrize("kind", ["single_arm", "humanoid"])
def test_saved_poses_invert_pseudo_action_extraction(tmp_path, decoder, kind):
    trajectory = known_trajectory(kind)
    actions = encode_pseudo_actions(trajectory)
    sample = GeneratedSample(actions=actions, embodiment=kind, action_rate_hz=30.0)
    files = write_generated_sample(tmp_path, sample, RECORD, decoder, start=trajectory.frames(0, 1))
    poses = np.load(files["poses.npy"])
    parts = json.loads(sidecar_path(files["poses.npy"]).read_text())["media"]["parts"]
    assert poses.shape == (21, len(parts), 4, 4)
    for index, part in enumerate(parts):
        np.testing.assert_allclose(poses[:, index, :3, 3], trajectory.poses[part].positions.numpy(), atol=1e-5)
        np.testing.assert_allclose(poses[:, index, :3, :3], trajectory.poses[part].rotations.numpy(), atol=1e-5)
        np.testing.assert_allclose(poses[:, index, 3], np.tile([0, 0, 0, 1.0], (21, 1)))
    joints = np.load(files["joints.npy"])
    expected = torch.cat(list(trajectory.joints.values()), -1).numpy()
    np.testing.assert_allclose(joints[1:], expected[1:], atol=1e-12)  # absolute joint targets, frame 0 = start
    # Control: integrating from the origin instead of the true start gives other world poses.
    from_origin = integrate_actions(actions, kind)
    assert (from_origin.poses["ego"].positions - trajectory.poses["ego"].positions).abs().max() > 0.5


def test_plots_are_pictures_of_the_data(tmp_path, decoder):
    trajectory = known_trajectory("single_arm")
    actions = encode_pseudo_actions(trajectory)
    plots = []
    for name, steps in (("a", actions), ("b", actions.flip(0))):
        files = write_generated_sample(
            tmp_path / name,
            GeneratedSample(actions=steps, embodiment="single_arm", action_rate_hz=10.0),
            RECORD,
            decoder,
        )
        with Image.open(files["poses_plot.png"]) as png:
            plots.append(np.array(png.convert("RGB")))
    assert plots[0].shape == plots[1].shape and plots[0].std() > 10  # not a blank canvas
    assert (plots[0] != plots[1]).any()  # control: other actions, another picture

    raw = np.random.default_rng(0).standard_normal((20, 7)).astype(np.float32)
    files = write_generated_sample(
        tmp_path / "raw", GeneratedSample(actions=raw, embodiment="aloha_joints", action_rate_hz=50.0), RECORD, decoder
    )
    assert set(files) == {"actions.npy", "actions_plot.png"}
    np.testing.assert_array_equal(np.load(files["actions.npy"]), raw)
    with Image.open(files["actions_plot.png"]) as png:
        assert png.size[0] > 300 and np.array(png.convert("L")).std() > 10
    assert json.loads(sidecar_path(files["actions.npy"]).read_text())["media"]["duration_s"] == pytest.approx(0.4)


def test_a_generated_image_is_a_png_of_the_decoded_picture(tmp_path, decoder):
    image = np.zeros((64, 64, 3), np.uint8)
    image[:32] = (10, 200, 90)
    latents = decoder.encode_image(image)
    files = write_generated_sample(tmp_path, GeneratedSample(video=latents), RECORD, decoder)
    assert set(files) == {"image.png"}
    with Image.open(files["image.png"]) as png:
        np.testing.assert_array_equal(np.array(png.convert("RGB")), decoder.decode_video(latents)[0])
    assert json.loads(sidecar_path(files["image.png"]).read_text())["media"] == {
        "height": 64,
        "width": 64,
        "format": "png rgb8",
    }


@pytest.mark.parametrize(
    "sample, message",
    [
        (GeneratedSample(), "sample has no video, audio, actions or text"),
        (
            GeneratedSample(actions=torch.zeros(5, 18), embodiment="single_arm", action_rate_hz=10.0),
            r"must have 19 dims, got shape \(5, 18\)",
        ),
        (
            GeneratedSample(actions=torch.zeros(5, 19), action_rate_hz=10.0),
            "actions need an embodiment name, got embodiment=None",
        ),
        (
            GeneratedSample(actions=torch.zeros(5, 19), embodiment="single_arm", action_rate_hz=0),
            "action_rate_hz must be a number > 0, got 0",
        ),
        (
            GeneratedSample(actions=torch.zeros(5, 19, dtype=torch.long), embodiment="single_arm", action_rate_hz=10.0),
            r"actions must be a float \(steps, dim\) tensor, got shape \(5, 19\), dtype torch.int64",
        ),
        (
            GeneratedSample(actions=torch.zeros(0, 19), embodiment="single_arm", action_rate_hz=10.0),
            r"actions is empty: shape \(0, 19\)",
        ),
        (GeneratedSample(text=b"bytes"), "text must be a str, got bytes"),
    ],
)
def test_bad_samples_are_a_clear_error_and_leave_no_files(tmp_path, decoder, sample, message):
    if sample.actions is not None:  # a good piece beside the bad one: nothing of it may be written either
        sample.audio = decoder.encode_audio(np.zeros((2, 4800), np.float32), 48_000)
    with pytest.raises(ValueError, match=message):
        write_generated_sample(tmp_path / "out", sample, RECORD, decoder)
    assert not (tmp_path / "out").exists()


def test_bad_video_latents_are_a_clear_error(tmp_path, decoder):
    clip = decoder.encode_video(np.zeros((5, 32, 32, 3), np.uint8), 24.0)
    still = type(clip)(clip.tokens, clip.grid_thw, None)
    with pytest.raises(
        ValueError, match=r"video.fps is None \(an image\) but video.grid_thw=\(2, 1, 1\) has 2 latent frames"
    ):
        write_generated_sample(tmp_path, GeneratedSample(video=still), RECORD, decoder)
    negative = type(clip)(clip.tokens, clip.grid_thw, -24.0)
    with pytest.raises(ValueError, match="fps must be a finite number > 0, got -24.0"):
        write_generated_sample(tmp_path, GeneratedSample(video=negative), RECORD, decoder)


def _poisoned(latents, value: float):
    """``latents`` (video or audio) with its first value replaced by ``value``."""
    tokens = latents.tokens.clone()
    tokens[0, 0] = value
    return dataclasses.replace(latents, tokens=tokens)


@pytest.mark.parametrize(
    "piece, message",
    [
        ("video", r"task 'text_to_audio_video': the generated video \(1 of \d+ values\) hold NaN or Inf"),
        ("image", r"task 'text_to_audio_video': the generated image \(1 of \d+ values\) hold NaN or Inf"),
        ("audio", r"task 'text_to_audio_video': the generated audio \(1 of \d+ values\) hold NaN or Inf"),
        ("actions", r"task 'text_to_audio_video': the generated actions \(1 of 95 values\) hold NaN or Inf"),
    ],
)
def test_non_finite_generated_pieces_are_refused_naming_them_before_any_file(tmp_path, decoder, piece, message):
    """Decoded, NaN video latents were black frames written as a clip; NaN audio failed in the middle
    of the save. Every piece, NaN or Inf, is refused before anything is written, beside good pieces."""
    clip = decoder.encode_video(np.zeros((5, 32, 32, 3), np.uint8), 24.0)
    still = decoder.encode_video(np.zeros((1, 32, 32, 3), np.uint8), 24.0)
    good = {
        "video": clip,
        "image": type(still)(still.tokens, still.grid_thw, None),
        "audio": decoder.encode_audio(np.zeros((2, 4800), np.float32), 48_000),
        "actions": torch.zeros(5, 19),
    }
    bad = dict(good)
    if piece == "actions":
        bad["actions"] = good["actions"].clone()
        bad["actions"][2, 4] = float("inf")
    else:
        bad[piece] = _poisoned(good[piece], float("nan"))

    def sample(pieces):
        video = pieces["image"] if piece == "image" else pieces["video"]
        return GeneratedSample(video, pieces["audio"], pieces["actions"], "single_arm", 10.0)

    with pytest.raises(ValueError, match=message):
        write_generated_sample(tmp_path / "out", sample(bad), RECORD, decoder)
    assert not (tmp_path / "out").exists()
    written = write_generated_sample(tmp_path / "good", sample(good), RECORD, decoder)  # control: finite, written
    assert {"audio.wav", "actions.npy", "image.png" if piece == "image" else "video.mp4"} <= set(written)
