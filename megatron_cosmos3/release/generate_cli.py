"""``cosmos3-generate``: videos, sounds, trajectories and text from a trained checkpoint
(docs/DESIGN.md, "Generation").

    cosmos3-generate --checkpoint outputs/demo/checkpoints --task text_to_audio_video \\
        --prompt "a red ball bounces" --duration 2 --resolution 64x64 --out generated/
    cosmos3-generate --checkpoint CKPT --requests requests.jsonl --out generated/
    torchrun --nproc-per-node 2 -m megatron_cosmos3.release.generate_cli --tensor-parallel 2 ...

One request comes from the flags, or many from a JSONL file (one object per line, keys as the flags
in snake_case; relative paths are relative to the file's folder). The checkpoint is a ``step_<N>``
folder, a checkpoint directory (its ``latest``) or a release folder, saved under any layout
(``release.trained.load_trained_model``). Every request's files go to ``OUT/<name>/`` (default
name ``NNN_<task>``) as ``inference.media_outputs.write_generated_sample`` writes them, each with
its sidecar JSON. Under ``torchrun`` every rank runs the model's part under ``--tensor-parallel``
and rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import shutil
import signal
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_cosmos3.atomic_files import (
    longest_staged_name,
    partial_folder,
    remove_stale_partial_folders,
    unwritable_reason,
)
from megatron_cosmos3.config_files import refuse_irregular_file
from megatron_cosmos3.data.determinism import seed_problem
from megatron_cosmos3.data.errors import SampleError
from megatron_cosmos3.data.latent_encoders import LatentEncoder, latent_encoder_from_config
from megatron_cosmos3.data.media import decode_image, decode_npy
from megatron_cosmos3.data.media_files import VIDEO_SUFFIXES as VIDEO_FILE_SUFFIXES
from megatron_cosmos3.data.media_files import decode_video_file
from megatron_cosmos3.data.schema import AUDIO_FIELDS, FPS_RANGE, decode_audio_file, rate_value
from megatron_cosmos3.data.vision_features import crop_to_tokens
from megatron_cosmos3.encoders.action_normalization import ActionStats, merge_action_stats
from megatron_cosmos3.inference.generation import generate
from megatron_cosmos3.inference.media_outputs import (
    GeneratedSample,
    GenerationRecord,
    check_finite,
    write_generated_sample,
)
from megatron_cosmos3.inference.requests import (
    MAX_GUIDANCE,
    GenerationRequest,
    generation_builder,
    request_fields,
    required_inputs,
)
from megatron_cosmos3.inference.solvers import MAX_STEPS, SOLVERS
from megatron_cosmos3.inference.text_generation import MAX_NEW_TOKENS, TextPrompt, TextSampling, generate_text
from megatron_cosmos3.json_files import JsonNumberError, LongInteger, loads, long_integers, unique_keys
from megatron_cosmos3.parallel.failures import RankFailedError, fail_together
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.release.trained import LOAD_ERRORS, TrainedModel, load_trained_model
from megatron_cosmos3.tasks.registry import TASK_REGISTRY
from megatron_cosmos3.training.config import MAX_TIMEOUT_S, DistributedConfig
from megatron_cosmos3.training.distributed import init_distributed

log = logging.getLogger("cosmos3-generate")

TEXT_TASKS = tuple(name for name, spec in TASK_REGISTRY.items() if not spec.dm)
VIDEO_SUFFIXES = tuple(f".{suffix}" for suffix in VIDEO_FILE_SUFFIXES)  # the shards' video files
AUDIO_FILE_SUFFIXES = tuple(field.removeprefix("audio") for field in AUDIO_FIELDS)  # the shards' audio files


class RequestError(ValueError):
    """A request that cannot be generated: names the request, the field and the value."""


# What a request may say besides its generation settings: conditioning files, text sampling, name.
INPUT_FILES = ("image", "video", "audio", "actions")
TEXT_SETTINGS = {f.name: f.default for f in fields(TextSampling)}
# GenerationRequest fields a user gives as values (its arrays come from INPUT_FILES).
SETTINGS = tuple(f.name for f in fields(GenerationRequest) if f.name not in (*INPUT_FILES, "audio_sample_rate"))
# The JSON type each value must have, read from the fields' annotations ("float | None" -> float);
# resolution has its own forms (``_resolution``).
_KINDS = {
    f.name: next(kind for kind in (str, int, float) if kind.__name__ in str(f.type))
    for f in (*fields(GenerationRequest), *fields(TextSampling))
    if f.name in (*SETTINGS, *TEXT_SETTINGS) and f.name != "resolution"
}


@dataclass
class RequestSpec:
    """One request as the user wrote it (flags or a JSONL line), files still unread.

    settings: ``GenerationRequest`` fields (task, prompt, embodiment, length, resolution, sampler) —
    for ``understanding`` the prompt is the question — and the ``TextSampling`` fields
    (max_new_tokens, temperature, top_p). files: role (``INPUT_FILES``) -> path as given, relative
    ones resolved against ``base`` (absolute: the request file's folder, or the working folder of
    the flags), so ``path`` and the sidecars' ``conditioning`` are absolute. name: the output
    subfolder.
    """

    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    base: Path = Path(".")

    @property
    def task(self) -> str:
        return self.settings["task"]

    @classmethod
    def from_mapping(cls, values: Any, where: str, base: Path = Path(".")) -> RequestSpec:
        """From a JSON object or the flags (unset ones None); unknown keys and a missing task are
        errors naming them."""
        if not isinstance(values, dict):
            raise RequestError(f"{where}: a request is a JSON object, got {type(values).__name__}")
        known = {*SETTINGS, *TEXT_SETTINGS, *INPUT_FILES, "name"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RequestError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        given = {key: value for key, value in values.items() if value is not None}
        for key, value in given.items():  # before any check formats it: int() and repr() refuse it
            if isinstance(value, LongInteger) or (
                isinstance(value, list) and any(isinstance(v, LongInteger) for v in value)
            ):
                raise RequestError(f"{where}: {key}={value!r} is not a number any setting takes")
        if "task" not in given:
            raise RequestError(f"{where}: no 'task' (one of {sorted(TASK_REGISTRY)})")
        for key, value in given.items():
            _check_kind(key, value, _KINDS.get(key, str if key in INPUT_FILES else None), where)
        if "resolution" in given:
            given["resolution"] = _resolution(given["resolution"], f"{where}: resolution")
        problem = seed_problem("seed", given.get("seed", 0))
        if problem:
            raise RequestError(f"{where}: {problem}")
        files = {role: given.pop(role) for role in INPUT_FILES if role in given}
        # Absolute now: a sidecar records where the inputs were, whatever the reader's folder.
        spec = cls(given, files, _folder_name(given.pop("name", None), where), base.absolute())
        spec.check_settings(where)
        return spec

    def check_settings(self, where: str) -> None:
        """Before any model loads: every key given is one the task reads (``request_keys``), and the
        sampler's settings (a DM task's, ``requests.sampler_settings``) or the text sampling
        (``TextSampling``) are in their ranges; RequestError naming the field (an unknown task is
        named later, with the checkpoint's tasks)."""
        if self.task not in TASK_REGISTRY:
            return
        unread = sorted({*self.settings, *self.files} - request_keys(self.task))
        if unread:  # given and silently ignored, a user believed it shaped the sample
            raise RequestError(
                f"{where}: task {self.task!r} does not read {unread}; it reads {sorted(request_keys(self.task))}"
            )
        if self.task in TEXT_TASKS:
            self.text_sampling(where)
            return
        try:
            _ = GenerationRequest(**self.generation_settings()).sampler
        except (TypeError, ValueError) as error:
            raise RequestError(f"{where}: {error}") from None

    def path(self, role: str) -> Path | None:
        return self.base / self.files[role] if role in self.files else None

    def conditioning(self) -> dict[str, str]:
        return {role: str(self.path(role)) for role in self.files}

    def generation_settings(self) -> dict[str, Any]:
        return {key: value for key, value in self.settings.items() if key in SETTINGS}

    def text_sampling(self, where: str) -> TextSampling:
        try:
            return TextSampling(**{key: v for key, v in self.settings.items() if key in TEXT_SETTINGS})
        except (TypeError, ValueError) as error:
            raise RequestError(f"{where}: {error}") from None


def request_keys(task: str) -> frozenset[str]:
    """The keys a request of ``task`` may give besides ``name`` (as the flags, in snake_case): a
    DM task's ``requests.request_fields`` (its input files among them); a text task's question
    (``prompt``), seed, ``TextSampling`` settings and, where its ViT takes one, ``image``."""
    spec = TASK_REGISTRY[task]
    if spec.dm:
        return request_fields(spec) | {"name"}
    return frozenset({"task", "prompt", "seed", "name", *TEXT_SETTINGS} | ({"image"} if spec.vit != "none" else set()))


def _check_kind(key: str, value: Any, kind: type | None, where: str) -> None:
    """RequestError naming the field unless ``value`` is a JSON value of ``kind``: a string, an
    integer (not a boolean) or a finite number (None: any, checked elsewhere); fps may also be a
    fraction "N/D"."""
    if kind is None:
        return
    if key == "fps" and isinstance(value, str):  # "30000/1001", as ffprobe writes a frame rate
        kind = str if rate_value(value) is not None else float
    if kind is str:
        ok = isinstance(value, str)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        want = {str: "a string", int: "an integer", float: "a finite number"}[kind]
        if key == "fps":
            want = "a positive number or fraction 'N/D'"
        raise RequestError(f"{where}: {key}={value!r} must be {want}")


def remove_output(path: Path) -> None:
    """Removes what an earlier run wrote at ``path``: a folder with what it holds, a file, or a link
    (only the link: never what it points to, which may lie outside the output folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def unwritable_out(out: Path) -> str | None:
    """Why files cannot be written under ``--out`` (``atomic_files.unwritable_reason``), or None: a
    read-only file system, a folder without permission or one under /proc is refused before any
    model loads (it was a traceback after generating)."""
    reason = unwritable_reason(out)
    return None if reason is None else f"--out {str(out)!r} is not a folder this run can write to ({reason})"


def write_request_folder(
    folder: Path, overwrite: bool, sample: GeneratedSample, record: GenerationRecord, decoder: LatentEncoder
) -> Path:
    """``write_generated_sample`` into a hidden folder beside ``folder``, then renamed to ``folder``:
    a run killed mid-request leaves no ``folder`` that looks generated (only a ``.<name>.<host>-<pid>.*.partial``
    folder, removed here where the interruption is an exception, by a later run where it was
    SIGKILL: ``remove_stale_partial_folders``). What an earlier request of the
    name wrote is replaced (``overwrite``) or, where another run filled ``folder`` meanwhile,
    kept and named in a RequestError."""
    staging = partial_folder(folder)
    try:
        write_generated_sample(staging, sample, record, decoder)
        if overwrite or (folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())):
            remove_output(folder)  # an empty folder, or --overwrite: replaced as a whole
        try:
            staging.rename(folder)  # refused where folder exists and holds files (or is a file)
        except OSError:
            raise RequestError(
                f"{folder} was written by another run while this one generated; this request's files are not "
                "kept: choose another --out or request name, or pass --overwrite"
            ) from None
    except BaseException:  # Ctrl-C and SIGTERM too: no half-written request is left
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _folder_name(name: Any, where: str) -> str | None:
    """A request's ``name``: one visible folder inside ``--out`` — never a path that leads out of it,
    a hidden name (the framework's partial and temporary folders start with '.': a request named
    so could be taken for one, or removed as one), a name with a control character or space at an
    end, or one too long for its partial folder's name (``atomic_files.longest_staged_name``)."""
    if name is None:
        return None
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\"):
        raise RequestError(
            f"{where}: name={name!r} must be a folder name: not empty, no '/' or '\\', not starting with '.' "
            "(the hidden partial folders' mark)"
        )
    if name != name.strip() or any(not c.isprintable() and c != " " for c in name):
        raise RequestError(f"{where}: name={name!r} must not hold control characters or begin or end with a space")
    size, longest = len(name.encode("utf-8", "surrogateescape")), longest_staged_name()
    if size > longest:  # the file system refused its partial folder's name only after generating
        raise RequestError(
            f"{where}: name={name[:20]!r}... is {size} bytes; a request's folder name has at most {longest} here "
            "(255, less what its partial folder's name adds: host, process id, .partial)"
        )
    return name


# Digits a side given as text may have: more than any picture (the clip-size check refuses far less),
# few enough that int() never meets Python's 4300-digit limit and its own error text.
_SIDE_DIGITS = 18


def _resolution(value: Any, where: str) -> tuple[int, int]:
    """'64x48', [64, 48] or (64, 48) -> (height, width): two whole numbers of pixels."""
    parts = value.lower().split("x") if isinstance(value, str) else value if isinstance(value, list) else None
    if parts is None or len(parts) != 2 or not all(_whole_number(part) for part in parts):
        raise RequestError(f"{where}={_shown(value)!r}: expected HEIGHTxWIDTH in whole pixels, e.g. 64x64")
    longest = max(len(part.strip().lstrip("+-")) if isinstance(part, str) else 0 for part in parts)
    if longest > _SIDE_DIGITS:  # int() of over 4300 digits raised Python's own ValueError, naming no field
        raise RequestError(f"{where}={_shown(value)!r}: a side of {longest} digits is no size in pixels")
    height, width = (int(part) for part in parts)
    return height, width


def _shown(value: Any) -> Any:
    """``value`` (or a list's items), a long text cut to its start and length: an error stays short."""
    if isinstance(value, list):
        return [_shown(item) for item in value]
    return f"{value[:20]}...({len(value)} characters)" if isinstance(value, str) and len(value) > 40 else value


def _whole_number(part: Any) -> bool:
    if isinstance(part, str):
        digits = part.strip().lstrip("+-")
        return digits.isascii() and digits.isdigit()
    return isinstance(part, int) and not isinstance(part, bool)


def read_input(role: str, path: Path, where: str, fps: float | None = None):
    """The conditioning input ``role`` from ``path``: image (H, W, 3) uint8; video (frames, fps or
    None; a video file's frames at ``fps`` when given, ``decode_video_file``); audio (waveform,
    sample rate); actions (N, dim) float32."""
    refuse_irregular_file(f"{where}: {role}", path, RequestError)  # a FIFO would be read without end
    data, name = path.read_bytes(), str(path)
    suffix = path.suffix.lower()
    try:
        if role == "image":
            return decode_image(data, name)
        if role == "video":
            if suffix == ".npy":
                frames = decode_npy(data, name)
                if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
                    raise RequestError(
                        f"{where}: video {name} holds {frames.dtype} {frames.shape}; want (T, H, W, 3) uint8"
                    )
                return frames, None
            if suffix in VIDEO_SUFFIXES:
                return decode_video_file(data, name, fps or 0.0)
            raise RequestError(f"{where}: video {name}: want .npy or one of {VIDEO_SUFFIXES}")
        if role == "audio":
            if suffix not in AUDIO_FILE_SUFFIXES:
                raise RequestError(f"{where}: audio {name}: want one of {AUDIO_FILE_SUFFIXES}")
            return decode_audio_file(data, name)
        actions = decode_npy(data, name)
        if actions.ndim != 2 or not np.issubdtype(actions.dtype, np.floating):
            raise RequestError(f"{where}: actions {name} holds {actions.dtype} {actions.shape}; want (N, dim) floats")
        return actions.astype(np.float32)
    except SampleError as error:
        raise RequestError(f"{where}: {error}") from None


def generation_request(spec: RequestSpec, where: str) -> GenerationRequest:
    """The sampler's request for ``spec`` with its files read: a video file's frame rate is the
    clip's unless the request gives one, and then its frames are selected at that rate, as the
    loader's ``media.fps`` does (a 1 s clip at 30 fps asked at 10 was its 30 frames at 10 fps: 3 s
    of slow motion, without a word)."""
    inputs: dict[str, Any] = {}
    asked = rate_value(spec.settings["fps"]) if "fps" in spec.settings else None
    if asked is not None and not FPS_RANGE[0] <= asked <= FPS_RANGE[1]:
        asked = None  # out of range: prepare_request names the fps (not a clip of 10**9 frames)
    for role in spec.files:
        value = read_input(role, spec.path(role), where, asked)
        if role == "video":
            inputs["video"], fps = value
            if fps and "fps" not in spec.settings:
                inputs["fps"] = fps
        elif role == "audio":
            inputs["audio"], inputs["audio_sample_rate"] = value
        else:
            inputs[role] = value
    try:
        return GenerationRequest(**spec.generation_settings(), **inputs)
    except TypeError as error:
        raise RequestError(f"{where}: {error}") from None


def merged_action_stats(trained: TrainedModel, dataset: str | None) -> ActionStats | None:
    """One embodiment -> statistics map for the builder: ``dataset``'s, or for each embodiment the
    first dataset (in config order) that has it."""
    if dataset is not None:
        if dataset not in trained.action_stats:
            raise RequestError(
                f"--action-stats {dataset!r}: no such dataset with statistics; have {sorted(trained.action_stats)}"
            )
        return trained.action_stats[dataset]
    return merge_action_stats(trained.action_stats.values())


def _trained_check(spec: RequestSpec, trained: TrainedModel, where: str) -> None:
    if spec.task not in TASK_REGISTRY:
        raise RequestError(f"{where}: unknown task {spec.task!r}; known tasks: {sorted(TASK_REGISTRY)}")
    if spec.task not in trained.tasks:
        raise RequestError(
            f"{where}: task {spec.task!r}: the checkpoint was not trained for it (trained: {sorted(trained.tasks)})"
        )


def run_requests(
    trained: TrainedModel,
    specs: list[RequestSpec],
    out: Path,
    action_stats: str | None,
    write: bool,
    overwrite: bool = False,
):
    """Generates ``specs`` (collective under a plan) and, where ``write``, writes each one's folder
    (replacing one that holds files only where ``overwrite``). Returns the folders (empty where not
    ``write``)."""
    config = trained.config
    tokenizer = trained.tokenizer()
    model = trained.model
    decoder = latent_encoder_from_config(
        config.data.encoders,
        model.config.video_latent_channels,
        model.config.audio_latent_dim,
        model.config.video_patch_size,
    )
    # Prompts are cut where training cut every text (docs/DESIGN.md, "Generation").
    max_text = config.data.packing.max_text_tokens
    stats = merged_action_stats(trained, action_stats)
    builder = generation_builder(model.config, tokenizer, decoder, stats, max_text_tokens=max_text)
    names = [spec.name or f"{i:03d}_{spec.task}" for i, spec in enumerate(specs)]
    if len({name.casefold() for name in names}) != len(names):  # "A" and "a" are one folder on some systems
        raise RequestError(f"two requests write to the same folder (letter case aside): names {names}")
    used = [
        name for name in names if (out / name).exists() and (not (out / name).is_dir() or any((out / name).iterdir()))
    ]
    if write and used and not overwrite:  # never mix a new sample's files with an earlier one's
        raise RequestError(f"{out} already holds {used}; choose another --out or request names, or pass --overwrite")
    if write:  # what a run killed here (SIGKILL) left hidden: never another live run's
        remove_stale_partial_folders(out)
    dm, text = [], []
    for i, spec in enumerate(specs):
        where = f"request {names[i]}"
        _trained_check(spec, trained, where)
        (text if spec.task in TEXT_TASKS else dm).append(i)
        length = len(tokenizer.encode(spec.settings.get("prompt", "")))
        if spec.task in TEXT_TASKS and length == 0 and "image" not in spec.files:
            # generate_text refuses a prompt of nothing, but only after the DM requests were written
            raise RequestError(f"{where}: task {spec.task!r} needs a question (prompt) or an image; it has neither")
        if length > max_text:
            log.warning(
                "%s: its prompt of %d tokens is cut to the first %d (the run's data.packing.max_text_tokens, "
                "where training cut every text)",
                where,
                length,
                max_text,
            )
    # Every input is read and every setting checked before anything is generated or written.
    requests = {i: generation_request(specs[i], f"request {names[i]}") for i in dm}
    text_inputs = {i: _text_inputs(specs[i], f"request {names[i]}") for i in text}
    folders = []
    try:
        results = (
            generate(model, [requests[i] for i in dm], builder, plan=trained.plan, trained_tasks=trained.tasks)
            if dm
            else []
        )
    except ValueError as error:
        raise RequestError(str(error)) from None
    for i, result in zip(dm, results):  # a diverged model's NaN: refused before any request is written
        try:
            check_finite(result.sample, f"request {names[i]}")
        except ValueError as error:
            raise RequestError(str(error)) from None
    answers = {}  # every answer before any request is written: a NaN answer writes nothing either
    for i in text:
        picture, sampling = text_inputs[i]
        prompt = TextPrompt(tokenizer.encode(specs[i].settings.get("prompt", ""))[:max_text], picture)
        try:
            (answers[i],) = generate_text(
                model, [prompt], sampling, seeds=specs[i].settings.get("seed", 0), tokenizer=tokenizer
            )
        except ValueError as error:
            raise RequestError(f"request {names[i]}: {error}") from None
    step = trained.step
    for i, result in zip(dm, results):
        if write:
            record = result.record(str(trained.source), step, specs[i].conditioning())
            folders.append(write_request_folder(out / names[i], overwrite, result.sample, record, decoder))
    for i in text:
        spec, generated = specs[i], answers[i]
        sampling = text_inputs[i][1]
        question, seed = spec.settings.get("prompt", ""), spec.settings.get("seed", 0)
        if write:
            record = GenerationRecord(
                spec.task,
                question,
                seed,
                "greedy" if sampling.greedy else "nucleus",
                len(generated.token_ids),
                1.0,
                str(trained.source),
                step,
                spec.conditioning(),
                {
                    "max_new_tokens": sampling.max_new_tokens,
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "stopped_at_eos": generated.stopped_at_eos,
                    "token_ids": generated.token_ids,
                },
            )
            text = GeneratedSample(text=generated.text)
            folders.append(write_request_folder(out / names[i], overwrite, text, record, decoder))
    return folders


def _text_inputs(spec: RequestSpec, where: str) -> tuple[np.ndarray | None, TextSampling]:
    """A text request's picture (or None) and sampling settings."""
    picture = read_input("image", spec.path("image"), where) if "image" in spec.files else None
    if picture is not None:
        try:  # checked with every input: the ViT's crop raised SampleError's traceback in generate_text
            crop_to_tokens(picture)
        except SampleError as error:
            raise RequestError(f"{where}: image={str(spec.path('image'))!r}: {error}") from None
    return picture, spec.text_sampling(where)


def read_requests(path: Path) -> list[RequestSpec]:
    """The requests of a UTF-8 JSONL file (a byte-order mark, blank lines and lines starting with '#'
    skipped); strict JSON: NaN/Infinity and a key given twice are errors naming the line."""
    refuse_irregular_file("--requests", path, RequestError)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise RequestError(f"--requests {str(path)!r} is not UTF-8 text ({error})") from None
    specs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            # long integers kept for from_mapping to name as the request's fields
            document = loads(line, parse_int=long_integers, object_pairs_hook=unique_keys)
        except JsonNumberError as error:  # NaN, Infinity, 1e999: named by their field
            raise RequestError(f"{where}: {error}") from None
        except (ValueError, RecursionError) as error:
            raise RequestError(f"{where}: not JSON ({error})") from None
        specs.append(RequestSpec.from_mapping(document, where, path.parent))
    if not specs:
        raise RequestError(f"--requests {str(path)!r} holds no request")
    return specs


def task_table() -> str:
    """The --help epilog: every task and what a request of it needs."""
    lines = ["tasks (and what each needs besides --prompt):"]
    for name, spec in TASK_REGISTRY.items():
        needs = required_inputs(spec) if spec.dm else ["optional --image; the prompt is the question"]
        lines.append(f"  {name:<22} {', '.join(needs) or '-'}")
    lines.append(
        textwrap.dedent(
            f"""
            flags for the inputs: image -> --image, video -> --video ({"/".join(VIDEO_SUFFIXES)} or a
            (T, H, W, 3) uint8 .npy with --fps), audio -> --audio ({"/".join(AUDIO_FILE_SUFFIXES)}),
            actions -> --actions ((N, dim) .npy, physical units), embodiment -> --embodiment,
            duration -> --duration or --num-frames (1 + 4k), resolution -> --resolution HxW (whole
            video tokens: multiples of 16 x model.video_patch_size). A task the checkpoint was not
            trained for is refused."""
        )
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmos3-generate",
        description="Generate from a trained megatron_cosmos3 checkpoint in every mode it was trained for.",
        epilog=task_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a step_<N> folder, a checkpoint directory or a release folder"
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for the outputs (one subfolder per request)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace request folders of --out that already hold files"
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", choices=sorted(TASK_REGISTRY), help="one request from the flags below")
    which.add_argument("--requests", type=Path, help="a JSONL file of requests (keys as these flags, snake_case)")
    parser.add_argument("--prompt", help="caption, instruction or question")
    parser.add_argument("--image", help="conditioning image / observation (png, jpg)")
    parser.add_argument("--video", help=f"conditioning video ({'/'.join(VIDEO_SUFFIXES)}, or .npy frames)")
    parser.add_argument("--audio", help=f"conditioning audio ({'/'.join(AUDIO_FILE_SUFFIXES)})")
    parser.add_argument("--actions", help="conditioning actions, (N, dim) .npy in physical units")
    parser.add_argument("--embodiment", help="whose actions are conditioned on or generated")
    parser.add_argument("--duration", dest="duration_s", type=float, help="clip length in seconds")
    parser.add_argument("--num-frames", type=int, help="clip length in frames (1 + 4k); wins over --duration")
    parser.add_argument(
        "--fps",
        help="frame rate, e.g. 24, 29.97 or 30000/1001 (default: the conditioning video's, else 24); a conditioning "
        "video file's frames are selected at it",
    )
    parser.add_argument(
        "--resolution",
        help="HEIGHTxWIDTH in pixels, multiples of 16 x model.video_patch_size (32 by default; default: the "
        "conditioning picture's)",
    )
    # No defaults here: a flag not given is no key of the request (the task's defaults apply), so a
    # setting the task does not read is refused only where it was given.
    parser.add_argument("--steps", type=int, help=f"denoising steps (default 8, at most {MAX_STEPS})")
    parser.add_argument("--solver", choices=SOLVERS, help="default euler")
    parser.add_argument(
        "--guidance", type=float, help=f"classifier-free guidance scale (default 1 = off, at most {MAX_GUIDANCE:g})"
    )
    parser.add_argument("--shift", type=float, help="timestep shift (default 1 = none)")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument(
        "--max-new-tokens", type=int, help=f"text: most tokens generated (default 64, at most {MAX_NEW_TOKENS})"
    )
    parser.add_argument("--temperature", type=float, help="text: 0 = greedy (the default)")
    parser.add_argument("--top-p", type=float, help="text: nucleus probability (default 1)")
    parser.add_argument("--name", help="output subfolder (default NNN_<task>)")
    parser.add_argument("--action-stats", help="the dataset whose action statistics un-normalise actions")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="under torchrun: tensor-parallel ranks")
    add_timeout_argument(parser)
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT_S:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    return value


def add_timeout_argument(parser: argparse.ArgumentParser) -> None:
    """``--timeout-s``: how long the world's rendezvous and every collective wait for a rank under
    torchrun. A flag, not the checkpoint's ``distributed.init_timeout_s``: the world starts before
    the checkpoint is read (a release folder is verified whole when it is), and the value training
    chose suits its own cluster and step, not necessarily the one generating."""
    default = DistributedConfig.init_timeout_s
    parser.add_argument(
        "--timeout-s",
        type=_seconds,
        default=default,
        help=f"under torchrun: seconds the start and every collective wait for a rank (default {default:g}, "
        "training's default distributed.init_timeout_s; torch's own would be 30 minutes)",
    )


def specs_from_args(args: argparse.Namespace) -> list[RequestSpec]:
    """The requests of ``--requests``, or the one of the flags; RequestError where a request's flag
    is given with ``--requests``: it was ignored without a word (``--steps 50`` generated at 8)."""
    known = {*SETTINGS, *TEXT_SETTINGS, *INPUT_FILES, "name"}
    flags = {key: value for key, value in vars(args).items() if key in known}
    if args.requests is not None:
        given = sorted(key for key, value in flags.items() if value is not None)
        if given:
            raise RequestError(
                f"--requests {str(args.requests)!r}: the flags of one request {given} are not read with a "
                "request file; give them as keys of each request's line"
            )
        return read_requests(args.requests)
    return [RequestSpec.from_mapping(flags, "the flags")]


@contextlib.contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """Inside, SIGTERM (a scheduler's stop, torchrun ending its workers) raises SystemExit(143) as
    Ctrl-C raises KeyboardInterrupt, so the cleanup of an interrupted run happens (a request's
    partial folder removed, the process group destroyed): Python's default ended the process on
    the spot. The earlier handler is restored on the way out; off the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with stopped_by_sigterm():
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():  # found after generating, it was a traceback
        print(f"cosmos3-generate: error: --out {str(args.out)!r} is not a folder", file=sys.stderr)
        return 2
    problem = unwritable_out(args.out)
    if problem is not None:
        print(f"cosmos3-generate: error: {problem}", file=sys.stderr)
        return 2
    ctx = init_distributed(args.timeout_s)
    try:
        # Every rank reads, loads and generates with the same collectives: a rank failing alone (its
        # own read of a file, an error of its own) ends every rank, each naming it.
        with fail_together("reading, loading and generating"):
            specs = specs_from_args(args)
            parallel = ParallelSizes(tensor=args.tensor_parallel)
            trained = load_trained_model(
                args.checkpoint, device=ctx.device, parallel=parallel, timeout_s=args.timeout_s
            )
            folders = run_requests(
                trained, specs, args.out, args.action_stats, write=ctx.is_main, overwrite=args.overwrite
            )
    except RankFailedError as error:  # another rank's failure: its own output says more
        print(f"cosmos3-generate: error: {error}", file=sys.stderr)
        return 1
    except (RequestError, *LOAD_ERRORS, ValueError) as error:  # bad requests, inputs or checkpoints
        print(f"cosmos3-generate: error: {error}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    for folder in folders:
        log.info("wrote %s", folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
