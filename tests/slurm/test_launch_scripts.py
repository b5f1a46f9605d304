"""The launch scripts without a running cluster (docs/DESIGN.md, "Preemption and requeue"): every
shell script passes shellcheck; ``hostnames`` expands host lists as the installed ``scontrol show
hostnames`` does; ``launch/torchrun_node.sh`` derives the rendezvous port of a job step as
``slurm_port`` does; ``slurm/train.sbatch`` refuses a heterogeneous job naming it. Each part is
skipped, with the reason, where its program (shellcheck, scontrol) is not installed."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cosmos3.training.distributed import PORT_BASE, PORT_SPAN, first_host, hostnames, slurm_port

REPO = Path(__file__).resolve().parents[2]


def _program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if found is None:
        pytest.skip(f"{name} is not installed (launch/setup_env.sh installs it)")
    return found


def test_every_shell_script_passes_shellcheck():
    """Every tracked *.sh and *.sbatch, sources followed (-x), at shellcheck's every severity."""
    shellcheck = _program("shellcheck")
    listed = subprocess.run(["git", "ls-files", "*.sh", "*.sbatch"], cwd=REPO, capture_output=True, text=True)
    scripts = listed.stdout.split() if listed.returncode == 0 else []
    if not scripts:  # not a git checkout (an unpacked copy): the files themselves
        scripts = sorted(str(p.relative_to(REPO)) for p in [*REPO.rglob("*.sh"), *REPO.rglob("*.sbatch")])
    assert {"launch/torchrun_node.sh", "slurm/train.sbatch", "slurm/job_environment.sh"} <= set(scripts)
    checked = subprocess.run([shellcheck, "-x", "--format=gcc", *scripts], cwd=REPO, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory):
    """``scontrol show hostnames`` of the installed slurm-wlm, which needs a config file but no
    daemon: a function from a host list to scontrol's hosts (None where it says the list is invalid)."""
    program = _program("scontrol")
    conf = tmp_path_factory.mktemp("scontrol") / "slurm.conf"
    conf.write_text("ClusterName=hostlists\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n")

    def show_hostnames(nodelist: str) -> list[str] | None:
        shown = subprocess.run(
            [program, "show", "hostnames", nodelist],
            env={**os.environ, "SLURM_CONF": str(conf)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert shown.returncode == 0, shown.stderr
        return None if "Invalid hostlist" in shown.stdout + shown.stderr else shown.stdout.split()

    return show_hostnames


# Every form SLURM writes, and combinations of them.
HOST_LISTS = [
    "vm",
    "n[1-3,5]",
    "n[001-010]",
    "n[01-100]",  # the width of the first number, not of the last
    "n[8-012]",
    "rack[1-2]-n[1-2]",
    "n[1-2][3-4]",
    "n[0-1]a[0-2]b[0-1]",  # several brackets: the last varies fastest, then the first, the second
    "n[0-1]a[0-1]b[0-1]c[0-1]",
    "gpu1,node[03-05,9],login",
    "n[5,1-2],n[1-2],n1",  # SLURM's order and repeats, as written
    "n0[1-2],n[1-2]x[001-002]",
    "a.b-c_d[1-2],[3-4]",
    "n[7]",
    "n[99999999999-100000000001]",
    "n[1-65536]",
]


def _random_host_list(rng: random.Random) -> str:
    """A host list of one to three entries, each a name with none to three brackets of ranges."""
    entries = []
    for _ in range(rng.randint(1, 3)):
        brackets = rng.randint(0, 3)
        entry = rng.choice(["n", "gpu", "rack", "dgx-a", "x.y", "n0"])
        for index in range(brackets):
            ranges = []
            for _ in range(rng.randint(1, 3)):
                width, low = rng.randint(1, 4), rng.randint(0, 120)
                high = low + rng.randint(0, 12)
                text = str(low).zfill(width)
                ranges.append(text if rng.random() < 0.3 else f"{text}-{high}")
            entry += f"[{','.join(ranges)}]" + ("" if index == brackets - 1 else rng.choice(["", "-", "r", "-s"]))
        entries.append(entry)
    return ",".join(entries)


def test_host_lists_expand_as_scontrol_show_hostnames_does(scontrol):
    rng = random.Random(20261202)
    for nodelist in HOST_LISTS + [_random_host_list(rng) for _ in range(60)]:
        expected = scontrol(nodelist)
        assert expected is not None, f"scontrol refuses {nodelist!r}"
        assert hostnames(nodelist) == expected, nodelist
        assert first_host(nodelist) == expected[0], nodelist


# Lists scontrol calls invalid, and lists it reads by a quirk that SLURM never writes (an empty
# entry, spaces, an unclosed bracket read as text, an open range): all are errors naming the list.
NOT_HOST_LISTS = {
    "n[3-1]": True,
    "n[a-b]": True,
    "n[]": True,
    "n[1-2]]": True,
    "n[[1-2]]": True,
    "n[-2]": True,
    "n[1--2]": True,
    "n[1,,2]": True,
    "n[1-65537]": True,
    "": False,
    ",vm": False,
    "n1,,n2": False,
    "n1 n2": False,
    "n[1-2": False,
    "n[2-]": False,
}


def test_what_is_not_a_host_list_is_an_error_naming_it(scontrol):
    for nodelist, invalid_for_scontrol in NOT_HOST_LISTS.items():
        assert (scontrol(nodelist) is None) == invalid_for_scontrol, nodelist
        with pytest.raises(ValueError, match=re.escape(f"{nodelist!r}: not a SLURM host list")):
            hostnames(nodelist)


def test_text_after_the_last_bracket_follows_each_number():
    """The 22.05 scontrol refuses "gpu[01-02]-ib"; read here as each number with its suffix."""
    assert hostnames("gpu[01-02]-ib,login") == ["gpu01-ib", "gpu02-ib", "login"]
    assert hostnames("n[1-2]x[3-4].ib") == ["n1x3.ib", "n1x4.ib", "n2x3.ib", "n2x4.ib"]


def _torchrun_node_line(tmp_path: Path, **environ: str) -> str:
    """The first line launch/torchrun_node.sh writes on stderr in ``environ`` (the rendezvous it
    starts torchrun on, or why it refuses to); the script (torchrun by then) is then stopped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", NPROC_PER_NODE="1")
    env.update(TORCHELASTIC_ERROR_FILE=str(tmp_path / "error.json"), **environ)
    script = subprocess.Popen(
        ["bash", str(REPO / "launch/torchrun_node.sh"), "--help"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # torchrun and any worker it started go with the group
    )
    try:
        line = script.stderr.readline().strip()
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
        script.wait()
        script.stderr.close()
    return line


def test_torchrun_node_sh_derives_each_steps_port_as_slurm_port_does(tmp_path):
    """Its default was 29500 for every job and step on a node: two steps of one job running at once,
    or two jobs sharing a node, met in one rendezvous (or failed to bind it)."""
    rendezvous = re.compile(r"torchrun_node\.sh: node 0 of 1, rendezvous at 127\.0\.0\.1:(\d+)")
    ports = {}
    jobs = [("5", None, None), ("5", "0", None), ("5", "1", None), ("5", "2", None), ("6", "0", None)]
    jobs += [("4294967294", "12", None), ("1", "0", "cosmos3test-0a1b2c3d"), ("1", "0", "cosmos3test-0a1b2c3e")]
    jobs += [("1", "3", "gpu-cluster-é"), ("5", "0", "")]
    # Ids past bash's 64-bit arithmetic (which wraps: 2^63 gave port 19488) are taken whole, as by int().
    jobs += [("9223372036854775808", "1", None), ("7", "99999999999999999999", None)]
    for job, step, cluster in jobs:
        environ = {"SLURM_JOB_ID": job, **({"SLURM_STEP_ID": step} if step is not None else {})}
        environ.update({"SLURM_CLUSTER_NAME": cluster} if cluster is not None else {})
        line = _torchrun_node_line(tmp_path, MASTER_ADDR="127.0.0.1", **environ)
        found = rendezvous.fullmatch(line)
        assert found, line
        ports[(job, step, cluster)] = int(found[1])
        # The batch script has no SLURM_STEP_ID; the cluster's name shifts its jobs' ports.
        assert ports[(job, step, cluster)] == slurm_port(job, step or "0", cluster or ""), (job, step, cluster)
    assert len(set(ports.values())) == len(ports) - 2  # all differ but job 5's step 0, no step, no name
    assert all(PORT_BASE <= port < PORT_BASE + PORT_SPAN <= 32768 for port in ports.values())
    # Nodes started by one srun each (a step of one node of two) meet on the job's port: step 0's.
    separate = _torchrun_node_line(
        tmp_path, MASTER_ADDR="127.0.0.1", NNODES="2", SLURM_JOB_ID="5", SLURM_STEP_ID="3", SLURM_STEP_NUM_NODES="1"
    )
    assert separate == f"torchrun_node.sh: node 0 of 2, rendezvous at 127.0.0.1:{slurm_port('5')}", separate
    chosen = _torchrun_node_line(tmp_path, MASTER_ADDR="127.0.0.1", SLURM_JOB_ID="5", MASTER_PORT="29999")
    assert chosen.endswith("127.0.0.1:29999"), chosen
    assert _torchrun_node_line(tmp_path, MASTER_ADDR="127.0.0.1").endswith("127.0.0.1:29500")  # not under SLURM
    refused = _torchrun_node_line(tmp_path, MASTER_ADDR="h", SLURM_JOB_ID="5", SLURM_STEP_ID="batch")
    assert refused.startswith("SLURM_JOB_ID=5 SLURM_STEP_ID=batch: not numbers"), refused


def _train_sbatch(tmp_path: Path, **environ: str) -> subprocess.CompletedProcess:
    """slurm/train.sbatch run as SLURM runs it, in a job of one node (no controller: the script must
    stop before it asks one), ``environ`` added."""
    job = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1"}
    return subprocess.run(
        ["bash", str(REPO / "slurm/train.sbatch")],
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "COSMOS3_"))}, **job, **environ},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_train_sbatch_refuses_a_heterogeneous_job_naming_it(tmp_path):
    """A heterogeneous job (``sbatch ... : ...``) ran torchrun on its first component alone: the other
    components' nodes sat idle. The script is run with the variables of a job of two components (the
    test cluster, one node, cannot place one)."""
    ran = _train_sbatch(tmp_path, SLURM_HET_SIZE="2")
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "this is a heterogeneous job of 2 components (SLURM_HET_SIZE)" in ran.stderr


@pytest.mark.parametrize("value", ["ten", "-5", "1.5", "", " 5", "1234567890"])
def test_train_sbatch_refuses_a_requeue_wait_that_is_not_whole_seconds_naming_it(tmp_path, value):
    """COSMOS3_REQUEUE_WAIT_S bounds the requeue's wait for the controller after a preemption; a value
    bash cannot count with would fail only then, hours into the job (an arithmetic error, no outcome
    line): it is refused before the trainers start, by name and value. (The bound itself, with a
    stopped controller: tests/slurm/test_slurm_jobs.py.)"""
    if value == "":  # set but empty is the default (600), like unset: the control
        ran = _train_sbatch(tmp_path, COSMOS3_REQUEUE_WAIT_S=value, SLURM_NTASKS="2")
        assert "COSMOS3_REQUEUE_WAIT_S" not in ran.stderr and "SLURM_NTASKS=2" in ran.stderr, ran.stderr
        return
    ran = _train_sbatch(tmp_path, COSMOS3_REQUEUE_WAIT_S=value)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert f"COSMOS3_REQUEUE_WAIT_S={value}: not a whole number of seconds" in ran.stderr, ran.stderr
