"""Checkpoints: atomic commit, asynchronous save, resharding across layouts, weights-only safety,
checksums."""

import copy
import enum
import io
import json
import os
import pickle
import re
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron_cosmos3.checkpoint.checkpointer import (
    Checkpointer,
    CheckpointSaveError,
    inventory,
    latest_checkpoint,
    load_state,
    read_meta,
)
from megatron_cosmos3.checkpoint.safe_reader import (
    MANIFEST,
    CheckpointCorruptError,
    UnsafeCheckpointError,
    check_sizes,
    file_record,
    verify_checkpoint,
)
from megatron_cosmos3.checkpoint.sharded_state import ShardingMeshes
from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.config import EmbodimentConfig
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.distributed import exit_status_of, run_on_ranks
from megatron_cosmos3.testing.training import tiny_mot_config

CONFIG = tiny_mot_config()
MOE_CONFIG = tiny_mot_config(num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16)


def trained_model(steps=2, config=CONFIG):
    torch.manual_seed(0)
    model = MoTModel(copy.deepcopy(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        batch, targets = add_flow_matching_noise(random_pack(CONFIG, g, 4), FlowMatchingConfig(), g)
        optimizer.zero_grad()
        mot_losses(model, batch, targets).total.backward()
        optimizer.step()
    return model, optimizer


def next_loss(model, seed=99):
    g = torch.Generator().manual_seed(seed)
    batch, targets = add_flow_matching_noise(random_pack(CONFIG, g, 4), FlowMatchingConfig(), g)
    with torch.no_grad():
        return float(mot_losses(model, batch, targets).total)


def test_async_save_commits_atomically_and_keeps_the_last_n(tmp_path):
    model, optimizer = trained_model()
    checkpointer = Checkpointer(tmp_path, keep_last=2, async_save=True)
    saved = {}
    for step in (1, 2, 3):
        saved[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        checkpointer.save(step, model, optimizer, {"rng": torch.get_rng_state()}, {"note": "x"})
        with torch.no_grad():  # training goes on while the save is written: it must not leak in
            for p in model.parameters():
                p.add_(1.0)
        if step == 1:
            assert latest_checkpoint(tmp_path) is None  # nothing is "latest" before the commit
        checkpointer.wait()
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]

    fresh, fresh_optimizer = MoTModel(copy.deepcopy(CONFIG)), None
    per_rank = {"rng": torch.empty(0, dtype=torch.uint8)}
    meta = Checkpointer(tmp_path, async_save=False).load(tmp_path / "step_00000002", fresh, fresh_optimizer, per_rank)
    assert meta["step"] == 2 and meta["note"] == "x"
    for name, p in fresh.named_parameters():
        assert torch.equal(p, saved[2][name]), name  # the values at save time, not the later ones
    assert per_rank["rng"].dtype == torch.uint8 and per_rank["rng"].numel() > 0

    # Another timeline saving step 3 again (resumed from step 2: a fallback, a fresh start, a latest
    # naming an older step) sets the intact step 3 aside instead of deleting it.
    (tmp_path / "latest").write_text("step_00000002")
    Checkpointer(tmp_path, keep_last=2, async_save=False).save(3, fresh, None, {}, {"note": "y"})
    (aside,) = (tmp_path / ".superseded").iterdir()
    assert aside.name.startswith("step_00000003.") and json.loads((aside / "meta.json").read_text())["note"] == "x"
    verify_checkpoint(aside)
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert json.loads((tmp_path / "step_00000003" / "meta.json").read_text())["note"] == "y"


def test_optimizer_state_round_trips_and_training_continues_identically(tmp_path):
    model, optimizer = trained_model()
    Checkpointer(tmp_path, async_save=False).save(2, model, optimizer, {}, {})
    torch.manual_seed(1)
    restored = MoTModel(copy.deepcopy(CONFIG))
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    Checkpointer(tmp_path, async_save=False).load(tmp_path / "step_00000002", restored, restored_optimizer)
    for m, o in ((model, optimizer), (restored, restored_optimizer)):
        g = torch.Generator().manual_seed(5)
        batch, targets = add_flow_matching_noise(random_pack(CONFIG, g, 4), FlowMatchingConfig(), g)
        o.zero_grad()
        mot_losses(m, batch, targets).total.backward()
        o.step()
    for (name, a), b in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(a, b), name


def test_a_ranks_lost_rng_entry_is_named_but_a_smaller_saving_world_drops_it(tmp_path):
    model = MoTModel(copy.deepcopy(CONFIG))
    rng = torch.get_rng_state()
    # Saved by a world of two whose rank 0 entry was lost: rank 1's is there, so rank 0 wrote one.
    Checkpointer(tmp_path / "lost", async_save=False).save(1, model, None, {}, {}, named={"rank1/rng": rng})
    with pytest.raises(CheckpointCorruptError, match=r"entry 'rank0/rng' is missing although 'rank1/rng' is saved"):
        load_state(tmp_path / "lost" / "step_00000001", model, ShardingMeshes(), per_rank={"rng": rng.clone()})
    # Control: saved by one rank and read by rank 1 of a larger world, the entry is dropped.
    Checkpointer(tmp_path / "one", async_save=False).save(1, model, None, {"rng": rng}, {})
    found = {"rng": rng.clone()}
    load_state(tmp_path / "one" / "step_00000001", model, ShardingMeshes(), per_rank=found, rank=1)
    assert found == {}
    found = {"rng": torch.empty(0, dtype=torch.uint8)}
    load_state(tmp_path / "one" / "step_00000001", model, ShardingMeshes(), per_rank=found)
    assert torch.equal(found["rng"], rng)


def test_missing_parameters_are_named_unless_declared_new(tmp_path):
    model, _ = trained_model(steps=0)
    Checkpointer(tmp_path, async_save=False).save(1, model, None, {}, {})
    grown = MoTModel(copy.deepcopy(CONFIG))
    grown.add_embodiment("quadruped", EmbodimentConfig(action_dim=12, rate_hz=20.0))
    loader = Checkpointer(tmp_path, async_save=False)
    with pytest.raises(KeyError, match="dm_streams.action_in.quadruped.weight"):
        loader.load(tmp_path / "step_00000001", grown)
    new_before = grown.dm_streams.action_in["quadruped"].weight.clone()
    loader.load(
        tmp_path / "step_00000001",
        grown,
        allow_missing=("dm_streams.action_in.quadruped.", "dm_streams.action_out.quadruped."),
    )
    assert torch.equal(grown.layers[1].generator.mlp.up_proj.weight, model.layers[1].generator.mlp.up_proj.weight)
    assert torch.equal(grown.dm_streams.action_in["quadruped"].weight, new_before)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        loader.load(tmp_path, grown)


def reseal(folder):
    """Rewrites the checksum manifest to match the folder's files: what a crafted checkpoint does."""
    names = [p.name for p in folder.iterdir() if p.name != MANIFEST]
    manifest = {"algorithm": "sha256", "files": {name: file_record(folder / name) for name in names}}
    (folder / MANIFEST).write_text(__import__("json").dumps(manifest))


class Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, ("touch " + self.marker,))


def test_metadata_that_would_run_code_is_refused(tmp_path):
    model, _ = trained_model(steps=0)
    Checkpointer(tmp_path, async_save=False).save(1, model, None, {}, {})
    folder = tmp_path / "step_00000001"
    (folder / ".metadata").write_bytes(pickle.dumps(Exploit(tmp_path / "pwned")))
    fresh = MoTModel(copy.deepcopy(CONFIG))
    with pytest.raises(CheckpointCorruptError, match=r"file \.metadata .* were written"):
        Checkpointer(tmp_path, async_save=False).load(folder, fresh)
    reseal(folder)  # checksums that match are no licence to run code
    with pytest.raises(pickle.UnpicklingError, match="refuses"):
        Checkpointer(tmp_path, async_save=False).load(folder, fresh)
    assert not (tmp_path / "pwned").exists()


class _EnumsByName(pickle.Pickler):
    """Pickles Enum members as Python 3.11.0-3.11.4 do: ``getattr(EnumClass, name)``."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


class _GetattrOnAClass:
    def __reduce__(self):
        from torch.distributed.checkpoint.metadata import Metadata

        return getattr, (Metadata, "__init__")


def test_metadata_may_name_enum_members_but_getattr_reaches_nothing_else(tmp_path):
    model, _ = trained_model(steps=0)
    Checkpointer(tmp_path, async_save=False).save(1, model, None, {}, {})
    folder = tmp_path / "step_00000001"
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    by_name = io.BytesIO()
    _EnumsByName(by_name).dump(metadata)
    assert b"getattr" in by_name.getvalue()  # the enum members really go through getattr
    (folder / ".metadata").write_bytes(by_name.getvalue())
    reseal(folder)
    restored = MoTModel(copy.deepcopy(CONFIG))
    Checkpointer(tmp_path, async_save=False).load(folder, restored)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))

    metadata.planner_data = _GetattrOnAClass()
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(folder)
    with pytest.raises(UnsafeCheckpointError, match=r"getattr\(<class .*Metadata'>, '__init__'\)"):
        Checkpointer(tmp_path, async_save=False).load(folder, MoTModel(copy.deepcopy(CONFIG)))


def test_an_item_declared_as_bytes_is_refused_and_its_payload_never_runs(tmp_path):
    """A .metadata made only of DCP's own classes may declare an item as bytes, which DCP's planner
    would torch.load without weights_only."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    model, _ = trained_model(steps=0)
    Checkpointer(tmp_path, async_save=False).save(1, model, None, {}, {})
    folder = tmp_path / "step_00000001"
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(Exploit(marker), payload)
    (folder / "__0_1.distcp").write_bytes(payload.getvalue())
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    key = "model/lm_head.weight"
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data = {i: v for i, v in metadata.storage_data.items() if i.fqn != key}
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("__0_1.distcp", 0, len(payload.getvalue()))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(folder)
    with pytest.raises(UnsafeCheckpointError, match=r"item 'model/lm_head.weight' is stored as BytesStorageMetadata"):
        Checkpointer(tmp_path, async_save=False).load(folder, MoTModel(copy.deepcopy(CONFIG)))
    assert not marker.exists()
    torch.load(folder / "__0_1.distcp", weights_only=False)  # control: a plain torch.load runs it
    assert marker.exists()


def test_a_flipped_or_cut_byte_in_any_checkpoint_file_is_caught_naming_the_file(tmp_path):
    model, optimizer = trained_model(steps=1)
    Checkpointer(tmp_path / "good", async_save=False).save(1, model, optimizer, {"rng": torch.get_rng_state()}, {})
    good = tmp_path / "good" / "step_00000001"
    verify_checkpoint(good)
    files = sorted(__import__("json").loads((good / MANIFEST).read_text())["files"])
    assert ".metadata" in files and "meta.json" in files and any(f.endswith(".distcp") for f in files)
    for name in files:
        for damage in ("flip", "cut"):
            folder = tmp_path / f"{damage}{name}"
            shutil.copytree(good, folder)
            data = bytearray((folder / name).read_bytes())
            if damage == "flip":
                data[len(data) // 2] ^= 0x01
            else:
                del data[len(data) // 2 :]
            (folder / name).write_bytes(bytes(data))
            fresh = MoTModel(copy.deepcopy(CONFIG))
            with pytest.raises(CheckpointCorruptError, match=rf"checkpoint {folder}: file {name}\b"):
                Checkpointer(tmp_path / "good", async_save=False).load(
                    folder, fresh, torch.optim.AdamW(fresh.parameters()), {"rng": torch.get_rng_state()}
                )
            with pytest.raises(CheckpointCorruptError, match=name):
                verify_checkpoint(folder)


def test_a_file_the_checksums_do_not_list_is_refused_naming_it(tmp_path):
    """A file copied into a committed step folder is never verified: DCP skips a shard its index
    does not name, while DeepSpeed's loader counts every ``*_optim_states.pt`` (tests/deepspeed);
    both engines refuse it by name, before any weight is read."""
    model, optimizer = trained_model(steps=1)
    Checkpointer(tmp_path / "run", async_save=False).save(1, model, optimizer, {}, {})
    folder = tmp_path / "run" / "step_00000001"

    def load():
        fresh = MoTModel(copy.deepcopy(CONFIG))
        Checkpointer(tmp_path / "run", async_save=False).load(folder, fresh, torch.optim.AdamW(fresh.parameters()))

    load()  # control: the folder as saved
    shard = next(folder.glob("*.distcp"))
    shutil.copyfile(shard, folder / "__9_0.distcp")  # another run's rank 9, say
    want = rf"checkpoint {folder}: file __9_0.distcp is not in its {MANIFEST}: it was added after the save"
    for check in (load, lambda: verify_checkpoint(folder), lambda: check_sizes(folder)):
        with pytest.raises(CheckpointCorruptError, match=want):
            check()


def _killed_during_an_async_save(root: Path) -> None:
    """Commits step 1, starts the asynchronous save of step 2 and hard-kills its own process while
    the background write is in flight."""
    model, optimizer = trained_model()
    checkpointer = Checkpointer(root, async_save=True)
    checkpointer.save(1, model, optimizer, {}, {})
    checkpointer.wait()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    checkpointer.save(2, model, optimizer, {}, {})  # background write in flight...
    os.kill(os.getpid(), signal.SIGKILL)  # ...and the process is hard-killed


def test_hard_kill_during_an_async_save_leaves_the_previous_checkpoint_latest(tmp_path, caplog):
    root = tmp_path / "ckpt"
    # A process of its own (forked, under the tests' numerics: its weights are compared with these).
    status, raised = exit_status_of(_killed_during_an_async_save, root)
    assert status == -signal.SIGKILL, raised
    assert latest_checkpoint(root).name == "step_00000001"
    model, _ = trained_model()
    restored = MoTModel(copy.deepcopy(CONFIG))
    partial = root / ".step_00000002.partial"
    assert partial.is_dir()
    with caplog.at_level("WARNING", logger="megatron_cosmos3.checkpoint.checkpointer"):
        Checkpointer(root, async_save=False).load(latest_checkpoint(root), restored)  # and it loads
    for (name, a), b in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(a, b), name
    assert not list(root.glob(".step_*.partial"))  # the half-written save was swept on start, in a line
    assert f"removing {partial}: a checkpoint save that never committed" in caplog.text


def test_a_save_the_disk_cannot_hold_names_the_folder_removes_it_and_keeps_the_last_checkpoint(tmp_path):
    """A real write failure: no file of this process may grow past a quarter of the checkpoint
    (RLIMIT_FSIZE, the kernel's EFBIG, as ENOSPC would come from a full disk)."""
    import resource

    from megatron_cosmos3.checkpoint.checkpointer import CheckpointSaveError

    model, optimizer = trained_model(steps=1)
    root = tmp_path / "ckpt"
    checkpointer = Checkpointer(root)
    checkpointer.save(1, model, optimizer, {}, {})
    first = checkpointer.wait()
    size = sum(f.stat().st_size for f in first.iterdir())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    quiet = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 4, hard))
    try:
        checkpointer.save(2, model, optimizer, {}, {})  # in the background
        with pytest.raises(CheckpointSaveError) as failed:
            checkpointer.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, quiet)
    assert str(failed.value).startswith(
        f"checkpoint of step 2 not saved to {root / '.step_00000002.partial'}: rank 0: "
    )
    assert "File too large" in str(failed.value) and str(failed.value).endswith(
        f"the last committed one, {first}, is kept"
    )
    assert latest_checkpoint(root) == first and not list(root.glob(".step_*.partial"))  # its space given back
    restored = MoTModel(copy.deepcopy(CONFIG))
    Checkpointer(root, async_save=False).load(first, restored)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))
    # A staging folder that cannot be made (here a file holds its name) is the same error, before any write.
    (root / ".step_00000003.partial").write_text("")
    with pytest.raises(CheckpointSaveError, match=r"checkpoint of step 3 not saved: .*step_00000003.partial could not"):
        checkpointer.save(3, model, optimizer, {}, {})


def _record_syncs_and_renames(monkeypatch) -> list[tuple[str, ...]]:
    """Records every fsync (the path of its handle) and rename, in order, until ``monkeypatch.undo``;
    the calls still go through to the kernel."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(handle):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{handle}")))
        return real_fsync(handle)

    def replace(source, target):
        events.append(("rename", str(source), str(target)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_commit_syncs_every_file_and_folder_before_the_renames_that_publish_them(tmp_path, monkeypatch):
    """meta.json, checksums.json, the folder's entries and the latest pointer were renamed into place
    unsynced: after a power loss the rename could reach the disk before them, a step_<N> (or latest)
    naming files that are empty or absent. Every fsync and rename of a real commit, in order (the
    calls go through to the kernel; the test only records them)."""
    model, optimizer = trained_model(steps=1)
    root = tmp_path / "ckpt"
    checkpointer = Checkpointer(root, async_save=False)
    events = _record_syncs_and_renames(monkeypatch)
    checkpointer.save(1, model, optimizer, {}, {})
    monkeypatch.undo()
    staging, final = str(root / ".step_00000001.partial"), str(root / "step_00000001")
    publish = events.index(("rename", staging, final))
    synced_before = {event[1] for event in events[:publish] if event[0] == "fsync"}
    for name in ("meta.json", "checksums.json", ".metadata", *(p.name for p in Path(final).glob("*.distcp"))):
        assert f"{staging}/{name}" in synced_before, (name, events)
    assert staging in synced_before  # the folder's own entries
    pointer = next(i for i, event in enumerate(events) if event[0] == "rename" and event[2] == str(root / "latest"))
    assert ("fsync", str(root)) in events[publish:pointer]  # the new step_<N> name, before latest names it
    assert events[pointer - 1][0] == "fsync" and events[pointer - 1][1].startswith(str(root / ".latest."))
    assert events[pointer + 1 :] == [("fsync", str(root))]  # latest's new content under its name
    assert (root / "latest").read_text() == "step_00000001" and not list(root.glob(".latest.*"))


def test_a_step_set_aside_is_synced_under_its_new_name_before_the_commit_takes_the_old_one(tmp_path, monkeypatch):
    """A save replacing another timeline's step folder moves it under .superseded/; that folder's
    entry reaches the disk before the commit renames the new step into the old name."""
    model, optimizer = trained_model(steps=1)
    root = tmp_path / "ckpt"
    checkpointer = Checkpointer(root, async_save=False)
    checkpointer.save(1, model, optimizer, {}, {})
    events = _record_syncs_and_renames(monkeypatch)
    checkpointer.save(1, model, optimizer, {}, {})  # another timeline's step 1 is there
    monkeypatch.undo()
    final, holder = str(root / "step_00000001"), str(root / ".superseded")
    aside = next(i for i, event in enumerate(events) if event[0] == "rename" and event[1] == final)
    publish = events.index(("rename", str(root / ".step_00000001.partial"), final))
    assert events[aside][2].startswith(holder + "/step_00000001.") and aside < publish, events
    assert ("fsync", holder) in events[aside:publish], events
    assert len(list(Path(holder).iterdir())) == 1


def test_pruning_removes_only_its_own_checkpoints_and_a_superseded_file_is_named_not_replaced(tmp_path, caplog):
    """Keep-last pruning counts and removes only step folders this code committed (meta.json of
    their step), warning once a run about each other one; a ``.superseded`` that is a user's file
    stops the save that would set a step aside under it, naming it, and stays as it was."""
    model, _ = trained_model(steps=0)
    root = tmp_path / "ckpt"
    checkpointer = Checkpointer(root, keep_last=2, async_save=False)
    user = root / "step_00000000"  # a folder a user put there
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    foreign = root / "step_00000001"  # another run's half-written save: shards, no meta.json
    foreign.mkdir()
    (foreign / "__0_0.distcp").write_bytes(b"\0" * 8)
    elsewhere = tmp_path / "elsewhere"  # a link to a checkpoint kept elsewhere
    elsewhere.mkdir()
    (elsewhere / "meta.json").write_text(json.dumps({"step": 2}))
    (root / "step_00000002").symlink_to(elsewhere)
    other_spelling = root / "step_3"  # a copy under a name no commit writes
    other_spelling.mkdir()
    (other_spelling / "meta.json").write_text(json.dumps({"step": 3}))
    with caplog.at_level("WARNING", logger="megatron_cosmos3.checkpoint.checkpointer"):
        for step in (3, 4, 5):
            checkpointer.save(step, model, None, {}, {})
    assert sorted(p.name for p in root.glob("step_*")) == [*(f"step_0000000{n}" for n in (0, 1, 2, 4, 5)), "step_3"]
    assert (user / "notes.txt").read_text() == "mine" and (elsewhere / "meta.json").is_file()
    assert f"keep-last pruning leaves {foreign} alone: not a checkpoint this code committed" in caplog.text
    # Three saves, each pruning: every foreign folder is said once a run, not at every save.
    warned = Counter(r.args[0] for r in caplog.records if "keep-last pruning leaves" in r.msg)
    assert warned == {user: 1, foreign: 1, root / "step_00000002": 1, other_spelling: 1}, warned
    assert not list(root.glob(".step_*"))  # the pruned step 3 is gone whole
    (root / ".step_00000003.removing").mkdir()  # a pruning cut short (renamed, not yet removed)...
    Checkpointer(root, async_save=False)  # ...is finished when the next attempt starts
    assert not list(root.glob(".step_*"))

    (root / ".superseded").write_text("a user's file")
    (root / "latest").write_text("step_00000004")  # another timeline saves step 5 again
    with pytest.raises(CheckpointSaveError, match=rf"{root / '.superseded'} is not a folder, but step_00000005"):
        checkpointer.save(5, model, None, {}, {"note": "again"})
    assert (root / ".superseded").read_text() == "a user's file"
    assert latest_checkpoint(root) == root / "step_00000004" and not list(root.glob(".step_*"))
    assert "note" not in json.loads((root / "step_00000005" / "meta.json").read_text())  # not replaced
    (root / ".superseded").unlink()
    (root / "latest").unlink()
    (root / "latest").mkdir()  # a pointer that cannot be replaced
    with pytest.raises(CheckpointSaveError, match=r"checkpoint of step 6 not committed .* IsADirectoryError"):
        checkpointer.save(6, model, None, {}, {})


def _save_under_tensor_parallel(rank, world_size, root):
    from megatron_cosmos3.parallel.data_parallel import build_optimizer
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel

    groups = initialize_parallel(ParallelSizes(tensor=2), CONFIG)
    try:
        reference, reference_optimizer = trained_model()
        torch.manual_seed(0)
        model = apply_tensor_parallel(MoTModel(copy.deepcopy(CONFIG)), groups)
        # Give the TP model exactly the reference's weights and optimizer state, sharded.
        from megatron_cosmos3.parallel.sharding import local_part

        optimizer = build_optimizer(model.parameters(), groups, lr=1e-2)
        ref = dict(reference.named_parameters())
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(local_part(ref[name], p, groups.tensor_rank, 2))
        for name, p in model.named_parameters():
            state = reference_optimizer.state[ref[name]]
            optimizer.state[p] = {
                k: (v if k == "step" else local_part(v, p, groups.tensor_rank, 2)).clone() for k, v in state.items()
            }
        checkpointer = Checkpointer(root, groups=groups, async_save=True)
        checkpointer.save(2, model, optimizer, {}, {})
        checkpointer.wait()
        return next_loss(model)
    finally:
        destroy_parallel()


def _load_under_data_parallel(rank, world_size, root):
    from megatron_cosmos3.parallel.data_parallel import build_optimizer
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel

    groups = initialize_parallel(ParallelSizes(), CONFIG)
    try:
        torch.manual_seed(123)
        model = MoTModel(copy.deepcopy(CONFIG))
        optimizer = build_optimizer(model.parameters(), groups, lr=1e-2)  # ZeRO over 2 data ranks
        Checkpointer(root, groups=groups).load(latest_checkpoint(root), model, optimizer)
        owned = {
            n: {k: v.clone() for k, v in optimizer.optim.state[p].items()}
            for n, p in model.named_parameters()
            if p in optimizer.optim.state
        }
        return next_loss(model), owned
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
def test_saved_with_tp2_loads_with_tp1_and_with_dp2_zero(tmp_path):
    root = str(tmp_path / "ckpt")
    tp_losses = run_on_ranks(_save_under_tensor_parallel, 2, root)
    reference, reference_optimizer = trained_model()
    want = next_loss(reference)
    assert tp_losses == pytest.approx([want, want], rel=1e-5)

    single = MoTModel(copy.deepcopy(CONFIG))  # TP=1, one process, AdamW state too
    single_optimizer = torch.optim.AdamW(single.parameters(), lr=1e-2)
    Checkpointer(root, async_save=False).load(latest_checkpoint(root), single, single_optimizer)
    for (name, a), b in zip(reference.named_parameters(), single.parameters()):
        assert torch.equal(a, b), name
        want_state, got_state = reference_optimizer.state[a], single_optimizer.state[b]
        assert want_state.keys() == got_state.keys(), name  # no state made up for never-stepped heads
        for key in want_state:
            assert torch.equal(want_state[key], got_state[key]), (name, key)
    assert next_loss(single) == want

    dp = run_on_ranks(_load_under_data_parallel, 2, root)
    assert [loss for loss, _ in dp] == [want, want]
    owned = {**dp[0][1], **dp[1][1]}
    assert dp[0][1].keys().isdisjoint(dp[1][1].keys())  # ZeRO: each parameter's state on one rank
    ref = dict(reference.named_parameters())
    assert owned.keys() == ref.keys()  # every parameter is owned by exactly one data-parallel rank
    for name, state in owned.items():
        want_state = reference_optimizer.state[ref[name]]
        assert state.keys() == want_state.keys(), name
        for key in want_state:
            assert torch.equal(state[key], want_state[key]), (name, key)


def _moe_round_trip_under_tp2_times_ep2(rank, world_size, source, target):
    from megatron_cosmos3.checkpoint.sharded_state import local_optimizers
    from megatron_cosmos3.parallel.data_parallel import build_optimizer
    from megatron_cosmos3.parallel.expert_parallel import apply_expert_parallel
    from megatron_cosmos3.parallel.sharding import local_part
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel

    groups = initialize_parallel(ParallelSizes(tensor=2, expert=2), MOE_CONFIG, MOE_CONFIG.num_experts)
    try:
        reference, reference_optimizer = trained_model(config=MOE_CONFIG)
        torch.manual_seed(123)
        model = apply_expert_parallel(apply_tensor_parallel(MoTModel(copy.deepcopy(MOE_CONFIG)), groups), groups)
        optimizer = build_optimizer(model.parameters(), groups, lr=1e-2)
        checkpointer = Checkpointer(source, groups=groups, async_save=False)
        checkpointer.load(latest_checkpoint(source), model, optimizer)
        ref = dict(reference.named_parameters())
        expert_rank = torch.distributed.get_rank(groups.expert)

        def want(name, param, value):
            return local_part(value, param, groups.tensor_rank, 2, expert_rank, 2)

        mismatched = [n for n, p in model.named_parameters() if not torch.equal(p, want(n, p, ref[n]))]
        names = {p: n for n, p in model.named_parameters()}
        for inner in local_optimizers(optimizer):
            for param, state in inner.state.items():
                name, want_state = names[param], reference_optimizer.state[ref[names[param]]]
                if state.keys() != want_state.keys():
                    mismatched.append(f"{name}: {sorted(state)} != {sorted(want_state)}")
                for key in set(state) & {"exp_avg", "exp_avg_sq"}:
                    if not torch.equal(state[key], want(name, param, want_state[key])):
                        mismatched.append(f"{name}/{key}")
        Checkpointer(target, groups=groups, async_save=False).save(3, model, optimizer, {}, {})
        return mismatched
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
def test_moe_saved_with_tp1_loads_under_tp2_times_ep2_and_back(tmp_path):
    """Experts split over FFN units (gate_up_proj: a slice of each of its gate and up halves) and over
    expert ranks describe the same global tensors as one process's, in both directions."""
    source, target = str(tmp_path / "tp1"), str(tmp_path / "tp2xep2")
    reference, reference_optimizer = trained_model(config=MOE_CONFIG)
    Checkpointer(source, async_save=False).save(2, reference, reference_optimizer, {}, {})
    for mismatched in run_on_ranks(_moe_round_trip_under_tp2_times_ep2, 4, source, target):
        assert mismatched == []
    single = MoTModel(copy.deepcopy(MOE_CONFIG))
    single_optimizer = torch.optim.AdamW(single.parameters(), lr=1e-2)
    Checkpointer(target, async_save=False).load(latest_checkpoint(target), single, single_optimizer)
    for (name, a), b in zip(reference.named_parameters(), single.parameters()):
        assert torch.equal(a, b), name
        want_state, got_state = reference_optimizer.state[a], single_optimizer.state[b]
        assert want_state.keys() == got_state.keys(), name
        for key in want_state:
            assert torch.equal(want_state[key], got_state[key]), (name, key)


def _commit_fails_on_rank_0(rank, world_size, root):
    """Rank 0 cannot write meta.json (a folder holds its name, as a full disk or a read-only file
    would refuse it) when the background save is committed; returns what each rank raised and the
    checkpoint the next save commits."""
    import time

    model, _ = trained_model(steps=0)
    checkpointer = Checkpointer(root, async_save=True)
    checkpointer.save(1, model, None, {}, {})
    if rank == 0:
        (root / ".step_00000001.partial" / "meta.json").mkdir()
    raised = None
    try:
        while checkpointer.poll() is None:
            time.sleep(0.01)
    except CheckpointSaveError as error:
        raised = str(error)
    checkpointer.save(2, model, None, {}, {})  # the ranks go on together
    return raised, checkpointer.wait().name


def _unusable_directory(rank, world_size, root):
    """What each rank raises taking the run folder's lock and starting a Checkpointer in ``root``,
    which rank 0 cannot make."""
    from megatron_cosmos3.training.run_lock import RunFolderUnwritable, lock_run_folder

    raised = []
    for start in (lambda: lock_run_folder(root, "job", rank == 0), lambda: Checkpointer(root)):
        try:
            start()
        except (RunFolderUnwritable, CheckpointSaveError) as error:
            raised.append(f"{type(error).__name__}: {error}")
    return raised


@pytest.mark.multiprocess
def test_a_commit_or_a_directory_that_fails_on_rank_0_raises_on_every_rank(tmp_path):
    """Rank 0 alone writes meta.json, the run folder's lock and the checkpoint directory: where it
    cannot, every rank raises (a rank left waiting in the next collective would be a timeout here)."""
    (tmp_path / "a_file").write_text("")
    below_a_file = tmp_path / "a_file" / "ckpt"
    for raised in run_on_ranks(_unusable_directory, 2, below_a_file, timeout_s=90):
        lock_file = below_a_file / "run.lock"
        lock_refusal = f"RunFolderUnwritable: checkpoint.directory={below_a_file}: its lock file {lock_file}"
        assert raised[0].startswith(f"{lock_refusal} cannot be written: Not a directory"), raised
        assert raised[1].startswith(f"CheckpointSaveError: checkpoint directory {below_a_file} cannot be made: "), (
            raised
        )
    root = tmp_path / "ckpt"
    results = run_on_ranks(_commit_fails_on_rank_0, 2, root, timeout_s=90)
    message = rf"^checkpoint of step 1 not committed in {root / '.step_00000001.partial'}: IsADirectoryError: "
    assert [raised is not None for raised, _ in results] == [True, True], results
    for rank, (raised, committed) in enumerate(results):
        assert re.match(message, raised), (rank, raised)
        assert raised.endswith("no checkpoint was committed before" + (" (on rank 0)" if rank else ""))
        assert committed == "step_00000002"
    assert latest_checkpoint(root) == root / "step_00000002" and not (root / "step_00000001").exists()


# meta.json rewritten (and resealed, as a crafted checkpoint is) -> what the error names.
CRAFTED_META = {
    "a JSON list": ([1], r"meta.json holds a JSON list, not an object"),
    "a step of another folder": ({"step": 7}, r"meta.json step=7 does not match its folder step_00000001 \(step 1\)"),
    "a step that is text": ({"step": "abc"}, r"meta.json step='abc': must be an int >= 0"),
    "no step": ({}, r"meta.json step=None: must be an int >= 0"),
    "a negative step": ({"step": -3}, r"meta.json step=-3"),
    "a newer format": ({"step": 1, "format_version": 99}, r"meta.json format_version=99: this code reads format"),
    "a run id that is a number": (
        {"step": 1, "mlflow_run_id": 12},
        r"meta.json mlflow_run_id=12: must be a string or null",
    ),
    "a config that is not text": ({"step": 1, "config": 5}, r"meta.json config=5: must be a string"),
}


def test_a_meta_json_that_does_not_describe_its_checkpoint_is_refused_naming_the_field(tmp_path):
    model, _ = trained_model(steps=0)
    Checkpointer(tmp_path / "good", async_save=False).save(1, model, None, {}, {"mlflow_run_id": None})
    good = tmp_path / "good" / "step_00000001"
    meta = __import__("json").loads((good / "meta.json").read_text())
    assert meta["step"] == 1 and meta["format_version"] == 1  # what is written
    for case, (document, message) in CRAFTED_META.items():
        folder = tmp_path / case / "step_00000001"
        shutil.copytree(good, folder)
        (folder / "meta.json").write_text(__import__("json").dumps(document))
        reseal(folder)
        with pytest.raises(CheckpointCorruptError, match=rf"checkpoint {folder}: {message}"):
            Checkpointer(tmp_path / "good", async_save=False).load(folder, MoTModel(copy.deepcopy(CONFIG)))


def test_a_checkpoint_of_another_model_shape_or_integer_weights_is_refused_naming_the_parameter(tmp_path):
    from torch.distributed.checkpoint.metadata import TensorProperties

    from megatron_cosmos3.checkpoint.checkpointer import CheckpointMismatchError

    model, _ = trained_model(steps=0)
    Checkpointer(tmp_path, async_save=False).save(1, model, None, {}, {})
    folder = tmp_path / "step_00000001"
    narrower = MoTModel(copy.deepcopy(tiny_mot_config(ffn_hidden_size=48)))
    shape = r"model/layers.0.reasoner.mlp.gate_proj.weight has shape \(64, 32\) there, .* gives it \(48, 32\)"
    with pytest.raises(CheckpointMismatchError, match=shape):
        Checkpointer(tmp_path, async_save=False).load(folder, narrower)
    # The index says the embedding was saved as int32 (a float width would convert, as bf16 does).
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    item = metadata.state_dict_metadata["model/embed_tokens.weight"]
    item.properties = TensorProperties(dtype=torch.int32)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(folder)
    with pytest.raises(CheckpointMismatchError, match=r"model/embed_tokens.weight is stored as torch.int32"):
        Checkpointer(tmp_path, async_save=False).load(folder, MoTModel(copy.deepcopy(CONFIG)))


def test_a_truncated_shard_or_a_missing_index_with_resealed_checksums_names_the_file(tmp_path):
    model, _ = trained_model(steps=0)
    Checkpointer(tmp_path / "good", async_save=False).save(1, model, None, {}, {})
    good = tmp_path / "good" / "step_00000001"
    cut = tmp_path / "cut" / "step_00000001"
    shutil.copytree(good, cut)
    shard = next(cut.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    reseal(cut)  # checksums of the damaged file: only the index's offsets can tell
    with pytest.raises(CheckpointCorruptError, match=rf"item '.*' lies at bytes \d+..\d+ of file {shard.name}, which"):
        Checkpointer(tmp_path / "good", async_save=False).load(cut, MoTModel(copy.deepcopy(CONFIG)))
    # An index that declares a tensor of a terabyte (the loader would allocate it before reading).
    huge = tmp_path / "huge" / "step_00000001"
    shutil.copytree(good, huge)
    metadata = pickle.loads((huge / ".metadata").read_bytes())
    metadata.state_dict_metadata["model/lm_head.weight"].size = torch.Size([2**20, 2**20])
    (huge / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(huge)
    with pytest.raises(CheckpointCorruptError, match=r"'model/lm_head.weight' declares size \(1048576, 1048576\)"):
        Checkpointer(tmp_path / "good", async_save=False).load(huge, MoTModel(copy.deepcopy(CONFIG)))
    no_index = tmp_path / "no_index" / "step_00000001"
    shutil.copytree(good, no_index)
    (no_index / ".metadata").unlink()
    (no_index / MANIFEST).unlink()  # a committed folder (meta.json) without its index: damaged, not foreign
    with pytest.raises(CheckpointCorruptError, match=r"file .metadata \(the index of every item\) is missing"):
        Checkpointer(tmp_path / "good", async_save=False).load(no_index, MoTModel(copy.deepcopy(CONFIG)))


@pytest.mark.parametrize(
    "pointer, want",
    [
        ("step_00000001", "step_00000001"),
        ("  step_00000001 \n", "step_00000001"),
        ("../outside/step_00000001", None),
        ("{root}/../outside/step_00000001", None),  # absolute
        ("step_\u00b2", None),
        ("step_00000007", None),
    ],
)
def test_latest_names_only_a_step_folder_inside_the_run_folder(tmp_path, pointer, want):
    """A crafted ``latest`` (a path out of the folder, absolute, a digit that is not ASCII) and odd
    ``step_`` names (``step_abc``, ``step_-1``, ``step_²``: int() refused that one) are never a checkpoint."""
    root, outside = tmp_path / "run", tmp_path / "outside" / "step_00000001"
    for folder in (root / "step_00000001", outside, root / "step_abc", root / "step_-1", root / "step_\u00b2"):
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text("{}")
    (root / "latest").write_text(pointer.format(root=root))
    found = inventory(root)
    assert [p.name for p in found.committed] == ["step_00000001"]
    assert (found.latest and found.latest.name) == want and (found.problem is None) == (want is not None)
    assert latest_checkpoint(root) == found.latest


AGREEMENT_TIMEOUT_S = 2


def _one_rank_misses_the_agreement(rank: int, world_size: int, root: str) -> tuple[str, float]:
    """Rank 0 waits in the checkpointer's agreement group for rank 1, which never comes (it waits
    for rank 0's word on disk, at most a minute): returns what rank 0 raised and after how long."""
    import time

    import torch.distributed as dist

    checkpointer = Checkpointer(root, async_save=False, timeout_s=AGREEMENT_TIMEOUT_S)
    done = os.path.join(root, "rank0-done")
    if rank == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
        return "", 0.0
    start = time.monotonic()
    try:
        dist.barrier(group=checkpointer._agreement)
        raised = ""
    except RuntimeError as error:
        raised = str(error)
    elapsed = time.monotonic() - start
    open(done, "w").close()
    return raised, elapsed


@pytest.mark.multiprocess
def test_the_checkpointers_groups_wait_the_configured_timeout_not_torchs_30_minutes(tmp_path):
    """Its two gloo groups took torch's default for a new group (30 minutes), not the run's
    distributed.init_timeout_s: a rank waiting in them for one that stopped elsewhere waited that long."""
    (raised, elapsed), _ = run_on_ranks(_one_rank_misses_the_agreement, 2, str(tmp_path / "ckpt"), timeout_s=120)
    assert raised and elapsed < 20, (raised, elapsed)


HOSTILE_JSON = {
    "nested past the parser": (b"[" * 100_000, r"not JSON \(nested deeper"),
    "not UTF-8": (b'{"step": 1, "files": {}}\xff', r"not UTF-8 text"),
    "an int of 5000 digits": (b'{"step": 1' + b"0" * 5000 + b"}", r"step=<an integer of 5001 digits> is not"),
    # parsers disagree on which of two values wins: json took the last one without a sign
    "a key given twice": (b'{"step": 1, "step": 2, "files": {}}', r"not JSON \(key\(s\) \['step'\] given twice\)"),
    # json read a literal past the float range as inf, and NaN (no JSON) as NaN, without a word
    "a float past the range": (b'{"step": 1, "files": {"a": {"bytes": 1e999}}}', r"files.a.bytes=1e999 is not a fin"),
    "NaN": (b'{"step": 1, "files": {}, "loss": NaN}', r"loss=NaN is not a finite number"),
}


@pytest.mark.parametrize("name", ["meta.json", MANIFEST])
@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_a_meta_json_or_manifest_that_is_not_json_is_corrupt_naming_the_file(tmp_path, name, case):
    """RecursionError, UnicodeDecodeError and the int-digits ValueError came out raw, naming no file."""
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    (folder / "meta.json").write_text('{"step": 1}')
    data, message = HOSTILE_JSON[case]
    (folder / name).write_bytes(data)
    with pytest.raises(CheckpointCorruptError, match=rf"{folder / name}: {message}"):
        read_meta(folder)


@pytest.mark.parametrize("case", sorted(HOSTILE_JSON))
def test_a_ranks_checksum_file_that_is_not_json_fails_the_commit_naming_the_file(tmp_path, case):
    """The commit merged the ranks' __<rank>_checksums.json with json.loads: a damaged one was a bare
    JSONDecodeError (or RecursionError) naming no file, and 1e999 went into the manifest as inf."""
    from megatron_cosmos3.checkpoint.safe_reader import RANK_MANIFEST_SUFFIX, write_manifest

    part = tmp_path / f"__0_{RANK_MANIFEST_SUFFIX}"
    data, message = HOSTILE_JSON[case]
    part.write_bytes(data)
    with pytest.raises(CheckpointCorruptError, match=rf"{part}: {message}"):
        write_manifest(tmp_path)
    part.write_text("[1, 2]")
    with pytest.raises(CheckpointCorruptError, match=rf"{part}: expected an object of file records, got \[1, 2\]"):
        write_manifest(tmp_path)
    part.write_text(json.dumps({"a.distcp": {"bytes": 3, "sha256": "0" * 64}}))  # control: merged
    write_manifest(tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text())["files"] == {"a.distcp": {"bytes": 3, "sha256": "0" * 64}}


@pytest.mark.parametrize(
    "files, message",
    [
        ({"../outside.bin": {"bytes": 6, "sha256": "0" * 64}}, r"files entry '../outside.bin' is not a file of"),
        ({"deepspeed/../../outside.bin": {"bytes": 6, "sha256": "0" * 64}}, r"files entry 'deepspeed/\.\./\.\./"),
        ({"{outside}": {"bytes": 6, "sha256": "0" * 64}}, r"files entry '/.*outside.bin' is not a file of"),
        ({"meta.json": 3}, r"files\['meta.json'\]=3: expected \{'bytes': an int >= 0, 'sha256': a string\}"),
        ({"meta.json": {"sha256": "0" * 64}}, r"files\['meta.json'\]=.*: expected \{'bytes'"),
        ([], r"expected an object whose 'files' is an object of file records"),
    ],
)
def test_a_manifest_is_refused_naming_an_entry_outside_the_folder_or_a_record_that_is_not_one(tmp_path, files, message):
    """The manifest decides which files are read and hashed: '../' or an absolute name had a file
    outside the checkpoint hashed (its size compared in the message); a record without 'bytes' was a KeyError."""
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    (folder / "meta.json").write_text('{"step": 1}')
    (tmp_path / "outside.bin").write_bytes(b"secret")
    if isinstance(files, dict):
        files = {name.format(outside=tmp_path / "outside.bin"): record for name, record in files.items()}
    (folder / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": files}))
    for check in (verify_checkpoint, check_sizes, read_meta):
        with pytest.raises(CheckpointCorruptError, match=rf"{folder / MANIFEST}: {message}"):
            check(folder)


def test_a_checkpoint_file_that_links_outside_the_folder_is_refused_and_a_subfolder_file_is_not(tmp_path):
    """A manifest entry that is a link to a file elsewhere had that file hashed (and read as the
    checkpoint's data); DeepSpeed's files live in a subfolder (deepspeed/...) and stay valid."""
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    (folder / "meta.json").write_text('{"step": 1}')
    reseal(folder)
    (folder / "deepspeed").mkdir()
    (folder / "deepspeed" / "model.pt").write_bytes(b"weights")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["deepspeed/model.pt"] = file_record(folder / "deepspeed" / "model.pt")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    verify_checkpoint(folder)  # control: a file in a subfolder of the checkpoint is its own
    (tmp_path / "outside.bin").write_bytes(b"weights")
    (folder / "deepspeed" / "model.pt").unlink()
    (folder / "deepspeed" / "model.pt").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(
        CheckpointCorruptError, match=rf"file deepspeed/model.pt is a link to {tmp_path / 'outside.bin'}"
    ):
        verify_checkpoint(folder)


def test_a_committed_checkpoint_without_checksums_is_corrupt_and_a_foreign_link_is_refused_without_them(tmp_path):
    """A committed folder (meta.json) whose checksums.json was lost loaded with nothing verified, a
    warning its only trace. In a folder no commit wrote (no meta.json, no checksums), nothing
    stopped DCP reading a shard that is a link to a file outside the checkpoint."""
    model, _ = trained_model(steps=0)
    Checkpointer(tmp_path / "run", async_save=False).save(1, model, None, {}, {})
    folder = tmp_path / "run" / "step_00000001"
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointCorruptError, match=rf"checkpoint {folder}: {MANIFEST} is missing, so none of its"):
        Checkpointer(tmp_path / "run", async_save=False).load(folder, MoTModel(copy.deepcopy(CONFIG)))
    (folder / "meta.json").unlink()
    shard = next(folder.glob("*.distcp"))
    shutil.move(shard, tmp_path / "elsewhere.distcp")
    shard.symlink_to(tmp_path / "elsewhere.distcp")
    with pytest.raises(CheckpointCorruptError, match=rf"file {shard.name} \(item '.*'\) is a link to .*elsewhere"):
        Checkpointer(tmp_path / "run", async_save=False).load(folder, MoTModel(copy.deepcopy(CONFIG)))
