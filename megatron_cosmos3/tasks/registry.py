"""The task registry: every task is a layout of one sample's tokens and a noise mask
(docs/DESIGN.md, "Tasks are data").

A task says which modalities a sample must have, what text the Reasoner reads (and whether it is
trained on an answer), whether the Reasoner also sees a picture through the ViT, and how the DM
section is laid out: a list of ``DMRole`` spans, clean conditioning first, noisy targets after.
Which DM spans are noisy *is* the task — the same clip can be text-to-video, image-to-video or
forward dynamics depending only on the noise mask.

=====================  ===========================  ==============================  ======================
task                   AR (clean, causal)           DM clean conditioning           DM noisy target
=====================  ===========================  ==============================  ======================
understanding          question, ViT; CE on answer  —                               —
text_to_image          caption                      —                               image latents
text_to_video          caption                      —                               video latents
image_to_video         caption                      first latent frame              later latent frames
video_to_audio         caption                      video latents                   audio latents
text_to_audio_video    caption                      —                               video + audio latents
forward_dynamics       instruction                  past frames + actions           future frames
inverse_dynamics       instruction                  all frames                      actions
policy                 instruction, observation ViT first latent frame              actions
policy_with_future     instruction, observation ViT first latent frame              actions + later frames
=====================  ===========================  ==============================  ======================
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal


class Modality(str, Enum):
    """What a sample can carry. TEXT = a caption or an instruction; IMAGE = a still picture."""

    TEXT = "text"
    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"
    ACTIONS = "actions"


# Which part of a stream a DM span takes. Video splits in time at whole latent frames:
# "first_frame" / "after_first_frame" (image-to-video, policy), "past" / "future" (forward
# dynamics: past = the first max(1, t // 2) latent frames).
SpanPart = Literal["all", "first_frame", "after_first_frame", "past", "future"]
StreamName = Literal["image", "video", "audio", "actions"]


@dataclass(frozen=True)
class DMRole:
    """One DM span of a task's layout: a part of one stream, clean (conditioning) or noisy (target)."""

    stream: StreamName
    part: SpanPart
    noisy: bool


@dataclass(frozen=True)
class TaskSpec:
    """One task: requirements, AR content and DM layout (see the module table).

    prompt: the text the Reasoner reads first — "caption" (generation), "instruction" (actions;
        falls back to the caption), or "question" (understanding; the sample's question or
        ``DEFAULT_QUESTION``).
    answer: the Reasoner is trained (cross-entropy) on the caption / answer after the prompt.
    vit: "none"; "optional" (the sample's image or first video frame when it has one);
        "required" (the observation of a policy).
    dm: DM spans in layout order; clean ones must all precede noisy ones.
    min_latent_frames: video latent frames the layout needs (2 where a clip is split in time).
    """

    name: str
    requires: frozenset[Modality]
    prompt: Literal["caption", "instruction", "question"]
    answer: bool = False
    vit: Literal["none", "optional", "required"] = "none"
    dm: tuple[DMRole, ...] = ()
    min_latent_frames: int = 0

    def __post_init__(self) -> None:
        noisy = [role.noisy for role in self.dm]
        if noisy != sorted(noisy):
            raise ValueError(f"task {self.name!r}: clean DM spans must precede noisy ones, got {self.dm}")
        if self.dm and not any(noisy):
            raise ValueError(f"task {self.name!r}: a DM layout needs at least one noisy target")
        if self.answer == bool(self.dm):
            raise ValueError(f"task {self.name!r}: a task trains either an answer (AR) or DM targets, not both/neither")
        for role in self.dm:
            if Modality(role.stream) not in self.requires:
                raise ValueError(
                    f"task {self.name!r}: a DM span on {role.stream!r} needs {role.stream!r} "
                    f"in requires={set(self.requires)}"
                )

    def allows(self, modalities: frozenset[Modality], latent_frames: int, has_picture: bool = True) -> bool:
        """Whether a sample with ``modalities``, ``latent_frames`` video latent frames and (or not)
        a picture for the ViT can be laid out as this task."""
        return (
            self.requires <= modalities
            and (Modality.VIDEO not in self.requires or latent_frames >= self.min_latent_frames)
            and (self.vit != "required" or has_picture)
        )


DEFAULT_QUESTION = "Describe what happens."

_T, _I, _V, _A, _ACT = Modality.TEXT, Modality.IMAGE, Modality.VIDEO, Modality.AUDIO, Modality.ACTIONS

TASK_REGISTRY: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("understanding", frozenset({_T}), "question", answer=True, vit="optional"),
        TaskSpec("text_to_image", frozenset({_T, _I}), "caption", dm=(DMRole("image", "all", True),)),
        TaskSpec(
            "text_to_video", frozenset({_T, _V}), "caption", dm=(DMRole("video", "all", True),), min_latent_frames=1
        ),
        TaskSpec(
            "image_to_video",
            frozenset({_T, _V}),
            "caption",
            dm=(DMRole("video", "first_frame", False), DMRole("video", "after_first_frame", True)),
            min_latent_frames=2,
        ),
        TaskSpec(
            "video_to_audio",
            frozenset({_T, _V, _A}),
            "caption",
            dm=(DMRole("video", "all", False), DMRole("audio", "all", True)),
            min_latent_frames=1,
        ),
        TaskSpec(
            "text_to_audio_video",
            frozenset({_T, _V, _A}),
            "caption",
            dm=(DMRole("video", "all", True), DMRole("audio", "all", True)),
            min_latent_frames=1,
        ),
        TaskSpec(
            "forward_dynamics",
            frozenset({_T, _V, _ACT}),
            "instruction",
            dm=(DMRole("video", "past", False), DMRole("actions", "all", False), DMRole("video", "future", True)),
            min_latent_frames=2,
        ),
        TaskSpec(
            "inverse_dynamics",
            frozenset({_T, _V, _ACT}),
            "instruction",
            dm=(DMRole("video", "all", False), DMRole("actions", "all", True)),
            min_latent_frames=1,
        ),
        TaskSpec(
            "policy",
            frozenset({_T, _V, _ACT}),
            "instruction",
            vit="required",
            dm=(DMRole("video", "first_frame", False), DMRole("actions", "all", True)),
            min_latent_frames=1,
        ),
        TaskSpec(
            "policy_with_future",
            frozenset({_T, _V, _ACT}),
            "instruction",
            vit="required",
            dm=(
                DMRole("video", "first_frame", False),
                DMRole("actions", "all", True),
                DMRole("video", "after_first_frame", True),
            ),
            min_latent_frames=2,
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """The registered task ``name``; ValueError listing the known tasks otherwise."""
    if name not in TASK_REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASK_REGISTRY)}")
    return TASK_REGISTRY[name]
