"""compute_action_stats: known motions give known statistics; malformed episodes are skipped and counted."""

import importlib.util
import io
import logging
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from megatron_cosmos3.data.media import encode_npy
from megatron_cosmos3.encoders.action_normalization import ACTION_STATS_FILENAME, ActionStats

SCRIPT = Path(__file__).resolve().parents[2] / "data_pipelines" / "compute_action_stats.py"
# data_pipelines/ is a folder of operator scripts, not a package: load the script by path.
_spec = importlib.util.spec_from_file_location("compute_action_stats", SCRIPT)
compute_action_stats = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = compute_action_stats
_spec.loader.exec_module(compute_action_stats)

YAW_STEP, SPEED = 0.1, 0.5  # vehicle: turns 0.1 rad and drives 0.5 m forward per frame


def vehicle_episode(frames=6):
    """Drives SPEED metres along its heading, then yaws YAW_STEP: every step is the same motion."""
    positions, rotation = [np.array([10.0, -3.0, 0.2])], Rotation.from_euler("z", 0.7)
    rotations = [rotation]
    for _ in range(frames - 1):
        positions.append(positions[-1] + rotations[-1].apply([SPEED, 0, 0]))
        rotations.append(rotations[-1] * Rotation.from_euler("z", YAW_STEP))
    return {
        "embodiment": np.array("vehicle"),
        "ego_positions": np.stack(positions),
        "ego_quaternions": Rotation.concatenate(rotations).as_quat(),
    }


def fixed_base_arm_episode():
    """No ego keys (fixed base); the gripper rises 1 cm per step, orientation fixed, as matrices."""
    return {
        "embodiment": np.array("single_arm"),
        "end_effector_positions": np.array([[0.3, 0.0, 0.1 + 0.01 * i] for i in range(5)]),
        "end_effector_rotations": np.tile(np.eye(3), (5, 1, 1)),
        "gripper": np.array([0.0, 0.2, 0.4, 0.6, 0.8]),
    }


def mobile_arm_episode():
    """The base drives 0.2 m along world x per step, carrying a still arm (zero arm action)."""
    base = np.array([[0.2 * i, 1.0, 0.0] for i in range(4)])
    return {
        "embodiment": np.array("single_arm"),
        "ego_positions": base,
        "ego_quaternions": np.tile([0, 0, 0, 1.0], (4, 1)),
        "end_effector_positions": base + [0.5, 0.0, 0.3],
        "end_effector_quaternions": np.tile(Rotation.from_rotvec([0, 0.3, 0]).as_quat(), (4, 1)),
        "gripper": np.array([[1.0], [1.0], [0.5], [0.5]]),
    }


MALFORMED = {
    "corrupt.npz": None,  # not a zip at all
    "nan_position.npz": {**vehicle_episode(), "ego_positions": np.full((6, 3), np.nan)},
    "missing_gripper.npz": {k: v for k, v in fixed_base_arm_episode().items() if k != "gripper"},
    "one_frame.npz": {k: v[:1] for k, v in vehicle_episode().items() if k != "embodiment"}
    | {"embodiment": np.array("vehicle")},
    "unknown_kind.npz": {**vehicle_episode(), "embodiment": np.array("boat")},
    "declares_more.npz": "crafted",  # a member's header declares 6 GiB; np.load allocated it
}
EXPECTED_REASONS = {
    "corrupt.npz": "not an .npz (zip) archive",
    "nan_position.npz": "poses['ego'].positions must be finite",
    "missing_gripper.npz": "missing key 'gripper'",
    "one_frame.npz": "needs at least 2 frame(s)",
    "unknown_kind.npz": "unknown embodiment kind 'boat'",
    "declares_more.npz": "ego_positions.npy: its header declares float64 (268435456, 3)",
}


@pytest.fixture
def dataset(tmp_path):
    np.savez(tmp_path / "vehicle.npz", **vehicle_episode())
    np.savez(tmp_path / "arm_fixed.npz", **fixed_base_arm_episode())
    (tmp_path / "mobile").mkdir()
    np.savez(tmp_path / "mobile" / "arm_mobile.npz", **mobile_arm_episode())
    for name, content in MALFORMED.items():
        if content is None:
            (tmp_path / name).write_bytes(b"this is not a numpy archive" * 10)
        elif content == "crafted":
            with zipfile.ZipFile(tmp_path / name, "w") as archive:
                for key, value in vehicle_episode().items():
                    if key != "ego_positions":
                        archive.writestr(f"{key}.npy", encode_npy(value))
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 28, 3)}
                )
                archive.writestr("ego_positions.npy", header.getvalue())  # the header alone
        else:
            np.savez(tmp_path / name, **content)
    return tmp_path


def test_stats_of_known_motions_and_malformed_files_skipped_with_reasons(dataset, caplog):
    with caplog.at_level(logging.WARNING):
        report = compute_action_stats.compute_action_stats(dataset)
    assert report.files_used == 3
    reasons = {path.name: reason for path, reason in report.skipped}
    assert sorted(reasons) == sorted(MALFORMED)
    for name, fragment in EXPECTED_REASONS.items():
        assert fragment in reasons[name], (name, reasons[name])
        assert any(name in record.getMessage() and "skipping" in record.getMessage() for record in caplog.records)

    vehicle = report.stats["vehicle"]
    rz = Rotation.from_euler("z", YAW_STEP).as_matrix()
    np.testing.assert_allclose(vehicle.mean, [SPEED, 0, 0, *rz[:, 0], *rz[:, 1]], atol=1e-12)
    np.testing.assert_allclose(vehicle.std, np.zeros(9), atol=1e-12)
    assert vehicle.count == 5

    arm = report.stats["single_arm"]
    assert arm.count == 4 + 3
    # Ego: 3 base steps of 0.2 m among 7 actions; arm: 4 steps of 1 cm up, the carried arm none.
    np.testing.assert_allclose(arm.mean[0:3], [0.2 * 3 / 7, 0, 0], atol=1e-12)
    np.testing.assert_allclose(arm.mean[9:12], [0, 0, 0.01 * 4 / 7], atol=1e-12)
    np.testing.assert_allclose(arm.mean[12:18], [1, 0, 0, 0, 1, 0], atol=1e-12)  # no arm rotation at all
    np.testing.assert_allclose(arm.mean[18], np.mean([0.2, 0.4, 0.6, 0.8, 1.0, 0.5, 0.5]), atol=1e-12)
    assert arm.q01 is not None and arm.q99[18] <= 1.0


def test_main_writes_loadable_json_next_to_the_dataset(dataset, caplog):
    with caplog.at_level(logging.INFO):
        assert compute_action_stats.main([str(dataset)]) == 0
    assert "3 file(s) used, 6 skipped" in caplog.text
    loaded = ActionStats.load(dataset / ACTION_STATS_FILENAME)
    assert sorted(loaded.embodiments) == ["single_arm", "vehicle"]
    assert loaded["single_arm"].dim == 19

    out = dataset / "custom" / "stats.json"
    out.parent.mkdir()
    assert compute_action_stats.main([str(dataset), "--output", str(out), "--no-quantiles"]) == 0
    assert ActionStats.load(out)["vehicle"].q01 is None


@pytest.mark.timeout(60)  # a FIFO named *.npz was opened to be read: a hang
@pytest.mark.parametrize("unusable", ["corrupt.npz", "nan_position.npz", "fifo.npz"])
def test_main_fails_without_writing_when_no_file_is_usable(tmp_path, caplog, unusable):
    """A file of a known embodiment whose actions fail (NaN poses) left its kind an empty list of
    actions: torch.cat's traceback instead of the skip it had logged. A FIFO waited for a writer."""
    if unusable == "fifo.npz":
        os.mkfifo(tmp_path / unusable)
    elif MALFORMED[unusable] is None:
        (tmp_path / unusable).write_bytes(b"garbage")
    else:
        np.savez(tmp_path / unusable, **MALFORMED[unusable])
    with caplog.at_level(logging.INFO):
        assert compute_action_stats.main([str(tmp_path)]) == 1
    assert "0 file(s) used, 1 skipped" in caplog.text and "no usable trajectory" in caplog.text
    assert not (tmp_path / ACTION_STATS_FILENAME).exists()


def test_help_documents_the_expected_keys(capsys):
    with pytest.raises(SystemExit) as exited:
        compute_action_stats.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for key in ("embodiment", "<part>_positions", "<part>_quaternions", "gripper", "left_fingers", "--output"):
        assert key in out


def test_bad_input_or_output_is_one_line_exit_2_and_an_existing_file_is_kept(tmp_path, capsys):
    (tmp_path / "stats.json").write_text("mine")
    for args, message in [
        ([str(tmp_path / "missing")], "input"),
        ([str(tmp_path), "--output", str(tmp_path / "no" / "s.json")], "its folder does not exist"),
        ([str(tmp_path), "--output", str(tmp_path / "stats.json")], "exists; pass --overwrite"),
    ]:
        with pytest.raises(SystemExit) as exited:
            compute_action_stats.main(args)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and message in err and err.count("\n") == 1, err
    assert (tmp_path / "stats.json").read_text() == "mine" and not (tmp_path / "no").exists()
