"""The MLflow tracker against an HTTP endpoint that answers 500, a proxy's 404 page, garbage, or closes
the connection, a spool it cannot write, and an artifact gone before its upload. (A real MLflow
server, stalled, stopped, without the run it is given, and a SIGKILLed attempt: test_mlflow_server.py.)"""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_cosmos3.testing.mlflow_server import batch_on_the_wire
from megatron_cosmos3.testing.training import tracking_store
from megatron_cosmos3.training.tracking import MLflowTracker


class Misbehaving(BaseHTTPRequestHandler):
    """Answers every request as ``server.mode`` says, after ``server.delay_s`` and once
    ``server.answering`` is set."""

    def log_message(self, *args):
        pass

    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(self.server.delay_s)
        self.server.answering.wait(60)  # cleared: the request is held until the test sets it
        if self.server.mode == "close":
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, kind, body = {
            "500": (500, "application/json", b'{"error_code": "INTERNAL_ERROR", "message": "boom"}'),
            "garbage": (200, "application/json", b"<html>not json"),
            "proxy 404": (404, "text/html", b"<html>no such page</html>"),
        }[self.server.mode]
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer


@pytest.fixture(scope="module")
def misbehaving():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    server.mode, server.delay_s, server.answering = "500", 0.0, threading.Event()
    server.answering.set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


CONTINUED = "0123456789abcdef0123456789abcdef"  # an attempt continuing its run


@pytest.mark.parametrize(
    "mode, run_id", [("500", None), ("garbage", CONTINUED), ("proxy 404", CONTINUED), ("close", None)]
)
def test_a_failing_endpoint_loses_no_value_and_stalls_no_step(misbehaving, tmp_path, mode, run_id):
    """What it does not take is kept (no 4xx of a proxy is taken for MLflow refusing the values) and
    spooled at the end of the attempt; a slow answer (0.3 s) delays no call."""
    misbehaving.mode, misbehaving.delay_s = mode, 0.3
    spool = tmp_path / "spool.json"
    url = f"http://127.0.0.1:{misbehaving.server_address[1]}"
    tracker = MLflowTracker(url, "failing", "attempt", enabled=True, run_id=run_id, retry_after_s=0.1, spool=spool)
    tracker.log_params({"steps": "3"})
    waits = []
    for step in range(1, 4):
        started = time.perf_counter()
        tracker.log_metrics({"loss": float(step)}, step)
        waits.append(time.perf_counter() - started)
    time.sleep(0.4)  # a delivery fails meanwhile
    tracker.suspend()
    assert max(waits) < 0.1, waits
    kept = json.loads(spool.read_text())
    assert kept["run_id"] == run_id and kept["params"] == {"steps": "3"}
    assert [(key, value, step) for key, value, _, step in kept["metrics"]] == [
        ("loss", 1.0, 1),
        ("loss", 2.0, 2),
        ("loss", 3.0, 3),
    ]


def test_metrics_beyond_the_buffer_are_one_warning_and_counted_once_at_the_end(misbehaving, tmp_path, caplog):
    """A server failing for the rest of the attempt: one warning as dropping starts (it was one a
    call), one with the count as the attempt ends; the newest values are kept in the spool."""
    misbehaving.mode, misbehaving.delay_s = "500", 0.0
    url = f"http://127.0.0.1:{misbehaving.server_address[1]}"
    spool = tmp_path / "spool.json"
    with caplog.at_level("WARNING", logger="megatron_cosmos3.training.tracking"):
        tracker = MLflowTracker(url, "failing", "full", enabled=True, retry_after_s=60, max_buffered=3, spool=spool)
        for step in range(1, 11):
            tracker.log_metrics({"loss": float(step)}, step)
        tracker.suspend()
    assert caplog.text.count("the oldest are dropped from now on") == 1, caplog.text
    assert caplog.text.count(" lost ") == 1, caplog.text
    assert f"MLflow: 7 metric values lost while {url} did not answer (the oldest, beyond 3 buffered)" in caplog.text
    assert [m[3] for m in json.loads(spool.read_text())["metrics"]] == [8, 9, 10]


def test_values_logged_while_a_batch_is_on_the_wire_push_out_the_oldest_not_the_newest(
    misbehaving, tmp_path, caplog, monkeypatch
):
    """The batch on the wire counted in the buffer: while it was out, each new value was dropped at
    once (the newest lost), and the failed batch was then kept in their place. Step 1 is held on the
    wire while steps 2-10 meet a buffer of two; the send fails: the newest two are what is kept."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # the held request fails when released
    misbehaving.mode, misbehaving.delay_s = "500", 0.0
    url = f"http://127.0.0.1:{misbehaving.server_address[1]}"
    spool = tmp_path / "spool.json"
    with caplog.at_level("WARNING", logger="megatron_cosmos3.training.tracking"):
        tracker = MLflowTracker(url, "failing", "held", enabled=True, retry_after_s=0.05, max_buffered=2, spool=spool)
        misbehaving.answering.clear()
        try:
            tracker.log_metrics({"loss": 1.0}, 1)
            assert batch_on_the_wire(tracker) == 1
            for step in range(2, 11):
                tracker.log_metrics({"loss": float(step)}, step)
            assert tracker.dropped_metrics == 7  # 2-8: the batch on the wire may still be delivered
        finally:
            misbehaving.answering.set()
        tracker.suspend()
    assert [m[3] for m in json.loads(spool.read_text())["metrics"]] == [9, 10]
    assert tracker.dropped_metrics == 8 and caplog.text.count("the oldest are dropped from now on") == 1
    assert f"MLflow: 8 metric values lost while {url} did not answer (the oldest, beyond 2 buffered)" in caplog.text


@pytest.mark.parametrize("text", ["[" * 100_000, '{"run_id": "x", "params": [], "tags": {}, "metrics": []}'])
def test_a_damaged_spool_is_one_warning_and_stops_nothing(misbehaving, tmp_path, caplog, text):
    """A spool nested past the JSON parser raised RecursionError out of the tracker's constructor:
    the attempt could not start."""
    misbehaving.mode, misbehaving.delay_s = "500", 0.0
    spool = tmp_path / "spool.json"
    spool.write_text(text)
    url = f"http://127.0.0.1:{misbehaving.server_address[1]}"
    with caplog.at_level("WARNING", logger="megatron_cosmos3.training.tracking"):
        tracker = MLflowTracker(url, "failing", "attempt", enabled=True, retry_after_s=0.05, spool=spool)
        tracker.suspend()
    assert f"MLflow: {spool} is unreadable" in caplog.text


def test_a_spool_that_cannot_be_written_is_one_warning_and_stops_nothing(misbehaving, tmp_path, caplog):
    """E.g. a full disk: the delivery thread goes on, and the end of the attempt raises nothing."""
    misbehaving.mode, misbehaving.delay_s = "500", 0.0
    url = f"http://127.0.0.1:{misbehaving.server_address[1]}"
    spool = tmp_path / "not a folder" / "spool.json"
    (tmp_path / "not a folder").write_text("")
    with caplog.at_level("WARNING", logger="megatron_cosmos3.training.tracking"):
        tracker = MLflowTracker(
            url, "failing", "attempt", enabled=True, retry_after_s=0.05, spool=spool, spool_every_s=0
        )
        for step in range(1, 4):
            tracker.log_metrics({"loss": float(step)}, step)
            time.sleep(0.1)
        tracker.suspend()
    assert caplog.text.count(f"MLflow: cannot write {spool}") == 1
    assert tracker.undelivered and not spool.exists()


def test_an_artifact_gone_before_its_upload_is_dropped_naming_it_and_the_run_still_finishes(tmp_path, caplog):
    """A file or folder queued for upload and gone by then (a trace another node wrote, a sample
    folder cleaned up) was taken for a server outage: 'tracking failed at <the store>', a back-off
    before every later delivery, and the run never ended (its status comes after the artifacts).
    Against a real (SQLite) store: it is dropped with a warning naming it, the rest is delivered."""
    from mlflow.tracking import MlflowClient

    store = tracking_store(tmp_path)
    there = tmp_path / "there.txt"
    there.write_text("uploaded")
    with caplog.at_level("WARNING", logger="megatron_cosmos3.training.tracking"):
        tracker = MLflowTracker(str(store), "artifacts", "gone", enabled=True, retry_after_s=30)
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.log_artifact(str(tmp_path / "gone.json.gz"), "profiles")
        tracker.log_artifacts(str(tmp_path / "gone folder"), "samples")
        tracker.log_artifact(str(there))
        tracker.log_metrics({"loss": 2.0}, 2)
        assert tracker.flush(20)  # not held back by a back-off
        tracker.finish()
    assert f"MLflow: {tmp_path / 'gone.json.gz'} is not a file (gone before its upload)" in caplog.text
    assert f"MLflow: {tmp_path / 'gone folder'} is not a folder (gone before its upload)" in caplog.text
    assert "tracking failed" not in caplog.text, caplog.text
    client = MlflowClient(tracking_uri=tracker.uri)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(1, 1.0), (2, 2.0)]
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["there.txt"]


def test_an_attempt_that_ends_early_marks_its_run_and_the_attempt_continuing_it_marks_it_running(tmp_path):
    """An attempt preempted or failed left its run RUNNING for good (the UI showed a crashed run as
    running). It marks it KILLED or FAILED as it ends; the attempt that continues the run marks it
    RUNNING before it sends anything, and the last one FINISHED. Against a real (SQLite) store."""
    from mlflow.tracking import MlflowClient

    store = tracking_store(tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run_id = None
    for step, end in enumerate(["KILLED", "FAILED", "FINISHED"], start=1):
        tracker = MLflowTracker(str(store), "lifecycle", "attempts", enabled=True, run_id=run_id)
        assert tracker.continued == (run_id is not None)
        tracker.log_metrics({"loss": float(step)}, step)
        assert tracker.flush(20)
        assert client.get_run(tracker.run_id).info.status == "RUNNING"
        run_id = tracker.run_id
        if end == "FINISHED":
            tracker.finish()
        else:
            tracker.suspend(end)
        assert tracker.run_id == run_id and client.get_run(run_id).info.status == end
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
