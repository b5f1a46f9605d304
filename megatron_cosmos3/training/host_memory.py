"""Whether a CPU run's model state can fit in the host's memory, found out before anything is
allocated (docs/DESIGN.md, "Host memory").

A model whose weights and optimizer state cannot fit would otherwise be found out by the OOM killer
mid-set-up (a SIGKILL, no message). The estimate is a lower bound from the config alone
(``MoTConfig.parameter_count_lower_bound``, the count ``MAX_PARAMETERS`` bounds): 4 bytes a weight
(2 for DeepSpeed's bf16 working copy), and where nothing is frozen, AdamW's state as each engine
keeps it, divided over the ranks that share it, and summed over the ranks on this host. It is refused
only when even that does not fit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from megatron_cosmos3.training.config import TrainConfig
from megatron_cosmos3.training.distributed import slurm_tasks_on_this_node, started_by_srun
from megatron_cosmos3.training.refusals import StartupRefusal

GiB = 1 << 30


class HostMemoryError(StartupRefusal):
    """The model state cannot fit in the host's memory; the message names the estimate and what is available."""


def model_state_bytes(config: TrainConfig, world_size: int) -> int:
    """A lower bound (bytes) of the host memory one rank's weights, gradients and AdamW state take
    on a CPU run of ``config`` over ``world_size`` ranks (module doc). Megatron-style engine: fp32
    weights and gradients split over tensor x expert ranks, under pipeline parallelism those of the
    fewest layers a pipeline rank holds, AdamW's two moments also over the data ranks with
    ``optimizer.shard_optimizer_state``; DeepSpeed: the working weights (split
    over every rank under ZeRO-3), fp32 masters and moments over every rank, and never less than
    the whole fp32 model every rank materialises first."""
    n = config.model.parameter_count_lower_bound()
    trains_all = not config.stage.freeze
    if config.engine == "deepspeed":
        weight_bytes = 2 if config.precision == "bf16" else 4
        weights = weight_bytes * n // (world_size if config.deepspeed.zero_stage == 3 else 1)
        # Before DeepSpeed partitions and casts it, every rank holds the whole model in fp32 (``allocate``).
        return max(4 * n, weights + (12 * n // world_size if trains_all else 0))
    p = config.parallel
    split = p.tensor * p.expert  # the pipeline's split is counted in n
    data = max(1, world_size // (p.tensor * p.pipeline * p.context))
    if p.pipeline > 1:  # embeddings, heads and the ViT live on the end stages: a middle one has its layers alone
        # The rank of fewest layers bounds every rank (stages may be uneven: ParallelSizes.layers_per_pipeline_rank).
        fewest = min(p.layers_per_pipeline_rank(config.model.num_layers))
        n = config.model.layer_parameter_count_lower_bound() * fewest // config.model.num_layers
    weights = 4 * n // split
    if not trains_all:
        return weights
    moments = 8 * n // (split * (data if config.optimizer.shard_optimizer_state else 1))
    return 2 * weights + moments  # weights and their gradients, then AdamW's moments


def available_host_bytes(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """The memory this process may still take, in bytes, and where the figure comes from: the
    smallest of /proc/meminfo's MemAvailable (else free pages, ``os.sysconf``) and what each memory
    cgroup of this process (``cgroup_room``) has left."""
    found: list[tuple[int, str]] = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        found.append((pages, "free pages (os.sysconf)"))
    room = cgroup_room(proc, cgroups)
    return min([*found, room] if room else found)


# cgroup v2 and v1: (hierarchy under the cgroup mount, limit file, usage file, page-cache key in memory.stat)
_CGROUP_FILES = {
    2: ("", "memory.max", "memory.current", "file"),
    1: ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache"),
}
_NO_LIMIT = 1 << 62  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_room(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> tuple[int, str] | None:
    """The least memory left under the limit of this process's memory cgroup or of any cgroup above
    it (a container's, a SLURM job's, a node's), and which; None where none sets a limit. The page
    cache a cgroup holds counts as left: the kernel reclaims it before the OOM killer acts."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        version = 2 if controllers == "" else 1 if "memory" in controllers.split(",") else None
        if version is None:
            continue
        hierarchy, limit_file, usage_file, cache_key = _CGROUP_FILES[version]
        root = cgroups / hierarchy
        folder = root / path.strip("/")
        for level in [folder, *folder.parents]:
            room = _room_in(level, limit_file, usage_file, cache_key)
            if room is not None:
                where = "/" + str(level.relative_to(root)).lstrip(".")
                rooms.append((room[0], f"the limit of cgroup {where} ({room[1] / GiB:.1f} GiB) less its use"))
            if level == root:
                break
    return min(rooms) if rooms else None


def _room_in(folder: Path, limit_file: str, usage_file: str, cache_key: str) -> tuple[int, int] | None:
    """(bytes left, limit) of the cgroup in ``folder``, or None without a limit (or its files)."""
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= _NO_LIMIT:
            return None
        usage = int((folder / usage_file).read_text())
        cache = 0
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                cache = int(value)
    except (OSError, ValueError):
        return None
    return max(0, int(limit) - usage + cache), int(limit)


def ranks_on_this_host(environ: Mapping[str, str] = os.environ) -> int:
    """The trainer processes on this host, whose model states share its memory: torchrun's
    ``LOCAL_WORLD_SIZE`` (also where srun starts one torchrun a node); srun's tasks on this node
    where srun starts one task per rank (``slurm_tasks_on_this_node``); else 1."""
    if "LOCAL_WORLD_SIZE" in environ:
        value = environ["LOCAL_WORLD_SIZE"]
        return int(value) if value.isdecimal() and int(value) > 0 else 1
    if started_by_srun(environ):
        return max(1, slurm_tasks_on_this_node(environ))
    return 1


def check_host_memory(config: TrainConfig, world_size: int) -> None:
    """HostMemoryError when the model state of this host's ranks (``model_state_bytes`` each, times
    ``ranks_on_this_host``) exceeds the memory available (``available_host_bytes``); called before
    a CPU run allocates anything. Every rank checks before the collective set-up that precedes any
    rank's allocation, so none counts another's model as used."""
    each, here = model_state_bytes(config, world_size), ranks_on_this_host()
    need = each * here
    available, source = available_host_bytes()
    if need > available:
        n = config.model.parameter_count_lower_bound()
        ranks = f"this host's {here} ranks' " if here > 1 else "this rank's "
        per_rank = f" ({each / GiB:.1f} GiB each)" if here > 1 else ""
        raise HostMemoryError(
            f"model: at least {n:.3g} parameters (model.num_layers={config.model.num_layers}, "
            f"hidden_size={config.model.hidden_size}, vocab_size={config.model.vocab_size}): {ranks}weights "
            f"and optimizer state take at least {need / GiB:.1f} GiB of host memory{per_rank} (engine={config.engine}, "
            f"{world_size} rank(s)), more than the {available / GiB:.1f} GiB available ({source}). "
            f"Use a smaller model, more model-parallel ranks, or GPUs"
        )
