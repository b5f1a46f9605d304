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


class MLflowTracker:
    """Logs params, metrics and artifacts to one MLflow run; a no-op on ranks other than 0.

    An unreachable tracking server never stops or stalls training: a failed call starts a back-off
    (``retry_after_s``) during which nothing is sent; metrics logged meanwhile are buffered (up to
    ``max_buffered`` values, the oldest dropped beyond that, with a count) and flushed once the
    server answers again. One warning per outage.
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
        self.run_id: str | None = None
        self.uri = ""
        self._client = None
        self._failing_since: float | None = None
        self._retry_after_s = retry_after_s
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
            if run_id is None:
                found = self._client.get_experiment_by_name(experiment)
                experiment_id = (
                    found.experiment_id
                    if found
                    else self._client.create_experiment(experiment, artifact_location=_artifact_location(self.uri))
                )
                run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
            self.run_id = run_id
        except Exception as error:  # noqa: BLE001 — any tracking failure must not stop training
            log.warning(
                "MLflow tracking unavailable at %s (%s: %s); training without it",
                self.uri,
                type(error).__name__,
                str(error).splitlines()[0][:200],
            )
            self._client = None

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    def _backing_off(self) -> bool:
        return self._failing_since is not None and time.monotonic() - self._failing_since < self._retry_after_s

    def _call(self, method: str, *args, **kwargs) -> bool:
        if not self.active or self._backing_off():
            return False
        try:
            getattr(self._client, method)(self.run_id, *args, **kwargs)
        except Exception as error:  # noqa: BLE001
            if self._failing_since is None:
                log.warning(
                    "MLflow tracking failed (%s: %s); buffering metrics and retrying every %.0fs",
                    type(error).__name__,
                    str(error).splitlines()[0][:200],
                    self._retry_after_s,
                )
            self._failing_since = time.monotonic()
            return False
        if self._failing_since is not None:
            log.warning("MLflow tracking recovered")
            self._failing_since = None
        return True

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call("log_batch", params=items[start : start + 100])

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
        while self._pending:
            batch = self._pending[:1000]  # MLflow caps a batch at 1000 metrics
            if not self._call("log_batch", metrics=batch):
                return
            del self._pending[: len(batch)]

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path, artifact_path)

    def log_artifacts(self, directory: str, artifact_path: str | None = None) -> None:
        """Every file under ``directory``, under ``artifact_path`` in the run's artifacts."""
        self._call("log_artifacts", directory, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self._call("set_tag", key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self._pending:
            self._failing_since = None  # one last attempt to deliver what is buffered
            self.log_metrics({}, 0)
        self._call("set_terminated", status)
