#!/usr/bin/env python
"""A folder of videos and their captions -> WebDataset shards, checked against the sample schema.

    python data_pipelines/ingest_videos.py IN_DIR OUT_DIR [--captions captions.jsonl] [--shard-size 64]
        [--task I --tasks N | --processes P]

Every video file under ``IN_DIR`` (sorted by relative path) becomes one sample that stores the file
as it is, its sound inside (no re-encoding): a ``.mp4``, ``.mov``, ``.m4v``, ``.webm``, ``.mkv`` or
``.avi`` file as ``video.<suffix>``, and any other file whose bytes FFmpeg reads as a video in one of
those containers (a ``.3gp``, ``.qt``, ``.divx``, an MP4 named ``.ts``) as ``video.mp4``, ``.mkv`` or
``.avi``: the bytes are judged as the loader judges a video field's, never by the name. Every other
file is accounted for: a caption sidecar is read with its video; a video in another container
(MPEG-TS, MPEG-PS, FLV, ASF/WMV, Ogg...) is skipped as ``unsupported_container`` (their structure
does not say how long they are, so a cut file could not be told from a whole one; remux it:
``ffmpeg -i IN -c copy OUT.mkv``) and anything else (a picture, sound, text) as ``not_a_video``,
each counted and logged.
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
import io
import logging
import re
import sys
from collections import Counter
from pathlib import Path

from megatron_cosmos3.config_files import file_problem, refuse_irregular_file
from megatron_cosmos3.data.clips import MediaConfig
from megatron_cosmos3.data.errors import BAD_METADATA, CORRUPT_MEDIA, UNSUPPORTED_CONTAINER, SampleError
from megatron_cosmos3.data.media import DECODE_ERRORS, encode_json
from megatron_cosmos3.data.media_files import (
    VIDEO_SUFFIXES,
    is_picture_demuxer,
    taken_video_suffix,
    untaken_container_detail,
)
from megatron_cosmos3.data.schema import SCHEMA_VERSION, blank_text, decode_sample
from megatron_cosmos3.data.shard_writer import (
    ShardWriter,
    check_split_output,
    empty_output_status,
    run_split,
    write_parts,
)
from megatron_cosmos3.json_files import loads, unique_keys

log = logging.getLogger("ingest_videos")
NOT_A_VIDEO = "not_a_video"
CAPTION_SIDECARS = (".json", ".txt")
# What a sample is checked with before it is written: the whole file's structure, one second decoded.
CHECK = MediaConfig(clip_seconds=1.0, clip_start="first")


def sort_files(
    in_dir: Path, captions: Path | None = None
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str, str]]]:
    """The files under ``in_dir`` by relative path, less the ``captions`` file and the caption
    sidecars of videos: the videos, each with the suffix of the video field that takes it, and the
    files left out, as (path, reason, detail) (module doc)."""
    entries = sorted(in_dir.rglob("*"))  # rglob does not descend into linked folders: a link may loop
    files = [p for p in entries if p.is_file()]
    if captions is not None:
        files = [p for p in files if p.resolve() != Path(captions).resolve()]
    videos, left_out, stems = [], [], set()
    for path in entries:  # what is neither a file nor a folder walked is accounted for too
        if path.is_symlink() and path.is_dir():
            left_out.append((path, NOT_A_VIDEO, "a link to a folder: not followed (links may loop)"))
        elif not path.is_file() and not path.is_dir():  # a FIFO, socket, device or dangling link
            left_out.append((path, NOT_A_VIDEO, file_problem(path) or "not a regular file"))
    for path in files:
        suffix = path.suffix.lower().lstrip(".")
        if path.suffix.lower() in CAPTION_SIDECARS:
            continue  # judged below, once every video's stem is known
        try:
            field = suffix if suffix in VIDEO_SUFFIXES else video_suffix_of(path)
        except SampleError as error:  # a video the shards do not take: its sidecar goes with it
            left_out.append((path, error.reason, error.detail))
            stems.add(path.with_suffix(""))
            continue
        if field is None:
            left_out.append((path, NOT_A_VIDEO, "no video FFmpeg reads (a picture, sound, text...)"))
        else:
            videos.append((path, field))
            stems.add(path.with_suffix(""))
    for path in files:
        if path.suffix.lower() in CAPTION_SIDECARS and path.with_suffix("") not in stems:
            left_out.append((path, NOT_A_VIDEO, "not a video file or a caption sidecar of one"))
    return videos, sorted(left_out)


def video_suffix_of(path: Path) -> str | None:
    """The suffix of the video field that takes ``path``'s bytes (``media_files.taken_video_suffix``),
    judged by FFmpeg from the bytes alone, as the loader judges a video field's (FFmpeg would also
    guess from a name's extension); None where they hold no video: no stream FFmpeg reads, a
    picture, or sound with its cover art. ``unsupported_container``: a video in another container."""
    import av

    try:
        file = path.open("rb")
    except OSError as error:  # a file we may not read is its own skip, not the end of the run
        raise SampleError(CORRUPT_MEDIA, f"unreadable ({type(error).__name__}: {error})") from None
    try:
        with file, av.open(_Nameless(file), metadata_errors="ignore") as container:
            demuxer = container.format
            moving = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    except (av.error.FFmpegError, *DECODE_ERRORS):
        return None
    if not moving or is_picture_demuxer(demuxer.name):
        return None
    suffix = taken_video_suffix(demuxer.name)
    if suffix is None:
        raise SampleError(UNSUPPORTED_CONTAINER, untaken_container_detail(demuxer))
    return suffix


class _Nameless(io.RawIOBase):
    """A file's bytes without its name, which PyAV would hand FFmpeg to guess the format by."""

    def __init__(self, file):
        super().__init__()
        self._file = file

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._file.readinto(buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


def caption_of(video: Path, in_dir: Path, listed: dict[str, dict]) -> dict:
    """The meta.json text keys of ``video``: ``caption`` and ``caption_segments`` (module doc)."""
    entry = listed.get(video.relative_to(in_dir).as_posix())
    sidecar = video.with_suffix(".json") if entry is None and video.with_suffix(".json").is_file() else None
    try:  # a broken sidecar loses its video (counted), not the run
        if sidecar is not None:
            text = sidecar.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is no text
            entry = loads(text, object_pairs_hook=unique_keys)
        if entry is None and video.with_suffix(".txt").is_file():
            sidecar = video.with_suffix(".txt")
            entry = {"caption": sidecar.read_text(encoding="utf-8-sig").strip()}
    except (ValueError, RecursionError, OSError) as error:  # not UTF-8, not JSON, nested past the parser, unreadable
        raise SampleError(
            BAD_METADATA, f"{sidecar}: not a readable UTF-8 caption file ({type(error).__name__}: {error})"
        ) from None
    if entry is not None and not isinstance(entry, dict):
        raise SampleError(BAD_METADATA, f"{sidecar}: expected a JSON object, got {type(entry).__name__}")
    meta = {}
    caption = entry.get("caption") if entry else None
    if caption and not (isinstance(caption, str) and blank_text(caption)):  # a blank caption is none
        meta["caption"] = caption
    if entry and entry.get("segments"):
        meta["caption_segments"] = entry["segments"]
    return meta


def video_sample(number: int, video: Path, suffix: str, in_dir: Path, listed: dict[str, dict]) -> dict:
    """The WebDataset dict of video ``number``, stored as ``video.<suffix>``: its key names it
    (unique: the number leads)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", video.relative_to(in_dir).with_suffix("").as_posix())
    meta = {"schema": SCHEMA_VERSION, **caption_of(video, in_dir, listed), "source": {"file": str(video.name)}}
    try:
        data = video.read_bytes()
    except OSError as error:  # unreadable (permissions, an I/O error): this video's skip, not the run's end
        raise SampleError(CORRUPT_MEDIA, f"{video}: unreadable ({type(error).__name__}: {error})") from None
    return {"__key__": f"{number:08d}_{name}"[:120], "meta.json": encode_json(meta), f"video.{suffix}": data}


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
    if Path(out_dir).resolve().is_relative_to(in_dir.resolve()):  # every file under in_dir is an input
        raise ValueError(
            f"output {str(out_dir)!r} is inside the input folder {str(in_dir)!r}: a rerun, or a task listing "
            "the input while another writes, would take the shards written there as inputs; write them elsewhere"
        )
    listed = {}
    if captions:
        refuse_irregular_file("--captions", captions)  # a FIFO: its read waited for a writer without end
        try:
            text = Path(captions).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:  # unreadable, not UTF-8
            raise ValueError(
                f"--captions={captions}: not a readable UTF-8 file ({type(error).__name__}: {error})"
            ) from None
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:  # strict: a key given twice, or NaN, would be read one way here and another elsewhere
                    entry = loads(line, object_pairs_hook=unique_keys)
                    if entry["file"] in listed:  # which of two captions was meant cannot be told
                        raise ValueError(f"file {entry['file']!r} is listed twice")
                    listed[entry["file"]] = entry
                except (ValueError, TypeError, KeyError, RecursionError) as error:
                    raise ValueError(
                        f"--captions={captions}, line {number}: not {{'file': ..., ...}} ({error!r})"
                    ) from None
    videos, left_out = sort_files(in_dir, captions)
    if not videos:  # a wrong folder: an empty dataset would fail only when a run reads it
        reasons = Counter(reason for _, reason, _ in left_out)
        raise ValueError(f"{in_dir}: no video file to ingest" + (f" (left out: {dict(reasons)})" if reasons else ""))
    skipped: Counter = Counter()

    def write_part(part: int, writer: ShardWriter) -> None:
        for number in range(part * shard_size, min((part + 1) * shard_size, len(videos))):
            try:
                raw = video_sample(number, *videos[number], in_dir, listed)
                checked = decode_sample(raw, media_config=CHECK)
            except SampleError as error:
                skipped[error.reason] += 1
                log.warning("%s: skipped: %s", videos[number][0], error)
                continue
            writer.write_raw(raw, checked.modalities)

    if task == 0:  # counted once, whatever the split
        for path, reason, detail in left_out:
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
    return empty_output_status(args.out_dir, skipped)


if __name__ == "__main__":
    sys.exit(main())
