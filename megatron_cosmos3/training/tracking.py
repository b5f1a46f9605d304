"""MLflow tracking from rank 0 only; an unreachable tracking server never stops training."""

from __future__ import annotations

import logging
import os
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
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


class MLflowTracker:
    """Logs params, metrics and artifacts to one MLflow run; a no-op on ranks other than 0.

    Every call is guarded: when the server is down the values are dropped with a warning (one per
    failure streak), and training goes on.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, enabled: bool, run_id: str | None = None):
        self.run_id: str | None = None
        self._client = None
        self._failing = False
        if not enabled:
            return
        # Fail fast instead of MLflow's default minutes of retries when a server is unreachable.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        from mlflow.tracking import MlflowClient

        self.uri = _as_uri(tracking_uri)
        try:
            self._client = MlflowClient(tracking_uri=self.uri)
            if run_id is None:
                found = self._client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else self._client.create_experiment(
                    experiment, artifact_location=_artifact_location(self.uri))
                run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
            self.run_id = run_id
        except Exception as error:  # noqa: BLE001 — any tracking failure must not stop training
            self._warn(error)
            self._client = None

    def _warn(self, error: Exception) -> None:
        if not self._failing:
            log.warning("MLflow tracking failed (%s: %s); dropping values until it recovers",
                        type(error).__name__, str(error).splitlines()[0][:200])
        self._failing = True

    def _call(self, method: str, *args, **kwargs) -> None:
        if self._client is None or self.run_id is None:
            return
        try:
            getattr(self._client, method)(self.run_id, *args, **kwargs)
            self._failing = False
        except Exception as error:  # noqa: BLE001
            self._warn(error)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call("log_batch", params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call("log_batch", metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self._call("set_tag", key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", status)
