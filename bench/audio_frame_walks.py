"""What finding a cut raw audio file costs: the MP3 / ADTS frame chains (``data/audio_frames.py``)
and the Ogg page walk (``media_files._missing_ogg_bytes``) over an hour of sound (``--minutes``),
against a 10 s clip's whole decode of the same MP3; and what measuring that MP3 costs, which
declares no length (no Xing header): FFmpeg's packets read without decoding
(``media_files._packet_span``) against its frame headers chained (``media_files._mp3_frames``).

    python bench/audio_frame_walks.py [--repeats 3] [--minutes 60] [--copy-seconds 120]

Each file is copies of ``--copy-seconds`` of a 48 kHz tone (no Xing or ID3 header, so copies
chain), or for Ogg encoded whole.
"""

from __future__ import annotations

import io
import subprocess
from functools import partial

import av
import torch
from harness import median_seconds, repeats_parser

from megatron_cosmos3.data import media_files
from megatron_cosmos3.data.clips import MediaConfig
from megatron_cosmos3.data.media import encode_json
from megatron_cosmos3.data.schema import decode_sample

MP3 = ["-c:a", "libmp3lame", "-b:a", "128k", "-write_xing", "0", "-id3v2_version", "0", "-f", "mp3"]
CPU = torch.device("cpu")
KINDS = {  # name: (FFmpeg's options, the check)
    "mp3": (MP3, "_missing_mpeg_audio_bytes"),
    "adts": (["-c:a", "aac", "-f", "adts"], "_missing_adts_bytes"),
    "ogg": (["-c:a", "libvorbis", "-f", "ogg"], "_missing_ogg_bytes"),
}


def main() -> None:
    parser = repeats_parser(__doc__)
    parser.add_argument("--minutes", type=float, default=60, help="length of each file")
    parser.add_argument("--copy-seconds", type=float, default=120, help="MP3/ADTS: the tone each file copies")
    args = parser.parse_args()
    print(f"| file ({args.minutes:g} min) | MB | check s | 10 s clip decode s | length: packets s | length: frames s |")
    print("|---|---|---|---|---|---|")
    for kind, (options, check) in KINDS.items():
        # Ogg pages chain only within one stream: an hour of it is encoded whole, the others copied.
        copies = 1 if kind == "ogg" else max(1, round(args.minutes * 60 / args.copy_seconds))
        tone = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={args.minutes * 60 / copies}"]
        command = ["ffmpeg", "-loglevel", "error", *tone, *options, "-"]
        data = subprocess.run(command, capture_output=True, check=True).stdout * copies
        seconds = median_seconds(partial(getattr(media_files, check), data), CPU, 0, args.repeats)
        clip = packets = frames = "-"
        if kind == "mp3":
            raw = {"__key__": "k", "meta.json": encode_json({"schema": 1, "caption": "a tone"}), "audio.mp3": data}
            config = MediaConfig(clip_seconds=10.0)
            decode = partial(decode_sample, raw, media_config=config, draw=0.5)
            clip = f"{median_seconds(decode, CPU, 0, args.repeats):.3f}"
            packets = f"{median_seconds(partial(_packet_seconds, data), CPU, 0, args.repeats):.3f}"
            frames = f"{median_seconds(partial(media_files._mp3_frames, data), CPU, 0, args.repeats):.3f}"
        print(f"| {kind} | {len(data) / 1e6:.1f} | {seconds:.3f} | {clip} | {packets} | {frames} |")


def _packet_seconds(data: bytes) -> float | None:
    """Where the file's sound ends by FFmpeg's packets (the measure of an MP3 without a Xing header
    before its frames were chained)."""
    with av.open(io.BytesIO(data)) as container:
        return media_files._packet_span(container.streams.audio[0], data)[1]


if __name__ == "__main__":
    main()
