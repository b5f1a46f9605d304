"""``cosmos3-eval``: a trained checkpoint measured in the generated world (docs/DESIGN.md,
"Evaluation").

    cosmos3-eval --checkpoint outputs/demo/checkpoints --out eval/ [--config suite.yaml] [steps=4 ...]
    torchrun --nproc-per-node 2 -m megatron_cosmos3.release.eval_cli --tensor-parallel 2 ...

The checkpoint is a ``step_<N>`` folder, a checkpoint directory (its ``latest``) or a release
folder, saved under any layout (``release.trained.load_trained_model``); the suite's settings come
from ``eval_suite.config.SuiteConfig``: its defaults, then ``--config`` YAML, then ``key=value``
overrides. Writes ``OUT/report.json`` (``evaluation.report.EvalReport``: every metric with its
oracle and chance rows) and, unless ``media=false``, ``OUT/media/<task>/<case>/`` (predicted |
true side by side: ``eval_suite.media``); with ``--tracking-uri``, the report's metrics as
``eval/<task>/<metric>/<model|oracle|chance>`` at the checkpoint's step, and the report and media
as artifacts, in one MLflow run. Under ``torchrun`` every rank runs its part of the model under
``--tensor-parallel`` and rank 0 writes. ``media/`` is written into a hidden partial folder
(closed-loop episodes, then the cases) and renamed into place, so a stopped run leaves no
``media/`` that looks whole; a later run into ``--out`` removes what a killed one left
(``atomic_files.remove_stale_partial_folders``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_cosmos3.atomic_files import partial_folder, remove_stale_partial_folders, write_atomically
from megatron_cosmos3.eval_suite.config import SUITE_TASKS, SuiteConfig, load_suite_config
from megatron_cosmos3.eval_suite.media import write_media
from megatron_cosmos3.eval_suite.suite import EvalSuite, SuiteResult
from megatron_cosmos3.evaluation.report import EvalReport
from megatron_cosmos3.parallel.failures import RankFailedError, fail_together
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.release.generate_cli import (
    RequestError,
    add_timeout_argument,
    merged_action_stats,
    remove_output,
    stopped_by_sigterm,
    unwritable_out,
)
from megatron_cosmos3.release.trained import LOAD_ERRORS, TrainedModel, load_trained_model
from megatron_cosmos3.training.distributed import init_distributed
from megatron_cosmos3.training.tracking import MLflowTracker, address_without_scheme

log = logging.getLogger("cosmos3-eval")
REPORT_FILE = "report.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosmos3-eval",
        description="Measure a trained megatron_cosmos3 checkpoint in the generated world: a JSON report with "
        "oracle and chance rows, MLflow metrics and side-by-side media.",
        epilog=f"suite tasks: {', '.join(SUITE_TASKS)}. Overrides are eval_suite.config.SuiteConfig keys, "
        "e.g. tasks=[policy,understanding] cases_per_task=4 steps=16 media=false",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a step_<N> folder, a checkpoint directory or a release folder"
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for report.json and media/")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the report.json and media/ of an earlier run in --out"
    )
    parser.add_argument("--config", help="the suite's YAML config (eval_suite.config.SuiteConfig)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (a bare path: a local SQLite store); none: no MLflow"
    )
    parser.add_argument("--experiment", default="megatron_cosmos3", help="MLflow experiment")
    parser.add_argument("--run-name", help="MLflow run name (default: eval-<checkpoint folder>)")
    parser.add_argument("--action-stats", help="the dataset whose action statistics un-normalise actions")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="under torchrun: tensor-parallel ranks")
    add_timeout_argument(parser)
    parser.add_argument("overrides", nargs="*", help="suite config overrides, key=value")
    return parser


def evaluate_checkpoint(
    trained: TrainedModel,
    suite_config: SuiteConfig,
    action_stats: str | None = None,
    media_dir: Path | None = None,
) -> SuiteResult:
    """The suite's result for ``trained`` (collective under its plan); ``media_dir``: where this
    rank writes the closed-loop episodes (rank 0's ``OUT/media/closed_loop``)."""
    suite = EvalSuite.for_run(
        suite_config,
        trained.model,
        trained.tokenizer(),
        trained.config.data.encoders,
        trained.tasks,
        merged_action_stats(trained, action_stats),
        trained.config.data.packing.max_text_tokens,
    )
    meta = {"checkpoint": str(trained.source), "step": trained.step}
    return suite.evaluate(trained.model, trained.plan, meta, media_dir)


def out_problem(out: Path, checkpoint: str | Path, overwrite: bool) -> str | None:
    """Why ``--out`` cannot take this run's report, or None: it is a file, the checkpoint folder or
    inside it, a ``step_<N>`` folder's checkpoint directory or any folder with a ``latest`` (the
    report would be mixed into the checkpoints), or it holds an earlier report or
    media and ``overwrite`` is not set (never mixed: another run's case folders would stay), or
    nothing can be written there (``generate_cli.unwritable_out``)."""
    if out.exists() and not out.is_dir():
        return f"--out {str(out)!r} is not a folder"
    checkpoint, resolved = Path(checkpoint).resolve(), out.resolve()
    directory = checkpoint.parent if checkpoint.name.startswith("step_") else checkpoint  # its checkpoint directory
    if resolved in (checkpoint, directory) or checkpoint in resolved.parents or (out / "latest").is_file():
        return f"--out {str(out)!r} is inside the checkpoint {str(checkpoint)!r}; write the report elsewhere"
    earlier = [name for name in (REPORT_FILE, "media") if (out / name).exists()]
    if earlier and not overwrite:
        return f"--out {str(out)!r} already holds {earlier} of an earlier run; use another folder or --overwrite"
    return unwritable_out(out)


def clear_earlier_outputs(out: Path) -> None:
    """Removes an earlier run's ``report.json`` and ``media/`` from ``out`` (``--overwrite``), nothing else."""
    # as generate's --overwrite: a link is removed, never followed (rmtree refused one: a traceback)
    remove_output(out / REPORT_FILE)
    remove_output(out / "media")


def write_outputs(result: SuiteResult, out: Path, staging: Path | None) -> Path:
    """With a ``staging`` folder (``atomic_files.partial_folder`` of ``out/media``, the closed-loop
    episodes already in it), the cases' media into it and it renamed to ``out/media``; then
    ``out/report.json``; returns the report's path. Both come whole: a run killed while writing
    leaves no ``media/`` (the caller removes ``staging``) and no report, so a ``report.json``
    always means a finished run."""
    out.mkdir(parents=True, exist_ok=True)
    if staging is not None:
        write_media(staging, result.cases, result.model)
        staging.rename(out / "media")  # out_problem (or --overwrite) made sure none is there
    return write_atomically(out / REPORT_FILE, result.report.to_json())


def log_to_mlflow(
    result: SuiteResult, out: Path, args: argparse.Namespace, step: int | None, suite_config: SuiteConfig
) -> str | None:
    """One MLflow run: the suite's settings as params, the report's metrics at the checkpoint's
    step, the report and media as artifacts; returns its id (None where MLflow is unreachable)."""
    name = args.run_name or f"eval-{Path(result.report.meta['checkpoint']).name}"
    tracker = MLflowTracker(args.tracking_uri, args.experiment, name, enabled=True)
    tracker.log_params({f"suite.{key}": str(value) for key, value in asdict(suite_config).items()})
    tracker.log_metrics(result.report.mlflow_metrics(), step or 0)
    tracker.log_artifact(str(out / REPORT_FILE))
    if suite_config.media:
        tracker.log_artifacts(str(out / "media"), "media")
    tracker.set_tag("checkpoint", result.report.meta["checkpoint"])
    tracker.finish()
    return tracker.run_id


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with stopped_by_sigterm():  # a stopped run ends through its cleanup, as with Ctrl-C
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    try:
        suite_config = load_suite_config(args.config, args.overrides)  # before any process group
    except (ValueError, OSError) as error:
        print(f"cosmos3-eval: error: {error}", file=sys.stderr)
        return 2
    problem = out_problem(args.out, args.checkpoint, args.overwrite)
    address = address_without_scheme(args.tracking_uri) if args.tracking_uri else None
    if problem is None and address:  # said before the suite runs, not written after as a local file of that name
        problem = f"--tracking-uri {args.tracking_uri!r} {address}: a server takes http://host:port; a store, a path"
    if problem is not None:
        print(f"cosmos3-eval: error: {problem}", file=sys.stderr)
        return 2
    ctx = init_distributed(args.timeout_s)
    staging = None  # rank 0's partial media folder until it is renamed to OUT/media
    try:
        try:
            # Every rank loads and evaluates with the same collectives: a rank failing alone (its own
            # read of a file, an error of its own) ends every rank, each naming it.
            with fail_together("loading and evaluating"):
                parallel = ParallelSizes(tensor=args.tensor_parallel)
                trained = load_trained_model(
                    args.checkpoint, device=ctx.device, parallel=parallel, timeout_s=args.timeout_s
                )
                if ctx.is_main and args.overwrite:  # before this run's media/ is renamed into place
                    clear_earlier_outputs(args.out)
                if ctx.is_main:
                    remove_stale_partial_folders(args.out)
                if ctx.is_main and suite_config.media:
                    staging = partial_folder(args.out / "media")
                episodes = staging / "closed_loop" if staging is not None else None
                result = evaluate_checkpoint(trained, suite_config, args.action_stats, episodes)
        except RankFailedError as error:  # another rank's failure: its own output says more
            print(f"cosmos3-eval: error: {error}", file=sys.stderr)
            return 1
        except (RequestError, *LOAD_ERRORS, ValueError) as error:
            print(f"cosmos3-eval: error: {error}", file=sys.stderr)
            return 2
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        if not ctx.is_main:
            return 0
        report = write_outputs(result, args.out, staging)
    finally:  # a stopped or failed run (Ctrl-C, SIGTERM too) leaves no partial media folder
        if staging is not None:  # gone already where it was renamed into place
            shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s", report)
    if args.tracking_uri:
        run_id = log_to_mlflow(result, args.out, args, trained.step, suite_config)
        if run_id is None:  # the tracker has warned why; the report is on disk either way
            log.warning("no MLflow run at %s: the report stays in %s only", args.tracking_uri, args.out)
        else:
            log.info("MLflow run %s at %s", run_id, args.tracking_uri)
    width = max((len(row.name) for row in result.report.rows), default=0)  # one column, however long the names
    for row in result.report.rows:
        log.info(
            "%-*s  model %10.4g  oracle %10.4g  chance %10.4g %s",
            width,
            row.name,
            row.model,
            row.oracle,
            row.chance,
            row.unit,
        )
    diverged = every_episode_failed(result.report, suite_config.closed_loop_episodes)
    if diverged:  # as a diverged model's NaN prediction in an open-loop task ends the run: not a score
        print(
            f"cosmos3-eval: error: every closed-loop episode of the model failed in {diverged} (their notes in "
            f"{report} say why); the report is written",
            file=sys.stderr,
        )
        return 2
    return 0


def every_episode_failed(report: EvalReport, episodes: int) -> list[str]:
    """The closed-loop rows (``<embodiment>/<task>``) where each of the model's ``episodes`` failed."""
    return [
        row.name.removeprefix("closed_loop/").removesuffix("/failed_episodes")
        for row in report.rows
        if row.name.startswith("closed_loop/") and row.name.endswith("/failed_episodes") and row.model == episodes > 0
    ]


if __name__ == "__main__":
    sys.exit(main())
