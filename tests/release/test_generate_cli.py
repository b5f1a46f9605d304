"""``cosmos3-generate`` end to end on a tiny checkpoint trained under TP=2 on every task: each mode's
files with the right shape, duration, frame rate and sample rate (read back with ffprobe/ffmpeg and
``wave``), the same outputs from one process and from torchrun with TP=2, ``--help`` and the named
errors."""

import json
import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from megatron_cosmos3.data.media_writers import write_mp4, write_png, write_wav
from megatron_cosmos3.inference.requests import GenerationRequest, required_inputs
from megatron_cosmos3.release.generate_cli import RequestError, main, read_input, read_requests, run_requests
from megatron_cosmos3.release.trained import load_trained_model
from megatron_cosmos3.tasks.registry import TASK_REGISTRY
from megatron_cosmos3.testing.media_probe import ffmpeg_frames, ffprobe_streams
from megatron_cosmos3.testing.numerics import child_environment
from megatron_cosmos3.testing.training import launch_environment

pytestmark = pytest.mark.multiprocess

FPS = 8.0
HEIGHT, WIDTH = 64, 32
ARM_DIM, ARM_RATE = 19, 10.0


@pytest.fixture(scope="module")
def checkpoint(tiny_tp2_checkpoint) -> Path:
    """The tiny model trained one step under TP=2 on random packs of every task, pooled latents."""
    return tiny_tp2_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Conditioning files: a picture, a 9-frame clip at 8 fps (mp4), a sound, single-arm actions."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (9, HEIGHT, WIDTH, 3), dtype=np.uint8)
    write_png(folder / "first.png", frames[0])
    write_mp4(folder / "clip.mp4", frames, FPS)
    write_wav(folder / "sound.wav", 0.1 * rng.standard_normal((1, 22050)).astype(np.float32), 44100)
    np.save(folder / "arm.npy", rng.normal(size=(26, ARM_DIM)).astype(np.float32))  # the 21-frame clip at 8 fps
    return folder


REQUESTS = [
    {"task": "text_to_image", "prompt": "a red ball", "resolution": [HEIGHT, WIDTH]},
    {"task": "text_to_video", "prompt": "a red ball rolls", "duration_s": 1.0, "fps": FPS, "resolution": "64x32"},
    {"task": "image_to_video", "prompt": "it rolls on", "image": "first.png", "duration_s": 1.0, "fps": FPS},
    {"task": "video_to_audio", "prompt": "the sound of it", "video": "clip.mp4"},
    {
        "task": "text_to_audio_video",
        "prompt": "two balls collide",
        "duration_s": 1.0,
        "fps": FPS,
        "resolution": [HEIGHT, WIDTH],
        "solver": "heun",
        "guidance": 2.0,
        "steps": 3,
    },
    {
        "task": "forward_dynamics",
        "prompt": "push",
        "video": "clip.mp4",
        "actions": "arm.npy",
        "embodiment": "single_arm",
    },
    {"task": "inverse_dynamics", "prompt": "push", "video": "clip.mp4", "embodiment": "single_arm"},
    {"task": "policy", "prompt": "push the ball", "image": "first.png", "embodiment": "single_arm", "duration_s": 1.0},
    {
        "task": "policy_with_future",
        "prompt": "push the ball",
        "image": "first.png",
        "embodiment": "single_arm",
        "duration_s": 1.0,
        "fps": FPS,
        "seed": 3,
    },
    {"task": "understanding", "prompt": "what moves?", "image": "first.png", "max_new_tokens": 5},
]


def write_requests(folder: Path, requests: list[dict]) -> Path:
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return path


def video_facts(path: Path) -> tuple[int, float, tuple[int, int]]:
    video = ffprobe_streams(path)["video"]
    num, den = (int(x) for x in video["r_frame_rate"].split("/"))
    return int(video["nb_read_frames"]), num / den, (int(video["height"]), int(video["width"]))


def wav_facts(path: Path) -> tuple[int, int, float]:
    with wave.open(str(path)) as w:
        return w.getframerate(), w.getnchannels(), w.getnframes() / w.getframerate()


@pytest.fixture(scope="module")
def generated(checkpoint, inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    argv = ["--checkpoint", str(checkpoint), "--requests", str(write_requests(inputs, REQUESTS)), "--out", str(out)]
    assert main(argv) == 0
    return out


def test_every_mode_writes_media_of_the_right_shape_duration_and_rate(generated, checkpoint, inputs):
    folders = {p.name for p in generated.iterdir()}
    assert folders == {f"{i:03d}_{r['task']}" for i, r in enumerate(REQUESTS)}
    out = {r["task"]: generated / f"{i:03d}_{r['task']}" for i, r in enumerate(REQUESTS)}
    step_folder = checkpoint / "step_00000001"

    from PIL import Image

    assert np.asarray(Image.open(out["text_to_image"] / "image.png")).shape == (HEIGHT, WIDTH, 3)
    # 1 s at 8 fps: 1 + 4k frames nearest 8 -> 9; the conditioning clip has 9 frames.
    for task in ("text_to_video", "image_to_video", "video_to_audio", "text_to_audio_video", "policy_with_future"):
        frames, fps, size = video_facts(out[task] / "video.mp4")
        assert (frames, size) == (9, (HEIGHT, WIDTH)) and fps == pytest.approx(FPS), task
        assert len(ffmpeg_frames(out[task] / "video.mp4", HEIGHT, WIDTH)) == 9, task  # decodes back
    # Audio where it is generated: 48 kHz stereo, as long as the clip (9 / 8 s) within one latent (40 ms).
    for task in ("video_to_audio", "text_to_audio_video"):
        rate, channels, seconds = wav_facts(out[task] / "audio.wav")
        assert (rate, channels) == (48000, 2) and seconds == pytest.approx(9 / FPS, abs=0.04), task
        muxed = ffprobe_streams(out[task] / "video.mp4")["audio"]
        assert float(muxed["duration"]) == pytest.approx(9 / FPS, abs=0.04), task
    # The arm's steps that start in the clip (training's count); integrated poses and their plot. policy:
    # 1 s at the default 24 fps is 25 frames, 10.42 steps; the others 9 frames at 8 fps, 11.25 steps.
    for task, steps in (("policy", 11), ("policy_with_future", 12), ("inverse_dynamics", 12)):
        actions = np.load(out[task] / "actions.npy")
        assert actions.shape == (steps, ARM_DIM) and np.isfinite(actions).all(), task
        assert np.load(out[task] / "poses.npy").shape[0] == steps + 1
        assert (out[task] / "poses_plot.png").stat().st_size > 0
    text = json.loads((out["understanding"] / "text.json").read_text())
    assert isinstance(text["text"], str)
    # Sidecars say how each was made.
    meta = json.loads((out["text_to_audio_video"] / "video.meta.json").read_text())
    assert (meta["task"], meta["solver"], meta["steps"], meta["guidance"]) == ("text_to_audio_video", "heun", 3, 2.0)
    assert meta["checkpoint"] == str(step_folder) and meta["checkpoint_step"] == 1
    assert json.loads((out["policy"] / "actions.meta.json").read_text())["conditioning"] == {
        "image": str(inputs / "first.png")
    }


@pytest.mark.slow
def test_tensor_parallel_under_torchrun_equals_one_process(generated, checkpoint, inputs, tmp_path):
    """The checkpoint saved under TP=2 and loaded in one process (the ``generated`` fixture) gives
    what two torchrun ranks give with TP=2."""
    chosen = [r for r in REQUESTS if r["task"] in ("text_to_audio_video", "policy", "understanding")]
    names = {r["task"]: f"{REQUESTS.index(r):03d}_{r['task']}" for r in chosen}
    lines = [{**r, "name": names[r["task"]]} for r in chosen]
    requests = write_requests(tmp_path, lines)
    for name in ("first.png",):
        (tmp_path / name).write_bytes((inputs / name).read_bytes())
    out = tmp_path / "tp2"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "megatron_cosmos3.release.generate_cli", "--tensor-parallel", "2"]
    command += ["--checkpoint", str(checkpoint), "--requests", str(requests), "--out", str(out)]
    env = launch_environment(tmp_path, child_environment())
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = {task: generated / name for task, name in names.items()}
    two = {task: out / name for task, name in names.items()}
    np.testing.assert_allclose(
        np.load(two["policy"] / "actions.npy"), np.load(one["policy"] / "actions.npy"), rtol=1e-4, atol=1e-5
    )
    a, b = (
        ffmpeg_frames(two["text_to_audio_video"] / "video.mp4", HEIGHT, WIDTH),
        ffmpeg_frames(one["text_to_audio_video"] / "video.mp4", HEIGHT, WIDTH),
    )
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 2
    rate_a, _, len_a = wav_facts(two["text_to_audio_video"] / "audio.wav")
    assert (rate_a, len_a) == wav_facts(one["text_to_audio_video"] / "audio.wav")[::2]
    assert json.loads((two["understanding"] / "text.json").read_text()) == json.loads(
        (one["understanding"] / "text.json").read_text()
    )


def test_help_lists_every_task_and_what_it_needs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name, spec in TASK_REGISTRY.items():
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        for need in required_inputs(spec):
            assert need in line, (name, need)


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"task": "image_to_video", "prompt": "x", "duration_s": 1.0}, "needs a conditioning image or video"),
        (
            {"task": "policy", "image": "first.png", "embodiment": "octopus", "duration_s": 1.0},
            "unknown embodiment 'octopus'",
        ),
        ({"task": "policy", "image": "first.png", "duration_s": 1.0}, "needs an embodiment"),
        ({"task": "video_to_audio", "video": "missing.mp4"}, "video='"),
        ({"task": "text_to_video", "resolution": [64, 32]}, "clip length is needed"),
        ({"task": "dream", "prompt": "x"}, "unknown task 'dream'"),
        ({"task": "text_to_image", "colour": "red"}, "unknown field(s) ['colour']"),
        # A crafted name must not write outside --out.
        ({"task": "text_to_video", "name": "../escaped"}, "name='../escaped' must be a folder name"),
        ({"task": "text_to_video", "name": "/tmp/escaped"}, "name='/tmp/escaped' must be a folder name"),
        ({"task": "text_to_video", "name": ".."}, "name='..' must be a folder name"),
        ({"task": "text_to_video", "name": 7}, "name=7 must be a folder name"),
        # A picture below one 32x32 ViT token was SampleError's traceback from the ViT's crop.
        ({"task": "understanding", "prompt": "what?", "image": "thin.png"}, "8x64 pixels is smaller than one ViT"),
    ],
)
def test_a_bad_request_is_a_clear_error_and_writes_nothing(checkpoint, inputs, tmp_path, capsys, request_, message):
    (tmp_path / "first.png").write_bytes((inputs / "first.png").read_bytes())
    write_png(tmp_path / "thin.png", np.zeros((8, 64, 3), np.uint8))
    requests = write_requests(tmp_path, [request_])
    assert main(["--checkpoint", str(checkpoint), "--requests", str(requests), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _sine_file(path: Path, *args: str) -> Path:
    """Half a second of a 440 Hz tone written by the ffmpeg command with ``args`` (an independent writer)."""
    tone = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=0.5"]
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *tone, *args, str(path)], check=True)
    return path


def _wav(path: Path, rate: int, samples: np.ndarray) -> Path:
    wavfile.write(path, rate, samples)
    return path


@pytest.mark.parametrize(
    "make, want",
    [  # conditioning sound is read as the loader reads an audio field (docs/DESIGN.md, "Real media")
        (lambda d: _sine_file(d / "a.flac"), (2, 24000, 48000)),  # was "want a .wav file"
        (lambda d: _sine_file(d / "a.mp3"), (2, 24000, 48000)),
        (lambda d: _sine_file(d / "a.wav", "-c:a", "pcm_mulaw"), (2, 24000, 48000)),  # was corrupt_media
        (lambda d: _sine_file(d / "a.wav", "-af", "pan=5.1|c0=c0|c1=c0|c2=c0|c3=c0|c4=c0|c5=c0"), (2, 24000, 48000)),
        (lambda d: _sine_file(d / "a.wav", "-ac", "1"), (1, 22050, 44100)),  # a WAV keeps its rate
        (lambda d: _sine_file(d / "a.WAV", "-c:a", "pcm_u8", "-ac", "2"), (2, 22050, 44100)),
    ],
)
def test_conditioning_audio_in_any_format_the_shards_take_is_read(tmp_path, make, want):
    audio, rate = read_input("audio", make(tmp_path), "request r")
    assert (audio.shape[0], audio.shape[1], rate) == want
    assert 0.09 < np.abs(audio).max() < 1.0  # ffmpeg's sine source: amplitude 1/8 (more where 5.1 is downmixed)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: _wav(d / "a.wav", 48000, np.array([0.0, np.nan], np.float32)), "non_finite: {} holds NaN/inf"),
        (lambda d: _wav(d / "a.wav", 10**7, np.zeros(8, np.int16)), "out_of_range: {} sample rate 10000000 Hz"),
        (lambda d: _wav(d / "a.wav", 48000, np.zeros(0, np.int16)), "zero_length: {}"),
        (lambda d: _sine_file(d / "a.flac").write_bytes(b"fLaC" + bytes(40)) and d / "a.flac", "corrupt_media: {}"),
        (lambda d: _sine_file(d / "a.ogg", "-c:a", "libvorbis").with_suffix(".aiff"), "want one of ('.wav', '.flac'"),
    ],
)
def test_damaged_or_unusable_conditioning_audio_is_an_error_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    path.touch()
    with pytest.raises(RequestError, match=re.escape("request r: " * ("want" not in message) + message.format(path))):
        read_input("audio", path, "request r")


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"task": "text_to_video", "prompt": "\xff"}', "is not UTF-8 text"),
        (b'{"task": "text_to_video", "num_frames": NaN}', ":1: num_frames=NaN is not a finite number"),
        (b'{"task": "text_to_video", "duration_s": Infinity}', ":1: duration_s=Infinity is not a finite number"),
        # Python's json read a literal past the float range as inf without a word
        (b'{"task": "text_to_video", "duration_s": 1e999}', ":1: duration_s=1e999 is not a finite number"),
        (b'{"task": "text_to_video", "task": "text_to_image"}', ":1: not JSON (key(s) ['task'] given twice)"),
        (b"[" * 100_000, ":1: not JSON (maximum recursion depth"),
        (b"[1, 2]", ":1: a request is a JSON object, got list"),
        (b'{"task": 3}', ":1: task=3 must be a string"),
        (b'{"task": "text_to_video", "prompt": ["a"]}', ":1: prompt=['a'] must be a string"),
        (b'{"task": "text_to_video", "num_frames": "9"}', ":1: num_frames='9' must be an integer"),
        (b'{"task": "text_to_video", "num_frames": true}', ":1: num_frames=True must be an integer"),
        (b'{"task": "text_to_video", "num_frames": 1e308}', ":1: num_frames=1e+308 must be an integer"),
        (b'{"task": "text_to_video", "duration_s": "1"}', ":1: duration_s='1' must be a finite number"),
        (b'{"task": "text_to_video", "guidance": "2"}', ":1: guidance='2' must be a finite number"),
        (b'{"task": "text_to_video", "fps": "fast"}', ":1: fps='fast' must be a positive number or fraction 'N/D'"),
        (
            b'{"task": "text_to_video", "fps": "30000/0"}',
            ":1: fps='30000/0' must be a positive number or fraction 'N/D'",
        ),
        (b'{"task": "text_to_video", "fps": "0"}', ":1: fps='0' must be a positive number or fraction 'N/D'"),
        (b'{"task": "understanding", "max_new_tokens": 1.5}', ":1: max_new_tokens=1.5 must be an integer"),
        # Upper bounds, found before any model loads: each ran for days or until the memory ran out.
        (b'{"task": "text_to_video", "steps": 100000}', ":1: steps=100000 must be an integer in [1, 1000]"),
        (b'{"task": "text_to_video", "guidance": 1e6}', ":1: guidance=1000000.0 must be a finite number in [0, 100]"),
        (b'{"task": "text_to_video", "solver": "rk4"}', ":1: solver='rk4' must be one of ['euler', 'heun']"),
        (b'{"task": "understanding", "max_new_tokens": 1000000}', ":1: TextSampling.max_new_tokens must be"),
        (b'{"task": "understanding", "top_p": 2}', ":1: TextSampling.top_p must lie in (0, 1]"),
        # Integers past Python's 4300-digit limit: json.loads and int() raised Python's own 'Exceeds the
        # limit' text, naming no field.
        (b'{"task": "text_to_image", "seed": ' + b"7" * 5000 + b"}", ":1: seed=<an integer of 5000 digits> is not"),
        (b'{"task": "text_to_image", "resolution": [64, -' + b"7" * 4400 + b"]}", ":1: resolution=[64, <an integer of"),
        (b'{"task": "text_to_image", "resolution": "' + b"6" * 5000 + b'x64"}', "a side of 5000 digits is no size in"),
        (b'{"task": "text_to_image", "resolution": ["64", "' + b"6" * 19 + b'"]}', "a side of 19 digits is no size"),
        # A key the task does not read was ignored without a word: the user believed it shaped the sample.
        (
            b'{"task": "text_to_image", "fps": 30, "resolution": "64x32"}',
            ":1: task 'text_to_image' does not read ['fps']",
        ),
        (
            b'{"task": "text_to_image", "duration_s": 1.0, "num_frames": 9}',
            ":1: task 'text_to_image' does not read ['duration_s', 'num_frames']; it reads [",
        ),
        (b'{"task": "text_to_video", "image": "a.png"}', ":1: task 'text_to_video' does not read ['image']"),
        (
            b'{"task": "text_to_audio_video", "audio": "a.wav"}',
            ":1: task 'text_to_audio_video' does not read ['audio']",
        ),
        (
            b'{"task": "video_to_audio", "embodiment": "single_arm"}',
            "task 'video_to_audio' does not read ['embodiment']",
        ),
        (
            b'{"task": "understanding", "steps": 4, "video": "c.mp4"}',
            "'understanding' does not read ['steps', 'video']",
        ),
        (
            b'{"task": "text_to_video", "max_new_tokens": 5}',
            ":1: task 'text_to_video' does not read ['max_new_tokens']",
        ),
        # torch's 'Overflow when unpacking long long', named nothing; 2**64 drew the noise seed 0 draws
        (b'{"task": "understanding", "seed": 18446744073709551616}', ":1: seed=18446744073709551616 must be"),
        (b'{"task": "text_to_video", "seed": -1}', ":1: seed=-1 must be an integer in [0, 2**63 - 1]"),
        (b'{"task": "image_to_video", "image": ["a.png"]}', ":1: image=['a.png'] must be a string"),
        (b'{"task": "text_to_image", "resolution": [32.7, 32]}', ":1: resolution=[32.7, 32]: expected HEIGHTxWIDTH"),
        (b'{"task": "text_to_image", "resolution": [true, 32]}', ":1: resolution=[True, 32]: expected HEIGHTxWIDTH"),
        # Its partial folder's name adds host, pid and suffix: a 255-byte name failed after generating.
        (b'{"task": "text_to_image", "name": "' + b"a" * 250 + b'"}', "is 250 bytes; a request's folder name has at"),
        # Names the framework's own hidden partial/temporary folders could take or be taken for.
        (
            b'{"task": "text_to_image", "name": ".hidden"}',
            ":1: name='.hidden' must be a folder name: not empty, no '/'",
        ),
        (b'{"task": "text_to_image", "name": ".x.h-1.ab.partial"}', "name='.x.h-1.ab.partial' must be a folder name"),
        (b'{"task": "text_to_image", "name": ""}', ":1: name='' must be a folder name"),
        (b'{"task": "text_to_image", "name": "a\\\\b"}', ":1: name='a\\\\b' must be a folder name"),
        (b'{"task": "text_to_image", "name": "a\\nb"}', ":1: name='a\\nb' must not hold control characters"),
        (b'{"task": "text_to_image", "name": "a\\u0000"}', ":1: name='a\\x00' must not hold control characters"),
        (b'{"task": "text_to_image", "name": " a"}', ":1: name=' a' must not hold control characters or begin or"),
    ],
)
def test_a_crafted_requests_file_is_an_error_naming_its_line_and_field(tmp_path, line, message):
    (tmp_path / "requests.jsonl").write_bytes(line)
    with pytest.raises(RequestError) as error:
        read_requests(tmp_path / "requests.jsonl")
    assert message in str(error.value)


def test_a_request_of_many_keys_is_refused_in_linear_time(tmp_path):
    """The duplicate-key check counted each key with list.count: an object of 50,000 keys was 2.5e9
    comparisons (tens of seconds) before its unknown fields were named."""
    import time

    keys = ", ".join(f'"k{i}": 0' for i in range(50_000))
    (tmp_path / "requests.jsonl").write_text('{"task": "text_to_video", ' + keys + "}\n")
    started = time.perf_counter()
    with pytest.raises(RequestError, match=r":1: unknown field\(s\) \['k0', 'k1'"):
        read_requests(tmp_path / "requests.jsonl")
    assert time.perf_counter() - started < 5


def test_a_frame_rate_may_be_a_fraction_as_ffprobe_writes_it(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"task": "text_to_video", "fps": "30000/1001"}\n{"task": "text_to_video", "fps": 59.94}\n')
    requests = [GenerationRequest(**spec.generation_settings()) for spec in read_requests(path)]
    assert [request.fps for request in requests] == [30000 / 1001, 59.94]


def test_a_byte_order_mark_and_crlf_lines_are_read(tmp_path):
    text = (
        "\ufeff"
        + '{"task": "text_to_image", "resolution": "64X32"}\r\n# a comment\r\n\r\n{"task": "understanding"}\r\n'
    )
    path = tmp_path / "requests.jsonl"
    path.write_bytes(text.encode())
    specs = read_requests(path)
    assert [spec.task for spec in specs] == ["text_to_image", "understanding"]
    assert specs[0].settings["resolution"] == (64, 32)


def test_a_request_too_long_or_too_large_or_a_bad_late_input_writes_nothing(checkpoint, inputs, tmp_path):
    """A crafted length or resolution is refused before anything is allocated for it (it ran for
    minutes and took gigabytes); an understanding request's missing picture, read after the video
    requests were generated, used to leave their folders written."""
    trained = load_trained_model(checkpoint)
    cases = [
        ({"task": "text_to_video", "duration_s": 1e6, "resolution": "64x32"}, r"duration_s must be in \(0, 86400\]"),
        ({"task": "text_to_video", "num_frames": 10**40 + 1, "resolution": "64x32"}, "last longer than the longest"),
        ({"task": "text_to_image", "resolution": [32 * 10**5, 32 * 10**5]}, "above clips.MAX_CLIP_BYTES"),
    ]
    for request, message in cases:
        with pytest.raises(ValueError, match=message):
            run_requests(trained, read_requests(write_requests(inputs, [request])), tmp_path, None, write=True)
    same = write_requests(inputs, [{**REQUESTS[0], "name": "Clip"}, {**REQUESTS[0], "name": "clip"}])
    with pytest.raises(RequestError, match=r"two requests write to the same folder \(letter case aside\)"):
        run_requests(trained, read_requests(same), tmp_path / "out", None, write=True)  # one folder on macOS
    mixed = write_requests(inputs, [REQUESTS[0], {"task": "understanding", "image": "missing.png"}])
    with pytest.raises(RequestError, match=r"image='.*missing.png': missing \(no such file\)"):
        run_requests(trained, read_requests(mixed), tmp_path / "out", None, write=True)
    assert not (tmp_path / "out").exists()
    # An understanding request of no question and no picture failed in generate_text, naming no
    # request, after the video request's folder was written.
    mixed = write_requests(inputs, [REQUESTS[0], {"task": "understanding", "prompt": ""}])
    with pytest.raises(RequestError, match=r"request 001_understanding: .* needs a question \(prompt\) or an image"):
        run_requests(trained, read_requests(mixed), tmp_path / "out", None, write=True)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out" / "kept").mkdir(parents=True)
    (tmp_path / "out" / "kept" / "audio.wav").write_bytes(b"an earlier sample's")
    with pytest.raises(RequestError, match=r"already holds \['kept'\]"):
        run_requests(
            trained,
            read_requests(write_requests(inputs, [{**REQUESTS[0], "name": "kept"}])),
            tmp_path / "out",
            None,
            True,
        )
    assert [p.name for p in (tmp_path / "out" / "kept").iterdir()] == ["audio.wav"]
    # --overwrite replaces it: the earlier sample's file is gone, the new sample's are there.
    kept = read_requests(write_requests(inputs, [{**REQUESTS[0], "name": "kept"}]))
    run_requests(trained, kept, tmp_path / "out", None, True, overwrite=True)
    written = sorted(p.name for p in (tmp_path / "out" / "kept").iterdir())
    assert "audio.wav" not in written and any(name.endswith(".meta.json") for name in written), written
    # A diverged model's NaN: decoded, it was a black clip; NaN sound failed in the middle of a save.
    # Refused before any request's folder is written, naming the request and the piece.
    with torch.no_grad():
        next(p for name, p in trained.model.named_parameters() if "generator" in name).fill_(float("nan"))
    two = read_requests(write_requests(inputs, [REQUESTS[0], REQUESTS[1]]))
    with pytest.raises(RequestError, match=r"request 000_text_to_image: the generated image \(\d+ of \d+ values\)"):
        run_requests(trained, two, tmp_path / "nan", None, True)
    assert not (tmp_path / "nan").exists()
    with torch.no_grad():  # the Reasoner's too: greedy, argmax of NaN logits was written as an answer
        trained.model.embed_tokens.weight.fill_(float("nan"))
    question = read_requests(write_requests(inputs, [REQUESTS[-1]]))
    with pytest.raises(RequestError, match=r"request 000_understanding: generate_text: prompt 0's logits for new"):
        run_requests(trained, question, tmp_path / "nan", None, True)
    assert not (tmp_path / "nan").exists()


def _writes_part_then(then):
    """A ``write_generated_sample`` that writes the sample's first file and then runs ``then(folder)``
    (an interruption, or another run filling the request's folder)."""
    from megatron_cosmos3.inference.media_outputs import write_generated_sample

    def write(folder, sample, record, decoder, start=None):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "image.png").write_bytes(b"the first file")
        then(folder)
        return write_generated_sample(folder, sample, record, decoder, start)

    return write


def _interrupted(folder):
    raise KeyboardInterrupt  # Ctrl-C (or a SIGTERM turned into an exception) mid-request


def test_an_interrupted_request_leaves_no_folder_that_looks_generated(checkpoint, inputs, tmp_path, monkeypatch):
    """Files were written straight into OUT/<name>/: a run stopped mid-request left a folder of some
    files (no sidecars yet) that a later run refused as an earlier sample, and --overwrite had removed
    the earlier sample before the new one was written."""
    from megatron_cosmos3.release import generate_cli

    trained = load_trained_model(checkpoint)
    specs = read_requests(write_requests(inputs, [{**REQUESTS[0], "name": "image"}]))
    monkeypatch.setattr(generate_cli, "write_generated_sample", _writes_part_then(_interrupted))
    with pytest.raises(KeyboardInterrupt):
        run_requests(trained, specs, tmp_path, None, write=True)
    assert list(tmp_path.iterdir()) == []  # nor a staging folder
    # An earlier sample survives an interrupted --overwrite whole.
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "image.png").write_bytes(b"an earlier sample's")
    with pytest.raises(KeyboardInterrupt):
        run_requests(trained, specs, tmp_path, None, write=True, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["image"]
    assert (tmp_path / "image" / "image.png").read_bytes() == b"an earlier sample's"


def test_a_later_run_removes_the_partial_folders_of_killed_runs_only(
    checkpoint, inputs, tmp_path, caplog, ended_run_partial_folder
):
    """SIGKILL leaves a request's hidden partial folder (no cleanup runs); nothing removed it, ever.
    A later run into the same --out removes those of ended processes on its host, naming them, and
    never one a live run (this process, as for a run generating at once) is writing."""
    from megatron_cosmos3.atomic_files import partial_folder

    trained = load_trained_model(checkpoint)
    dead = ended_run_partial_folder(tmp_path / "image")
    live = partial_folder(tmp_path / "other")
    specs = read_requests(write_requests(inputs, [{**REQUESTS[0], "name": "image"}]))
    run_requests(trained, specs, tmp_path, None, write=True)
    assert sorted(tmp_path.iterdir()) == sorted([tmp_path / "image", live])
    assert str(dead) in caplog.text


# cosmos3-generate in a process of its own that sends itself SIGTERM while writing its request.
_TERMINATED = """
import os, signal, sys, time
from megatron_cosmos3.release import generate_cli

def write(folder, *args, **kwargs):
    (folder / "image.png").write_bytes(b"the first file")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the signal arrives here

generate_cli.write_generated_sample = write
sys.exit(generate_cli.main(sys.argv[1:]))
"""


def test_sigterm_mid_request_exits_through_the_cleanup(checkpoint, tmp_path):
    """Python's default SIGTERM ended the process on the spot: the request's partial folder stayed
    (and under torchrun the process group was never destroyed)."""
    argv = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--task", "text_to_image"]
    argv += ["--prompt", "a ball", "--resolution", "64x32", "--name", "image"]
    env = child_environment()
    done = subprocess.run([sys.executable, "-c", _TERMINATED, *argv], env=env, capture_output=True, timeout=300)
    assert done.returncode == 128 + 15, done.stderr[-2000:]  # SystemExit(143), not killed by the signal (-15)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_folder_another_run_filled_meanwhile_is_kept_and_named(checkpoint, inputs, tmp_path, monkeypatch):
    """Two runs into one --out: both found the request's folder free, then wrote into it, mixing
    one sample's files with the other's."""
    from megatron_cosmos3.release import generate_cli

    def other_run(folder):
        (tmp_path / "image").mkdir()
        (tmp_path / "image" / "image.png").write_bytes(b"the other run's")

    trained = load_trained_model(checkpoint)
    specs = read_requests(write_requests(inputs, [{**REQUESTS[0], "name": "image"}]))
    monkeypatch.setattr(generate_cli, "write_generated_sample", _writes_part_then(other_run))
    with pytest.raises(RequestError, match="image was written by another run while this one generated"):
        run_requests(trained, specs, tmp_path, None, write=True)
    assert [p.name for p in tmp_path.iterdir()] == ["image"]
    assert [p.name for p in (tmp_path / "image").iterdir()] == ["image.png"]
    assert (tmp_path / "image" / "image.png").read_bytes() == b"the other run's"


def test_a_task_the_checkpoint_was_not_trained_for_is_refused(checkpoint, inputs, tmp_path):
    trained = load_trained_model(checkpoint)
    trained.config.synthetic.tasks = ["understanding", "text_to_video"]
    specs = read_requests(write_requests(inputs, [REQUESTS[0]]))
    with pytest.raises(RequestError, match="task 'text_to_image': the checkpoint was not trained for it"):
        run_requests(trained, specs, tmp_path, None, write=True)


def test_the_release_folder_generates_what_the_checkpoint_does(checkpoint, inputs, tmp_path):
    """``cosmos3-convert release`` of the checkpoint, then the same request from both (the folder
    is read without torch.distributed.checkpoint): the same actions, bit for bit."""
    from megatron_cosmos3.release.convert_cli import main as convert

    assert convert(["release", str(checkpoint), str(tmp_path / "release")]) == 0
    policy = next(r for r in REQUESTS if r["task"] == "policy")
    requests = str(write_requests(inputs, [{**policy, "name": "policy"}]))
    for source, out in ((checkpoint, "from-checkpoint"), (tmp_path / "release", "from-release")):
        assert main(["--checkpoint", str(source), "--requests", requests, "--out", str(tmp_path / out)]) == 0
    want = np.load(tmp_path / "from-checkpoint" / "policy" / "actions.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "from-release" / "policy" / "actions.npy"), want)


def test_one_request_from_the_flags(checkpoint, inputs, tmp_path):
    argv = ["--checkpoint", str(checkpoint), "--out", str(tmp_path), "--task", "inverse_dynamics", "--prompt", "push"]
    argv += ["--video", str(inputs / "clip.mp4"), "--embodiment", "single_arm", "--solver", "heun", "--seed", "4"]
    assert main(argv) == 0
    folder = tmp_path / "000_inverse_dynamics"
    assert np.load(folder / "actions.npy").shape == (12, ARM_DIM)  # 9 frames at the clip's 8 fps: 11.25 steps at 10 Hz
    meta = json.loads((folder / "actions.meta.json").read_text())
    assert (meta["solver"], meta["seed"], meta["settings"]["fps"]) == ("heun", 4, FPS)
    assert meta["conditioning"] == {"video": str(inputs / "clip.mp4")}


def test_a_prompt_longer_than_the_runs_text_budget_is_cut_where_training_cut_it(checkpoint, inputs, tmp_path, caplog):
    """data.packing.max_text_tokens capped every text in training; the command cuts prompts there
    (not at a fixed length), and says so."""
    trained = load_trained_model(checkpoint)
    trained.config.data.packing.max_text_tokens = 8  # the byte tokenizer: 8 characters
    image = str(inputs / "first.png")

    def actions(prompt: str, name: str) -> np.ndarray:
        request = {"task": "policy", "prompt": prompt, "image": image, "embodiment": "single_arm", "name": name}
        specs = read_requests(write_requests(tmp_path, [{**request, "duration_s": 0.5, "steps": 2}]))
        run_requests(trained, specs, tmp_path, None, write=True)
        return np.load(tmp_path / name / "actions.npy")

    with caplog.at_level("WARNING", logger="cosmos3-generate"):
        cut = actions("push it!" + "x" * 40, "long")
    assert "request long: its prompt of 48 tokens is cut to the first 8" in caplog.text
    assert np.array_equal(actions("push it!" + "y" * 40, "other_tail"), cut)
    assert not np.array_equal(actions("pull it!" + "x" * 40, "other_head"), cut)  # control: within the budget


class _RunsCode:
    """What a crafted .metadata holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, ("touch " + self.marker,))


def test_a_damaged_or_crafted_checkpoint_is_one_error_line_in_every_command(checkpoint, tmp_path, capsys):
    """A flipped byte (CheckpointCorruptError), a .metadata that would run code (an unpickling
    error) and a meta.json of another step: each command exits 2 with the reason on one line,
    no traceback, nothing written, nothing executed."""
    import pickle
    import shutil

    from megatron_cosmos3.checkpoint.safe_reader import MANIFEST, file_record
    from megatron_cosmos3.release.convert_cli import main as convert
    from megatron_cosmos3.release.eval_cli import main as evaluate
    from megatron_cosmos3.release.trained import find_checkpoint

    source = find_checkpoint(checkpoint)
    marker = tmp_path / "pwned"

    def flip(folder):
        shard = next(folder.glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))

    def resealed(change):
        def damage(folder):
            change(folder)
            files = {p.name: file_record(p) for p in folder.iterdir() if p.name != MANIFEST}
            (folder / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": files}))

        return damage

    damages = {
        "flipped": (flip, r"does not match its sha256 checksum"),
        "code": (
            resealed(lambda f: (f / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))),
            r"posix.system, which a weights-only load refuses",
        ),
        "step": (
            resealed(lambda f: (f / "meta.json").write_text(json.dumps({"step": 9}))),
            rf"meta.json step=9 does not match its folder {source.name}",
        ),
    }
    for name, (damage, message) in damages.items():
        folder = tmp_path / name / source.name
        shutil.copytree(source, folder)
        damage(folder)
        out = tmp_path / name / "out"
        for command, argv in (
            (main, ["--checkpoint", str(folder), "--task", "text_to_image", "--prompt", "x", "--out", str(out)]),
            (evaluate, ["--checkpoint", str(folder), "--out", str(out)]),
            (convert, ["release", str(folder), str(out)]),
        ):
            assert command(argv) == 2, (name, command.__module__)
            error = capsys.readouterr().err
            assert re.search(message, error) and "Traceback" not in error, (name, command.__module__, error)
            assert not out.exists(), (name, command.__module__)
    assert not marker.exists()


def test_an_out_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    argv = ["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), "--task", "text_to_video"]
    assert main([*argv, "--prompt", "a ball"]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and err.count("\n") == 1 and (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_out_nothing_can_be_written_to_is_refused_before_the_model_loads(command, tmp_path, capsys):
    """/proc takes no new folders, as a read-only file system takes no files: the folder was first made
    when the results were written, a traceback after the model had loaded and generated everything."""
    from megatron_cosmos3.release.eval_cli import main as evaluate

    out = "/proc/cosmos3-test-out/generated"
    argv = ["--checkpoint", str(tmp_path / "nothing"), "--out", out]
    if command == "generate":
        assert main([*argv, "--task", "text_to_video", "--prompt", "a ball"]) == 2
    else:
        assert evaluate(argv) == 2
    err = capsys.readouterr().err
    assert f"--out '{out}' is not a folder this run can write to" in err and err.count("\n") == 1, err
    assert "nothing" not in err  # refused before the checkpoint was looked at


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("flag, seconds", [([], 600.0), (["--timeout-s", "7.5"], 7.5)])
def test_the_world_and_the_plan_wait_the_timeout_given(command, flag, seconds, tmp_path, monkeypatch, capsys):
    """Under torchrun both commands started their world with torch's default timeout (30 minutes)
    and their plan's groups with megatron-core's: both wait ``--timeout-s`` (default: training's
    default distributed.init_timeout_s). Seen here through what the world and the load are given."""
    from megatron_cosmos3.release import eval_cli, generate_cli

    module = {"generate": generate_cli, "eval": eval_cli}[command]
    given = {}
    real_init, real_load = module.init_distributed, module.load_trained_model

    def init_distributed(timeout_s=None):
        given["world"] = timeout_s
        return real_init(timeout_s)

    def load_trained_model(path, **kwargs):
        given["plan"] = kwargs.get("timeout_s")
        return real_load(path, **kwargs)

    monkeypatch.setattr(module, "init_distributed", init_distributed)
    monkeypatch.setattr(module, "load_trained_model", load_trained_model)
    argv = ["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), *flag]
    argv += ["--task", "text_to_video", "--prompt", "a ball"] if command == "generate" else []
    assert module.main(argv) == 2  # no checkpoint there: after the world and the load were given it
    assert "does not exist" in capsys.readouterr().err
    assert given == {"world": seconds, "plan": seconds}


# 1e300 was an OverflowError traceback where the world's timedelta was built (under torchrun).
@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon", "1e300", "inf"])
def test_a_timeout_that_is_no_number_of_seconds_is_refused(value, tmp_path, capsys):
    argv = ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out"), "--task", "text_to_video"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--timeout-s", value])
    assert exited.value.code == 2
    assert f"argument --timeout-s: {value!r} is not a number of seconds in (0, 86400]" in capsys.readouterr().err


def test_a_flag_the_task_does_not_read_is_refused_and_flags_not_given_are_no_keys(tmp_path, capsys):
    """The flags' defaults (--steps 8, --guidance 1, ...) were keys of every request: an understanding
    request from the flags would have held steps. Only flags given count, and are checked before the
    checkpoint is read (here there is none)."""
    argv = ["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--task", "understanding"]
    assert main([*argv, "--prompt", "what moves?", "--steps", "4", "--fps", "24"]) == 2
    assert "the flags: task 'understanding' does not read ['fps', 'steps']" in capsys.readouterr().err
    assert main([*argv, "--prompt", "what moves?", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err  # control: past the request, the missing checkpoint is the error
    assert "does not read" not in err and str(tmp_path / "none") in err


def test_a_request_flag_given_with_a_request_file_is_refused_not_ignored(tmp_path, capsys):
    """--steps, --seed, --name... beside --requests were ignored without a word: the file's requests
    were generated with their own settings (8 steps for a user who asked 50)."""
    requests = write_requests(tmp_path, [{"task": "text_to_image", "prompt": "x", "resolution": "64x32"}])
    argv = ["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--requests", str(requests)]
    assert main([*argv, "--steps", "50", "--seed", "5", "--duration", "2"]) == 2
    err = capsys.readouterr().err
    assert "the flags of one request ['duration_s', 'seed', 'steps'] are not read with a request file" in err, err
    assert main(argv) == 2  # control: without them the file is read, and the missing checkpoint is the error
    err = capsys.readouterr().err
    assert "not read with a request file" not in err and str(tmp_path / "none") in err
    assert not (tmp_path / "out").exists()


def test_input_paths_are_absolute_from_the_request_files_folder_whatever_the_working_folder(tmp_path, monkeypatch):
    """A request file named by a relative path gave relative input paths, recorded so in the sidecars:
    read from another folder they named nothing. They are absolute, relative to the file's folder."""
    (tmp_path / "requests").mkdir()
    (tmp_path / "elsewhere").mkdir()
    line = {"task": "image_to_video", "image": "first.png", "duration_s": 1.0}
    write_requests(tmp_path / "requests", [line, {**line, "image": str(tmp_path / "elsewhere" / "b.png")}])
    monkeypatch.chdir(tmp_path)
    relative, absolute = read_requests(Path("requests/requests.jsonl"))
    assert relative.conditioning() == {"image": str(tmp_path / "requests" / "first.png")}
    assert absolute.conditioning() == {"image": str(tmp_path / "elsewhere" / "b.png")}
    monkeypatch.chdir(tmp_path / "elsewhere")  # the reader's folder changes nothing once read
    assert relative.path("image") == tmp_path / "requests" / "first.png"


def test_the_longest_name_a_request_may_have_fits_its_partial_folder(tmp_path):
    """The bound is what the partial folder's name leaves of 255 bytes: the writer's own partial
    folder of the longest accepted name is made; a byte more is refused when the file is read."""
    from megatron_cosmos3.atomic_files import longest_staged_name, partial_folder

    name = "é" * (longest_staged_name() // 2) + "a" * (longest_staged_name() % 2)  # bytes, not characters
    staging = partial_folder(tmp_path / name)
    assert staging.is_dir() and len(staging.name.encode()) <= 255
    (spec,) = read_requests(write_requests(tmp_path, [{"task": "text_to_image", "name": name}]))
    assert spec.name == name
    with pytest.raises(RequestError, match=f"is {longest_staged_name() + 1} bytes"):
        read_requests(write_requests(tmp_path, [{"task": "text_to_image", "name": name + "a"}]))


@pytest.mark.parametrize("role, suffix", [("image", "png"), ("image", "jpg"), ("video", "mp4"), ("audio", "wav")])
def test_an_empty_or_garbage_conditioning_file_is_an_error_naming_it(tmp_path, role, suffix):
    """An empty file is named as such (FFmpeg said "Invalid data found", Pillow named a BytesIO
    object); bytes of no format are refused, never a traceback."""
    path = tmp_path / f"in.{suffix}"
    path.write_bytes(b"")
    with pytest.raises(
        RequestError, match=re.escape(f"request r: corrupt_media: {path}: a zero-length file (0 bytes)")
    ):
        read_input(role, path, "request r")
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(RequestError, match=re.escape(f"request r: corrupt_media: {path}: not a readable")):
        read_input(role, path, "request r")


def test_a_picture_given_as_the_conditioning_video_has_no_frame_rate_of_its_own(tmp_path):
    """A PNG named .mp4 is a 1-frame video (as in a shard's video field), but FFmpeg's 25 fps, its
    default for a picture, became the request's rate; a real video file keeps its own (control)."""
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    picture = write_png(tmp_path / "still.png", image).rename(tmp_path / "still.mp4")
    frames, fps = read_input("video", picture, "request r")
    np.testing.assert_array_equal(frames, image[None])
    assert fps is None
    for asked in (10.0, 60.0, 100.0):  # one frame at any rate the request asks for
        frames, fps = read_input("video", picture, "request r", asked)
        np.testing.assert_array_equal(frames, image[None])
        assert fps is None
    clip = write_mp4(tmp_path / "clip.mp4", np.repeat(image[None], 6, axis=0), 24)
    assert read_input("video", clip, "request r")[1] == 24.0


@pytest.mark.parametrize(("fps", "shown"), [(None, 30), (30, 30), (24, 24), (10, 10), ("30000/1001", 30), (5000, 30)])
def test_a_conditioning_video_file_is_read_at_the_frame_rate_the_request_asks_for(tmp_path, fps, shown):
    """A 1 s clip at 30 fps asked at 10 fps was its 30 frames played at 10: 3 s of slow motion,
    without a word. Its frames are now selected at the request's rate as the loader's media.fps
    selects them (frame k / fps of the file), so the clip lasts what the file does; no fps keeps
    the file's own. An fps outside the shards' range is left for the request to name (the control:
    not decoded as 5000 frames)."""
    from megatron_cosmos3.inference.requests import prepare_request
    from megatron_cosmos3.release.generate_cli import RequestSpec, generation_request

    frames = np.zeros((30, HEIGHT, WIDTH, 3), np.uint8)
    frames[..., 0] = np.arange(30)[:, None, None] * 8  # frame i is i x 8 red: which frame each is
    write_mp4(tmp_path / "clip.mp4", frames, 30)
    source = ffmpeg_frames(tmp_path / "clip.mp4", HEIGHT, WIDTH)  # decoded by FFmpeg's own command
    given = {} if fps is None else {"fps": fps}
    spec = RequestSpec.from_mapping({"task": "video_to_audio", "video": "clip.mp4", **given}, "r", tmp_path)
    request = generation_request(spec, "request r")
    assert request.video.shape == (shown, HEIGHT, WIDTH, 3)
    if fps == 5000:
        with pytest.raises(ValueError, match=r"fps=5000 is outside \[0.1, 1000.0\]"):
            prepare_request(request, None)
        return
    picked = np.floor(np.arange(shown) / request.frame_rate * 30 + 1e-6).astype(int)  # the frame shown at k / fps
    np.testing.assert_array_equal(request.video, source[picked])
    assert request.video.shape[0] / request.frame_rate == pytest.approx(1.0, abs=1 / request.frame_rate)


def test_a_vocabulary_below_the_byte_tokenizers_is_an_error_naming_the_field_and_the_folder(tmp_path, capsys):
    """A model of 64 ids (a run on synthetic packs never reads text, so training allowed it) saved as a
    weights folder: generation reads the prompt with the byte tokenizer, whose error named neither
    model.vocab_size nor the folder ('ByteTokenizer needs vocab_size >= 256')."""
    from megatron_cosmos3.conversion.mot_folder import save_mot_folder
    from megatron_cosmos3.model.mot import MoTModel
    from megatron_cosmos3.testing.training import TINY_MODEL
    from megatron_cosmos3.training.config import load_config

    config = load_config(None, TINY_MODEL).model
    assert config.vocab_size == 64
    weights = save_mot_folder(MoTModel(config), None, tmp_path / "weights")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(weights), "--out", str(out), "--task", "text_to_image", "--prompt", "a"]) == 2
    error = capsys.readouterr().err
    assert f"{weights}: model.vocab_size=64 is below the byte tokenizer's 256 ids" in error, error
    assert "Traceback" not in error and error.count("\n") == 1 and not out.exists()
