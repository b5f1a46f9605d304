"""cosmos3-generate and cosmos3-eval on 2 gloo ranks under --tensor-parallel 2: a rank failing
alone while reading, loading, generating or evaluating ends the other at once, naming it, instead of
leaving it in its next collective until --timeout-s (docs/DESIGN.md, "The parallel plan")."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import time
from pathlib import Path
from unittest import mock

import pytest
import torch.distributed as dist

from megatron_cosmos3.release.generate_cli import RequestError
from megatron_cosmos3.testing.distributed import restart_world, run_on_ranks

TIMEOUT_S = 3  # how long the world's and the plan's collectives wait
EVAL_SUITE = ["tasks=[understanding]", "steps=2", "cases_per_task=1", "max_new_tokens=4", "media=false"]


def _command_with_rank_1_failing(rank: int, world_size: int, root: Path, command: str, argv: list, failure: tuple):
    """``command``'s ``main(argv)`` with ``module.name`` raising ``error`` on rank 1 (``failure``):
    (its exit code, or the error it raised; its stderr; seconds; a process group left)."""
    restart_world(rank, world_size, root / "store", TIMEOUT_S)
    module, name, error = failure
    failing = mock.patch.object(importlib.import_module(module), name, side_effect=error)
    stderr = io.StringIO()
    start = time.monotonic()
    with failing if rank == 1 else contextlib.nullcontext(), contextlib.redirect_stderr(stderr):
        try:
            outcome = importlib.import_module(command).main(argv)
        except Exception as raised:  # noqa: BLE001 - an error the command does not turn into a line
            outcome = f"{type(raised).__name__}: {raised}"
    return outcome, stderr.getvalue(), time.monotonic() - start, dist.is_initialized()


GENERATE = "megatron_cosmos3.release.generate_cli"
EVAL = "megatron_cosmos3.release.eval_cli"
# {case: (command, where rank 1 fails, its error, its outcome, the region the other names)}
CASES = {
    "its own read of the requests": (
        GENERATE,
        f"{GENERATE}.read_requests",
        OSError("rank 1's read failed"),
        "OSError: rank 1's read failed",
        "reading, loading and generating",
    ),
    "a request error of its own": (
        GENERATE,
        f"{GENERATE}.generation_request",
        RequestError("rank 1's request 000 is bad"),
        2,
        "reading, loading and generating",
    ),
    "its own read of the checkpoint": (
        EVAL,
        "megatron_cosmos3.release.trained.load_state",
        OSError("rank 1's read failed"),
        "OSError: rank 1's read failed",
        "loading and evaluating",
    ),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", CASES)
def test_a_rank_failing_in_a_command_ends_the_other_naming_its_error(case, tiny_tp2_checkpoint, tmp_path):
    """Rank 1 fails alone (``CASES``): it ends as it would alone (its one error line and exit code
    2, or its traceback), and rank 0 within the timeout prints one line naming rank 1 and its error
    and exits 1 (it waited in the plan's groups or the generation's collectives until gloo's "Wait
    timeout", a traceback naming nothing); neither keeps a process group."""
    command, where, error, failed, region = CASES[case]
    module, name = where.rsplit(".", 1)
    argv = ["--tensor-parallel", "2", "--timeout-s", str(TIMEOUT_S), "--checkpoint", str(tiny_tp2_checkpoint)]
    argv += ["--out", str(tmp_path / "out")]
    if command == GENERATE:
        requests = tmp_path / "requests.jsonl"
        request = {"task": "text_to_image", "prompt": "a red ball", "resolution": "64x32", "steps": 2}
        requests.write_text(json.dumps(request) + "\n")
        argv += ["--requests", str(requests)]
    else:
        argv += EVAL_SUITE
    waiting, failing = run_on_ranks(
        _command_with_rank_1_failing, 2, tmp_path, command, argv, (module, name, error), timeout_s=120
    )
    assert failing[0] == failed, failing
    assert waiting[0] == 1, waiting
    error_line = f"rank 1 failed in {region}: {type(error).__name__}: {error}"
    assert waiting[1].splitlines()[-1].endswith(f"stopped on rank 0: {error_line}"), waiting
    assert waiting[2] < 3 * TIMEOUT_S, waiting
    assert not waiting[3] and not failing[3]
