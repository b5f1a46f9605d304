"""Tasks: each task is a layout of a sample's tokens and a noise mask (docs/DESIGN.md, "Tasks are
data")."""

from megatron_cosmos3.tasks.layout import Stream, dm_layout, noise_mask, past_frames
from megatron_cosmos3.tasks.mixture import TaskMixture
from megatron_cosmos3.tasks.registry import DEFAULT_QUESTION, TASK_REGISTRY, DMRole, Modality, TaskSpec, get_task

__all__ = [
    "DEFAULT_QUESTION",
    "TASK_REGISTRY",
    "DMRole",
    "Modality",
    "Stream",
    "TaskMixture",
    "TaskSpec",
    "dm_layout",
    "get_task",
    "noise_mask",
    "past_frames",
]
