"""A model's predictions on the held-out cases, as media and arrays a metric reads
(docs/DESIGN.md, "Evaluation"): every DM task through ``inference.generation.generate`` (all cases
of one sampler setting in one pack), decoded by the run's latent encoder; understanding through
``inference.text_generation.generate_text``. The trained model runs under its ``ParallelPlan``
(collective where the plan splits it); the untrained chance model is built whole on every rank, so
its predictions do not depend on the layout."""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from megatron_cosmos3.data.latent_encoders import LatentEncoder
from megatron_cosmos3.data.sample_builder import SampleBuilder
from megatron_cosmos3.data.tokenizer import Tokenizer
from megatron_cosmos3.encoders.audio_vae import SAMPLE_RATE
from megatron_cosmos3.eval_suite.cases import Case
from megatron_cosmos3.eval_suite.config import SuiteConfig
from megatron_cosmos3.inference.generation import generate
from megatron_cosmos3.inference.media_outputs import check_finite
from megatron_cosmos3.inference.text_generation import TextPrompt, TextSampling, generate_text
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.parallel.plan import ParallelPlan


@dataclass
class Prediction:
    """What a model made of one case: frames (T, H, W, 3) uint8 of the whole clip at ``fps``, audio
    (channels, n) float32 at ``sample_rate`` Hz, actions (steps, dim) float32 in physical units at
    ``action_rate_hz``, or an answer. A rate None is taken to be the truth's; scoring refuses one
    that differs from it (``scoring.check_rates``)."""

    frames: np.ndarray | None = None
    fps: float | None = None
    audio: np.ndarray | None = None
    actions: np.ndarray | None = None
    text: str | None = None
    sample_rate: int | None = None
    action_rate_hz: float | None = None


def untrained_model(model: MoTModel, seed: int, device: torch.device | str = "cpu") -> MoTModel:
    """A fresh model of ``model``'s config (its embodiments and ViT included), initialised from
    ``seed`` alone, whole on this rank, in eval mode: the chance row's model. The global RNG is left
    as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta"):
            fresh = MoTModel(copy.deepcopy(model.config))
            if model.vision is not None:
                fresh.add_vision_encoder()
    fresh.materialize(device)
    fresh.reset_parameters()
    return fresh.eval().requires_grad_(False)


def predict(
    model: MoTModel,
    cases: dict[str, list[Case]],
    config: SuiteConfig,
    builder: SampleBuilder,
    decoder: LatentEncoder,
    tokenizer: Tokenizer,
    *,
    plan: ParallelPlan | None = None,
    trained_tasks: Collection[str] | None = None,
    who: str = "the model",
) -> dict[str, list[Prediction]]:
    """Per task, one ``Prediction`` per case, in order. ``plan``: the layout the model is split
    under (None: whole on this rank); collective where it splits the model. A generated piece
    holding NaN or Inf is a ValueError naming the case, ``who`` made it and the piece, never scored."""
    dm = [case for task, found in cases.items() if task != "understanding" for case in found]
    results = generate(model, [case.request(config) for case in dm], builder, plan=plan, trained_tasks=trained_tasks)
    predictions: dict[str, list[Prediction]] = {task: [] for task in cases}
    for case, result in zip(dm, results):
        # Decoded, NaN latents were black frames scored as a bad video; NaN actions a bare "must be finite".
        check_finite(result.sample, f"eval suite: case {case.name}, {who}'s prediction")
        sample, prediction = result.sample, Prediction()
        if sample.video is not None:
            prediction.frames, prediction.fps = decoder.decode_video(sample.video), sample.video.fps
        if sample.audio is not None:
            prediction.audio, prediction.sample_rate = decoder.decode_audio(sample.audio), SAMPLE_RATE
        if sample.actions is not None:
            prediction.actions = torch.as_tensor(sample.actions).float().cpu().numpy()
            prediction.action_rate_hz = sample.action_rate_hz
        predictions[case.task].append(prediction)
    questions = cases.get("understanding", [])
    if questions:
        cut = builder.limits.max_text_tokens  # where the builder cuts every text, as training did
        prompts = [TextPrompt(tokenizer.encode(case.sample.question)[:cut], case.frames[0]) for case in questions]
        sampling = TextSampling(max_new_tokens=config.max_new_tokens)
        was_training = model.training  # the trainer's model answers as it is served
        model.eval()
        try:
            answers = generate_text(model, prompts, sampling, seeds=config.seed, tokenizer=tokenizer)
        except ValueError as error:  # NaN logits: never an answer scored as a wrong one
            cases_named = [case.name for case in questions]
            raise ValueError(f"eval suite: {who}'s answers to {cases_named} (prompts in that order): {error}") from None
        finally:
            model.train(was_training)
        predictions["understanding"] = [Prediction(text=answer.text) for answer in answers]
    return predictions
