"""Action normalisation: standardises every dim (6D rotations too; raw in format-1 files), persists to JSON."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from megatron_cosmos3.encoders.action_normalization import (
    ACTION_STATS_FILENAME,
    STD_FLOOR,
    ActionStats,
    EmbodimentActionStats,
    denormalize_actions,
    merge_action_stats,
    normalize_actions,
)
from megatron_cosmos3.encoders.pseudo_actions import ACTION_LAYOUTS
from megatron_cosmos3.encoders.rotations import matrix_to_rotation_6d


def sample_actions(kind: str, n: int = 500, seed: int = 0) -> np.ndarray:
    """Actions with per-dim scales from 1e-3 to 1e2 and 6D parts taken from real rotations."""
    rng = np.random.default_rng(seed)
    dim = ACTION_LAYOUTS[kind].dim
    actions = rng.normal(loc=rng.uniform(-5, 5, dim), scale=np.logspace(-3, 2, dim), size=(n, dim))
    rotation_dims = list(ACTION_LAYOUTS[kind].rotation_6d_dims)
    actions[:, rotation_dims] = rng.uniform(-1, 1, size=(n, len(rotation_dims)))
    return actions


@pytest.mark.parametrize("kind", ["single_arm", "humanoid"])
def test_from_actions_measures_mean_std_and_percentiles(kind):
    actions = sample_actions(kind)
    stats = EmbodimentActionStats.from_actions(kind, actions)
    assert stats.count == 500 and stats.dim == ACTION_LAYOUTS[kind].dim
    np.testing.assert_allclose(stats.mean, actions.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, actions.std(0), rtol=1e-12)
    # 1% of 500 samples lie below q01 (linear interpolation puts q01 between the 5th and 6th).
    below = (actions < np.array(stats.q01)).sum(0)
    above = (actions > np.array(stats.q99)).sum(0)
    assert (below == 5).all() and (above == 5).all()


@pytest.mark.parametrize("mode", ["mean_std", "quantile"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_round_trip_is_close_on_every_dim(mode, dtype):
    kind = "humanoid"
    actions = torch.tensor(sample_actions(kind, seed=1), dtype=dtype)
    stats = EmbodimentActionStats.from_actions(kind, actions.double().numpy())
    normalized = normalize_actions(actions, stats, mode=mode)
    restored = denormalize_actions(normalized, stats, mode=mode)
    assert normalized.dtype == dtype and restored.shape == actions.shape
    # Absolute error ~ eps * |mean| (means here reach 5) where x - mean cancels.
    torch.testing.assert_close(
        restored, actions, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6 if dtype == torch.float32 else 0
    )


def test_rotations_near_the_identity_are_standardised_and_raw_statistics_leave_them_exact():
    """Per-step rotations sit near the identity (first 6D component ~1, the rest ~0): standardised
    they span the noise's scale; statistics marked raw (format 1) leave them bit for bit."""
    kind = "single_arm"
    rng = np.random.default_rng(5)
    angles = rng.normal(scale=0.05, size=(400, 3))
    near_identity = matrix_to_rotation_6d(torch.tensor(Rotation.from_rotvec(angles).as_matrix()))
    actions = torch.tensor(sample_actions(kind, n=400, seed=5))
    for name, part in ACTION_LAYOUTS[kind].slices.items():
        if name.endswith(".rotation_6d"):
            actions[:, part] = near_identity
    rotation = list(ACTION_LAYOUTS[kind].rotation_6d_dims)
    stats = EmbodimentActionStats.from_actions(kind, actions.numpy())
    standardised = normalize_actions(actions, stats)[:, rotation]
    torch.testing.assert_close(standardised.std(0, unbiased=False), torch.ones(len(rotation), dtype=torch.float64))
    raw = dataclasses.replace(stats, rotation_6d="raw")
    assert torch.equal(normalize_actions(actions, raw)[:, rotation], actions[:, rotation])
    assert torch.equal(denormalize_actions(actions, raw)[:, rotation], actions[:, rotation])


def test_mean_std_mode_standardises_and_quantile_mode_maps_percentiles_to_unit_range():
    kind = "single_arm"
    actions = torch.tensor(sample_actions(kind, seed=2))
    stats = EmbodimentActionStats.from_actions(kind, actions.numpy())
    standardized = normalize_actions(actions, stats)
    torch.testing.assert_close(standardized.mean(0), torch.zeros(19, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(
        standardized.std(0, unbiased=False), torch.ones(19, dtype=torch.float64), atol=1e-9, rtol=0
    )
    percentiles = torch.tensor([stats.q01, stats.q99], dtype=torch.float64)
    mapped = normalize_actions(percentiles, stats, mode="quantile")
    torch.testing.assert_close(mapped, torch.tensor([[-1.0], [1.0]], dtype=torch.float64).expand(2, 19))


def test_constant_dims_use_the_std_floor_instead_of_dividing_by_zero():
    actions = np.tile(np.linspace(0, 1, 9), (10, 1))  # every dim constant over time
    stats = EmbodimentActionStats.from_actions("camera", actions)
    assert max(stats.std) < 1e-12
    probe = torch.tensor(actions[:1] + 1e-3)
    normalized = normalize_actions(probe, stats)
    assert torch.isfinite(normalized).all()
    translation = slice(0, 3)
    torch.testing.assert_close(normalized[0, translation], torch.full((3,), 1e-3 / STD_FLOOR, dtype=torch.float64))
    torch.testing.assert_close(denormalize_actions(normalized, stats), probe, rtol=1e-12, atol=0)


def test_save_and_load_round_trip_next_to_the_dataset(tmp_path):
    stats = ActionStats(
        {
            "vehicle": EmbodimentActionStats.from_actions("vehicle", sample_actions("vehicle", seed=3)),
            "single_arm": EmbodimentActionStats.from_actions(
                "single_arm", sample_actions("single_arm", seed=4), quantiles=False
            ),
        }
    )
    written = stats.save(tmp_path)
    assert written == tmp_path / ACTION_STATS_FILENAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [ACTION_STATS_FILENAME], "no temporary file left behind"
    loaded = ActionStats.load(tmp_path)
    assert loaded == stats, "floats must survive JSON exactly"
    assert loaded["single_arm"].q01 is None
    document = json.loads(written.read_text())
    assert document["embodiments"]["vehicle"]["fields"]["ego.rotation_6d"] == [3, 9]
    assert document["format_version"] == 2 and document["embodiments"]["vehicle"]["rotation_6d"] == "standardised"


def test_format_1_statistics_load_with_raw_rotations(tmp_path):
    """A file written before rotations were standardised keeps un-normalising a model trained on it
    the way it learned: rotation dims raw, everything else as before."""
    stats = EmbodimentActionStats.from_actions("vehicle", sample_actions("vehicle", seed=6))
    document = json.loads(ActionStats({"vehicle": stats}).save(tmp_path / "v2.json").read_text())
    del document["embodiments"]["vehicle"]["rotation_6d"]
    loaded = ActionStats.load(_write(tmp_path / "v1.json", {**document, "format_version": 1}))
    assert loaded["vehicle"] == dataclasses.replace(stats, rotation_6d="raw")


def _write(path, document):
    path.write_text(json.dumps(document))
    return path


def test_malformed_stats_and_misuse_raise_clear_errors(tmp_path):
    stats = EmbodimentActionStats.from_actions("vehicle", sample_actions("vehicle"), quantiles=False)
    good = json.loads(ActionStats({"vehicle": stats}).save(tmp_path / "good.json").read_text())

    with pytest.raises(ValueError, match=r"format_version must be one of \(1, 2\), got 7"):
        ActionStats.load(_write(tmp_path / "v7.json", {**good, "format_version": 7}))
    short = {**good, "embodiments": {"vehicle": {**good["embodiments"]["vehicle"], "mean": [0.0] * 8}}}
    with pytest.raises(
        ValueError, match=r"short\.json: malformed action statistics: .*vehicle\.mean must have 9 values, got 8"
    ):
        ActionStats.load(_write(tmp_path / "short.json", short))
    with pytest.raises(ValueError, match=r"vehicle\.rotation_6d='sideways' is not one of \('standardised', 'raw'\)"):
        ActionStats.load(
            _write(
                tmp_path / "sideways.json",
                {**good, "embodiments": {"vehicle": {**good["embodiments"]["vehicle"], "rotation_6d": "sideways"}}},
            )
        )
    with pytest.raises(ValueError, match=r"unknown embodiment kind 'boat'"):
        ActionStats.load(
            _write(tmp_path / "boat.json", {**good, "embodiments": {"boat": good["embodiments"]["vehicle"]}})
        )
    # Crafted documents: JSON of another shape, quantiles crossed, a negative count.
    entry = good["embodiments"]["vehicle"]
    for name, document, message in (
        ("list", [], r"list\.json: holds a JSON list, not an object of action statistics"),
        ("rows", {**good, "embodiments": [entry]}, r"rows\.json: 'embodiments' must be an object of objects"),
        ("entry", {**good, "embodiments": {"vehicle": [1]}}, r"entry\.json: 'embodiments' must be an object"),
        (
            "crossed",
            {**good, "embodiments": {"vehicle": {**entry, "q01": [1.0] * 9, "q99": [0.0] * 9}}},
            r"crossed\.json: malformed .*vehicle: q01 > q99 in dims \[0, 1,",
        ),
        ("count", {**good, "embodiments": {"vehicle": {**entry, "count": -5}}}, r"vehicle\.count must be >= 0"),
        # Values float() takes or misreads, and magnitudes that un-normalise every action to inf.
        ("count_str", {**good, "embodiments": {"vehicle": {**entry, "count": "5"}}}, r"count must be an int, got '5'"),
        ("count_half", {**good, "embodiments": {"vehicle": {**entry, "count": 2.5}}}, r"count must be an int, got 2.5"),
        ("std_str", {**good, "embodiments": {"vehicle": {**entry, "std": "abc"}}}, r"std must be a list of numbers"),
        ("std_bool", {**good, "embodiments": {"vehicle": {**entry, "std": [True] * 9}}}, r"std must be a list of"),
        ("std_big", {**good, "embodiments": {"vehicle": {**entry, "std": [1e308] * 9}}}, r"std must lie within"),
        ("mean_big", {**good, "embodiments": {"vehicle": {**entry, "mean": [-1e7] * 9}}}, r"mean must lie within"),
    ):
        with pytest.raises(ValueError, match=message):
            ActionStats.load(_write(tmp_path / f"{name}.json", document))
    (tmp_path / "bytes.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match=r"bytes\.json: not UTF-8 text"):
        ActionStats.load(tmp_path / "bytes.json")
    (tmp_path / "digits.json").write_bytes(b'{"format_version": 1' + b"0" * 5000 + b"}")
    with pytest.raises(ValueError, match=r"digits\.json: format_version=<an integer of 5001 digits> is not a number"):
        ActionStats.load(tmp_path / "digits.json")  # Python's int() refused it naming neither file nor field
    (tmp_path / "endless.json").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"endless\.json: not a regular file"):
        ActionStats.load(tmp_path / "endless.json")
    with pytest.raises(ValueError, match=r"no action statistics for kind 'camera'; have \['vehicle'\]"):
        ActionStats({"vehicle": stats})["camera"]
    with pytest.raises(ValueError, match=r"actions for kind 'vehicle' must have shape \(\.\.\., 9\), got \(4, 19\)"):
        normalize_actions(torch.zeros(4, 19), stats)
    with pytest.raises(ValueError, match=r"mode='quantile' needs q01/q99"):
        normalize_actions(torch.zeros(4, 9), stats, mode="quantile")
    with pytest.raises(ValueError, match=r"actions for kind 'camera' must have shape \(N>0, 9\), got \(0, 9\)"):
        EmbodimentActionStats.from_actions("camera", np.zeros((0, 9)))


def test_merged_statistics_take_each_embodiment_from_the_first_dataset_that_has_it():
    arm_a = EmbodimentActionStats.from_actions("single_arm", sample_actions("single_arm", seed=1))
    arm_b = EmbodimentActionStats.from_actions("single_arm", sample_actions("single_arm", seed=2))
    humanoid = EmbodimentActionStats.from_actions("humanoid", sample_actions("humanoid", seed=3))
    merged = merge_action_stats(
        [None, ActionStats({"single_arm": arm_a}), ActionStats({"single_arm": arm_b, "humanoid": humanoid})]
    )
    assert merged["single_arm"] is arm_a and merged["humanoid"] is humanoid
    assert merge_action_stats([None, ActionStats({})]) is None


def test_a_raw_layout_has_any_width_normalises_every_dim_and_survives_json(tmp_path):
    """A dataset's own action columns (raw layout): no pseudo-action layout, so even a name that
    is not a kind and dims where a layout would keep rotations are standardised."""
    actions = sample_actions("single_arm", seed=5)[:, :7]  # dims 3-6 would be rotations in single_arm
    stats = EmbodimentActionStats.from_actions("so100", actions, raw=True)
    assert stats.dim == 7 and stats.rotation_6d_dims == () and stats.fields == {"raw": [0, 7]}
    normalized = normalize_actions(torch.tensor(actions), stats)
    torch.testing.assert_close(normalized.mean(0), torch.zeros(7, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(normalized.std(0, unbiased=False), torch.ones(7, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(denormalize_actions(normalized, stats), torch.tensor(actions), rtol=1e-12, atol=1e-12)

    written = ActionStats({"so100": stats}).save(tmp_path)
    assert json.loads(written.read_text())["embodiments"]["so100"]["layout"] == "raw"
    assert ActionStats.load(tmp_path) == ActionStats({"so100": stats})
    document = json.loads(written.read_text())
    document["embodiments"]["so100"]["layout"] = "joints"
    with pytest.raises(ValueError, match=r"so100\.layout must be 'raw' or absent \(pseudo-actions\), got 'joints'"):
        ActionStats.load(_write(tmp_path / "joints.json", document))
    with pytest.raises(ValueError, match=r"actions for kind 'so100' must have shape \(N>0, D>0\), got \(4,\)"):
        EmbodimentActionStats.from_actions("so100", np.zeros(4), raw=True)
