#!/usr/bin/env python
"""A folder of videos and their captions -> WebDataset shards, checked against the sample schema.

    python data_pipelines/ingest_videos.py IN_DIR OUT_DIR [--captions captions.jsonl] [--shard-size 64]
        [--task I --tasks N | --processes P]

Every video file under ``IN_DIR`` (``.mp4``, ``.mov``, ``.m4v``, ``.webm``, ``.mkv``, ``.avi``; sorted by
relative path) becomes one sample that stores the file as it is (``video.<suffix>``, its sound inside:
no re-encoding). Every other file is accounted for: a caption sidecar is read with its video; a video
in another container (``OTHER_CONTAINERS``: MPEG-TS, MPEG-PS, FLV, ASF/WMV, 3GP, Ogg...) is skipped
as ``unsupported_container`` (their structure does not say how long they are, so a cut file could
not be told from a whole one; remux it: ``ffmpeg -i IN -c copy OUT.mkv``) and anything else as
``not_a_video``, each counted and logged.
Its caption, the first found of: the ``--captions`` JSONL line ``{"file": "<relative path>",
"caption": "...", "segments": [{"start_s", "end_s", "text"}]}``; a sidecar ``<stem>.json`` with
the same keys; a sidecar ``<stem>.txt`` (the caption). Timed ``segments`` become the sample's
``caption_segments``: long videos stay whole and the loader cuts clips with the segments of their
window (``data.media.clip_seconds``, docs/DESIGN.md "Real media").

Each sample is checked as the loader reads it (its container, streams, durations and first second
decoded); a bad one is skipped, counted per reason and logged. Videos go into parts of
``--shard-size``; part n is written by task n mod N (a SLURM array's ``--task/--tasks``, or
``--processes P`` local processes), and the last task to finish writes the index: the output is the
same, byte for byte, for any split (``megatron_cosmos3/data/shard_writer.py``, ``write_parts``).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path

from megatron_cosmos3.data.clips import MediaConfig
from megatron_cosmos3.data.errors import BAD_METADATA, UNSUPPORTED_CONTAINER, SampleError
from megatron_cosmos3.data.media import encode_json
from megatron_cosmos3.data.media_files import VIDEO_SUFFIXES
from megatron_cosmos3.data.schema import SCHEMA_VERSION, blank_text, decode_sample
from megatron_cosmos3.data.shard_writer import ShardWriter, check_split_output, run_split, write_parts

log = logging.getLogger("ingest_videos")
NOT_A_VIDEO = "not_a_video"
# Video containers FFmpeg reads that the shards do not take (module doc).
OTHER_CONTAINERS = (
    "ts", "m2ts", "mts", "m2t", "mpg", "mpeg", "m2v", "vob", "flv", "f4v", "wmv", "asf", "3gp", "3g2", "ogv",
    "mxf", "rm", "rmvb", "divx", "nut", "y4m", "ivf", "h264", "264", "hevc", "265",
)  # fmt: skip
CAPTION_SIDECARS = (".json", ".txt")
# What a sample is checked with before it is written: the whole file's structure, one second decoded.
CHECK = MediaConfig(clip_seconds=1.0, clip_start="first")


def find_videos(in_dir: Path) -> list[Path]:
    """Video files under ``in_dir``, by relative path."""
    return sorted(p for p in in_dir.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in VIDEO_SUFFIXES)


def left_out(in_dir: Path, captions: Path | None = None) -> list[tuple[Path, str, str]]:
    """The files under ``in_dir`` that are neither a video nor a caption sidecar of one, nor the
    ``captions`` file: (path, reason, detail) by relative path (module doc)."""
    files = sorted(p for p in in_dir.rglob("*") if p.is_file())
    containers = VIDEO_SUFFIXES + OTHER_CONTAINERS
    stems = {p.with_suffix("") for p in files if p.suffix.lower().lstrip(".") in containers}
    found = []
    for path in files:
        suffix = path.suffix.lower().lstrip(".")
        if suffix in VIDEO_SUFFIXES or (path.suffix.lower() in CAPTION_SIDECARS and path.with_suffix("") in stems):
            continue
        if captions is not None and path.resolve() == Path(captions).resolve():
            continue
        if suffix in OTHER_CONTAINERS:
            detail = (
                f"a .{suffix} file: the shards take {', '.join(VIDEO_SUFFIXES)} (remux: ffmpeg -i IN -c copy OUT.mkv)"
            )
            found.append((path, UNSUPPORTED_CONTAINER, detail))
        else:
            found.append((path, NOT_A_VIDEO, "not a video file or a caption sidecar of one"))
    return found


def caption_of(video: Path, in_dir: Path, listed: dict[str, dict]) -> dict:
    """The meta.json text keys of ``video``: ``caption`` and ``caption_segments`` (module doc)."""
    entry = listed.get(video.relative_to(in_dir).as_posix())
    sidecar = video.with_suffix(".json") if entry is None and video.with_suffix(".json").is_file() else None
    try:  # a broken sidecar loses its video (counted), not the run
        if sidecar is not None:
            entry = json.loads(sidecar.read_text(encoding="utf-8-sig"))  # a BOM (Windows editors) is no text
        if entry is None and video.with_suffix(".txt").is_file():
            sidecar = video.with_suffix(".txt")
            entry = {"caption": sidecar.read_text(encoding="utf-8-sig").strip()}
    except ValueError as error:  # not UTF-8 (UnicodeDecodeError) or not JSON
        raise SampleError(BAD_METADATA, f"{sidecar}: not a UTF-8 caption file ({error})") from None
    if entry is not None and not isinstance(entry, dict):
        raise SampleError(BAD_METADATA, f"{sidecar}: expected a JSON object, got {type(entry).__name__}")
    meta = {}
    caption = entry.get("caption") if entry else None
    if caption and not (isinstance(caption, str) and blank_text(caption)):  # a blank caption is none
        meta["caption"] = caption
    if entry and entry.get("segments"):
        meta["caption_segments"] = entry["segments"]
    return meta


def video_sample(number: int, video: Path, in_dir: Path, listed: dict[str, dict]) -> dict:
    """The WebDataset dict of video ``number``: its key names it (unique: the number leads)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", video.relative_to(in_dir).with_suffix("").as_posix())
    meta = {"schema": SCHEMA_VERSION, **caption_of(video, in_dir, listed), "source": {"file": str(video.name)}}
    return {
        "__key__": f"{number:08d}_{name}"[:120],
        "meta.json": encode_json(meta),
        f"video.{video.suffix.lower().lstrip('.')}": video.read_bytes(),
    }


def ingest_videos(
    in_dir: str | Path,
    out_dir: str | Path,
    captions: str | Path | None = None,
    shard_size: int = 64,
    task: int = 0,
    tasks: int = 1,
) -> Counter:
    """Writes task ``task`` of ``tasks``'s parts of the shards of ``in_dir`` (module doc); returns
    skip counts per reason."""
    in_dir = Path(in_dir)
    check_split_output(out_dir, in_dir, shard_size, task, tasks)
    listed = {}
    if captions:
        for number, line in enumerate(Path(captions).read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                    listed[entry["file"]] = entry
                except (ValueError, TypeError, KeyError) as error:
                    raise ValueError(
                        f"--captions={captions}, line {number}: not {{'file': ..., ...}} ({error!r})"
                    ) from None
    videos = find_videos(in_dir)
    skipped: Counter = Counter()

    def write_part(part: int, writer: ShardWriter) -> None:
        for number in range(part * shard_size, min((part + 1) * shard_size, len(videos))):
            try:
                raw = video_sample(number, videos[number], in_dir, listed)
                checked = decode_sample(raw, media_config=CHECK)
            except SampleError as error:
                skipped[error.reason] += 1
                log.warning("%s: skipped: %s", videos[number], error)
                continue
            writer.write_raw(raw, checked.modalities)

    if task == 0:  # counted once, whatever the split
        for path, reason, detail in left_out(in_dir, captions):
            skipped[reason] += 1
            log.warning("%s: skipped: %s: %s", path, reason, detail)
    parts = -(-len(videos) // shard_size)
    write_parts(out_dir, "videos", parts, write_part, task, tasks, shard_size, validate=False)
    return skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--captions", type=Path, default=None, help="JSONL of {file, caption, segments}")
    parser.add_argument("--shard-size", type=int, default=64, help="videos per shard")
    parser.add_argument("--task", type=int, default=0, help="this process's part (e.g. $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--tasks", type=int, default=1, help="how many parts (e.g. $SLURM_ARRAY_TASK_COUNT)")
    parser.add_argument("--processes", type=int, default=0, help="split over P local processes instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    common = (args.in_dir, args.out_dir, args.captions, args.shard_size)
    try:
        skipped = run_split(ingest_videos, args.processes, args.task, args.tasks, *common)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    log.info("wrote %s; skipped %s", args.out_dir, dict(skipped) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
