"""Every data_pipelines command given a path that is no regular file (a FIFO, a folder, a dangling
symbolic link) says which option or entry named it and what it is, in one line (or, for one file
among many, a counted skip), and never reads a FIFO: that read waits for a writer without end."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from megatron_cosmos3.testing.scripts import load_script

KINDS = {
    "fifo": "not a regular file (a FIFO)",
    "folder": "not a regular file (a folder)",
    "dangling link": "not a regular file (a dangling symbolic link to 'gone')",
}


def make(path: Path, kind: str) -> Path:
    """A path of ``kind`` at ``path``."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("gone")
    return path


# command -> (the path it is given, in tmp_path; its argv; the name the refusal gives the path)
COMMANDS = {
    "write_shards": ("manifest.jsonl", ["{path}", "{tmp}/shards"], "manifest={path!r}"),
    "ingest_videos": (
        "captions.jsonl",
        ["{tmp}/videos", "{tmp}/shards", "--captions", "{path}"],
        "--captions={path!r}",
    ),
    "inspect_shards": ("set/index.json", ["{tmp}/set"], "{path}"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_given_a_path_that_is_no_regular_file_refuses_it_in_one_line(tmp_path, capsys, command, kind):
    name, argv, named = COMMANDS[command]
    (tmp_path / "videos").mkdir()
    (tmp_path / "set").mkdir()
    path = make(tmp_path / name, kind)
    argv = [a.format(tmp=tmp_path, path=path) for a in argv]
    try:
        status = load_script(command).main(argv)
    except SystemExit as exited:  # parser.exit
        status = exited.code
    err = capsys.readouterr().err
    assert status == 2 and err.endswith(f"error: {named.format(path=str(path))}: {KINDS[kind]}\n"), err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_a_manifest_entrys_file_that_is_no_regular_file_is_a_counted_skip_naming_its_field(tmp_path, caplog, kind):
    script = load_script("write_shards")
    with pytest.raises(ValueError, match="^" + re.escape(f"manifest={str(tmp_path)!r}: not a regular file (a folder)")):
        script.write_shards(tmp_path, tmp_path / "shards")  # the library call refuses too
    (tmp_path / "in").mkdir()
    make(tmp_path / "in" / "picture.png", kind)
    (tmp_path / "in" / "manifest.jsonl").write_text(json.dumps({"key": "k", "caption": "x", "image": "picture.png"}))
    with caplog.at_level(logging.WARNING):
        status = script.main([str(tmp_path / "in" / "manifest.jsonl"), str(tmp_path / "out")])
    assert status == 1  # nothing usable was written
    assert f"image={str(tmp_path / 'in' / 'picture.png')!r}: {KINDS[kind]}" in caplog.text


@pytest.mark.parametrize("kind", ["fifo", "dangling link"])  # a folder among the videos is walked
def test_a_video_folders_entry_that_is_no_regular_file_is_left_out_saying_what_it_is(tmp_path, kind):
    clip = make(tmp_path / "clip.mp4", kind)
    assert load_script("ingest_videos").sort_files(tmp_path) == ([], [(clip, "not_a_video", KINDS[kind])])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_compute_action_stats_counts_an_episode_that_is_no_regular_file_as_a_skip(tmp_path, caplog, kind):
    episode = make(tmp_path / "episode.npz", kind)
    with caplog.at_level(logging.INFO):
        assert load_script("compute_action_stats").main([str(tmp_path)]) == 1
    assert "0 file(s) used, 1 skipped" in caplog.text
    assert f"episode={str(episode)!r}: {KINDS[kind]}" in caplog.text
