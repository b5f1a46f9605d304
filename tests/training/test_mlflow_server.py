"""A real MLflow tracking server on 127.0.0.1 receives the run; stopping it mid-run stops nothing; what is
logged before it is up is delivered once it answers; a stalled server (SIGSTOP) stalls no step, and what
a SIGKILLed attempt had not delivered reaches the same run through the spool it wrote ahead; a batch
answered after the request's timeout is sent again and kept once. Restarted on its store, the server
gets what a tracker kept through the outage in the same attempt, and the trainer's next attempt
delivers the spool the outage left to the same run before its own steps."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_cosmos3.testing.mlflow_server import (
    SERVER_START_LIMIT_S,
    batch_on_the_wire,
    resume,
    server_store,
    stalled,
    start_server,
    stop_server,
)
from megatron_cosmos3.testing.ports import free_port
from megatron_cosmos3.testing.training import (
    TINY_MODEL,
    TINY_SYNTHETIC,
    launch_environment,
    tracked_run,
    unlaunched_trainer_command,
)

REPO = Path(__file__).resolve().parents[2]
TINY = [
    *TINY_MODEL,
    *TINY_SYNTHETIC,
    "log_every=1",
    "checkpoint.save_every=1000",
]


# A step logs in well under this, whatever the server does (the old tracker waited for the request
# timeout, seconds, on the training thread).
STEP_WAIT_LIMIT_S = 0.2


def steps_do_not_wait_on_a_stalled_server(server: subprocess.Popen, url: str, store: Path) -> None:
    from mlflow.tracking import MlflowClient

    from megatron_cosmos3.training.tracking import MLflowTracker

    tracker = MLflowTracker(url, "stalled", "slow-server", enabled=True, retry_after_s=0)
    tracker.log_params({"steps": "20"})
    assert tracker.flush(SERVER_START_LIMIT_S) and tracker.run_id is not None
    waits = []
    stalled(server)
    try:
        for step in range(1, 21):
            started = time.perf_counter()
            tracker.log_metrics({"loss": float(step)}, step)
            waits.append(time.perf_counter() - started)
        time.sleep(0.5)  # the delivery thread is on the wire to the stalled server meanwhile
        assert tracker.undelivered
    finally:
        resume(server)
    assert max(waits) < STEP_WAIT_LIMIT_S, waits
    tracker.finish()  # the last delivery, once the server answers again
    stored = MlflowClient(tracking_uri=f"sqlite:///{store}")
    assert stored.get_run(tracker.run_id).info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in stored.get_metric_history(tracker.run_id, "loss"))
    assert history == [(step, float(step)) for step in range(1, 21)]


# The longest a tracker's start waits for its run (its flush_timeout_s), whatever MLflow's settings.
START_WAIT_S = 2.0


def a_stalled_server_holds_a_trackers_start_at_most_flush_timeout_s(server, url: str, store: Path, monkeypatch):
    """The tracker created its run on the training thread: MLflow's own request timeout and retries,
    where a user sets them (MLFLOW_HTTP_REQUEST_TIMEOUT=120 with MLflow's default of 7 retries waits 16
    minutes on a stalled server), held the attempt's start as long (here 2 x 30 s). The start waits at
    most flush_timeout_s; once the server answers, the run is created with what was logged meanwhile."""
    from mlflow.tracking import MlflowClient

    from megatron_cosmos3.training.tracking import MLflowTracker

    with monkeypatch.context() as environment:
        environment.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        environment.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        stalled(server)
        try:
            started = time.monotonic()
            tracker = MLflowTracker(
                url, "stalled-start", "bounded", enabled=True, retry_after_s=0.5, flush_timeout_s=START_WAIT_S
            )
            waited = time.monotonic() - started
            tracker.log_params({"steps": "2"})
            for step in (1, 2):
                tracker.log_metrics({"loss": float(step)}, step)
            assert tracker.run_id is None
        finally:
            resume(server)
        assert tracker.flush(SERVER_START_LIMIT_S)
        tracker.finish()
    assert waited < START_WAIT_S + 1.0, waited
    stored = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run = stored.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"steps": "2"}
    assert sorted((m.step, m.value) for m in stored.get_metric_history(tracker.run_id, "loss")) == [(1, 1.0), (2, 2.0)]


def a_full_buffer_is_one_warning_and_its_loss_is_counted_when_the_server_answers(
    server, url, store, caplog, monkeypatch
):
    """Beyond max_buffered metric values the oldest are dropped: that was a warning per call (a line
    every step for the rest of an outage). One warning as dropping starts, one with the count when the
    server answers again; what was kept is delivered. The batch on the wire as the server stalls (step
    2) is beside the buffer: counted in it, the values logged meanwhile were dropped as they came (the
    newest lost: steps 3 and 4 were kept, 5-11 lost, in CI). Answered, it is delivered, and so are the
    newest two."""
    from mlflow.tracking import MlflowClient

    from megatron_cosmos3.training.tracking import MLflowTracker

    tracker = MLflowTracker(url, "full-buffer", "dropping", enabled=True, retry_after_s=0.2, max_buffered=2)
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.flush(SERVER_START_LIMIT_S)
    first = len(caplog.records)
    with monkeypatch.context() as environment, caplog.at_level("WARNING", logger="megatron_cosmos3.training.tracking"):
        # The batch on the wire is answered once the server resumes, however long that takes under load.
        environment.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(SERVER_START_LIMIT_S))
        stalled(server)
        try:
            tracker.log_metrics({"loss": 2.0}, 2)
            assert batch_on_the_wire(tracker) == 1
            for step in range(3, 12):
                tracker.log_metrics({"loss": float(step)}, step)
            assert tracker.dropped_metrics == 7  # 3-9
        finally:
            resume(server)
        assert tracker.flush(SERVER_START_LIMIT_S)
        tracker.finish()
    said = [record.getMessage() for record in caplog.records[first:]]
    assert tracker.dropped_metrics == 7, said
    assert sum("the oldest are dropped from now on" in line for line in said) == 1, said
    assert [line for line in said if " lost " in line] == [
        "MLflow: 7 metric values lost while it did not answer (the oldest, beyond 2 buffered)"
    ], said
    stored = MlflowClient(tracking_uri=f"sqlite:///{store}")
    steps = sorted(m.step for m in stored.get_metric_history(tracker.run_id, "loss"))
    assert steps == [1, 2, 10, 11], steps


def a_run_the_server_no_longer_has_is_replaced_by_a_new_one(url: str, store: Path, caplog) -> None:
    """A resumed attempt continues the run id its checkpoint saved, but the server's store was
    wiped (or it is another server): a warning, a new run, the params and tags sent again."""
    from mlflow.tracking import MlflowClient

    from megatron_cosmos3.training.tracking import MLflowTracker

    gone = "0123456789abcdef0123456789abcdef"
    tracker = MLflowTracker(url, "wiped", "resumed", enabled=True, run_id=gone)
    tracker.continued_run_has({"steps": "8"}, {"stage": "pretrain"})
    with caplog.at_level("WARNING", logger="megatron_cosmos3.training.tracking"):
        tracker.log_metrics({"loss": 1.5}, 5)
        tracker.finish()
    assert f"MLflow run {gone} does not exist at {url}" in caplog.text and "logging to a new run" in caplog.text
    assert tracker.run_id not in (None, gone)
    stored = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run = stored.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"steps": "8"} and run.data.tags["stage"] == "pretrain"
    assert [(m.step, m.value) for m in stored.get_metric_history(tracker.run_id, "loss")] == [(5, 1.5)]


class LateProxy:
    """A TCP proxy in front of the server that, while ``late_s`` is set, holds each answer that long:
    the server has taken the request, the client has given up on it."""

    def __init__(self, server_port: int):
        self.server_port, self.late_s = server_port, 0.0
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.server_port))
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if answers and self.late_s:
                    time.sleep(self.late_s)
                target.sendall(data)
        except OSError:
            pass  # the other side closed
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)


def a_request_answered_too_late_is_sent_again_and_kept_once(port: int, store: Path) -> None:
    """The server took a batch but answered after the request's timeout: the tracker sends it again
    (the same values and timestamps), and the run holds each value once."""
    from mlflow.tracking import MlflowClient

    from megatron_cosmos3.training.tracking import MLflowTracker

    proxy = LateProxy(port)
    tracker = MLflowTracker(proxy.url, "late", "late-answers", enabled=True, retry_after_s=0.5)
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.flush(SERVER_START_LIMIT_S)
    proxy.late_s = float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) + 2  # set by the first tracker
    for step in (2, 3, 4):
        tracker.log_metrics({"loss": float(step)}, step)
    stored = MlflowClient(tracking_uri=f"sqlite:///{store}")
    # Polled, not slept: on a loaded machine the batch may reach the server late.
    deadline = time.monotonic() + SERVER_START_LIMIT_S
    while True:
        took = {m.step for m in stored.get_metric_history(tracker.run_id, "loss")}
        if (tracker.undelivered and 2 in took) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert tracker.undelivered and 2 in took, took  # the server has values the tracker sends again
    proxy.late_s = 0.0
    tracker.finish()
    history = sorted((m.step, m.value) for m in stored.get_metric_history(tracker.run_id, "loss"))
    assert history == [(step, float(step)) for step in (1, 2, 3, 4)], history


# One attempt of a run: delivers step 1, is told (a line on stdin) when the server has stalled, logs
# steps 2-5 and says how long the longest took, then waits to be killed.
KILLED_ATTEMPT = """
import sys, time
from megatron_cosmos3.training.tracking import MLflowTracker
tracker = MLflowTracker(sys.argv[1], "killed", "attempt", enabled=True, retry_after_s=0.2, spool=sys.argv[2])
tracker.log_params({"steps": "5"})
tracker.log_metrics({"loss": 1.0}, 1)
assert tracker.flush(300)
print(tracker.run_id, flush=True)
sys.stdin.readline()
waits = []
for step in range(2, 6):
    started = time.perf_counter()
    tracker.log_metrics({"loss": float(step)}, step)
    waits.append(time.perf_counter() - started)
print(max(waits), flush=True)
time.sleep(600)
"""


def a_sigkilled_attempts_values_reach_the_same_run(server: subprocess.Popen, url: str, store: Path, tmp_path):
    from mlflow.tracking import MlflowClient

    from megatron_cosmos3.training.tracking import MLflowTracker

    spool = tmp_path / "killed" / "mlflow_undelivered.json"
    spool.parent.mkdir()
    attempt = subprocess.Popen(
        [sys.executable, "-c", KILLED_ATTEMPT, url, str(spool)],
        env=launch_environment(tmp_path, MLFLOW_HTTP_REQUEST_TIMEOUT="120"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = attempt.stdout.readline().strip()
        assert run_id and not spool.exists(), run_id  # all delivered: no spool left behind
        stalled(server)
        try:
            attempt.stdin.write("stalled\n")
            attempt.stdin.flush()
            assert float(attempt.stdout.readline()) < STEP_WAIT_LIMIT_S
            # Written ahead: the values are on disk before (and while) they are on the wire.
            written = time.monotonic() + 60
            while time.monotonic() < written:
                if spool.is_file() and len(json.loads(spool.read_text())["metrics"]) == 4:
                    break
                time.sleep(0.1)
            os.kill(attempt.pid, signal.SIGKILL)
            attempt.wait(timeout=30)
        finally:
            resume(server)
    finally:
        if attempt.poll() is None:
            attempt.kill()
    kept = json.loads(spool.read_text())
    assert kept["run_id"] == run_id and [m[3] for m in kept["metrics"]] == [2, 3, 4, 5]
    following = MLflowTracker(url, "killed", "attempt", enabled=True, retry_after_s=0, spool=spool)
    assert following.continued and following.run_id == run_id
    following.log_metrics({"loss": 6.0}, 6)
    following.finish()
    assert not spool.exists()
    stored = MlflowClient(tracking_uri=f"sqlite:///{store}")
    history = sorted((m.step, m.value) for m in stored.get_metric_history(run_id, "loss"))
    assert history == [(step, float(step)) for step in range(1, 7)]  # once each (MLflow keeps no duplicates)
    assert stored.get_run(run_id).data.params == {"steps": "5"}


# Every step logs (log_every=1) before its log line; at the line of step 2 the server is stopped, and
# the steps after it log to a dead server.
STEPS, STOP_AFTER = 12, 2


@pytest.mark.slow
@pytest.mark.multiprocess
def test_server_receives_params_and_metrics_and_a_dead_server_does_not_stop_training(tmp_path, caplog, monkeypatch):
    from mlflow.tracking import MlflowClient

    from megatron_cosmos3.training.tracking import MLflowTracker

    port = free_port()
    # A tracker that starts while the server is not up yet keeps what it is given and creates its
    # run, and delivers everything, once the server answers.
    early = MLflowTracker(f"http://127.0.0.1:{port}", "early", "before-server", enabled=True, retry_after_s=0.5)
    early.log_params({"model.hidden_size": "32"})
    early.set_tag("stage", "pretrain")
    early.log_metrics({"loss": 2.0}, 1)
    assert early.active and early.run_id is None
    # An attempt that ends while the server is down spools what it kept; the next one delivers it.
    spool = tmp_path / "undelivered.json"
    ended = MLflowTracker(f"http://127.0.0.1:{port}", "early", "spooled", enabled=True, retry_after_s=0, spool=spool)
    ended.log_params({"steps": "3"})
    ended.log_metrics({"loss": 3.0}, 1)
    ended.suspend()
    assert spool.is_file()
    server = start_server(tmp_path, port)
    early.log_metrics({"loss": 1.5}, 2)
    # Delivered in the background once the server answers (its first answer can take longer than a
    # request's timeout on a loaded machine: the delivery thread retries every retry_after_s).
    assert early.flush(timeout_s=120)
    early.finish()
    assert early.run_id is not None
    resumed = MLflowTracker(f"http://127.0.0.1:{port}", "early", "spooled", enabled=True, retry_after_s=0, spool=spool)
    assert resumed.continued
    resumed.log_metrics({"loss": 2.5}, 2)
    assert resumed.flush(timeout_s=120)
    resumed.finish()
    assert not spool.exists()  # kept until delivered
    url, store = f"http://127.0.0.1:{port}", server_store(tmp_path)
    training = None
    outage_spool = tmp_path / "outage.json"
    try:
        # A tracker that lives through the outage the trainer's run meets below.
        outage = MLflowTracker(url, "outage", "lived", enabled=True, retry_after_s=0.5, spool=outage_spool)
        outage.log_metrics({"loss": 1.0}, 1)
        assert outage.flush(timeout_s=120)
        steps_do_not_wait_on_a_stalled_server(server, url, store)
        a_stalled_server_holds_a_trackers_start_at_most_flush_timeout_s(server, url, store, monkeypatch)
        a_request_answered_too_late_is_sent_again_and_kept_once(port, store)
        a_full_buffer_is_one_warning_and_its_loss_is_counted_when_the_server_answers(
            server, url, store, caplog, monkeypatch
        )
        a_run_the_server_no_longer_has_is_replaced_by_a_new_one(url, store, caplog)
        a_sigkilled_attempts_values_reach_the_same_run(server, url, store, tmp_path)
        settings = [
            *TINY,
            f"checkpoint.directory={tmp_path / 'ckpt'}",
            f"tracking.tracking_uri=http://127.0.0.1:{port}",
            "tracking.experiment=served",
            "tracking.run_name=tiny",
        ]
        training = subprocess.Popen(
            unlaunched_trainer_command(*settings, f"steps={STEPS}"),  # rank 0 alone tracks: one process
            cwd=tmp_path,
            # A live server starved of CPU by the other tests may answer slowly; the stopped one
            # refuses connections at once, whatever the timeout.
            env=launch_environment(tmp_path, MLFLOW_HTTP_REQUEST_TIMEOUT="120"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        before = []
        for line in training.stdout:
            before.append(line)
            if re.search(rf"\] step {STOP_AFTER}/{STEPS} ", line):
                break
        assert training.poll() is None, "".join(before)[-3000:]
        stalled(server)  # at once: the next steps go to a server that never answers, then to a dead one
        stop_server(server)
        output = "".join(before) + training.communicate(timeout=300)[0]
        assert training.returncode == 0, output[-3000:]
        # What the outage left, before the next attempt delivers it.
        left = json.loads((tmp_path / "ckpt" / "mlflow_undelivered.json").read_text())
        first = MlflowClient(tracking_uri=f"sqlite:///{store}")
        history = sorted(m.step for m in first.get_metric_history(left["run_id"], "loss")) if left["run_id"] else []
        for step in (2, 3):
            outage.log_metrics({"loss": float(step)}, step)
        server = start_server(tmp_path, port)  # on the same store
        assert outage.flush(timeout_s=120) and not outage_spool.exists()
        outage.finish()
        following = subprocess.run(
            unlaunched_trainer_command(*settings, f"steps={STEPS + 2}"),  # resumes from the checkpoint of step STEPS
            cwd=tmp_path,
            env=launch_environment(tmp_path, MLFLOW_HTTP_REQUEST_TIMEOUT="120"),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        _end_what_runs(server, training)
    assert training.returncode == 0, output[-3000:]
    assert "MLflow tracking failed" in output
    assert f"step {STEPS}/{STEPS}" in output and "checkpoint:" in output
    # What the server received before the outage is in its store (it may have taken the params and
    # the first steps: they are sent off the training thread), the rest waits in the run folder's
    # spool for a next attempt, to the same run: every step and param is in one or the other.
    stored = MlflowClient(tracking_uri=f"sqlite:///{server_store(tmp_path)}")
    served = stored.get_experiment_by_name("served")
    runs = stored.search_runs(served.experiment_id) if served else []
    assert len(runs) == (left["run_id"] is not None)
    assert not runs or left["run_id"] == runs[0].info.run_id
    spooled = {step for key, _, _, step in left["metrics"] if key == "loss"}
    assert set(history) | spooled == set(range(1, STEPS + 1)) and STEPS in spooled, (history, spooled)
    params = {**(runs[0].data.params if runs else {}), **left["params"]}
    assert params["model.hidden_size"] == "32" and params["parallel.tensor"] == "1"
    kept = stored.get_run(early.run_id)
    assert kept.info.run_name == "before-server" and kept.info.status == "FINISHED"
    assert kept.data.params == {"model.hidden_size": "32"} and kept.data.tags["stage"] == "pretrain"
    assert [(m.step, m.value) for m in stored.get_metric_history(early.run_id, "loss")] == [(1, 2.0), (2, 1.5)]
    spooled = stored.get_run(resumed.run_id)
    assert spooled.info.run_name == "spooled" and spooled.info.status == "FINISHED"
    assert spooled.data.params == {"steps": "3"}
    assert [(m.step, m.value) for m in stored.get_metric_history(resumed.run_id, "loss")] == [(1, 3.0), (2, 2.5)]
    # After the restart: what the living tracker kept, in the same attempt...
    assert [(m.step, m.value) for m in stored.get_metric_history(outage.run_id, "loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
    ]
    # ...and the trainer's next attempt resumed the run folder: the spool delivered to the same run,
    # then its own steps; every step once, the run finished, the spool gone.
    assert following.returncode == 0, following.stdout[-3000:] + following.stderr[-3000:]
    assert not (tmp_path / "ckpt" / "mlflow_undelivered.json").exists()
    run = stored.get_run(left["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.hidden_size"] == "32"
    steps = sorted(m.step for m in stored.get_metric_history(left["run_id"], "loss"))
    assert steps == list(range(1, STEPS + 3)), steps
    assert len(stored.search_runs(served.experiment_id)) == 1


def _end_what_runs(server: subprocess.Popen, training: subprocess.Popen | None) -> None:
    """What a test leaves running, whatever stopped it: the server and the trainer."""
    if server.poll() is None:
        stop_server(server)
    if training is not None and training.poll() is None:
        training.kill()


def _lines_until(process: subprocess.Popen, pattern: str, seen: list[str]) -> None:
    """Reads ``process``'s output into ``seen`` up to the first line that matches ``pattern``."""
    for line in process.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return
    pytest.fail(f"no line matching {pattern!r}:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_server_killed_and_restarted_mid_run_gets_every_step_and_the_finished_run(tmp_path):
    """The trainer's server is killed (SIGKILL) after step 2 and started again on the same port and
    store after step 4 and the tracker's first failed delivery (the trainer held meanwhile, however
    long the start takes): the run neither crashes nor waits, one warning says the outage began and
    one that it ended, every step arrives once in the same run, which ends FINISHED, and no spool is
    left. Restarted at step 4 alone, a loaded machine's delivery thread had not tried yet: no outage
    for the tracker, no warning (CI)."""
    port, steps = free_port(), 8
    server = start_server(tmp_path, port)
    training, seen = None, []
    try:
        training = subprocess.Popen(
            unlaunched_trainer_command(
                *TINY,
                f"steps={steps}",
                f"checkpoint.directory={tmp_path / 'ckpt'}",
                f"tracking.tracking_uri=http://127.0.0.1:{port}",
                "tracking.experiment=restarted",
                "tracking.run_name=through",
            ),
            cwd=tmp_path,
            env=launch_environment(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _lines_until(training, rf"\] step 2/{steps} ", seen)
        stop_server(server)
        _lines_until(training, rf"\] step 4/{steps} ", seen)  # steps 3 and 4 logged to no server
        if not any("MLflow tracking failed" in line for line in seen):  # it has tried to deliver them
            _lines_until(training, "MLflow tracking failed", seen)
        # Tried before the attempt's end (its last delivery, after this line, spools: no restart helps).
        assert not any("] checkpoint: " in line for line in seen), "".join(seen)[-3000:]
        os.kill(training.pid, signal.SIGSTOP)
        try:
            server = start_server(tmp_path, port)
        finally:
            os.kill(training.pid, signal.SIGCONT)
        output = "".join(seen) + training.communicate(timeout=300)[0]
    finally:
        _end_what_runs(server, training)
    assert training.returncode == 0, output[-3000:]
    assert output.count("MLflow tracking failed") == 1, output[-3000:]
    assert "MLflow tracking recovered" in output, output[-3000:]
    run, client = tracked_run(server_store(tmp_path), "through", experiment="restarted")
    assert run.info.status == "FINISHED" and run.data.params["model.hidden_size"] == "32"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, steps + 1))
    assert not (tmp_path / "ckpt" / "mlflow_undelivered.json").exists()
