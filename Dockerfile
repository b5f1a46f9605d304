# GPU image for DGX nodes (docs/DESIGN.md, "GPU fast paths"). For CPU-only machines use
# launch/setup_env.sh instead.
#
# Base: NGC PyTorch 25.11 — Python 3.12, CUDA 13.0.2, PyTorch 2.10.0a0 (nv25.11) and Transformer
# Engine 2.9.0, as reported by users of this tag; it is the base megatron-core 0.16.1's own CI builds
# on (docker/.ngc_version.dev at its core_v0.16.1 tag), and TE 2.9 lies in megatron-core 0.16's range
# (>=2.9.0a0,<2.12). Whether the image carries apex is not settled by those reports: it is checked
# below, and built when missing. The versions are read again at build time (launch/gpu_imports.py): a
# base with others fails the build instead of training with them. The tag is pinned; pin the digest
# too where the registry is reachable (FROM nvcr.io/nvidia/pytorch:25.11-py3@sha256:...).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

# NVIDIA apex (never PyPI's unrelated "apex"): the image's where it has one; otherwise built from
# NVIDIA's source at its 25.09 tag (the last tag it synced with an NGC release), C++ and CUDA core
# extensions only (fused Adam, fused RMSNorm/LayerNorm, multi-tensor ops), for Hopper and Blackwell.
ARG APEX_COMMIT=4bdecd06b3c4b2c0a8fb6603829a8f9f05a42b49
RUN python -c "import apex" 2>/dev/null \
 || APEX_CPP_EXT=1 APEX_CUDA_EXT=1 TORCH_CUDA_ARCH_LIST="9.0;10.0" MAX_JOBS=8 \
    pip install --no-build-isolation --no-deps --no-cache-dir \
      "git+https://github.com/NVIDIA/apex.git@${APEX_COMMIT}"

WORKDIR /workspace/megatron_cosmos3
COPY pyproject.toml README.md ./
COPY bench/gpu_requirements.txt ./bench/gpu_requirements.txt
# The image's torch, Transformer Engine, apex and flash-attn stay: its pip constraint file
# (/etc/pip/constraint.txt) keeps them, and the package itself goes in without dependencies (the
# CPU torch pin in pyproject is for CPU boxes). On top: bench/gpu_requirements.txt (exact pins for
# what the image lacks; pyproject's ranges, which keep the image's own versions where they meet
# them), megatron-core 0.16.1 (without its declared torch: the image's is used) and the test extras.
RUN pip install --no-cache-dir -r bench/gpu_requirements.txt \
 && pip install --no-cache-dir --no-deps "megatron-core==0.16.1" \
 && pip install --no-cache-dir "pytest-xdist==3.8.0" "scikit-image==0.26.0"
COPY megatron_cosmos3 ./megatron_cosmos3
RUN pip install --no-cache-dir --no-deps -e .

COPY launch ./launch
# Every GPU path imports, with the versions this file promises (no GPU is needed for that).
RUN python launch/gpu_imports.py

COPY slurm ./slurm
COPY configs ./configs
COPY data_pipelines ./data_pipelines
COPY bench ./bench
COPY tests ./tests

ENV OMP_NUM_THREADS=8
ENTRYPOINT ["torchrun"]
CMD ["--standalone", "--nproc-per-node", "8", "-m", "megatron_cosmos3.training.train", "--config", "configs/tiny_cpu.yaml"]
