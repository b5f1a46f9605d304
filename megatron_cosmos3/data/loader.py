"""The loader: shards -> decode -> encode -> task -> packer -> ``PackedBatch``, resumable.

For one data-parallel rank (TP/PP/CP peers of that rank build the same loader and get the same
packs)::

    loader = PackedLoader(data_config, model_config, dp_rank, dp_world_size)
    batch = next(loader)                  # a PackedBatch of at most packing.tokens_per_pack tokens
    state = loader.state_dict()           # small, JSON-able: goes into the checkpoint
    ...
    loader = PackedLoader(...); loader.load_state_dict(state)   # continues with the exact next pack

Stages: the slot schedule (``schedule.py``) picks shards; dataloader workers read, decode,
assign tasks and build samples (``shard_processor.py``) and return them in slot order
(``slot_stream.py``); here, in the training process, samples pass through the cross-shard shuffle
buffer (``shuffle.py``) into the packer (``packer.py``).

State: the next slot, one shard counter per dataset, the shuffle insertion counter, and the
samples waiting in the shuffle buffer and the packer *by reference* (slot, index in shard). A
resume rebuilds those few slots and continues: the stream after it is bit-identical to the
uninterrupted one, with any number of workers before and after. Changing the number of
data-parallel ranks changes every rank's shard split, so the exact continuation does not exist;
``load_state_dict`` refuses it (and any change of the data config, naming each changed setting with
its old and new value: the state carries the settings it was saved under) with a
``DataStreamChangedError``.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from megatron_cosmos3.data.config import DataConfig
from megatron_cosmos3.data.errors import (
    STRAY_BYTES,
    DataStreamChangedError,
    ErrorBudget,
    LoaderSetupError,
    SkipStats,
    printable,
)
from megatron_cosmos3.data.latent_encoders import VAELatentEncoder
from megatron_cosmos3.data.packer import Packer
from megatron_cosmos3.data.sample_builder import BuildLimits, BuiltSample, SampleBuilder
from megatron_cosmos3.data.schedule import DatasetSource, ShardSchedule, SlotAddress
from megatron_cosmos3.data.schema import SchemaContext
from megatron_cosmos3.data.shard_processor import ShardProcessor, ShardResult
from megatron_cosmos3.data.shards import first_local_shard, index_path, resolve_shards
from megatron_cosmos3.data.shuffle import ShuffleBuffer
from megatron_cosmos3.data.slot_stream import SlotStream, iterate_slots
from megatron_cosmos3.data.tokenizer import build_tokenizer
from megatron_cosmos3.data.vision_features import check_vit_token_size, vision_featurizer
from megatron_cosmos3.encoders.action_normalization import ACTION_STATS_FILENAME, ActionStats
from megatron_cosmos3.json_files import JsonNumberError, loads, unique_keys
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.packed_batch import PackedBatch
from megatron_cosmos3.tasks.mixture import TaskMixture

log = logging.getLogger(__name__)
STATE_FORMAT_VERSION = 1
# Slots of one dataset in a row that may read nothing at all (no sample, no skip) before the loader
# stops, per shard of the dataset: its share many times over, so only a dataset whose shards hold no
# sample (empty tars, members none of which is named <key>.<field>) gets there, where an endless
# loader read them for ever without a word. With resampling, a non-empty shard among n is missed by
# 20n draws in a row with chance e^-20.
EMPTY_SLOTS_PER_SHARD = 20


@dataclass(frozen=True)
class _Waiting:
    """A built sample waiting in the shuffle buffer or the packer, and where it came from."""

    ref: tuple[int, int]  # (slot, index of the sample in its shard)
    built: BuiltSample


def datasets_action_stats(datasets) -> dict[str, ActionStats]:
    """Dataset name -> its action statistics (``dataset_action_stats``), in the given order, for
    the datasets that have some. ValueError naming the dataset and file for one that cannot be read."""
    found = {}
    for dataset in datasets:
        try:
            stats = dataset_action_stats(dataset)
        except (OSError, ValueError) as error:
            raise ValueError(f"data.datasets[{dataset.name}].action_stats={dataset.action_stats!r}: {error}") from None
        if stats is not None:
            found[dataset.name] = stats
    return found


def dataset_action_stats(dataset) -> ActionStats | None:
    """The dataset's action statistics (``DatasetConfig.action_stats``)."""
    if dataset.action_stats == "":
        return None
    if dataset.action_stats != "auto":
        return ActionStats.load(dataset.action_stats)
    index = index_path(dataset.shards[0])
    first = Path(index) if index is not None else None
    folder = None if first is None else first if first.is_dir() else first.parent
    if folder is not None and (folder / ACTION_STATS_FILENAME).is_file():
        return ActionStats.load(folder / ACTION_STATS_FILENAME)
    return None


_ABSENT = "(absent)"


def changed_settings(saved, current, field: str = "data") -> list[str]:
    """'<field>: <old> -> <new>' for each setting that differs between two ``stream_settings``
    (nested objects field by field; a list of named objects, as ``datasets``, by name)."""
    saved, current = _by_name(saved), _by_name(current)
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current), key=str)
        return [
            line
            for key in keys
            for line in changed_settings(saved.get(key, _ABSENT), current.get(key, _ABSENT), _field(field, key))
        ]
    return [] if saved == current else [f"{field}: {_shown(saved)} -> {_shown(current)}"]


def _by_name(value):
    """A list of objects that each have a distinct 'name' as an object keyed by it, else ``value``."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        names = [str(v["name"]) for v in value]
        if len(set(names)) == len(names):
            return {f"[{name}]": v for name, v in zip(names, value)}
    return value


def _field(field: str, key) -> str:
    return f"{field}{key}" if str(key).startswith("[") else f"{field}.{key}"


def _shown(value, limit: int = 200) -> str:
    text = value if value is _ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _make_builders(
    model_config: MoTConfig, config: DataConfig, stats: list[ActionStats | None], latent_encoder_factory, tokenizer
) -> list[SampleBuilder]:
    """One SampleBuilder per active dataset; runs in each worker (encoders load there)."""
    encoder = latent_encoder_factory() if latent_encoder_factory is not None else None
    if model_config.vision is not None:  # a shard's pictures: refused before the first sample, not at it
        check_vit_token_size(model_config.vision)
    vision = vision_featurizer(model_config)
    limits = BuildLimits(config.packing.sample_token_limit, config.packing.max_text_tokens)
    tokenizer = tokenizer or build_tokenizer(config.tokenizer, model_config.vocab_size)
    return [SampleBuilder(model_config, tokenizer, vision, limits, encoder, s) for s in stats]


def _check_shards_exist(source: DatasetSource) -> None:
    """A dataset none of whose shards is on disk is a LoaderSetupError naming it. Local shards are
    stat'ed only up to the first present one (``shards.first_local_shard``): one missing later is
    one counted ``unreadable_shard`` ("missing on disk") when read, logged with its shard."""
    if first_local_shard(source.shards) is None:
        raise LoaderSetupError(
            f"dataset {source.name!r}: none of its {len(source.shards)} shards is on disk "
            f"(first: {source.shards[0].url})"
        )


class PackedLoader:
    """Packed micro-batches of one data-parallel rank (module doc). An endless iterator when
    ``config.epochs == 0``.

    latent_encoder_factory: a picklable callable returning a ``LatentEncoder`` for raw media
        (default: the frozen VAEs of ``config.encoders`` when ``online``, else none).
    tokenizer: default: the one ``config.tokenizer`` names (``data/tokenizer.py``).
    """

    def __init__(
        self,
        config: DataConfig,
        model_config: MoTConfig,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        *,
        latent_encoder_factory=None,
        tokenizer=None,
    ) -> None:
        config.validate()
        self.config, self.model_config = config, model_config
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        stage = config.active_stage
        active = [d for d in config.datasets if stage.datasets.get(d.name, 0) > 0]
        sources = [
            DatasetSource(d.name, tuple(resolve_shards(list(d.shards))), stage.datasets[d.name], d.resample)
            for d in active
        ]
        for source in sources:
            _check_shards_exist(source)
        self.schedule = ShardSchedule(sources, config.seed, dp_rank, dp_world_size, config.epochs)
        if latent_encoder_factory is None and config.encoders.online:
            latent_encoder_factory = functools.partial(
                VAELatentEncoder.from_config, config.encoders, model_config.video_patch_size
            )
        context = SchemaContext(
            {name: e.action_dim for name, e in model_config.embodiments.items()},
            model_config.video_token_dim,
            model_config.audio_latent_dim,
            video_patch_size=model_config.video_patch_size,
            action_rates={name: e.rate_hz for name, e in model_config.embodiments.items()},
        )
        make_builders = functools.partial(
            _make_builders,
            model_config,
            config,
            [dataset_action_stats(d) for d in active],
            latent_encoder_factory,
            tokenizer,
        )
        self.processor = ShardProcessor(
            self.schedule,
            TaskMixture(dict(stage.tasks)),
            context,
            config.seed,
            make_builders,
            config.prompt_dropout,
            config.media,
        )
        self.budget = ErrorBudget(config.error_budget.max_error_fraction, config.error_budget.min_samples)
        self._fingerprint = config.fingerprint()
        self._reset(next_slot=0, counters=[0] * len(sources))

    def _reset(self, next_slot: int, counters: list[int]) -> None:
        self.close()
        self._next_slot, self._counters = next_slot, list(counters)
        self._shuffle: ShuffleBuffer[_Waiting] = ShuffleBuffer(
            self.config.shuffle_buffer, self.config.seed, self.dp_rank
        )
        p = self.config.packing
        self._packer: Packer[_Waiting] = Packer(p.tokens_per_pack, p.pool_size, p.max_samples_per_pack)
        self._addresses: dict[int, SlotAddress] = {}
        self._empty_slots = [0] * len(counters)  # per dataset: slots in a row that read nothing
        self._exhausted = False
        self.stats = SkipStats()
        self.packs = self.tokens = self.cropped = self.prompts_dropped = 0
        self.last_pack: list[tuple[int, int]] = []

    # --- streaming -------------------------------------------------------------------------------

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> PackedBatch:
        while not self._packer.has_pack(final=self._exhausted):
            if self._exhausted:
                raise StopIteration
            result = next(self._results(), None)
            if result is None:  # the end of a finite stream: everything buffered gets packed
                self._exhausted = True
                for waiting in self._shuffle.drain():
                    self._packer.add(waiting, waiting.built.num_tokens)
                continue
            self._absorb(result)
        entries = self._packer.pop_pack()
        self.last_pack = [entry.item.ref for entry in entries]
        self.packs += 1
        self.tokens += sum(entry.num_tokens for entry in entries)
        return PackedBatch.from_samples([entry.item.built.sample for entry in entries])

    def _results(self):
        if self._iterator is None:
            stream = SlotStream(self.schedule, self.processor, self._next_slot, list(self._counters))
            self._iterator = iterate_slots(stream, self.config.num_workers, self.config.prefetch_factor)
        return self._iterator

    def _absorb(self, result: ShardResult) -> None:
        address = result.address
        if address.slot != self._next_slot:
            raise RuntimeError(f"slot {address.slot} arrived while slot {self._next_slot} was expected")
        for skip in result.skips:
            self.stats.record(skip)
        if result.skips:
            reasons = sorted({s.reason for s in result.skips})
            first = result.skips[0]
            log.warning(
                "shard %s: %d skip(s) (%s); first: %s %s",
                result.url,
                sum(s.count for s in result.skips),
                ", ".join(reasons),
                printable(first.key or "-"),
                printable(first.detail),
            )
        self._check_not_empty(result)
        self._addresses[address.slot] = address
        for index, built in result.samples:
            self.stats.used += 1
            self.cropped += built.cropped
            self.prompts_dropped += built.prompt_dropped
            leaving = self._shuffle.push(_Waiting((address.slot, index), built))
            if leaving is not None:
                self._packer.add(leaving, leaving.built.num_tokens)
        self._next_slot = address.slot + 1
        self._counters[address.dataset] = address.shard_number + 1
        live = self._live_slots()
        self._addresses = {slot: a for slot, a in self._addresses.items() if slot in live}
        self.budget.check(self.stats)

    def _check_not_empty(self, result: ShardResult) -> None:
        """LoaderSetupError naming the dataset once ``EMPTY_SLOTS_PER_SHARD`` x its shard count
        slots in a row of it read nothing (docs/DESIGN.md, "The data path, from shard to loss")."""
        dataset = result.address.dataset
        # Bytes that are no tar (an empty tar with junk after it) are no sample either.
        empty = not result.samples and all(skip.reason == STRAY_BYTES for skip in result.skips)
        self._empty_slots[dataset] = self._empty_slots[dataset] + 1 if empty else 0
        source = self.schedule.sources[dataset]
        if self._empty_slots[dataset] > EMPTY_SLOTS_PER_SHARD * len(source.shards):
            raise LoaderSetupError(
                f"dataset {source.name!r}: the last {self._empty_slots[dataset]} shards read on this rank "
                f"(last: {result.url}) hold no sample, no member named <key>.<field>: an empty tar, or files of "
                "another layout"
            )

    def _live_slots(self) -> set[int]:
        return {w.ref[0] for w in self._shuffle.items} | {e.item.ref[0] for e in self._packer.pending}

    @property
    def efficiency(self) -> float:
        """Real tokens / token budget over every pack emitted so far."""
        return self.tokens / (self.packs * self.config.packing.tokens_per_pack) if self.packs else 0.0

    def close(self) -> None:
        """Stops the dataloader workers (a later ``next`` starts new ones where the stream is)."""
        iterator, self._iterator = getattr(self, "_iterator", None), None
        if iterator is not None:
            iterator.close()

    def __enter__(self) -> PackedLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The loader's position (module doc): a few counters and references, JSON-able."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "fingerprint": self._fingerprint,
            "settings": self.config.stream_settings(),  # to name what changed, where a resume finds another
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "next_slot": self._next_slot,
            "counters": list(self._counters),
            "shuffle_insertions": self._shuffle.insertions,
            "shuffle": [list(w.ref) for w in self._shuffle.items],
            "packer": [list(e.item.ref) for e in self._packer.pending],
            "slots": {str(slot): [a.dataset, a.shard_number] for slot, a in sorted(self._addresses.items())},
            "exhausted": self._exhausted,
            "packs": self.packs,
            "tokens": self.tokens,
            "cropped": self.cropped,
            "prompts_dropped": self.prompts_dropped,
            "stats": self.stats.state_dict(),
        }

    def restart(self) -> None:
        """Back to the start of the stream, as a new loader (a resume that does not continue the
        saved stream: ``checkpoint.restart_changed_data``)."""
        self._reset(next_slot=0, counters=[0] * len(self.schedule.sources))

    def load_state_json(self, blob: bytes) -> None:
        """``load_state_dict`` of the JSON bytes of a state, as a checkpoint stores it; a ValueError
        for bytes that are no loader state (not UTF-8 JSON of an object, nested past the parser, a
        field missing or of another kind), never the KeyError or RecursionError of a crafted one."""
        try:
            # strict: the writer never writes NaN (json.loads took it, and a NaN token count made
            # every packing-efficiency metric of the resumed run NaN) nor a key twice
            state = loads(blob.decode("utf-8"), object_pairs_hook=unique_keys)
        except JsonNumberError as error:
            raise ValueError(f"loader state: {error}") from None
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ValueError(f"loader state is not JSON ({type(error).__name__}: {error})") from None
        if not isinstance(state, dict):
            raise ValueError(f"loader state is a JSON {type(state).__name__}, not an object")
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, AttributeError, IndexError) as error:
            raise ValueError(f"loader state is damaged: {type(error).__name__}: {error}") from None

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken. DataStreamChangedError if it belongs to
        other data settings or number of data-parallel ranks, or its samples no longer build (the
        loader is then part-way: ``restart`` it); ValueError for another rank or a damaged state."""
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(
                f"loader state format_version {state.get('format_version')!r}; expected {STATE_FORMAT_VERSION}"
            )
        if state["dp_world_size"] != self.dp_world_size:
            raise DataStreamChangedError(
                f"loader state was saved with {state['dp_world_size']} data-parallel ranks; this run has "
                f"{self.dp_world_size}. Each rank's shard split and sample order depend on the number of ranks, so "
                f"resuming the data stream exactly is impossible. Resume with {state['dp_world_size']} data-parallel "
                "ranks, or restart the data stream.",
                (f"data-parallel ranks: {state['dp_world_size']} -> {self.dp_world_size}",),
            )
        if state["dp_rank"] != self.dp_rank:
            raise ValueError(f"loader state belongs to data-parallel rank {state['dp_rank']}, not {self.dp_rank}")
        if state["fingerprint"] != self._fingerprint:
            saved = state.get("settings")  # absent from states saved before it existed
            changes = tuple(changed_settings(saved, self.config.stream_settings())) if isinstance(saved, dict) else ()
            what = "; ".join(changes) or "datasets, stage mixture, packing, shuffle or seed"
            raise DataStreamChangedError(
                f"loader state was saved under other data settings ({what}); the exact continuation does not "
                "exist. Restore those settings, or restart the data stream.",
                changes,
            )
        counts = {name: state[name] for name in ("next_slot", "shuffle_insertions", "packs", "tokens", "cropped")}
        counts["prompts_dropped"] = state.get("prompts_dropped", 0)  # absent from states saved before it existed
        for name, value in counts.items():  # "many" or 1.5 failed (or miscounted) only later, in the run
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"loader state {name}={value!r} must be an int >= 0")
        if not isinstance(state["exhausted"], bool):
            raise ValueError(f"loader state exhausted={state['exhausted']!r} must be true or false")
        self._reset(state["next_slot"], state["counters"])
        rebuilt: dict[tuple[int, int], BuiltSample] = {}
        for slot, (dataset, number) in state["slots"].items():
            address = SlotAddress(int(slot), dataset, number)
            self._addresses[address.slot] = address
            for index, built in self.processor.process(address).samples:
                rebuilt[(address.slot, index)] = built

        def waiting(ref) -> _Waiting:
            ref = (int(ref[0]), int(ref[1]))
            if ref not in rebuilt:
                change = f"sample {ref[1]} of slot {ref[0]} no longer builds: the shards changed since the checkpoint"
                raise DataStreamChangedError(f"loader state: {change}", (change,))
            return _Waiting(ref, rebuilt[ref])

        self._shuffle.items = [waiting(ref) for ref in state["shuffle"]]
        self._shuffle.insertions = state["shuffle_insertions"]
        for ref in state["packer"]:
            item = waiting(ref)
            self._packer.add(item, item.built.num_tokens)
        self._exhausted = state["exhausted"]
        self.packs, self.tokens, self.cropped = state["packs"], state["tokens"], state["cropped"]
        self.prompts_dropped = counts["prompts_dropped"]
        self.stats = SkipStats.from_state_dict(state["stats"])
