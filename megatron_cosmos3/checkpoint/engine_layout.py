"""Which engine and layout wrote a checkpoint folder, read from its file names and a small JSON
record before anything is loaded (docs/DESIGN.md, "The DeepSpeed engine"): a folder that this engine
or layout cannot load is a ``CheckpointLayoutError`` naming what wrote it and what would load it,
instead of DeepSpeed's or torch.distributed.checkpoint's error halfway through a load (or a load
that goes through with the wrong tensors). Nothing here unpickles a file or imports DeepSpeed.

An ``engine=deepspeed`` checkpoint keeps DeepSpeed's own files in ``step_<N>/deepspeed/`` and the
layout they were written under in ``step_<N>/deepspeed_layout.json``: the ZeRO stage, the number of
ranks ZeRO partitioned over, and the optimizer's parameter groups (each group's hyperparameters
and the names of its parameters, in the order of DeepSpeed's flat partitions). A checkpoint saved
before that record existed is read from DeepSpeed's file names: one optimizer file per ZeRO rank,
and per-rank model files under ZeRO-3 only (so stages 1 and 2 are told apart from 3, not from each
other). The stage and world size say whether DeepSpeed's own loader reads the files
(``reads_own_files``) or the DeepSpeed engine reassembles them.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_cosmos3.checkpoint.safe_reader import check_file, read_manifest
from megatron_cosmos3.json_files import read_json

DEEPSPEED_FOLDER = "deepspeed"  # DeepSpeed's own files: step_<N>/deepspeed/ (its checkpoint "tag")
LAYOUT_FILE = "deepspeed_layout.json"  # beside it: the stage, world size and parameter groups
# DeepSpeed's names: one optimizer file per ZeRO rank; a model file per rank under ZeRO-3 only.
_OPTIMIZER_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
_ZERO3_MODEL_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"
# ds_to_universal's output: a folder with zero/<parameter>/fp32.pt, and latest_universal beside it.
UNIVERSAL_FOLDER, UNIVERSAL_LATEST = "zero", "latest_universal"
CONVERTER = "python -m megatron_cosmos3.training.deepspeed_engine"  # convert_checkpoint's command
# Stages whose optimizer files are interchangeable: ZeRO-1 and ZeRO-2 write the same flat fp32
# partitions and AdamW state (DeepSpeed's one DeepSpeedZeroOptimizer); ZeRO-3 writes its own.
_SAME_FILES = ({1, 2}, {3})


class CheckpointLayoutError(ValueError):
    """A checkpoint that this engine or layout cannot load (written by the other engine, with other
    parameter groups, or by DeepSpeed's universal checkpoint converter): names the folder, what
    wrote it, what this run is, and what would load it."""


@dataclass(frozen=True)
class SavedLayout:
    """What wrote a checkpoint folder. ``zero_stage``: 1, 2 or 3; None for a stage 1 or 2 that only
    DeepSpeed's file names describe (they are the same for both), and for ``engine=megatron``.
    ``world_size``: the ranks ZeRO partitioned over. ``param_groups``: the optimizer's groups as
    ``parameter_groups_record`` gives them, or None when the checkpoint does not record them."""

    engine: str
    zero_stage: int | None = None
    world_size: int | None = None
    param_groups: list[dict] | None = None

    def describe(self) -> str:
        if self.engine != "deepspeed":
            return f"engine={self.engine}"
        stage = f"ZeRO-{self.zero_stage}" if self.zero_stage is not None else "ZeRO-1 or ZeRO-2"
        return f"engine=deepspeed ({stage} on {self.world_size} rank{'s' if self.world_size != 1 else ''})"


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """Whether the checkpoint folder ``path`` was written by ``engine=deepspeed``."""
    return (Path(path) / DEEPSPEED_FOLDER).is_dir()


def refuse_foreign(path: str | Path) -> None:
    """CheckpointLayoutError naming ``path`` if it is (or holds, one folder down) the output of
    DeepSpeed's ``ds_to_universal``, or DeepSpeed's own files without the step folder around them:
    layouts neither engine reads."""
    path = Path(path)
    if (path / UNIVERSAL_LATEST).is_file():
        found = path / UNIVERSAL_LATEST
    else:
        candidates = [path, *(p for p in sorted(path.iterdir()) if p.is_dir())] if path.is_dir() else []
        found = next((p / UNIVERSAL_FOLDER for p in candidates if (p / UNIVERSAL_FOLDER).is_dir()), None)
    if found is not None:
        raise CheckpointLayoutError(
            f"{path} is a DeepSpeed universal checkpoint ({found}, written by ds_to_universal), which this project "
            "does not load: give the step_<N> folder it was made from (an engine=deepspeed checkpoint resumes "
            f"under any ZeRO stage and world size; `{CONVERTER}` converts it to the Megatron-style layout)"
        )
    if any(_OPTIMIZER_FILE.fullmatch(p.name) or p.name.endswith("model_states.pt") for p in _files(path)):
        raise CheckpointLayoutError(
            f"{path} holds DeepSpeed's own files, not a checkpoint folder of this project: give the step_<N> "
            f"folder whose {DEEPSPEED_FOLDER}/ subfolder it is (meta.json, checksums and trainer state are there)"
        )


def saved_layout(path: str | Path) -> SavedLayout:
    """What wrote the checkpoint folder ``path`` (see the module docstring). CheckpointLayoutError
    for the layouts ``refuse_foreign`` names, and for a record that is not what ``write_layout``
    writes (naming it); ``CheckpointCorruptError`` for a record that does not match its checksum."""
    path = Path(path)
    refuse_foreign(path)
    if not is_deepspeed_checkpoint(path):
        return SavedLayout("megatron")
    record_file = path / LAYOUT_FILE
    if record_file.is_file():  # damaged since the save: a CheckpointCorruptError (a resume may fall back)
        check_file(path, LAYOUT_FILE, read_manifest(path), "ZeRO stage, world size, parameter groups")
        record = read_json(record_file, CheckpointLayoutError)
        return _layout_of_record(record, record_file)
    files = [p.name for p in _files(path / DEEPSPEED_FOLDER)]
    ranks = {int(m.group(1)) for m in map(_OPTIMIZER_FILE.fullmatch, files) if m}
    stage = 3 if _ZERO3_MODEL_FILE in files else None
    return SavedLayout("deepspeed", stage, len(ranks) or None)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []


def _layout_of_record(record, record_file: Path) -> SavedLayout:
    problem = None
    if not isinstance(record, dict):
        problem = f"holds a JSON {type(record).__name__}, not an object"
    elif record.get("zero_stage") not in (1, 2, 3) or type(record.get("zero_stage")) is not int:
        problem = f"zero_stage={record.get('zero_stage')!r}: must be 1, 2 or 3"
    elif type(record.get("world_size")) is not int or record["world_size"] < 1:
        problem = f"world_size={record.get('world_size')!r}: must be an int >= 1"
    elif not _groups_well_formed(record.get("param_groups")):
        problem = "param_groups: must be a list of objects with a list of parameter names under 'params'"
    if problem:
        raise CheckpointLayoutError(f"{record_file} {problem}")
    return SavedLayout("deepspeed", record["zero_stage"], record["world_size"], record["param_groups"])


def _groups_well_formed(groups) -> bool:
    return isinstance(groups, list) and all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and all(isinstance(n, str) for n in g["params"])
        for g in groups
    )


def write_layout(folder: str | Path, zero_stage: int, world_size: int, param_groups: list[dict]) -> Path:
    """Writes ``deepspeed_layout.json`` into the (staging) checkpoint folder ``folder``; returns it."""
    record = {"zero_stage": zero_stage, "world_size": world_size, "param_groups": param_groups}
    path = Path(folder) / LAYOUT_FILE
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def check_engine(path: str | Path, engine: str) -> SavedLayout:
    """CheckpointLayoutError unless the checkpoint folder ``path`` is one that ``engine`` resumes
    from with its whole training state: ``engine=megatron`` refuses DeepSpeed's files (its reader
    is torch.distributed.checkpoint's); ``engine=deepspeed`` takes either (the Megatron-style one is
    the engine switch). Returns the saved layout."""
    saved = saved_layout(path)
    if engine == "megatron" and saved.engine == "deepspeed":
        raise CheckpointLayoutError(
            f"checkpoint {path} was written by {saved.describe()}, and this run has engine=megatron: resume it "
            f"with engine=deepspeed, or convert it to the Megatron-style layout first (`{CONVERTER} --config FILE "
            f"{path} TARGET_DIR` under torchrun, on any number of ranks); stage.init_from reads its weights in both "
            "engines"
        )
    return saved


def reads_own_files(saved: SavedLayout, zero_stage: int, world_size: int) -> bool:
    """Whether DeepSpeed's own loader reads the optimizer files of ``saved`` into an engine of
    ``zero_stage`` on ``world_size`` ranks: the same number of ranks (DeepSpeed partitions its fp32
    masters and AdamW state per rank: another number would read the wrong slices) and the same
    files (ZeRO-1 and ZeRO-2 read each other's; ZeRO-3's hold other partitions). Otherwise the
    DeepSpeed engine reassembles the partitions into whole tensors and partitions them anew
    (docs/DESIGN.md, "The DeepSpeed engine")."""
    if saved.world_size != world_size:
        return False
    saved_family = next(s for s in _SAME_FILES if (saved.zero_stage or 1) in s)
    return zero_stage in saved_family


def check_same_parameter_groups(path: str | Path, saved: list[dict] | None, current: list[dict]) -> None:
    """CheckpointLayoutError naming the first difference between the optimizer's parameter groups
    the checkpoint ``path`` was saved with (``saved``; None: not recorded, nothing to compare) and
    this run's (``current``), both as ``parameter_groups_record`` gives them: a parameter trained
    there and frozen here (or the other way), one moved to another group, a group's hyperparameter
    (weight decay, betas, learning-rate multiplier) changed. DeepSpeed's optimizer files hold each
    group's parameters as one flat partition and its hyperparameters as saved, so such a load would
    put moments on the wrong parameters or silently keep the old values."""
    if saved is None:
        return
    where = f"checkpoint {path} was saved with other optimizer parameter groups than this run's"
    way_out = (
        "start a new stage from its weights (stage.init_from), or convert it to the Megatron-style layout "
        f"(`{CONVERTER}` with the config it was saved with), which resumes with the new groups"
    )
    trained_then = {name: i for i, group in enumerate(saved) for name in group["params"]}
    trained_now = {name: i for i, group in enumerate(current) for name in group["params"]}
    for name in sorted(trained_then.keys() ^ trained_now.keys()):
        then, now = ("trained", "frozen") if name in trained_then else ("frozen", "trained")
        count = len(trained_then.keys() ^ trained_now.keys())
        more = f" (and {count - 1} more parameters)" if count > 1 else ""
        raise CheckpointLayoutError(f"{where}: parameter {name!r} was {then} there and is {now} now{more}; {way_out}")
    for name in sorted(trained_now):
        if trained_then[name] != trained_now[name]:
            then, now = saved[trained_then[name]], current[trained_now[name]]
            raise CheckpointLayoutError(
                f"{where}: parameter {name!r} was in group {trained_then[name]} (lr_multiplier="
                f"{then.get('lr_multiplier')}) there and is in group {trained_now[name]} (lr_multiplier="
                f"{now.get('lr_multiplier')}) now; {way_out}"
            )
    if len(saved) != len(current):
        raise CheckpointLayoutError(f"{where}: {len(saved)} groups there, {len(current)} now; {way_out}")
    for i, (then, now) in enumerate(zip(saved, current)):
        if then["params"] != now["params"]:
            pairs = itertools.zip_longest(then["params"], now["params"])
            first = next(m if m is not None else n for n, m in pairs if n != m)
            raise CheckpointLayoutError(
                f"{where}: group {i} holds its parameters in another order or grouping (first: {first!r}); {way_out}"
            )
        for key in sorted((then.keys() | now.keys()) - {"params"}):
            if then.get(key) != now.get(key):
                raise CheckpointLayoutError(
                    f"{where}: group {i} has {key}={then.get(key)!r} there and {key}={now.get(key)!r} now; {way_out}"
                )
