#!/usr/bin/env bash
# One check of the GPU paths on a CUDA machine, in under 8 minutes on one H100/H200: the GPU-only
# tests (tests/gpu, marker gpu: each GPU attention backend against the dense rule, Transformer
# Engine linears against torch's, fp8 against bf16 over 50 steps, TE under TP=2 and megatron-core's
# DDP where two GPUs are there), then bench/nano_throughput.py and bench/attention_vs_causal.py with
# the best backend this machine has (te, else flash, else flex) in bf16, and in fp8 where TE runs it.
# Everything lands in one Markdown file ready for BENCHMARKS.md (device, date, versions, commands,
# the tests' outcomes, each benchmark's output). Without CUDA it says so and exits 0: nothing to check.
#
# The machine needs CUDA torch; the rest can come from a wheelhouse, since such machines often reach
# no package registry. On a machine with network (any OS; the wheels are picked for the target):
#     bench/gpu_check.sh --build-wheelhouse .whl [--python-version 3.12]
# then carry .whl with the repository and run on the GPU machine:
#     bench/gpu_check.sh --wheelhouse .whl [--out gpu_check.md]
# which installs bench/gpu_requirements.txt and megatron-core offline (pip --no-index --find-links)
# into the Python that runs the checks ($PYTHON, default python3). Transformer Engine and apex are
# not wheel-installable without a CUDA build: the Dockerfile's image has both; elsewhere their
# tests are skipped and the benchmarks use the next best backend.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bench/gpu_check.sh [--out FILE] [--wheelhouse DIR] [--quick] [--no-tests] [--no-bench]
       bench/gpu_check.sh --build-wheelhouse DIR [--python-version X.Y]

  --out FILE            results (Markdown); default gpu_check_results.md
  --wheelhouse DIR      install the missing dependencies offline from DIR first
  --quick               smaller benchmark (2 layers, 8k tokens, fewer repeats)
  --no-tests            skip the GPU tests
  --no-bench            skip the benchmarks
  --build-wheelhouse DIR  download the wheels into DIR (needs network; no GPU)
  --python-version X.Y  the GPU machine's Python, for --build-wheelhouse (default 3.12)
  PYTHON=...            the interpreter to use (default python3)
EOF
}

die() {
    echo "gpu_check: $*" >&2
    exit 2
}

out=gpu_check_results.md
wheelhouse=""
build_wheelhouse=""
python_version=3.12
quick=0
run_tests=1
run_bench=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 ]] || die "--out needs a file"; out="$2"; shift 2 ;;
        --wheelhouse) [[ $# -ge 2 ]] || die "--wheelhouse needs a folder"; wheelhouse="$2"; shift 2 ;;
        --build-wheelhouse) [[ $# -ge 2 ]] || die "--build-wheelhouse needs a folder"; build_wheelhouse="$2"; shift 2 ;;
        --python-version) [[ $# -ge 2 ]] || die "--python-version needs X.Y"; python_version="$2"; shift 2 ;;
        --quick) quick=1; shift ;;
        --no-tests) run_tests=0; shift ;;
        --no-bench) run_bench=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$python_version" =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.12, got '$python_version'"
if [[ -n "$wheelhouse" && ! -d "$wheelhouse" ]]; then
    die "--wheelhouse $wheelhouse is not a folder"
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
requirements="$repo/bench/gpu_requirements.txt"
megatron_core="megatron-core==0.16.1"

if [[ -n "$build_wheelhouse" ]]; then
    # Wheels for the GPU machine's Python on x86_64 Linux, whatever this machine is.
    platforms=()
    for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform any)
    target=(--only-binary=:all: --python-version "$python_version" --implementation cp "${platforms[@]}")
    mkdir -p "$build_wheelhouse"
    "$python" -m pip download -d "$build_wheelhouse" "${target[@]}" -r "$requirements"
    # megatron-core declares torch: without --no-deps pip would fetch a CUDA torch of its own.
    "$python" -m pip download -d "$build_wheelhouse" "${target[@]}" --no-deps "$megatron_core"
    echo "gpu_check: wheels for Python $python_version in $build_wheelhouse; carry it and run with --wheelhouse"
    exit 0
fi

# One interpreter start: 3 = no torch, 4 = torch without CUDA.
found=0
"$python" -c '
import sys
try:
    import torch
except ImportError:
    sys.exit(3)
sys.exit(0 if torch.cuda.is_available() else 4)' || found=$?
case "$found" in
    0) ;;
    3) echo "gpu_check: $python has no torch: nothing to check (skipped)"; exit 0 ;;
    4) echo "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check (skipped)"; exit 0 ;;
    *) die "$python failed to start (exit $found)" ;;
esac

if [[ -n "$wheelhouse" ]]; then
    echo "gpu_check: installing from $wheelhouse (offline)"
    "$python" -m pip install -q --no-index --find-links "$wheelhouse" -r "$requirements"
    "$python" -m pip install -q --no-index --find-links "$wheelhouse" --no-deps "$megatron_core"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$repo"
if ! missing=$("$python" -c 'import megatron_cosmos3.training.train, megatron.core, omegaconf' 2>&1); then
    echo "gpu_check: the project does not import: ${missing##*$'\n'}" >&2
    echo "gpu_check: build a wheelhouse (--build-wheelhouse DIR, on a machine with network) and pass --wheelhouse DIR" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# What this machine has, and the best choices from it.
"$python" - >"$work/env.sh" <<'EOF'
import importlib, shlex, torch
from megatron_cosmos3.model.transformer_engine import transformer_engine_missing
from megatron_cosmos3.training.precision import fp8_unavailable

def version(module):
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as error:  # not installed, or fails to load: say which
        return f"absent ({type(error).__name__})"

cuda = torch.device("cuda")
te = transformer_engine_missing(cuda) is None
flash = not version("flash_attn").startswith("absent") or not version("flash_attn_interface").startswith("absent")
facts = {
    "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}",
    "versions": "; ".join(
        [f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"]
        + [f"{name} {version(module)}" for name, module in [
            ("transformer_engine", "transformer_engine"), ("apex", "apex"), ("flash_attn", "flash_attn"),
            ("megatron.core", "megatron.core")]]
    ),
    "backend": "te" if te else "flash" if flash else "flex",
    "linear_impl": "te" if te else "torch",
    "fp8": "yes" if te and fp8_unavailable(cuda) is None else "no",
}
for key, value in facts.items():
    print(f"{key}={shlex.quote(value)}")
EOF
device="" versions="" backend="" linear_impl="" fp8=""
# shellcheck source=/dev/null
source "$work/env.sh"

status=0
{
    echo "## GPU check ($(date -u +%Y-%m-%d), bench/gpu_check.sh)"
    echo
    echo "- device: $device"
    echo "- versions: $versions"
    echo "- best attention backend here: \`$backend\`; linears: \`$linear_impl\`; fp8: $fp8"
    echo "- commit: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
} >"$out"

# Runs a step under a time limit, its output into the results as a code block; a failure is
# recorded and the next step still runs.
step() {
    local title="$1" limit="$2"
    shift 2
    echo "gpu_check: $title"
    local log="$work/step.log" code=0
    timeout "$limit" "$@" >"$log" 2>&1 || code=$?
    {
        echo "### $title"
        echo
        echo "\`$*\` — exit $code$([[ $code -eq 124 ]] && echo " (stopped after $limit s)")"
        echo
        echo '```'
        tail -n 60 "$log"
        echo '```'
        echo
    } >>"$out"
    tail -n 20 "$log"
    if [[ $code -ne 0 ]]; then status=1; fi
}

if [[ $run_tests -eq 1 ]]; then
    step "GPU tests (tests/gpu)" 180 "$python" -m pytest -q -m gpu tests/gpu -rs -p no:cacheprovider
fi

if [[ $run_bench -eq 1 ]]; then
    if [[ $quick -eq 1 ]]; then
        nano=(--layers 2 --tokens 8192 --warmup 2 --steps 5)
        attention=(--tokens 8192 --warmup 2 --repeats 5)
    else
        nano=(--layers 4 --warmup 3 --steps 10)
        attention=(--warmup 3 --repeats 20)
    fi
    step "Nano-width step, bf16 ($backend attention, $linear_impl linears)" 100 \
        "$python" bench/nano_throughput.py "${nano[@]}" --backend "$backend" --linear-impl "$linear_impl" --precision bf16
    if [[ "$fp8" == "yes" ]]; then
        step "Nano-width step, fp8 (TE linears)" 80 \
            "$python" bench/nano_throughput.py "${nano[@]}" --backend "$backend" --linear-impl te --precision fp8
    fi
    step "Asymmetric attention vs the best causal kernel" 120 \
        "$python" bench/attention_vs_causal.py "${attention[@]}" --backend "$backend"
fi

echo "gpu_check: results in $out"
exit "$status"
