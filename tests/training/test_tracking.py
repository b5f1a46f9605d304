"""The MLflow tracker against an HTTP endpoint that answers 500, a proxy's 404 page, garbage, or closes
the connection, and a spool it cannot write. (A real MLflow server, stalled, stopped, without the run
it is given, and a SIGKILLed attempt: test_mlflow_server.py.)"""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_cosmos3.training.tracking import MLflowTracker


class Misbehaving(BaseHTTPRequestHandler):
    """Answers every request as ``server.mode`` says, after ``server.delay_s``."""

    def log_message(self, *args):
        pass

    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(self.server.delay_s)
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
    server.mode, server.delay_s = "500", 0.0
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
