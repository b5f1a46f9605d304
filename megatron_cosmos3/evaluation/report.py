"""The evaluation report: every metric's value with two reference rows measured by the same code,
the oracle (ground truth through the metric: the best possible) and chance (a random or untrained
prediction), serialisable to JSON and flattenable to MLflow metric names (docs/DESIGN.md,
"Evaluation")."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from megatron_cosmos3.json_files import parse_json

REFERENCES = ("model", "oracle", "chance")
# MLflow's metric-name alphabet; "/" nests names in its UI.
_NAME = re.compile(r"^[A-Za-z0-9_\-./ ]+$")


@dataclass(frozen=True)
class MetricRow:
    """One metric of one task: ``name`` like ``forward_dynamics/psnr_db``; ``model``, ``oracle``
    and ``chance`` its value for the evaluated model and the two references (NaN: not measured);
    ``unit`` for people; ``higher_is_better`` says which way is good; ``note`` what the
    references were (e.g. "scale: dataset std")."""

    name: str
    model: float
    oracle: float
    chance: float
    unit: str = ""
    higher_is_better: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        # MLflow also refuses a name that reads as another path once prefixed ("eval/a/./b", "eval/a/",
        # "eval//a", "eval/../a": its check wants posixpath.normpath to keep the name).
        path_like = isinstance(self.name, str) and any(part in ("", ".", "..") for part in self.name.split("/"))
        if not isinstance(self.name, str) or not self.name or not _NAME.match(self.name) or path_like:
            raise ValueError(
                f"metric name {self.name!r} must be letters, digits, '_-./ ', in '/'-separated parts, none "
                "empty, '.' or '..'"
            )
        # A report read back (``EvalReport.from_json``) may hold any JSON there: "no" read as true.
        for setting, kind in (("unit", str), ("higher_is_better", bool), ("note", str)):
            if not isinstance(getattr(self, setting), kind):
                raise ValueError(f"{self.name}.{setting} must be a {kind.__name__}, got {getattr(self, setting)!r}")
        for reference in REFERENCES:
            value = getattr(self, reference)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{self.name}.{reference} must be a number, got {value!r}")
            if isinstance(value, int) and abs(value) > sys.float_info.max:  # float() raised OverflowError
                raise ValueError(f"{self.name}.{reference} is an integer past the float range")
            object.__setattr__(self, reference, float(value))

    @classmethod
    def measure(
        cls,
        name: str,
        score: Callable[[Any], float],
        model: Any,
        oracle: Any,
        chance: Any,
        unit: str = "",
        higher_is_better: bool = True,
        note: str = "",
    ) -> MetricRow:
        """The row of one metric: ``score`` (a prediction -> its value against the truth it
        closes over) applied alike to the model's prediction, the oracle's (the truth, or the true
        media where the metric reads media) and chance's (a random or untrained prediction)."""
        return cls(name, score(model), score(oracle), score(chance), unit, higher_is_better, note)


_ROW_FIELDS = frozenset(f.name for f in fields(MetricRow))


@dataclass
class EvalReport:
    """Rows in the order added; ``meta`` says what was evaluated (checkpoint, step, seeds ...)."""

    rows: list[MetricRow] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def add(self, row: MetricRow) -> MetricRow:
        if any(r.name == row.name for r in self.rows):
            raise ValueError(f"the report already has a metric named {row.name!r}")
        self.rows.append(row)
        return row

    def __getitem__(self, name: str) -> MetricRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no metric {name!r} in the report; it has {[r.name for r in self.rows]}")

    def to_json(self) -> str:
        """Standard JSON: a value not measured (NaN) or unbounded (inf) is written as null."""
        clean = lambda v: v if isinstance(v, float) and math.isfinite(v) else None  # noqa: E731
        rows = [{k: clean(v) if k in REFERENCES else v for k, v in asdict(row).items()} for row in self.rows]
        # allow_nan=False: a NaN that reached meta is an error here, not a bare NaN other parsers refuse
        return json.dumps({"meta": self.meta, "rows": rows}, indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, where: str = "the report") -> EvalReport:
        """The report ``to_json`` wrote; ValueError naming ``where`` (the file it was read from) and
        the field for text that is not strict JSON (``json_files.parse_json``) or not a report."""
        data = parse_json(text, where)
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise ValueError(f"{where}: expected an object whose 'rows' is a list of metric rows")
        if not isinstance(data.get("meta", {}), dict):
            raise ValueError(f"{where}: meta={data['meta']!r:.200} must be an object")
        report = cls(meta=data.get("meta", {}))
        for i, row in enumerate(data["rows"]):
            if not isinstance(row, dict) or set(row) - _ROW_FIELDS or not {"name", *REFERENCES} <= set(row):
                raise ValueError(f"{where}: rows[{i}]={row!r:.200} is no metric row (fields: {sorted(_ROW_FIELDS)})")
            measured = {k: float("nan") if v is None and k in REFERENCES else v for k, v in row.items()}  # null: NaN
            try:
                report.add(MetricRow(**measured))
            except ValueError as error:  # a bad name or value, a name given twice
                raise ValueError(f"{where}: rows[{i}]: {error}") from None
        return report

    def mlflow_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """``{prefix}/{name}/{model|oracle|chance}`` -> value, finite values only (MLflow's log_batch)."""
        return {
            f"{prefix}/{row.name}/{reference}": getattr(row, reference)
            for row in self.rows
            for reference in REFERENCES
            if math.isfinite(getattr(row, reference))
        }
