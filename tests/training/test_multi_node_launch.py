"""launch/torchrun_node.sh as two nodes on 127.0.0.1 (node ranks 0 and 1, one process each, c10d
rendezvous) trains exactly as one node with two processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cosmos3.testing.ports import free_port
from megatron_cosmos3.testing.training import (
    TINY_MODEL,
    TINY_SYNTHETIC,
    TRAINER_ENV,
    launch_environment,
    loss_history,
    tracking_store,
    train_on_ranks,
)

REPO = Path(__file__).resolve().parents[2]


def _overrides(tmp_path: Path, name: str) -> list[str]:
    return [
        *TINY_MODEL,
        *TINY_SYNTHETIC,
        "steps=4",
        "log_every=1",
        "optimizer.warmup_steps=1",
        "tracking.generation_samples=false",  # the last step's samples: seconds of CPU, no loss
        f"checkpoint.directory={tmp_path / name}",
        f"tracking.tracking_uri={tracking_store(tmp_path)}",
        f"tracking.run_name={name}",
    ]


def _launch_two_nodes(tmp_path: Path) -> list[subprocess.Popen]:
    port = free_port()
    env = {
        **launch_environment(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{TRAINER_ENV.get('PATH', '')}",  # torchrun
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "RDZV_ID": f"two-nodes-{port}",
    }
    return [
        subprocess.Popen(
            ["bash", str(REPO / "launch/torchrun_node.sh"), *_overrides(tmp_path, "two_nodes")],
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_node_launch_on_localhost_equals_one_node(tmp_path):
    # Rank 0's store listens on a port torch chose free and released a moment earlier (over several
    # nodes, launch/torchrun_node.sh): another test's process can take it in between, and nothing has
    # trained then.
    for _ in range(3):
        nodes = _launch_two_nodes(tmp_path)
        errors = [node.communicate(timeout=300)[1] for node in nodes]
        if not any("EADDRINUSE" in error for error in errors):
            break
    assert all(node.returncode == 0 for node in nodes), "\n".join(e[-3000:] for e in errors)

    train_on_ranks(2, *_overrides(tmp_path, "one_node"))
    two_nodes = loss_history(tmp_path / "mlflow.db", "two_nodes")
    assert [step for step, _ in two_nodes] == [1, 2, 3, 4]
    assert two_nodes == loss_history(tmp_path / "mlflow.db", "one_node")
