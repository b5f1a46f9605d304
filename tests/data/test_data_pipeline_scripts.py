"""The operator scripts of data_pipelines/: pre-encoding with the frozen VAEs gives exactly the
VAEs' latents and a shard set the loader reads; a manifest of loose files becomes validated
shards; the inspector counts usable and bad samples."""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from world_helpers import AUDIO_LATENT_DIM, VIDEO_LATENT_CHANNELS, data_config, load_script, model_config, tiny_world

from megatron_cosmos3.data.latent_encoders import VAELatentEncoder, encodable_pixels
from megatron_cosmos3.data.loader import PackedLoader
from megatron_cosmos3.data.media import encode_npy, encode_png, encode_wav
from megatron_cosmos3.data.media_writers import encode_mp4
from megatron_cosmos3.data.schema import decode_sample
from megatron_cosmos3.data.shard_writer import PROCESSES_PER_CPU, process_count, run_split
from megatron_cosmos3.data.shards import ShardIndex, read_shard
from megatron_cosmos3.encoders.audio_vae import AudioVAE
from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
from megatron_cosmos3.encoders.video_vae import VideoVAE
from megatron_cosmos3.testing.tiny_vaes import tiny_oobleck_vae, tiny_wan_vae
from megatron_cosmos3.world.world import WorldConfig

pytestmark = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def vae_folders(tmp_path_factory):
    """Tiny random frozen VAEs with the real structure (16x spatial, 4x temporal; hop 1920)."""
    root = tmp_path_factory.mktemp("vaes")
    z = VIDEO_LATENT_CHANNELS
    tiny_wan_vae(z, latents_mean=[0.1] * z, latents_std=[2.0] * z).save_pretrained(root / "video")
    tiny_oobleck_vae(AUDIO_LATENT_DIM).save_pretrained(root / "audio")
    return LatentEncoderConfig(
        online=True, video_vae_path=str(root / "video"), audio_vae_path=str(root / "audio"), dtype="float32"
    )


@pytest.fixture(scope="module")
def vae_latents(tmp_path_factory, vae_folders):
    """The tiny world's raw shards pre-encoded by the VAEs, in shards of the same size."""
    out = tmp_path_factory.mktemp("vae_latents")
    encoder = VAELatentEncoder.from_config(vae_folders)
    skipped = load_script("encode_shards").encode_shards(tiny_world()["raw"], out, encoder, shard_size=6)
    assert not skipped
    return out


def test_pre_encoding_writes_the_vaes_latents_and_the_loader_reads_them(vae_latents, vae_folders):
    raw, latent = tiny_world()["raw"], vae_latents
    assert ShardIndex.load(latent).total_samples == ShardIndex.load(raw).total_samples
    original = decode_sample(
        next(
            r for r in read_shard(ShardIndex.load(raw).shards[0].url) if b"video.npy" in b"".join(k.encode() for k in r)
        )
    )
    encoded = next(
        decode_sample(r) for r in read_shard(ShardIndex.load(latent).shards[0].url) if r["__key__"] == original.key
    )
    video_vae = VideoVAE.from_pretrained(vae_folders.video_vae_path)
    want = video_vae.encode(encodable_pixels(original.video), original.fps)
    assert encoded.video_latent_grid == want.grid_thw and np.array_equal(encoded.video_latents, want.tokens.numpy())
    audio = AudioVAE.from_pretrained(vae_folders.audio_vae_path).encode(torch.from_numpy(original.audio), 48_000)
    assert np.array_equal(encoded.audio_latents, audio.tokens.numpy())
    np.testing.assert_array_equal(encoded.observation, original.video[0])
    assert (latent / "action_stats.json").is_file()
    with PackedLoader(data_config([str(latent)], epochs=1), model_config()) as loader:
        assert sum(batch.num_samples for batch in loader) == loader.stats.used == 48


def test_online_vae_encoding_in_workers_matches_the_pre_encoded_stream(vae_latents, vae_folders):
    """Raw shards encoded by the frozen VAEs inside 2 workers give the packs the pre-encoded shards give."""
    small = dict(shuffle_buffer=0, pool_size=4)
    online = data_config([str(tiny_world()["raw"])], num_workers=2, encoders=vae_folders, **small)
    offline = data_config([str(vae_latents)], **small)
    with PackedLoader(online, model_config()) as a, PackedLoader(offline, model_config()) as b:
        for _ in range(3):
            x, y = next(a), next(b)
            assert torch.equal(x.ar_token_ids, y.ar_token_ids) and torch.equal(x.dm_positions, y.dm_positions)
            for key in x.dm_tokens:
                torch.testing.assert_close(x.dm_tokens[key], y.dm_tokens[key], rtol=0, atol=0)


def test_online_vae_encoding_makes_tokens_of_the_models_patch(vae_folders):
    """The loader's VAEs take the model's video_patch_size (one source): patch-1 tokens of 16x16 pixels."""
    config = dataclasses.replace(model_config(), video_patch_size=1)
    tasks = {"text_to_video": 1.0}
    online = data_config([str(tiny_world()["raw"])], tasks=tasks, encoders=vae_folders, shuffle_buffer=0, pool_size=1)
    with PackedLoader(online, config) as loader:
        pack = next(loader)
    video = pack.dm_tokens["video"]
    assert video.shape[1] == VIDEO_LATENT_CHANNELS  # 2x2 tokens of the 32x32 world: C * 1 * 1 wide
    encoder = VAELatentEncoder.from_config(vae_folders, 1)
    assert encoder.video_token_dim == VIDEO_LATENT_CHANNELS and encoder.video_vae.pixels_per_token == 16


def test_a_manifest_of_loose_files_becomes_validated_shards(tmp_path):
    write_shards, inspect_shards = load_script("write_shards"), load_script("inspect_shards")
    rng = np.random.default_rng(0)
    (tmp_path / "clip.npy").write_bytes(encode_npy(rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)))
    # 0.375 s of sound for the 9 frames at 24 fps (lengths that disagree are a duration_mismatch)
    (tmp_path / "clip.wav").write_bytes(encode_wav(rng.uniform(-1, 1, (1, 16_538)).astype(np.float32), 44_100))
    (tmp_path / "still.png").write_bytes(encode_png(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)))
    (tmp_path / "bad.npy").write_bytes(encode_npy(np.zeros((2, 5), np.float32)))
    entries = [
        {"key": "clip", "caption": "a clip", "video": "clip.npy", "fps": 24, "audio": "clip.wav"},
        {"key": "still", "caption": "a still", "image": "still.png"},
        {"key": "no_fps", "caption": "x", "video": "clip.npy"},
        {"key": "bad_actions", "caption": "x", "actions": "bad.npy", "embodiment": "single_arm", "action_rate_hz": 10},
        {"key": "gone", "caption": "x", "image": "missing.png"},
        {"key": "endless", "caption": "x", "video": "/dev/zero"},  # a device: read without end before
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(e) for e in entries))
    index, skipped = write_shards.write_shards(tmp_path / "manifest.jsonl", tmp_path / "shards")
    assert index.total_samples == 2 and skipped == {"missing_field": 1, "wrong_shape": 1, "unreadable_entry": 2}
    usable, bad = inspect_shards.verify_shard(index.shards[0])
    assert usable == 2 and not bad
    assert inspect_shards.main([str(tmp_path / "shards"), "--verify"]) == 0


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("generate_world", ["{tmp}/new", "--samples", "-3"], "samples=-3, shard_size=32 and workers=1 must be >= 1"),
        ("generate_world", ["{tmp}/new", "--shard-size", "0"], "shard_size=0"),
        # numpy's 'expected non-negative integer', from inside a worker, named no flag
        ("generate_world", ["{tmp}/new", "--seed", "-1"], "seed=-1 must be an integer in [0, 2**63 - 1]"),
        ("generate_world", ["{tmp}/new", "--duration", "-1"], "duration_s=-1.0 must be > 0"),
        ("generate_world", ["{tmp}", "--samples", "2"], "already holds a finished dataset"),
        ("encode_shards", ["{tmp}/raw", "{tmp}/new"], "encoders.online=true needs"),
        ("encode_shards", ["{tmp}/raw", "{tmp}/new", "--video-vae", "{tmp}/none"], "does not exist"),
        ("encode_shards", ["{tmp}/raw", "{tmp}/new", "--encoder", "pooled", "--video-latent-channels", "-2"], ">= 0"),
        ("encode_shards", ["{tmp}/evil", "{tmp}/new", "--encoder", "pooled"], "may not run a command"),
        ("encode_shards", ["{tmp}/raw", "{tmp}/new", "--encoder", "pooled", "--seed", "-1"], "seed=-1 must be an"),
        # Every clip's sound was no audio token: thousands of clips a second cut and skipped, for minutes.
        # The refusal names the flags typed, not the training config's media.clip_seconds and media.fps.
        (
            "encode_shards",
            ["{tmp}/raw", "{tmp}/new", "--encoder", "pooled", "--clip-seconds", "0.001"],
            "error: --clip-seconds=0.001 is shorter than one audio latent (0.04 s): use 0 (whole samples) or at least",
        ),
        (
            "encode_shards",
            ["{tmp}/raw", "{tmp}/new", "--clip-seconds", "0.05", "--fps", "10"],
            "error: --clip-seconds=0.05 is shorter than one audio latent (0.04 s) or one frame at --fps=10: use 0",
        ),
        ("encode_shards", ["{tmp}/raw", "{tmp}/new", "--fps", "5000"], "error: --fps=5000.0 must be 0"),
        ("encode_shards", ["{tmp}/raw", "{tmp}/new", "--resolution-buckets", "9"], "error: --resolution-buckets entry"),
        ("inspect_shards", ["{tmp}/none"], "/none: missing (no such file)"),
        ("write_shards", ["{tmp}/none.jsonl", "{tmp}/new"], "manifest"),
        ("write_shards", ["{tmp}/raw/index.json", "{tmp}/raw"], "is the input folder"),
        ("write_shards", ["{tmp}/evil/index.json", "{tmp}/raw"], "already holds a finished dataset"),
        ("write_shards", ["{tmp}/raw/index.json", "{tmp}/new", "--shard-size", "0"], "shard size 0 must be >= 1"),
        # An output that is a file: mkdir's FileExistsError / NotADirectoryError tracebacks.
        ("write_shards", ["{tmp}/raw/index.json", "{tmp}/evil/index.json"], "is a file, not a folder"),
        ("ingest_videos", ["{tmp}/raw", "{tmp}/evil/index.json"], "is a file, not a folder"),
        # Its shards, index and part files were walked as inputs by a rerun or a later task.
        ("ingest_videos", ["{tmp}/raw", "{tmp}/raw/new"], "is inside the input folder"),
        # --task/--tasks were ignored beside --processes: each array task wrote every part
        ("ingest_videos", ["{tmp}/raw", "{tmp}/new", "--processes", "2", "--task", "1", "--tasks", "4"], "give one"),
        ("generate_world", ["{tmp}/evil/index.json", "--samples", "1"], "is a file, not a folder"),
        # The shards' names start with the prefix: '../x' wrote them beside the output folder.
        ("write_shards", ["{tmp}/raw/index.json", "{tmp}/new", "--prefix", "../escaped"], "prefix='../escaped' must"),
        # A clip the loader would skip as out_of_range: a MemoryError in the first sample, after the folders.
        ("generate_world", ["{tmp}/new", "--samples", "1", "--resolution", "100000"], "above clips.MAX_CLIP_BYTES"),
        # Refused widths left an empty new/raw/ behind.
        ("generate_world", ["{tmp}/new", "--latents", "pooled", "--audio-latent-dim", "-1"], "audio_latent_dim=-1"),
        # 'too few usable samples for the tasks {'policy': 1}' said nothing of the name.
        ("export_requests", ["{tmp}/raw", "{tmp}/new", "--embodiment", "octopus"], "embodiment='octopus' is not one"),
    ],
)
def test_pipeline_scripts_refuse_bad_arguments_in_one_line_and_write_nothing(tmp_path, capsys, script, argv, message):
    """These were tracebacks (a missing VAE folder, negative widths, a non-positive shard size), an
    empty dataset written (--samples -3), or a finished world overwritten in place."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "index.json").write_text('{"format_version": 1, "shards": []}')
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "index.json").write_text('{"format_version": 1, "shards": [{"url": "pipe:touch RAN"}]}')
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exited:
        load_script(script).main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "RAN").exists()


def test_a_crafted_manifest_entry_is_a_counted_skip_and_never_a_member_leading_out_of_the_folder(tmp_path):
    """A key '../../evil' or '/tmp/evil' was written as tar members of those names (tar -x writes
    them outside its folder; our reader skipped the sample as unsafe_member); 'a.b' split at the
    '.'; an entry that is a list, null or nested past the parser, or a file path that is a number,
    was a TypeError/RecursionError that ended the run; a manifest not UTF-8 a raw UnicodeDecodeError."""
    write_shards = load_script("write_shards")
    rng = np.random.default_rng(0)
    (tmp_path / "still.png").write_bytes(encode_png(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)))
    still = {"caption": "a still", "image": "still.png"}
    lines = [
        json.dumps({"key": "good", **still}),
        *(json.dumps({"key": key, **still}) for key in ("../../evil", "/tmp/evil", "a.b", "", 7)),
        json.dumps({"key": "number", "caption": "x", "image": 5}),
        # a field given twice was read as its last value: which picture was meant cannot be told
        '{"key": "twice", "caption": "a still", "image": "still.png", "image": "other.png"}',
        '{"key": "nan", "caption": "a still", "image": "still.png", "fps": NaN}',
        "[1, 2]",
        "null",
        "[" * 100_000,
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines))
    index, skipped = write_shards.write_shards(tmp_path / "manifest.jsonl", tmp_path / "shards")
    assert index.total_samples == 1 and skipped == {"unreadable_entry": len(lines) - 1}
    assert sorted(tarfile.open(index.shards[0].url).getnames()) == ["good.image.png", "good.meta.json"]
    (tmp_path / "latin.jsonl").write_bytes('{"key": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"manifest '.*latin.jsonl': not a readable UTF-8 file \(UnicodeDecodeError"):
        write_shards.write_shards(tmp_path / "latin.jsonl", tmp_path / "latin")


def test_generate_world_starts_no_more_workers_than_jobs_or_cpus(tmp_path, monkeypatch, caplog):
    """--workers 1000 started 1000 processes, even for one sample: a worker takes ``CHUNK`` samples
    at once, so 1 sample is generated here and 5 by 2 processes; past the CPUs a warning names the flag."""
    script = load_script("generate_world")
    real_pool, started = script.Pool, []

    def pool(processes, **kwargs):  # the real pool, refused before it starts too many
        started.append(processes)
        assert processes <= 2, f"Pool({processes}) for at most 2 chunks of samples"
        return real_pool(processes, **kwargs)

    monkeypatch.setattr(script, "Pool", pool)
    config = WorldConfig(resolution=32, duration_s=0.5)
    one = script.write_world(tmp_path / "one", 1, config=config, workers=1000)
    five = script.write_world(tmp_path / "five", 5, config=config, workers=1000)
    assert started == [2]
    assert ShardIndex.load(one["raw"]).total_samples == 1 and ShardIndex.load(five["raw"]).total_samples == 5
    with caplog.at_level("WARNING"):
        assert process_count(10**6, None, "--processes") == PROCESSES_PER_CPU * (os.cpu_count() or 1)
    assert "--processes=1000000: starting" in caplog.text


def _record_worker(folder: Path, task: int, tasks: int) -> Counter:
    """A ``run_split`` function that notes, from inside the worker, which process ran which task."""
    (Path(folder) / f"task{task}").write_text(f"{os.getpid()} {tasks}")
    time.sleep(0.05)  # long enough that an uncapped pool hands its tasks to many of its processes
    return Counter(parts=1)


def test_run_split_starts_no_more_processes_than_its_cpu_cap(tmp_path, caplog):
    """``run_split(processes=64)`` on a machine of few CPUs: the workers that ran (distinct PIDs, as
    the workers report them) are at most ``PROCESSES_PER_CPU`` per CPU, every part of the capped
    split is written once, and each worker is told the capped count (the parts do not depend on it).
    Without the cap the pool started 64 processes here."""
    most = PROCESSES_PER_CPU * (os.cpu_count() or 1)
    requested = max(64, 4 * most)  # past the cap on any machine
    with caplog.at_level("WARNING"):
        counts = run_split(_record_worker, requested, 0, 1, tmp_path)
    reports = {path.name: path.read_text().split() for path in tmp_path.iterdir()}
    pids = {pid for pid, _ in reports.values()}
    assert 1 < len(pids) <= most, (len(pids), most)
    assert sorted(reports) == sorted(f"task{i}" for i in range(most)) and counts == Counter(parts=most)
    assert {tasks for _, tasks in reports.values()} == {str(most)}
    assert f"processes={requested}: starting {most} processes" in caplog.text


def test_a_run_that_writes_no_usable_sample_exits_1_and_keeps_its_skip_report(tmp_path, caplog):
    """Every entry skipped wrote an empty dataset and exited 0: a SLURM array task showed success."""
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"key": "gone", "caption": "x", "image": "missing.png"}))
    assert load_script("write_shards").main([str(tmp_path / "manifest.jsonl"), str(tmp_path / "shards")]) == 1
    assert ShardIndex.load(tmp_path / "shards").total_samples == 0
    assert "manifest.jsonl line 1: skipped: ValueError: image=" in caplog.text  # the skip report, kept
    assert "no usable sample was written (skipped: {'unreadable_entry': 1})" in caplog.text
    (tmp_path / "videos").mkdir()
    whole = encode_mp4(np.zeros((8, 64, 64, 3), np.uint8), 8)
    (tmp_path / "videos" / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # a video, cut short
    ingest = load_script("ingest_videos")
    assert ingest.main([str(tmp_path / "videos"), str(tmp_path / "ingested")]) == 1
    assert ShardIndex.load(tmp_path / "ingested").total_samples == 0
    assert "ingested: no usable sample was written (skipped: {'" in caplog.text
