"""Damaged media as a class (docs/DESIGN.md, "Real media"): a tiny real file of every container and
codec a field takes, written by ffmpeg, cut at eight places (inside its header, in the middle, its
last byte gone) and with seeded byte flips, goes through the loader's entry point
(``schema.decode_sample``), whole and as a clip. Each case either decodes, or is a skip
(``SampleError``) of a known reason naming its member; never another exception, never a hang (each
case under its own timeout, in a child process that is killed past it). A cut file that decodes
gives exactly what the whole file gives: truncation is never a shorter or other clip. The cases of
``test_damaged_media.py`` (one crafted defect each) are not repeated here."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_cosmos3.data.errors import ERROR_REASONS

SECOND = ["-t", "0.4"]
PICTURE = ["-f", "lavfi", "-i", "testsrc=size=32x32", "-frames:v", "1"]
MOVING = ["-f", "lavfi", "-i", "testsrc=size=32x32:rate=10"]
TONE = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000"]
# (the field it is stored as, ffmpeg's inputs and options): every container/codec pair a field takes.
FILES = {
    "h264_aac.mp4": ("video.mp4", [*MOVING, *TONE, *SECOND, "-c:v", "libx264", "-c:a", "aac"]),
    "h264_aac.mov": ("video.mov", [*MOVING, *TONE, *SECOND, "-c:v", "libx264", "-c:a", "aac"]),
    "h264_pcm.mkv": ("video.mkv", [*MOVING, *TONE, *SECOND, "-c:v", "libx264", "-c:a", "pcm_s16le"]),
    "vp9_opus.webm": ("video.webm", [*MOVING, *TONE, *SECOND, "-c:v", "libvpx-vp9", "-c:a", "libopus"]),
    "mjpeg.avi": ("video.avi", [*MOVING, *SECOND, "-c:v", "mjpeg"]),
    "a.mp3": ("audio.mp3", [*TONE, *SECOND, "-c:a", "libmp3lame"]),
    "vorbis.ogg": ("audio.ogg", [*TONE, *SECOND, "-c:a", "libvorbis"]),
    "a.opus": ("audio.opus", [*TONE, *SECOND, "-c:a", "libopus"]),
    "a.flac": ("audio.flac", [*TONE, *SECOND, "-c:a", "flac"]),
    "adts.aac": ("audio.aac", [*TONE, *SECOND, "-c:a", "aac", "-f", "adts"]),
    "a.m4a": ("audio.m4a", [*TONE, *SECOND, "-c:a", "aac"]),
    **{
        f"{codec}.wav": ("audio.wav", [*TONE, *SECOND, "-c:a", codec])
        for codec in ("pcm_u8", "pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le")
    },
    "p.png": ("image.png", PICTURE),
    "p.jpg": ("image.jpg", PICTURE),
    "p.tiff": ("image.png", PICTURE),  # Pillow reads a picture by its bytes, whatever the name
    "p.webp": ("image.webp", None),  # by Pillow: not every FFmpeg build has a WebP encoder
    "picture.jpg": ("video.mp4", PICTURE),  # a picture in a video field: a one-frame video
}
FLIPS = 8
# A case past this is a hang (a whole case takes ~10 ms; the child's first one imports the loader).
CASE_TIMEOUT_S, FIRST_CASE_TIMEOUT_S = 15.0, 120.0

WORKER = """
import hashlib, json, sys
from megatron_cosmos3.data.clips import MediaConfig
from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.media import encode_json
from megatron_cosmos3.data.schema import decode_sample

meta = encode_json({"schema": 1, "caption": "a test pattern"})
configs = {"whole": MediaConfig(), "clip": MediaConfig(fps=24, clip_seconds=0.2)}
for case in json.load(open(sys.argv[1])):
    print(json.dumps({"started": case["id"]}), flush=True)
    raw = {"__key__": "k", "meta.json": meta, case["field"]: open(case["path"], "rb").read()}
    try:
        sample = decode_sample(raw, media_config=configs[case["config"]], draw=0.5)
        arrays = [a for a in (sample.image, sample.video, sample.audio) if a is not None]
        digest = hashlib.sha256(b"".join(a.tobytes() + str(a.shape).encode() for a in arrays)).hexdigest()
        out = {"outcome": "decoded", "digest": digest}
    except SampleError as error:
        out = {"outcome": "skip", "reason": error.reason, "detail": error.detail}
    except BaseException as error:
        out = {"outcome": "raised", "error": f"{type(error).__name__}: {error}"}
    print(json.dumps({"id": case["id"], **out}), flush=True)
"""


def _damaged(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    """The file cut at eight places (inside its header, a quarter, half and three quarters in, its
    last 16, 4 and 1 bytes gone) and ``FLIPS`` copies with 1-6 bits flipped and 1-8 bytes replaced
    by seeded draws."""
    n = len(data)
    cuts = sorted({min(cut, n - 1) for cut in (5, 40, n // 4, n // 2, 3 * n // 4, n - 16, n - 4, n - 1)})
    cases = [(f"cut{cut}", data[:cut]) for cut in cuts]
    rng = np.random.default_rng(seed)
    for flip in range(FLIPS):
        damaged = bytearray(data)
        for at in rng.integers(0, n, int(rng.integers(1, 7))).tolist():
            damaged[at] ^= 1 << int(rng.integers(0, 8))
        at = int(rng.integers(0, n - 8))
        damaged[at : at + int(rng.integers(1, 9))] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        cases.append((f"flip{flip}", bytes(damaged)))
    return cases


def _run(cases: list[dict], listed: Path) -> dict[str, dict]:
    """Each case's outcome from one child process (the cases written to ``listed``); a case past its
    timeout kills the child and fails the test naming it."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    listed.write_text(json.dumps(cases))
    child = subprocess.Popen([sys.executable, "-c", WORKER, str(listed)], stdout=subprocess.PIPE, text=True, env=env)
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    outcomes, started, timeout = {}, None, FIRST_CASE_TIMEOUT_S
    try:
        while len(outcomes) < len(cases):
            began = time.monotonic()
            if not selector.select(timeout):
                pytest.fail(f"{started}: no verdict within {time.monotonic() - began:.0f} s (a hang)")
            line = child.stdout.readline()
            assert line, f"the child process ended at {started} (exit status {child.wait()})"
            report = json.loads(line)
            if "started" in report:
                started, timeout = report["started"], timeout if started is None else CASE_TIMEOUT_S
            else:
                outcomes[report["id"]], timeout = report, CASE_TIMEOUT_S
    finally:
        child.kill()
        child.wait()
    return outcomes


def test_every_damaged_file_decodes_or_is_a_skip_naming_its_member(tmp_path):
    cases = []
    for number, (file, (field, options)) in enumerate(sorted(FILES.items())):
        path = tmp_path / file
        if options is None:
            pixels = np.random.default_rng(number).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, lossless=True)
        else:
            subprocess.run(["ffmpeg", "-v", "error", "-y", *options, str(path)], check=True)
        for label, data in [("whole", path.read_bytes()), *_damaged(path.read_bytes(), seed=number)]:
            case_path = tmp_path / f"{label}.{file}"
            case_path.write_bytes(data)
            for config in ("whole", "clip"):
                cases.append(
                    {"id": f"{file} {label} {config}", "path": str(case_path), "field": field, "config": config}
                )
    outcomes = _run(cases, tmp_path / "cases.json")
    problems = []
    for case in cases:
        outcome, (file, label, config) = outcomes[case["id"]], case["id"].split()
        if outcome["outcome"] == "raised":
            problems.append(f"{case['id']}: raised {outcome['error']}")
        elif outcome["outcome"] == "skip" and (
            outcome["reason"] not in ERROR_REASONS or not outcome["detail"].startswith(case["field"])
        ):
            problems.append(f"{case['id']}: a skip of no known reason or not naming {case['field']}: {outcome}")
        elif label == "whole" and outcome["outcome"] != "decoded":
            problems.append(f"{case['id']}: the whole file does not decode (the control): {outcome}")
        elif label.startswith("cut") and outcome["outcome"] == "decoded":
            whole = outcomes[f"{file} whole {config}"]
            if outcome["digest"] != whole.get("digest"):
                problems.append(f"{case['id']}: the cut file decodes to other media than the whole file")
    assert not problems, "\n".join(problems)
    reasons = {outcome.get("reason") for outcome in outcomes.values()}
    assert {"corrupt_media"} <= reasons and any(o["outcome"] == "decoded" for o in outcomes.values())
