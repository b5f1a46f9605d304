#!/usr/bin/env python
"""The mid-training transfer experiment (docs/DESIGN.md, "Evaluation"): does a checkpoint mid-trained
with two embodiments' actions learn a new robot faster than one pre-trained without actions?

    python launch/transfer_experiment.py OUT [--smoke] [--seeds 0 1 2] [--posttrain-steps K]

1. Worlds (``data_pipelines/generate_world.py``, pooled latents): random-motion clips; clips plus
   expert demonstrations of the two known embodiments (single arm, humanoid); demonstrations of the
   held-out ``planar_pusher`` only.
2. Pre-train on the clips (``configs/stages/pretrain.yaml``: understanding and generation, no
   action task), then mid-train from it on the clips-and-demonstrations world
   (``configs/stages/midtrain.yaml``: forward/inverse dynamics and policy added).
3. Post-train EACH of the two checkpoints for K steps on the pusher's demonstrations
   (``configs/stages/posttrain.yaml``: the policy task, the reasoner frozen, the pusher's action
   projections added as ``stage.new_embodiments``), once per seed.
4. Closed loop (``eval_suite.closed_loop.closed_loop_rows_for``): every post-trained model drives the
   pusher in the same seeded episodes of every task; success with its Wilson interval and the
   action error against the expert on the expert's own episodes, beside the expert's and a random
   policy's.

Writes ``OUT/transfer-K<K>.json`` and ``.md`` (per seed, mean ± std over seeds, pooled success with
its Wilson interval), the first episode of each model as mp4 under ``OUT/media``. Stages whose
checkpoints are complete and worlds already written are reused, so a stopped run goes on where it
was and another K reuses the worlds, pre- and mid-training. Every stage trains in this process
(one process, the trainer's own ``main``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from megatron_cosmos3.checkpoint.checkpointer import inventory
from megatron_cosmos3.data.latent_encoders import latent_encoder_from_config
from megatron_cosmos3.eval_suite.closed_loop import ReferenceCache, closed_loop_rows_for
from megatron_cosmos3.evaluation.closed_loop import wilson_interval
from megatron_cosmos3.inference.requests import generation_builder
from megatron_cosmos3.release.generate_cli import merged_action_stats
from megatron_cosmos3.release.trained import load_trained_model
from megatron_cosmos3.training.train import main as train_main
from megatron_cosmos3.world.config import WorldConfig
from megatron_cosmos3.world.environment import TASKS

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "transfer" / "base.yaml"
HELD_OUT = "planar_pusher"
KNOWN = ("single_arm", "humanoid")
STARTS = ("pretrained", "midtrained")
EPISODE_SEED = 10_000  # episodes are seeds EPISODE_SEED + i, the same for every model (a paired comparison)
log = logging.getLogger("transfer_experiment")


@dataclass(frozen=True)
class Sizes:
    """How big the experiment is. Worlds: samples of random-motion clips (pre-training), of clips
    and demonstrations (mid-training; ``demonstration_fraction`` of them demonstrations) and of pusher
    demonstrations (post-training), at ``resolution`` pixels and ``duration_s`` per clip. Steps per
    stage (``posttrain_steps`` is K), post-training ``seeds``. Evaluation: ``episodes`` per task,
    ``horizon_s`` each, ``sampler_steps`` Euler steps per generated chunk. ``model``: config
    overrides over ``configs/transfer/base.yaml``'s model."""

    clip_samples: int = 256
    demo_samples: int = 256
    pusher_samples: int = 128
    demonstration_fraction: float = 0.5
    resolution: int = 64
    duration_s: float = 2.0
    pretrain_steps: int = 150
    midtrain_steps: int = 150
    posttrain_steps: int = 50
    seeds: tuple[int, ...] = (0, 1, 2)
    tokens_per_pack: int = 768
    tasks: tuple[str, ...] = TASKS
    episodes: int = 8
    horizon_s: float = 4.0
    sampler_steps: int = 8
    model: tuple[str, ...] = ()


# The experiment at the size of the README's result: about 30 minutes on an idle 2-core CPU.
FULL = Sizes()
# Every step of it, as small as it goes: the test suite runs it.
SMOKE = Sizes(
    clip_samples=6,
    demo_samples=6,
    pusher_samples=4,
    resolution=32,
    duration_s=1.0,
    pretrain_steps=1,
    midtrain_steps=1,
    posttrain_steps=1,
    seeds=(0,),
    tokens_per_pack=384,
    tasks=("push_to_region",),
    episodes=2,
    horizon_s=1.0,
    sampler_steps=2,
    model=(
        "model.hidden_size=32",
        "model.num_layers=1",
        "model.head_dim=8",
        "model.mrope_section=[2,1,1]",
        "model.ffn_hidden_size=64",
        "model.timestep_embedding_dim=16",
        "model.vision.out_hidden_size=32",
        "model.vision.depth=1",
        "model.vision.deepstack_visual_indexes=[0]",
    ),
)


def _generate_world_script():
    spec = importlib.util.spec_from_file_location("generate_world", REPO / "data_pipelines" / "generate_world.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def write_worlds(out: Path, sizes: Sizes) -> dict[str, Path]:
    """The three worlds' latent shard folders (step 1 of the module doc), written unless present by
    ``data_pipelines/generate_world.py`` in this process (one worker: a pool would import the script
    by name)."""
    common = ["--latents", "pooled", "--resolution", str(sizes.resolution), "--duration", str(sizes.duration_s)]
    common += ["--shard-size", "16"]
    worlds = {
        "clips": [str(sizes.clip_samples), "--seed", "0"],
        "demos": [str(sizes.demo_samples), "--seed", "1", "--demonstrations", str(sizes.demonstration_fraction)],
        "pusher": [str(sizes.pusher_samples), "--seed", "2", "--demonstrations", "1", "--embodiments", HELD_OUT],
    }
    folders = {}
    for name, (samples, *extra) in worlds.items():
        folder = out / "worlds" / name
        if not (folder / "latent" / "index.json").is_file():
            log.info("world %s: %s samples", name, samples)
            generate_world = _generate_world_script()
            generate_world.main([str(folder), "--samples", samples, *common, *extra])
        folders[name] = folder / "latent"
    return folders


def _finished(directory: Path, steps: int) -> bool:
    found = inventory(directory) if directory.is_dir() else None
    return found is not None and found.latest is not None and found.latest.name == f"step_{steps:08d}"


def train_stage(
    stage: str, directory: Path, shards: Path, steps: int, sizes: Sizes, *, init_from: Path | None, seed: int = 1234
) -> Path:
    """One stage of ``configs/stages/<stage>.yaml`` over the base config, trained in this process
    (skipped when its last checkpoint is there); returns its checkpoint directory."""
    if _finished(directory, steps):
        return directory
    overrides = [
        f"data.datasets=[{{name: world, shards: [{shards}]}}]",
        f"checkpoint.directory={directory}",
        f"checkpoint.save_every={steps}",
        f"steps={steps}",
        f"seed={seed}",
        f"optimizer.warmup_steps={max(1, min(10, steps // 5))}",
        f"log_every={max(1, min(25, steps // 4))}",
        f"data.packing.tokens_per_pack={sizes.tokens_per_pack}",
        *sizes.model,
    ]
    if init_from is not None:
        overrides.append(f"stage.init_from={init_from}")
    if stage == "posttrain":
        overrides += [
            f"stage.new_embodiments.{HELD_OUT}.action_dim=10",
            f"stage.new_embodiments.{HELD_OUT}.rate_hz=20.0",
        ]
    log.info("%s -> %s (%d steps)", stage, directory, steps)
    started = time.monotonic()
    train_main(
        ["--config", str(BASE_CONFIG), "--config", str(REPO / "configs" / "stages" / f"{stage}.yaml"), *overrides]
    )
    log.info("%s done in %.0f s", stage, time.monotonic() - started)
    return directory


def evaluate(checkpoints: Path, sizes: Sizes, media_dir: Path | None, references: ReferenceCache) -> list[dict]:
    """Closed-loop rows of the post-trained model at ``checkpoints`` for every task, as dicts; the
    expert's and the random policy's episodes come from ``references`` (the same for every model)."""
    trained = load_trained_model(checkpoints)
    model = trained.model
    encoder = latent_encoder_from_config(
        trained.config.data.encoders,
        model.config.video_latent_channels,
        model.config.audio_latent_dim,
        model.config.video_patch_size,
    )
    stats, max_text = merged_action_stats(trained, None), trained.config.data.packing.max_text_tokens
    builder = generation_builder(model.config, trained.tokenizer(), encoder, stats, max_text_tokens=max_text)
    world = WorldConfig(resolution=sizes.resolution, duration_s=sizes.duration_s)
    seeds = [EPISODE_SEED + i for i in range(sizes.episodes)]
    rows = []
    for task in sizes.tasks:
        rows += closed_loop_rows_for(
            model,
            builder,
            world,
            task,
            HELD_OUT,
            seeds,
            horizon_s=sizes.horizon_s,
            steps=sizes.sampler_steps,
            trained_tasks=trained.tasks,
            media_dir=media_dir,
            cache=references,
        )
    return [asdict(row) for row in rows]


def summarise(runs: list[dict], sizes: Sizes) -> dict:
    """Per start: success per seed (all tasks' episodes), mean ± std over seeds, the pooled success
    with its Wilson interval, the episodes that failed (a non-finite action chunk: counted as no
    success), the action error (mean over tasks) likewise; and the references. A seed whose action
    error was not measured (NaN: its model's chunks held NaN) is left out of the error's mean and
    std and counted in ``action_rmse_unmeasured_seeds``, so one diverged seed does not hide the others."""

    def values(rows: list[dict], metric: str, who: str = "model") -> list[float]:
        return [row[who] for row in rows if row["name"].endswith(f"/{metric}")]

    episodes = len(sizes.tasks) * sizes.episodes
    summary = {}
    for start in STARTS:
        chosen = [run for run in runs if run["start"] == start]
        rates = [float(np.mean(values(run["rows"], "success_rate"))) for run in chosen]
        errors = [float(np.mean(values(run["rows"], "action_rmse"))) for run in chosen]
        measured = [error for error in errors if np.isfinite(error)]
        successes = int(round(sum(rates) * episodes))
        low, high = wilson_interval(successes, episodes * len(chosen))
        summary[start] = {
            "success_per_seed": dict(zip((run["seed"] for run in chosen), rates)),
            "success_mean": float(np.mean(rates)),
            "success_std": float(np.std(rates)),
            "successes": successes,
            "episodes": episodes * len(chosen),
            "wilson_low": low,
            "wilson_high": high,
            "failed_episodes": int(sum(sum(values(run["rows"], "failed_episodes")) for run in chosen)),
            "action_rmse_per_seed": dict(zip((run["seed"] for run in chosen), errors)),
            "action_rmse_mean": float(np.mean(measured)) if measured else float("nan"),
            "action_rmse_std": float(np.std(measured)) if measured else float("nan"),
            "action_rmse_unmeasured_seeds": len(errors) - len(measured),
        }
    first = runs[0]["rows"]  # the references do not depend on the model
    for who, name in (("oracle", "expert"), ("chance", "random")):
        rate = float(np.mean(values(first, "success_rate", who)))
        low, high = wilson_interval(int(round(rate * episodes)), episodes)
        summary[name] = {
            "success_mean": rate,
            "wilson_low": low,
            "wilson_high": high,
            "action_rmse_mean": float(np.mean(values(first, "action_rmse", who))),
        }
    return summary


def markdown(result: dict) -> str:
    sizes, summary = result["sizes"], result["summary"]
    lines = [
        f"Transfer to the held-out `{HELD_OUT}` after K = {sizes['posttrain_steps']} post-training steps "
        f"({len(sizes['seeds'])} seeds; {sizes['episodes']} episodes per task of {', '.join(sizes['tasks'])}; "
        f"{result['date']}, {result['machine']}).",
        "",
        "| start of post-training | success per seed | success mean ± std | pooled success (Wilson 95%) "
        "| failed episodes | action RMSE (dataset std) mean ± std |",
        "|---|---|---|---|---|---|",
    ]
    for start in STARTS:
        s = summary[start]
        per_seed = ", ".join(f"{v:.2f}" for v in s["success_per_seed"].values())
        unmeasured = s["action_rmse_unmeasured_seeds"]
        lines.append(
            f"| {start} | {per_seed} | {s['success_mean']:.2f} ± {s['success_std']:.2f} | "
            f"{s['successes']}/{s['episodes']} [{s['wilson_low']:.2f}, {s['wilson_high']:.2f}] | "
            f"{s['failed_episodes']}/{s['episodes']} | {s['action_rmse_mean']:.3f} ± {s['action_rmse_std']:.3f}"
            + (f" ({unmeasured} seed(s) not measured: non-finite actions)" if unmeasured else "")
            + " |"
        )
    for name in ("expert", "random"):
        s = summary[name]
        lines.append(
            f"| {name} policy (reference) | | {s['success_mean']:.2f} | "
            f"[{s['wilson_low']:.2f}, {s['wilson_high']:.2f}] | | {s['action_rmse_mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run_experiment(out: str | Path, sizes: Sizes, command: str = "") -> dict:
    """Steps 1-4 of the module doc under ``out``; returns the result written to ``transfer-K<K>.json``."""
    out = Path(out)
    started = time.monotonic()
    worlds = write_worlds(out, sizes)
    pretrained = train_stage("pretrain", out / "pretrain", worlds["clips"], sizes.pretrain_steps, sizes, init_from=None)
    midtrained = train_stage(
        "midtrain", out / "midtrain", worlds["demos"], sizes.midtrain_steps, sizes, init_from=pretrained
    )
    runs, references = [], ReferenceCache()
    for start, checkpoint in zip(STARTS, (pretrained, midtrained)):
        for seed in sizes.seeds:
            directory = train_stage(
                "posttrain",
                out / "posttrain" / f"{start}-K{sizes.posttrain_steps}-seed{seed}",
                worlds["pusher"],
                sizes.posttrain_steps,
                sizes,
                init_from=checkpoint,
                seed=seed,
            )
            media = out / "media" / f"{start}-K{sizes.posttrain_steps}" if seed == sizes.seeds[0] else None
            log.info("closed loop: %s, seed %d", start, seed)
            runs.append({"start": start, "seed": seed, "rows": evaluate(directory, sizes, media, references)})
    result = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "seconds": round(time.monotonic() - started),
        "sizes": asdict(sizes),
        "runs": runs,
    }
    result["summary"] = summarise(runs, sizes)
    name = f"transfer-K{sizes.posttrain_steps}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for worlds, checkpoints, media and the result")
    parser.add_argument("--smoke", action="store_true", help="the smallest size (the test suite's)")
    parser.add_argument("--seeds", type=int, nargs="+", help="post-training seeds (default: the size's)")
    parser.add_argument("--posttrain-steps", type=int, help="K (default: the size's)")
    parser.add_argument("--episodes", type=int, help="episodes per task (default: the size's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sizes = SMOKE if args.smoke else FULL
    changes = {
        "seeds": tuple(args.seeds) if args.seeds else None,
        "posttrain_steps": args.posttrain_steps,
        "episodes": args.episodes,
    }
    sizes = replace(sizes, **{k: v for k, v in changes.items() if v is not None})
    result = run_experiment(args.out, sizes, " ".join(["python", "launch/transfer_experiment.py", *sys.argv[1:]]))
    print(markdown(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
