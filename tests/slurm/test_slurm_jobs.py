"""slurm/train.sbatch on a real single-node SLURM cluster that the test starts (munged, slurmctld,
slurmd): requeued once by an administrator's ``scontrol requeue`` (SIGTERM to every process, as
SLURM's own preemption sends it) and once preempted by its time limit's warning signal (USR1 to the
batch script, as ``scancel --signal=USR1 --batch`` sends it), it resumes each time from the
checkpoint of the signal's step and ends with the losses of an uninterrupted run (docs/DESIGN.md,
"Preemption and requeue"); a real time limit's warning (slurmctld checks limits every 30 s) is sent
where nothing trains meanwhile, to a job still activating its environment; a warning while the
controller does not answer still reaches the trainers, and the requeue after it waits for a
controller that is down; TERMs repeated while they checkpoint are harmless; the preprocessing array
job writes the shards one process writes.
Skipped, with the reason, where the daemons cannot start (not root, packages missing)."""

from __future__ import annotations

import os
import re
import runpy
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_cosmos3.release.trained import load_trained_model
from megatron_cosmos3.testing.slurm_cluster import ClusterUnavailable, LocalSlurmCluster
from megatron_cosmos3.testing.training import (
    TINY_MODEL,
    TINY_SYNTHETIC,
    launch_environment,
    loss_history,
    tracking_store,
    train_on_ranks,
)
from megatron_cosmos3.training.distributed import launcher_env, slurm_port
from megatron_cosmos3.world.config import WorldConfig

REPO = Path(__file__).resolve().parents[2]
# The job trains until preempted twice (however fast the machine), then its config file is cut to a
# few steps past the second preemption: extending or shortening `steps` on resume is a researcher's
# edit, and the constant schedule keeps every step's learning rate independent of it. The reference
# then trains that many steps uninterrupted.
UNTIL_PREEMPTED = 100_000
STEPS_AFTER = 2  # attempt 3's steps: it resumes and trains on
pytestmark = pytest.mark.slow  # minutes of SLURM scheduling: start first, beside the rest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A generated world of two shards of four clips (one per data rank): raw/ and pooled latent/.
    Written in this process by ``data_pipelines/generate_world.py``'s ``write_world`` (what its
    command line runs): a new interpreter importing torch costs seconds of CPU."""
    out = tmp_path_factory.mktemp("world")
    write_world = runpy.run_path(str(REPO / "data_pipelines/generate_world.py"))["write_world"]
    widths = dict(video_latent_channels=4, audio_latent_dim=6)
    write_world(out, 8, config=WorldConfig(resolution=32, duration_s=1.0), shard_size=4, latents="pooled", **widths)
    return out


def _job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The submitter's environment: the tests' thread settings, this interpreter's venv and
    torchrun's log folder under ``tmp_path``."""
    return launch_environment(tmp_path, COSMOS3_ACTIVATE=str(Path(sys.executable).parent / "activate"), **extra)


def _store(tmp_path: Path, name: str) -> Path:
    """The run ``name``'s MLflow store, one per run (they run at the same time): a copy of an empty
    store, not a new one whose schema migrations cost seconds of CPU in each."""
    return tracking_store(tmp_path / f"{name}-tracking")


def _overrides(tmp_path: Path, world: Path, name: str) -> list[str]:
    """Every setting but ``steps`` (the job's comes from its config file)."""
    return [
        *TINY_MODEL,
        "model.vocab_size=256",  # the loader's byte tokenizer needs 256 ids
        "data_source=shards",
        f"data.datasets=[{{name: world, shards: [{world}]}}]",
        "data.stages={pretrain: {datasets: {world: 1.0}, tasks: {understanding: 1.0, text_to_video: 1.0, "
        "forward_dynamics: 1.0, policy: 1.0}}}",
        "data.packing.tokens_per_pack=384",
        "data.shuffle_buffer=8",
        "data.num_workers=1",  # loader workers: SLURM signals them too
        "log_every=1",
        "tracking.sample_steps=2",
        "optimizer.warmup_steps=1",
        "optimizer.schedule=constant",
        "checkpoint.save_every=1000",  # only the preemption checkpoints (and the last step)
        f"checkpoint.directory={tmp_path / name}",
        f"tracking.tracking_uri={_store(tmp_path, name)}",
        f"tracking.run_name={name}",
    ]


def _wait(what: str, condition, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; job log:\n{log.read_text()[-4000:] if log.exists() else '-'}")


def _steps_logged(log: Path, attempt: int) -> list[int]:
    """The training steps the given attempt logged so far."""
    text = log.read_text() if log.exists() else ""
    parts = re.split(r"=== job \d+ attempt (\d+) ", text)
    steps = []
    for number, body in zip(parts[1::2], parts[2::2]):
        if int(number) == attempt:
            steps += [int(s) for s in re.findall(r"\] step (\d+)/\d+ ", body)]
    return steps


def _requeued(cluster: LocalSlurmCluster, job_id: str, restarts: int, log: Path) -> None:
    """Waits until SLURM requeued the job ``restarts`` times (and the attempt's log is written)."""

    def requeued() -> bool:
        job = cluster.job(job_id)
        return job.restarts == restarts and job.state == "PENDING"  # the restart counts before it pends

    _wait(f"requeue {restarts}", requeued, 300, log)


def _released(cluster: LocalSlurmCluster, job_id: str) -> None:
    """Lets the requeued job start in 3 s instead of SLURM's two minutes (not in the second of the
    requeue: its credential is revoked until then)."""
    cluster.command("scontrol", "update", f"JobId={job_id}", "StartTime=now+3", check=False)  # if still pending


@pytest.mark.multiprocess
@pytest.mark.timeout(900)  # three attempts' start-ups: minutes on a busy 2-core machine
def test_sbatch_job_requeued_by_scontrol_and_preempted_by_its_time_limit_resumes_to_the_uninterrupted_losses(
    cluster, world, tmp_path
):
    world = world / "latent"
    log, job_dir = tmp_path / "job.out", tmp_path / "elsewhere"
    job_dir.mkdir()
    env = _job_env(tmp_path, NPROC_PER_NODE="2", COSMOS3_STATUS_DIR=str(tmp_path / "status"))
    steps_file = tmp_path / "steps.yaml"
    steps_file.write_text(f"steps: {UNTIL_PREEMPTED}\n")
    submitted = cluster.command(  # from another folder
        "sbatch",
        f"--output={log}",
        str(REPO / "slurm/train.sbatch"),
        "--config",
        str(steps_file),
        *_overrides(tmp_path, world, "job"),
        env=env,
        cwd=job_dir,
    )
    job_id = submitted.stdout.split()[-1]
    pool = ThreadPoolExecutor(1)
    try:
        # Attempt 1: requeued by SLURM, which sends SIGTERM to every process (SIGKILL KillWait later).
        _wait("attempt 1 to train", lambda: len(_steps_logged(log, 1)) >= 3, 400, log)
        cluster.command("scontrol", "requeue", job_id)
        _requeued(cluster, job_id, 1, log)
        _released(cluster, job_id)
        # Attempt 2: the time limit's warning, USR1 to the batch script, sent as SLURM sends it: a real
        # limit's comes at slurmctld's next check, up to 30 s of training later (a real one is
        # tested while nothing trains: test_a_time_limit_warning_before_the_trainers_start...).
        _wait("attempt 2 to train", lambda: _steps_logged(log, 2), 400, log)
        cluster.command("scancel", "--signal=USR1", "--batch", job_id)
        _requeued(cluster, job_id, 2, log)
        # Attempt 3 trains a few steps more and ends; the uninterrupted run, meanwhile (forked ranks).
        signalled = re.findall(r"preempted \((SIG\w+)\): checkpoint of step (\d+) committed", log.read_text())
        preempted = [int(step) for _, step in signalled]
        steps = max(preempted, default=0) + STEPS_AFTER
        steps_file.write_text(f"steps: {steps}\n")
        reference = pool.submit(train_on_ranks, 2, f"steps={steps}", *_overrides(tmp_path, world, "straight"))
        _released(cluster, job_id)
        _wait("the job to end", lambda: cluster.job(job_id).state in ("COMPLETED", "FAILED", "CANCELLED"), 600, log)
    finally:
        cluster.command("scancel", job_id, check=False)
        pool.shutdown(wait=False)
    text = log.read_text()
    job = cluster.job(job_id)
    assert job.state == "COMPLETED" and job.restarts == 2, text[-4000:]

    assert [signal for signal, _ in signalled] == ["SIGTERM", "SIGUSR1"], text[-4000:]
    assert 0 < preempted[0] < preempted[1], text[-4000:]
    for attempt, step in zip((1, 2), preempted):
        assert max(_steps_logged(log, attempt)) == step  # it stopped after the step it checkpointed
        assert f"resumed from {tmp_path / 'job' / f'step_{step:08d}'} at step {step}" in text
    # The script reports the requeued attempt at once: it asked SLURM to signal a job being requeued,
    # which SLURM refuses, retried in the trap for KillWait and was killed there without a word.
    assert f"attempt 1: stopped by SIGTERM at step {preempted[0]}, checkpoint committed" in text, text[-4000:]
    assert "DataLoader worker" not in text and "Traceback" not in text, text[-4000:]
    assert f"attempt 3: finished at step {steps}" in text
    # One node: every attempt's trainers meet in torchrun's store, whose port torchrun holds, not in
    # one of their own on a port torch found free and released before they bind it (EADDRINUSE).
    stores = re.findall(r"preflight: .* TORCHELASTIC_USE_AGENT_STORE=(\w+)", text)
    assert stores == ["True"] * 3, text[-4000:]

    reference.result()
    straight, job_losses = (loss_history(_store(tmp_path, name), name) for name in ("straight", "job"))
    assert job_losses == straight  # every step, bit for bit, in one MLflow run continued over attempts


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_preprocessing_array_job_writes_the_shards_of_one_process(cluster, world, tmp_path):
    args = [str(world / "raw"), "--encoder", "pooled", "--video-latent-channels", "4", "--audio-latent-dim", "6"]
    args += ["--shard-size", "3"]  # two pieces per input shard: 3 + 1 samples
    log = tmp_path / "encode-%a.out"
    submitted = cluster.command(
        "sbatch",
        "--array=0-1",
        f"--output={log}",
        str(REPO / "slurm/preprocess.sbatch"),
        args[0],
        str(tmp_path / "array"),
        *args[1:],
        env=_job_env(tmp_path),
        cwd=tmp_path,
    )
    job_id = submitted.stdout.split()[-1]
    encode_shards = runpy.run_path(str(REPO / "data_pipelines/encode_shards.py"))["main"]  # in this one process
    assert encode_shards([args[0], str(tmp_path / "one"), *args[1:]]) == 0
    logs = lambda: "\n".join(p.read_text() for p in tmp_path.glob("encode-*.out"))  # noqa: E731
    _wait("the array job", lambda: not cluster.command("squeue", "-h", "-j", job_id).stdout.strip(), 300, log)
    one, array = _files(tmp_path / "one"), _files(tmp_path / "array")
    assert sorted(one) == [
        "action_stats.json",
        "index.json",
        "latent-000000-000000.tar",
        "latent-000000-000001.tar",
        "latent-000001-000000.tar",
        "latent-000001-000001.tar",
    ], logs()
    assert array == one, logs()  # every shard and the index, byte for byte


def test_both_batch_scripts_find_a_repository_whose_path_has_spaces_when_submitted_from_elsewhere(cluster, tmp_path):
    """The scripts find their repository in ``scontrol show job``'s Command= (the submitted path and
    its arguments joined by spaces): a path with a space was cut at it, and a job submitted from
    another folder ended 'no megatron_cosmos3 repository found'. Each runs its program's --help."""
    checkout, elsewhere = tmp_path / "my checkout", tmp_path / "elsewhere"
    checkout.symlink_to(REPO)
    elsewhere.mkdir()
    env = _job_env(tmp_path, COSMOS3_STATUS_DIR=str(tmp_path / "status"))
    logs = {script: tmp_path / f"{script}.out" for script in ("train", "preprocess")}
    jobs = [
        cluster.command(
            "sbatch", f"--output={log}", str(checkout / f"slurm/{script}.sbatch"), "--help", env=env, cwd=elsewhere
        ).stdout.split()[-1]
        for script, log in logs.items()
    ]
    text = lambda: "\n".join(f"== {log.name}\n{log.read_text() if log.exists() else '-'}" for log in logs.values())  # noqa: E731
    _wait("the jobs", lambda: not cluster.command("squeue", "-h", "-j", ",".join(jobs)).stdout.strip(), 120, tmp_path)
    assert "usage: train.py" in logs["train"].read_text(), text()
    assert "usage: encode_shards.py" in logs["preprocess"].read_text(), text()


def test_a_training_job_whose_status_folder_cannot_be_made_fails_at_once_naming_it(cluster, tmp_path):
    """The folder of the attempt's outcome (COSMOS3_STATUS_DIR, default under the repository, which
    may be read-only) failed with mkdir's line alone, naming neither the variable nor the remedy."""
    (tmp_path / "a file").write_text("")
    status_dir = tmp_path / "a file" / "status"
    log = tmp_path / "job.out"
    env = _job_env(tmp_path, COSMOS3_STATUS_DIR=str(status_dir))
    job_id = cluster.command("sbatch", f"--output={log}", str(REPO / "slurm/train.sbatch"), env=env).stdout.split()[-1]
    _wait("the job to end", lambda: cluster.job(job_id).state in ("COMPLETED", "FAILED"), 60, log)
    assert cluster.job(job_id).state == "FAILED"
    assert f"COSMOS3_STATUS_DIR={status_dir}: cannot create it" in log.read_text()


def _training_until_stopped(cluster: LocalSlurmCluster, tmp_path: Path, log: Path, **environ: str) -> str:
    """Submits train.sbatch on synthetic data without end, checkpointing only when stopped, into
    ``tmp_path / "run"`` (``environ``: more of the submitter's variables); returns the job's id once
    its first step is logged."""
    args = [*TINY_MODEL, "data_source=synthetic", *TINY_SYNTHETIC, "steps=100000", "log_every=1"]
    args += ["tracking.generation_samples=false", "checkpoint.save_every=100000"]
    args += [f"checkpoint.directory={tmp_path / 'run'}", f"tracking.tracking_uri={_store(tmp_path, 'run')}"]
    env = _job_env(tmp_path, COSMOS3_STATUS_DIR=str(tmp_path / "status"), **environ)
    job_id = cluster.command(
        "sbatch", f"--output={log}", str(REPO / "slurm/train.sbatch"), *args, env=env
    ).stdout.split()[-1]
    _wait("the job to train", lambda: _steps_logged(log, 1), 120, log)
    return job_id


# How the job is stopped, the state it ends in and what the script says of the TERM: a plain scancel
# ends the job (SIGTERM to every process from SLURM, which refuses to signal it meanwhile); a TERM to
# the batch script alone leaves it running, so the script passes the TERM on.
STOPPED_BY = {
    "scancel": ((), "CANCELLED", "got SIGTERM while SLURM ends the job"),
    "scancel --batch --signal=TERM": (("--batch", "--signal=TERM"), "COMPLETED", "got SIGTERM; asking the trainers"),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("stop", list(STOPPED_BY))
def test_a_training_job_stopped_by_sigterm_checkpoints_and_is_not_requeued(cluster, tmp_path, stop):
    """A plain ``scancel`` sends SIGTERM to the script and the trainers: they checkpoint, and the
    script, reading 'preempted', requeued the job the user had cancelled (it came back, Restarts=1).
    SLURM requeues a requeued or preempted job itself; a cancelled one stays cancelled, and a new
    submission resumes from the checkpoint. A TERM to the batch script alone reaches the trainers
    through the script, and the job ends the same way, not requeued."""
    options, end_state, said = STOPPED_BY[stop]
    log = tmp_path / "job.out"
    job_id = _training_until_stopped(cluster, tmp_path, log)
    cluster.command("scancel", *options, job_id)

    def ended() -> bool:
        job = cluster.job(job_id)
        outcome = re.search(r"attempt 1: (stopped|preempted) ", log.read_text())
        return outcome is not None and (job.restarts > 0 or not cluster.command("squeue", "-h", "-j", job_id).stdout)

    _wait("the attempt's outcome", ended, 120, log)
    job, text = cluster.job(job_id), log.read_text()
    assert (job.state, job.restarts) == (end_state, 0), text[-3000:]
    step = re.search(r"preempted \(SIGTERM\): checkpoint of step (\d+) committed", text)
    assert step and (tmp_path / "run" / f"step_{int(step[1]):08d}").is_dir(), text[-3000:]
    assert f"attempt 1: stopped by SIGTERM at step {step[1]}, checkpoint committed; not requeued" in text
    assert f"attempt 1: {said}" in text, text[-3000:]


_CHECKPOINTED = r"preempted \((SIG\w+)\): checkpoint of step (\d+) committed"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children_ended(pid: int) -> bool:
    """Whether every child of ``pid`` has exited (a zombie its stopped parent has not reaped)."""
    states = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            states.append(fields[0])
    return all(state == "Z" for state in states)


def _step_ended(cluster: LocalSlurmCluster, job_id: str, script: int, log: Path) -> None:
    """Waits until the job's step is over and the controller knows it, the batch script held
    (SIGSTOP) before its requeue: a slurmstepd that cannot report the step's end tries again a
    minute later, and the job cannot end before."""
    shown_step = lambda: cluster.command("scontrol", "show", "step", f"{job_id}.0", check=False).stdout  # noqa: E731
    step_ended = lambda: f"StepId={job_id}.0 " not in shown_step()  # noqa: E731
    _wait("the step's end", lambda: _children_ended(script) and step_ended(), 60, log)


@pytest.mark.multiprocess
def test_a_time_limit_warning_while_the_controller_does_not_answer_checkpoints_and_requeues_once_it_does(
    cluster, tmp_path
):
    """The script asks the controller whether the job runs before it passes a signal on; a
    controller that does not answer (down, restarting, hung: here stopped with SIGSTOP) failed that
    question after 20 s, and the scancel that followed failed 20 s later the same way: the
    time-limit warning never reached the trainers. It goes through srun, which needs no controller:
    the trainers checkpoint while the controller is still stopped. The requeue that follows then
    finds the controller down (restarting): one failed ``scontrol requeue`` ended the job FAILED,
    its checkpoint committed and never resumed. The script retries until the controller answers; a
    second warning meanwhile (after the trainers stopped, where bash's default for USR1 ended the
    script) changes nothing, and the next attempt resumes from the checkpoint."""
    log = tmp_path / "job.out"
    job_id = _training_until_stopped(cluster, tmp_path, log)
    script = cluster.batch_script_pid(job_id)
    outage = "attempt 1: the controller does not answer the requeue (scontrol requeue: "
    try:
        with cluster.controller_unreachable():
            os.kill(script, signal.SIGUSR1)  # the warning, as slurmstepd delivers --signal=B:USR1
            found = lambda: re.search(_CHECKPOINTED, log.read_text())  # noqa: E731
            checkpointed = _wait("the checkpoint while the controller does not answer", found, 90, log)
            # The script waits here until the controller is down (its requeue comes right after the
            # step's end, which must reach the controller: a slurmstepd reports again a minute later).
            os.kill(script, signal.SIGSTOP)
        _step_ended(cluster, job_id, script, log)
        with cluster.controller_down():
            os.kill(script, signal.SIGCONT)
            tried = lambda: outage in log.read_text() or not _running(script)  # noqa: E731
            _wait("the script to find the controller down at its requeue", tried, 60, log)
            assert outage in log.read_text(), log.read_text()[-3000:]
            os.kill(script, signal.SIGUSR1)  # a late warning, while the requeue waits for the controller
            time.sleep(1)
            assert _running(script), (
                f"a SIGUSR1 after the trainers stopped ended the script:\n{log.read_text()[-3000:]}"
            )
        ended = lambda: cluster.job(job_id).state in ("PENDING", "COMPLETED", "FAILED", "CANCELLED")  # noqa: E731
        _wait("the job to be requeued", ended, 120, log)
        job = cluster.job(job_id)
        assert (job.state, job.restarts) == ("PENDING", 1), log.read_text()[-3000:]
        _released(cluster, job_id)
        signal_name, step = checkpointed.groups()
        resumed = f"resumed from {tmp_path / 'run' / f'step_{int(step):08d}'} at step {step}"
        _wait("attempt 2 to resume from the checkpoint", lambda: resumed in log.read_text(), 120, log)
    finally:
        if _running(script):
            os.kill(script, signal.SIGCONT)
        cluster.command("scancel", job_id, check=False)
    text = log.read_text()
    assert signal_name == "SIGUSR1", text[-3000:]
    assert "attempt 1: got SIGUSR1; the controller does not answer (scontrol show job: " in text, text[-3000:]
    assert f"attempt 1: preempted at step {step} (started at 0); requeueing job {job_id}" in text, text[-3000:]
    assert text.count(outage) == 1, text[-3000:]  # one line for the outage, not one a retry
    assert re.search(rf"attempt 1: job {job_id} requeued once the controller answered, \d+ s later", text), text[-3000:]


# The requeue's bound in the test: the default (600 s) would outlast the wait below.
REQUEUE_WAIT_S = 3


@pytest.mark.multiprocess
def test_a_requeue_the_controller_never_answers_gives_up_after_cosmos3_requeue_wait_s(cluster, tmp_path):
    """The requeue after a preemption retries while the controller does not answer, for at most
    ``COSMOS3_REQUEUE_WAIT_S`` (it was 600 s, fixed): with a bound of a few seconds and the controller
    down throughout, the script gives up, printing its outcome line with the reason and the bound,
    and the job ends FAILED, not requeued, its checkpoint committed."""
    log = tmp_path / "job.out"
    job_id = _training_until_stopped(cluster, tmp_path, log, COSMOS3_REQUEUE_WAIT_S=str(REQUEUE_WAIT_S))
    script = cluster.batch_script_pid(job_id)
    gave_up = re.compile(
        rf"attempt 1: the controller did not answer the requeue for (\d+) s \(COSMOS3_REQUEUE_WAIT_S={REQUEUE_WAIT_S}; "
        r"scontrol requeue: [^)]*\); not requeued: the checkpoint of step (\d+) is committed"
    )
    try:
        os.kill(script, signal.SIGUSR1)  # the time-limit warning: the trainers checkpoint and stop
        found = lambda: re.search(_CHECKPOINTED, log.read_text())  # noqa: E731
        checkpointed = _wait("the checkpoint of the warning", found, 90, log)
        os.kill(script, signal.SIGSTOP)  # held before its requeue until the controller is down
        _step_ended(cluster, job_id, script, log)
        with cluster.controller_down():
            os.kill(script, signal.SIGCONT)
            # Each failed requeue takes scontrol's ~10 s of connect retries, then 2 s of sleep.
            outcome = _wait("the requeue to give up", lambda: gave_up.search(log.read_text()), 90, log)
        _wait("the job's end", lambda: cluster.job(job_id).state in ("FAILED", "COMPLETED", "PENDING"), 180, log)
    finally:
        if _running(script):
            os.kill(script, signal.SIGCONT)
        cluster.command("scancel", job_id, check=False)
    text = log.read_text()
    waited, step = int(outcome[1]), outcome[2]
    assert REQUEUE_WAIT_S <= waited < 60, text[-3000:]
    assert step == checkpointed[2] and (tmp_path / "run" / f"step_{int(step):08d}").is_dir(), text[-3000:]
    assert f"retrying for up to {REQUEUE_WAIT_S} s (COSMOS3_REQUEUE_WAIT_S)" in text, text[-3000:]
    job = cluster.job(job_id)
    assert (job.state, job.restarts) == ("FAILED", 0), text[-3000:]


@pytest.mark.multiprocess
def test_a_second_sigterm_passed_on_while_the_trainers_checkpoint_is_harmless(cluster, tmp_path):
    """A preemption with a grace time keeps the job RUNNING after its TERM, so the script may pass a
    second TERM on while the trainers checkpoint. Here two ``scancel --batch --signal=TERM`` at once,
    each passed on by the script, and TERMs straight to the step (as the script passes them on) one
    after another until the job has ended, so that some reach the trainers during their checkpoint
    however fast it is: the checkpoint commits and loads, and the script prints the attempt's
    outcome. (Not a real preemption: SLURM 22.05's grace-time TERM reaches the job's steps but not
    the batch script, which gets its TERM only at the grace's end, with the job COMPLETING, so there
    the script never passes a second TERM on.)"""
    log = tmp_path / "job.out"
    job_id = _training_until_stopped(cluster, tmp_path, log)
    for _ in range(2):  # the second reaches the script while it passes the first on, or soon after
        cluster.command("scancel", "--batch", "--signal=TERM", job_id)
    deadline, signalled = time.monotonic() + 120, 0
    while cluster.command("squeue", "-h", "-j", job_id).stdout.strip() and time.monotonic() < deadline:
        signalled += cluster.command("scancel", "--signal=TERM", job_id, check=False).returncode == 0
    job, text = cluster.job(job_id), log.read_text()
    checkpointed = re.findall(_CHECKPOINTED, text)
    assert (job.state, job.restarts, len(checkpointed), signalled > 0) == ("COMPLETED", 0, 1, True), text[-3000:]
    assert text.count("attempt 1: got SIGTERM; asking the trainers to checkpoint and stop") == 2, text[-3000:]
    step = int(checkpointed[0][1])
    assert f"attempt 1: stopped by SIGTERM at step {step}, checkpoint committed; not requeued" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    trained = load_trained_model(tmp_path / "run")  # checked against its checksums, weights finite
    assert trained.step == step and trained.source == tmp_path / "run" / f"step_{step:08d}"


def test_a_training_job_of_several_tasks_a_node_is_refused_naming_the_option(cluster, tmp_path):
    """With --ntasks-per-node=2 the second torchrun of the node joined the first one's rendezvous as
    an idle spare: the job trained a world of NPROC_PER_NODE ranks, not the two asked for, and
    ended 'finished' after the spare's traceback."""
    log = tmp_path / "job.out"
    env = _job_env(tmp_path, COSMOS3_STATUS_DIR=str(tmp_path / "status"))
    submitted = cluster.command(
        "sbatch", "--ntasks-per-node=2", f"--output={log}", str(REPO / "slurm/train.sbatch"), env=env
    )
    job_id = submitted.stdout.split()[-1]
    _wait("the job to end", lambda: cluster.job(job_id).state in ("COMPLETED", "FAILED"), 60, log)
    assert cluster.job(job_id).state == "FAILED"
    assert "submit with --ntasks-per-node=1 (this job has SLURM_NTASKS=2 on 1 node(s))" in log.read_text()


# Each task of an srun step writes its environment, then waits until all four tasks of the two steps
# have (the steps run at once); the test derives each task's rendezvous from it (``launcher_env``,
# srun's ranks) in this process: four interpreters importing torch for it cost seconds of CPU each.
_WRITE_ENVIRONMENT = (
    'env -0 > "$0/$SLURM_STEP_ID-$SLURM_PROCID" && for _ in $(seq 600); do '
    '[ "$(ls "$0" | wc -l)" -ge 4 ] && exit 0; sleep 0.1; done; echo "the other step never ran" >&2; exit 1'
)


def _task_environment(path: Path) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in path.read_text().split("\0") if entry)


def test_two_srun_steps_of_one_job_running_at_once_derive_ports_of_their_own(cluster, tmp_path):
    """The srun ranks' port came from the job id alone: two steps of one job at once (two trainings,
    or a training beside an evaluation) met in one rendezvous. Two concurrent steps of two tasks."""
    script, log, tasks = tmp_path / "two_steps.sh", tmp_path / "job.out", tmp_path / "tasks"
    tasks.mkdir()
    step = f"srun --overlap --ntasks=2 bash -c '{_WRITE_ENVIRONMENT}' {tasks} &\n"
    script.write_text(f"#!/bin/bash\n{step}first=$!\n{step}wait $first && wait $!\n")
    job_id = cluster.command(
        "sbatch", "--ntasks=2", f"--output={log}", str(script), env=_job_env(tmp_path)
    ).stdout.split()[-1]
    _wait("the job to end", lambda: cluster.job(job_id).state in ("COMPLETED", "FAILED"), 120, log)
    text = log.read_text()
    found = {}
    for path in tasks.iterdir():
        environ = _task_environment(path)
        launcher_env(environ)
        found[environ["SLURM_STEP_ID"], environ["SLURM_PROCID"]] = int(environ["MASTER_PORT"])
    assert cluster.job(job_id).state == "COMPLETED" and sorted(found) == [
        ("0", "0"),
        ("0", "1"),
        ("1", "0"),
        ("1", "1"),
    ], text
    assert environ["SLURM_CLUSTER_NAME"] == cluster.name  # this session's: its ports are its own
    assert found["0", "0"] == found["0", "1"] == slurm_port(job_id, "0", cluster.name), found  # a step's tasks agree
    assert found["1", "0"] == found["1", "1"] == slurm_port(job_id, "1", cluster.name) != found["0", "0"], found


def test_a_time_limit_warning_before_the_trainers_start_ends_the_job_failed_saying_why(cluster, tmp_path):
    """USR1 (``--signal=B:USR1@<lead>`` with a time limit within the lead plus start-up) reached the
    batch script before it trapped the signal, whose default ended it: FAILED, without a word after
    the attempt's header. Here SLURM's own warning, while the environment activates (an activate
    script that waits for it): the limit is lowered into the lead once the job activates, and
    slurmctld sends the warning at its next time-limit check (every 30 s: PERIODIC_TIMEOUT)."""
    activating = tmp_path / "activating"
    activate = tmp_path / "activate"
    activate.write_text(
        f"source {Path(sys.executable).parent / 'activate'}\ntouch {activating}\n"
        # Bash runs the trap between two sleeps; without a warning the job fails here, before any trainer.
        "for _ in $(seq 240); do sleep 0.5; done\necho 'no time-limit warning within 120 s' >&2\nexit 3\n"
    )
    log = tmp_path / "job.out"
    env = {**_job_env(tmp_path, COSMOS3_STATUS_DIR=str(tmp_path / "status")), "COSMOS3_ACTIVATE": str(activate)}
    job_id = cluster.command(
        "sbatch", "--time=30", "--signal=B:USR1@300", f"--output={log}", str(REPO / "slurm/train.sbatch"), env=env
    ).stdout.split()[-1]
    _wait("the job to activate its environment", activating.exists, 60, log)
    cluster.command("scontrol", "update", f"JobId={job_id}", "TimeLimit=5")  # the warning, 300 s ahead, is due
    _wait("the job to end", lambda: cluster.job(job_id).state in ("COMPLETED", "FAILED", "PENDING"), 150, log)
    job, text = cluster.job(job_id), log.read_text()
    assert (job.state, job.restarts) == ("FAILED", 0), text
    assert "attempt 1: got SIGUSR1 before the trainers started; not requeued" in text
    assert "torchrun_node.sh" not in text  # no trainer started
