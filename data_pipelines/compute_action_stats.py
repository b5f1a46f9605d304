#!/usr/bin/env python
"""Compute per-embodiment pseudo-action statistics for a folder of trajectory .npz files.

One .npz file = one episode of one embodiment. Keys (T frames, world frame, metres):

- ``embodiment``: 0-d string array, one of ``single_arm``, ``humanoid``, ``vehicle``, ``camera``.
- for every rigid part of the layout (``ego``; ``end_effector``; ``left_wrist``/``right_wrist``):
  ``<part>_positions`` (T, 3) and either ``<part>_quaternions`` (T, 4, xyzw) or
  ``<part>_rotations`` (T, 3, 3). A fixed-base robot may omit both ``ego_*`` keys: its base is
  then the world frame (identity ego pose). Vehicles and cameras must give the ego.
- joint values: ``gripper`` (T,) or (T, 1) for single_arm; ``left_fingers`` and
  ``right_fingers`` (T, 15) for humanoid.

Writes ``action_stats.json`` (see ``megatron_cosmos3.encoders.action_normalization``) into the
folder unless ``--output`` says otherwise; an existing file is replaced only with ``--overwrite``.
A file that cannot be read or fails validation is skipped with a logged reason and counted; the run
fails only when no file at all is usable.

    python data_pipelines/compute_action_stats.py /data/robot_episodes [--output stats.json]
"""

from __future__ import annotations

import argparse
import logging
import sys
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_cosmos3.config_files import refuse_irregular_file
from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.media import decode_npy
from megatron_cosmos3.encoders.action_normalization import ACTION_STATS_FILENAME, ActionStats, EmbodimentActionStats
from megatron_cosmos3.encoders.pseudo_actions import (
    EGO,
    BodyPoses,
    EmbodimentTrajectory,
    encode_pseudo_actions,
    get_layout,
)

logger = logging.getLogger(__name__)


@dataclass
class StatsReport:
    """What a run produced: the statistics, and which files were used or skipped and why."""

    stats: ActionStats
    files_used: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _array(data, key: str) -> torch.Tensor:
    if key not in data:
        raise ValueError(f"missing key {key!r} (keys present: {sorted(data.keys())})")
    return torch.from_numpy(np.asarray(data[key], dtype=np.float64))


def _rotations(data, part: str) -> torch.Tensor:
    for key in (f"{part}_quaternions", f"{part}_rotations"):
        if key in data:
            return _array(data, key)
    raise ValueError(f"missing key {part}_quaternions or {part}_rotations (keys present: {sorted(data.keys())})")


# The most bytes one array of an episode file may declare: an episode's poses are megabytes, and a
# crafted or damaged member's size is allocated before it is read.
MAX_ARRAY_BYTES = 1 << 30


def _npz_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file by name, read as the shards' .npy members are (``decode_npy``:
    never unpickled, a header declaring more bytes than follow refused), each member's declared
    size at most ``MAX_ARRAY_BYTES`` (``np.load`` allocated whatever a member declared)."""
    arrays = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            if info.file_size > MAX_ARRAY_BYTES:
                raise ValueError(
                    f"{info.filename} declares {info.file_size:,} bytes, more than MAX_ARRAY_BYTES={MAX_ARRAY_BYTES:,}"
                )
            try:
                arrays[info.filename.removesuffix(".npy")] = decode_npy(archive.read(info), info.filename)
            except SampleError as error:
                raise ValueError(str(error)) from None
    return arrays


def load_trajectory(path: str | Path) -> EmbodimentTrajectory:
    """Read one episode .npz into an ``EmbodimentTrajectory`` (float64); ValueError if malformed."""
    # a FIFO named *.npz: zipfile's open waited for a writer without end
    refuse_irregular_file("episode", path)
    # Checked up front: a non-zip file would be a zipfile error that says less.
    if not zipfile.is_zipfile(path):
        raise ValueError("not an .npz (zip) archive: corrupt, truncated or a plain .npy")
    data = _npz_arrays(path)
    if "embodiment" not in data:
        raise ValueError(f"missing key 'embodiment' (keys present: {sorted(data.keys())})")
    kind = data["embodiment"].item()
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    layout = get_layout(kind)
    poses = {}
    for part in layout.pose_parts:
        if part == EGO and len(layout.pose_parts) > 1 and not any(k.startswith(f"{EGO}_") for k in data):
            continue  # fixed base: filled in below, once the frame count is known
        poses[part] = BodyPoses(_array(data, f"{part}_positions"), _rotations(data, part))
    joints = {}
    for name, width in layout.joint_parts:
        values = _array(data, name)
        joints[name] = values[:, None] if values.dim() == 1 and width == 1 else values
    if EGO not in poses:
        frames = next(iter(poses.values())).positions.shape[:-1]
        poses[EGO] = BodyPoses(
            torch.zeros(*frames, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64).expand(*frames, 3, 3)
        )
    return EmbodimentTrajectory(kind, {part: poses[part] for part in layout.pose_parts}, joints)


def compute_action_stats(data_dir: str | Path, *, quantiles: bool = True) -> StatsReport:
    """Pseudo-action statistics over every ``*.npz`` under ``data_dir`` (recursively)."""
    actions_by_kind: dict[str, list[torch.Tensor]] = defaultdict(list)
    report = StatsReport(ActionStats({}))
    for path in sorted(Path(data_dir).rglob("*.npz")):
        try:
            trajectory = load_trajectory(path)
            actions = encode_pseudo_actions(trajectory)  # before its kind's list exists: a failing
            # file of a kind no other file has left an empty list, torch.cat's traceback at the end
            actions_by_kind[trajectory.kind].append(actions)
        # Broad on purpose: a corrupt zip alone can raise BadZipFile, zlib.error, EOFError or
        # OSError. Each failure is logged with its type and counted in the report, never hidden.
        except Exception as error:  # noqa: BLE001
            reason = f"{type(error).__name__}: {error}"
            logger.warning("skipping %s: %s", path, reason)
            report.skipped.append((path, reason))
            continue
        report.files_used += 1
    report.stats = ActionStats(
        {
            kind: EmbodimentActionStats.from_actions(kind, torch.cat(chunks).numpy(), quantiles=quantiles)
            for kind, chunks in sorted(actions_by_kind.items())
        }
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="folder searched recursively for episode .npz files")
    parser.add_argument(
        "--output", type=Path, default=None, help=f"JSON path (default: DATA_DIR/{ACTION_STATS_FILENAME})"
    )
    parser.add_argument("--no-quantiles", action="store_true", help="skip the 1st/99th percentiles (saves memory)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing statistics file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Checked before any episode is read: one line, exit code 2, nothing written.
    target = args.output or args.data_dir / ACTION_STATS_FILENAME
    target = target / ACTION_STATS_FILENAME if target.is_dir() else target
    if not args.data_dir.is_dir():
        parser.exit(2, f"{parser.prog}: error: input {str(args.data_dir)!r} is not a folder\n")
    if not target.parent.is_dir():
        parser.exit(2, f"{parser.prog}: error: --output {str(target)!r}: its folder does not exist\n")
    if target.exists() and not args.overwrite:  # the statistics a dataset was normalised with: never lost silently
        parser.exit(2, f"{parser.prog}: error: output {str(target)!r} exists; pass --overwrite to replace it\n")

    report = compute_action_stats(args.data_dir, quantiles=not args.no_quantiles)
    logger.info("%d file(s) used, %d skipped", report.files_used, len(report.skipped))
    if not report.stats.embodiments:
        logger.error("no usable trajectory under %s; nothing written", args.data_dir)
        return 1
    written = report.stats.save(target)
    for kind, stats in report.stats.embodiments.items():
        logger.info("%s: %d actions of dim %d", kind, stats.count, stats.dim)
    logger.info("wrote %s", written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
