"""The mid-training transfer experiment (launch/transfer_experiment.py) end to end at its smoke size:
real worlds from generate_world.py, the trainer's three stages (the post-training stage adds the
held-out pusher and reads its demonstrations), closed loop of both post-trained models."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from megatron_cosmos3.release.trained import load_trained_model

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "transfer_experiment.py"


def _script():
    spec = importlib.util.spec_from_file_location("transfer_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_transfer_experiment_runs_end_to_end_at_smoke_size(tmp_path):
    script = _script()
    script.main([str(tmp_path), "--smoke"])
    result = json.loads((tmp_path / "transfer-K1.json").read_text())
    assert [(run["start"], run["seed"]) for run in result["runs"]] == [("pretrained", 0), ("midtrained", 0)]
    for run in result["runs"]:
        names = {row["name"] for row in run["rows"]}
        assert "closed_loop/planar_pusher/push_to_region/success_rate" in names
        assert "closed_loop/planar_pusher/push_to_region/action_rmse" in names
    summary = result["summary"]
    assert summary["expert"]["action_rmse_mean"] == 0.0 and summary["pretrained"]["episodes"] == 2
    table = (tmp_path / "transfer-K1.md").read_text()
    assert "| pretrained |" in table and "| midtrained |" in table and "K = 1" in table
    # Each post-trained model started from its own stage and learnt the pusher's head on its data.
    post = load_trained_model(tmp_path / "posttrain" / "midtrained-K1-seed0")
    assert "planar_pusher" in post.model.config.embodiments and post.step == 1
    assert post.config.stage.init_from == str(tmp_path / "midtrain")
    assert (tmp_path / "media" / "midtrained-K1" / "planar_pusher_push_to_region_seed10000_model.mp4").stat().st_size
    # A finished stage is reused, not trained again: its checkpoints stay as they were.
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "pretrain").rglob("*"))
    sizes = script.SMOKE
    shards = tmp_path / "worlds" / "clips" / "latent"
    script.train_stage("pretrain", tmp_path / "pretrain", shards, sizes.pretrain_steps, sizes, init_from=None)
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "pretrain").rglob("*")) == before


def _rows(success: float, rmse: float, failed: int, who: str = "model") -> list[dict]:
    task = "closed_loop/planar_pusher/push_to_region"
    other = {"model": 0.0, "oracle": 1.0, "chance": 0.0}
    values = {"success_rate": success, "action_rmse": rmse, "failed_episodes": failed}
    return [{"name": f"{task}/{metric}", **other, who: value} for metric, value in values.items()]


def test_the_summary_counts_failed_episodes_and_leaves_an_unmeasured_seed_out_of_the_action_error():
    """A seed whose model diverged (every chunk NaN: its episodes failed, its action error NaN) is
    counted as failures and named as unmeasured; the other seeds' action error is still reported."""
    script = _script()
    sizes = script.replace(script.SMOKE, tasks=("push_to_region",), episodes=4, seeds=(0, 1, 2))
    runs = [
        {"start": "pretrained", "seed": 0, "rows": _rows(0.5, 0.2, 0)},
        {"start": "pretrained", "seed": 1, "rows": _rows(0.0, float("nan"), 4)},
        {"start": "pretrained", "seed": 2, "rows": _rows(0.25, 0.4, 1)},
        {"start": "midtrained", "seed": 0, "rows": _rows(1.0, 0.1, 0)},
        {"start": "midtrained", "seed": 1, "rows": _rows(0.75, 0.3, 0)},
        {"start": "midtrained", "seed": 2, "rows": _rows(0.5, 0.2, 0)},
    ]
    summary = script.summarise(runs, sizes)
    pre = summary["pretrained"]
    assert pre["failed_episodes"] == 5 and pre["episodes"] == 12 and pre["successes"] == 3
    assert pre["action_rmse_unmeasured_seeds"] == 1
    assert pre["action_rmse_mean"] == pytest.approx(0.3) and pre["action_rmse_std"] == pytest.approx(0.1)
    assert summary["midtrained"]["failed_episodes"] == 0 and summary["midtrained"]["action_rmse_unmeasured_seeds"] == 0
    table = script.markdown({"sizes": script.asdict(sizes), "summary": summary, "date": "d", "machine": "m"})
    assert "| 5/12 | 0.300 ± 0.100 (1 seed(s) not measured: non-finite actions) |" in table
