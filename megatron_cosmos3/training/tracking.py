"""MLflow tracking from rank 0 only; an unreachable tracking server never stops training."""

from __future__ import annotations

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
    then; a resumed run passes the id it saved and continues that run). An artifact is not kept
    (its file stays on disk, named in a warning). A request the server refuses (HTTP 4xx) is
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
    ):
        self.run_id: str | None = run_id
        self.uri = ""
        self._client = None
        self._experiment, self._run_name = experiment, run_name
        self._failing_since: float | None = None
        self._retry_after_s = retry_after_s
        self._params: list = []  # mlflow Param objects not yet delivered
        self._tags: dict[str, str] = {}
        self._pending: list = []  # mlflow Metric objects not yet delivered
        self._max_buffered = max_buffered
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
        self._start_run()

    @property
    def active(self) -> bool:
        """Tracking is on (the run may still wait for its server: ``run_id`` None)."""
        return self._client is not None

    def _backing_off(self) -> bool:
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
        from mlflow.entities import RunTag

        while self._params:
            if not self._call("log_batch", params=self._params[:100]):  # MLflow caps a batch at 100 params
                return
            del self._params[:100]
        if self._tags:
            if not self._call("log_batch", tags=[RunTag(k, v) for k, v in self._tags.items()]):
                return
            self._tags.clear()
        while self._pending:
            batch = self._pending[:1000]  # MLflow caps a batch at 1000 metrics
            if not self._call("log_batch", metrics=batch):
                return
            del self._pending[: len(batch)]

    def log_params(self, params: dict[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        self._params += [Param(k, v[:6000]) for k, v in params.items()]
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
        if not self.active:
            return
        self._failing_since = None  # one last attempt to deliver what is kept
        self._flush()
        if not (self._params or self._tags or self._pending):
            self._call("set_terminated", status)
        else:
            log.warning(
                "MLflow: %d params, %d tags and %d metric values could not be delivered to %s",
                len(self._params),
                len(self._tags),
                len(self._pending),
                self.uri,
            )


def _brief(error: Exception) -> tuple[str, str]:
    return type(error).__name__, (str(error).splitlines() or [""])[0][:200]
