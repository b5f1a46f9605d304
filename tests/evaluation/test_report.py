"""The report: rows measured by one scoring function for model, oracle and chance; JSON that round
trips (NaN and inf as null); MLflow names ``eval/<task>/<metric>/<reference>``; bad names refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatron_cosmos3.evaluation.closed_loop import Episode, SuccessRate
from megatron_cosmos3.evaluation.report import EvalReport, MetricRow
from megatron_cosmos3.evaluation.video import psnr, ssim


def test_rows_are_measured_alike_and_survive_json_and_mlflow(world_clips):
    true = world_clips[1].frames
    late = np.concatenate([true[:1], true[:-1]])
    noise = np.random.default_rng(0).integers(0, 256, true.shape, dtype=np.uint8)
    report = EvalReport(meta={"checkpoint": "step-100", "seeds": [0, 1]})
    report.add(MetricRow.measure("forward_dynamics/ssim", lambda p: ssim(p, true), late, true, noise))
    report.add(MetricRow.measure("forward_dynamics/psnr_db", lambda p: psnr(p, true), late, true, noise, unit="dB"))
    success = SuccessRate.of([Episode(0, True), Episode(1, False)])
    report.add(MetricRow("policy/closed_loop_success", success.rate, 1.0, float("nan"), note="chance: not run"))
    row = report["forward_dynamics/ssim"]
    assert row.oracle == pytest.approx(1.0) and row.chance < row.model < row.oracle

    text = report.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = EvalReport.from_json(text)
    assert back.meta == report.meta and [r.name for r in back.rows] == [r.name for r in report.rows]
    assert back["forward_dynamics/psnr_db"] == report["forward_dynamics/psnr_db"]
    assert math.isnan(back["policy/closed_loop_success"].chance)

    metrics = report.mlflow_metrics()
    assert metrics["eval/forward_dynamics/ssim/oracle"] == pytest.approx(1.0)
    assert metrics["eval/policy/closed_loop_success/model"] == 0.5
    assert "eval/policy/closed_loop_success/chance" not in metrics  # not measured: not logged
    assert len(metrics) == 3 + 3 + 2


def test_bad_rows_are_refused_by_name():
    with pytest.raises(ValueError, match="metric name 'psnr\\?' must be"):
        MetricRow("psnr?", 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="video/psnr.model must be a number, got 'high'"):
        MetricRow("video/psnr", "high", 1.0, 1.0)
    report = EvalReport()
    report.add(MetricRow("video/psnr", 1.0, 2.0, 0.0))
    with pytest.raises(ValueError, match="already has a metric named 'video/psnr'"):
        report.add(MetricRow("video/psnr", 1.0, 2.0, 0.0))
    with pytest.raises(KeyError, match="no metric 'video/ssim'"):
        report["video/ssim"]


@pytest.mark.parametrize("name", ["video/./psnr", "video/", "/video/psnr", "../psnr", "video/../psnr"])
def test_a_name_mlflow_reads_as_another_path_is_refused_when_the_row_is_made(name):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric_name

    with pytest.raises(MlflowException):  # control: MLflow's own check refuses it (after the whole run)
        _validate_metric_name(f"eval/{name}/model")
    with pytest.raises(ValueError, match="metric name .* must be"):
        MetricRow(name, 1.0, 1.0, 1.0)


def test_names_mlflow_takes_are_kept():
    from mlflow.utils.validation import _validate_metric_name

    report = EvalReport(
        [MetricRow("closed_loop/single_arm/policy/success_rate", 1, 1, 0), MetricRow("a.b/c-d e", 1, 1, 1)]
    )
    for name in report.mlflow_metrics():
        _validate_metric_name(name)


def test_a_nan_in_meta_is_an_error_not_a_bare_nan_in_the_json():
    report = EvalReport([MetricRow("video/psnr", 1.0, 2.0, 0.0)], meta={"clips": {"fps": float("nan")}})
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        report.to_json()


def rows(*models: str) -> str:
    """A report's text whose rows are video/psnr with the model value written as each of ``models``."""
    written = [f'{{"name": "video/psnr", "model": {model}, "oracle": 2.0, "chance": 0.0}}' for model in models]
    return f'{{"rows": [{", ".join(written)}]}}'


@pytest.mark.parametrize(
    "text, message",
    [
        # json.loads read 1e999 as inf and NaN as NaN: a damaged report was taken as a measured one
        (rows("1e999"), r"rows\[0\].model=1e999 is not a finite number"),
        (rows("NaN"), r"rows\[0\].model=NaN is not a finite number"),
        # a bare ValueError, KeyError or TypeError naming neither the file nor the row
        (rows('"high"'), r"rows\[0\]: video/psnr.model must be a number, got 'high'"),
        (rows("1", "1"), r"rows\[1\]: the report already has a metric named"),
        ('{"rows": [{"name": "video/psnr"}]}', r"rows\[0\]=\{'name': 'video/psnr'\} is no metric row"),
        # an AttributeError or OverflowError naming neither; "no" read as true
        ('{"rows": [{"name": 5, "model": 1, "oracle": 1, "chance": 1}]}', r"rows\[0\]: metric name 5 must be"),
        (rows("1" + "0" * 400), r"rows\[0\]: video/psnr.model is an integer past the float range"),
        (rows('1, "higher_is_better": "no"'), r"rows\[0\]: video/psnr.higher_is_better must be a bool, got 'no'"),
        (rows('1, "unit": 3'), r"rows\[0\]: video/psnr.unit must be a str, got 3"),
        (rows('1, "note": null'), r"rows\[0\]: video/psnr.note must be a str, got None"),
        ('{"meta": {}}', r"expected an object whose 'rows' is a list of metric rows"),
        ('{"rows": [], "meta": [1]}', r"meta=\[1\] must be an object"),
        ('{"rows": [], "rows": []}', r"not JSON \(key\(s\) \['rows'\] given twice\)"),
        ('{"rows": [', r"not JSON \(Expecting value"),
    ],
)
def test_a_damaged_report_is_refused_naming_the_file_and_the_field(text, message):
    with pytest.raises(ValueError, match=rf"^out/report.json: {message}"):
        EvalReport.from_json(text, "out/report.json")
    back = EvalReport.from_json(rows("null"), "out/report.json")  # control: null is NaN
    assert math.isnan(back["video/psnr"].model) and back["video/psnr"].oracle == 2.0
