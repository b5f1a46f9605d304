"""Process-group set-up from the launcher's environment (torchrun, or SLURM's srun)."""

from __future__ import annotations

import ctypes
import datetime
import itertools
import logging
import os
import re
import signal
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_cosmos3.parallel.failures import await_posted_failure, fail_together


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    job_id: str = ""  # SLURM's job id or torchrun's run id: who holds the run folder's lock
    slurm_attempt: int | None = None  # SLURM's restart count of the job (0 first), None outside SLURM

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def started_by_srun(environ: Mapping[str, str]) -> bool:
    """Whether this process is one of several ranks srun started, one task per rank (no torchrun).
    The step's task count, not the allocation's: a batch script of ``--ntasks=8`` (``SLURM_NTASKS=8``)
    that runs one process without srun is one process, not rank 0 of 8 waiting for the other 7."""
    return "WORLD_SIZE" not in environ and int(environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


_HOST_LIST_EXAMPLE = "e.g. 'node[01-04,07],gpu1'"
# scontrol's most hosts in one bracketed range ("Too many hosts in range" above it).
MAX_RANGE_HOSTS = 65536
_NUMBERS = re.compile(r"(\d+)(?:-(\d+))?", re.ASCII)


def _not_a_host_list(nodelist: str, why: str) -> ValueError:
    return ValueError(f"{nodelist!r}: not a SLURM host list ({why}; {_HOST_LIST_EXAMPLE})")


def _bracket_numbers(ranges: str, nodelist: str) -> list[str]:
    """The numbers of one bracket's "01-03,7" as text, each as wide as its range's first number
    ("08-10" gives 08 09 10, "8-010" 8 9 10)."""
    numbers = []
    for part in ranges.split(","):
        match = _NUMBERS.fullmatch(part)
        if match is None:
            raise _not_a_host_list(nodelist, f"[{ranges}] is not numbers and ranges")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low or high - low >= MAX_RANGE_HOSTS:
            raise _not_a_host_list(nodelist, f"range {part} is backwards or over {MAX_RANGE_HOSTS} hosts")
        numbers += [str(n).zfill(len(match[1])) for n in range(low, high + 1)]
    return numbers


def _host_list_entries(nodelist: str) -> list[tuple[list[str], list[list[str]]]]:
    """The comma-separated entries of a SLURM host list, each as its texts and the numbers of the
    brackets between them ("rack[1-2]-n[3]" is ["rack", "-n", ""], [["1", "2"], ["3"]])."""
    entries, texts, brackets, position = [], [""], [], 0
    while position < len(nodelist):
        char = nodelist[position]
        if char == ",":
            entries.append((texts, brackets))
            texts, brackets = [""], []
        elif char == "[":
            end = nodelist.find("]", position)
            if end < 0:
                raise _not_a_host_list(nodelist, "a '[' is not closed")
            brackets.append(_bracket_numbers(nodelist[position + 1 : end], nodelist))
            texts.append("")
            position = end
        elif char == "]" or char.isspace():
            raise _not_a_host_list(nodelist, f"{char!r} at {position}")
        else:
            texts[-1] += char
        position += 1
    entries.append((texts, brackets))
    if any(not brackets and not texts[0] for texts, brackets in entries):
        raise _not_a_host_list(nodelist, "an empty entry")
    return entries


def _entry_hosts(texts: list[str], brackets: list[list[str]]):
    """The hosts of one entry, in scontrol's order: with several brackets the last varies fastest,
    then the first, the second, ... ("n[0-1]a[0-1]b[0-1]": n0a0b0 n0a0b1 n1a0b0 n1a0b1 n0a1b0 ...)."""
    order = [*range(len(brackets) - 2, -1, -1), len(brackets) - 1] if brackets else []
    for chosen in itertools.product(*(brackets[index] for index in order)):
        numbers = dict(zip(order, chosen))
        yield texts[0] + "".join(numbers[index] + text for index, text in enumerate(texts[1:]))


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM host list (``SLURM_JOB_NODELIST``), as ``scontrol show hostnames``
    gives them: "n[1-3,5]", zero-padded "n[001-010]", several brackets "rack[1-2]-n[1-2]", comma
    lists mixing them, in its order, repeats kept. Text after the last bracket ("n[1-2]-ib", which
    the 22.05 scontrol refuses) follows each number. ValueError naming the list where it is not
    one (an unclosed or empty bracket, a backwards range, an empty entry, spaces)."""
    return [host for texts, brackets in _host_list_entries(nodelist) for host in _entry_hosts(texts, brackets)]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list ("node[03-05,9],gpu1" -> "node03", "a[1-2]b[7-8]" ->
    "a1b7"; ``hostnames``): rank 0's node, srun placing tasks on the step's nodes in order.
    ValueError naming the list where it is not one."""
    texts, brackets = _host_list_entries(nodelist)[0]
    return next(_entry_hosts(texts, brackets))


# Derived rendezvous ports lie in 20000-32767, below Linux's ephemeral range (32768-60999 by default,
# net.ipv4.ip_local_port_range), from which the kernel hands out ports to outgoing connections: a
# derived port there could be held by any process's connection. launch/torchrun_node.sh derives
# torchrun's the same way (tests/slurm/test_launch_scripts.py holds the two to the same numbers).
PORT_BASE, PORT_SPAN = 20000, 12768
# A prime not dividing PORT_SPAN: steps 0 to PORT_SPAN - 1 of one job each get another port.
STEP_STRIDE = 7919
# 32-bit FNV-1a of the cluster's name: a few lines in shell too, and names differing in one letter
# land far apart.
FNV_OFFSET_BASIS, FNV_PRIME = 2166136261, 16777619


def cluster_port_offset(cluster_name: str) -> int:
    """Where cluster ``cluster_name``'s job ids start in the port span: 0 without a name, else the
    32-bit FNV-1a hash of its UTF-8 bytes modulo ``PORT_SPAN``. Two clusters on one host (two test
    sessions, each numbering its jobs from 1) then rarely derive the same ports."""
    if not cluster_name:
        return 0
    digest = FNV_OFFSET_BASIS
    for byte in cluster_name.encode():
        digest = ((digest ^ byte) * FNV_PRIME) % 2**32
    return digest % PORT_SPAN


def slurm_port(job_id: str, step_id: str = "0", cluster_name: str = "") -> int:
    """The rendezvous port of SLURM job ``job_id``'s step ``step_id`` on cluster ``cluster_name``
    (``SLURM_CLUSTER_NAME``): ``PORT_BASE + (cluster_port_offset + job_id + STEP_STRIDE * step_id)
    % PORT_SPAN``. Two jobs of a cluster on a node (ids less than ``PORT_SPAN`` apart) meet on
    different ports, as do two steps of one job running at once; a cluster's jobs are shifted by its
    name's offset. ValueError naming an id that is not a number."""
    for name, value in (("SLURM_JOB_ID", job_id), ("SLURM_STEP_ID", step_id)):
        if not value.isdecimal():
            raise ValueError(f"{name}={value!r}: not a number to derive the rendezvous port from")
    return PORT_BASE + (cluster_port_offset(cluster_name) + int(job_id) + STEP_STRIDE * int(step_id)) % PORT_SPAN


def srun_world(environ: Mapping[str, str]) -> tuple[int, int, int, str, str]:
    """(rank, world size, local rank, MASTER_ADDR, MASTER_PORT) of a rank srun started (one task per
    rank): SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; the address and port as set, else the
    first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST) and ``slurm_port`` of SLURM_JOB_ID,
    SLURM_STEP_ID and SLURM_CLUSTER_NAME. ValueError naming what is missing or not a number, or a
    heterogeneous job (``SLURM_HET_SIZE``: its components' tasks are not one world here)."""
    components = environ.get("SLURM_HET_SIZE") or environ.get("SLURM_PACK_SIZE")  # PACK: SLURM before 20.02
    if components:
        raise ValueError(
            f"srun launch: a heterogeneous job (SLURM_HET_SIZE={components}) is not supported; submit one "
            "homogeneous job (--nodes, --ntasks-per-node, --gpus-per-node) without ':' or '#SBATCH hetjob'"
        )
    rank, world_size, local_rank = _launch_numbers(
        environ, ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"), "srun launch", "srun sets it in every task"
    )
    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError(
                "srun launch: no MASTER_ADDR, SLURM_STEP_NODELIST or SLURM_JOB_NODELIST to find rank 0's node"
            )
        addr = first_host(nodelist)
    port = environ.get("MASTER_PORT")
    if not port:
        try:
            job, step = environ.get("SLURM_JOB_ID", ""), environ.get("SLURM_STEP_ID", "0")
            port = str(slurm_port(job, step, environ.get("SLURM_CLUSTER_NAME", "")))
        except ValueError as error:
            raise ValueError(f"srun launch: no MASTER_PORT, and {error}") from None
    return rank, world_size, local_rank, addr, port


def _launch_numbers(environ: Mapping[str, str], names: tuple[str, str, str], launch: str, setter: str):
    """(rank, world size, local rank) from the variables ``names`` (in that order): ValueError
    naming one that is missing or not a number (``launch``: whose, ``setter``: who sets it), or a
    rank outside the world."""
    numbers = []
    for name in names:
        value = environ.get(name)
        if value is None or not value.isdecimal():
            raise ValueError(f"{launch}: {name}={value!r}, not a number; {setter} it starts")
        numbers.append(int(value))
    if not numbers[0] < numbers[1]:
        raise ValueError(f"{launch}: {names[0]}={numbers[0]} is not a rank of {names[1]}={numbers[1]}")
    return tuple(numbers)


# One entry of SLURM's tasks-per-node lists: "4", or "4(x2)" for two nodes of 4 tasks each.
_TASKS_ENTRY = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def slurm_tasks_on_this_node(environ: Mapping[str, str]) -> int:
    """How many tasks of this srun step run on this node: this node's entry (``SLURM_NODEID``) of
    ``SLURM_STEP_TASKS_PER_NODE`` (or the allocation's ``SLURM_TASKS_PER_NODE``), comma-separated
    counts in node order, "N(xK)" for K nodes of N tasks; else ``SLURM_NTASKS_PER_NODE``; else 1.
    ValueError naming the variable and its value where it is not in SLURM's format."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name not in environ:
            continue
        value, counts = environ[name], []
        for entry in value.split(","):
            match = _TASKS_ENTRY.fullmatch(entry.strip())
            if match is None:
                raise ValueError(f"{name}={value!r}: not SLURM's tasks per node (e.g. '4(x2),3')")
            counts += [int(match[1])] * int(match[2] or 1)
        node = environ.get("SLURM_NODEID", "0")
        if not node.isdecimal() or int(node) >= len(counts):
            raise ValueError(f"SLURM_NODEID={node!r}: no node of {name}={value!r} ({len(counts)} nodes)")
        return counts[int(node)]
    value = environ.get("SLURM_NTASKS_PER_NODE", "1")
    if not value.isdecimal():
        raise ValueError(f"SLURM_NTASKS_PER_NODE={value!r}: not a number of tasks")
    return int(value)


def launcher_env(environ: MutableMapping[str, str]) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables, or from srun's where srun started
    one task per rank; None when unlaunched. For an srun rank it sets in ``environ`` what env://
    and libraries written for torchrun read: MASTER_ADDR, MASTER_PORT (``srun_world``), RANK and
    LOCAL_RANK (DeepSpeed asserts LOCAL_RANK). Not WORLD_SIZE: the host-memory count must still
    see an srun world (``started_by_srun``)."""
    if "WORLD_SIZE" in environ:  # torchrun (or a WORLD_SIZE exported by hand: RANK must come with it)
        environ = {"LOCAL_RANK": "0", **environ}
        return _launch_numbers(
            environ, ("RANK", "WORLD_SIZE", "LOCAL_RANK"), "torchrun launch", "torchrun sets it in every worker"
        )
    if started_by_srun(environ):
        rank, world_size, local_rank, addr, port = srun_world(environ)
        environ.update(MASTER_ADDR=addr, MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(local_rank))
        return rank, world_size, local_rank
    return None


def launched_world_size(environ: Mapping[str, str]) -> int:
    """The world size the launcher starts (``launcher_env``'s, without changing ``environ``): torchrun's
    WORLD_SIZE, the srun step's task count, else 1. ValueError as ``launcher_env``'s."""
    launched = launcher_env(dict(environ))
    return launched[1] if launched else 1


def launched_rank(environ: Mapping[str, str]) -> int:
    """This process's rank before any process group exists, for deciding who reports: torchrun's
    RANK, an srun task's SLURM_PROCID (srun sets no RANK), else 0. Launch variables that are no
    number also give 0, so that the error naming them is printed rather than swallowed."""
    try:
        srun_task = "RANK" not in environ and started_by_srun(environ)
    except ValueError:  # SLURM_STEP_NUM_TASKS that is no number: checked_config names it
        srun_task = False
    value = environ.get("SLURM_PROCID" if srun_task else "RANK", "0")
    return int(value) if value.isdecimal() else 0


def gpu_index(local_rank: int, visible_gpus: int) -> int:
    """This rank's GPU among the ``visible_gpus`` it sees: its local rank where it sees the node's
    GPUs (torchrun, plain srun), else the local rank modulo that count. srun's ``--gpus-per-task=1``
    (or ``--gpu-bind``) shows each task only its own GPU, as device 0; local rank 3 asked for
    device 3 there ("invalid device ordinal")."""
    return local_rank % visible_gpus


def slurm_attempt() -> int | None:
    """How often SLURM has restarted (requeued) this job: 0 on its first run; None outside SLURM."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    count = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(count) if count.isdecimal() else 0


def launcher_run_id() -> str:
    """SLURM's job id (kept by a requeued job), else torchrun's run id, else empty."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")


log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """Under torchrun, asks Linux to SIGKILL this worker when its launcher dies. torchrun starts
    each worker in a session of its own, so a ``kill -9`` of torchrun alone would leave the workers
    training and checkpointing into a folder that a restarted job is using."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    except (OSError, AttributeError) as error:  # not Linux: the run-folder lock still guards the folder
        log.warning("cannot tie this worker's life to torchrun's (%s)", error)
        return
    if os.getppid() != parent:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGKILL)


def _restart_store(world_size: int, timeout: datetime.timedelta | None):
    """The rendezvous store of a worker that torchrun may restart (``--max-restarts``), or None for
    the plain ``env://`` one. torchrun shares its own store with the workers of every restart, so
    the process group of a restarted attempt would read the addresses of the attempt that failed
    (a gloo or NCCL connect to a dead port: pytorch#135712). With one torchrun (one node) the
    restart count is the same on every worker and keeps each attempt's keys apart; with several,
    the launcher turns the sharing off (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``,
    ``launch/torchrun_node.sh``), and a worker of a launch that did not is warned."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            log.warning(
                "torchrun --max-restarts over %s nodes shares its rendezvous store with the workers: a "
                "restarted attempt may read the failed one's addresses; launch with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/torchrun_node.sh does)",
                os.environ["GROUP_WORLD_SIZE"],
            )
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout or datetime.timedelta(minutes=30),
    )
    return dist.PrefixStore(f"megatron_cosmos3/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def init_distributed(timeout_s: float | None = None) -> DistributedContext:
    """Initialises the default process group (NCCL + gloo on GPUs, gloo on CPUs); single process if
    unlaunched. ``timeout_s``: how long its collectives (and the rendezvous) wait, default torch's."""
    launched = launcher_env(os.environ)
    rank, world_size, local_rank = launched or (0, 1, 0)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker
        die_with_launcher()
    job_id = launcher_run_id()
    if torch.cuda.is_available():
        device = torch.device("cuda", gpu_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if launched and not dist.is_initialized():
        # On GPUs, CUDA tensors go through NCCL and the small host-side collectives (metric sums,
        # finiteness flags, grad-norm partial sums, pickled packs and loader state) through gloo:
        # NCCL takes no CPU tensors. Every group made later inherits both.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        store = _restart_store(world_size, timeout)
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            init_method=None if store else "env://",
            store=store,
            timeout=timeout,
        )
    return DistributedContext(rank, world_size, local_rank, device, job_id, slurm_attempt())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


# The launch settings worth a line in the log: rendezvous (and whether the workers meet in torchrun's
# store), the collective libraries, threads, devices.
LAUNCH_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "SLURM_JOB_ID",
    "SLURM_NODELIST",
)
LAUNCH_ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_")


class PreflightError(RuntimeError):
    """Not every rank answered the launch check in time; the message names the silent ranks."""


def _ranges(ranks: list[int]) -> str:
    spans, start = [], ranks[0]
    for previous, rank in zip(ranks, ranks[1:] + [None]):
        if rank != previous + 1:
            spans.append(f"{start}-{previous}" if previous != start else f"{start}")
            start = rank
    return ",".join(spans)


def preflight(ctx: DistributedContext, timeout_s: float) -> str:
    """Collective launch check, before any work: every rank must answer a barrier within
    ``timeout_s`` (else ``PreflightError``, naming the ranks that did not), then one all-reduce on
    the training device must sum to the world size. A rank failing in it ends every rank, each
    naming that rank and its error (``fail_together``; the others raise ``RankFailedError``).
    Returns the layout and launch environment as one line (rank 0 logs it)."""
    hosts = [socket.gethostname()]
    if dist.is_initialized() and ctx.world_size > 1:
        with fail_together("the preflight"):
            # monitored_barrier is gloo's: on GPUs it runs on a gloo group of its own.
            group = dist.new_group(backend="gloo") if ctx.device.type == "cuda" else None
            # Rank 0 names the silent ranks: the others wait longer, so that their wait ends when rank 0
            # has posted its verdict and closed the groups, not at the same moment as rank 0's (each
            # would then name its own timeout, not the silent ranks).
            wait_s = timeout_s if ctx.rank == 0 else 2 * timeout_s
            try:
                dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=wait_s), wait_all_ranks=True)
            except RuntimeError as error:
                if ctx.rank != 0:  # rank 0 broke the barrier off: let its verdict naming the silent ranks stand
                    await_posted_failure(timeout_s)
                raise PreflightError(
                    f"preflight: not every rank answered within distributed.preflight_timeout_s={timeout_s}: {error}"
                ) from error
            hosts = [None] * ctx.world_size
            dist.all_gather_object(hosts, socket.gethostname())
            ones = torch.ones(1, device=ctx.device)
            dist.all_reduce(ones)
            if int(ones.item()) != ctx.world_size:
                raise PreflightError(f"preflight: an all-reduce of ones over {ctx.world_size} ranks gave {ones.item()}")
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    layout = "; ".join(f"{host} ranks {_ranges(ranks)}" for host, ranks in by_host.items())
    backend = dist.get_backend() if dist.is_initialized() else "none"
    env = {k: v for k, v in sorted(os.environ.items()) if k in LAUNCH_ENV or k.startswith(LAUNCH_ENV_PREFIXES)}
    settings = " ".join(f"{k}={v}" for k, v in env.items())
    where = f"world {ctx.world_size} on {len(by_host)} node(s), backend {backend}, device {ctx.device.type}"
    return f"{where}: {layout}; {settings}"
