"""bench/gpu_check.sh on a machine without CUDA: its arguments are checked (errors name the bad one)
and it skips cleanly, writing nothing; shellcheck finds nothing where it is installed. What it
runs on a GPU (tests/gpu and the two benchmarks) is tested by those files."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def gpu_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_help_lists_every_option(tmp_path):
    result = gpu_check("--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("--out", "--wheelhouse", "--quick", "--no-tests", "--no-bench", "--build-wheelhouse"):
        assert option in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frobnicate"], "unknown argument: --frobnicate"),
        (["--out"], "--out needs a file"),
        (["--python-version", "twelve"], "--python-version must look like 3.12, got 'twelve'"),
        (["--wheelhouse", "no/such/folder"], "--wheelhouse no/such/folder is not a folder"),
    ],
)
def test_bad_arguments_are_errors_naming_them(tmp_path, args, message):
    result = gpu_check(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the checks")
def test_without_cuda_it_skips_cleanly_and_writes_nothing(tmp_path):
    result = gpu_check("--out", "results.md", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device (torch.cuda.is_available() is False): nothing to check (skipped)" in result.stdout
    assert not (tmp_path / "results.md").exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_finds_nothing():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
