# GPU image for DGX nodes: NGC PyTorch (CUDA, NCCL, Transformer Engine, apex, flash-attn prebuilt),
# plus this package. For CPU-only machines use launch/setup_env.sh instead.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/megatron_cosmos3
COPY pyproject.toml README.md ./
COPY megatron_cosmos3 ./megatron_cosmos3
# The base image's torch, transformer-engine, apex and flash-attn are kept: install the package
# without letting pip replace them (the CPU pin in pyproject is for CPU boxes).
RUN pip install --no-deps -e . \
 && pip install "omegaconf>=2.3" "mlflow>=2.10" "webdataset>=0.2.86" "megatron-core>=0.16" \
      "transformers>=4.57" "diffusers>=0.35" "safetensors>=0.4" "scipy>=1.11" \
      "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100"
COPY launch ./launch
COPY slurm ./slurm
COPY configs ./configs
COPY data_pipelines ./data_pipelines
COPY tests ./tests

ENV OMP_NUM_THREADS=8
ENTRYPOINT ["torchrun"]
CMD ["--standalone", "--nproc-per-node", "8", "-m", "megatron_cosmos3.training.train", "--config", "configs/tiny_cpu.yaml"]
