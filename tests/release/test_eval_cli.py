"""``cosmos3-eval`` on the tiny checkpoint trained under TP=2: the JSON report holds every suite task
with its oracle and chance rows and reads back, the oracle rows score perfectly where the metric
allows, MLflow gets the same numbers, the media are predicted | true side by side, two ranks with TP=2
give the report of one process, and bad config values are errors naming them."""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_cosmos3.eval_suite.config import SUITE_TASKS
from megatron_cosmos3.evaluation.closed_loop import Episode
from megatron_cosmos3.evaluation.report import REFERENCES, EvalReport
from megatron_cosmos3.evaluation.rows import closed_loop_rows
from megatron_cosmos3.evaluation.video import PSNR_MAX_DB
from megatron_cosmos3.release.eval_cli import REPORT_FILE, every_episode_failed, main
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.media_probe import ffprobe_streams
from megatron_cosmos3.testing.training import tracking_store

pytestmark = pytest.mark.multiprocess

SUITE = ["steps=2", "cases_per_task=1", "max_new_tokens=4"]
# One closed-loop episode of one environment task per embodiment: the model's policy in the world.
CLOSED_LOOP = ["closed_loop_episodes=1", "closed_loop_tasks=[stop_ball]"]
# Where the truth through the metric is the best value (the onset error's floor is the detector's own).
ORACLE = {
    "psnr_db": PSNR_MAX_DB,
    "ssim": 1.0,
    "position_error_m": 0.0,
    "balls_missed": 0.0,
    "onset_f1": 1.0,
    "action_rmse": 0.0,
    "action_rmse_worst_dim": 0.0,
    "right_colours": 1.0,
    "right_colours_and_counts": 1.0,
    "accuracy": 1.0,
}


@pytest.fixture(scope="module")
def evaluated(tiny_tp2_checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval-cli")
    argv = ["--checkpoint", str(tiny_tp2_checkpoint), "--out", str(folder / "out"), *SUITE, *CLOSED_LOOP]
    argv += ["--tracking-uri", str(tracking_store(folder)), "--run-name", "eval-tiny"]
    assert main(argv) == 0
    return folder


def read_report(out: Path) -> EvalReport:
    return EvalReport.from_json((out / REPORT_FILE).read_text())


def test_the_report_has_every_task_with_oracle_and_chance_rows_and_reads_back(evaluated, tiny_tp2_checkpoint):
    text = (evaluated / "out" / REPORT_FILE).read_text()
    report = EvalReport.from_json(text)
    assert report.to_json() == text
    assert {row.name.split("/")[0] for row in report.rows} == {*SUITE_TASKS, "closed_loop"}
    assert report.meta["step"] == 1 and report.meta["checkpoint"] == str(tiny_tp2_checkpoint / "step_00000001")
    assert report.meta["skipped_tasks"] == {}
    for row in report.rows:
        metric = row.name.rsplit("/", 1)[1]
        assert row.unit, row.name  # a reader of report.json tells a fraction from a count or dB
        assert np.isfinite(row.model) and np.isfinite(row.oracle), row.name
        assert np.isfinite(row.chance) or metric == "onset_error_ms", row.name  # no onset matched: unmeasured
        if metric in ORACLE:
            assert row.oracle == ORACLE[metric], row.name
    assert report["video_to_audio/onset_error_ms"].oracle < 3.0
    # The chance row is another model (a fresh init), not the checkpoint again.
    assert report["policy/single_arm/action_rmse"].chance != report["policy/single_arm/action_rmse"].model


def test_mlflow_gets_the_reports_metrics_at_the_checkpoints_step(evaluated):
    from mlflow.tracking import MlflowClient

    report = read_report(evaluated / "out")
    client = MlflowClient(tracking_uri=f"sqlite:///{evaluated / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("megatron_cosmos3").experiment_id])
    assert run.info.run_name == "eval-tiny"
    assert (run.data.params["suite.steps"], run.data.params["suite.cases_per_task"]) == ("2", "1")
    logged = {name: client.get_metric_history(run.info.run_id, name) for name in run.data.metrics}
    want = report.mlflow_metrics()
    assert set(logged) == set(want) and all(name.split("/")[-1] in REFERENCES for name in want)
    for name, history in logged.items():
        assert [(m.step, m.value) for m in history] == [(1, pytest.approx(want[name]))], name
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert EvalReport.from_json((artifacts / REPORT_FILE).read_text()).rows == report.rows


def test_a_finished_run_leaves_its_report_and_media_and_no_partial_folder(evaluated):
    """media/ (closed-loop episodes, then the cases) is written into a hidden partial folder renamed
    into place at the end: nothing of it is left beside."""
    assert sorted(p.name for p in (evaluated / "out").iterdir()) == ["media", REPORT_FILE]
    assert {p.name for p in (evaluated / "out" / "media").iterdir()} == {*SUITE_TASKS, "closed_loop"}


def test_media_put_the_prediction_beside_the_truth_with_the_sound(evaluated):
    media = evaluated / "out" / "media"
    report = read_report(evaluated / "out")
    for task in ("forward_dynamics", "image_to_video", "video_to_audio", "text_to_video"):
        (index,) = report.meta["cases"][task]
        streams = ffprobe_streams(media / task / f"{task}_{index:05d}" / "side_by_side.mp4")
        video = streams["video"]
        assert (int(video["width"]), int(video["height"]), int(video["nb_read_frames"])) == (128, 64, 9), task
        assert int(streams["audio"]["channels"]) == 2, task
    (index,) = report.meta["cases"]["policy"]
    actions = np.load(media / "policy" / f"policy_{index:05d}" / "actions.npz")
    assert actions["predicted"].shape[1] == actions["true"].shape[1] == 19
    (index,) = report.meta["cases"]["understanding"]
    answer = json.loads((media / "understanding" / f"understanding_{index:05d}" / "answer.json").read_text())
    assert set(answer) == {"question", "predicted", "true"} and answer["question"].startswith("How many")


def _eval_on_rank(rank: int, world_size: int, argv: list[str]) -> int:
    return main(argv)


def test_tensor_parallel_on_two_ranks_gives_the_report_of_one_process(evaluated, tiny_tp2_checkpoint, tmp_path):
    """The command on two gloo ranks with TP=2, launched as torchrun launches it (its environment
    variables, ``main``) but forked by ``run_on_ranks``: no interpreter start-up per rank."""
    argv = ["--tensor-parallel", "2", "--checkpoint", str(tiny_tp2_checkpoint), "--out", str(tmp_path)]
    assert run_on_ranks(_eval_on_rank, 2, [*argv, *SUITE, *CLOSED_LOOP, "media=false"]) == [0, 0]
    one, two = read_report(evaluated / "out"), read_report(tmp_path)
    assert two.meta == one.meta and [r.name for r in two.rows] == [r.name for r in one.rows]
    for a, b in zip(one.rows, two.rows):
        for reference in REFERENCES:
            x, y = getattr(a, reference), getattr(b, reference)
            assert (np.isnan(x) and np.isnan(y)) or y == pytest.approx(x, rel=1e-4, abs=1e-6), (a.name, reference)
    assert not (tmp_path / "media").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["steps=0"], "steps=0"),
        (["tasks=[policy,juggling]"], "tasks=['policy', 'juggling']"),
        (["resolution=50"], "resolution=50"),
        (["duration_s=0.3"], "duration_s=0.3"),
        (["colour=red"], "colour"),
    ],
)
def test_a_bad_config_value_is_an_error_naming_it(tiny_tp2_checkpoint, tmp_path, capsys, overrides, message):
    argv = ["--checkpoint", str(tiny_tp2_checkpoint), "--out", str(tmp_path / "out"), *overrides]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_yaml_config_is_read_and_a_missing_checkpoint_named(tmp_path, capsys):
    config = tmp_path / "suite.yaml"
    config.write_text("cases_per_task: -2\n")
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(config)]) == 2
    assert "cases_per_task=-2" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err


def test_closed_loop_rows_put_the_models_policy_beside_the_expert_and_a_random_one(evaluated, tiny_tp2_checkpoint):
    """Every embodiment the model acts for drives the environment in closed loop: success with its
    Wilson bounds (oracle: the scripted expert, which solves the episode) and the open-loop action
    error on the expert's states; each policy's episode is an mp4 with its sound."""
    from megatron_cosmos3.release.trained import load_trained_model

    report = read_report(evaluated / "out")
    embodiments = sorted(load_trained_model(tiny_tp2_checkpoint).model.config.embodiments)
    assert embodiments
    for embodiment in embodiments:
        name = f"closed_loop/{embodiment}/stop_ball"
        success = report[f"{name}/success_rate"]
        assert success.oracle == 1.0 and report[f"{name}/success_low"].oracle < 1.0
        assert report[f"{name}/action_rmse"].oracle == 0.0 and report[f"{name}/action_rmse"].chance > 0
        for who in ("model", "expert", "random"):
            (clip,) = (evaluated / "out" / "media" / "closed_loop").glob(f"{embodiment}_stop_ball_seed*_{who}.mp4")
            assert int(ffprobe_streams(clip)["video"]["nb_read_frames"]) > 1 and "audio" in ffprobe_streams(clip)


@pytest.mark.parametrize(
    "out, message",
    [
        ("file.txt", "is not a folder"),
        ("ckpt", "is inside the checkpoint"),
        ("ckpt/step_00000001/eval", "is inside the checkpoint"),
        ("runs", "is inside the checkpoint"),  # a checkpoint directory (its `latest`) given as --out
        ("earlier", "already holds ['report.json', 'media'] of an earlier run"),
    ],
)
def test_an_out_colliding_with_a_file_the_checkpoint_or_an_earlier_report_is_refused(tmp_path, capsys, out, message):
    """Checked before the model loads: a file was a traceback after the whole suite; an earlier
    report's case folders were mixed with the new ones; a report went into the checkpoints."""
    (tmp_path / "file.txt").write_text("mine")
    (tmp_path / "ckpt" / "step_00000001").mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "latest").write_text("step_00000001")
    (tmp_path / "earlier" / "media" / "policy").mkdir(parents=True)
    (tmp_path / "earlier" / "report.json").write_text("{}")
    before = sorted(tmp_path.rglob("*"))
    argv = ["--checkpoint", str(tmp_path / "ckpt" / "step_00000001"), "--out", str(tmp_path / out), "media=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_a_tracking_server_address_without_its_scheme_is_refused_before_the_suite_runs(tmp_path, capsys):
    """'--tracking-uri 127.0.0.1:5000' was a local SQLite file of that name, written after the whole
    suite, which the server never saw; now the flag and its value are named before anything loads."""
    (tmp_path / "ckpt" / "step_00000001").mkdir(parents=True)
    argv = ["--checkpoint", str(tmp_path / "ckpt" / "step_00000001"), "--out", str(tmp_path / "out"), "media=false"]
    before = sorted(tmp_path.rglob("*"))
    for uri in ["127.0.0.1:5000", "http//mlflow-host:5000"]:
        assert main([*argv, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        assert f"--tracking-uri {uri!r}" in err and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before
    # the control: a path is a store; this run fails later, at the (empty) checkpoint
    assert main([*argv, "--tracking-uri", str(tmp_path / "mlflow.db")]) == 2
    assert "--tracking-uri" not in capsys.readouterr().err


def test_overwrite_replaces_only_an_earlier_report_and_media(tmp_path, capsys):
    from megatron_cosmos3.release.eval_cli import clear_earlier_outputs

    (tmp_path / "media" / "policy").mkdir(parents=True)
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    # A checkpoint that does not load stops the command before anything is removed.
    argv = ["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path), "--overwrite"]
    assert main(argv) == 2 and "nothing" in capsys.readouterr().err
    assert (tmp_path / "report.json").exists() and (tmp_path / "media" / "policy").is_dir()
    clear_earlier_outputs(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    # media/ a link to a folder elsewhere (rmtree refused it: an OSError traceback), report.json a
    # folder (unlink refused it): each is removed, the link's target left as it was.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("not ours")
    (tmp_path / "media").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "report.json").mkdir()
    clear_earlier_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "notes.txt"]
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "not ours"


def test_a_run_stopped_while_writing_media_leaves_no_report_and_no_media(tmp_path, monkeypatch):
    """report.json was written before media/: a run killed while writing the media left a report that
    said the run had finished. It comes last now, whole, so a report means a finished run. media/
    was written in place too, a stopped run leaving some cases' folders that looked like the set:
    it is written into a partial folder (``atomic_files.partial_folder``) renamed into place."""
    from types import SimpleNamespace

    from megatron_cosmos3.atomic_files import partial_folder
    from megatron_cosmos3.evaluation.report import MetricRow
    from megatron_cosmos3.release import eval_cli

    def interrupted(folder, cases, model):
        (folder / "policy").mkdir(parents=True)
        raise KeyboardInterrupt  # Ctrl-C mid-media

    result = SimpleNamespace(report=EvalReport([MetricRow("policy/action_rmse", 1.0, 0.0, 1.4)]), cases={}, model={})
    monkeypatch.setattr(eval_cli, "write_media", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eval_cli.write_outputs(result, tmp_path, partial_folder(tmp_path / "media"))
    assert not (tmp_path / REPORT_FILE).exists()
    assert not (tmp_path / "media").exists()
    monkeypatch.setattr(eval_cli, "write_media", lambda folder, cases, model: (folder / "policy").mkdir())
    out = tmp_path / "again"
    report = eval_cli.write_outputs(result, out, partial_folder(out / "media"))  # control: a finished run has both
    assert sorted(p.name for p in out.iterdir()) == ["media", REPORT_FILE]
    assert [p.name for p in (out / "media").iterdir()] == ["policy"]
    assert read_report(report.parent)["policy/action_rmse"].model == 1.0


def test_the_closed_loop_rows_where_every_model_episode_failed_are_named():
    """The command exits 2 after writing the report where every closed-loop episode of the model
    failed (a diverged policy), as it does for a diverged model's open-loop prediction."""
    expert = [Episode(seed, True) for seed in range(3)]
    failed = [
        Episode(seed, False, 4, "round 0: the policy's chunk holds 9 of 9 values NaN or Inf") for seed in range(3)
    ]
    one_ran = [Episode(0, False, 8), *failed[1:]]
    report = EvalReport()
    for name, model in (("closed_loop/arm/stop_ball", failed), ("closed_loop/arm/push", one_ran)):
        for row in closed_loop_rows(name, model, expert, expert):
            report.add(row)
    assert every_episode_failed(report, 3) == ["arm/stop_ball"]
    assert report["closed_loop/arm/push/failed_episodes"].model == 2  # control: one episode ran to its end
    assert every_episode_failed(report, 0) == []
