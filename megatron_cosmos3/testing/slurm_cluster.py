"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd on this machine.

Debian's ``slurm-wlm`` (22.05) and ``munge`` (``launch/setup_env.sh`` installs them when missing).
Everything lives in one folder (config, munge key and socket, state, spool, logs); the daemons run in
the foreground as children of the test, so stopping them is killing those pids. Settings that work
on a container without cgroups: ``proctrack/linuxproc``, ``task/none``, ``select/cons_tres``;
``JobRequeue=1`` so a batch job can requeue itself. Each cluster has a name of its own
(``cosmos3test-<random hex>``): two test sessions on one host (or two xdist workers) each number
their jobs from 1, and the rendezvous port derived from the job id alone was the same in both
(``training/distributed.py``, ``slurm_port`` of ``SLURM_CLUSTER_NAME`` too). ``start`` raises
``ClusterUnavailable`` with the reason (and the daemon's log) when the daemons cannot start, so the
caller can skip.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_cosmos3.testing.ports import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scontrol", "scancel", "squeue")


class ClusterUnavailable(RuntimeError):
    """The daemons cannot run here; the message says why."""


def _find(name: str) -> str:
    for folder in (os.environ.get("PATH", "").split(os.pathsep)) + ["/usr/sbin", "/usr/bin", "/sbin"]:
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise ClusterUnavailable(f"{name} is not installed (launch/setup_env.sh installs slurm-wlm and munge)")


@dataclass
class Job:
    """What ``scontrol show job`` says of one job (the fields the tests read)."""

    job_id: str
    state: str
    restarts: int
    exit_code: str
    fields: dict[str, str]


class LocalSlurmCluster:
    """One node named after this host, one partition ``debug``, ``cpus`` CPUs."""

    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.name = f"cosmos3test-{secrets.token_hex(4)}"  # SLURM_CLUSTER_NAME of its jobs
        self.node = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        self._processes: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment for the SLURM commands (and jobs) of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        if os.geteuid() != 0:
            raise ClusterUnavailable("the daemons need root (munged runs as the munge user, slurmd as root)")
        try:
            pwd.getpwnam("munge")
        except KeyError as error:
            raise ClusterUnavailable("no munge user (install the munge package)") from error
        binaries = {name: _find(name) for name in (*DAEMONS, *COMMANDS, "mungekey")}
        self.binaries = binaries
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged runs as the munge user, who cannot enter the test's private temporary folders.
        munge = self.munge_dir = Path(tempfile.mkdtemp(prefix="cosmos3-munge-"))
        key = munge / "munge.key"
        subprocess.run([binaries["mungekey"], "--create", "--keyfile", str(key)], check=True, capture_output=True)
        owner = pwd.getpwnam("munge")
        for path in (munge, key):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        os.chmod(munge, 0o700)
        os.chmod(key, 0o600)
        self.socket = munge / "munge.socket"
        self._write_conf()
        self._start_daemon(
            [
                binaries["munged"],
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.socket}",
                f"--pid-file={munge}/munged.pid",
                f"--seed-file={munge}/munged.seed",
                f"--log-file={munge}/munged.log",
            ],
            user=owner,
        )
        self._wait(lambda: self.socket.exists(), timeout, "munged", self.root / "log" / "munged.out")
        self._start_daemon(self._controller_command())
        self._wait(self._controller_up, timeout, "slurmctld", self.root / "log" / "slurmctld.log")
        self._start_daemon([binaries["slurmd"], "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "slurmd", self.root / "log" / "slurmd.log")

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    f"ClusterName={self.name}",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"SlurmctldPort={free_port()}",
                    f"SlurmdPort={free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.socket}",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/builtin",
                    "JobRequeue=1",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "MinJobAge=600",
                    "KillWait=30",
                    "SchedulerParameters=sched_interval=1",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _controller_command(self) -> list[str]:
        return [self.binaries["slurmctld"], "-D", "-i", "-f", str(self.conf)]

    def _daemon(self, command: list[str], user=None) -> subprocess.Popen:
        log = open(self.root / "log" / f"{Path(command[0]).name}.out", "ab")
        as_user = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, **as_user)
        log.close()
        return process

    def _start_daemon(self, command: list[str], user=None) -> None:
        self._processes.append(self._daemon(command, user))

    def _wait(self, ready, timeout: float, name: str, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self._processes):
                break
            if ready():
                return
            time.sleep(0.2)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
        out = self.root / "log" / f"{name}.out"
        tail += out.read_text(errors="replace")[-2000:] if out.exists() else ""
        self.stop()
        raise ClusterUnavailable(f"{name} did not start within {timeout:.0f} s:\n{tail}")

    def _scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.binaries["scontrol"], *args], env=self.env, capture_output=True, text=True, timeout=30
        )

    def _controller_up(self) -> bool:
        return self._scontrol("ping").stdout.count("UP") > 0

    def _node_idle(self) -> bool:
        state = self._scontrol("show", "node", self.node).stdout
        return "State=IDLE" in state

    def command(
        self, name: str, *args: str, check: bool = True, env: dict | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        """Runs one of the SLURM commands (``sbatch``, ``scontrol``, ...) against this cluster, in
        ``env`` (default: this environment) plus the cluster's ``SLURM_CONF``."""
        done = subprocess.run(
            [self.binaries[name], *args],
            env={**(env or os.environ), "SLURM_CONF": str(self.conf)},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed: {done.stderr}")
        return done

    def job(self, job_id: str) -> Job:
        out = self.command("scontrol", "show", "job", "-o", job_id).stdout.strip()
        fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
        return Job(
            job_id, fields.get("JobState", ""), int(fields.get("Restarts", 0)), fields.get("ExitCode", ""), fields
        )

    def batch_script_pid(self, job_id: str) -> int:
        """The pid of job ``job_id``'s batch script: local task 0 of its batch step in ``scontrol
        listpids``, which asks the node's slurmstepd, not the controller."""
        shown = self.command("scontrol", "listpids", job_id).stdout.splitlines()[1:]
        for pid, _, step, local_id, *_ in (line.split() for line in shown):
            if (step, local_id) == ("batch", "0"):
                return int(pid)
        raise RuntimeError(f"job {job_id}: no batch script in scontrol listpids: {shown}")

    @contextlib.contextmanager
    def controller_unreachable(self):
        """slurmctld stopped (SIGSTOP) inside the block and resumed on leaving: a request to it is
        accepted and never answered, as a hung controller's is, and ``scontrol`` or ``scancel`` fails
        after ``MessageTimeout`` (``scontrol show job`` twice: 20 s); the jobs and their steps run on
        meanwhile. A request that failed so is still carried out once the controller resumes."""
        controller = self._processes[DAEMONS.index("slurmctld")]
        os.kill(controller.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(controller.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def controller_down(self, timeout: float = 60):
        """slurmctld shut down (SIGTERM: it saves its state) inside the block and started again from
        that state on leaving, as a restart does: a request to it is refused at connect, and
        ``scontrol`` fails after its connect retries (about ``MessageTimeout``, 10 s); the jobs and
        their steps run on meanwhile. A step that ends meanwhile cannot report it: its slurmstepd
        tries again a minute later, and the job cannot end before."""
        index = DAEMONS.index("slurmctld")
        self._processes[index].terminate()
        self._processes[index].wait(timeout=timeout)
        try:
            yield
        finally:
            self._processes[index] = self._daemon(self._controller_command())
            self._wait(self._controller_up, timeout, "slurmctld", self.root / "log" / "slurmctld.log")

    def stop(self) -> None:
        """Cancels every job (a job step's slurmstepd would outlive the daemons), then stops them."""
        if self._processes and all(p.poll() is None for p in self._processes):
            self.command("scancel", "--partition=debug", check=False)
            deadline = time.monotonic() + 60
            while self.command("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for process in reversed(self._processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._processes.clear()
        if getattr(self, "munge_dir", None) is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
