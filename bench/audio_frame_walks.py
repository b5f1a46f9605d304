"""What finding a cut raw audio file costs: the MP3 / ADTS frame chains (``data/audio_frames.py``)
and the Ogg page walk (``media_files._missing_ogg_bytes``) over an hour of sound (``--minutes``),
against a 10 s clip's whole decode of the same file; and what measuring an MP3 (no Xing header) or
ADTS file costs, which declares no length: FFmpeg's packets read without decoding
(``media_files._packet_span``) against its frame headers chained and counted (the same walk,
measured: ``FrameChain.length``).

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

from megatron_cosmos3.data import audio_frames, media_files
from megatron_cosmos3.data.clips import MediaConfig
from megatron_cosmos3.data.media import encode_json
from megatron_cosmos3.data.schema import decode_sample

MP3 = ["-c:a", "libmp3lame", "-b:a", "128k", "-write_xing", "0", "-id3v2_version", "0", "-f", "mp3"]
CPU = torch.device("cpu")
KINDS = {  # name: (FFmpeg's options, the shard field, the frame chain: None for Ogg's page walk)
    "mp3": (MP3, "audio.mp3", audio_frames.mpeg_audio_chain),
    "adts": (["-c:a", "aac", "-f", "adts"], "audio.aac", audio_frames.adts_chain),
    "ogg": (["-c:a", "libvorbis", "-f", "ogg"], "audio.ogg", None),
}


def main() -> None:
    parser = repeats_parser(__doc__)
    parser.add_argument("--minutes", type=float, default=60, help="length of each file")
    parser.add_argument("--copy-seconds", type=float, default=120, help="MP3/ADTS: the tone each file copies")
    args = parser.parse_args()
    print(f"| file ({args.minutes:g} min) | MB | check s | 10 s clip decode s | length: packets s | length: frames s |")
    print("|---|---|---|---|---|---|")
    for kind, (options, field, chain) in KINDS.items():
        # Ogg pages chain only within one stream: an hour of it is encoded whole, the others copied.
        copies = 1 if kind == "ogg" else max(1, round(args.minutes * 60 / args.copy_seconds))
        tone = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={args.minutes * 60 / copies}"]
        command = ["ffmpeg", "-loglevel", "error", *tone, *options, "-"]
        data = subprocess.run(command, capture_output=True, check=True).stdout * copies
        check = partial(media_files._missing_ogg_bytes, data) if chain is None else partial(chain, data, 0)
        seconds = median_seconds(check, CPU, 0, args.repeats)
        clip = packets = frames = "-"
        if chain is not None:
            raw = {"__key__": "k", "meta.json": encode_json({"schema": 1, "caption": "a tone"}), field: data}
            config = MediaConfig(clip_seconds=10.0)
            decode = partial(decode_sample, raw, media_config=config, draw=0.5)
            clip = f"{median_seconds(decode, CPU, 0, args.repeats):.3f}"
            packets = f"{median_seconds(partial(_packet_seconds, data), CPU, 0, args.repeats):.3f}"
            frames = f"{median_seconds(partial(_frame_samples, chain, data), CPU, 0, args.repeats):.3f}"
        print(f"| {kind} | {len(data) / 1e6:.1f} | {seconds:.3f} | {clip} | {packets} | {frames} |")


def _packet_seconds(data: bytes) -> float | None:
    """Where the file's sound ends by FFmpeg's packets (the measure of an MP3 without a Xing header
    before its frames were chained, and of an ADTS file before they were counted)."""
    with av.open(io.BytesIO(data)) as container:
        return media_files._packet_span(container.streams.audio[0], data)[1]


def _frame_samples(chain, data: bytes) -> int:
    """The samples of the file's frames, chained and counted (no ID3 tag: from byte 0)."""
    return chain(data, 0, measure=True).length(audio_frames.trailer_start(data))[1]


if __name__ == "__main__":
    main()
