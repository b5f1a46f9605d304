"""What a person looks at after an evaluation (docs/DESIGN.md, "Evaluation"): per case, the
prediction beside the truth.

``OUT/<task>/<case>/``: ``side_by_side.mp4`` — predicted frames left, true frames right (a task that
generates no frames, video->audio, shows the clip on both sides); its sound is stereo, the left ear
the predicted sound (or the truth's where none is generated) and the right ear the true one.
Action tasks add ``actions.npz`` (predicted, true), understanding writes ``answer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_cosmos3.data.media_writers import write_mp4
from megatron_cosmos3.eval_suite.cases import Case
from megatron_cosmos3.eval_suite.predictions import Prediction
from megatron_cosmos3.world.sound import SAMPLE_RATE


def side_by_side(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) frames of both, predicted left | true right; the shorter one holds its last frame."""
    n = max(len(predicted), len(true))
    hold = lambda frames: np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), axis=0)])  # noqa: E731
    return np.concatenate([hold(predicted), hold(true)], axis=2)


def _ears(predicted: np.ndarray | None, true: np.ndarray) -> np.ndarray:
    """(2, n): the predicted sound's mix left, the true one's right (the truth on both without one)."""
    left = true if predicted is None else predicted
    n = min(left.shape[1], true.shape[1])
    return np.stack([left[:, :n].mean(axis=0), true[:, :n].mean(axis=0)]).astype(np.float32)


def write_case_media(out: str | Path, case: Case, prediction: Prediction) -> Path:
    """Writes one case's files under ``out/<task>/<case name>/`` (module doc); returns the folder."""
    folder = Path(out) / case.task / case.name
    folder.mkdir(parents=True, exist_ok=True)
    true, fps = case.frames, float(case.sample.fps)
    if case.task == "understanding":
        answer = {"question": case.sample.question, "predicted": prediction.text, "true": case.sample.answer}
        (folder / "answer.json").write_text(json.dumps(answer, indent=2))
        return folder
    predicted = prediction.frames if prediction.frames is not None else true
    if case.task == "video_to_audio":
        predicted = true
    sound = _ears(prediction.audio, case.sample.audio.astype(np.float32)) if case.sample.audio is not None else None
    write_mp4(folder / "side_by_side.mp4", side_by_side(predicted, true), fps, sound, SAMPLE_RATE)
    if prediction.actions is not None:
        np.savez(folder / "actions.npz", predicted=prediction.actions, true=case.sample.actions)
    return folder


def write_media(out: str | Path, cases: dict[str, list[Case]], predictions: dict[str, list[Prediction]]) -> list[Path]:
    """Every case's files (``write_case_media``); returns the folders."""
    return [
        write_case_media(out, case, prediction)
        for task, found in cases.items()
        for case, prediction in zip(found, predictions[task])
    ]
