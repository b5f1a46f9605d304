"""The loader's stream is deterministic and resumable: a run stopped after pack k and resumed from
its (small, JSON-able) state yields exactly the packs an uninterrupted run yields from k + 1 —
with 0 or 2 real DataLoader workers, even across a change of the worker count. A change of the
number of data-parallel ranks or of the data config is refused with a clear error."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
from world_helpers import assert_same_batch, data_config, model_config, tiny_world

from megatron_cosmos3.data.errors import DataStreamChangedError
from megatron_cosmos3.data.loader import PackedLoader
from megatron_cosmos3.data.schedule import DatasetSource, ShardSchedule
from megatron_cosmos3.data.shards import ShardIndex, ShardInfo

PACKS, STOP = 10, 4


def _packs(config, count, state=None):
    with PackedLoader(config, model_config()) as loader:
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint stores
        return [next(loader) for _ in range(count)], loader.state_dict()


@pytest.fixture(scope="module")
def reference():
    """PACKS packs of an uninterrupted run, no workers."""
    packs, _ = _packs(data_config([str(tiny_world()["latent"])]), PACKS)
    return packs


@pytest.mark.parametrize("workers_before, workers_after", [(0, 0), (2, 2), (2, 0)])
def test_resume_continues_with_exactly_the_next_pack(reference, workers_before, workers_after):
    shards = [str(tiny_world()["latent"])]
    first, state = _packs(data_config(shards, num_workers=workers_before), STOP)
    rest, _ = _packs(data_config(shards, num_workers=workers_after), PACKS - STOP, state)
    for got, want in zip(first + rest, reference):
        assert_same_batch(got, want)
    assert len(json.dumps(state)) < 8_000, "the loader state goes into every checkpoint: keep it small"
    assert state["shuffle"] or state["packer"], "resumed mid-stream, with samples waiting in the buffers"


@pytest.mark.parametrize("video_format", ["npy", "mp4"])
def test_raw_media_stream_resumes_too(video_format):
    """Raw shards encoded on the fly (pooled encoder, 2 workers) resume as exactly as latents; mp4
    shards too, cut into random half-second clips at 12 fps (the clip drawn from the slot address)."""
    import functools

    from world_helpers import AUDIO_LATENT_DIM, VIDEO_LATENT_CHANNELS

    from megatron_cosmos3.data.clips import MediaConfig
    from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder

    encoder = functools.partial(PooledLatentEncoder, VIDEO_LATENT_CHANNELS, AUDIO_LATENT_DIM)
    if video_format == "mp4":
        shards = [str(tiny_world(12, 6, "mp4")["raw"])]
        config = data_config(shards, num_workers=2, media=MediaConfig(fps=12, clip_seconds=0.5))
    else:
        config = data_config([str(tiny_world()["raw"])], num_workers=2)

    def run(count, state=None):
        with PackedLoader(config, model_config(), latent_encoder_factory=encoder) as loader:
            if state is not None:
                loader.load_state_dict(state)
            return [next(loader) for _ in range(count)], loader.state_dict()

    whole, _ = run(6)
    first, state = run(2)
    rest, _ = run(4, state)
    for got, want in zip(first + rest, whole):
        assert_same_batch(got, want)


def test_resume_under_another_number_of_dp_ranks_is_refused():
    shards = [str(tiny_world()["latent"])]
    _, state = _packs(data_config(shards), 1)
    with PackedLoader(data_config(shards), model_config(), dp_rank=0, dp_world_size=2) as loader:
        with pytest.raises(DataStreamChangedError, match="saved with 1 data-parallel ranks; this run has 2") as error:
            loader.load_state_dict(state)
    assert error.value.changes == ("data-parallel ranks: 1 -> 2",)


def test_resume_under_another_data_config_is_refused_naming_each_changed_setting(tmp_path):
    """The error said only 'a different data config': which of a hundred settings, found by diffing
    configs by hand. Each changed one is named with its old and new value; a state saved before
    the settings were kept in it still gets the general message."""
    latent = tiny_world()["latent"]
    _, state = _packs(data_config([str(latent)]), 1)
    moved = tmp_path / "moved"
    moved.symlink_to(latent)
    changed = data_config([str(moved)], tokens_per_pack=2048)
    with PackedLoader(changed, model_config()) as loader:
        with pytest.raises(DataStreamChangedError) as error:
            loader.load_state_dict(state)
        assert len(error.value.changes) == 2, error.value.changes
        assert re.search(r"data.packing.tokens_per_pack: \d+ -> 2048", str(error.value))
        assert f'.shards: ["{latent}"] -> ["{moved}"]' in str(error.value)
        with pytest.raises(DataStreamChangedError, match=r"other data settings \(datasets, stage mixture"):
            loader.load_state_dict({key: value for key, value in state.items() if key != "settings"})


def _read(schedule: ShardSchedule, slots: int) -> list[str]:
    """URLs of the first ``slots`` shards an endless schedule reads."""
    addresses = itertools.islice(schedule.walk(0, [0] * len(schedule.sources)), slots)
    return [schedule.shard(address).url for address in addresses]


def test_each_epoch_deals_every_shard_to_exactly_one_rank():
    shards = tuple(ShardInfo(f"s{i}", 10) for i in range(10))
    per_rank = [_read(ShardSchedule([DatasetSource("d", shards, 1.0)], 0, rank, 3), 6) for rank in range(3)]
    for epoch in range(2):  # 10 // 3 = 3 shards per rank and epoch; one left over
        read = [url for urls in per_rank for url in urls[epoch * 3 : (epoch + 1) * 3]]
        assert len(set(read)) == 9
    assert per_rank[0][:3] != per_rank[0][3:], "each epoch is a new permutation"


def test_finite_stream_across_two_ranks_reads_every_sample_once():
    latent = tiny_world()["latent"]
    refs, total = set(), 0
    for rank in range(2):
        config = data_config([str(latent)], epochs=1)
        with PackedLoader(config, model_config(), dp_rank=rank, dp_world_size=2) as loader:
            for _ in loader:
                assert not set(loader.last_pack) & refs
                refs |= {(rank, *ref) for ref in loader.last_pack}
            total += loader.stats.used
    assert len(refs) == total == ShardIndex.load(latent).total_samples


def test_blend_weights_are_shares_of_samples():
    big = DatasetSource("big", tuple(ShardInfo(f"b{i}", 40) for i in range(4)), 1.0)
    small = DatasetSource("small", tuple(ShardInfo(f"s{i}", 10) for i in range(4)), 3.0)
    walk = ShardSchedule([big, small], 0, 0, 1).walk(0, [0, 0])
    chosen = np.array([address.dataset for address in itertools.islice(walk, 20_000)])
    samples = np.where(chosen == 0, 40, 10)
    assert samples[chosen == 1].sum() / samples.sum() == pytest.approx(0.75, abs=0.02)


def test_resampled_datasets_draw_shards_independently_per_rank():
    shards = tuple(ShardInfo(f"s{i}", 10) for i in range(3))
    source = DatasetSource("d", shards, 1.0, resample=True)
    per_rank = [_read(ShardSchedule([source], 0, rank, 8), 30) for rank in range(2)]
    assert per_rank[0] != per_rank[1] and set(per_rank[0]) == {"s0", "s1", "s2"}


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"[" * 100_000, r"loader state is not JSON \(RecursionError"),
        (b"\xff{}", r"loader state is not JSON \(UnicodeDecodeError"),
        (b"[1, 2]", r"loader state is a JSON list, not an object"),
        (b'{"format_version": 1}', r"loader state is damaged: KeyError: 'dp_world_size'"),
        # Python's own 'Exceeds the limit' named no field
        (b'{"stats": {"used": 1' + b"0" * 5000 + b"}}", r"loader state: stats.used=<an integer of 5001 digits> is not"),
    ],
)
def test_a_crafted_loader_state_in_a_checkpoint_is_a_value_error(blob, message):
    """The checkpoint's JSON position was parsed and indexed bare: RecursionError, AttributeError
    ('list' object has no attribute 'get') or KeyError came out of a resume."""
    with PackedLoader(data_config([str(tiny_world()["latent"])]), model_config()) as loader:
        with pytest.raises(ValueError, match=message):
            loader.load_state_json(blob)
        loader.load_state_json(json.dumps(loader.state_dict()).encode())  # control: a real state loads


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokens": float("nan")}, r"loader state: tokens=NaN is not a finite number"),
        ({"packs": "many"}, r"loader state packs='many' must be an int >= 0"),
        ({"cropped": -1}, r"loader state cropped=-1 must be an int >= 0"),
        ({"exhausted": "no"}, r"loader state exhausted='no' must be true or false"),
    ],
)
def test_a_loader_state_of_nan_or_wrong_counts_is_refused_on_resume(change, message):
    """A NaN token count was taken as it was (the resumed run's packing efficiency was NaN from then
    on), and counts of another kind failed or miscounted later, in the run."""
    with PackedLoader(data_config([str(tiny_world()["latent"])]), model_config()) as loader:
        next(loader)
        state = loader.state_dict()
        with pytest.raises(ValueError, match=message):
            loader.load_state_json(json.dumps({**state, **change}).encode())
        loader.load_state_json(json.dumps(state).encode())  # control: the state unchanged loads
