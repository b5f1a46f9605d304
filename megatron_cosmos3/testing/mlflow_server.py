"""A real MLflow tracking server on 127.0.0.1 for tests: started on a copy of the empty store
(``training.tracking_store``), stopped, stalled (SIGSTOP: connections accepted, never answered) and
resumed. The server runs in a process group of its own (the CLI and its web workers). And a wait
for a tracker's batch on the wire, for tests that act while a request is out (not after a sleep)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from megatron_cosmos3.testing.training import tracking_store

# Start-up (imports, the web app) takes ~20 s on a quiet 2-core machine and
# several times that while the other test worker trains; a slow start is waited for as long as
# the server lives, a dead one fails at once with its log.
SERVER_START_LIMIT_S = 360


def server_store(folder: Path) -> Path:
    """The SQLite store of the server started on ``folder``."""
    return tracking_store(Path(folder) / "server")


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port``, its store ``server_store(folder)`` (kept across
    restarts on the same folder), artifacts and log (``server.log``) under ``folder``; returns once
    it answers ``/health``. RuntimeError with the log's end where it exits or does not answer within
    ``SERVER_START_LIMIT_S``."""
    folder = Path(folder)
    log = folder / "server.log"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{server_store(folder)}",  # made with its schema: no migrations
            "--default-artifact-root",
            str(folder / "artifacts"),
            "--workers",
            "1",
        ],
        # Without MLflow's job runner (a job-runner process and eight huey consumers, 13 s of CPU
        # per start, 2026-12-02): this server only tracks.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log.open("ab"),  # a restart on the folder adds to its log
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started = time.monotonic()
    while time.monotonic() - started < SERVER_START_LIMIT_S:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"mlflow server not healthy after {SERVER_START_LIMIT_S} s:\n{log.read_text()[-3000:]}")


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # the whole process group: the CLI and its web workers
    server.wait(timeout=30)


def stalled(server: subprocess.Popen) -> subprocess.Popen:
    """The server stops answering (its connections accepted, never served) until resumed."""
    os.killpg(server.pid, signal.SIGSTOP)
    return server


def resume(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGCONT)


def batch_on_the_wire(tracker, timeout_s: float = 60.0) -> int:
    """Waits until ``tracker`` (an ``MLflowTracker``) has metric values on the wire; how many.
    RuntimeError where it has none within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (sending := tracker.in_flight) == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no metric values on the wire to {tracker.uri} within {timeout_s} s")
        time.sleep(0.01)
    return sending
