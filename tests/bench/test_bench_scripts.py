"""The GPU benchmark scripts run end to end at the tiniest sizes on a CPU, and count what they claim.

Only logic is checked (exit status, the pairs each mask allows, the lines the scripts promise);
timings and TF/s are never asserted: performance goals live in bench/ and BENCHMARKS.md.

One python process runs every script in turn, each as ``python bench/<script>.py`` would (its file
run as ``__main__`` with its own argv, bench/ first on the path): a process per script spent most
of its CPU importing torch and this package again.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # the shared run of every script takes over 20 s

# Each script with the arguments of its tiniest run.
SCRIPTS = {
    "nano_throughput.py": [
        *("--hidden", "32", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--ffn", "64", "--vocab", "128"),
        *("--layers", "1", "2", "--tokens", "128", "--samples", "2", "--warmup", "1", "--steps", "1"),
    ],
    "attention_vs_causal.py": [
        *("--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--tokens", "256", "--samples", "2"),
        *("--warmup", "1", "--repeats", "1"),
    ],
    "checkpoint_checksums.py": ["--megabytes", "16", "--repeats", "1"],
    "text_generation.py": [
        *("--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2"),
        *("--prompt-tokens", "16", "--samples", "2", "--new-tokens", "4"),
    ],
    "audio_resampling.py": ["--repeats", "1", "--rates", "44100", "527996"],
    "audio_frame_walks.py": ["--repeats", "1", "--minutes", "0.5", "--copy-seconds", "10"],  # 3 copies, the 10 s clip
    "startup_cpu.py": ["--repeats", "1"],
    # The baseline and one layout (two ranks under torchrun): the uneven pipeline split.
    "layouts.py": ["--steps", "2", "--hidden", "64", "--layers", "2", "--only", "PP=2 uneven (first 1)"],
}

# Runs each script of the JSON {script: argv} as its own __main__ and writes {script: [exit status
# (0, a code, or the traceback), stdout, stderr]} to the JSON file named last.
_RUN_EACH = """
import contextlib, io, json, runpy, sys, traceback
bench, scripts, report = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
sys.path.insert(0, bench)
results = {}
for name, args in scripts.items():
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [f"{bench}/{name}", *args]
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as exit:
            status = exit.code or 0
        except BaseException:
            status = traceback.format_exc()
    results[name] = [status, out.getvalue(), err.getvalue()]
with open(report, "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, list]:
    """Every script's [exit status, stdout, stderr], from one process."""
    report = tmp_path_factory.mktemp("bench") / "report.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-c", _RUN_EACH, str(REPO / "bench"), json.dumps(SCRIPTS), str(report)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(report.read_text())


def run_script(outputs: dict[str, list], name: str) -> str:
    """The stdout of ``name``'s run, which exited with status 0."""
    status, out, err = outputs[name]
    assert status == 0, f"{name} exited with {status}\n{err[-4000:]}"
    return out


def test_nano_throughput_runs_a_training_step_per_layer_count(outputs):
    out = run_script(outputs, "nano_throughput.py")
    assert re.findall(r"^layers (\d+):", out, flags=re.M) == ["1", "2"]
    assert "pack 128 tokens (32 AR)" in out
    assert out.count("Megatron-LM convention") == 2 and out.count("model TF/s") == 2


def test_attention_vs_causal_counts_each_masks_pairs_on_the_same_samples(outputs):
    out = run_script(outputs, "attention_vs_causal.py")
    # 2 samples of 32 AR + 96 DM: asymmetric 2 * (32*33/2 + 96*128) pairs; causal 2 * 128*129/2.
    assert re.search(r"^asymmetric \(sdpa\)\s+25,632\s", out, flags=re.M)
    assert re.search(r"^sdpa is_causal per sample\s+16,512\s", out, flags=re.M)
    assert "ratio asymmetric (sdpa) / best causal" in out


def test_checkpoint_checksum_bench_saves_and_loads_both_ways(outputs):
    out = run_script(outputs, "checkpoint_checksums.py")
    assert "| save |" in out and "| load |" in out


def test_text_generation_bench_times_cached_and_uncached_decoding_of_the_same_tokens(outputs):
    out = run_script(outputs, "text_generation.py")
    assert "prompts [8, 16] tokens, 4 new tokens each" in out
    assert "cached per-token ms" in out and "uncached per-token ms" in out
    assert "cached and uncached tokens agree: yes" in out


def test_audio_resampling_bench_times_ours_and_the_exact_filter_per_rate(outputs):
    out = run_script(outputs, "audio_resampling.py")
    rows = re.findall(r"^\| (\d+) \| (\d+)/(\d+) \| (\d+)/(\d+) \|", out, flags=re.M)
    assert rows == [("44100", "160", "147", "160", "147"), ("527996", "1", "11", "12000", "131999")]


def test_audio_frame_walks_bench_checks_each_kind_of_raw_audio(outputs):
    out = run_script(outputs, "audio_frame_walks.py")
    assert re.findall(r"^\| (mp3|adts|ogg) \|", out, flags=re.M) == ["mp3", "adts", "ogg"]


def test_startup_cpu_bench_measures_the_entry_point_and_both_kinds_of_groups_against_torch(outputs):
    out = run_script(outputs, "startup_cpu.py")
    rows = re.findall(r"^\| ([^|]+) \| \d+\.\d\d \| (\d+\.\d\d) \|$", out, flags=re.M)
    assert [name for name, _ in rows] == [
        "import torch",
        "import megatron_cosmos3.training.train",
        "+ plain data parallelism's groups (torch's)",
        "+ megatron-core's groups (ddp_impl=megatron)",
    ]
    assert rows[0][1] == "1.00"  # the baseline of the ratios


def test_layouts_bench_times_the_trainer_under_an_uneven_pipeline_split(outputs):
    """The trainer's log line is read for each layout (its step-time breakdown, added later, hid
    the peak memory from the bench's pattern); the uneven split is one of the layouts."""
    out = run_script(outputs, "layouts.py")
    rows = re.findall(r"^(\S.*?) +(\d) +\d+\.\d{3} +(\d+\.\d\d)x +\d+$", out, flags=re.M)
    assert [(name, ranks) for name, ranks, _ in rows] == [("1 process (baseline)", "1"), ("PP=2 uneven (first 1)", "2")]
    assert rows[0][2] == "1.00"  # the baseline of the ratios
