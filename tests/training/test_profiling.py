"""Profiling a window of training steps (training/profiling.py; docs/DESIGN.md, "Profiling")."""

import gzip
import io
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.mlflow_server import start_server, stop_server
from megatron_cosmos3.testing.ports import free_port
from megatron_cosmos3.testing.training import TINY_MODEL, TINY_SYNTHETIC, tracking_store, train_on_ranks
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.batches import MicroBatches
from megatron_cosmos3.training.config import ProfilingConfig, load_config
from megatron_cosmos3.training.distributed import DistributedContext
from megatron_cosmos3.training.profiling import StepProfiler, check_profiling

REPO = Path(__file__).resolve().parents[2]
CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# The phases the trainer marks (the data parallel run has a gradient reduction to finish).
REGIONS = {"data", "forward", "backward", "finish_gradients", "optimizer", "checkpoint"}


def overrides(tmp_path, name, *extra):
    return [
        *TINY_MODEL,
        *TINY_SYNTHETIC,
        "steps=4",
        "checkpoint.save_every=3",  # a save inside the window (step 3) and at the end
        "tracking.generation_samples=false",
        f"checkpoint.directory={tmp_path / name}",
        f"tracking.tracking_uri={tracking_store(tmp_path)}",
        f"tracking.run_name={name}",
        "profiling.enabled=true",
        "profiling.start_step=2",
        "profiling.steps=2",
        *extra,
    ]


def trace_events(path) -> list[dict]:
    with gzip.open(path, "rt") as file:
        return json.load(file)["traceEvents"]


def profiler_steps(events) -> list[str]:
    return sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_trace_exactly_the_window_with_the_trainers_regions_and_rank_0_logs_every_ranks_trace(tmp_path):
    """Against a real MLflow server: rank 0 alone holds the run, and logged its own trace only (rank
    1's stayed on disk); the ranks meet at the window's end and rank 0 logs both, byte for byte."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        train_on_ranks(2, *overrides(tmp_path, "run", "profiling.ranks=[0,1]", f"tracking.tracking_uri={url}"))
        client = MlflowClient(tracking_uri=url)
        (run,) = client.search_runs(client.get_experiment_by_name("megatron_cosmos3").experiment_id)
        logged = [a.path for a in client.list_artifacts(run.info.run_id, "profiles")]
        downloaded = Path(client.download_artifacts(run.info.run_id, "profiles", str(tmp_path / "downloaded")))
    finally:
        stop_server(server)
    assert run.info.status == "FINISHED"
    folder = tmp_path / "run" / "profiles"
    names = ["rank0_step2-3.json.gz", "rank1_step2-3.json.gz"]
    assert sorted(p.name for p in folder.iterdir()) == names
    for rank in (0, 1):
        events = trace_events(folder / f"rank{rank}_step2-3.json.gz")
        assert profiler_steps(events) == ["ProfilerStep#2", "ProfilerStep#3"]  # steps 2 and 3, as the logs count
        names_seen = {e.get("name") for e in events}
        assert REGIONS <= names_seen, REGIONS - names_seen
    assert sorted(logged) == [f"profiles/{name}" for name in names]
    for name in names:
        assert (downloaded / name).read_bytes() == (folder / name).read_bytes()


def _trace_in_a_folder_of_its_own_node(rank: int, world_size: int, root: str) -> tuple[list[str], str]:
    """Each rank in a working folder of its own, tracing into the relative folder ``profiles``: what
    nodes without a shared disk see. Rank 0 returns what its tracker logged and its warnings."""
    from megatron_cosmos3.training.tracking import MLflowTracker

    node = Path(root) / f"node{rank}"
    node.mkdir()
    os.chdir(node)
    tracker = MLflowTracker(str(tracking_store(Path(root))), "profiles", "nodes", enabled=rank == 0)
    config = ProfilingConfig(enabled=True, start_step=2, steps=2, ranks=[0, 1])
    said = io.StringIO()
    logging.getLogger("megatron_cosmos3.training.profiling").addHandler(logging.StreamHandler(said))
    run_steps(StepProfiler(config, rank, torch.device("cpu"), Path("profiles"), 0, tracker, world_size), 4)
    tracker.finish()
    if rank != 0:
        return [], ""
    client = MlflowClient(tracking_uri=tracker.uri)
    return [a.path for a in client.list_artifacts(tracker.run_id, "profiles")], said.getvalue()


def test_a_rank_whose_trace_rank_0_cannot_read_is_named_in_a_warning(tmp_path):
    """profiling.folder on a disk of rank 1's node alone (here a relative folder under another working
    folder): rank 0 is told the file's name but does not find it; a warning names it, and rank 0's
    own trace is logged."""
    (logged, said), _ = run_on_ranks(_trace_in_a_folder_of_its_own_node, 2, str(tmp_path), timeout_s=120)
    assert logged == ["profiles/rank0_step2-3.json.gz"]
    assert "rank 1's profiles/rank1_step2-3.json.gz is not in rank 0's folder; not logged to MLflow" in said, said
    assert (tmp_path / "node1" / "profiles" / "rank1_step2-3.json.gz").is_file()


def test_an_error_inside_the_window_stops_the_profiler_writes_the_steps_recorded_and_is_not_masked(
    tmp_path, monkeypatch
):
    real = MicroBatches.get

    def failing_in_step_3(self, step, micro):
        if step == 2:
            raise RuntimeError("the loader broke in step 3")
        return real(self, step, micro)

    monkeypatch.setattr(MicroBatches, "get", failing_in_step_3)
    config = load_config(None, overrides(tmp_path, "cut"))
    with pytest.raises(RuntimeError, match="the loader broke in step 3"):
        train_module.train(config, CPU)
    folder = tmp_path / "cut" / "profiles"
    # Named by the steps it holds (step 3 up to the error) and marked: it was the whole window's name.
    assert [p.name for p in folder.iterdir()] == ["rank0_step2-3_partial.json.gz"]  # no temporary file left
    traced = trace_events(folder / "rank0_step2-3_partial.json.gz")
    assert profiler_steps(traced) == ["ProfilerStep#2", "ProfilerStep#3"]
    # The profiler is closed: a later one in this process traces its own window, whole.
    run_steps(StepProfiler(config.profiling, 0, torch.device("cpu"), tmp_path / "next", 0), 4)
    assert [p.name for p in (tmp_path / "next").iterdir()] == ["rank0_step2-3.json.gz"]


def test_a_window_left_after_a_whole_step_is_named_by_the_steps_it_holds(tmp_path):
    """Preemption stops after a step's checkpoint, before the profiler steps on: a window of steps
    2..4 left after step 2 holds step 2 alone (it was named rank0_step2-4)."""
    config = ProfilingConfig(enabled=True, start_step=2, steps=3)
    with pytest.raises(train_module.Preempted):
        with StepProfiler(config, 0, torch.device("cpu"), tmp_path / "profiles", 0) as profiler:
            for step in (1, 2):
                with torch.profiler.record_function("forward"):
                    torch.ones(4, 4).sum()
                if step == 2:
                    raise train_module.Preempted(2, 0)  # as train._stop_for_preemption, after the checkpoint
                profiler.step_done()
    assert [p.name for p in (tmp_path / "profiles").iterdir()] == ["rank0_step2-2_partial.json.gz"]
    assert profiler_steps(trace_events(tmp_path / "profiles" / "rank0_step2-2_partial.json.gz")) == ["ProfilerStep#2"]


def test_a_resume_before_the_window_traces_its_steps_by_their_numbers_and_one_into_it_does_not(tmp_path):
    def attempt(steps, *extra):  # the same run folder each time: each attempt resumes the last one's checkpoint
        train_module.train(load_config(None, overrides(tmp_path, "resumed", f"steps={steps}", *extra)), CPU)

    attempt(1, "profiling.enabled=false")  # a window past a run's steps is refused
    folder = tmp_path / "resumed" / "profiles"
    assert not folder.exists()
    attempt(4)  # resumes at step 2
    assert [p.name for p in folder.iterdir()] == ["rank0_step2-3.json.gz"]
    assert profiler_steps(trace_events(folder / "rank0_step2-3.json.gz")) == ["ProfilerStep#2", "ProfilerStep#3"]
    (folder / "rank0_step2-3.json.gz").unlink()
    attempt(6)  # resumes at step 5, past the window
    assert list(folder.iterdir()) == []


def run_steps(profiler: StepProfiler, steps: int) -> None:
    with profiler:
        for _ in range(steps):
            with torch.profiler.record_function("forward"):
                torch.ones(4, 4).sum()
            profiler.step_done()


@pytest.mark.parametrize(
    "change, rank, done_steps",
    [
        ({"enabled": False}, 0, 0),  # profiling off
        ({"ranks": [1]}, 0, 0),  # this rank is not listed
        ({}, 0, 2),  # a resume at step 3, after the window's first step (2)
        ({}, 0, 4),  # a resume past the window
    ],
)
def test_no_trace_where_profiling_is_off_the_rank_is_not_listed_or_the_attempt_starts_after_the_window(
    tmp_path, change, rank, done_steps
):
    config = ProfilingConfig(**{"enabled": True, "start_step": 2, "steps": 2, **change})
    run_steps(StepProfiler(config, rank, torch.device("cpu"), tmp_path / "profiles", done_steps), 6 - done_steps)
    assert not (tmp_path / "profiles").exists()
    # control: the same loop traces where the rank is listed and the attempt starts before the window
    listed = ProfilingConfig(enabled=True, start_step=2, steps=2, ranks=[rank])
    run_steps(StepProfiler(listed, rank, torch.device("cpu"), tmp_path / "control", 1), 5)
    assert [p.name for p in (tmp_path / "control").iterdir()] == [f"rank{rank}_step2-3.json.gz"]
    traced = trace_events(tmp_path / "control" / f"rank{rank}_step2-3.json.gz")
    assert profiler_steps(traced) == ["ProfilerStep#2", "ProfilerStep#3"]


@pytest.mark.parametrize(
    "setting, message",
    [
        ("profiling.start_step=0", r"profiling.start_step=0 must be >= 1"),
        ("profiling.steps=0", r"profiling.steps=0 must be >= 1"),
        ("profiling.ranks=[]", r"profiling.ranks=\[\] names no rank"),
        ("profiling.ranks=[0,0]", r"profiling.ranks=\[0, 0\] must be distinct global ranks >= 0"),
        ("profiling.ranks=[-1]", r"profiling.ranks=\[-1\] must be distinct"),
        ("profiling.start_step=9", r"profiling: start_step=9 and steps=3 trace up to step 11, past the run's steps=10"),
    ],
)
def test_bad_profiling_settings_are_refused_by_name(setting, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["steps=10", "profiling.enabled=true", setting])


def test_ranks_outside_the_world_and_a_memory_snapshot_without_cuda_are_refused_before_any_group():
    with pytest.raises(ValueError, match=r"profiling.ranks=\[0, 2\]: \[2\] not among this run's 2 ranks"):
        check_profiling(ProfilingConfig(enabled=True, ranks=[0, 2]), 2, torch.device("cpu"))
    snapshot = ProfilingConfig(enabled=True, memory_snapshot=True)
    with pytest.raises(ValueError, match=r"profiling.memory_snapshot=true records CUDA's allocator.*'cpu'"):
        check_profiling(snapshot, 1, torch.device("cpu"))
    check_profiling(ProfilingConfig(enabled=False, ranks=[5], memory_snapshot=True), 1, torch.device("cpu"))  # off


def test_the_profiling_layer_of_configs_turns_it_on_over_the_demo_config():
    config = load_config([str(REPO / "configs/tiny_cpu.yaml"), str(REPO / "configs/profiling.yaml")])
    assert config.profiling.enabled and (config.profiling.start_step, config.profiling.last_step) == (10, 12)
    assert not load_config(str(REPO / "configs/tiny_cpu.yaml")).profiling.enabled  # off unless asked


def test_a_trace_that_cannot_be_written_is_a_warning_naming_it_and_the_steps_go_on(tmp_path, caplog):
    """A diagnostic never stops a run: a full disk, or here a file where the folder should be."""
    (tmp_path / "profiles").write_text("not a folder")
    config = ProfilingConfig(enabled=True, start_step=1, steps=1)
    with caplog.at_level(logging.WARNING, logger="megatron_cosmos3.training.profiling"):
        run_steps(StepProfiler(config, 0, torch.device("cpu"), tmp_path / "profiles", 0), 3)
    assert f"could not write {tmp_path / 'profiles' / 'rank0_step1-1.json.gz'}" in caplog.text
    assert (tmp_path / "profiles").read_text() == "not a folder"
