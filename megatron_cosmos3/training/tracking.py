"""MLflow tracking from rank 0 only, delivered off the training thread; an unreachable or slow tracking
server never stops or stalls training."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path

from megatron_cosmos3.json_files import loads, unique_keys

log = logging.getLogger(__name__)

# Uploads that wait for a failing server at most; beyond, a file stays on disk, named in a warning.
MAX_QUEUED_ARTIFACTS = 1000


def is_local_path(tracking_uri: str) -> bool:
    """Whether ``tracking_uri`` has no scheme (``scheme://``, ``file:``, ``sqlite:``): the tracker
    takes it as the path of a local SQLite store."""
    return "://" not in tracking_uri and not tracking_uri.startswith(("file:", "sqlite:"))


def address_without_scheme(tracking_uri: str) -> str | None:
    """Why ``tracking_uri``, without a scheme, reads as a server's address with its scheme lost or
    mistyped (``http//host:5000``, ``127.0.0.1:5000``, ``localhost:5000/x``: '//' in it, or a
    ':' before its first '/'), which would silently be a local file of that name and track nothing
    the server sees; None for a URI with a scheme and for a path (``outputs/mlflow.db``,
    ``/runs/a:b/mlflow.db``, ``./a:b.db``)."""
    if not is_local_path(tracking_uri):
        return None
    if "//" in tracking_uri:
        return "holds '//' but no scheme"
    if ":" in tracking_uri.split("/", 1)[0]:
        return "reads as host:port without a scheme"
    return None


def _as_uri(tracking_uri: str) -> str:
    # A bare path is a local SQLite store (MLflow's file store no longer accepts writes).
    if not is_local_path(tracking_uri):
        return tracking_uri
    path = Path(tracking_uri).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _artifact_location(uri: str) -> str | None:
    # Keep a local store's artifacts beside its database rather than in the working directory.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def _refused(error: Exception, uri: str) -> bool:
    """Whether the server refused the request itself (an HTTP 4xx: a bad value, a run that does not
    exist), which no retry will change; anything else (connection refused, timeouts, 5xx, 408, 429,
    a full disk) is an outage that may end. Over HTTP only the MLflow server's own answer (JSON)
    refuses: a proxy's or a login page's 4xx is an outage too."""
    from mlflow.exceptions import RestException

    status = getattr(error, "get_http_status_code", None)
    if status is None or not 400 <= status() < 500 or status() in (408, 429):
        return False
    return isinstance(error, RestException) or not uri.startswith(("http://", "https://"))


class MLflowTracker:
    """Logs params, tags, metrics and artifacts to one MLflow run; a no-op on ranks other than 0.

    The training thread never waits on the tracking server (docs/DESIGN.md, "Tracking"): each
    call only queues its values and returns; a background thread delivers them, in the order they
    were logged by kind (params, tags, metrics, artifacts). A failing server starts a back-off
    (``retry_after_s``) during which nothing is sent; the queue keeps params and tags, the newest
    ``max_buffered`` metric values not yet sent (the oldest dropped beyond that, with a count) and
    artifacts up to ``MAX_QUEUED_ARTIFACTS`` (their files stay on disk). A batch of metrics on the
    wire (``in_flight``, at most 1000) is beside that buffer: delivered where its send succeeds, else
    put back as the oldest values, the first dropped. The run is created by the delivery thread as
    it starts, which the constructor waits for at most ``flush_timeout_s`` (whatever MLflow's own
    request timeout and retries), or by the first later call that reaches the server (``run_id``
    None until then; a resumed run passes the id it saved and continues that run); a run that the
    server no longer has (its store wiped, another server) is replaced by a new one, with a warning,
    and the params and tags are sent again.

    ``spool`` (JSON in the run folder) is written ahead: before values go on the wire, and at most
    every ``spool_every_s`` while the server fails, it holds every value not yet delivered (and it
    is removed once all are), so even a SIGKILLed attempt leaves them there. The next tracker given
    that file (the resumed attempt) takes them over and delivers them first, to the same run.
    ``finish`` and ``suspend`` give the queue one last delivery (whatever the back-off) of at most
    ``flush_timeout_s``; what remains goes to the spool. A request the server refuses (HTTP 4xx) is
    dropped with a warning instead of retried forever. One warning per outage.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        enabled: bool,
        run_id: str | None = None,
        retry_after_s: float = 30.0,
        max_buffered: int = 100_000,
        spool: str | Path | None = None,
        flush_timeout_s: float = 30.0,
        spool_every_s: float = 1.0,
    ):
        self.run_id: str | None = run_id
        # This continues an MLflow run of an earlier attempt (its id given, or its spool read):
        # its params are there, or on their way.
        self.continued = run_id is not None
        self.uri = ""
        self._client = None
        self._experiment, self._run_name = experiment, run_name
        self._retry_after_s, self._flush_timeout_s, self._spool_every_s = retry_after_s, flush_timeout_s, spool_every_s
        self._failing_since: float | None = None  # the delivery thread's alone
        # Shared by the caller and the delivery thread, under this condition's lock.
        self._changed = threading.Condition()
        self._params: dict[str, str] = {}  # not yet delivered (MLflow refuses one key twice in a batch)
        self._tags: dict[str, str] = {}
        self._pending: list = []  # mlflow Metric objects not yet delivered
        self._sending: list = []  # metrics on the wire (spooled with the pending ones)
        self._artifacts: list[tuple[str, str, str | None]] = []  # (client method, path, artifact path)
        self._delivered: tuple[dict[str, str], dict[str, str]] = ({}, {})  # params, tags: for a new run
        self._terminate: str | None = None  # the status to end the run with, once all is delivered
        self._last_requested = self._last_served = 0  # last deliveries asked for (finish, suspend) / made
        self._closed = False
        self._run_tried = False  # the delivery thread's first try at the run is over
        self._reopen = False  # a continued run is to be marked RUNNING again (the delivery thread's)
        self._version = self._spooled_version = 0  # bumped whenever what is undelivered changes
        self._spooled_at = -math.inf
        self._spool_lock = threading.Lock()  # one writer of the spool file at a time
        self._spool_failed = False
        self._max_buffered = max_buffered
        self._spool = Path(spool) if spool else None
        self.dropped_metrics = 0
        self._dropped_reported = 0  # of dropped_metrics, those counted in a warning
        if not enabled:
            return
        # Fail fast instead of MLflow's default minutes of retries when a server is unreachable.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its store set-up chatter on every attempt
        self.uri = _as_uri(tracking_uri)
        try:
            self._client = MlflowClient(tracking_uri=self.uri)
        except Exception as error:  # noqa: BLE001 — a URI no client can be made for: train without it
            log.warning("MLflow tracking unusable at %s (%s: %s); training without it", self.uri, *_brief(error))
            return
        self._read_spool()
        self._reopen = self.continued
        threading.Thread(target=self._deliver_forever, name="mlflow-delivery", daemon=True).start()
        self._await_run()

    def _await_run(self) -> None:
        """Waits, at most ``flush_timeout_s``, for the delivery thread's first try at the run, so that
        where the server answers its id is known before the first checkpoint records it. Not the
        request itself on this thread: MLflow's timeout and retries (MLFLOW_HTTP_REQUEST_TIMEOUT,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES, where set) would hold the attempt's start for minutes."""
        deadline = time.monotonic() + self._flush_timeout_s
        with self._changed:
            while not self._run_tried and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            if self._run_tried:
                return
        log.warning(
            "MLflow: %s did not answer within %gs (tracking.flush_timeout_s); training goes on, and the run is "
            "created once it answers",
            self.uri,
            self._flush_timeout_s,
        )

    @property
    def active(self) -> bool:
        """Tracking is on (the run may still wait for its server: ``run_id`` None)."""
        return self._client is not None and not self._closed

    @property
    def undelivered(self) -> bool:
        with self._changed:
            return self._holds_values()

    @property
    def in_flight(self) -> int:
        """Metric values on the wire now (sent, not yet answered)."""
        with self._changed:
            return len(self._sending)

    def _holds_values(self) -> bool:
        return bool(self._params or self._tags or self._pending or self._sending)

    # What the training thread calls: queue and return.

    def log_params(self, params: dict[str, str]) -> None:
        self._queue(lambda: self._params.update({k: v[:6000] for k, v in params.items()}))

    def set_tag(self, key: str, value: str) -> None:
        self._queue(lambda: self._tags.__setitem__(key, value))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._queue(lambda: self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items()))

    def continued_run_has(self, params: dict[str, str], tags: dict[str, str]) -> None:
        """What an earlier attempt logged to the run this one continues: sent again only where that
        run is gone and a new one replaces it."""
        with self._changed:
            self._delivered[0].update({k: v[:6000] for k, v in params.items()})
            self._delivered[1].update(tags)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._queue_artifact("log_artifact", path, artifact_path)

    def log_artifacts(self, directory: str, artifact_path: str | None = None) -> None:
        """Every file under ``directory``, under ``artifact_path`` in the run's artifacts."""
        self._queue_artifact("log_artifacts", directory, artifact_path)

    def _queue(self, add) -> None:
        if not self.active:
            return
        with self._changed:
            add()
            self._version += 1
            self._drop_overflow()
            self._changed.notify_all()

    def _drop_overflow(self) -> None:
        """Drops the oldest metric values beyond ``max_buffered`` (under ``_changed``): one warning as
        dropping starts, the count once the server answers or the attempt ends (it was a warning a
        call, a line every step for the rest of an outage). The batch on the wire is not counted: it
        is older than every pending value, so counting it dropped the newest values while it was
        out, and a failed send then kept it in their place."""
        overflow = len(self._pending) - self._max_buffered
        if overflow > 0:
            if self.dropped_metrics == self._dropped_reported:
                log.warning(
                    "MLflow unreachable: %d metric values buffered, the most kept; the oldest are dropped from "
                    "now on (counted once %s answers or the attempt ends)",
                    self._max_buffered,
                    self.uri,
                )
            self.dropped_metrics += overflow
            del self._pending[:overflow]

    def _report_dropped(self, when: str) -> None:
        """One warning with the metric values dropped since the last one, if any."""
        with self._changed:
            dropped, self._dropped_reported = self.dropped_metrics - self._dropped_reported, self.dropped_metrics
        if dropped:
            log.warning(
                "MLflow: %d metric values lost %s (the oldest, beyond %d buffered)", dropped, when, self._max_buffered
            )

    def _queue_artifact(self, method: str, path: str, artifact_path: str | None) -> None:
        if not self.active:
            return
        with self._changed:
            if len(self._artifacts) >= MAX_QUEUED_ARTIFACTS:
                log.warning(
                    "MLflow: %s not uploaded (%d uploads wait already); it stays on disk", path, len(self._artifacts)
                )
                return
            self._artifacts.append((method, path, artifact_path))
            self._changed.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Waits up to ``timeout_s`` for everything queued so far to be delivered (and the spool
        removed); whether it was."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._holds_values() or self._artifacts or (self._spool is not None and self._spool.exists()):
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._changed.wait(left)
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """The end of the run: delivers what is kept (one last try, ``flush_timeout_s`` at most) and
        ends the run with ``status``; what the server does not take is spooled and the run left open."""
        self._end(status)

    def suspend(self, status: str | None = None) -> None:
        """The end of an attempt that a later one may continue (preempted: ``KILLED``, failed:
        ``FAILED``): one last delivery that ends with the run marked ``status`` (None: left as it
        is); what remains goes to the spool file for the next attempt (a warning where there is
        none). The attempt continuing the run marks it RUNNING again before it sends anything."""
        self._end(status)

    def _end(self, status: str | None) -> None:
        if not self.active:
            return
        deadline = time.monotonic() + self._flush_timeout_s
        with self._changed:
            self._terminate = status
            self._last_requested += 1
            self._changed.notify_all()
            while self._last_served < self._last_requested and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            if self._last_served < self._last_requested:
                log.warning("MLflow: the last delivery to %s took over %.0fs; left", self.uri, self._flush_timeout_s)
            self._closed = True  # the delivery thread sends nothing more, writes no spool
            self._changed.notify_all()
            left_artifacts = [path for _, path, _ in self._artifacts]
        if left_artifacts:
            more = f" and {len(left_artifacts) - 1} more" if len(left_artifacts) > 1 else ""
            log.warning("MLflow: %s%s not uploaded (the server is failing); on disk", left_artifacts[0], more)
        self._keep_the_rest()

    # The delivery thread.

    def _deliver_forever(self) -> None:
        self._start_run()  # never raises: a failure starts the back-off
        with self._changed:
            self._run_tried = True
            self._changed.notify_all()
        while True:
            try:
                if not self._delivery_pass():
                    return
            except Exception as error:  # noqa: BLE001 — a bug here must not end tracking for the run
                log.warning("MLflow delivery failed (%s: %s); retrying", *_brief(error))
                time.sleep(1.0)

    def _delivery_pass(self) -> bool:
        """Waits for something to do and does it; False once the tracker is closed."""
        with self._changed:
            while (wake := self._wake_in()) != 0:
                self._changed.wait(wake)
            if self._closed:
                return False
            serving = self._last_requested
            last = serving > self._last_served
        try:
            sending = last or not self._backing_off()
            self._write_spool(due=sending)
            if sending:
                self._deliver()
            self._remove_spool()
        finally:  # a last delivery asked for is over, whatever happened
            with self._changed:
                self._last_served = max(self._last_served, serving)
                self._changed.notify_all()
        return True

    def _wake_in(self) -> float | None:
        """Seconds until the delivery thread has something to do (0: now; None: when told)."""
        if self._closed or self._last_requested > self._last_served:
            return 0
        waiting = self._holds_values() or self._artifacts or self._terminate is not None
        if not waiting:
            return None
        if self._failing_since is None:
            return 0
        wake = self._failing_since + self._retry_after_s
        if self._spool is not None and self._version != self._spooled_version:
            wake = min(wake, self._spooled_at + self._spool_every_s)
        return max(0.0, wake - time.monotonic())

    def _backing_off(self) -> bool:
        return self._failing_since is not None and time.monotonic() - self._failing_since < self._retry_after_s

    def _failed(self, error: Exception) -> None:
        if self._failing_since is None:
            log.warning(
                "MLflow tracking failed at %s (%s: %s); keeping params and metrics and retrying every %gs",
                self.uri,
                *_brief(error),
                self._retry_after_s,
            )
        self._failing_since = time.monotonic()

    def _answered(self) -> None:
        if self._failing_since is not None:
            log.warning("MLflow tracking recovered at %s: delivering what was kept", self.uri)
            self._failing_since = None
        self._report_dropped("while it did not answer")  # also a stalled server's: it failed nothing

    def _start_run(self) -> bool:
        """Creates the run (and its experiment) if it has none yet, or marks the run it continues
        RUNNING again; False while the server fails."""
        if self.run_id is not None:
            return self._reopened()
        try:
            found = self._client.get_experiment_by_name(self._experiment)
            experiment_id = (
                found.experiment_id
                if found
                else self._client.create_experiment(self._experiment, artifact_location=_artifact_location(self.uri))
            )
            self.run_id = self._client.create_run(experiment_id, run_name=self._run_name).info.run_id
        except Exception as error:  # noqa: BLE001 — any tracking failure must not stop training
            self._failed(error)
            return False
        self._reopen = False  # a new run is RUNNING
        self._answered()
        return True

    def _reopened(self) -> bool:
        """The run this attempt continues, which an earlier one may have marked KILLED or FAILED, is
        RUNNING again before anything else is sent to it; False while the server fails."""
        if not self._reopen:
            return True
        try:
            self._client.update_run(self.run_id, status="RUNNING")
        except Exception as error:  # noqa: BLE001 — as in _start_run
            if getattr(error, "error_code", None) != "RESOURCE_DOES_NOT_EXIST" and not _refused(error, self.uri):
                self._failed(error)
                return False
            # Gone: the call that follows replaces it by a new run; refused: not worth a retry.
        self._reopen = False
        self._answered()
        return True

    def _call(self, method: str, *args, **kwargs) -> bool:
        """True once the server took the request, or refused it for good (dropped, warned); False
        when it should be sent again (after the back-off, or to the new run of a vanished one)."""
        if not self._start_run():
            return False
        try:
            getattr(self._client, method)(self.run_id, *args, **kwargs)
        except Exception as error:  # noqa: BLE001
            if getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                log.warning(
                    "MLflow run %s does not exist at %s (its store wiped, or another server); logging to a new run",
                    self.run_id,
                    self.uri,
                )
                with self._changed:
                    self.run_id = None
                    params, tags = self._delivered
                    self._params, self._tags = {**params, **self._params}, {**tags, **self._tags}
                return False
            if _refused(error, self.uri):
                log.warning("MLflow refused %s (%s: %s); dropped", method, *_brief(error))
                return True
            self._failed(error)
            return False
        self._answered()
        return True

    def _upload(self, method: str, path: str, artifact_path: str | None) -> bool:
        """``_call`` for an artifact whose file (``log_artifact``) or folder (``log_artifacts``) is
        there; one that is gone is dropped with a warning: no retry brings it back, and taken for an
        outage it held up the run's end (its status) and every delivery after it by a back-off."""
        folder = method == "log_artifacts"
        if not (Path(path).is_dir() if folder else Path(path).is_file()):
            log.warning(
                "MLflow: %s is not a %s (gone before its upload); not uploaded", path, "folder" if folder else "file"
            )
            return True
        return self._call(method, path, artifact_path)

    def _deliver(self) -> None:
        """Sends what is queued, in order by kind, until all is delivered or a call fails."""
        from mlflow.entities import Param, RunTag

        replaced = False  # a vanished run is replaced once per delivery: also in the last one
        while not self._closed:
            with self._changed:
                params = dict(list(self._params.items())[:100])  # MLflow caps a batch at 100 params
                tags = {} if params else dict(self._tags)
                if not (params or tags) and self._pending:
                    self._sending = self._pending[:1000]  # MLflow caps a batch at 1000 metrics
                    del self._pending[: len(self._sending)]
                artifact = self._artifacts[0] if not (params or tags or self._sending) and self._artifacts else None
                status = self._terminate if not (params or tags or self._sending or artifact) else None
            if params:
                sent = self._call("log_batch", params=[Param(k, v) for k, v in params.items()])
            elif tags:
                sent = self._call("log_batch", tags=[RunTag(k, v) for k, v in tags.items()])
            elif self._sending:
                sent = self._call("log_batch", metrics=self._sending)
            elif artifact:
                sent = self._upload(*artifact)
            elif status:
                sent = self._call("set_terminated", status)
            else:
                return
            with self._changed:
                if sent:
                    for delivered, kept, record in ((params, self._params, 0), (tags, self._tags, 1)):
                        self._delivered[record].update(delivered)
                        for key, value in delivered.items():
                            if kept.get(key) == value:  # not logged again meanwhile
                                del kept[key]
                    if artifact:
                        self._artifacts.remove(artifact)
                    if status:
                        self._terminate = None
                    self._version += 1
                else:  # in front of the newer ones, so the first dropped; counted once
                    self._pending[:0], self._sending = self._sending, []
                    self._drop_overflow()
                self._sending = []
                self._changed.notify_all()
            if not sent:
                if self.run_id is None and self._failing_since is None and not replaced:
                    replaced = True  # the run vanished: again, to a new one
                    continue
                return

    # The spool: what is not delivered yet, on disk.

    def _spool_document(self) -> dict:
        return {
            "run_id": self.run_id,
            "params": dict(self._params),
            "tags": dict(self._tags),
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self._sending + self._pending],
        }

    def _write_spool(self, due: bool) -> None:
        """Writes what is undelivered to the spool when it changed: always before sending (``due``),
        else at most every ``spool_every_s``."""
        if self._spool is None:
            return
        with self._spool_lock:
            with self._changed:
                if self._closed or self._version == self._spooled_version:
                    return
                if not self._holds_values():  # nothing to keep (``_remove_spool`` removes the file)
                    self._spooled_version = self._version
                    return
                if not due and time.monotonic() - self._spooled_at < self._spool_every_s:
                    return
                document, version = self._spool_document(), self._version
            if self._spool_written(document):
                self._spooled_version, self._spooled_at = version, time.monotonic()
            else:  # tried again in spool_every_s
                self._spooled_at = time.monotonic()

    def _spool_written(self, document: dict) -> bool:
        """Writes the spool whole or not at all; a failure (a full disk) is a warning, once."""
        try:
            _replace(self._spool, json.dumps(document))
        except OSError as error:
            if not self._spool_failed:
                log.warning("MLflow: cannot write %s (%s); undelivered values are not kept on disk", self._spool, error)
            self._spool_failed = True
            return False
        self._spool_failed = False
        return True

    def _remove_spool(self) -> None:
        if self._spool is None:
            return
        with self._spool_lock, self._changed:
            if not self._closed and not self._holds_values():
                _remove(self._spool)
                self._changed.notify_all()  # a flush waits for it

    def _keep_the_rest(self) -> None:
        """At the end of an attempt: the spool holds what is undelivered, or is gone."""
        self._report_dropped(f"while {self.uri} did not answer")
        with self._spool_lock, self._changed:
            counts = (len(self._params), len(self._tags), len(self._sending) + len(self._pending))
            document = self._spool_document()
        if not any(counts):
            if self._spool is not None:
                _remove(self._spool)
            return
        if self._spool is None:
            log.warning(
                "MLflow: %d params, %d tags and %d metric values could not be delivered to %s", *counts, self.uri
            )
            return
        with self._spool_lock:
            if not self._spool_written(document):
                return
        log.warning(
            "MLflow: %d params, %d tags and %d metric values not delivered to %s are kept in %s; the next attempt "
            "on this run folder delivers them",
            *counts,
            self.uri,
            self._spool,
        )

    def _read_spool(self) -> None:
        """Takes over what an earlier attempt could not deliver, ahead of this one's; the file stays
        until they are delivered."""
        if self._spool is None or not self._spool.is_file():
            return
        from mlflow.entities import Metric

        try:
            # a metric may be NaN or inf (a diverged loss): logged as such, so the spool keeps them
            kept = loads(self._spool.read_text(), allow_non_finite=True, object_pairs_hook=unique_keys)
            run_id = kept["run_id"]
            params, tags = {str(k): str(v) for k, v in kept["params"].items()}, dict(kept["tags"])
            metrics = [Metric(str(k), float(v), int(t), int(s)) for k, v, t, s in kept["metrics"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            log.warning("MLflow: %s is unreadable (%s); its values are not delivered", self._spool, error)
            return
        self.continued = True
        if self.run_id is None and isinstance(run_id, str):
            self.run_id = run_id  # created after the checkpoint this attempt resumed from was saved
        self._params, self._tags, self._pending = params, tags, metrics
        self._version = self._spooled_version = 1  # on disk as it is
        log.warning("MLflow: delivering %d metric values kept by the previous attempt", len(metrics))


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:  # e.g. a read-only run folder: the next attempt delivers the values again
        log.warning("MLflow: cannot remove %s (%s)", path, error)


def _replace(path: Path, text: str) -> None:
    """Writes ``path`` whole or not at all (a reader never sees half a file)."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)


def _brief(error: Exception) -> tuple[str, str]:
    return type(error).__name__, (str(error).splitlines() or [""])[0][:200]
