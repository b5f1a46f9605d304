#!/usr/bin/env python
"""Export generation requests from a generated world: a few conditioning files and the request file
``cosmos3-generate --requests`` reads.

    python data_pipelines/export_requests.py WORLD_RAW OUT [--per-task 1] [--steps 16] [--guidance 2]

``WORLD_RAW``: the ``raw/`` shard set ``generate_world.py`` writes (pixels, 48 kHz audio, actions,
captions), best a held-out world (another ``--seed``) the model never trained on. Samples are taken
in shard order, each for one request; per task, ``--per-task`` requests:

====================  ==========================================================================
task                  request (the sample's caption as prompt; its fps, duration, resolution)
====================  ==========================================================================
text_to_audio_video   nothing but the prompt: a clip with sound
image_to_video        ``<name>/image.png``: the clip's first frame
video_to_audio        ``<name>/video.npy``: the clip's frames (T, H, W, 3) uint8
policy                ``<name>/image.png``: the first frame, the observation; the embodiment of
                      the sample's agent (``--embodiment``): a trajectory plot
====================  ==========================================================================

``OUT/requests.jsonl`` holds one JSON object per line (paths relative to ``OUT``), with the keys of
``inference/requests.py``'s ``GenerationRequest`` in snake case plus ``name`` (the output folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from megatron_cosmos3.data.media_writers import write_png
from megatron_cosmos3.data.schema import Sample, decode_sample
from megatron_cosmos3.data.shards import ShardIndex, read_samples
from megatron_cosmos3.inference.requests import sampler_settings
from megatron_cosmos3.world.agents import EMBODIMENT_RATES

TASKS = ("text_to_audio_video", "image_to_video", "video_to_audio", "policy")


def world_samples(raw_dir: str | Path):
    """The usable samples of a shard set, in shard order, as the loader counts them
    (``shards.read_samples``): a damaged or malformed sample, or one whose members lie apart in its
    shard (its first part too), is passed over."""
    for shard in ShardIndex.load(Path(raw_dir) / "index.json").shards:
        for _, sample in read_samples(shard, lambda _, raw: decode_sample(raw)).results:
            yield sample


def _fits(task: str, sample: Sample, embodiment: str) -> bool:
    if sample.video is None or not sample.caption:
        return False
    if task in ("text_to_audio_video", "video_to_audio"):
        return sample.audio is not None
    if task == "policy":
        return sample.embodiment == embodiment and sample.actions is not None
    return True


def _request(task: str, sample: Sample, name: str, out: Path, seed: int, steps: int, guidance: float) -> dict:
    """One request line for ``task`` from ``sample``; writes its conditioning files under ``out/name``."""
    frames, fps = sample.video, float(sample.fps)
    request = {
        "name": name,
        "task": task,
        "prompt": sample.caption,
        "fps": fps,
        "resolution": [int(frames.shape[1]), int(frames.shape[2])],
        "seed": seed,
        "steps": steps,
        "solver": "euler",
        "guidance": guidance,
    }
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    if task in ("image_to_video", "policy"):
        write_png(folder / "image.png", frames[0])
        request["image"] = f"{name}/image.png"
    if task == "video_to_audio":  # the clip is as long as the given video
        np.save(folder / "video.npy", frames)
        request["video"] = f"{name}/video.npy"
    else:
        request["duration_s"] = round((frames.shape[0] - 1) / fps, 6)
    if task == "policy":
        request["embodiment"] = sample.embodiment
    return request


def export_requests(
    raw_dir: str | Path,
    out: str | Path,
    per_task: int = 1,
    steps: int = 16,
    guidance: float = 2.0,
    embodiment: str = "single_arm",
) -> Path:
    """Writes ``out/requests.jsonl`` and the conditioning files (module doc); returns the request file.
    ValueError naming the value, before anything is written, when the world has too few samples for
    a task, ``raw_dir`` is no shard set, ``out`` is it or holds files (never mixed with an earlier
    export), ``per_task`` < 1, or ``steps`` or ``guidance`` that a generation request may not have
    (``inference.requests.sampler_settings``: the bounds ``cosmos3-generate`` checks)."""
    raw_dir, out = Path(raw_dir), Path(out)
    if not (raw_dir / "index.json").is_file():
        raise ValueError(f"input {str(raw_dir)!r} is not a shard folder with an index.json")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {str(out)!r} exists and is not an empty folder; export to a new folder")
    if per_task < 1:
        raise ValueError(f"per_task={per_task} must be >= 1")
    if embodiment not in EMBODIMENT_RATES:  # was 'too few usable samples for the tasks {'policy': 1}'
        raise ValueError(f"embodiment={embodiment!r} is not one of the generated world's {sorted(EMBODIMENT_RATES)}")
    sampler_settings("euler", steps, 1.0, guidance)  # the generation path's own check, naming the field
    wanted = {task: per_task for task in TASKS}
    chosen: list[tuple[str, Sample, str]] = []
    for sample in world_samples(raw_dir):
        task = next((t for t in TASKS if wanted[t] and _fits(t, sample, embodiment)), None)
        if task is None:
            continue
        chosen.append((task, sample, f"{task}_{per_task - wanted[task]}"))
        wanted[task] -= 1
        if not any(wanted.values()):
            break
    missing = {task: n for task, n in wanted.items() if n}
    if missing:
        raise ValueError(f"{raw_dir}: too few usable samples for the tasks {missing} (requests still wanted)")
    out.mkdir(parents=True, exist_ok=True)
    lines = [_request(task, sample, name, out, i, steps, guidance) for i, (task, sample, name) in enumerate(chosen)]
    path = out / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path, help="a generated world's raw/ shard folder")
    parser.add_argument("out", type=Path, help="output folder (requests.jsonl and conditioning files)")
    parser.add_argument("--per-task", type=int, default=1, help="requests per task")
    parser.add_argument("--steps", type=int, default=16, help="denoising steps of each request")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    parser.add_argument("--embodiment", default="single_arm", help="the embodiment of the policy request")
    args = parser.parse_args(argv)
    try:
        print(export_requests(args.raw, args.out, args.per_task, args.steps, args.guidance, args.embodiment))
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
