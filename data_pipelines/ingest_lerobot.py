#!/usr/bin/env python
"""A LeRobot-format robot dataset (parquet + mp4 per camera; v2.x and v3.0 layouts) -> shards.

    python data_pipelines/ingest_lerobot.py ROOT OUT_DIR --embodiment NAME [--camera KEY]
        [--action-key action] [--shard-size 64] [--task I --tasks N | --processes P]
    python data_pipelines/ingest_lerobot.py ROOT OUT_DIR --eef-key observation.state [--eef-names x,y,z,...]

LeRobot's layout (``meta/info.json``: ``codebase_version``, ``fps``, ``data_path`` and ``video_path``
templates, ``features``; v2: ``meta/episodes.jsonl`` (``episode_index``, ``tasks``, ``length``), one
parquet and one mp4 per camera per episode; v3: ``meta/episodes/chunk-*/file-*.parquet`` with the
same keys plus ``data/chunk_index``, ``data/file_index`` and ``videos/<camera>/{chunk_index,
file_index, from_timestamp}``, many episodes per parquet and mp4, an episode's video being its
segment): each episode becomes one sample — the camera's mp4 (``video.mp4``: v2's file as it is,
v3's segment cut and encoded again, H.264 crf 18, since a cut between keyframes cannot be copied), its
raw actions (the ``--action-key`` column, one row per frame: row i is the command from frame i to
i + 1, the schema's rule) as ``actions.npy`` under the embodiment ``--embodiment``, which the model
must register with that width (``model.embodiments``), ``fps`` and ``action_rate_hz`` the dataset's
rate, the episode's task text as its ``instruction``. The loader cuts clips from episodes with their
actions (``data.media.clip_seconds``). ``action_stats.json`` beside the index holds the per-dim
statistics (mean, std, 1st/99th percentiles) of every action row of the written episodes, as a raw
layout (``encoders/action_normalization.py``): the loader normalises the actions with it and
generation un-normalises them. It is computed from the shards by whichever task writes the index,
so a split computes what one process does.

Pseudo-actions from end-effector poses (``--eef-key FEATURE``): instead of the raw action column,
the feature holding the end effector's absolute pose and gripper per frame (a fixed-base arm: the
base is the world frame) becomes the ``single_arm`` pseudo-actions of ``encoders/pseudo_actions.py``
(relative SE(3) steps, 6D rotations, the gripper value reached; T frames give T - 1 steps, step i
from frame i to i + 1), with pseudo-action statistics. Its components are found by name (the
feature's ``names`` in ``info.json``, or ``--eef-names``; each name's last ``_``/``.``-separated word,
lower case): the position ``x``, ``y``, ``z`` (metres), one rotation — ``qx qy qz qw`` (quaternion),
``roll pitch yaw`` (radians about the fixed x, y, z axes), or ``rx ry rz`` (rotation vector) — and
the one name containing ``gripper``. A name missing, twice, or a feature that is not there is a
ValueError naming the feature. ``codebase_version`` must be one of ``KNOWN_VERSIONS`` (v2.0, v2.1,
v3.0; another is refused naming it). An episode without a ``timestamp`` column (``missing_field``),
whose frame timestamps are not ``i / fps``, whose ``frame_index`` is not 0, 1, ..., whose v3 video
segment (``from_timestamp`` to ``to_timestamp``) is not as long as its frames, whose v3 rows are
not ``dataset_from_index`` to ``dataset_to_index`` of its data file, or whose action
rows disagree with its ``length`` is skipped, counted and logged, as
is one the loader could not read (checked as ``ingest_videos.py`` checks a video). Split over tasks or
local processes exactly as ``ingest_videos.py`` (the output does not depend on it).
"""

from __future__ import annotations

import argparse
import logging
import re
import string
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from megatron_cosmos3.data.clips import MediaConfig, Window
from megatron_cosmos3.data.errors import BAD_METADATA, CORRUPT_MEDIA, MISSING_FIELD, ZERO_LENGTH, SampleError
from megatron_cosmos3.data.media import encode_json, encode_npy
from megatron_cosmos3.data.media_files import decode_media_file
from megatron_cosmos3.data.media_writers import encode_mp4
from megatron_cosmos3.data.schema import FPS_RANGE, SCHEMA_VERSION, SchemaContext, blank_text, decode_sample
from megatron_cosmos3.data.shard_writer import (
    ShardWriter,
    check_split_output,
    empty_output_status,
    run_split,
    write_action_stats,
    write_parts,
)
from megatron_cosmos3.encoders.pseudo_actions import (
    EGO,
    BodyPoses,
    EmbodimentTrajectory,
    encode_pseudo_actions,
    get_layout,
)
from megatron_cosmos3.encoders.rotations import euler_xyz_to_matrix, quaternion_to_matrix, rotation_vector_to_matrix
from megatron_cosmos3.json_files import JsonNumberError, loads, unique_keys

log = logging.getLogger("ingest_lerobot")
CHECK = MediaConfig(clip_seconds=1.0, clip_start="first")
# Frame timestamps may differ from i / fps by this much (LeRobot stores them as float32).
TIMESTAMP_TOLERANCE_S = 1e-3
# The LeRobot layouts this reader knows (``codebase_version``): v2.1 differs from v2.0 in its
# per-episode statistics only, which are not read here; v3.0 shares files between episodes.
KNOWN_VERSIONS = ("v2.0", "v2.1", "v3.0")
EEF_EMBODIMENT = "single_arm"  # the pseudo-action layout an end effector's poses become
POSITION_NAMES = ("x", "y", "z")
ROTATION_FORMS = {  # the names of each rotation form's components -> their matrices
    "quaternion": (("qx", "qy", "qz", "qw"), quaternion_to_matrix),
    "euler_xyz": (("roll", "pitch", "yaw"), euler_xyz_to_matrix),
    "rotation_vector": (("rx", "ry", "rz"), rotation_vector_to_matrix),
}


@dataclass(frozen=True)
class EefPose:
    """Where an end effector's pose and gripper sit in a feature's columns (module doc)."""

    feature: str
    position: tuple[int, ...]
    rotation_form: str  # a ROTATION_FORMS key
    rotation: tuple[int, ...]
    gripper: int


def _feature_names(feature: dict) -> list[str] | None:
    """A LeRobot feature's component names: ``names`` as a list, or its one list in a dict
    (``{"motors": [...]}``)."""
    names = feature.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    return [str(n) for n in names] if isinstance(names, list) else None


def feature_width(features: dict, key: str, where: str) -> int:
    """The number of values per frame of feature ``key`` (the product of its ``shape``);
    ValueError starting with ``where`` and naming the feature and its shape unless that is a list of
    ints > 0 (a text or null shape was a raw TypeError from numpy)."""
    shape = features[key].get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"{where}: features[{key!r}] shape={shape!r} must be a list of ints > 0")
    return int(np.prod(shape))


def eef_pose_of(features: dict, key: str, names: list[str] | None = None) -> EefPose:
    """The columns of feature ``key`` that hold the end effector's pose and gripper, by name
    (``names`` overrides the feature's own); ValueError naming the feature otherwise."""
    if key not in features:
        raise ValueError(f"--eef-key={key!r} is not a feature of the dataset: {sorted(features)}")
    names = names or _feature_names(features[key])
    width = feature_width(features, key, f"--eef-key={key!r}")
    if not names:
        raise ValueError(f"--eef-key={key!r}: the feature names no components; give them with --eef-names")
    if len(names) != width:
        raise ValueError(f"--eef-key={key!r}: {len(names)} names {names} for a feature of width {width}")
    words = [re.split(r"[._]", name.lower())[-1] for name in names]

    def column(word: str) -> int:
        found = [i for i, w in enumerate(words) if w == word]
        if len(found) != 1:
            raise ValueError(f"--eef-key={key!r}: needs exactly one component named {word!r}, names are {names}")
        return found[0]

    forms = [form for form, (wanted, _) in ROTATION_FORMS.items() if set(wanted) <= set(words)]
    if len(forms) != 1:
        options = "; ".join(f"{' '.join(w)} ({form})" for form, (w, _) in ROTATION_FORMS.items())
        raise ValueError(f"--eef-key={key!r}: needs one rotation, named {options}; names are {names}")
    grippers = [i for i, name in enumerate(names) if "gripper" in name.lower()]
    if len(grippers) != 1:
        raise ValueError(f"--eef-key={key!r}: needs exactly one component named *gripper*, names are {names}")
    rotation = tuple(column(w) for w in ROTATION_FORMS[forms[0]][0])
    return EefPose(key, tuple(column(w) for w in POSITION_NAMES), forms[0], rotation, grippers[0])


def eef_pseudo_actions(states: np.ndarray, eef: EefPose) -> np.ndarray:
    """``(T, width)`` rows of the pose feature -> ``(T - 1, 19)`` float32 ``single_arm``
    pseudo-actions of a fixed-base arm (the base is the world frame)."""
    values = torch.from_numpy(np.asarray(states, dtype=np.float64))
    frames = len(values)
    to_matrix = ROTATION_FORMS[eef.rotation_form][1]
    hand = BodyPoses(values[:, list(eef.position)], to_matrix(values[:, list(eef.rotation)], name=eef.feature))
    base = BodyPoses(
        torch.zeros(frames, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64).expand(frames, 3, 3)
    )
    trajectory = EmbodimentTrajectory(
        EEF_EMBODIMENT, {EGO: base, "end_effector": hand}, {"gripper": values[:, [eef.gripper]]}
    )
    return encode_pseudo_actions(trajectory).numpy().astype(np.float32)


def read_info(root: Path) -> dict:
    """``meta/info.json``; ValueError naming the file for a layout this reader does not know."""
    path = root / "meta" / "info.json"
    try:
        # A key given twice (which "fps"?) is refused: parsers disagree on which one wins.
        info = loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=unique_keys)
    except JsonNumberError as error:
        raise ValueError(f"{path}: {error}") from None
    except (OSError, ValueError, RecursionError) as error:  # missing, not UTF-8, cut or not JSON
        raise ValueError(f"{path}: not a readable JSON file ({type(error).__name__}: {error})") from None
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'features' object")
    for key, feature in info["features"].items():
        if not isinstance(feature, dict):
            raise ValueError(f"{path}: features[{key!r}]={feature!r} must be an object")
    version = info.get("codebase_version")
    if version not in KNOWN_VERSIONS:  # another layout read as a known one gives wrong episodes without a word
        known = ", ".join(KNOWN_VERSIONS)
        raise ValueError(f"{root / 'meta' / 'info.json'}: codebase_version={version!r}; this reader knows {known}")
    chunks = info.get("chunks_size", 1000)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"{path}: chunks_size={chunks!r} must be an int >= 1")
    for key in ("data_path", "video_path"):
        if not isinstance(info.get(key), str):
            raise ValueError(f"{path}: {key}={info.get(key)!r} must be a path template (a string)")
        dataset_file(root, info, key, video_key="camera") if key == "video_path" else dataset_file(root, info, key)
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise ValueError(f"{root / 'meta' / 'info.json'}: fps={fps!r} must be a number in {list(FPS_RANGE)}")
    return info


def is_v3(info: dict) -> bool:
    return str(info["codebase_version"]).startswith("v3.")


def dataset_file(root: Path, info: dict, key: str, video_key: str | None = None, **where: int) -> Path:
    """``root`` / the ``info`` path template ``key`` filled with ``where`` (0 where not given) and
    ``video_key``. ValueError naming info.json and the template unless it names only the fields
    LeRobot's layout of its version gives (no attribute or index access) and the path stays in
    ``root`` (relative, no '..' component): a template or a camera key is data, and a file outside
    the dataset would be read as its episode."""
    fields = ("chunk_index", "file_index") if is_v3(info) else ("episode_chunk", "episode_index")
    values = {name: where.get(name, 0) for name in fields} | ({} if video_key is None else {"video_key": video_key})
    template = info[key]
    problem = f"{root / 'meta' / 'info.json'}: {key}={template!r}"
    try:
        named = [(field, spec) for _, field, spec, _ in string.Formatter().parse(template) if field is not None]
        unknown = [field for field, _ in named if field not in values]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not one of {sorted(values)}")
        if any("{" in (spec or "") or re.search(r"\d{4}", spec or "") for _, spec in named):
            raise ValueError("a nested field or a width of more than 3 digits")  # ':999999999d' is a GB name
        relative = PurePosixPath(template.format(**values))
    except ValueError as error:  # also a format spec its value does not take ('{episode_index:q}')
        raise ValueError(f"{problem}: not a path template of {sorted(values)} ({error})") from None
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"{problem} gives {str(relative)!r}, which leads out of the dataset folder")
    return root / relative


def episodes_of(root: Path, info: dict) -> list[dict]:
    """Every episode's metadata, by index: ``meta/episodes.jsonl`` (v2) or the rows of
    ``meta/episodes/chunk-*/file-*.parquet`` (v3)."""
    if is_v3(info):
        episodes = []
        for path in sorted((root / "meta" / "episodes").rglob("*.parquet")):
            try:
                episodes += pq.read_table(path).to_pylist()
            except (OSError, pa.ArrowException) as error:
                raise ValueError(f"{path}: not a readable parquet file ({type(error).__name__}: {error})") from None
    else:
        path = root / "meta" / "episodes.jsonl"
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:  # missing, a folder, not UTF-8
            raise ValueError(f"{path}: not a readable UTF-8 file ({type(error).__name__}: {error})") from None
        episodes = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                episodes.append(loads(line, object_pairs_hook=unique_keys))
            except (ValueError, RecursionError) as error:
                raise ValueError(f"{path}, line {number}: not JSON ({type(error).__name__}: {error})") from None
    seen: set[int] = set()
    for episode in episodes:
        index = episode.get("episode_index") if isinstance(episode, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"{root / 'meta'}: an episode's episode_index={index!r} must be an int >= 0")
        if index in seen:
            raise ValueError(f"{root / 'meta'}: episode_index={index} is listed twice")
        seen.add(index)
    return sorted(episodes, key=lambda e: e["episode_index"])


def _read_episode_file(path: Path, index: int, read):
    """``read(path)``; a missing file is the episode's ``missing_field``, an unreadable one its
    ``corrupt_media`` (one lost episode is counted, not the end of the run)."""
    if not path.is_file():
        raise SampleError(MISSING_FIELD, f"episode {index}: {path} does not exist")
    try:
        return read(path)
    except (OSError, pa.ArrowException) as error:
        raise SampleError(CORRUPT_MEDIA, f"episode {index}: {path}: {type(error).__name__}: {error}") from None


def _episode_rows(root: Path, info: dict, episode: dict):
    """The episode's frames (a parquet table): its own file (v2), or its rows of a shared one (v3)."""
    index = int(episode["episode_index"])
    if not is_v3(info):
        where = {"episode_chunk": index // info.get("chunks_size", 1000), "episode_index": index}
        return _read_episode_file(dataset_file(root, info, "data_path", **where), index, pq.read_table)
    where = {key: _episode_entry(episode, f"data/{key}", int) for key in ("chunk_index", "file_index")}
    path = dataset_file(root, info, "data_path", **where)
    table = _read_episode_file(path, index, pq.read_table)
    if "episode_index" not in table.column_names:  # a shared file's rows say whose they are
        raise SampleError(MISSING_FIELD, f"episode {index}: {path} has no episode_index")
    keep = np.asarray(table.column("episode_index").to_pylist()) == index
    rows = table.filter(keep)
    if "dataset_from_index" in episode or "dataset_to_index" in episode:  # where its meta row says they are
        start, end = (_episode_entry(episode, key, int) for key in ("dataset_from_index", "dataset_to_index"))
        # Without an index column, their count is all there is to compare.
        stored = (
            rows.column("index").to_pylist() if "index" in rows.column_names else [*range(start, start + rows.num_rows)]
        )
        if stored != list(range(start, end)):
            raise SampleError(
                BAD_METADATA,
                f"episode {index}: dataset_from_index..dataset_to_index={start}..{end}, but its {rows.num_rows} "
                f"rows of {path} are {stored[:1]}..{stored[-1:]}",
            )
    return rows


def _episode_entry(episode: dict, key: str, kind: type) -> int | float:
    """A v3 episode's place in its shared files: ``key`` an int >= 0 (a chunk or file index) or a
    finite number of seconds >= 0 (``from_timestamp``). An episode without it (a camera its row
    does not list) is ``missing_field``, a value of another kind ``bad_metadata``: that episode's
    skip, not the end of the run."""
    index, value = episode["episode_index"], episode.get(key)
    if value is None:
        raise SampleError(MISSING_FIELD, f"episode {index}: no {key!r} in its meta/episodes row")
    if kind is int:
        fits = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    else:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
    if not fits:
        want = "an int >= 0" if kind is int else "a finite number of seconds >= 0"
        raise SampleError(BAD_METADATA, f"episode {index}: {key}={value!r} must be {want}")
    return kind(value)


def _episode_video(root: Path, info: dict, episode: dict, camera: str, frames: int, fps: float) -> bytes:
    """The camera's mp4 of the episode: its own file (v2), or its segment of a shared one (v3),
    decoded at the dataset's rate and encoded again (H.264 crf 18: a cut between keyframes cannot
    be copied)."""
    index = int(episode["episode_index"])
    if not is_v3(info):
        where = {"episode_chunk": index // info.get("chunks_size", 1000), "episode_index": index}
        return _read_episode_file(dataset_file(root, info, "video_path", camera, **where), index, Path.read_bytes)
    where = {key: _episode_entry(episode, f"videos/{camera}/{key}", int) for key in ("chunk_index", "file_index")}
    path = dataset_file(root, info, "video_path", camera, **where)
    start = _episode_entry(episode, f"videos/{camera}/from_timestamp", float)
    end = _episode_entry(episode, f"videos/{camera}/to_timestamp", float)
    # The segment holds the episode's frames: a range of another length is another episode's video.
    if abs(end - start - frames / fps) > 1 / fps + TIMESTAMP_TOLERANCE_S:
        raise SampleError(
            BAD_METADATA,
            f"episode {index}: videos/{camera}/from_timestamp={start:g} to_timestamp={end:g} is "
            f"{end - start:g} s, its {frames} frames at {fps:g} fps are {frames / fps:g} s",
        )
    decoded = decode_media_file(
        _read_episode_file(path, index, Path.read_bytes),
        str(path),
        MediaConfig(fps=fps),
        lambda _: Window(start, frames / fps),
        True,
        False,
    )
    return encode_mp4(decoded.frames, fps)


def episode_sample(
    root: Path, info: dict, episode: dict, camera: str, action_key: str, embodiment: str, eef: EefPose | None = None
) -> dict:
    """The WebDataset dict of one episode (module doc): its raw ``action_key`` rows, or the
    pseudo-actions of its end-effector poses when ``eef`` says where they are."""
    index = int(episode["episode_index"])
    table = _episode_rows(root, info, episode)
    column = eef.feature if eef else action_key
    if table.num_rows == 0:
        raise SampleError(ZERO_LENGTH, f"episode {index}: no frames")
    if column not in table.column_names:
        raise SampleError(MISSING_FIELD, f"episode {index}: its parquet has no {column!r} column")
    try:
        rows = np.stack([np.asarray(row, dtype=np.float64) for row in table.column(column).to_pylist()])
    except (TypeError, ValueError) as error:  # a null row, rows of different widths, text
        raise SampleError(
            BAD_METADATA, f"episode {index}: {column} rows are not one width of numbers ({error})"
        ) from None
    length = episode.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or len(rows) != length):
        raise SampleError(BAD_METADATA, f"episode {index}: {len(rows)} {column} rows, its length is {length!r}")
    if eef is not None and len(rows) < 2:
        raise SampleError(BAD_METADATA, f"episode {index}: {len(rows)} frame(s); pseudo-actions need 2")
    try:  # a pose that is no rotation (a zero quaternion, NaN) is the episode's fault, not the run's
        actions = eef_pseudo_actions(rows, eef) if eef else rows.astype(np.float32)
    except ValueError as error:
        raise SampleError(BAD_METADATA, f"episode {index}: {eef.feature if eef else column}: {error}") from None
    fps = float(info["fps"])
    if "timestamp" not in table.column_names:  # frames could not be matched to the video's time
        raise SampleError(MISSING_FIELD, f"episode {index}: its parquet has no 'timestamp' column")
    if "frame_index" in table.column_names:
        try:
            frame_index = np.asarray(table.column("frame_index").to_pylist(), dtype=np.float64)
        except (TypeError, ValueError):
            frame_index = None
        if frame_index is None or frame_index.shape != (len(rows),) or (frame_index != np.arange(len(rows))).any():
            raise SampleError(BAD_METADATA, f"episode {index}: its frame_index rows are not 0, 1, ..., {len(rows) - 1}")
    try:  # text or lists where seconds should be are the episode's fault, not the run's end
        stamps = np.asarray(table.column("timestamp").to_pylist(), dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise SampleError(BAD_METADATA, f"episode {index}: timestamp is not a column of seconds ({error})") from None
    if stamps.ndim != 1:
        raise SampleError(BAD_METADATA, f"episode {index}: timestamp rows of shape {stamps.shape[1:]}, not seconds")
    late = np.abs(stamps - np.arange(len(stamps)) / fps)
    late[~np.isfinite(late)] = np.inf  # a NaN or missing stamp is no i / fps either
    if late.max() > TIMESTAMP_TOLERANCE_S:
        frame = int(np.argmax(late))
        detail = f"episode {index}: frame {frame} is stamped {stamps[frame]:.4f} s, not {frame / fps:.4f} s"
        raise SampleError(BAD_METADATA, detail)
    tasks = episode.get("tasks") or []
    if not isinstance(tasks, list) or not all(isinstance(task, str) for task in tasks):
        raise SampleError(BAD_METADATA, f"episode {index}: tasks={tasks!r} must be a list of strings")
    meta = {
        "schema": SCHEMA_VERSION,
        "fps": fps,
        "embodiment": embodiment,
        "action_rate_hz": fps,
        "source": {"dataset": root.name, "episode_index": index, "camera": camera},
    }
    tasks = [task for task in tasks if not blank_text(task)]  # a blank task text is no instruction
    if tasks:
        meta["instruction"] = " ".join(tasks)
    return {
        "__key__": f"episode_{index:08d}",
        "meta.json": encode_json(meta),
        "video.mp4": _episode_video(root, info, episode, camera, len(rows), fps),
        "actions.npy": encode_npy(actions),
    }


def ingest_lerobot(
    root: str | Path,
    out_dir: str | Path,
    embodiment: str,
    camera: str = "",
    action_key: str = "action",
    shard_size: int = 64,
    eef_key: str = "",
    eef_names: tuple[str, ...] = (),
    task: int = 0,
    tasks: int = 1,
) -> Counter:
    """Writes task ``task`` of ``tasks``'s parts of the shards of the dataset at ``root`` (module
    doc): raw ``action_key`` actions under ``embodiment``, or with ``eef_key`` the ``single_arm``
    pseudo-actions of that feature's end-effector poses (``eef_names`` overriding its names);
    returns skip counts per reason."""
    root = Path(root)
    check_split_output(out_dir, root, shard_size, task, tasks)
    info = read_info(root)
    features = info["features"]
    cameras = [key for key, feature in features.items() if feature.get("dtype") == "video"]
    camera = camera or (cameras[0] if cameras else "")
    if camera not in cameras:
        raise ValueError(f"--camera={camera!r} is not a video feature of {root}: {cameras}")
    dataset_file(root, info, "video_path", camera)  # a camera key is a folder name: never '../..'
    eef = eef_pose_of(features, eef_key, list(eef_names)) if eef_key else None
    if eef is not None:
        if embodiment not in ("", EEF_EMBODIMENT):
            raise ValueError(
                f"--embodiment={embodiment!r}: end-effector poses become {EEF_EMBODIMENT!r} pseudo-actions"
            )
        embodiment, width = EEF_EMBODIMENT, get_layout(EEF_EMBODIMENT).dim
    elif not embodiment:
        raise ValueError("--embodiment is needed for raw actions (or --eef-key for pseudo-actions)")
    elif action_key not in features:
        raise ValueError(f"--action-key={action_key!r} is not a feature of {root}: {sorted(features)}")
    else:
        width = feature_width(features, action_key, str(root / "meta" / "info.json"))
    context = SchemaContext({embodiment: width})
    episodes = episodes_of(root, info)
    if not episodes:  # an empty dataset would fail only when a run reads it
        raise ValueError(f"{root / 'meta'}: lists no episode to ingest")
    skipped: Counter = Counter()

    def write_part(part: int, writer: ShardWriter) -> None:
        for episode in episodes[part * shard_size : (part + 1) * shard_size]:
            try:
                raw = episode_sample(root, info, episode, camera, action_key, embodiment, eef)
                checked = decode_sample(raw, context, CHECK)
            except SampleError as error:
                skipped[error.reason] += 1
                log.warning("%s episode %s: skipped: %s", root, episode.get("episode_index"), error)
                continue
            writer.write_raw(raw, checked.modalities)

    parts = -(-len(episodes) // shard_size)
    write_parts(
        out_dir,
        "episodes",
        parts,
        write_part,
        task,
        tasks,
        shard_size,
        context,
        False,
        finish=write_action_stats(not eef),
    )
    return skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the LeRobot dataset folder (meta/, data/, videos/)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--embodiment", default="", help="the registered embodiment its raw actions train")
    parser.add_argument("--camera", default="", help="video feature key (default: the first)")
    parser.add_argument("--action-key", default="action")
    parser.add_argument("--eef-key", default="", help="feature of end-effector poses -> single_arm pseudo-actions")
    parser.add_argument("--eef-names", default="", help="comma-separated component names of --eef-key")
    parser.add_argument("--shard-size", type=int, default=64, help="episodes per shard")
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--processes", type=int, default=0, help="split over P local processes instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = tuple(n.strip() for n in args.eef_names.split(",") if n.strip())
    common = (
        args.root,
        args.out_dir,
        args.embodiment,
        args.camera,
        args.action_key,
        args.shard_size,
        args.eef_key,
        names,
    )
    try:
        skipped = run_split(ingest_lerobot, args.processes, args.task, args.tasks, *common)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    log.info("wrote %s; skipped %s", args.out_dir, dict(skipped) or "none")
    return empty_output_status(args.out_dir, skipped)


if __name__ == "__main__":
    sys.exit(main())
