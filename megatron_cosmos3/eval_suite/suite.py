"""The evaluation suite: held-out world cases -> the model's, the oracle's and chance's predictions
-> one ``EvalReport`` (docs/DESIGN.md, "Evaluation").

``EvalSuite(config, model_config, ...)`` draws the cases once; ``evaluate(model, plan)`` runs the
model on them and scores every task. The chance predictions come from an untrained model of the
same config (``predictions.untrained_model``, seeded by ``config.chance_seed``) run by the same
code; they and the truth do not change during a run, so they are computed at the first call and
kept (the trainer's periodic eval pays for them once).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_cosmos3.data.latent_encoders import LatentEncoder, latent_encoder_from_config
from megatron_cosmos3.data.sample_builder import SampleBuilder
from megatron_cosmos3.data.tokenizer import Tokenizer
from megatron_cosmos3.data.vision_features import check_vit_token_size
from megatron_cosmos3.encoders.action_normalization import ActionStats
from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
from megatron_cosmos3.encoders.video_vae import pixels_per_token
from megatron_cosmos3.eval_suite.cases import ACTION_TASKS, Case, held_out_cases
from megatron_cosmos3.eval_suite.closed_loop import EXECUTE_S, ReferenceCache, closed_loop_rows_for
from megatron_cosmos3.eval_suite.config import SuiteConfig, check_model_embodiments, model_action_rates
from megatron_cosmos3.eval_suite.predictions import Prediction, predict, untrained_model
from megatron_cosmos3.eval_suite.scoring import task_rows
from megatron_cosmos3.evaluation.report import EvalReport, MetricRow
from megatron_cosmos3.inference.requests import generation_builder
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.parallel.plan import ParallelPlan
from megatron_cosmos3.tasks.layout import exact, steps_before
from megatron_cosmos3.world.environment import WorldEnvironment
from megatron_cosmos3.world.world import chunk_steps


@dataclass
class SuiteResult:
    """The report and what it measured: the cases and each model's predictions, per task."""

    report: EvalReport
    cases: dict[str, list[Case]]
    model: dict[str, list[Prediction]]
    chance: dict[str, list[Prediction]]


class EvalSuite:
    """The suite for one model config (module doc).

    builder / decoder / tokenizer: the run's ``SampleBuilder`` (``inference.requests.
    generation_builder``), latent encoder (whose decoder makes the media) and tokenizer.
    trained_tasks: the tasks the checkpoint trained; the configured tasks outside them are skipped
    (named in the report's meta). action_stats: the run's statistics, whose std is the action
    error's unit where they cover the embodiment. ``understanding`` needs the Reasoner whole on the
    rank: a plan that splits the model by layers or rows skips it (named likewise).
    """

    def __init__(
        self,
        config: SuiteConfig,
        model: MoTModel,
        builder: SampleBuilder,
        decoder: LatentEncoder,
        tokenizer: Tokenizer,
        trained_tasks: Collection[str],
        action_stats: ActionStats | None = None,
    ) -> None:
        self.config = config
        self.builder, self.decoder, self.tokenizer = builder, decoder, tokenizer
        self.trained_tasks = list(trained_tasks)
        self.action_stats = action_stats
        side = pixels_per_token(model.config.video_patch_size)
        if config.resolution % side:  # generated frames would be cut smaller than the truth's
            raise ValueError(
                f"eval suite: resolution={config.resolution} is not a multiple of the model's video token "
                f"({side} pixels at model.video_patch_size={model.config.video_patch_size})"
            )
        check_model_embodiments(model.config)
        self.skipped = {task: "not trained" for task in config.tasks if task not in self.trained_tasks}
        # The world acts at the model's rates: the truth's actions are sampled as the model's are.
        self.action_rates = model_action_rates(model.config)
        try:
            self.world = config.world(self.action_rates)
        except ValueError as error:  # name where a rate the world cannot hold comes from
            raise ValueError(f"{error} (model.embodiments' rate_hz: {self.action_rates})") from None
        embodiments = sorted(set(model.config.embodiments) & set(self.world.embodiments))
        if not embodiments:
            for task in (t for t in config.tasks if t in ACTION_TASKS and t not in self.skipped):
                self.skipped[task] = f"no action head for an embodiment of the world ({model.config.embodiments})"
        if config.closed_loop_episodes and "policy" in self.trained_tasks:
            self._check_environments(embodiments)
        tasks = [task for task in config.tasks if task not in self.skipped]
        self.cases = held_out_cases(config, tasks, embodiments, action_rates=self.action_rates)
        self._chance: dict[str, list[Prediction]] | None = None
        self._closed_loop_references = ReferenceCache()  # the expert's and random episodes, run once

    @classmethod
    def for_run(
        cls,
        config: SuiteConfig,
        model: MoTModel,
        tokenizer: Tokenizer,
        encoders: LatentEncoderConfig,
        trained_tasks: Collection[str],
        action_stats: ActionStats | None = None,
        max_text_tokens: int = 256,
    ) -> EvalSuite:
        """The suite for a run's model: its latent encoder (``encoders``, the run's
        ``data.encoders``) and the generation builder over its tokenizer and statistics, cutting
        captions and questions at ``max_text_tokens`` (the run's ``data.packing.max_text_tokens``)."""
        decoder = latent_encoder_from_config(
            encoders, model.config.video_latent_channels, model.config.audio_latent_dim, model.config.video_patch_size
        )
        if model.config.vision is not None:  # the world's cases hold pictures: refused before the first
            check_vit_token_size(model.config.vision)
        builder = generation_builder(model.config, tokenizer, decoder, action_stats, max_text_tokens)
        return cls(config, model, builder, decoder, tokenizer, trained_tasks, action_stats)

    def _run(self, model: MoTModel, cases: dict[str, list[Case]], plan: ParallelPlan | None, who: str):
        return predict(
            model,
            cases,
            self.config,
            self.builder,
            self.decoder,
            self.tokenizer,
            plan=plan,
            trained_tasks=self.trained_tasks,
            who=who,
        )

    def chance(self, model: MoTModel, cases: dict[str, list[Case]]) -> dict[str, list[Prediction]]:
        """The untrained model's predictions (computed once; every rank alike)."""
        if self._chance is None:
            device = next(p.device for p in model.parameters() if not p.is_meta)
            fresh = untrained_model(model, self.config.chance_seed, device)
            self._chance = self._run(fresh, cases, None, "the chance model")
            del fresh
        return self._chance

    @torch.no_grad()
    def evaluate(
        self,
        model: MoTModel,
        plan: ParallelPlan | None = None,
        meta: dict | None = None,
        media_dir: str | Path | None = None,
    ) -> SuiteResult:
        """The report of ``model`` (this rank's part under ``plan``; collective where the plan
        splits the model: every rank of it calls). ``meta`` is added to the report's meta;
        ``media_dir``: where the closed-loop episodes' mp4 files go (one rank's)."""
        cases = dict(self.cases)
        skipped = dict(self.skipped)
        splits_rows = plan is not None and (plan.stages is not None or plan.split is not None)
        if splits_rows and "understanding" in cases:  # text generation keeps the whole Reasoner on a rank
            del cases["understanding"]
            skipped["understanding"] = "the plan splits the model by layers or rows"
        predictions = self._run(model, cases, plan, "the model")
        chance = self.chance(model, cases)
        closed_loop = self.closed_loop(model, plan, media_dir, skipped)
        report = EvalReport(meta=self.meta(cases, skipped, meta))
        for task, found in cases.items():
            for row in task_rows(task, found, predictions[task], chance[task], self.config, self.action_stats):
                report.add(row)
        for row in closed_loop:
            report.add(row)
        return SuiteResult(report, cases, predictions, chance)

    def _check_environments(self, embodiments: list[str]) -> None:
        """ValueError naming the embodiment and the rates where its closed-loop episodes cannot run
        (the environment steps actions and frames on its physics grid, and executes EXECUTE_S of
        each chunk the policy generates for a clip of ``duration_s``), before any model runs."""
        c = self.config
        clip_s = exact(c.duration_s) + 1 / exact(c.fps)  # its 1 + 4k frames (SuiteConfig)
        for embodiment in embodiments:
            where = (
                f"(model.embodiments' rate_hz: {self.action_rates}, the suite's fps={c.fps:g}; "
                "closed_loop_episodes=0 skips it)"
            )
            for task in c.closed_loop_tasks:
                try:
                    WorldEnvironment(task, embodiment, self.world, horizon_s=c.closed_loop_horizon_s)
                except ValueError as error:
                    raise ValueError(f"eval suite: closed loop of {embodiment!r}: {error} {where}") from None
            rate = self.world.action_rates[embodiment]
            given, executed = steps_before(clip_s, rate), chunk_steps(rate, EXECUTE_S)
            if given < executed:  # the runner would stop at the first decision, after the open-loop tasks
                raise ValueError(
                    f"eval suite: closed loop of {embodiment!r}: duration_s={c.duration_s:g} gives the policy "
                    f"clips of {given} actions at {rate:g} Hz, fewer than the {executed} executed per "
                    f"chunk ({EXECUTE_S:g} s); use duration_s >= {EXECUTE_S:g} {where}"
                )

    def closed_loop(
        self, model: MoTModel, plan: ParallelPlan | None, media_dir: str | Path | None, skipped: dict[str, str]
    ) -> list[MetricRow]:
        """The closed-loop rows (``eval_suite/closed_loop.py``) of every configured environment task
        for every embodiment the model acts for; a reason in ``skipped`` where there are none."""
        c = self.config
        if not c.closed_loop_episodes:
            return []
        if "policy" not in self.trained_tasks:
            skipped["closed_loop"] = "the checkpoint did not train the policy task"
            return []
        world = self.world
        embodiments = sorted(set(model.config.embodiments) & set(world.embodiments))
        if not embodiments:
            skipped["closed_loop"] = f"no action head for an embodiment of the world ({model.config.embodiments})"
            return []
        seeds = [c.world_seed + i for i in range(c.closed_loop_episodes)]
        rows = []
        for embodiment in embodiments:
            for task in c.closed_loop_tasks:
                rows += closed_loop_rows_for(
                    model,
                    self.builder,
                    world,
                    task,
                    embodiment,
                    seeds,
                    horizon_s=c.closed_loop_horizon_s,
                    steps=c.steps,
                    solver=c.solver,
                    guidance=c.guidance,
                    plan=plan,
                    trained_tasks=self.trained_tasks,
                    media_dir=media_dir,
                    cache=self._closed_loop_references,
                )
        return rows

    def meta(self, cases: dict[str, list[Case]], skipped: dict[str, str], extra: dict | None) -> dict:
        c = self.config
        return {
            "world_seed": c.world_seed,
            "cases": {task: [case.index for case in found] for task, found in cases.items()},
            "sampler": {"solver": c.solver, "steps": c.steps, "guidance": c.guidance, "shift": c.shift, "seed": c.seed},
            "clips": {"resolution": c.resolution, "duration_s": c.duration_s, "fps": c.fps},
            "chance": f"an untrained model of the same config, init seed {c.chance_seed}",
            "oracle": "the world's truth through the same metric",
            "skipped_tasks": skipped,
            **(extra or {}),
        }
