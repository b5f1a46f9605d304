"""MLflow tracking from rank 0 only; an unreachable tracking server never stops training."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _as_uri(tracking_uri: str) -> str:
    # A bare path is a local SQLite store (MLflow's file store no longer accepts writes).
    if "://" in tracking_uri or tracking_uri.startswith(("file:", "sqlite:")):
        return tracking_uri
    path = Path(tracking_uri).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _artifact_location(uri: str) -> str | None:
    # Keep a local store's artifacts beside its database rather than in the working directory.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def _refused(error: Exception) -> bool:
    """Whether the server refused the request itself (an HTTP 4xx: a bad value, a run that does not
    exist), which no retry will change; anything else (connection refused, timeouts, 5xx, a full
    disk) is an outage that may end."""
    status = getattr(error, "get_http_status_code", None)
    return status is not None and 400 <= status() < 500


class MLflowTracker:
    """Logs params, tags, metrics and artifacts to one MLflow run; a no-op on ranks other than 0.

    An unreachable or failing tracking server never stops or stalls training: a failed call starts
    a back-off (``retry_after_s``) during which nothing is sent. Params, tags and metrics logged
    meanwhile are kept (metrics up to ``max_buffered`` values, the oldest dropped beyond that,
    with a count) and delivered in order once the server answers again — also when it never
    answered at start: the run is created at the first call that reaches it (``run_id`` None until
    then; a resumed run passes the id it saved and continues that run). What is still undelivered
    when the attempt ends (``finish``, ``suspend``) is written to ``spool`` (JSON, in the run
    folder), and the next tracker given that file (the resumed attempt) delivers it first. An
    artifact is not kept (its file stays on disk, named in a warning). A request the server refuses
    (HTTP 4xx) is dropped with a warning instead of retried forever. One warning per outage.
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
    ):
        self.run_id: str | None = run_id
        # This continues an MLflow run of an earlier attempt (its id given, or its spool read):
        # its params are there, or on their way.
        self.continued = run_id is not None
        self.uri = ""
        self._client = None
        self._experiment, self._run_name = experiment, run_name
        self._failing_since: float | None = None
        self._last_attempt = False  # at the end of an attempt: one more try, whatever the back-off
        self._retry_after_s = retry_after_s
        self._params: dict[str, str] = {}  # not yet delivered (MLflow refuses one key twice in a batch)
        self._tags: dict[str, str] = {}
        self._pending: list = []  # mlflow Metric objects not yet delivered
        self._max_buffered = max_buffered
        self._spool = Path(spool) if spool else None
        self.dropped_metrics = 0
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
        self._start_run()

    @property
    def active(self) -> bool:
        """Tracking is on (the run may still wait for its server: ``run_id`` None)."""
        return self._client is not None

    def _backing_off(self) -> bool:
        if self._last_attempt:
            return False
        return self._failing_since is not None and time.monotonic() - self._failing_since < self._retry_after_s

    def _failed(self, error: Exception) -> None:
        if self._failing_since is None:
            log.warning(
                "MLflow tracking failed at %s (%s: %s); keeping params and metrics and retrying every %.0fs",
                self.uri,
                *_brief(error),
                self._retry_after_s,
            )
        self._failing_since = time.monotonic()
        self._last_attempt = False  # one failure ends it: the server is still down

    def _answered(self) -> None:
        if self._failing_since is not None:
            log.warning("MLflow tracking recovered at %s: delivering what was kept", self.uri)
            self._failing_since = None

    def _start_run(self) -> bool:
        """Creates the run (and its experiment) if it has none yet; False while the server fails."""
        if self.run_id is not None:
            return True
        if self._backing_off():
            return False
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
        self._answered()
        return True

    def _call(self, method: str, *args, **kwargs) -> bool:
        """True once the server took the request, or refused it for good (dropped, warned); False
        when it should be sent again after the back-off."""
        if not self.active or not self._start_run() or self._backing_off():
            return False
        try:
            getattr(self._client, method)(self.run_id, *args, **kwargs)
        except Exception as error:  # noqa: BLE001
            if _refused(error):
                log.warning("MLflow refused %s (%s: %s); dropped", method, *_brief(error))
                return True
            self._failed(error)
            return False
        self._answered()
        return True

    def _flush(self) -> None:
        """Delivers what is kept, in the order it was logged by kind: params, tags, metrics."""
        from mlflow.entities import Param, RunTag

        while self._params:
            batch = list(self._params.items())[:100]  # MLflow caps a batch at 100 params
            if not self._call("log_batch", params=[Param(k, v) for k, v in batch]):
                return
            for key, _ in batch:
                del self._params[key]
        if self._tags:
            if not self._call("log_batch", tags=[RunTag(k, v) for k, v in self._tags.items()]):
                return
            self._tags.clear()
        while self._pending:
            batch = self._pending[:1000]  # MLflow caps a batch at 1000 metrics
            if not self._call("log_batch", metrics=batch):
                return
            del self._pending[: len(batch)]

    @property
    def undelivered(self) -> bool:
        return bool(self._params or self._tags or self._pending)

    def log_params(self, params: dict[str, str]) -> None:
        if not self.active:
            return
        self._params.update({k: v[:6000] for k, v in params.items()})
        self._flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._pending) > self._max_buffered:
            overflow = len(self._pending) - self._max_buffered
            self.dropped_metrics += overflow
            del self._pending[:overflow]
            log.warning(
                "MLflow unreachable: dropped %d buffered metric values (%d so far)", overflow, self.dropped_metrics
            )
        self._flush()

    def set_tag(self, key: str, value: str) -> None:
        if not self.active:
            return
        self._tags[key] = value
        self._flush()

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._artifact("log_artifact", path, artifact_path)

    def log_artifacts(self, directory: str, artifact_path: str | None = None) -> None:
        """Every file under ``directory``, under ``artifact_path`` in the run's artifacts."""
        self._artifact("log_artifacts", directory, artifact_path)

    def _artifact(self, method: str, path: str, artifact_path: str | None) -> None:
        if self.active and not self._call(method, path, artifact_path):
            log.warning("MLflow: %s not uploaded (the server is failing); it stays on disk", path)

    def finish(self, status: str = "FINISHED") -> None:
        """The end of the run: delivers what is kept and ends the run with ``status``; what the
        server does not take is spooled (``suspend``) and the run left open."""
        if not self.active:
            return
        self._last_attempt = True
        self._flush()
        if not self.undelivered:
            self._call("set_terminated", status)
        self._last_attempt = False
        self._keep_the_rest()

    def suspend(self) -> None:
        """The end of an attempt that a later one continues (preempted, failed): one last delivery,
        then what remains goes to the spool file for the next attempt (a warning where there is none)."""
        if not self.active:
            return
        self._last_attempt = True
        self._flush()
        self._last_attempt = False
        self._keep_the_rest()

    def _keep_the_rest(self) -> None:
        if not self.undelivered:
            return
        counts = (len(self._params), len(self._tags), len(self._pending))
        if self._spool is None:
            log.warning(
                "MLflow: %d params, %d tags and %d metric values could not be delivered to %s", *counts, self.uri
            )
            return
        document = {
            "run_id": self.run_id,
            "params": self._params,
            "tags": self._tags,
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self._pending],
        }
        partial = self._spool.with_name(self._spool.name + ".tmp")
        partial.write_text(json.dumps(document))
        os.replace(partial, self._spool)
        log.warning(
            "MLflow: %d params, %d tags and %d metric values not delivered to %s are kept in %s; the next attempt "
            "on this run folder delivers them",
            *counts,
            self.uri,
            self._spool,
        )

    def _read_spool(self) -> None:
        """Takes over what the previous attempt could not deliver (``suspend``), ahead of this one's."""
        if self._spool is None or not self._spool.is_file():
            return
        from mlflow.entities import Metric

        try:
            kept = json.loads(self._spool.read_text())
            run_id = kept["run_id"]
            params, tags = {str(k): str(v) for k, v in kept["params"].items()}, dict(kept["tags"])
            metrics = [Metric(str(k), float(v), int(t), int(s)) for k, v, t, s in kept["metrics"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("MLflow: %s is unreadable (%s); its values are not delivered", self._spool, error)
            return
        self.continued = True
        if self.run_id is None and isinstance(run_id, str):
            self.run_id = run_id  # created after the checkpoint this attempt resumed from was saved
        self._params = {**params, **self._params}
        self._tags = {**tags, **self._tags}
        self._pending = metrics + self._pending
        self._spool.unlink()
        log.warning("MLflow: delivering %d metric values kept by the previous attempt", len(metrics))


def _brief(error: Exception) -> tuple[str, str]:
    return type(error).__name__, (str(error).splitlines() or [""])[0][:200]
