"""Every run writes under its own folder unless told otherwise (``TrainConfig.name_run``): a job with
no overrides never resumes nor touches another job's checkpoints."""

import json
import re
from pathlib import Path

import pytest
import torch

from megatron_cosmos3.checkpoint.checkpointer import latest_checkpoint
from megatron_cosmos3.testing.training import TINY_MODEL, TINY_SYNTHETIC, tracking_store
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.config import config_from_yaml, load_config
from megatron_cosmos3.training.distributed import DistributedContext

REPO = Path(__file__).resolve().parents[2]


def _job(job_id: str) -> DistributedContext:
    return DistributedContext(0, 1, 0, torch.device("cpu"), job_id=job_id)


def test_the_demo_config_names_no_folder_so_each_job_gets_its_own():
    first, second = load_config(str(REPO / "configs/tiny_cpu.yaml")), load_config(str(REPO / "configs/tiny_cpu.yaml"))
    assert first.checkpoint.directory == "" and first.tracking.run_name == ""
    first.name_run("101")
    second.name_run("102")
    assert first.tracking.run_name == "job-101"
    assert first.checkpoint.directory == "outputs/runs/job-101/checkpoints"
    assert second.checkpoint.directory == "outputs/runs/job-102/checkpoints"
    named = load_config(None, ["tracking.run_name=ablation", "runs_root=/scratch/runs"])
    named.name_run("103")  # a given name wins over the job id
    assert named.checkpoint.directory == "/scratch/runs/ablation/checkpoints"
    explicit = load_config(None, ["checkpoint.directory=/shared/ckpt"])
    explicit.name_run("104")  # resuming another folder is this explicit setting
    assert explicit.checkpoint.directory == "/shared/ckpt" and explicit.tracking.run_name == "job-104"


@pytest.mark.parametrize("name", ["../../elsewhere", "/abs", "a/b", "..", "x" * 10_000, "nul\0byte"])
def test_a_run_name_that_is_not_one_folder_name_is_refused_where_it_names_the_folder(name):
    """The name is a folder under runs_root: '../..' or '/abs' would write outside it; 10k characters
    were an OSError when the folder was made."""
    config = load_config(None, ["runs_root=/scratch/runs"])
    config.tracking.run_name = name
    with pytest.raises(ValueError, match=r"tracking.run_name=.* names the run's folder under runs_root"):
        config.name_run("1")
    assert config.checkpoint.directory == ""
    config.checkpoint.directory = "/shared/ckpt"  # the folder named otherwise: the name is MLflow's alone
    config.name_run("1")


def test_a_tracking_store_that_is_a_folder_or_another_file_is_refused_before_training(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes, not a database")
    for store, message in [(tmp_path, "is a folder"), (tmp_path / "notes.txt", "is a file that is not an SQLite")]:
        config = load_config(None, [f"tracking.tracking_uri={store}", f"checkpoint.directory={tmp_path / 'ckpt'}"])
        with pytest.raises(ValueError, match=f"tracking.tracking_uri=.*{message}"):
            config.check_paths()
    assert (tmp_path / "notes.txt").read_text() == "my notes, not a database"
    (tmp_path / "empty.db").write_bytes(b"")  # an empty file is a new SQLite database
    load_config(None, [f"tracking.tracking_uri={tmp_path / 'empty.db'}"]).check_paths()


def test_mlflows_file_store_is_refused_before_training_unless_mlflow_allows_it(tmp_path, monkeypatch):
    """MLflow refuses its file store (file:./mlruns) unless MLFLOW_ALLOW_FILE_STORE=true: the run
    trained untracked after one warning line; now the config names the field and the way out."""
    uri = (tmp_path / "mlruns").as_uri()
    config = load_config(None, [f"tracking.tracking_uri={uri}", f"checkpoint.directory={tmp_path / 'ckpt'}"])
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(
        ValueError, match=r"tracking.tracking_uri=.* is MLflow's file store, .*MLFLOW_ALLOW_FILE_STORE=true"
    ):
        config.check_paths()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    config.check_paths()
    from megatron_cosmos3.training.tracking import MLflowTracker

    tracker = MLflowTracker(uri, "allowed", "file-store", enabled=True, retry_after_s=0)  # MLflow takes it then
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.finish()
    assert tracker.run_id is not None and (tmp_path / "mlruns").is_dir()


@pytest.mark.parametrize(
    "uri, problem",
    [
        ("http//127.0.0.1:5000", "holds '//' but no scheme"),
        ("https//mlflow.example.org", "holds '//' but no scheme"),
        ("//mlflow-host:5000", "holds '//' but no scheme"),
        ("127.0.0.1:5000", "reads as host:port without a scheme"),
        ("localhost:5000", "reads as host:port without a scheme"),
        ("mlflow-host:5000/tracking", "reads as host:port without a scheme"),
        ("[::1]:5000", "reads as host:port without a scheme"),
        ("http:/127.0.0.1:5000", "reads as host:port without a scheme"),
    ],
)
def test_a_server_address_without_its_scheme_is_refused_at_load(uri, problem):
    """Without a scheme the tracker takes the URI as a local SQLite file's path: 'http//host:5000'
    or '127.0.0.1:5000' trained against a file of that name while the server saw nothing. Refused
    at load, naming the field and the value; a run that tracks nothing takes any value."""
    with pytest.raises(ValueError, match=rf"tracking.tracking_uri={re.escape(repr(uri))} {re.escape(problem)}"):
        load_config(None, [f"tracking.tracking_uri='{uri}'"])  # quoted: YAML reads [::1] as a list
    assert load_config(None, [f"tracking.tracking_uri='{uri}'", "tracking.enabled=false"]).tracking.tracking_uri == uri


def test_local_paths_and_uris_with_a_scheme_stay_tracking_stores(tmp_path):
    """The controls: paths (one with ':' past its first part, or after './') and file:, sqlite:,
    http(s): URIs load as before."""
    for uri in [
        "outputs/mlflow.db",
        str(tmp_path / "mlflow.db"),
        str(tmp_path / "run:5000" / "mlflow.db"),
        "./host:5000.db",
        "mlflow.db",
        (tmp_path / "mlruns").as_uri(),
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "http://127.0.0.1:5000",
        "https://mlflow.example.org/tracking",
    ]:
        assert load_config(None, [f"tracking.tracking_uri={uri}"]).tracking.tracking_uri == uri


def test_a_job_without_overrides_neither_resumes_nor_touches_another_jobs_folder(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # the default runs_root and MLflow store are relative to it
    # The default store (outputs/mlflow.db) made as a copy of an empty one: a new store's schema
    # migrations cost seconds, and what this test checks is the run folders, not the store's creation.
    tracking_store(tmp_path / "outputs")
    # A relative data path (unread by synthetic packs) is recorded absolute: found from any directory.
    relative = ["data.datasets=[{name: w, shards: [shards/w], action_stats: stats/w.json}]"]
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats/w.json").write_text(json.dumps({"format_version": 2, "embodiments": {}}))
    overrides = [*TINY_MODEL, *TINY_SYNTHETIC, "steps=2", "log_every=1"]
    train_module.train(load_config(None, [*overrides, *relative]), _job("7"))
    first = tmp_path / "outputs/runs/job-7/checkpoints"
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    assert latest_checkpoint(first).name == "step_00000002"
    meta = json.loads((latest_checkpoint(first) / "meta.json").read_text())
    for recorded in (config_from_yaml(meta["config"], "meta"), load_config(str(first / "config.yaml"))):
        (dataset,) = recorded.data.datasets
        assert dataset.shards == [str(tmp_path / "shards/w")] and dataset.action_stats == str(tmp_path / "stats/w.json")
        assert recorded.checkpoint.directory == str(first) and recorded.runs_root == str(tmp_path / "outputs/runs")

    with caplog.at_level("INFO", logger="megatron_cosmos3.train"):
        train_module.train(load_config(None, overrides), _job("8"))
    assert "resumed from" not in caplog.text  # a fresh run, not job 7's continuation
    assert latest_checkpoint(tmp_path / "outputs/runs/job-8/checkpoints").name == "step_00000002"
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == before

    caplog.clear()
    with caplog.at_level("INFO", logger="megatron_cosmos3.train"):  # the control: the same job resumes
        train_module.train(load_config(None, [*overrides[:-2], "steps=3", "log_every=1"]), _job("7"))
    assert f"resumed from {Path('outputs/runs/job-7/checkpoints/step_00000002')} at step 2" in caplog.text
