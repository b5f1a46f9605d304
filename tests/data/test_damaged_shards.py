"""A deliberately damaged shard set streams through without a crash, and every bad sample or
shard is skipped, counted per reason and per shard exactly, and logged; the error budget stops a
run that reads too much bad data with a message that says what and where."""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import json
import logging
import os
import re
import struct
import tarfile
import zlib
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.io import wavfile
from world_helpers import AUDIO_LATENT_DIM, VIDEO_LATENT_CHANNELS, data_config, model_config, tiny_world

from megatron_cosmos3.data import errors
from megatron_cosmos3.data.config import ErrorBudgetConfig
from megatron_cosmos3.data.errors import DataErrorBudgetExceeded, ErrorBudget, LoaderSetupError, Skip, SkipStats
from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder
from megatron_cosmos3.data.loader import PackedLoader
from megatron_cosmos3.data.media import encode_json, encode_npy, encode_wav
from megatron_cosmos3.data.media_writers import encode_mp4
from megatron_cosmos3.data.schema import Sample, encode_sample
from megatron_cosmos3.data.shard_writer import ShardWriter
from megatron_cosmos3.encoders.audio_vae import num_audio_tokens
from megatron_cosmos3.model.config import EmbodimentConfig

ENCODER = functools.partial(PooledLatentEncoder, VIDEO_LATENT_CHANNELS, AUDIO_LATENT_DIM)
RNG = np.random.default_rng(0)


def _clip(key: str) -> dict:
    return encode_sample(
        Sample(
            key=key,
            caption="a ball bounces",
            instruction="push the ball",
            fps=24.0,
            video=RNG.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
            audio=RNG.uniform(-0.5, 0.5, (2, 9600)).astype(np.float32),
            audio_sample_rate=48_000,
            actions=RNG.normal(size=(2, 19)).astype(np.float32),
            embodiment="single_arm",
            action_rate_hz=10.0,
        )
    )


def _mp4_clip(key: str, frames: int = 5, audio_samples: int = 9600) -> dict:
    """``_clip`` stored as mp4 (H.264 with its audio muxed in as AAC)."""
    return encode_sample(
        Sample(
            key=key,
            caption="a ball bounces",
            fps=24.0,
            video=RNG.integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8),
            audio=RNG.uniform(-0.5, 0.5, (2, audio_samples)).astype(np.float32),
            audio_sample_rate=48_000,
        ),
        video_format="mp4",
    )


def _mp4_actions(actions: np.ndarray) -> dict:
    """``_mp4_clip`` (0.21 s) with ``actions`` at 10 Hz."""
    sample = _meta(_mp4_clip("k"), embodiment="single_arm", action_rate_hz=10.0)
    return _with(sample, "actions.npy", encode_npy(actions))


def _mkv_with_float_sound(peak: float) -> bytes:
    """A 1 s Matroska video whose float PCM sound (a tone) has one sample set to ``peak``."""
    sound = (0.3 * np.sin(np.arange(48_000) / 10)).astype(np.float32)
    sound[1000] = peak
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        video = container.add_stream("libx264", rate=24)
        video.width = video.height = 32
        audio = container.add_stream("pcm_f32le", rate=48_000, layout="mono")
        for i in range(24):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, np.uint8), format="rgb24")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        frame = av.AudioFrame.from_ndarray(sound[None], format="flt", layout="mono")
        frame.sample_rate, frame.pts = 48_000, 0
        container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
    return buffer.getvalue()


def _audio_only_mp4() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48_000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 4800), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 48_000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _frameless_mkv() -> bytes:
    """A readable Matroska file (its sound is there) whose video track holds no frame."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        video = container.add_stream("libx264", rate=24)
        video.width = video.height = 32
        sound = container.add_stream("aac", rate=48_000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 4800), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 48_000, 0
        container.mux(sound.encode(frame))
        container.mux(sound.encode(None))
        container.mux(video.encode(None))
    return buffer.getvalue()


def _mp3(seconds: float) -> bytes:
    """A mono 48 kHz tone as MP3 (LAME writes its length into an Info header)."""
    rate, buffer = 48_000, io.BytesIO()
    with av.open(buffer, "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=rate, layout="mono")
        tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(round(seconds * rate)) / rate)
        frame = av.AudioFrame.from_ndarray(tone[None].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _cut_mp3_clip() -> dict:
    """A 1 s clip whose MP3 sound is cut at 40 %: its header still declares 1 s."""
    sample = {
        k: v for k, v in _video(RNG.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)).items() if k != "audio.wav"
    }
    whole = _mp3(1.0)
    return _with(sample, "audio.mp3", whole[: len(whole) * 2 // 5])


def _mp4_cut_in_its_index() -> dict:
    """``_mp4_clip`` cut 300 bytes into its index (``moov``, written last): one stream is still listed."""
    sample = _mp4_clip("k")
    return _with(sample, "video.mp4", sample["video.mp4"][: sample["video.mp4"].index(b"moov") + 300])


def _latent(key: str) -> dict:
    return encode_sample(
        Sample(
            key=key,
            caption="latent clip",
            fps=30.0,
            video_latent_grid=(2, 1, 1),
            video_latents=RNG.normal(size=(2, VIDEO_LATENT_CHANNELS * 4)).astype(np.float32),
        )
    )


def _latents_with_long_sound() -> dict:
    """``_latent`` (2 latent frames at 30 fps: at most 0.27 s) with 2 s of audio latents."""
    count = 96_000
    rows = RNG.normal(size=(num_audio_tokens(count), AUDIO_LATENT_DIM)).astype(np.float32)
    return _meta(_with(_latent("k"), "audio_latents.npy", encode_npy(rows)), audio_num_samples=count)


def _text(key: str) -> dict:
    return encode_sample(Sample(key=key, caption="just words", question="what?", answer="words"))


def _meta(sample: dict, **changes) -> dict:
    meta = json.loads(sample["meta.json"])
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    return {**sample, "meta.json": encode_json(meta)}


def _with(sample: dict, field: str, value: bytes) -> dict:
    return {**sample, field: value}


def _actions(values: np.ndarray) -> dict:
    return _with(_clip("x"), "actions.npy", encode_npy(values))


def _video(frames: np.ndarray) -> dict:
    return _with(_clip("x"), "video.npy", encode_npy(frames))


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a picture of width x height (a decompression bomb), and no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _float64_latent(value: float) -> dict:
    return _with(_latent("k"), "video_latents.npy", encode_npy(np.full((2, VIDEO_LATENT_CHANNELS * 4), value)))


def _float_wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    wavfile.write(buffer, 48_000, samples.T)
    return buffer.getvalue()


def _wav_declaring(extra_bytes: int) -> dict:
    """``_clip`` whose WAV header declares ``extra_bytes`` more sample data than the file holds."""
    sample = _clip("k")
    wav = bytearray(sample["audio.wav"])
    at = wav.index(b"data") + 4
    wav[at : at + 4] = struct.pack("<I", struct.unpack("<I", wav[at : at + 4])[0] + extra_bytes)
    return _with(sample, "audio.wav", bytes(wav))


def _wav_of_4_bit_samples() -> dict:
    """``_clip`` whose mono WAV's format chunk says its samples have 4 bits: 0 bytes per second and
    a block of 0 bytes (what the header of such a file computes to)."""
    sample = _clip("k")
    wav = bytearray(sample["audio.wav"])
    at = wav.index(b"fmt ") + 8  # channels at +2, byte rate at +8, block size at +12, bits at +14
    wav[at + 8 : at + 16] = struct.pack("<IHH", 0, 0, 4)
    return _with(sample, "audio.wav", bytes(wav))


DEEP_JSON = b'{"a":' * 10**5 + b"1" + b"}" * 10**5
BOMB_PNG = _png_header_claiming(10**5, 10**5)


# Every kind of bad sample, with the reason the loader must give it.
BAD_SAMPLES = {
    "corrupt_png": ("corrupt_media", lambda: _with(_text("k"), "image.png", b"\x89PNG\r\n\x1a\nnot really")),
    "corrupt_npy": ("corrupt_media", lambda: _with(_clip("k"), "video.npy", _clip("k")["video.npy"][:200])),
    "corrupt_wav": ("corrupt_media", lambda: _with(_clip("k"), "audio.wav", b"RIFF\x00\x00")),
    # A WAV header that declares more samples than follow it (a cut file, or a lying header), and one
    # with no samples at all.
    "wav_cut_short": ("corrupt_media", lambda: _wav_declaring(4000)),
    # A format chunk of 4-bit samples: scipy divided the data's size by the 0 bytes of a sample.
    "wav_4_bit_samples": ("corrupt_media", _wav_of_4_bit_samples),
    "wav_without_samples": (
        "zero_length",
        lambda: _with(_clip("k"), "audio.wav", encode_wav(np.zeros((1, 0)), 48_000)),
    ),
    "no_meta": ("missing_field", lambda: {k: v for k, v in _clip("k").items() if k != "meta.json"}),
    "video_without_fps": ("missing_field", lambda: _meta(_clip("k"), fps=None)),
    "unknown_file": ("extra_field", lambda: _with(_clip("k"), "depth.npy", encode_npy(np.zeros(3)))),
    "unknown_meta_key": ("extra_field", lambda: _meta(_clip("k"), colour="red")),
    "meta_not_json": ("bad_metadata", lambda: {**_clip("k"), "meta.json": b"{not json"}),
    "rgba_video": ("wrong_shape", lambda: _video(np.zeros((5, 32, 32, 4), np.uint8))),
    "narrow_actions": ("wrong_shape", lambda: _actions(np.zeros((2, 18), np.float32))),
    "float_video": ("wrong_dtype", lambda: _video(np.zeros((5, 32, 32, 3), np.float32))),
    "int_actions": ("wrong_dtype", lambda: _actions(np.zeros((2, 19), np.int64))),
    "nan_actions": ("non_finite", lambda: _actions(np.full((2, 19), np.nan, np.float32))),
    "inf_actions": ("non_finite", lambda: _actions(np.full((2, 19), np.inf, np.float32))),
    "empty_video": ("zero_length", lambda: _video(np.zeros((0, 32, 32, 3), np.uint8))),
    "empty_actions": ("zero_length", lambda: _actions(np.zeros((0, 19), np.float32))),
    "quadruped": ("unknown_embodiment", lambda: _meta(_clip("k"), embodiment="quadruped")),
    # Values float32 cannot hold (inf after the cast) and rates that put positions nowhere near 0..300.
    "float64_actions_beyond_float32": ("out_of_range", lambda: _actions(np.full((2, 19), 1e300))),
    "float64_latents_beyond_float32": ("out_of_range", lambda: _float64_latent(-1e39)),
    "fps_1e-9": ("out_of_range", lambda: _meta(_clip("k"), fps=1e-9)),
    "fps_1e12": ("out_of_range", lambda: _meta(_latent("k"), fps=1e12)),
    "mp4_at_0.05_fps": (
        "out_of_range",
        lambda: _with(_text("k"), "video.mp4", encode_mp4(np.zeros((2, 32, 32, 3), np.uint8), Fraction(1, 20))),
    ),
    "schema_true": ("bad_metadata", lambda: _meta(_text("k"), schema=True)),
    "action_rate_1e-9": ("out_of_range", lambda: _meta(_clip("k"), action_rate_hz=1e-9)),
    "latent_grid_side_2e9": ("out_of_range", lambda: _meta(_latent("k"), video_latent_grid=[2, 1, 2_000_000_000])),
    # Library failures on untrusted bytes are data reasons, not internal errors.
    "json_nested_too_deep": ("bad_metadata", lambda: _with(_text("k"), "meta.json", DEEP_JSON)),
    "png_decompression_bomb": ("corrupt_media", lambda: _with(_text("k"), "image.png", BOMB_PNG)),
    "caption_lone_surrogate": ("bad_metadata", lambda: _meta(_text("k"), caption="bad \ud800 text")),
    # Text of only whitespace and control characters is no text: a sample of nothing else is empty.
    "caption_blank": ("missing_field", lambda: _meta(_text("k"), caption=" \t\u200b", question=None, answer=None)),
    # Compressed media: broken, cut short, without a picture or a frame, a codec FFmpeg cannot decode,
    # sound much longer than the picture.
    "corrupt_mp4": ("corrupt_media", lambda: _with(_mp4_clip("k"), "video.mp4", b"\x00\x00\x00\x18ftypmp42" * 40)),
    "truncated_mp4": ("corrupt_media", lambda: _with(_mp4_clip("k"), "video.mp4", _mp4_clip("k")["video.mp4"][:900])),
    "mp4_cut_in_its_index": ("corrupt_media", _mp4_cut_in_its_index),
    "mp3_cut_short": ("corrupt_media", _cut_mp3_clip),
    "mp4_without_video": ("missing_stream", lambda: _with(_text("k"), "video.mp4", _audio_only_mp4())),
    "mkv_without_frames": ("zero_length", lambda: _with(_text("k"), "video.mkv", _frameless_mkv())),
    "mp4_unknown_codec": ("unsupported_codec", lambda: _unknown_codec(_mp4_clip("k"))),
    "mp4_sound_longer": ("duration_mismatch", lambda: _mp4_clip("k", frames=5, audio_samples=48_000)),
    # Sound no encoder can take: NaN in a video file's float PCM, a float WAV sample at 1e30.
    "mkv_sound_nan": ("non_finite", lambda: _with(_text("k"), "video.mkv", _mkv_with_float_sound(np.nan))),
    "wav_sample_1e30": (
        "out_of_range",
        lambda: _with(_clip("k"), "audio.wav", _float_wav(np.full((1, 9600), 1e30, np.float32))),
    ),
    # 3 s of actions for 0.2 s of video: a video at another rate or length than the episode's
    "mp4_actions_longer": ("duration_mismatch", lambda: _mp4_actions(np.zeros((30, 19), np.float32))),
    # The same for raw frames, WAV and latents, where lengths disagree by far more than a frame or a
    # step (npy/WAV shards written before the check, a frame or a step apart, keep loading).
    "npy_wav_much_longer": (
        "duration_mismatch",
        lambda: _with(_clip("k"), "audio.wav", encode_wav(np.zeros((1, 48_000)), 48_000)),
    ),
    "npy_actions_longer": ("duration_mismatch", lambda: _actions(np.zeros((30, 19), np.float32))),
    "latents_audio_longer": ("duration_mismatch", _latents_with_long_sound),
    "audio_only": (
        "no_task",
        lambda: (
            {k: v for k, v in _clip("k").items() if k not in ("video.npy", "actions.npy")}
            | {"meta.json": encode_json({"schema": 1})}
        ),
    ),
}


def _unknown_codec(sample: dict) -> dict:
    """The mp4 with its H.264 sample entry renamed to a four-character code no decoder knows."""
    return _with(sample, "video.mp4", sample["video.mp4"].replace(b"avc1", b"zzzz"))


def _write(directory, samples: list[dict]) -> str:
    with ShardWriter(directory, "part", max_samples_per_shard=100, validate=False) as writer:
        for i, sample in enumerate(samples):
            writer.write_raw({**sample, "__key__": f"s{i:03d}"})
    return str(writer.index.shards[0].url)


def _member_offsets(path: str) -> list[tuple[str, int, int]]:
    with tarfile.open(path) as archive:
        return [(m.name, m.offset_data, m.size) for m in archive.getmembers()]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """{directory: (shard url, expected Counter of skips)} and the expected number of usable samples."""
    root = tmp_path_factory.mktemp("damaged")
    expected, shards = {}, {}
    good = [_clip("g"), _latent("g"), _text("g"), _mp4_clip("g")]
    mixed = good + [make() for _, make in BAD_SAMPLES.values()]
    shards["mixed"] = _write(root / "mixed", mixed)
    expected["mixed"] = Counter(reason for reason, _ in BAD_SAMPLES.values())

    # Data ends inside sample 3's first member: samples 0-2 are used, 3 is the truncated one, 4 is lost.
    url = _write(root / "cut_in_member", [_latent(str(i)) for i in range(5)])
    name, offset, _ = next(m for m in _member_offsets(url) if m[0].startswith("s003."))
    data = open(url, "rb").read()
    open(url, "wb").write(data[: offset + 10])
    shards["cut_in_member"], expected["cut_in_member"] = url, Counter(truncated_shard=1, lost_to_truncation=1)

    # Cut cleanly after sample 2's last member, no end-of-archive block: 0-1 used, 2 truncated, 3-4 lost.
    url = _write(root / "cut_at_member", [_latent(str(i)) for i in range(5)])
    name, offset, size = [m for m in _member_offsets(url) if m[0].startswith("s002.")][-1]
    data = open(url, "rb").read()
    open(url, "wb").write(data[: offset + -(-size // 512) * 512])
    shards["cut_at_member"], expected["cut_at_member"] = url, Counter(truncated_shard=1, lost_to_truncation=2)

    url = _write(root / "not_a_tar", [_latent(str(i)) for i in range(4)])
    open(url, "wb").write(b"garbage" * 1000)
    shards["not_a_tar"], expected["not_a_tar"] = url, Counter(unreadable_shard=4)

    url = _write(root / "missing", [_latent(str(i)) for i in range(4)])
    (root / "missing" / url.rsplit("/", 1)[1]).unlink()
    shards["missing"], expected["missing"] = url, Counter(unreadable_shard=4)

    # A member repeated within a sample (written by hand: WebDataset writers cannot do it).
    url = str(root / "duplicate.tar")
    with tarfile.open(url, "w") as archive:
        meta = b'{"schema": 1, "caption": "x"}'
        members = [("a.meta.json", meta), ("a.meta.json", meta), ("b.meta.json", meta)]
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    shards["duplicate"], expected["duplicate"] = url, Counter(extra_field=1)

    sources = [str(root / d) for d in ("mixed", "cut_in_member", "cut_at_member", "not_a_tar", "missing")] + [url]

    # The same sample key twice, apart: the whole sample is one skip (its first part is withdrawn).
    url = str(root / "duplicate_key.tar")
    open(url, "wb").write(_tar_bytes([_text("a"), _text("b"), _text("a")]))
    shards["duplicate_key"], expected["duplicate_key"] = url, Counter(duplicate_key=1)
    sources.append(url)

    # Members a reader must not trust: names that climb out or are absolute, links (the sample they
    # belong to is skipped; directories are ignored); "d" is used.
    url = str(root / "unsafe_members.tar")
    meta = _text("x")["meta.json"]
    with tarfile.open(url, "w") as archive:
        for name, kind in [
            ("../a", None),
            ("/abs/b", None),
            ("c", tarfile.SYMTYPE),
            ("e", tarfile.LNKTYPE),
            ("dir", "d"),
            ("dir/d", None),
        ]:
            info = tarfile.TarInfo(name if kind == "d" else f"{name}.meta.json")
            if kind == "d":
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
                continue
            if kind is not None:
                info.type, info.linkname = kind, "/etc/passwd"
                archive.addfile(info)
                continue
            info.size = len(meta)
            archive.addfile(info, io.BytesIO(meta))
    shards["unsafe_members"], expected["unsafe_members"] = url, Counter(unsafe_member=4)
    sources.append(url)

    # A destroyed member header (sample 2's first), uncompressed and gzipped, read without an index:
    # sample 1 (which may lack members after the damage) is damaged, the destroyed header and sample
    # 2's data are one stray_bytes, and reading goes on at sample 3's header; 3 follows whole blocks
    # passed over (they may stand in place of its first members): damaged too. Sample 0 is used.
    for name, compress in (("damaged_header.tar", bytes), ("damaged_header.tar.gz", gzip.compress)):
        data = bytearray(_tar_bytes([_text(str(i)) for i in range(4)]))
        offset = next(m.offset for m in tarfile.open(fileobj=io.BytesIO(data)) if m.name.startswith("2."))
        data[offset : offset + 512] = b"\xa5" * 512
        url = str(root / name)
        open(url, "wb").write(compress(bytes(data)))
        shards[name], expected[name] = url, Counter(damaged_shard=2, stray_bytes=1)
        sources.append(url)

    # Compressed in several streams (cat a.gz b.gz, bgzip, pbzip2), split inside a sample: every
    # sample is read (tarfile's own decompression stopped after the first stream, silently).
    for name, compress in (("multi_member.tar.gz", gzip.compress), ("multi_stream.tar.bz2", bz2.compress)):
        data = _tar_bytes([_text(str(i)) for i in range(4)])
        url = str(root / name)
        open(url, "wb").write(compress(data[:1700]) + compress(data[1700:]))
        sources.append(url)

    # An index that lists fewer samples than the shard holds: reported once, the samples are used.
    _write(root / "short_index", [_text(str(i)) for i in range(3)])
    index = json.loads((root / "short_index" / "index.json").read_text())
    index["shards"][0]["samples"] = 2
    (root / "short_index" / "index.json").write_text(json.dumps(index))
    shards["short_index"] = str(root / "short_index" / index["shards"][0]["url"])
    expected["short_index"] = Counter(index_mismatch=1)
    sources.append(str(root / "short_index"))

    used = 4 + 3 + 2 + 0 + 0 + 1 + 1 + 1 + 1 + 1 + 4 + 4 + 3
    return sources, {shards[k]: expected[k] for k in shards}, used


def _tar_bytes(samples: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for sample in samples:
            for field, payload in sample.items():
                if not field.startswith("__"):
                    info = tarfile.TarInfo(f"{sample['__key__']}.{field}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_shards_give_exact_skip_counts(damaged, workers, caplog):
    sources, expected, used = damaged
    config = data_config(sources, epochs=1, num_workers=workers, tokens_per_pack=4096)
    with caplog.at_level(logging.WARNING):
        with PackedLoader(config, model_config(), latent_encoder_factory=ENCODER) as loader:
            packs = list(loader)
    assert sum(p.num_samples for p in packs) == loader.stats.used == used
    assert {shard: Counter(counts) for shard, counts in loader.stats.per_shard.items()} == expected
    assert loader.stats.per_reason == sum(expected.values(), Counter())
    assert loader.stats.filtered == 1 and loader.stats.errors == sum(expected.values(), Counter()).total() - 1
    assert "internal_error" not in loader.stats.per_reason
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for shard in expected:
        assert shard in logged, "every shard with skips is logged"


def test_error_budget_stops_the_run_with_a_clear_message(damaged):
    sources, _, _ = damaged
    config = data_config(sources, epochs=1, error_budget=ErrorBudgetConfig(0.2, 10))
    with PackedLoader(config, model_config(), latent_encoder_factory=ENCODER) as loader:
        with pytest.raises(DataErrorBudgetExceeded) as raised:
            list(loader)
    message = str(raised.value)
    assert "samples read are bad (budget 20.0%, data.error_budget.max_error_fraction)" in message
    assert "skips: " in message and "worst shards: " in message


def test_seen_counts_samples_read_never_a_shards_events_or_the_samples_it_lost():
    """``seen`` is samples read (the budget's "samples read"): an unreadable shard, stray bytes, an
    index mismatch and the samples a cut shard never reached are no sample read; they counted as some."""
    stats = SkipStats(used=6)
    skips = [
        Skip("unreadable.tar", "", "unreadable_shard", "not a tar archive"),
        Skip("junk.tar", "", "stray_bytes", "512 bytes"),
        Skip("junk.tar", "", "stray_bytes", "1024 bytes"),
        Skip("junk.tar", "", "index_mismatch", "the index lists 2"),
        Skip("cut.tar", "", "lost_to_truncation", "the index lists 5", count=3),
        Skip("cut.tar", "k", "truncated_shard", "data ends inside a member"),
        Skip("junk.tar", "a", "split_sample", "members apart"),
        Skip("junk.tar", "b", "corrupt_media", "not a video"),
        Skip("junk.tar", "c", "too_long", "too long"),
    ]
    for skip in skips:
        stats.record(skip)
    assert (stats.seen, stats.bad, stats.filtered, stats.lost) == (6 + 3 + 1, 3, 1, 1 + 3)
    assert stats.errors == 10  # every error skip, as data/skipped/<reason> sums them
    assert stats.error_fraction() == (3 + 4) / (10 + 4)  # lost samples are bad ones, events no sample
    assert stats.summary().startswith("6 used, 3 bad, 1 filtered of 10 samples read, 4 lost with unreadable or cut")
    # Bytes that are no tar between whole samples never make a run's data bad.
    junk = SkipStats(used=200)
    for _ in range(50):
        junk.record(Skip("junk.tar", "", "stray_bytes", "512 bytes"))
    assert junk.seen == 200 and junk.error_fraction() == 0.0
    ErrorBudget(0.05, 10).check(junk)
    # Every shard unreadable: nothing read, and the run still stops instead of reading on for ever.
    unreadable = SkipStats()
    for n in range(10):
        unreadable.record(Skip(f"{n}.tar", "", "unreadable_shard", "missing on disk"))
    assert unreadable.seen == 0
    with pytest.raises(DataErrorBudgetExceeded, match="none of the 0 samples read .* 10 lost with unreadable"):
        ErrorBudget(0.05, 10).check(unreadable)


def test_design_lists_every_skip_reason_once_in_its_kind():
    """docs/DESIGN.md's list of skip reasons names each of errors.py's, under the kind the counts use."""
    design = (Path(__file__).parents[2] / "docs" / "DESIGN.md").read_text()
    listed = design[design.index("**Skips and the error budget**") : design.index("**Seeds.**")]
    named = re.findall(r"`([a-z_]+)`", listed)
    assert sorted(set(named) & set(errors.ERROR_REASONS + errors.FILTER_REASONS)) == sorted(
        errors.ERROR_REASONS + errors.FILTER_REASONS
    )
    read = re.findall(r"`([a-z_]+)`", listed.split("filtered (valid")[0])
    events = re.findall(r"`([a-z_]+)`", listed.split("Events of a shard")[1].split("samples a shard never gave")[0])
    lost = re.findall(r"`([a-z_]+)`", listed.split("samples a shard never gave")[1].split("SkipStats")[0])
    assert not set(errors.NOT_READ) & set(read)
    assert set(events) >= set(errors.SHARD_EVENTS) and set(lost) >= set(errors.LOST)


def test_a_stage_that_can_use_nothing_stops_instead_of_reading_forever(damaged):
    sources, _, _ = damaged
    # No sample of the set holds a (readable) still image.
    config = data_config(sources, tasks={"text_to_image": 1.0}, error_budget=ErrorBudgetConfig(1.0, 10))
    with PackedLoader(config, model_config(), latent_encoder_factory=ENCODER) as loader:
        with pytest.raises(DataErrorBudgetExceeded, match="none of the .* samples read is usable by this stage"):
            next(loader)


def test_raw_media_without_an_encoder_is_a_setup_error_not_a_skip():
    config = data_config([str(tiny_world()["raw"])], tasks={"text_to_video": 1.0})
    with PackedLoader(config, model_config()) as loader, pytest.raises(LoaderSetupError, match="no latent encoder"):
        next(loader)


@pytest.mark.parametrize("field", ["video_latent_channels", "audio_latent_dim"])
def test_latents_of_another_width_than_the_models_are_a_setup_error_naming_the_dataset(field):
    """The world's latents record their widths (4 channels, 6 dims): a model of other widths stops
    at the first sample, naming the dataset, the field and both values, not one wrong_shape at a time."""
    config = data_config([str(tiny_world()["latent"])], tasks={"text_to_audio_video": 1.0})
    other = model_config()
    setattr(other, field, getattr(other, field) + 2)
    width = getattr(other, field) - 2
    message = rf"dataset 'world' \(shard .*\): sample .*{field}={width}, but model.{field}={width + 2}\b"
    with PackedLoader(config, other) as loader, pytest.raises(LoaderSetupError, match=message):
        next(loader)


def test_actions_at_another_rate_than_the_models_embodiment_are_a_setup_error_naming_the_dataset():
    """The world's single-arm actions are 10 Hz: a model whose single_arm acts at 15 Hz would learn
    them at 10 and generate at 15, so the loader stops naming the dataset and both rates."""
    config = data_config([str(tiny_world()["latent"])], tasks={"inverse_dynamics": 1.0})
    faster = model_config()
    faster.embodiments["single_arm"] = EmbodimentConfig(19, 15.0)
    message = r"dataset 'world' \(shard .*\): sample .*'single_arm' actions are sampled at 10 Hz .*rate_hz=15\b"
    with PackedLoader(config, faster) as loader, pytest.raises(LoaderSetupError, match=message):
        next(loader)
    with PackedLoader(config, model_config()) as loader:  # control: the world's own rates load
        assert next(loader).dm_tokens.keys() >= {"action/single_arm"}


def test_shards_missing_on_disk_are_counted_when_read_and_all_missing_is_a_setup_error(tmp_path, caplog):
    """A local shard gone from disk is one counted, logged unreadable_shard when its slot reads it
    ("missing on disk"); an index whose local shards are all gone is a setup error naming the
    dataset; remote URLs are not checked."""
    with ShardWriter(tmp_path / "set", "part", max_samples_per_shard=2) as writer:
        for i in range(6):
            writer.write(Sample(key=f"s{i}", caption="words"))
    urls = [shard.url for shard in writer.index.shards]
    config = data_config([str(tmp_path / "set")], tasks={"understanding": 1.0}, epochs=1)
    Path(urls[1]).unlink()
    with caplog.at_level(logging.WARNING, logger="megatron_cosmos3.data.loader"):
        with PackedLoader(config, model_config()) as loader:
            assert sum(pack.ar_token_ids.numel() > 0 for pack in loader) > 0
            assert loader.stats.per_shard[urls[1]] == Counter(unreadable_shard=2)  # its 2 indexed samples
            assert loader.stats.used == 4
    warnings = [r.getMessage() for r in caplog.records if "missing on disk" in r.getMessage()]
    assert len(warnings) == 1 and urls[1] in warnings[0], warnings
    for url in (urls[0], urls[2]):
        Path(url).unlink()
    with pytest.raises(LoaderSetupError, match=r"dataset 'world': none of its 3 shards is on disk"):
        PackedLoader(config, model_config())
    # Remote shards and pipes are read, not stat'ed: set-up does not refuse them.
    remote = data_config(["http://127.0.0.1:9/shard-{0..1}.tar", "pipe:cat /nowhere.tar"], tasks={"understanding": 1.0})
    PackedLoader(remote, model_config()).close()


def test_an_index_of_many_shards_is_not_stated_shard_by_shard(tmp_path, monkeypatch):
    """Checking a config and building a loader over an index of 2,000 shards stats no more than
    the first shard (on a parallel file system, one stat per shard per rank per loader build is a
    metadata storm): a missing one is found when read (test above)."""
    from megatron_cosmos3.data.shards import ShardIndex, ShardInfo

    folder = tmp_path / "many"
    folder.mkdir()
    shards = tuple(ShardInfo(str(folder / f"part-{i:06d}.tar"), 2, 10_240) for i in range(2_000))
    for shard in shards:
        with open(shard.url, "wb") as f:
            f.truncate(10_240)  # sparse, as large as indexed
    ShardIndex(shards).save(folder)
    config = data_config([str(folder)], tasks={"understanding": 1.0})
    stated = Counter()
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        if str(path).endswith(".tar"):
            stated[str(path)] += 1
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    assert len(ShardIndex.load(folder).shards) == 2_000
    config.check_paths()
    PackedLoader(config, model_config()).close()
    assert sum(stated.values()) <= 1, f"{sum(stated.values())} stats of {len(stated)} shards"


def test_a_member_above_the_size_bound_is_an_out_of_range_skip_and_is_not_read(tmp_path, monkeypatch):
    """A gzipped shard's member can declare far more than the file holds (a gzip bomb), and members
    are read whole into memory: above MAX_MEMBER_BYTES its sample is an out_of_range skip naming the
    member, its bytes passed over unread; the samples around it are read. (The bound is lowered here:
    a real 4 GiB member would take the test minutes.)"""
    from megatron_cosmos3.data import shards

    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 4096)
    big = {**_text("b"), "__key__": "b", "video.npy": bytes(5000)}
    url = tmp_path / "bomb.tar.gz"
    url.write_bytes(gzip.compress(_tar_bytes([{**_text("a"), "__key__": "a"}, big, {**_text("c"), "__key__": "c"}])))
    read = []
    real_extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(
        tarfile.TarFile, "extractfile", lambda self, member: read.append(member.name) or real_extract(self, member)
    )
    a, b, c = shards.read_shard(str(url))
    assert a["__key__"] == "a" and c["__key__"] == "c"
    assert (b.key, b.reason) == ("b", "out_of_range"), b
    assert "member 'b.video.npy' declares 5,000 bytes, more than MAX_MEMBER_BYTES=4,096" in b.detail
    assert "b.video.npy" not in read and "b.meta.json" in read
