"""data_pipelines/export_requests.py: conditioning files and a request file from a generated world,
each request one the generation path takes (``prepare_request`` on the world's own inputs)."""

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_cosmos3.data.shards import ShardIndex
from megatron_cosmos3.inference.requests import GenerationRequest, prepare_request
from megatron_cosmos3.model.config import EmbodimentConfig
from megatron_cosmos3.testing.generation import generation_config, generation_setup

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "data_pipelines"))

from export_requests import TASKS, export_requests, main, world_samples  # noqa: E402
from generate_world import write_world  # noqa: E402

from megatron_cosmos3.world.config import WorldConfig  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    write_world(out, samples=8, seed=1, config=WorldConfig(resolution=32, duration_s=1.0))  # 3 s
    return out / "raw"


def test_requests_name_their_world_inputs_and_prepare_for_every_task(world, tmp_path):
    path = export_requests(world, tmp_path / "requests", per_task=1, steps=4, guidance=2.0)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(line["task"] for line in lines) == sorted(TASKS)
    assert len({line["name"] for line in lines}) == len(lines)
    samples = {s.caption: s for s in world_samples(world)}
    config = generation_config(embodiments={"single_arm": EmbodimentConfig(19, 10.0)})
    builder = generation_setup(config)
    for line in lines:
        sample = samples[line["prompt"]]  # the prompt is a world sample's caption
        assert line["fps"] == sample.fps and line["resolution"] == list(sample.video.shape[1:3])
        assert (line["steps"], line["guidance"]) == (4, 2.0)
        fields = {k: v for k, v in line.items() if k not in ("name", "image", "video")}
        if "image" in line:  # the clip's first frame, lossless
            image = np.asarray(Image.open(path.parent / line["image"]).convert("RGB"))
            np.testing.assert_array_equal(image, sample.video[0])
            fields["image"] = image
        if "video" in line:
            video = np.load(path.parent / line["video"])
            np.testing.assert_array_equal(video, sample.video)
            fields["video"] = video
        if line["task"] == "policy":
            assert line["embodiment"] == sample.embodiment == "single_arm"
        request = GenerationRequest(**{**fields, "resolution": tuple(fields["resolution"])})
        prepared = prepare_request(request, builder)  # the generation path takes it as written
        assert prepared.outputs, line["task"]


def test_a_sample_split_in_its_shard_is_passed_over_whole(world, tmp_path):
    """A sample whose members lie apart in its shard is not exported, its first part neither: the
    loader skips it whole (``shards.read_samples``), so a request made from it would name a clip
    training never saw."""
    raw = shutil.copytree(world, tmp_path / "raw")
    shard = ShardIndex.load(raw / "index.json").shards[0].url
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    audio = next(i for i, (member, _) in enumerate(members) if member.name.endswith(".audio.wav"))
    split_key = members[audio][0].name.split(".", 1)[0]
    # Its sound at the shard's end: what stays in place (meta, video) would decode as a silent clip.
    members.append(members.pop(audio))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    keys = [sample.key for sample in world_samples(raw)]
    original = [sample.key for sample in world_samples(world)]
    assert split_key in original and keys == [key for key in original if key != split_key]


def test_a_world_too_small_for_a_task_is_an_error_naming_it(world, tmp_path):
    with pytest.raises(ValueError, match="policy"):
        export_requests(world, tmp_path / "r", per_task=20)
    with pytest.raises(SystemExit):
        main([str(world), str(tmp_path / "r"), "--per-task", "0"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "{out}"], "is not a shard folder with an index.json"),
        (["{world}", "{world}"], "exists and is not an empty folder"),
        (["{world}", "{full}"], "exists and is not an empty folder"),
        (["{world}", "{file}"], "exists and is not an empty folder"),
        (["{world}", "{out}", "--steps", "-3"], "steps=-3 must be >= 1"),
        (["{world}", "{out}", "--guidance", "nan"], "guidance=nan finite"),
        (["{world}", "{out}", "--per-task", "20"], "too few usable samples"),
    ],
)
def test_bad_inputs_and_outputs_are_one_line_exit_2_and_write_nothing(world, tmp_path, capsys, args, message):
    """An output that holds files (the input itself, an earlier export, a file) is never mixed into;
    too few samples is found before any conditioning file is written."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    before = sorted(p.name for p in world.iterdir())
    paths = {"world": world, "missing": tmp_path / "missing", "out": tmp_path / "out"}
    paths |= {"full": tmp_path / "full", "file": tmp_path / "file"}
    with pytest.raises(SystemExit) as exited:
        main([a.format(**paths) for a in args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and sorted(p.name for p in world.iterdir()) == before
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
