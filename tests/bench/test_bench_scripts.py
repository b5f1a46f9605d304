"""The GPU benchmark scripts run end to end at the tiniest sizes on a CPU, and count what they claim.

Only logic is checked (exit status, the pairs each mask allows, the lines the scripts promise);
timings and TF/s are never asserted: performance goals live in bench/ and BENCHMARKS.md.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str) -> str:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / name), *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_nano_throughput_runs_a_training_step_per_layer_count():
    out = run_script(
        "nano_throughput.py",
        *("--hidden", "32", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--ffn", "64", "--vocab", "128"),
        *("--layers", "1", "2", "--tokens", "128", "--samples", "2", "--warmup", "1", "--steps", "1"),
    )
    assert re.findall(r"^layers (\d+):", out, flags=re.M) == ["1", "2"]
    assert "pack 128 tokens (32 AR)" in out
    assert out.count("Megatron-LM convention") == 2 and out.count("model TF/s") == 2


def test_attention_vs_causal_counts_each_masks_pairs_on_the_same_samples():
    out = run_script(
        "attention_vs_causal.py",
        *("--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--tokens", "256", "--samples", "2"),
        *("--warmup", "1", "--repeats", "1"),
    )
    # 2 samples of 32 AR + 96 DM: asymmetric 2 * (32*33/2 + 96*128) pairs; causal 2 * 128*129/2.
    assert re.search(r"^asymmetric \(sdpa\)\s+25,632\s", out, flags=re.M)
    assert re.search(r"^sdpa is_causal per sample\s+16,512\s", out, flags=re.M)
    assert "ratio asymmetric (sdpa) / best causal" in out


def test_checkpoint_checksum_bench_saves_and_loads_both_ways():
    out = run_script("checkpoint_checksums.py", "--megabytes", "16", "--repeats", "1")
    assert "| save |" in out and "| load |" in out


def test_text_generation_bench_times_cached_and_uncached_decoding_of_the_same_tokens():
    out = run_script(
        "text_generation.py",
        *("--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2"),
        *("--prompt-tokens", "16", "--samples", "2", "--new-tokens", "4"),
    )
    assert "prompts [8, 16] tokens, 4 new tokens each" in out
    assert "cached per-token ms" in out and "uncached per-token ms" in out
    assert "cached and uncached tokens agree: yes" in out


def test_audio_resampling_bench_times_ours_and_the_exact_filter_per_rate():
    out = run_script("audio_resampling.py", "--repeats", "1", "--rates", "44100", "527996")
    rows = re.findall(r"^\| (\d+) \| (\d+)/(\d+) \| (\d+)/(\d+) \|", out, flags=re.M)
    assert rows == [("44100", "160", "147", "160", "147"), ("527996", "1", "11", "12000", "131999")]


def test_audio_frame_walks_bench_checks_each_kind_of_raw_audio():
    out = run_script("audio_frame_walks.py", "--repeats", "1", "--minutes", "2")
    assert re.findall(r"^\| (mp3|adts|ogg) \|", out, flags=re.M) == ["mp3", "adts", "ogg"]
