"""What finding a cut raw audio file costs: the MP3 / ADTS frame chains (``data/audio_frames.py``)
and the Ogg page walk (``media_files._missing_ogg_bytes``) over an hour of sound, against a
10 s clip's whole decode of the same MP3.

    python bench/audio_frame_walks.py [--repeats 3]

An hour is 30 copies of 2 minutes of a 48 kHz tone (no Xing or ID3 header, so copies chain), or
for Ogg an hour encoded whole.
"""

from __future__ import annotations

import subprocess
from functools import partial

import torch
from harness import median_seconds, parse_repeats

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
    repeats = parse_repeats(__doc__)
    print("| file (1 h) | MB | check s | 10 s clip decode s |")
    print("|---|---|---|---|")
    for kind, (options, check) in KINDS.items():
        # Ogg pages chain only within one stream: an hour of it is encoded whole, the others copied.
        copies = 1 if kind == "ogg" else 30
        tone = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={3600 // copies}"]
        command = ["ffmpeg", "-loglevel", "error", *tone, *options, "-"]
        data = subprocess.run(command, capture_output=True, check=True).stdout * copies
        seconds = median_seconds(partial(getattr(media_files, check), data), CPU, 0, repeats)
        clip = "-"
        if kind == "mp3":
            raw = {"__key__": "k", "meta.json": encode_json({"schema": 1, "caption": "a tone"}), "audio.mp3": data}
            config = MediaConfig(clip_seconds=10.0)
            clip = f"{median_seconds(partial(decode_sample, raw, media_config=config, draw=0.5), CPU, 0, repeats):.3f}"
        print(f"| {kind} | {len(data) / 1e6:.1f} | {seconds:.3f} | {clip} |")


if __name__ == "__main__":
    main()
