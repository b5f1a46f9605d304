"""The main job for real: torchrun with 2 gloo processes, MLflow run, committed checkpoint, resume."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cosmos3.testing.media_probe import ffprobe_streams
from megatron_cosmos3.testing.training import torchrun_trainer
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.samples import trained_dm_tasks

REPO = Path(__file__).resolve().parents[2]


def run_trainer(tmp_path: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """The README's main job (configs/tiny_cpu.yaml on generated-world shards), shortened."""
    world = tmp_path / "world"
    if not (world / "latent" / "index.json").exists():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "data_pipelines/generate_world.py"),
                str(world),
                "--samples",
                "16",
                "--shard-size",
                "4",
                "--resolution",
                "32",
                "--latents",
                "pooled",
                "--video-format",  # as launch/train_demo.sh: mp4 with its sound, latents from the decoded mp4
                "mp4",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return torchrun_trainer(
        tmp_path,
        nproc,
        "--config",
        str(REPO / "configs/tiny_cpu.yaml"),
        f"data.datasets=[{{name: world, shards: [{world / 'latent'}]}}]",
        # The generation samples' held-out packs: the same small world here, no held-out loss.
        f"eval.datasets=[{{name: heldout, shards: [{world / 'latent'}]}}]",
        "eval.every=0",
        "data.packing.tokens_per_pack=768",
        f"checkpoint.directory={tmp_path / 'ckpt'}",
        f"tracking.tracking_uri={tmp_path / 'mlflow.db'}",
        "log_every=2",
        "tracking.sample_steps=2",
        "checkpoint.save_every=2",
        *overrides,
    )


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_training_logs_to_mlflow_checkpoints_and_resumes(tmp_path):
    first = run_trainer(tmp_path, "steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert list((tmp_path / "torchrun").iterdir())  # torchrun's run folder, in the test's, not in /tmp
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    assert latest == "step_00000004"
    meta = json.loads((tmp_path / "ckpt" / latest / "meta.json").read_text())
    assert meta["step"] == 4 and "hidden_size: 96" in meta["config"]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_00000002", "step_00000004"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(meta["mlflow_run_id"])
    assert run.data.params["model.hidden_size"] == "96"
    assert run.data.params["data_source"] == "shards"
    assert run.data.params["data.packing.tokens_per_pack"] == "768"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    # At each save, the held-out samples as media (pooled latents decoded), one folder per task.
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/step_00000002", "samples/step_00000004"]
    tasks = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run.info.run_id, samples[-1])}
    # Every task the stage trains with DM targets has its sample, however few the first packs hold.
    assert tasks == set(trained_dm_tasks(load_config(str(REPO / "configs/tiny_cpu.yaml")))), tasks
    local = Path(client.download_artifacts(run.info.run_id, samples[-1], str(tmp_path / "downloaded")))
    videos = list(local.glob("*/video.mp4"))
    assert videos and all(int(ffprobe_streams(v)["video"]["nb_read_frames"]) > 1 for v in videos)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4]
    assert {"loss/ce", "loss/fm", "grad_norm", "lr", "throughput/tokens_per_s", "data/samples_used"} <= set(
        run.data.metrics
    )
    # The step-time breakdown, per step, as the log line shows it.
    phases = ("data_wait", "forward_backward", "optimizer", "checkpoint")
    assert {f"time/{phase}_s" for phase in phases} | {"time/data_wait_share"} <= set(run.data.metrics)
    assert run.data.metrics["time/forward_backward_s"] > 0
    assert re.search(r"step 4/4 .* \(data [\d.]+  fwd\+bwd [\d.]+  optim [\d.]+  ckpt [\d.]+\)", first.stderr)
    # What an operator reads: the resolved config named once (saved with the run), no library chatter.
    assert first.stderr.count("resolved config in") == 1 and (tmp_path / "ckpt" / "config.yaml").is_file()
    assert "Detected Megatron Core" not in first.stderr and "ce nan" not in first.stderr
    assert "Creating initial MLflow database tables" not in first.stderr + first.stdout

    # Resume: the next launch continues from step 4 in the same MLflow run.
    second = run_trainer(tmp_path, "steps=6")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "at step 4" in second.stderr
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_00000006"


def test_invalid_config_fails_before_any_process_group(monkeypatch):
    from megatron_cosmos3.training import train as train_module

    monkeypatch.setattr(train_module, "init_distributed", lambda *_: pytest.fail("a process group was started"))
    with pytest.raises(ValueError, match="num_attention_heads=4 must be a multiple of num_kv_heads=3"):
        train_module.main(["--config", str(REPO / "configs/tiny_cpu.yaml"), "model.num_kv_heads=3"])
    with pytest.raises(Exception, match="lrr"):
        train_module.main(["optimizer.lrr=1"])


@pytest.mark.parametrize(
    "argv, message",
    [
        # OmegaConf's ConfigKeyError (a KeyError) and ConfigTypeError went past the command's
        # ValueError/OSError as tracebacks.
        (["stepz=3"], "the overrides: ConfigKeyError: Key 'stepz' not in 'TrainConfig'. Did you mean"),
        (["optimizer.betas=[[0.9],0.95]"], "optimizer.betas[0]: a list where a number belongs"),
        # OmegaConf's ValidationError and the YAML parser add indented lines of their own
        (["steps=abc"], "the overrides: ValidationError: Value 'abc' of type 'str' could not be converted to Integer"),
        (["model.mrope_section=[4,2"], "the overrides: 'model.mrope_section=[4,2' is not key=<YAML value>: while"),
        (["--config", "{tmp}/twice.yaml"], "{tmp}/twice.yaml: ConstructorError: while constructing a mapping in"),
        # read without end: a hang; a folder or a dangling link, a traceback naming no option
        (["--config", "{tmp}/pipe.yaml"], "--config='{tmp}/pipe.yaml': not a regular file (a FIFO)"),
        (["--config", "{tmp}"], "--config='{tmp}': not a regular file (a folder)"),
        (["--config", "{tmp}/link.yaml"], "--config='{tmp}/link.yaml': not a regular file (a dangling symbolic link"),
        # /proc takes no folder, as a read-only file system takes no file: the run lock's OSError was a
        # traceback from every rank, after the process group had started
        (
            ["checkpoint.directory=/proc/cosmos3-test/checkpoints"],
            "checkpoint.directory='/proc/cosmos3-test/checkpoints' is not a folder this run can write to",
        ),
        # The outcome line was written after the last step: an OSError traceback there, no outcome read.
        (["--status-file", "{tmp}"], "--status-file '{tmp}' is a folder, not a file"),
        (["--status-file", "/proc/cosmos3-test/status"], "--status-file '/proc/cosmos3-test/status': no file can"),
        # Out of memory building the first pack; data.packing was not checked at all with synthetic data.
        (["synthetic.samples_per_pack=100000000"], "synthetic.samples_per_pack=100000000 samples of at least 4"),
        (["synthetic.scale=100000000"], "(synthetic.scale=100000000) do not fit data.packing.tokens_per_pack=4096"),
        (["data.packing.max_samples_per_pack=4"], "above data.packing.max_samples_per_pack=4"),
        (["data.packing.max_text_tokens=0"], "data.packing.max_text_tokens=0 must be >= 1"),
        (["data.encoders.dtype=float7"], "encoders.dtype='float7'; expected one of"),  # the samples' encoders
        (["data.tokenizer.path={tmp}"], "data: tokenizer.path='{tmp}' holds no tokenizer.json"),
        # An OverflowError traceback (timedelta) where the process group started.
        (["distributed.init_timeout_s=1e300"], "distributed.init_timeout_s=1e+300 must be in (0, 86400] seconds"),
    ],
)
@pytest.mark.timeout(30)
def test_the_console_command_names_a_bad_override_or_config_path_in_one_line(
    monkeypatch, capsys, tmp_path, argv, message
):
    from megatron_cosmos3.training import train as train_module

    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "link.yaml").symlink_to("gone.yaml")
    (tmp_path / "twice.yaml").write_text("steps: 1\nsteps: 2\n")
    argv, message = [a.format(tmp=tmp_path) for a in argv], message.format(tmp=tmp_path)

    monkeypatch.setattr(train_module, "init_distributed", lambda *_: pytest.fail("a process group was started"))
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    assert train_module.cli([*argv, "data_source=synthetic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cosmos3-train: error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "overrides, message, locked",
    [
        (["precision=fp8", "model.linear_impl=te"], "precision='fp8' runs Transformer Engine's fp8 matmuls", False),
        (["profiling.enabled=true", "profiling.ranks=[0,3]"], "profiling.ranks=[0, 3]: [3] not among", False),
        (
            ["profiling.enabled=true", "profiling.memory_snapshot=true"],
            "profiling.memory_snapshot=true records CUDA's",
            False,
        ),
        (["model.num_layers=1024", "model.hidden_size=16384", "model.vision=null"], "GiB available", False),
        # Another trainer's lock on the checkpoint folder (RunFolderLocked): it was a traceback.
        ([], "ckpt is in use by another trainer: pid {pid} on host", True),
    ],
)
@pytest.mark.timeout(60)
def test_the_console_command_names_a_start_up_refusal_of_this_machine_in_one_line(
    monkeypatch, capsys, tmp_path, overrides, message, locked
):
    """The checks ``build_run`` makes of the machine (precision, profiling, host memory) and the run
    folder's lock were a traceback on every rank: now the config errors' one line (``_refused``:
    rank 0's) and status 2."""
    from megatron_cosmos3.training import train as train_module
    from megatron_cosmos3.training.run_lock import RunFolderLock

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    argv = ["--config", str(REPO / "configs/tiny_cpu.yaml"), "data_source=synthetic", "tracking.enabled=false"]
    holder = RunFolderLock(tmp_path / "ckpt", job_id="job-17")
    if locked:
        holder.acquire()  # a real second holder: this process, as another trainer's lock names it
    try:
        assert train_module.cli([*argv, f"checkpoint.directory={tmp_path / 'ckpt'}", *overrides]) == 2
    finally:
        holder.release()
    message = message.format(pid=os.getpid())
    err = capsys.readouterr().err
    assert err.startswith("cosmos3-train: error: ") and err.count("\n") == 1 and message in err, err
    # Control: a ValueError once the model is built (a freeze pattern matching nothing) stays raised.
    with pytest.raises(ValueError, match="stage.freeze pattern 'layer.\\*' matches no parameter"):
        train_module.cli([*argv, f"checkpoint.directory={tmp_path / 'other'}", "stage.freeze=[layer.*]"])


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
@pytest.mark.parametrize("rank", ["0", "1"])
def test_the_console_command_names_a_config_error_in_one_line_and_exits_2(monkeypatch, capsys, rank, launcher):
    """``cosmos3-train`` (``train.cli``): no traceback, status 2 on every rank, the line from rank 0
    (srun's tasks have no RANK: their SLURM_PROCID says which is rank 0)."""
    from megatron_cosmos3.training import train as train_module

    monkeypatch.setattr(train_module, "init_distributed", lambda *_: pytest.fail("a process group was started"))
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    if launcher == "torchrun":
        monkeypatch.setenv("RANK", rank)
    else:
        monkeypatch.setenv("SLURM_PROCID", rank)
        monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert train_module.cli(["--config", str(REPO / "configs/tiny_cpu.yaml"), "model.num_kv_heads=3"]) == 2
    err = capsys.readouterr().err
    if rank == "0":
        assert err.startswith("cosmos3-train: error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert "num_attention_heads=4 must be a multiple of num_kv_heads=3" in err
    else:
        assert err == ""
    # A --config file that is not there is the same one line (it was FileNotFoundError's traceback).
    assert train_module.cli(["--config", str(REPO / "configs/no_such.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"cosmos3-train: error: --config={str(REPO / 'configs/no_such.yaml')!r}: missing (no such file)\n"
        if rank == "0"
        else ""
    )
