"""One slot -> its packed-ready samples: read the shard, decode (cutting the configured clip), assign
tasks, build.

This is the work a dataloader worker does (and what a resume redoes for the few slots still
buffered). Its output for a slot is a pure function of the slot address and the config: the task
of sample i of slot j is drawn from (seed, j, i), encoders are deterministic and run on one
thread, so any process — worker or main — builds bit-identical samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from megatron_cosmos3.data.clips import MediaConfig
from megatron_cosmos3.data.determinism import uniform
from megatron_cosmos3.data.errors import INTERNAL_ERROR, NO_TASK, LoaderSetupError, SampleError, Skip, printable
from megatron_cosmos3.data.sample_builder import BuiltSample, SampleBuilder, picture_of
from megatron_cosmos3.data.schedule import ShardSchedule, SlotAddress
from megatron_cosmos3.data.schema import SchemaContext, decode_sample
from megatron_cosmos3.data.shards import read_samples
from megatron_cosmos3.tasks.mixture import TaskMixture
from megatron_cosmos3.tasks.registry import TaskSpec

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    """What one slot gave: samples (by their index in the shard, skipped ones counted) and skips."""

    address: SlotAddress
    url: str
    samples: list[tuple[int, BuiltSample]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)


class _SingleThread:
    """Runs encoders on one intra-op thread, as dataloader workers do, so that a sample built in
    the main process (0 workers, or a resume) is bit-identical to one built in a worker."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)


class ShardProcessor:
    """Turns slot addresses into ``ShardResult``s. ``builders`` has one SampleBuilder per dataset
    of the schedule (their action statistics differ); they are made lazily in each process by
    ``make_builders`` so that heavy encoders load in the worker that uses them."""

    def __init__(
        self,
        schedule: ShardSchedule,
        mixture: TaskMixture,
        context: SchemaContext,
        seed: int,
        make_builders,
        prompt_dropout: float = 0.0,
        media: MediaConfig | None = None,
    ) -> None:
        self.schedule, self.mixture, self.context, self.seed = schedule, mixture, context, seed
        self.prompt_dropout, self.media = prompt_dropout, media or MediaConfig()
        self._make_builders = make_builders
        self._builders: list[SampleBuilder] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_builders": None}  # workers build their own encoders

    def process(self, address: SlotAddress) -> ShardResult:
        if self._builders is None:
            self._builders = self._make_builders()
        builder = self._builders[address.dataset]
        info = self.schedule.shard(address)
        name = self.schedule.sources[address.dataset].name

        def use(index: int, raw: dict) -> BuiltSample:
            try:
                return self._build(builder, raw, address, index)
            except SampleError:
                raise
            except LoaderSetupError as error:  # the run is set up wrong for this dataset: stop, naming it
                raise LoaderSetupError(f"dataset {name!r} (shard {info.url}): {error}") from None
            except Exception as error:  # noqa: BLE001 - one sample must not stop the run; logged in full
                log.exception("internal error on sample %s of %s", printable(raw["__key__"]), info.url)
                raise SampleError(INTERNAL_ERROR, f"{type(error).__name__}: {error}") from None

        with _SingleThread():
            read = read_samples(info, use)
        return ShardResult(address, info.url, read.results, read.skips)

    def _build(self, builder: SampleBuilder, raw: dict, address: SlotAddress, index: int) -> BuiltSample:
        # The clip of a long sample starts at a draw from (seed, slot, index): a resume cuts the same one.
        sample = decode_sample(raw, self.context, self.media, uniform(self.seed, "clip", address.slot, index))
        task = self.mixture.choose(
            sample.modalities,
            sample.latent_frames,
            uniform(self.seed, "task", address.slot, index),
            has_picture=picture_of(sample) is not None,
        )
        if task is None:
            raise SampleError(
                NO_TASK,
                f"modalities {sorted(m.value for m in sample.modalities)} fit no task of the "
                f"stage mixture {sorted(self.mixture.weights)}",
            )
        drop = drops_prompt(task, self.prompt_dropout, self.seed, address.slot, index)
        return builder.build(sample, task, drop_prompt=drop)


def drops_prompt(task: TaskSpec, rate: float, seed: int, slot: int, index: int) -> bool:
    """Whether sample ``index`` of ``slot`` is built without its prompt (``DataConfig.prompt_dropout``):
    a draw from (seed, slot, index) below ``rate``, for tasks with DM targets only."""
    return bool(task.dm) and uniform(seed, "drop_prompt", slot, index) < rate
