"""Ports for the daemons and rendezvous stores that tests start.

A port asked of the kernel (a bind to port 0) comes from the ephemeral range, the range every
outgoing connection's local port is drawn from too. Between choosing it and the daemon binding it
(seconds: a rank or a daemon starting up on a busy machine) another test's connection can take it,
and the daemon dies of EADDRINUSE (a SLURM job's rendezvous did, in CI). ``free_port`` draws from
below that range instead, where only an explicit bind lands, at random (so that two tests rarely
draw the same port) and above the ports the SLURM launcher derives from job ids
(``slurm/train.sbatch``: 20000 and up); each draw is tried with a bind before it is returned.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST, ABOVE_HIGHEST = 10000, 20000
_draws = random.SystemRandom()  # not the seeded module state: forked test processes would share it


def _ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: its usual range starts above ours
        return 32768


def free_port(attempts: int = 200) -> int:
    """A TCP port on 127.0.0.1 that nothing holds now, outside the ephemeral range."""
    start = _ephemeral_range_start()
    # A machine whose ephemeral range covers ours has no port outside it: the trial bind still helps.
    highest = min(ABOVE_HIGHEST, start) if start > LOWEST else ABOVE_HIGHEST
    for _ in range(attempts):
        port = _draws.randrange(LOWEST, highest)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {LOWEST}-{highest - 1} after {attempts} draws")
