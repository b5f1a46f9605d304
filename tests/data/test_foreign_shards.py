"""Shards as other tools write them (GNU tar, Python's tarfile, macOS tar, ``cat``): the reader
groups members into samples as WebDataset does where both read the same files, and what no sample
owns (hidden files, WebDataset's metadata) is passed over (docs/DESIGN.md, "The data path")."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator
from world_helpers import AUDIO_LATENT_DIM, VIDEO_LATENT_CHANNELS, data_config, load_script, model_config, tiny_world

from megatron_cosmos3.data.config import DataConfig, DatasetConfig
from megatron_cosmos3.data.errors import LoaderSetupError, Skip
from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder
from megatron_cosmos3.data.loader import PackedLoader, dataset_action_stats
from megatron_cosmos3.data.schema import decode_sample
from megatron_cosmos3.data.shards import ShardIndex, ShardInfo, read_samples, read_shard, resolve_shards

META = b'{"schema": 1, "caption": "a ball"}'


def _tar(path, members, fmt=tarfile.GNU_FORMAT) -> str:
    """A tar of ``(name, bytes)`` members in the given order, written by Python's tarfile."""
    with tarfile.open(path, "w", format=fmt) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def _read(url: str) -> list:
    """What ``read_shard`` gives: (key, sorted fields) per sample, (reason,) per skip."""
    return [
        (item.reason,) if isinstance(item, Skip) else (item["__key__"], sorted(k for k in item if k[:2] != "__"))
        for item in read_shard(url)
    ]


def _webdataset(url: str) -> list:
    with open(url, "rb") as stream:
        files = [{**f, "__url__": url} for f in tar_file_iterator(stream)]
        return [(s["__key__"], sorted(k for k in s if k[:2] != "__")) for s in group_by_keys(files)]


def test_keys_group_as_webdataset_groups_them(tmp_path):
    members = [
        ("clip.v2.final.meta.json", META),  # the key ends at the first dot of the basename
        ("clip.v2.final.video.MP4", b"1"),  # extensions are lowercased
        ("run.3/ep/0.meta.json", META),  # a dot in a folder is not the field's
        ("run.3/ep/0.actions.npy", b"2"),
        ("x" * 120 + "/s.meta.json", META),  # a long name: a GNU longname header
        ("NOTES", b"no extension: no sample"),
    ]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        url = _tar(tmp_path / f"keys-{fmt}.tar", members, fmt)
        assert (
            _read(url)
            == _webdataset(url)
            == [
                ("clip", ["v2.final.meta.json", "v2.final.video.mp4"]),
                ("run.3/ep/0", ["actions.npy", "meta.json"]),
                ("x" * 120 + "/s", ["meta.json"]),
            ]
        )


def test_hidden_files_and_webdataset_metadata_belong_to_no_sample(tmp_path):
    # macOS tar writes an AppleDouble ``._name`` before each file; Finder leaves .DS_Store.
    members = [
        ("__info__/stats.json", b"{}"),
        ("d/._a.meta.json", b"apple"),
        ("d/a.meta.json", META),
        ("d/._a.video.mp4", b"apple"),
        ("d/a.video.mp4", b"1"),
        ("d/.DS_Store", b"finder"),
        ("._b.meta.json", b"apple"),
        ("b.meta.json", META),
    ]
    url = _tar(tmp_path / "mac.tar", members)
    assert _read(url) == [("d/a", ["meta.json", "video.mp4"]), ("b", ["meta.json"])]


def test_a_sample_whose_members_lie_apart_is_skipped_whole_by_every_reader(tmp_path):
    # GNU tar lists a folder in directory order unless given --sort=name: a sample's members apart.
    folder = tmp_path / "apart"
    folder.mkdir()
    members = [("a.meta.json", META), ("b.meta.json", META), ("a.txt", b"x"), ("c.meta.json", META), ("a.x", b"y")]
    url = _tar(folder / "apart.tar", members)
    ShardIndex((ShardInfo(url, samples=3),)).save(folder)
    read = list(read_shard(url))  # a's first part is yielded before its repeat is met
    assert [item["__key__"] for item in read if isinstance(item, dict)] == ["a", "b", "c"]
    (split,) = [item for item in read if isinstance(item, Skip)]
    assert (split.reason, split.key) == ("split_sample", "a") and "--sort=name" in split.detail
    assert "lie apart" in split.detail and "['meta.json'], then ['txt']" in split.detail
    # Every reader withdraws a's first part: b and c are used, a is one split_sample, no sample is
    # missing against the index's 3.
    assert load_script("inspect_shards").verify_shard(ShardIndex.load(folder).shards[0]) == (
        2,
        Counter(split_sample=1),
    )
    with PackedLoader(data_config([str(folder)], epochs=1, tokens_per_pack=4096), model_config()) as loader:
        used = sum(pack.num_samples for pack in loader)
    assert used == loader.stats.used == 2 and loader.stats.per_reason == Counter(split_sample=1)
    encoder = PooledLatentEncoder(VIDEO_LATENT_CHANNELS, AUDIO_LATENT_DIM)
    skipped = load_script("encode_shards").encode_shards(folder, tmp_path / "latent", encoder)
    assert skipped == Counter(split_sample=1)
    (shard,) = ShardIndex.load(tmp_path / "latent").shards
    assert [item["__key__"] for item in read_shard(shard.url)] == ["b", "c"]


def test_a_key_given_to_two_samples_is_a_duplicate_key_not_a_split_sample(tmp_path):
    """A later part that gives a field the first part gave is a second sample under the key."""
    members = [("a.meta.json", META), ("a.txt", b"x"), ("b.meta.json", META), ("a.txt", b"y"), ("c.meta.json", META)]
    url = _tar(tmp_path / "twice.tar", members)
    read = read_samples(ShardInfo(url, samples=3), lambda index, raw: raw["__key__"])
    assert [key for _, key in read.results] == ["b", "c"] and read.read == 3
    (skip,) = read.skips
    assert (skip.reason, skip.key) == ("duplicate_key", "a") and "fields ['txt']" in skip.detail


def test_concatenated_tars_are_read_to_the_end_and_bytes_after_the_end_are_counted(tmp_path):
    first = open(_tar(tmp_path / "a.tar", [("a.meta.json", META), ("b.meta.json", META)]), "rb").read()
    second = open(_tar(tmp_path / "b.tar", [("c.meta.json", META)]), "rb").read()
    cat = tmp_path / "cat.tar"  # cat a.tar b.tar: WebDataset and tar without -i stop after b
    cat.write_bytes(first + second)
    assert [key for key, _ in _read(str(cat))] == ["a", "b", "c"]
    cat_gz = tmp_path / "cat.tar.gz"  # cat a.tar.gz b.tar.gz
    cat_gz.write_bytes(gzip.compress(first) + gzip.compress(second))
    assert [key for key, _ in _read(str(cat_gz))] == ["a", "b", "c"]
    # Bytes after the end-of-archive blocks that are no tar: every sample before them is whole, the
    # bytes are one stray_bytes skip naming their count.
    trailing = tmp_path / "trailing.tar"
    trailing.write_bytes(first + b"not a tar" * 10)
    read = list(read_shard(str(trailing)))
    assert [s["__key__"] for s in read if isinstance(s, dict)] == [key for key, _ in _webdataset(str(trailing))]
    (stray,) = [s for s in read if isinstance(s, Skip)]
    assert (
        stray.reason == "stray_bytes"
        and stray.detail.startswith("90 bytes")
        and "to the end of the data" in stray.detail
    )
    # An empty archive holds no sample and no damage.
    assert _read(_tar(tmp_path / "empty.tar", [])) == []


def test_a_zstd_shard_is_one_unreadable_shard_naming_the_format(tmp_path):
    shard = tmp_path / "s.tar.zst"
    shard.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(60))  # a zstd frame's magic number
    (skip,) = read_shard(str(shard))
    assert skip.reason == "unreadable_shard" and "zstd" in skip.detail


def test_a_glob_in_a_shards_entry_is_refused_naming_the_forms_that_are_expanded(tmp_path):
    _tar(tmp_path / "shard-000.tar", [("a.meta.json", META)])
    config = DataConfig(datasets=[DatasetConfig(name="web", shards=[str(tmp_path / "shard-*.tar")])])
    with pytest.raises(ValueError, match=r"data\.datasets\[web\]\.shards\[0\]=.*glob patterns .* brace range"):
        config.check_paths()
    # Brace ranges, file: URLs and paths with spaces name the shard.
    spaced = tmp_path / "with space"
    spaced.mkdir()
    _tar(spaced / "shard-000.tar", [("a.meta.json", META)])
    for entry in ("shard-{000..000}.tar", "shard-000.tar"):
        for prefix in (f"{spaced}/", f"file://{spaced}/"):
            DataConfig(datasets=[DatasetConfig(name="web", shards=[prefix + entry])]).check_paths()
            assert [key for key, _ in _read(resolve_shards([prefix + entry])[0].url)] == ["a"]


def test_a_sample_written_by_webdataset_with_a_jpeg_picture_decodes(tmp_path):
    picture = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with TarWriter(str(tmp_path / "s.tar")) as writer:  # WebDataset's writer encodes by extension
        writer.write({"__key__": "a", "meta.json": {"schema": 1, "caption": "x"}, "image.jpeg": picture})
        writer.write({"__key__": "b", "meta.json": {"schema": 1, "caption": "x"}, "observation.JPEG": picture})
    (a, b) = read_shard(str(tmp_path / "s.tar"))
    assert decode_sample(a).image.shape == (32, 32, 3)
    assert decode_sample(b).observation.shape == (32, 32, 3)


@pytest.mark.timeout(60)  # without the bound, next() never returns
def test_a_dataset_whose_shards_hold_no_sample_stops_an_endless_loader_naming_it(tmp_path):
    # An empty tar, and a tar of files none of which is named <key>.<field>: read for ever before.
    no_sample = [("README", b"x"), (".hidden.json", b"x")]
    shards = [_tar(tmp_path / "empty.tar", []), _tar(tmp_path / "readme.tar", no_sample)]
    junk = tmp_path / "junk.tar"  # and an empty tar with bytes after it that are no tar: one stray_bytes each read
    junk.write_bytes(open(shards[0], "rb").read() + b"no tar" * 100)
    with PackedLoader(data_config([*shards, str(junk)], epochs=0), model_config()) as loader:
        with pytest.raises(LoaderSetupError, match=r"dataset 'world': the last 61 shards read .* hold no sample"):
            next(loader)


def test_an_index_named_by_a_file_url_is_read_as_its_path_and_one_over_http_is_refused():
    folder = tiny_world()["latent"]
    by_path = [s.url for s in resolve_shards([str(folder)])]
    for entry in (f"file://{folder}", f"file://{folder}/index.json", f"file:{folder}/index.json"):
        config = DataConfig(datasets=[DatasetConfig(name="web", shards=[entry])])
        config.check_paths()  # it raised FileNotFoundError, or passed a folder on to be read as a tar
        assert [s.url for s in resolve_shards([entry])] == by_path
        assert dataset_action_stats(config.datasets[0]) == dataset_action_stats(DatasetConfig("p", [str(folder)]))
    assert dataset_action_stats(DatasetConfig("p", [str(folder)])) is not None
    config = DataConfig(datasets=[DatasetConfig(name="web", shards=["http://host/set/index.json"])])
    with pytest.raises(ValueError, match=r"data\.datasets\[web\]\.shards: .*index\.json is read from a local path"):
        config.check_paths()


def test_a_wids_shard_index_is_read_wherever_a_shard_list_is_and_an_inline_shard_is_refused(tmp_path, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    urls = [_tar(folder / f"s-{i}.tar", [(f"{i}{k}.meta.json", META) for k in "ab"]) for i in range(2)]
    wids = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": "set",
        "shardlist": [{"url": f"s-{i}.tar", "nsamples": 2, "filesize": 10240} for i in range(2)],
    }
    index = tmp_path / "set" / "train.json"
    index.write_text(json.dumps(wids))
    config = DataConfig(datasets=[DatasetConfig(name="web", shards=[str(index)])])
    config.check_paths()
    assert [(s.url, s.samples, s.bytes) for s in resolve_shards([str(index)])] == [(u, 2, 10240) for u in urls]
    assert load_script("inspect_shards").main([str(index), "--verify"]) == 0
    assert "2 shards, 4 samples, 0 bad" in capsys.readouterr().out
    encoder = PooledLatentEncoder(VIDEO_LATENT_CHANNELS, AUDIO_LATENT_DIM)
    assert not load_script("encode_shards").encode_shards(index, tmp_path / "latent", encoder)
    assert ShardIndex.load(tmp_path / "latent").total_samples == 4
    # base_path: the folder the URLs are relative to (here relative to the index's own folder).
    elsewhere = tmp_path / "lists" / "train.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(json.dumps({**wids, "base_path": "../set"}))
    assert [os.path.realpath(s.url) for s in ShardIndex.load(elsewhere).shards] == urls
    bad = {
        "inline": ({"shardlist": [{"nsamples": 2, "samples": ["..."]}]}, r"shardlist\[0\] has no url .*inline"),
        "count": ({"shardlist": [{"url": "s-0.tar", "nsamples": -1}]}, r"shardlist\[0\]\.nsamples=-1 must be"),
        "kind": ({**wids, "__kind__": "wids-other"}, r"__kind__='wids-other'"),
        "command": ({**wids, "base_path": "pipe:cat"}, r"base_path='pipe:cat'"),
    }
    for name, (document, message) in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(document))
        with pytest.raises(ValueError, match=rf"{path}: {message}"):
            resolve_shards([str(path)])


def test_member_names_that_are_not_utf8_are_escaped_printably_in_logs_and_skips(tmp_path, caplog):
    # tarfile keeps such bytes as surrogate escapes, which a UTF-8 log or terminal cannot write.
    def raw(name: bytes) -> str:
        return name.decode("utf-8", "surrogateescape")

    members = [(raw(b"\xff\xfe.meta.json"), META), (raw(b"\xfe/../x.meta.json"), META), ("new\nline.meta.json", META)]
    folder = tmp_path / "names"
    folder.mkdir()
    url = _tar(folder / "s.tar", members)
    ShardIndex((ShardInfo(url, samples=3),)).save(folder)
    (unsafe,) = [item for item in read_shard(url) if isinstance(item, Skip)]
    assert unsafe.reason == "unsafe_member" and "'\\xfe/../x.meta.json'" in unsafe.detail
    with caplog.at_level(logging.WARNING):
        with PackedLoader(data_config([str(folder)], epochs=1, tokens_per_pack=4096), model_config()) as loader:
            assert sum(pack.num_samples for pack in loader) == 2
        encoder = PooledLatentEncoder(VIDEO_LATENT_CHANNELS, AUDIO_LATENT_DIM)
        load_script("encode_shards").encode_shards(folder, tmp_path / "latent", encoder)
    messages = [record.getMessage() for record in caplog.records]
    assert sum("\\xfe/../x" in message for message in messages) == 2  # the loader's and encode_shards' warning
    for message in messages:
        message.encode("utf-8")  # a surrogate left in would raise here, as in a log handler
    # The sample whose key is not UTF-8 is written back under the same bytes.
    (shard,) = ShardIndex.load(tmp_path / "latent").shards
    assert [item["__key__"] for item in read_shard(shard.url)] == [raw(b"\xff\xfe"), "new\nline"]
