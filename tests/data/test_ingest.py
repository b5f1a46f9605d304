"""Ingestion (docs/DESIGN.md, "Real media"): a folder of videos with captions, and a LeRobot v2.1
dataset written by the test in LeRobot's documented layout, become shards the loader reads — episodes
to packs with frames and actions aligned — and a split over local processes writes the same bytes
as one process."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation
from world_helpers import data_config, load_script

from megatron_cosmos3.data.clips import MediaConfig
from megatron_cosmos3.data.determinism import uniform
from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder, latent_sample
from megatron_cosmos3.data.loader import PackedLoader
from megatron_cosmos3.data.media import encode_npy
from megatron_cosmos3.data.media_writers import encode_mp4
from megatron_cosmos3.data.schema import SchemaContext, decode_sample
from megatron_cosmos3.data.shard_writer import ShardWriter
from megatron_cosmos3.data.shards import ShardIndex, read_shard
from megatron_cosmos3.encoders.action_normalization import STD_FLOOR, ActionStats
from megatron_cosmos3.inference.denoising import sample_rows
from megatron_cosmos3.inference.generation import generated_sample, packed_sample_streams
from megatron_cosmos3.model.config import EmbodimentConfig, MoTConfig
from megatron_cosmos3.tasks.registry import Modality

FPS, FRAMES, WIDTH = 10, 12, 6
EULER_NAMES = ["eef_x", "eef_y", "eef_z", "eef_roll", "eef_pitch", "eef_yaw", "gripper"]
QUATERNION_NAMES = ["gripper_opening", "qw", "x", "qx", "y", "qy", "z", "qz"]


def _frames(first: int, count: int) -> np.ndarray:
    """Frame i shows the number i as the brightness of a smooth ramp: any frame tells its index."""
    ramp = np.linspace(0, 1, 32)[None, :, None]
    return np.stack(
        [np.broadcast_to((10 * i + 40 * ramp) % 256, (32, 32, 3)) for i in range(first, first + count)]
    ).astype(np.uint8)


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def lerobot(tmp_path_factory):
    """Three episodes of a 6-D arm, one camera, LeRobot v2.1 (meta/info.json, episodes.jsonl,
    tasks.jsonl, data/chunk-000/episode_*.parquet, videos/chunk-000/<camera>/episode_*.mp4)."""
    root = tmp_path_factory.mktemp("lerobot") / "arm_push"
    camera = "observation.images.top"
    info = {
        "codebase_version": "v2.1",
        "robot_type": "toy_arm",
        "fps": FPS,
        "chunks_size": 1000,
        "total_episodes": 3,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": {
            camera: {"dtype": "video", "shape": [32, 32, 3], "names": ["height", "width", "channel"]},
            "action": {"dtype": "float32", "shape": [WIDTH], "names": None},
            "observation.state": {"dtype": "float32", "shape": [WIDTH], "names": None},
            # the end effector's pose, named as LeRobot exports name it: Euler angles in one
            # feature, a quaternion (components in another order) in the other
            "observation.eef": {"dtype": "float32", "shape": [7], "names": EULER_NAMES},
            "observation.pose": {"dtype": "float32", "shape": [8], "names": {"axes": QUATERNION_NAMES}},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    tasks = ["push the cube left", "push the cube right"]
    (root / "meta" / "tasks.jsonl").write_text(
        "\n".join(json.dumps({"task_index": i, "task": t}) for i, t in enumerate(tasks))
    )
    episodes, actions, poses = [], {}, {}
    for episode in range(3):
        rng = np.random.default_rng(10 + episode)
        positions = np.cumsum(rng.normal(scale=0.02, size=(FRAMES, 3)), axis=0) + [0.4, 0.0, 0.3]
        hand = [Rotation.random(random_state=episode)]
        for turn in Rotation.from_rotvec(rng.normal(scale=0.2, size=(FRAMES - 1, 3))):
            hand.append(hand[-1] * turn)
        hand = Rotation.concatenate(hand)
        gripper = rng.uniform(0, 1, FRAMES)
        euler = np.concatenate([positions, hand.as_euler("xyz"), gripper[:, None]], axis=1).astype(np.float32)
        x, y, z, w = hand.as_quat().T
        quaternion = np.stack([gripper, w, positions[:, 0], x, positions[:, 1], y, positions[:, 2], z], 1)
        poses[episode] = (euler, quaternion.astype(np.float32))
        episodes.append({"episode_index": episode, "tasks": [tasks[episode % 2]], "length": FRAMES})
        # action row i holds (episode, i, ...): each row says which frame it belongs to; the other
        # joints move on scales from 1e-2 to 1e2 (what normalisation is for)
        rows = np.random.default_rng(episode).normal(size=(FRAMES, WIDTH)).astype(np.float32)
        rows *= np.logspace(-2, 2, WIDTH, dtype=np.float32)
        rows[:, 0], rows[:, 1] = episode, np.arange(FRAMES)
        actions[episode] = rows
        table = pa.table(
            {
                "action": pa.array(list(rows), type=pa.list_(pa.float32())),
                "observation.state": pa.array(list(rows * 0.5), type=pa.list_(pa.float32())),
                "observation.eef": pa.array(list(poses[episode][0]), type=pa.list_(pa.float32())),
                "observation.pose": pa.array(list(poses[episode][1]), type=pa.list_(pa.float32())),
                "timestamp": pa.array(np.arange(FRAMES) / FPS, type=pa.float32()),
                "frame_index": np.arange(FRAMES),
                "episode_index": np.full(FRAMES, episode),
                "index": episode * FRAMES + np.arange(FRAMES),
                "task_index": np.full(FRAMES, episode % 2),
            }
        )
        (root / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / "data" / "chunk-000" / f"episode_{episode:06d}.parquet")
        video = root / "videos" / "chunk-000" / camera / f"episode_{episode:06d}.mp4"
        video.parent.mkdir(parents=True, exist_ok=True)
        video.write_bytes(encode_mp4(_frames(0, FRAMES), FPS, crf=4, keyframe_interval=4))
    (root / "meta" / "episodes.jsonl").write_text("\n".join(json.dumps(e) for e in episodes))
    return root, actions, poses


def test_lerobot_episodes_become_shards_with_frames_and_actions_aligned(lerobot, tmp_path):
    root, actions, _ = lerobot
    ingest = load_script("ingest_lerobot")
    skipped = ingest.ingest_lerobot(root, tmp_path / "one", "toy_arm", shard_size=2)
    assert not skipped
    index = ShardIndex.load(tmp_path / "one")
    assert index.total_samples == 3 and len(index.shards) == 2
    context = SchemaContext({"toy_arm": WIDTH})
    raws = [raw for shard in index.shards for raw in read_shard(shard.url)]
    whole = decode_sample(raws[1], context)
    assert whole.instruction == "push the cube right" and whole.fps == FPS and whole.embodiment == "toy_arm"
    np.testing.assert_array_equal(whole.actions, actions[1])
    assert len(whole.video) == FRAMES
    # A half-second clip: its first frame and its first action row are the same instant.
    clip = decode_sample(raws[2], context, MediaConfig(clip_seconds=0.5), draw=0.8)
    first = round(clip.timing["clip_start_s"] * FPS)
    assert first > 0 and len(clip.video) == len(clip.actions) == 5
    np.testing.assert_array_equal(clip.actions[:, 1], np.arange(first, first + 5))
    brightness = clip.video[:, :, 0, 0].mean(axis=1).astype(float)  # the ramp's dark end: 10 * index
    np.testing.assert_allclose(brightness, 10 * np.arange(first, first + 5), atol=3)

    # The raw layout's statistics over every action row of the dataset, as numpy measures them.
    stats = ActionStats.load(tmp_path / "one")["toy_arm"]
    every = np.concatenate([actions[e] for e in range(3)]).astype(np.float64)
    assert stats.raw and stats.count == 3 * FRAMES and stats.rotation_6d_dims == ()
    np.testing.assert_allclose(stats.mean, every.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.std, every.std(0), rtol=1e-12)
    np.testing.assert_allclose(stats.q01, np.quantile(every, 0.01, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.q99, np.quantile(every, 0.99, axis=0), rtol=1e-12)

    # Episodes -> packs: the registered embodiment's action stream reaches the packer, normalised
    # with the statistics beside the shards ("auto"); generation un-normalises it back.
    model = MoTConfig(
        vocab_size=256,
        num_layers=1,
        video_latent_channels=4,
        audio_latent_dim=8,
        embodiments={"toy_arm": EmbodimentConfig(WIDTH, FPS)},
    )
    config = data_config([str(tmp_path / "one")], tasks={"inverse_dynamics": 1.0}, epochs=1, shuffle_buffer=0)
    encoder = lambda: PooledLatentEncoder(4, 8)  # noqa: E731
    with PackedLoader(config, model, latent_encoder_factory=encoder) as loader:
        packs = list(loader)
    assert sum(p.num_samples for p in packs) == 3
    assert all(p.dm_tokens["action/toy_arm"].shape[1] == WIDTH for p in packs)
    # The VAE encodes 9 of the 12 frames (1 + 4k): the 9 steps that start while they show.
    steps = 1 + 4 * ((FRAMES - 1) // 4)
    assert sum(len(p.dm_tokens["action/toy_arm"]) for p in packs) == 3 * steps
    scale = np.maximum(np.array(stats.std), STD_FLOOR)
    seen = set()
    for pack in packs:
        for n in range(pack.num_samples):
            rows = pack.dm_tokens["action/toy_arm"][sample_rows(pack, "action/toy_arm") == n].numpy()
            episode = round(rows[0, 0] * scale[0] + stats.mean[0])
            expected = (actions[episode][:steps] - np.array(stats.mean)) / scale
            np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-5)
            assert np.abs(rows).max() < 5  # every joint on the same scale, the 1e2 one too
            back = generated_sample(
                packed_sample_streams(pack, n, model), pack, pack.dm_tokens, n, ActionStats({"toy_arm": stats})
            )
            np.testing.assert_allclose(back.actions.numpy(), actions[episode][:steps], rtol=1e-5, atol=1e-4)
            seen.add(episode)
    assert seen == {0, 1, 2}

    # Pre-encoding reads the mp4 shards as the loader does (the pooled stand-in for the VAEs).
    encode_shards = load_script("encode_shards")
    assert not encode_shards.encode_shards(tmp_path / "one", tmp_path / "latent", encoder())
    latent = [
        decode_sample(raw, context) for s in ShardIndex.load(tmp_path / "latent").shards for raw in read_shard(s.url)
    ]
    assert [s.video_latent_grid[0] for s in latent] == [whole.latent_frames] * 3 and latent[1].actions.shape == (
        FRAMES,
        WIDTH,
    )


def test_a_split_over_processes_writes_what_one_process_writes(lerobot, tmp_path):
    root, _, _ = lerobot
    ingest = load_script("ingest_lerobot")
    ingest.main([str(root), str(tmp_path / "one"), "--embodiment", "toy_arm", "--shard-size", "1"])
    ingest.main(
        [str(root), str(tmp_path / "split"), "--embodiment", "toy_arm", "--shard-size", "1", "--processes", "2"]
    )
    one, split = _files(tmp_path / "one"), _files(tmp_path / "split")
    assert len(one) == 5 and one.keys() == split.keys() and "action_stats.json" in one
    assert {k: v for k, v in one.items() if k != "index.json"} == {k: v for k, v in split.items() if k != "index.json"}
    strip = lambda index: [(s["url"].split("/")[-1], s["samples"]) for s in json.loads(index)["shards"]]  # noqa: E731
    assert strip(one["index.json"]) == strip(split["index.json"])


def test_damaged_lerobot_episodes_are_skipped_and_counted_and_a_broken_dataset_is_a_clear_error(lerobot, tmp_path):
    """One bad episode is a counted skip, never the end of the ingestion: a missing parquet, a video
    at another rate than info.json's (its frames last a third of the episode), no frames at all, an
    unreadable parquet, a NaN timestamp. A dataset whose metadata is broken is a setup error naming file and value."""
    ingest = load_script("ingest_lerobot")
    root = tmp_path / "arm_push"
    shutil.copytree(lerobot[0], root)
    data, videos = root / "data" / "chunk-000", root / "videos" / "chunk-000" / "observation.images.top"
    lines = (root / "meta" / "episodes.jsonl").read_text().splitlines()
    for episode in (3, 4, 5):  # copies of episode 2, to damage
        shutil.copy(data / "episode_000002.parquet", data / f"episode_{episode:06d}.parquet")
        shutil.copy(videos / "episode_000002.mp4", videos / f"episode_{episode:06d}.mp4")
        lines.append(json.dumps({"episode_index": episode, "tasks": ["push"], "length": FRAMES}))
    lines[2] = json.dumps({"episode_index": 2, "tasks": [" ", "\u200b\t"], "length": FRAMES})  # blank texts
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines))
    (data / "episode_000000.parquet").unlink()
    (videos / "episode_000001.mp4").write_bytes(encode_mp4(_frames(0, FRAMES), 3 * FPS))
    empty = pq.read_table(data / "episode_000003.parquet").slice(0, 0)
    pq.write_table(empty, data / "episode_000003.parquet")
    (data / "episode_000004.parquet").write_bytes(b"PAR1 not a parquet")
    table = pq.read_table(data / "episode_000005.parquet")
    stamps = pa.array(np.where(np.arange(FRAMES) == 4, np.nan, np.arange(FRAMES) / FPS), type=pa.float32())
    pq.write_table(
        table.set_column(table.column_names.index("timestamp"), "timestamp", stamps), data / "episode_000005.parquet"
    )
    skipped = ingest.ingest_lerobot(root, tmp_path / "out", "toy_arm")
    assert skipped == {
        "missing_field": 1,
        "duration_mismatch": 1,
        "zero_length": 1,
        "corrupt_media": 1,
        "bad_metadata": 1,
    }
    assert ShardIndex.load(tmp_path / "out").total_samples == 1  # episode 2
    (kept,) = read_shard(ShardIndex.load(tmp_path / "out").shards[0].url)
    assert "instruction" not in json.loads(kept["meta.json"])  # blank task texts are no instruction

    info = json.loads((root / "meta" / "info.json").read_text())
    (root / "meta" / "info.json").write_text(json.dumps({**info, "fps": "ten"}))
    with pytest.raises(ValueError, match="info.json: fps='ten' must be a number"):
        ingest.ingest_lerobot(root, tmp_path / "out2", "toy_arm")
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "episodes.jsonl").write_text("\n".join([*lines, lines[0]]))
    with pytest.raises(ValueError, match="episode_index=0 is listed twice"):
        ingest.ingest_lerobot(root, tmp_path / "out3", "toy_arm")


HOSTILE_LEROBOT = {
    # info.json's path templates and camera keys are data: a file outside the dataset was read as an
    # episode (a corrupt_media skip at best), an unknown field was a raw KeyError/IndexError mid-run
    "a template leading out": (
        {"data_path": "../{episode_index}.parquet"},
        None,
        r"data_path='\.\./\{episode_index\}\.parquet' gives '\.\./0\.parquet', which leads out of the dataset folder",
    ),
    "an absolute template": (
        {"data_path": "/etc/{episode_index}.parquet"},
        None,
        r"gives '/etc/0\.parquet', which leads out",
    ),
    "a camera key leading out": (
        {"camera": "../../x"},
        None,
        r"video_path=.* gives 'videos/chunk-000/\.\./\.\./x/episode_000000\.mp4', which leads out",
    ),
    "an unknown field": (
        {"data_path": "data/{chunk}.parquet"},
        None,
        r"data_path='data/\{chunk\}\.parquet': not a path template of \[.*\] \('chunk' is not one of",
    ),
    "a positional field": ({"data_path": "data/{}.parquet"}, None, r"not a path template .*\('' is not one of"),
    "an attribute": ({"data_path": "data/{episode_index.real}.parquet"}, None, r"'episode_index\.real' is not one of"),
    "a width of a gigabyte": (
        {"data_path": "{episode_index:999999999d}"},
        None,
        r"a nested field or a width of more than 3 digits",
    ),
    "chunks_size 0": ({"chunks_size": 0}, None, r"info\.json: chunks_size=0 must be an int >= 1"),  # ZeroDivisionError
    "chunks_size null": ({"chunks_size": None}, None, r"info\.json: chunks_size=None must be an int >= 1"),  # TypeError
    "episodes nested past the parser": ({}, b"[" * 100_000, r"episodes\.jsonl, line 1: not JSON \(RecursionError"),
    "episodes not UTF-8": (
        {},
        b'{"episode_index": 0}\n\xff',
        r"episodes\.jsonl: not a readable UTF-8 file \(UnicodeDecodeError",
    ),
    "episodes a folder": ({}, "folder", r"episodes\.jsonl: not a readable UTF-8 file \(IsADirectoryError"),
    # a key given twice was read as its last value: which episode or fps was meant cannot be told
    "episodes giving a key twice": (
        {},
        b'{"episode_index": 0, "episode_index": 1}',
        r"episodes\.jsonl, line 1: not JSON \(ValueError: key\(s\) \['episode_index'\] given twice",
    ),
    "info giving a key twice": ("fps twice", None, r"info\.json: not a readable JSON file .*\['fps'\] given twice"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LEROBOT))
def test_a_crafted_lerobot_info_or_episode_list_is_one_error_naming_the_file_before_any_episode(
    lerobot, tmp_path, case
):
    ingest = load_script("ingest_lerobot")
    root = tmp_path / "arm_push"
    shutil.copytree(lerobot[0], root)
    change, episodes, message = HOSTILE_LEROBOT[case]
    info = json.loads((root / "meta" / "info.json").read_text())
    if change == "fps twice":
        (root / "meta" / "info.json").write_text(json.dumps(info)[:-1] + ', "fps": 30}')
    else:
        if "camera" in change:
            info["features"] = {change.pop("camera"): {"dtype": "video"}, **info["features"]}
        (root / "meta" / "info.json").write_text(json.dumps({**info, **change}))
    if episodes == "folder":
        (root / "meta" / "episodes.jsonl").unlink()
        (root / "meta" / "episodes.jsonl").mkdir()
    elif episodes is not None:
        (root / "meta" / "episodes.jsonl").write_bytes(episodes)
    with pytest.raises(ValueError, match=message):
        ingest.ingest_lerobot(root, tmp_path / "out", "toy_arm")
    assert not (tmp_path / "out" / "index.json").exists()


@pytest.mark.parametrize(
    "stamps",
    [pa.array(["soon"] * FRAMES), pa.array([[i / FPS] for i in range(FRAMES)])],
    ids=["text", "lists"],
)
def test_an_episode_whose_timestamps_are_no_seconds_is_a_counted_skip(lerobot, tmp_path, stamps):
    """A timestamp column of text was a raw ValueError ('could not convert string to float') and one
    of lists a TypeError, either ending the ingestion without naming the episode or its file."""
    ingest = load_script("ingest_lerobot")
    root = tmp_path / "arm_push"
    shutil.copytree(lerobot[0], root)
    path = root / "data" / "chunk-000" / "episode_000001.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index("timestamp"), "timestamp", stamps), path)
    assert ingest.ingest_lerobot(root, tmp_path / "out", "toy_arm") == {"bad_metadata": 1}
    assert ShardIndex.load(tmp_path / "out").total_samples == 2


@pytest.mark.parametrize("shape", ["7", None, [7, "x"]])
def test_an_end_effector_feature_of_no_shape_is_an_error_naming_it(lerobot, tmp_path, shape):
    """--eef-key's feature width came from np.prod(shape): a text or null shape was a raw
    TypeError; it is now the error the action feature's shape gives, naming the feature."""
    ingest = load_script("ingest_lerobot")
    root = tmp_path / "arm_push"
    shutil.copytree(lerobot[0], root)
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["observation.eef"]["shape"] = shape
    (root / "meta" / "info.json").write_text(json.dumps(info))
    message = f"--eef-key='observation.eef': features['observation.eef'] shape={shape!r} must be a list of ints > 0"
    with pytest.raises(ValueError, match=re.escape(message)):
        ingest.ingest_lerobot(root, tmp_path / "out", "", eef_key="observation.eef")


def test_a_folder_of_videos_with_captions_becomes_shards(tmp_path):
    ingest = load_script("ingest_videos")
    folder = tmp_path / "videos"
    (folder / "street").mkdir(parents=True)
    (folder / "a.mp4").write_bytes(encode_mp4(_frames(0, 20), FPS))
    (folder / "a.txt").write_text("a ramp brightens\n")
    (folder / "street" / "b.mp4").write_bytes(encode_mp4(_frames(5, 30), FPS))
    segments = [{"start_s": 0.0, "end_s": 1.5, "text": "dim"}, {"start_s": 1.5, "end_s": 3.0, "text": "bright"}]
    (folder / "street" / "b.json").write_text(json.dumps({"caption": "a street", "segments": segments}))
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" * 10)
    # Sidecars that lose their video, not the run: Latin-1 text, a JSON list.
    (folder / "latin.mp4").write_bytes((folder / "a.mp4").read_bytes())
    (folder / "latin.txt").write_bytes("un caf\u00e9".encode("latin-1"))
    (folder / "listy.mp4").write_bytes((folder / "a.mp4").read_bytes())
    (folder / "listy.json").write_text('["a caption"]')
    # A blank caption and a blank segment are no caption: the video is kept without text.
    (folder / "quiet.mp4").write_bytes((folder / "a.mp4").read_bytes())
    blank = {"caption": " \t\u200b", "segments": [{"start_s": 0.0, "end_s": 0.5, "text": "\n "}]}
    (folder / "quiet.json").write_text(json.dumps(blank))
    # A sidecar saved with a byte order mark (Windows editors): its caption, without the mark.
    (folder / "bom.mp4").write_bytes((folder / "a.mp4").read_bytes())
    (folder / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"caption": "marked"}).encode())
    listed = tmp_path / "captions.jsonl"
    listed.write_text(json.dumps({"file": "a.mp4", "caption": "listed wins over the sidecar"}))
    skipped = ingest.ingest_videos(folder, tmp_path / "shards", listed, shard_size=8)
    assert skipped == {"corrupt_media": 1, "bad_metadata": 2}
    index = ShardIndex.load(tmp_path / "shards")
    samples = {raw["__key__"]: raw for shard in index.shards for raw in read_shard(shard.url)}
    assert sorted(samples) == ["00000000_a", "00000001_bom", "00000005_quiet", "00000006_street_b"]
    a = decode_sample(samples["00000000_a"])
    assert a.caption == "listed wins over the sidecar" and len(a.video) == 20
    assert decode_sample(samples["00000001_bom"]).caption == "marked"
    assert "caption" not in json.loads(samples["00000005_quiet"]["meta.json"])
    quiet = decode_sample(samples["00000005_quiet"])
    assert quiet.caption is None and quiet.caption_segments == [] and Modality.TEXT not in quiet.modalities
    clip = decode_sample(
        samples["00000006_street_b"], media_config=MediaConfig(clip_seconds=1.0, clip_start="grid"), draw=0.9
    )
    assert clip.timing["clip_start_s"] == 2.0 and clip.caption == "bright"
    assert math.isclose(clip.caption_segments[0][1], 1.0)


@pytest.mark.timeout(60)  # a FIFO as --captions was read until a writer came: a hang
def test_a_caption_sidecar_nested_past_the_parser_is_a_counted_skip_and_a_bad_captions_file_one_error(tmp_path):
    """A sidecar of '[[[[...' was a RecursionError that ended the run; a --captions file that is not
    UTF-8, nested past the parser or a folder was a raw UnicodeDecodeError/RecursionError/IsADirectoryError;
    a FIFO hung."""
    ingest = load_script("ingest_videos")
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(encode_mp4(_frames(0, 4), FPS))
    (folder / "deep.mp4").write_bytes((folder / "a.mp4").read_bytes())
    (folder / "deep.json").write_bytes(b"[" * 100_000)
    (folder / "twice.mp4").write_bytes((folder / "a.mp4").read_bytes())
    (folder / "twice.json").write_text('{"caption": "a ramp", "caption": "a wall"}')  # which one was meant?
    assert ingest.ingest_videos(folder, tmp_path / "shards") == {"bad_metadata": 2}
    assert ShardIndex.load(tmp_path / "shards").total_samples == 1
    captions = tmp_path / "captions.jsonl"
    for data, message in (
        (b"\xff", r"not a readable UTF-8 file \(UnicodeDecodeError"),
        (b"[" * 100_000, r"not \{'file': \.\.\., \.\.\.\} \(RecursionError"),
    ):
        captions.write_bytes(data)
        with pytest.raises(ValueError, match=rf"--captions={captions}(, line 1)?: {message}"):
            ingest.ingest_videos(folder, tmp_path / "out", captions)
    # A folder (IsADirectoryError's text) or a FIFO (its read waited for a writer without end): named
    # by the one refusal of a path that is no regular file.
    captions.unlink()
    captions.mkdir()
    with pytest.raises(ValueError, match=rf"--captions='{captions}': not a regular file \(a folder\)"):
        ingest.ingest_videos(folder, tmp_path / "out", captions)
    captions.rmdir()
    os.mkfifo(captions)
    with pytest.raises(ValueError, match=rf"--captions='{captions}': not a regular file \(a FIFO\)"):
        ingest.ingest_videos(folder, tmp_path / "out", captions)


def test_links_fifos_and_unreadable_files_of_a_video_folder_are_counted_skips(tmp_path, monkeypatch):
    """A video the process may not read (chmod 000 for another user; root reads it, so the read is
    made to fail) or an unreadable caption sidecar ended the run with a raw PermissionError; a FIFO,
    a dangling link and a link to a folder (a loop back to the folder here) were dropped without a
    word. Each is now a counted, logged skip; a --captions file giving a key twice or listing a file
    twice (the last one won, silently) is an error naming the line."""
    ingest = load_script("ingest_videos")
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.mp4", "locked.mp4", "b.mp4"):
        (folder / name).write_bytes(encode_mp4(_frames(0, 4), FPS))
    (folder / "b.txt").write_text("a ramp")
    os.mkfifo(folder / "pipe.mp4")
    os.symlink(tmp_path / "nowhere.mp4", folder / "dangling.mp4")
    os.symlink("..", folder / "sub" / "loop")
    real_read_bytes, real_read_text = Path.read_bytes, Path.read_text

    def refused(real):
        def read(self, *args, **kwargs):
            if self.name in ("locked.mp4", "b.txt"):
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        return read

    monkeypatch.setattr(Path, "read_bytes", refused(real_read_bytes))
    monkeypatch.setattr(Path, "read_text", refused(real_read_text))
    skipped = ingest.ingest_videos(folder, tmp_path / "shards")
    assert skipped == {"corrupt_media": 1, "bad_metadata": 1, "not_a_video": 3}
    assert ShardIndex.load(tmp_path / "shards").total_samples == 1  # a.mp4
    monkeypatch.undo()
    captions = tmp_path / "captions.jsonl"
    for line, message in (
        ('{"file": "a.mp4", "caption": "x", "caption": "y"}', r"key\(s\) \['caption'\] given twice"),
        ('{"file": "a.mp4", "caption": "x"}\n{"file": "a.mp4", "caption": "y"}', "file 'a.mp4' is listed twice"),
    ):
        captions.write_text(line)
        with pytest.raises(ValueError, match=rf"--captions={captions}, line \d: not .*{message}"):
            ingest.ingest_videos(folder, tmp_path / "out", captions)


def _pyav_video(path, codec: str, frames: np.ndarray, container_format: str | None = None) -> None:
    """``frames`` written at FPS into ``path`` by PyAV, the container chosen by its suffix unless given."""
    import av

    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for picture in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode(None))


def test_every_file_of_a_video_folder_is_ingested_or_a_counted_skip(tmp_path):
    """.m4v (the mp4 container), .avi, .mkv and .webm files are ingested as they are, and decode to
    their frames; an MPEG-TS file (nothing in it says how long it is: a cut one would pass) and a
    file that is no video are skipped, counted and logged; caption sidecars are read, not counted."""
    ingest = load_script("ingest_videos")
    folder = tmp_path / "videos"
    folder.mkdir()
    frames = _frames(0, 8)
    (folder / "a.mp4").write_bytes(encode_mp4(frames, FPS))
    _pyav_video(folder / "b.m4v", "libx264", frames)
    (folder / "b.txt").write_text("a ramp")
    _pyav_video(folder / "c.avi", "mpeg4", frames)
    _pyav_video(folder / "d.ts", "libx264", frames)
    _pyav_video(folder / "e.mkv", "libx264", frames)
    _pyav_video(folder / "f.webm", "libvpx-vp9", frames)
    (folder / "d.json").write_text("{}")  # the sidecar of a skipped video is not counted again
    (folder / "notes.md").write_text("how these were filmed")
    skipped = ingest.ingest_videos(folder, tmp_path / "shards", shard_size=8)
    assert skipped == {"unsupported_container": 1, "not_a_video": 1}
    index = ShardIndex.load(tmp_path / "shards")
    samples = {raw["__key__"]: raw for shard in index.shards for raw in read_shard(shard.url)}
    assert sorted(samples) == ["00000000_a", "00000001_b", "00000002_c", "00000003_e", "00000004_f"]
    assert "video.m4v" in samples["00000001_b"] and "video.avi" in samples["00000002_c"]
    for key in samples:
        sample = decode_sample(samples[key])
        assert sample.fps == FPS and len(sample.video) == len(frames), key
    assert decode_sample(samples["00000001_b"]).caption == "a ramp"


def test_a_file_is_ingested_or_skipped_by_its_bytes_not_its_name(tmp_path):
    """A video field's container is judged by its bytes, and so is a file of the folder: a 3GP
    (the MP4 family), an MP4 named .ts, an AVI named .divx and a Matroska file without a suffix are
    ingested (they were an unsupported_container or not_a_video skip); a FLV and a Transport Stream
    named .dat are unsupported_container (a TS named .dat was not_a_video); a picture, and sound with
    its cover art (a video stream FFmpeg reads), are not_a_video."""
    import subprocess

    ingest = load_script("ingest_videos")
    folder = tmp_path / "videos"
    folder.mkdir()
    frames = _frames(0, 8)
    _pyav_video(folder / "a.3gp", "libx264", frames)
    (folder / "a.txt").write_text("a phone's video")
    (folder / "b.ts").write_bytes(encode_mp4(frames, FPS))
    _pyav_video(folder / "c.divx", "mpeg4", frames, container_format="avi")
    _pyav_video(folder / "d", "libx264", frames, container_format="matroska")
    _pyav_video(folder / "e.flv", "flv", frames)
    _pyav_video(folder / "f.dat", "libx264", frames, container_format="mpegts")
    (folder / "f.txt").write_text("its sidecar goes with it")
    Image.fromarray(frames[0]).save(folder / "g.jpg")
    tone = ["-f", "lavfi", "-i", "sine=duration=1", "-i", str(folder / "g.jpg")]
    cover = ["-map", "0", "-map", "1", "-c:v", "copy", "-disposition:v", "attached_pic"]
    subprocess.run(["ffmpeg", "-loglevel", "error", *tone, *cover, str(folder / "h.mp3")], check=True)
    skipped = ingest.ingest_videos(folder, tmp_path / "shards", shard_size=8)
    assert skipped == {"unsupported_container": 2, "not_a_video": 2}
    samples = {
        raw["__key__"]: raw for shard in ShardIndex.load(tmp_path / "shards").shards for raw in read_shard(shard.url)
    }
    fields = {key: [f for f in raw if f.startswith("video.")] for key, raw in samples.items()}
    assert fields == {
        "00000000_a": ["video.mp4"],
        "00000001_b": ["video.mp4"],
        "00000002_c": ["video.avi"],
        "00000003_d": ["video.mkv"],
    }
    for key in samples:
        sample = decode_sample(samples[key])
        assert sample.fps == FPS and len(sample.video) == len(frames), key
    assert decode_sample(samples["00000000_a"]).caption == "a phone's video"


def _lerobot_v3(root, episodes: int = 2, camera: str = "observation.images.top") -> list[dict]:
    """A v3.0 dataset at ``root`` whose ``episodes`` episodes share one parquet file and one mp4
    (action column 1 holds the global frame number, frame i shows i); returns their
    meta/episodes rows for the caller to write (``_write_v3_episodes``), damaged or not."""
    info = {
        "codebase_version": "v3.0",
        "fps": FPS,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": {
            camera: {"dtype": "video", "shape": [32, 32, 3]},
            "action": {"dtype": "float32", "shape": [WIDTH]},
            "timestamp": {"dtype": "float32", "shape": [1]},
            "episode_index": {"dtype": "int64", "shape": [1]},
        },
    }
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    rows = np.zeros((episodes * FRAMES, WIDTH), np.float32)
    rows[:, 1] = np.arange(episodes * FRAMES)  # the global frame number
    table = pa.table(
        {
            "action": pa.array(list(rows), type=pa.list_(pa.float32())),
            "timestamp": pa.array(np.tile(np.arange(FRAMES) / FPS, episodes), type=pa.float32()),
            "episode_index": np.repeat(np.arange(episodes), FRAMES),
            "index": np.arange(episodes * FRAMES),
        }
    )
    (root / "data" / "chunk-000").mkdir(parents=True)
    pq.write_table(table, root / "data" / "chunk-000" / "file-000.parquet")
    video = root / "videos" / camera / "chunk-000" / "file-000.mp4"
    video.parent.mkdir(parents=True)
    video.write_bytes(encode_mp4(_frames(0, episodes * FRAMES), FPS, crf=4, keyframe_interval=5))
    return [
        {
            "episode_index": e,
            "tasks": [f"push {e}"],
            "length": FRAMES,
            "data/chunk_index": 0,
            "data/file_index": 0,
            "dataset_from_index": e * FRAMES,
            "dataset_to_index": (e + 1) * FRAMES,
            f"videos/{camera}/chunk_index": 0,
            f"videos/{camera}/file_index": 0,
            f"videos/{camera}/from_timestamp": e * FRAMES / FPS,
            f"videos/{camera}/to_timestamp": (e + 1) * FRAMES / FPS,
        }
        for e in range(episodes)
    ]


def _write_v3_episodes(root, *files: list[dict]) -> None:
    """meta/episodes/chunk-000/file-<k>.parquet, one per list of episode rows."""
    for k, rows in enumerate(files):
        pq.write_table(pa.Table.from_pylist(rows), root / "meta" / "episodes" / "chunk-000" / f"file-{k:03d}.parquet")


def test_a_lerobot_v3_dataset_gives_each_episode_its_rows_and_video_segment(tmp_path):
    """v3.0: two episodes share one parquet file and one mp4; each sample holds only its own rows
    and its own frames (episode 1's first frame is frame FRAMES of the shared video)."""
    root = tmp_path / "arm_v3"
    _write_v3_episodes(root, _lerobot_v3(root))
    assert not load_script("ingest_lerobot").ingest_lerobot(root, tmp_path / "out", "toy_arm")
    index = ShardIndex.load(tmp_path / "out")
    second = decode_sample(list(read_shard(index.shards[0].url))[1], SchemaContext({"toy_arm": WIDTH}))
    assert second.instruction == "push 1" and len(second.video) == len(second.actions) == FRAMES
    np.testing.assert_array_equal(second.actions[:, 1], np.arange(FRAMES, 2 * FRAMES))
    brightness = second.video[:, :, 0, 0].mean(axis=1).astype(float)
    np.testing.assert_allclose(brightness, 10 * np.arange(FRAMES, 2 * FRAMES), atol=3)


def test_an_input_with_nothing_to_ingest_is_an_error_naming_it_not_an_empty_dataset(tmp_path):
    """A LeRobot dataset listing no episode, or a folder holding no video (a wrong path), wrote an
    empty dataset without a word; a run reading it failed far from the cause."""
    root = tmp_path / "arm_v3"
    _lerobot_v3(root, episodes=1)
    _write_v3_episodes(root, [])
    with pytest.raises(ValueError, match=r"arm_v3/meta: lists no episode to ingest"):
        load_script("ingest_lerobot").ingest_lerobot(root, tmp_path / "out", "toy_arm")
    folder = tmp_path / "not_videos"
    folder.mkdir()
    (folder / "notes.txt").write_text("no video here")
    with pytest.raises(ValueError, match=r"not_videos: no video file to ingest \(left out: \{'not_a_video': 1\}\)"):
        load_script("ingest_videos").ingest_videos(folder, tmp_path / "out_videos")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_videos").exists()


def test_a_v3_episode_whose_place_in_the_shared_files_is_missing_or_wrong_is_a_counted_skip(tmp_path):
    """A v3 episode row that does not list the camera (another meta/episodes file without its
    columns, or nulls), or whose segment start is NaN or negative, or whose data file index is
    null, is that episode's skip (they were a KeyError/TypeError that ended the run, or, for a
    negative start, frames from before the segment); a cut info.json is an error naming the file."""
    root, camera = tmp_path / "arm_v3", "observation.images.top"
    rows = _lerobot_v3(root, episodes=6)
    rows[2][f"videos/{camera}/chunk_index"] = None
    rows[3][f"videos/{camera}/from_timestamp"] = float("nan")
    rows[4][f"videos/{camera}/from_timestamp"] = -1.0
    rows[5]["data/file_index"] = None
    no_camera = {key: value for key, value in rows[1].items() if not key.startswith("videos/")}
    _write_v3_episodes(root, [rows[0], *rows[2:]], [no_camera])
    ingest = load_script("ingest_lerobot")
    skipped = ingest.ingest_lerobot(root, tmp_path / "out", "toy_arm")
    assert skipped == {"missing_field": 3, "bad_metadata": 2}
    (kept,) = read_shard(ShardIndex.load(tmp_path / "out").shards[0].url)
    assert json.loads(kept["meta.json"])["source"]["episode_index"] == 0

    info = root / "meta" / "info.json"
    whole = json.loads(info.read_text())
    for text, message in [
        (info.read_text()[:50], "not a readable JSON file"),
        (json.dumps({**whole, "features": {**whole["features"], "timestamp": "float32"}}), "features['timestamp']="),
        (
            json.dumps({**whole, "features": {**whole["features"], "action": {"dtype": "float32"}}}),
            "features['action'] shape=None must",
        ),
    ]:
        info.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{info}: {message}")):
            ingest.ingest_lerobot(root, tmp_path / "out2", "toy_arm")


def _scipy_pseudo_actions(positions: np.ndarray, hand: Rotation, gripper: np.ndarray) -> np.ndarray:
    """The single_arm pseudo-actions of a fixed-base arm, from scipy (docs/DESIGN.md, the brief's
    "Pseudo-actions"): ego step = identity; hand step = T_i^-1 T_i+1 as (translation, first two
    columns of the rotation); the gripper value reached."""
    steps = len(positions) - 1
    relative = hand[:-1].inv() * hand[1:]
    ego = np.tile([0, 0, 0, 1, 0, 0, 0, 1, 0], (steps, 1))
    moved = hand[:-1].inv().apply(positions[1:] - positions[:-1])
    six = relative.as_matrix()[:, :, :2].transpose(0, 2, 1).reshape(steps, 6)
    return np.concatenate([ego, moved, six, gripper[1:, None]], axis=1)


def test_end_effector_poses_become_single_arm_pseudo_actions(lerobot, tmp_path):
    """Euler angles and a quaternion (its components named in another order) give the
    pseudo-actions scipy computes; the statistics are the pseudo-action layout's; bad names are
    errors that name the feature."""
    root, _, poses = lerobot
    ingest = load_script("ingest_lerobot")
    assert not ingest.ingest_lerobot(root, tmp_path / "euler", "", eef_key="observation.eef")
    ingest.main([str(root), str(tmp_path / "quaternion"), "--eef-key", "observation.pose", "--processes", "2"])
    context = SchemaContext({"single_arm": 19})
    for name in ("euler", "quaternion"):
        samples = [
            decode_sample(r, context) for s in ShardIndex.load(tmp_path / name).shards for r in read_shard(s.url)
        ]
        for episode, sample in enumerate(samples):
            euler = poses[episode][0].astype(np.float64)
            hand = Rotation.from_euler("xyz", euler[:, 3:6])
            expected = _scipy_pseudo_actions(euler[:, :3], hand, euler[:, 6])
            assert sample.embodiment == "single_arm" and sample.actions.shape == (FRAMES - 1, 19)
            assert len(sample.video) == FRAMES
            np.testing.assert_allclose(sample.actions, expected, atol=2e-5)
        stats = ActionStats.load(tmp_path / name)["single_arm"]
        assert not stats.raw and stats.count == 3 * (FRAMES - 1)
        every = np.concatenate([s.actions for s in samples]).astype(np.float64)
        np.testing.assert_allclose(stats.mean, every.mean(0), rtol=1e-12, atol=1e-15)

    features = json.loads((root / "meta" / "info.json").read_text())["features"]
    with pytest.raises(ValueError, match=r"--eef-key='observation.nope' is not a feature"):
        ingest.ingest_lerobot(root, tmp_path / "bad", "", eef_key="observation.nope")
    with pytest.raises(ValueError, match=r"--eef-key='observation.eef': needs one rotation, named qx qy qz qw"):
        ingest.eef_pose_of(features, "observation.eef", ["x", "y", "z", "a", "b", "c", "gripper"])
    with pytest.raises(ValueError, match=r"--eef-key='observation.state': the feature names no components"):
        ingest.eef_pose_of(features, "observation.state")
    with pytest.raises(ValueError, match=r"--embodiment='toy_arm': end-effector poses become 'single_arm'"):
        ingest.ingest_lerobot(root, tmp_path / "bad", "toy_arm", eef_key="observation.eef")
    # An episode with a zero quaternion is skipped and counted, the others written.
    shutil.copytree(root, tmp_path / "broken_root")
    episode_0 = tmp_path / "broken_root" / "data" / "chunk-000" / "episode_000000.parquet"
    broken = poses[0][1].copy()
    broken[3, [1, 3, 5, 7]] = 0.0
    table = pq.read_table(episode_0)
    column = table.column_names.index("observation.pose")
    pq.write_table(
        table.set_column(column, "observation.pose", pa.array(list(broken), pa.list_(pa.float32()))), episode_0
    )
    skipped = ingest.ingest_lerobot(tmp_path / "broken_root", tmp_path / "broken", "", eef_key="observation.pose")
    assert skipped == {"bad_metadata": 1} and ShardIndex.load(tmp_path / "broken").total_samples == 2


def test_clips_cut_before_pre_encoding_equal_the_clips_the_loader_cuts(tmp_path):
    """encode_shards --clip-seconds: a 3 s mp4 (with its sound), actions and timed captions become
    three 1 s grid clips (or seeded random ones), each the latents of the clip the loader cuts on
    the fly for the same window (here reached by another draw), with its captions and actions."""
    seconds, rate = 3, 48_000
    audio = np.zeros((2, seconds * rate), np.float32)
    audio[:, :: rate // 4] = 0.9  # a click every 0.25 s
    steps = np.zeros((seconds * FPS, 9), np.float32)
    steps[:, 0] = np.arange(seconds * FPS)  # step i says which it is
    long = {
        "__key__": "long",
        "meta.json": json.dumps(
            {
                "schema": 1,
                "fps": FPS,
                "embodiment": "camera",
                "action_rate_hz": FPS,
                "caption_segments": [
                    {"start_s": 0.0, "end_s": 1.4, "text": "dim"},
                    {"start_s": 1.4, "end_s": 3.0, "text": "bright"},
                ],
            }
        ).encode(),
        "video.mp4": encode_mp4(_frames(0, seconds * FPS), FPS, audio, rate, keyframe_interval=5),
        "actions.npy": encode_npy(steps),
    }
    with ShardWriter(tmp_path / "raw", "raw", 8) as writer:
        writer.write_raw(long)
    encode_shards = load_script("encode_shards")
    encoder = PooledLatentEncoder(4, 8)
    grid = MediaConfig(clip_seconds=1.0, clip_start="grid")
    assert not encode_shards.encode_shards(tmp_path / "raw", tmp_path / "grid", encoder, media=grid)
    context = SchemaContext(None, encoder.video_token_dim, encoder.audio_latent_dim)
    clips = [decode_sample(r, context) for s in ShardIndex.load(tmp_path / "grid").shards for r in read_shard(s.url)]
    assert [c.key for c in clips] == ["long-0000", "long-0001", "long-0002"]
    for k, clip in enumerate(clips):
        on_the_fly = latent_sample(decode_sample(long, SchemaContext(), grid, draw=k / 3 + 0.2), encoder)
        assert clip.timing == on_the_fly.timing == {"clip_start_s": float(k), "source_duration_s": 3.0}
        np.testing.assert_array_equal(clip.actions[:, 0], np.arange(10 * k, 10 * k + 10))
        for name in ("actions", "video_latents", "audio_latents"):
            np.testing.assert_array_equal(getattr(clip, name), getattr(on_the_fly, name))
        assert clip.caption_segments == on_the_fly.caption_segments and clip.caption == on_the_fly.caption
    assert [c.caption for c in clips] == ["dim", "dim bright", "bright"]
    assert not np.array_equal(clips[0].video_latents, clips[1].video_latents)  # a control: the windows differ

    # Random clips: the draws come from (seed, input shard, sample, k), as the loader's from (seed, slot, index).
    shuffled = MediaConfig(clip_seconds=1.0, clip_start="random")
    encode_shards.main(
        [str(tmp_path / "raw"), str(tmp_path / "random"), "--encoder", "pooled", "--video-latent-channels", "4"]
        + ["--audio-latent-dim", "8", "--clip-seconds", "1", "--clip-start", "random", "--clips-per-sample", "2"]
        + ["--seed", "7"]
    )
    clips = [decode_sample(r, context) for s in ShardIndex.load(tmp_path / "random").shards for r in read_shard(s.url)]
    assert len(clips) == 2 and clips[0].timing["clip_start_s"] != clips[1].timing["clip_start_s"]
    for k, clip in enumerate(clips):
        on_the_fly = latent_sample(decode_sample(long, SchemaContext(), shuffled, uniform(7, "clip", 0, 0, k)), encoder)
        assert clip.timing == on_the_fly.timing
        np.testing.assert_array_equal(clip.video_latents, on_the_fly.video_latents)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{videos}", "{shards}"], "already holds a finished dataset (index.json)"),
        (["{videos}", "{videos}"], "is the input folder"),
        (["{videos}/missing", "{tmp}/new"], "missing' is not a folder"),
        (["{videos}", "{tmp}/new", "--task", "3", "--tasks", "2"], "task=3 must be in [0, tasks=2)"),
        (["{videos}", "{tmp}/new", "--tasks", "0"], "task=0 must be in [0, tasks=0)"),
        (["{videos}", "{tmp}/new", "--processes", "-1"], "processes=-1 must be >= 0"),
        (["{videos}", "{tmp}/new", "--shard-size", "0"], "shard size 0 must be >= 1"),
    ],
)
def test_a_bad_split_or_output_folder_is_one_error_line_and_changes_nothing(tmp_path, capsys, argv, message):
    """A second run into a finished dataset overwrote its shards under the old index; the input folder
    as output mixed shards among the videos; a missing input wrote an empty dataset; the split's
    numbers were tracebacks (a ZeroDivisionError for --shard-size 0)."""
    ingest = load_script("ingest_videos")
    videos, shards = tmp_path / "videos", tmp_path / "shards"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(encode_mp4(_frames(0, 5), FPS))
    ingest.ingest_videos(videos, shards, shard_size=1)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        ingest.main([a.format(videos=videos, shards=shards, tmp=tmp_path) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "new").exists()


def test_lerobot_versions_segments_timestamps_and_frame_indices_are_checked(tmp_path):
    """Only the known layouts are read (v2.2 or v1.6 was read as v2 or refused without the list);
    a v3 episode's video segment whose to_timestamp disagrees with its frames, or is missing, rows
    that are not its dataset_from_index..dataset_to_index, a frame_index that is not 0, 1, ... and a
    parquet without timestamps are that episode's skip."""
    root, camera = tmp_path / "arm_v3", "observation.images.top"
    rows = _lerobot_v3(root, episodes=5)
    rows[1][f"videos/{camera}/to_timestamp"] += 1.0  # another episode's length of video
    del rows[2][f"videos/{camera}/to_timestamp"]
    rows[4]["dataset_from_index"] -= 1  # a row of episode 3 too
    _write_v3_episodes(root, [rows[0], rows[1], rows[3], rows[4]], [rows[2]])
    data = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data)
    frame_index = np.tile(np.arange(FRAMES), 5)
    frame_index[3 * FRAMES + 2] = 7  # episode 3's third frame
    pq.write_table(table.append_column("frame_index", pa.array(frame_index)), data)
    ingest = load_script("ingest_lerobot")
    assert ingest.ingest_lerobot(root, tmp_path / "out", "toy_arm") == {"bad_metadata": 3, "missing_field": 1}
    (kept,) = read_shard(ShardIndex.load(tmp_path / "out").shards[0].url)
    assert json.loads(kept["meta.json"])["source"]["episode_index"] == 0

    pq.write_table(table.drop_columns(["timestamp"]), data)
    assert ingest.ingest_lerobot(root, tmp_path / "out_no_stamps", "toy_arm") == {"missing_field": 4, "bad_metadata": 1}

    info = root / "meta" / "info.json"
    for version in ("v2.2", "v1.6", "3.0", None):
        info.write_text(json.dumps({**json.loads(info.read_text()), "codebase_version": version}))
        with pytest.raises(
            ValueError, match=re.escape(f"{info}: codebase_version={version!r}; this reader knows v2.0")
        ):
            ingest.ingest_lerobot(root, tmp_path / "out_version", "toy_arm")
