#!/usr/bin/env bash
# One node of a multi-node torchrun job (DGX: 8 GPUs per node). Run it on every node with the same
# MASTER_ADDR (first node), NNODES and a per-node NODE_RANK; extra args go to the trainer.
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 bash launch/torchrun_node.sh --config configs/tiny_cpu.yaml
# Variables and torchrun's own options: MASTER_ADDR:MASTER_PORT = --rdzv-endpoint, NNODES = --nnodes,
# NODE_RANK = --node-rank, NPROC_PER_NODE = --nproc-per-node, RDZV_ID = --rdzv-id.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
: "${MASTER_ADDR:?set MASTER_ADDR to the first node}"
# Preemption (docs/DESIGN.md, "Preemption and requeue"): the trainers handle SIGUSR1 and SIGTERM;
# torchrun would die of SIGUSR1, so it ignores it. Under SLURM every process of the job gets the
# signal itself, so torchrun ignores SIGTERM too instead of tearing the trainers down mid-checkpoint;
# elsewhere a SIGTERM to torchrun is how the trainers hear of it.
# torchrun installs its own handlers over an ignored signal (--signals-to-handle, SIGTERM among
# them by default): under SLURM it is told to leave SIGTERM alone, or it would send it on, wait its
# shutdown timeout and SIGKILL the trainers in the middle of their checkpoint (a `scontrol requeue`).
trap '' USR1
handled=()
if [ -n "${SLURM_JOB_ID:-}" ]; then
  trap '' TERM
  handled=(--signals-to-handle SIGINT,SIGHUP,SIGQUIT)
fi
# A restarted worker group (--max-restarts) must not read the failed one's addresses from a store
# shared with torchrun (pytorch#135712). On one node the trainer keeps each restart's keys apart
# itself; over several nodes each rendezvous round gets a store of its own. Only there: rank 0's
# store then listens on a port torch found free and released seconds earlier, which another process
# can take meanwhile (EADDRINUSE at the rendezvous, seen on a busy node); torchrun's own store is
# bound before the workers start, so one node keeps sharing it.
if [ "${NNODES:-1}" != 1 ]; then
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
fi
exec torchrun "${handled[@]}" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --nproc-per-node "${NPROC_PER_NODE:-8}" --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-megatron_cosmos3}" \
  -m megatron_cosmos3.training.train "$@"
