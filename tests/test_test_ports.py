"""The ports tests give their daemons and rendezvous stores (megatron_cosmos3/testing/ports.py)."""

import socket

import pytest

from megatron_cosmos3.testing import ports
from megatron_cosmos3.testing.slurm_cluster import LocalSlurmCluster


def test_a_free_port_is_bindable_and_outside_the_ephemeral_range():
    start = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    drawn = {ports.free_port() for _ in range(20)}
    assert all(ports.LOWEST <= port < min(ports.ABOVE_HIGHEST, start) for port in drawn)
    assert len(drawn) > 1  # drawn at random: two tests rarely share one
    with socket.socket() as s:
        s.bind(("127.0.0.1", drawn.pop()))


def test_a_held_port_is_not_returned(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports.free_port()))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setattr(ports, "LOWEST", port)
        monkeypatch.setattr(ports, "ABOVE_HIGHEST", port + 2)
        assert ports.free_port() == port + 1
        monkeypatch.setattr(ports, "ABOVE_HIGHEST", port + 1)
        with pytest.raises(RuntimeError, match=f"no free port in {port}-{port} after 200 draws"):
            ports.free_port()


def test_two_test_clusters_on_one_host_have_names_of_their_own(tmp_path):
    """Every test cluster was 'cosmos3test': two sessions on one host (or two xdist workers) each
    numbered their jobs from 1, and job 1 of both derived one rendezvous port. The name
    (SLURM_CLUSTER_NAME) shifts a cluster's ports (``slurm_port``; tests/training/test_srun_launch.py)."""
    first, second = (LocalSlurmCluster(tmp_path / name) for name in ("first", "second"))
    assert first.name != second.name and first.name.startswith("cosmos3test-"), (first.name, second.name)
