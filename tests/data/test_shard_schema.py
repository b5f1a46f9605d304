"""Sample schema and shards: samples survive writing and reading bit for bit; the index counts
them; shards are reproducible; any URL WebDataset opens (file:, pipe:) reads the same samples."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
from world_helpers import tiny_world

from megatron_cosmos3.data.clips import MediaConfig
from megatron_cosmos3.data.errors import LoaderSetupError, SampleError
from megatron_cosmos3.data.media import encode_json
from megatron_cosmos3.data.schema import Sample, SchemaContext, decode_sample, encode_sample
from megatron_cosmos3.data.shard_writer import ShardWriter
from megatron_cosmos3.data.shards import ShardIndex, read_shard, resolve_shards
from megatron_cosmos3.tasks.registry import Modality


def _sample(key: str = "s0", seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    return Sample(
        key=key,
        caption="a red ball",
        instruction="push it",
        question="how many?",
        answer="two",
        video=rng.integers(0, 256, (5, 32, 64, 3), dtype=np.uint8),
        fps=24.0,
        audio=rng.uniform(-1, 1, (2, 4800)).astype(np.float32),
        audio_sample_rate=48_000,
        actions=rng.normal(size=(3, 19)).astype(np.float32),
        embodiment="single_arm",
        action_rate_hz=10.0,
        image=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        duration_s=0.2,
        timing={"events": [{"time_s": 0.1, "kind": "floor"}]},
        source={"origin": "test"},
    )


def test_every_field_survives_encode_and_decode():
    sample = _sample()
    decoded = decode_sample(encode_sample(sample))
    for name in (
        "caption",
        "instruction",
        "question",
        "answer",
        "fps",
        "audio_sample_rate",
        "embodiment",
        "action_rate_hz",
        "duration_s",
        "timing",
        "source",
    ):
        assert getattr(decoded, name) == getattr(sample, name), name
    for name in ("video", "actions", "image"):
        np.testing.assert_array_equal(getattr(decoded, name), getattr(sample, name))
    # 16-bit PCM: within one quantisation step.
    np.testing.assert_allclose(decoded.audio, sample.audio, atol=1 / 32768)
    assert decoded.modalities == frozenset(Modality)


def test_blank_texts_are_no_text():
    """A caption, instruction or segment of only whitespace, control or zero-width characters says
    nothing: it is read as absent (the prompt falls back to the instruction; a sample with nothing
    else has no text at all)."""

    def meta(**keys) -> dict:
        return {"__key__": "k", "meta.json": encode_json({"schema": 1, **keys})}

    sample = decode_sample(meta(caption=" \t\n\u200b\u3000", instruction="push the cube"))
    assert sample.caption is None and sample.instruction == "push the cube"
    assert decode_sample(meta(caption=" the cube ")).caption == " the cube "  # control: words are kept
    with pytest.raises(SampleError, match="missing_field: the sample has neither text nor media"):
        decode_sample(meta(caption="\x00\x1f \ufeff"))
    segments = [{"start_s": 0.0, "end_s": 1.0, "text": "  "}, {"start_s": 1.0, "end_s": 2.0, "text": "it stops"}]
    raw = {k: v for k, v in encode_sample(_sample()).items() if k not in ("actions.npy", "audio.wav")}
    raw["meta.json"] = encode_json({"schema": 1, "caption": "a cube", "caption_segments": segments, "fps": 2.0})
    first = decode_sample(raw, media_config=MediaConfig(clip_seconds=1.0, clip_start="first"))
    assert first.caption_segments == [] and first.caption == "a cube"  # the blank segment says nothing
    assert decode_sample(raw).caption == "it stops"


# Video tokens of 16 (4 channels x 2x2 cells) and audio latents of 6, with no width recorded.
LATENT_SAMPLE = Sample(
    key="lat",
    caption="x",
    video_latents=np.zeros((8, 16), np.float16),
    video_latent_grid=(2, 2, 2),
    fps=30.0,
    audio_latents=np.zeros((3, 6), np.float32),
    audio_num_samples=4000,
)


def test_latent_fields_are_checked_against_the_model_widths():
    sample = LATENT_SAMPLE
    decoded = decode_sample(encode_sample(sample), SchemaContext(video_token_dim=16, audio_latent_dim=6))
    assert decoded.video_latents.dtype == np.float32 and decoded.latent_frames == 2
    with pytest.raises(SampleError, match="wrong_shape"):
        decode_sample(encode_sample(sample), SchemaContext(video_token_dim=32))


def test_latents_record_their_token_patch_and_a_model_of_another_refuses_them_naming_both():
    """Width alone cannot tell patches apart (4 channels x 2x2 = 16 channels x 1x1): the patch is recorded."""
    sample = Sample(
        key="lat", caption="x", video_latents=np.zeros((8, 16), np.float32), video_latent_grid=(2, 2, 2), fps=30.0
    )
    for patch in (1, 4):
        written = encode_sample(replace(sample, video_patch_size=patch))
        decoded = decode_sample(written, SchemaContext(video_token_dim=16, video_patch_size=patch))
        assert decoded.video_patch_size == patch
        with pytest.raises(LoaderSetupError, match=rf"'lat'.*video_patch_size={patch} .*model.video_patch_size=2"):
            decode_sample(written, SchemaContext(video_token_dim=16))
    # Shards written before the patch was recorded hold 2x2 patches.
    assert decode_sample(encode_sample(sample), SchemaContext(video_token_dim=16)).video_patch_size == 2
    with pytest.raises(LoaderSetupError, match=r"video_patch_size=2 .*model.video_patch_size=1"):
        decode_sample(encode_sample(sample), SchemaContext(video_token_dim=16, video_patch_size=1))


@pytest.mark.parametrize(
    ("recorded", "context", "message"),
    [
        (
            {"video_latent_channels": 4},
            {"video_token_dim": 32},
            r"video_latent_channels=4, .*model.video_latent_channels=8",
        ),
        ({"audio_latent_dim": 6}, {"audio_latent_dim": 5}, r"audio_latent_dim=6, .*model.audio_latent_dim=5"),
    ],
)
def test_latents_record_their_widths_and_a_model_of_others_refuses_them_naming_both(recorded, context, message):
    """A recorded width that is not the model's stops the run (not a wrong_shape per sample); shards
    without the record keep the per-sample shape check; the model's own widths load."""
    sample = LATENT_SAMPLE
    written = encode_sample(replace(sample, **recorded))
    with pytest.raises(LoaderSetupError, match=rf"'lat'.*{message}"):
        decode_sample(written, SchemaContext(**context))
    with pytest.raises(SampleError, match="wrong_shape"):  # older shards: no record
        decode_sample(encode_sample(sample), SchemaContext(**context))
    decoded = decode_sample(written, SchemaContext(video_token_dim=16, audio_latent_dim=6))
    assert (decoded.video_latent_channels, decoded.audio_latent_dim) == (
        recorded.get("video_latent_channels"),
        recorded.get("audio_latent_dim"),
    )
    # A width recorded for latents the sample does not hold is a malformed sample.
    text_only = encode_sample(replace(Sample(key="t", caption="x"), **recorded))
    with pytest.raises(SampleError, match=f"missing_field.*names an? {next(iter(recorded))}"):
        decode_sample(text_only)


@pytest.mark.parametrize("patch", [1, 4])
def test_the_smallest_picture_is_one_video_token_of_the_models_patch(patch):
    side = 16 * patch
    small = Sample(key="s", caption="x", image=np.zeros((side - 8, 64, 3), np.uint8))
    with pytest.raises(SampleError, match=rf"image.png is 64x{side - 8}; both sides must be >= {side} px"):
        decode_sample(encode_sample(small), SchemaContext(video_patch_size=patch))
    fits = Sample(key="s", caption="x", video=np.zeros((1, side, 64, 3), np.uint8), fps=10.0)
    assert decode_sample(encode_sample(fits), SchemaContext(video_patch_size=patch)).video.shape == (1, side, 64, 3)


def test_shard_writer_counts_samples_per_shard_and_is_reproducible(tmp_path):
    samples = [_sample(f"s{i}", seed=i) for i in range(5)]
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, "part", max_samples_per_shard=2) as writer:
            for sample in samples:
                writer.write(sample)
    index = ShardIndex.load(tmp_path / "a")
    assert [s.samples for s in index.shards] == [2, 2, 1] and index.total_samples == 5
    assert index.shards[0].modalities["video"] == 2
    for a, b in zip(sorted((tmp_path / "a").glob("*.tar")), sorted((tmp_path / "b").glob("*.tar"))):
        assert a.read_bytes() == b.read_bytes()
    keys = [raw["__key__"] for shard in index.shards for raw in read_shard(shard.url)]
    assert keys == [s.key for s in samples]


def test_shard_writer_refuses_samples_that_break_the_schema(tmp_path):
    with ShardWriter(tmp_path) as writer, pytest.raises(ValueError, match="non_finite"):
        bad = _sample()
        bad.actions[1, 2] = np.nan
        writer.write(bad)


def test_file_and_pipe_urls_read_the_same_samples_as_paths():
    shard = ShardIndex.load(tiny_world()["latent"]).shards[0].url
    by_path = [raw["__key__"] for raw in read_shard(shard)]
    for url in (f"file://{shard}", f"pipe:cat {shard}"):
        assert [raw["__key__"] for raw in read_shard(url)] == by_path
    assert [s.url for s in resolve_shards([shard.replace("000000", "{000000..000001}")])] == [
        shard,
        shard.replace("000000", "000001"),
    ]


def test_keys_with_folders_are_written_and_read_back_and_unsafe_keys_are_refused(tmp_path):
    """WebDataset keys may hold folders (``clips/a``, ``v1.2/b``): whatever the reader accepts, the
    writer writes back (pre-encoding rewrites the keys it read); absolute or climbing keys are refused."""
    keys = ["clips/a", "v1.2/b", "c"]
    with ShardWriter(tmp_path / "out", "part") as writer:
        for key in keys:
            writer.write(Sample(key=key, caption="words"))
    assert [raw["__key__"] for raw in read_shard(writer.index.shards[0].url)] == keys
    for bad in ("", "a.b", "clips/", "/abs/a", "../a", "x/../../a"):
        with pytest.raises(ValueError, match="sample key"):
            encode_sample(Sample(key=bad, caption="words"))


@pytest.mark.parametrize(
    ("data_hz", "model_hz", "refused"),
    [(10.0, 15.0, True), (30.0, 29.97, True), (29.97, 30000 / 1001, False), (20, 20.0, False), (7.5, 7.5, False)],
)
def test_actions_at_another_rate_than_the_models_embodiment_are_refused_naming_both(data_hz, model_hz, refused):
    """A rate within ACTION_RATE_TOLERANCE is the model's (29.97 and 30000/1001 Hz); 30 and 29.97 Hz are not."""
    sample = Sample(
        key="arm", instruction="go", actions=np.zeros((4, 19), np.float32), embodiment="single_arm",
        action_rate_hz=data_hz,
    )  # fmt: skip
    context = SchemaContext({"single_arm": 19}, action_rates={"single_arm": model_hz})
    if refused:
        message = rf"'arm': its 'single_arm' actions are sampled at {data_hz:g} Hz .*single_arm.rate_hz={model_hz:g}:"
        with pytest.raises(LoaderSetupError, match=message):
            decode_sample(encode_sample(sample), context)
    else:
        assert decode_sample(encode_sample(sample), context).action_rate_hz == data_hz
    assert decode_sample(encode_sample(sample), SchemaContext({"single_arm": 19})).action_rate_hz == data_hz


def test_a_frame_rate_in_meta_json_may_be_a_fraction_as_ffprobe_writes_it():
    sample = Sample(key="ntsc", caption="x", video_latents=np.zeros((2, 16), np.float32), video_latent_grid=(2, 1, 1))
    for fps, read in (("30000/1001", 30000 / 1001), ("24000/1001", 24000 / 1001), (" 59.94 ", 59.94), (25, 25.0)):
        written = encode_sample(replace(sample, fps=30.0))
        meta = json.loads(written["meta.json"])
        written["meta.json"] = json.dumps({**meta, "fps": fps}).encode()
        assert decode_sample(written, SchemaContext(video_token_dim=16)).fps == read
    for fps in ("fast", "30000/0", "-30", True, "nan"):
        written["meta.json"] = json.dumps({**meta, "fps": fps}).encode()
        with pytest.raises(SampleError, match=r"bad_metadata: meta.json 'fps' must be a positive number or fraction"):
            decode_sample(written, SchemaContext(video_token_dim=16))


@pytest.fixture(scope="module")
def small_shard_set(tmp_path_factory):
    """Two shards of two text samples each, with their index (shared by the crafted-index table)."""
    root = tmp_path_factory.mktemp("index")
    with ShardWriter(root / "set", "part", max_samples_per_shard=2) as writer:
        for i in range(4):
            writer.write(Sample(key=f"s{i}", caption="words"))
    return root / "set"


def _first(index: dict) -> dict:
    return index["shards"][0]


@pytest.mark.parametrize(
    "craft, message",
    [
        (lambda d: [d], "an index must be a JSON object, got list"),
        (lambda d: {**d, "shards": {"url": "x"}}, "shards must be a list, got dict"),
        (lambda d: {**d, "shards": ["part-000000.tar"]}, r"shards\[0\] must be an object, got str"),
        (lambda d: {**d, "shards": [{"samples": 2}]}, r"shards\[0\].url must be a non-empty string, got None"),
        (lambda d: {**d, "shards": [{"url": "pipe:touch RAN; cat part-000000.tar"}]}, "may not run a command"),
        (lambda d: _first(d).update(samples="2") or d, r"shards\[0\].samples='2' must be an int >= 0 or null"),
        (lambda d: _first(d).update(samples=-1) or d, r"shards\[0\].samples=-1 must be an int"),
        (lambda d: _first(d).update(samples=True) or d, r"shards\[0\].samples=True must be an int"),
        (lambda d: _first(d).update(samples=2.5) or d, r"shards\[0\].samples=2.5 must be an int"),
        (lambda d: _first(d).update(samples=10**9) or d, r"shards\[0\].samples=1000000000: a tar of \d+ bytes holds"),
        (lambda d: _first(d).update(bytes="big") or d, r"shards\[0\].bytes='big' must be an int"),
        (lambda d: _first(d).update(samples=10**9 + 1) or d, r"samples=1,000,000,001 is above INDEX_LIMITS"),
        (lambda d: _first(d).update(bytes=10**400) or d, r"shards\[0\].bytes=10+,?.* is above INDEX_LIMITS\['bytes'\]"),
        (lambda d: _first(d).update(modalities={f"m{i}": 1 for i in range(65)}) or d, "modalities names 65, more"),
        (lambda d: _first(d).update(modalities={"video": 10**12}) or d, r"modalities.video=1000000000000 must be"),
        (lambda d: _first(d).update(modalities=[1]) or d, r"shards\[0\].modalities must be an object"),
        (lambda d: {**d, "shards": [_first(d), _first(d)]}, r"shards\[1\].url='part-000000.tar' lists the shard of"),
        (lambda d: {**d, "shards": [_first(d), {"url": "./x/../part-000000.tar"}]}, r"lists the shard of shards\[0\]"),
    ],
)
def test_a_crafted_index_is_an_error_naming_the_file_entry_and_value(small_shard_set, tmp_path, craft, message):
    """An index is data: a wrong type, a command to run, a shard listed twice or a count its tar
    cannot hold is a ValueError naming the file and the entry, before anything is read or run."""
    import json
    import shutil

    folder = tmp_path / "set"
    shutil.copytree(small_shard_set, folder)
    document = craft(json.loads((folder / "index.json").read_text()))
    (folder / "index.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match=message) as raised:
        ShardIndex.load(folder)
    assert str(folder / "index.json") in str(raised.value) or "JSON object" not in message
    assert not (folder / "RAN").exists() and not (tmp_path / "RAN").exists()


def test_an_index_longer_than_its_limits_is_refused_before_it_is_parsed(small_shard_set, tmp_path, monkeypatch):
    """The index file's size and entry count are bounded (``INDEX_LIMITS``, lowered here to the
    set's own sizes): one byte or one entry more is refused naming the limit and the value."""
    import json
    import shutil

    from megatron_cosmos3.data import shards

    folder = tmp_path / "set"
    shutil.copytree(small_shard_set, folder)
    size = (folder / "index.json").stat().st_size
    monkeypatch.setitem(shards.INDEX_LIMITS, "index_bytes", size)
    monkeypatch.setitem(shards.INDEX_LIMITS, "shards", 2)
    assert len(ShardIndex.load(folder).shards) == 2  # control: at the limits, it loads
    document = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**document, "shards": document["shards"] + [{"url": "x.tar"}]}))
    with pytest.raises(ValueError, match=r"shards lists 3, more than INDEX_LIMITS\['shards'\]=2"):
        ShardIndex.load(folder)
    (folder / "index.json").write_text(json.dumps(document, indent=1) + " " * size)
    with pytest.raises(ValueError, match=rf"more than INDEX_LIMITS\['index_bytes'\]={size:,} bytes"):
        ShardIndex.load(folder)


def test_index_files_that_are_not_json_and_shards_that_are_not_files(small_shard_set, tmp_path):
    import shutil

    folder = tmp_path / "set"
    shutil.copytree(small_shard_set, folder)
    for content, message in [
        (b"\xff{", "not a JSON index: UnicodeDecodeError"),
        (b'{"a": NaN}', "a=NaN is not a finite number"),
        (b'{"format_version": 1, "shards": [], "shards": [{"url": "x.tar"}]}', r"key\(s\) \['shards'\] given twice"),
    ]:
        (folder / "index.json").write_bytes(content)
        with pytest.raises(ValueError, match=message):
            ShardIndex.load(folder)
    (folder / "index.json").unlink()
    (folder / "index.json").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"index.json: not a regular file \(a character device\)"):
        ShardIndex.load(folder)
    (folder / "index.json").unlink()
    os.mkfifo(folder / "index.json")  # read, it waited for a writer without end
    with pytest.raises(ValueError, match=r"index.json: not a regular file \(a FIFO"):
        ShardIndex.load(folder)
    # A device, a FIFO or a folder named as a shard is one unreadable shard, never read for ever (/dev/zero).
    os.mkfifo(tmp_path / "pipe.tar")
    for url, kind in (
        ("/dev/zero", "a character device"),
        (str(tmp_path), "a folder"),
        (f"file://{tmp_path}", "a folder"),
        (str(tmp_path / "pipe.tar"), "a FIFO"),
    ):
        assert [(s.reason, s.detail) for s in read_shard(url)] == [("unreadable_shard", f"not a regular file ({kind})")]
    # The same shard reached twice through a dataset's entries would be read twice an epoch.
    shard = str(small_shard_set / "part-000000.tar")
    with pytest.raises(ValueError, match="more than once"):
        resolve_shards([shard, str(small_shard_set)])


def test_an_npy_header_declaring_more_bytes_than_follow_is_corrupt_media_before_any_allocation():
    """numpy allocates the array its header declares before reading: a 200-byte member declaring a
    GiB took a GiB (then failed on the short read); now nothing beyond the bytes given is allocated."""
    import io
    import tracemalloc

    from megatron_cosmos3.data.media import decode_npy

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (2**30,)})
    tracemalloc.start()
    try:
        with pytest.raises(
            SampleError, match=r"x\.npy: its header declares uint8 \(1073741824,\) \(1073741824 bytes\)"
        ):
            decode_npy(header.getvalue() + bytes(100), "x.npy")
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()
    whole = io.BytesIO()  # control: a header declaring the bytes that follow reads as before
    np.lib.format.write_array_header_1_0(whole, {"descr": "|u1", "fortran_order": False, "shape": (100,)})
    assert decode_npy(whole.getvalue() + bytes(100), "x.npy").shape == (100,)


def test_a_shards_pattern_naming_more_than_a_million_urls_is_refused_before_it_is_expanded(tmp_path):
    """braceexpand builds every name of a range first: 'a-{00000000..99999999}.tar' took ten minutes
    and gigabytes before any check (here: killed at the time limit), '{0..99999999999999}' was
    killed for memory. Counted from the braces, it is refused at once, naming the entry."""
    import subprocess
    import sys

    from megatron_cosmos3.data.config import DataConfig, DatasetConfig
    from megatron_cosmos3.data.url_patterns import MAX_URLS_PER_ENTRY, expand_entry, url_count

    code = (
        "from megatron_cosmos3.data.shards import resolve_shards\n"
        "try:\n    resolve_shards(['/data/a-{00000000..99999999}.tar'])\n"
        "except ValueError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "expands to 100000000 URLs, more than 1000000" in done.stdout, done.stderr
    pattern = "s3://b/{000000..000099}-{a,b{1..3},c}.tar"
    assert (
        url_count(pattern) == 500 == len(expand_entry(pattern)) and len(expand_entry(f"{pattern}::x-{{0..9}}")) == 510
    )
    assert url_count("a-{0..999}-{0..999}.tar") == MAX_URLS_PER_ENTRY  # the bound itself is allowed
    config = DataConfig(datasets=[DatasetConfig(name="w", shards=[str(tmp_path / "a-{0..99999999999999}.tar")])])
    with pytest.raises(ValueError, match=r"data.datasets\[w\].shards\[0\]=.*: shards entry .* expands to"):
        config.check_paths()
