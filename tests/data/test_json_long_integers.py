"""An integer of more digits than Python converts (5000; ``sys.get_int_max_str_digits`` is 4300) in
any JSON file the data side reads — a shard index (ours or WebDataset's wids one), a sample's
meta.json, a LeRobot info.json or episode line, a file read by ``read_json`` — is an error naming the
file and the field; Python's own 'Exceeds the limit' ValueError named neither the field nor, bare,
the file (docs/DESIGN.md, "Layers")."""

from __future__ import annotations

import json

import pytest
from world_helpers import load_script

from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.media import decode_json
from megatron_cosmos3.data.shards import ShardIndex
from megatron_cosmos3.json_files import read_json

DIGITS = "7" * 5000


def test_a_shard_index_names_the_entry_holding_the_long_integer(tmp_path):
    index = tmp_path / "index.json"
    entries = f'{{"url": "a.tar", "samples": 2}}, {{"url": "b.tar", "samples": {DIGITS}}}'
    index.write_text(f'{{"format_version": 1, "shards": [{entries}]}}')
    with pytest.raises(ValueError, match=rf"^{index}: shards\[1\].samples=<an integer of 5000 digits> is not a number"):
        ShardIndex.load(index)
    wids = tmp_path / "wids.json"
    wids.write_text(f'{{"shardlist": [{{"url": "a.tar", "nsamples": -{DIGITS}}}]}}')
    with pytest.raises(ValueError, match=rf"^{wids}: shardlist\[0\].nsamples=<an integer of 5000 digits>"):
        ShardIndex.load(wids)
    index.write_text('{"format_version": 1, "shards": [{"url": "a.tar", "samples": 2}]}')  # control
    assert ShardIndex.load(index).total_samples == 2


def test_a_samples_meta_json_is_bad_metadata_naming_the_field():
    with pytest.raises(SampleError) as raised:
        decode_json(f'{{"caption": "a ball", "source": {{"frames": [1, {DIGITS}]}}}}'.encode(), "meta.json")
    assert raised.value.reason == "bad_metadata"
    assert raised.value.detail.startswith("meta.json: source.frames[1]=<an integer of 5000 digits> is not a number")
    assert decode_json(b'{"caption": "a ball", "fps": 24}', "meta.json") == {"caption": "a ball", "fps": 24}


def test_read_json_and_a_lerobot_info_json_name_the_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(f'{{"layers": [{{"width": {DIGITS}}}]}}')
    with pytest.raises(ValueError, match=rf"^{path}: layers\[0\].width=<an integer of 5000 digits> is not a number"):
        read_json(path)
    path.write_text(DIGITS)
    with pytest.raises(ValueError, match=rf"^{path}: the document=<an integer of 5000 digits>"):
        read_json(path)
    root = tmp_path / "lerobot"
    (root / "meta").mkdir(parents=True)
    info = root / "meta" / "info.json"
    info.write_text(f'{{"codebase_version": "v2.1", "fps": {DIGITS}, "features": {{}}}}')
    with pytest.raises(ValueError, match=rf"^{info}: fps=<an integer of 5000 digits> is not a number"):
        load_script("ingest_lerobot").read_info(root)
    info.write_text(json.dumps({"codebase_version": "v2.1", "fps": 10, "features": []}))  # control: read, then checked
    with pytest.raises(ValueError, match="expected a JSON object with a 'features' object"):
        load_script("ingest_lerobot").read_info(root)
