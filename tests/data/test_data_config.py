"""The data config: the shipped YAML loads into typed dataclasses for every stage; inconsistent
values are clear errors naming the field, before any worker starts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from megatron_cosmos3.data.config import DataConfig, DatasetConfig, MixtureConfig

YAML = Path(__file__).resolve().parents[2] / "configs" / "data" / "generated_world.yaml"


def _load(*overrides: str) -> DataConfig:
    merged = OmegaConf.merge(
        OmegaConf.structured(DataConfig), OmegaConf.load(YAML).data, OmegaConf.from_dotlist(list(overrides))
    )
    return OmegaConf.to_object(merged)


@pytest.mark.parametrize("stage", ["pretrain", "midtrain", "posttrain"])
def test_shipped_stages_validate(stage):
    config = _load(f"stage={stage}")
    config.validate()
    assert isinstance(config.active_stage, MixtureConfig) and isinstance(config.datasets[0], DatasetConfig)


def test_the_fingerprint_ignores_workers_but_not_the_mixture():
    base = _load().fingerprint()
    assert _load("num_workers=7").fingerprint() == base
    assert _load("stages.pretrain.tasks.understanding=3.0").fingerprint() != base
    assert _load("stages.midtrain.tasks.policy=3.0").fingerprint() == base, "inactive stages do not matter"


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage=warmup", "stage='warmup' is not one of stages"),
        ("stages.pretrain.datasets.nowhere=1.0", "names unknown datasets"),
        ("stages.pretrain.tasks.dancing=1.0", "unknown task 'dancing'"),
        # A stage that is not active is checked too, named with its value.
        ("stages.midtrain.datasets.nowhere=1.0", r"stages.midtrain.datasets names unknown datasets \['nowhere'\]"),
        ("stages.posttrain.tasks.dancing=1.0", "stages.posttrain.tasks: unknown task 'dancing'"),
        ("stages.midtrain.datasets.world_raw=-1.0", "stages.midtrain.datasets needs non-negative weights"),
        ("packing.max_sample_tokens=99999", "packing.max_sample_tokens=99999 must be in"),
        ("epochs=1", None),
        ("error_budget.max_error_fraction=1.5", "error_budget.max_error_fraction=1.5"),
    ],
)
def test_inconsistent_configs_are_refused(override, message):
    config = _load(override)
    if message is None:  # one active dataset: a finite stream is fine
        config.validate()
        config.stages["pretrain"].datasets["world_raw"] = 1.0
        message = "epochs > 0"
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_media_clips_load_from_overrides_validate_and_change_the_fingerprint():
    config = _load("media.fps=12", "media.clip_seconds=2.0", "media.resolution_buckets=[64x64,64x112]")
    config.validate()
    assert config.media.buckets() == [(64, 64), (64, 112)]
    assert config.fingerprint() != _load().fingerprint()
    for override, message in [
        ("media.clip_start=middle", "data.media.clip_start='middle'; expected one of"),
        ("media.fps=-1", "data.media.fps=-1.0 must be 0"),
        ("media.resolution_buckets=[64]", "data.media.resolution_buckets entry '64' must be 'HxW'"),
        ("media.resolution_buckets=[64x\u00b2]", "data.media.resolution_buckets entry '64x\u00b2' must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            _load(override).validate()


def test_weights_whose_sum_overflows_are_refused():
    """1e308 twice sums to inf: every share would be 0 (datasets) or every draw the last task."""
    config = _load("stages.pretrain.datasets.world_raw=1e308", "stages.pretrain.datasets.world_latent=1e308")
    with pytest.raises(ValueError, match="stages.pretrain.datasets weights must have a finite sum"):
        config.validate()
    config = _load("stages.pretrain.tasks.understanding=1e308", "stages.pretrain.tasks.text_to_video=1e308")
    with pytest.raises(ValueError, match="stages.pretrain.tasks: task weights must have a finite sum"):
        config.validate()


def test_a_shard_set_listed_twice_or_an_index_of_no_samples_is_named(tmp_path):
    from megatron_cosmos3.data.schedule import DatasetSource, ShardSchedule
    from megatron_cosmos3.data.shards import ShardIndex, ShardInfo

    ShardIndex((ShardInfo(str(tmp_path / "a.tar"), 0),)).save(tmp_path)
    (tmp_path / "a.tar").write_bytes(bytes(1024))
    config = _load()
    config.datasets[0].shards = [str(tmp_path), str(tmp_path / "index.json")]
    with pytest.raises(ValueError, match=r"data.datasets\[world_latent\].shards: .* more than once"):
        config.check_paths()
    with pytest.raises(ValueError, match="dataset 'w': its index lists 0 samples in every shard"):
        ShardSchedule([DatasetSource("w", ShardIndex.load(tmp_path).shards, 1.0)], 0, 0, 1)


@pytest.mark.timeout(30)  # a FIFO read as statistics would wait for a writer without end
@pytest.mark.parametrize(
    "kind, what",
    [("fifo", "not a regular file (a FIFO)"), ("folder", "not a regular file (a folder)"), ("missing", "missing")],
)
def test_an_action_stats_path_that_is_no_regular_file_is_named_by_its_field_and_kind(tmp_path, kind, what):
    """``data.datasets[<name>].action_stats``: was 'is not a file' whatever the path was; now says what it is."""
    from megatron_cosmos3.data.schema import Sample
    from megatron_cosmos3.data.shard_writer import ShardWriter

    with ShardWriter(tmp_path / "set", "text") as writer:  # a real (one-sample) shard set
        writer.write(Sample(key="s0", caption="words"))
    stats = tmp_path / "stats.json"
    if kind == "fifo":
        os.mkfifo(stats)
    elif kind == "folder":
        stats.mkdir()
    config = DataConfig(datasets=[DatasetConfig(name="w", shards=[str(tmp_path / "set")], action_stats=str(stats))])
    with pytest.raises(ValueError, match="^" + re.escape(f"data.datasets[w].action_stats={str(stats)!r}: {what}")):
        config.check_paths()
