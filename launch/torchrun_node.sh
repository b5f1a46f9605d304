#!/usr/bin/env bash
# One node of a multi-node torchrun job (DGX: 8 GPUs per node). Run it on every node with the same
# MASTER_ADDR (first node), NNODES and a per-node NODE_RANK; extra args go to the trainer.
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 bash launch/torchrun_node.sh --config configs/tiny_cpu.yaml
# Variables and torchrun's own options: MASTER_ADDR:MASTER_PORT = --rdzv-endpoint, NNODES = --nnodes,
# NODE_RANK = --node-rank, NPROC_PER_NODE = --nproc-per-node, RDZV_ID = --rdzv-id.
# MASTER_PORT's default: under SLURM, derived from the cluster's name, the job id and the id of the step
# that runs it on every node (`srun --nodes=N --ntasks-per-node=1`, as slurm/train.sbatch does; below);
# else 29500.
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
  handled=(--signals-to-handle "SIGINT,SIGHUP,SIGQUIT") # one argument: torchrun's list
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
# The rendezvous port under SLURM, unless MASTER_PORT is set: training/distributed.py's slurm_port of
# the cluster's name and the job and step ids (every node of a step derives the same), so two steps of
# a job running at once, two jobs on a node, or two clusters' jobs of one id (two test clusters on one
# host) do not meet on one port (torchrun's 29500 for all); 20000-32767, below Linux's ephemeral
# ports (docs/DESIGN.md, "Preemption and requeue").
# cluster_port_offset's 32-bit FNV-1a of the name's bytes (the C locale: one byte a character).
cluster_port_offset() {
  local LC_ALL=C name="$1" digest=2166136261 byte i
  [ -n "$name" ] || { echo 0 && return; }
  for ((i = 0; i < ${#name}; i++)); do
    printf -v byte '%d' "'${name:i:1}"
    digest=$((((digest ^ (byte & 255)) * 16777619) % 4294967296))
  done
  echo $((digest % 12768))
}
# The decimal string $1, of any length, modulo $2: a digit at a time, as Python's int() reads it. Bash's
# own arithmetic wraps past 2^63 without a word (an id of 19 digits gave a port below 20000, or none).
decimal_modulo() {
  local digits="$1" rest=0 i
  for ((i = 0; i < ${#digits}; i++)); do
    rest=$(((rest * 10 + ${digits:i:1}) % $2))
  done
  echo "$rest"
}
port="${MASTER_PORT:-}"
if [ -z "$port" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  step="${SLURM_STEP_ID:-0}"
  # Nodes started by separate sruns (this step has fewer nodes than NNODES) are each in a step of its
  # own: they meet on the job's port (step 0's); two such launches at once in one job set MASTER_PORT.
  if [ -n "${SLURM_STEP_NUM_NODES:-}" ] && [ "$SLURM_STEP_NUM_NODES" != "${NNODES:-1}" ]; then step=0; fi
  if [[ ! "$SLURM_JOB_ID" =~ ^[0-9]+$ || ! "$step" =~ ^[0-9]+$ ]]; then
    echo "SLURM_JOB_ID=$SLURM_JOB_ID SLURM_STEP_ID=$step: not numbers to derive the rendezvous port from;" \
      "export MASTER_PORT" >&2
    exit 2
  fi
  offset="$(cluster_port_offset "${SLURM_CLUSTER_NAME:-}")"
  job="$(decimal_modulo "$SLURM_JOB_ID" 12768)"
  step="$(decimal_modulo "$step" 12768)"
  port=$((20000 + (offset + job + 7919 * step) % 12768))
fi
port="${port:-29500}"
echo "torchrun_node.sh: node ${NODE_RANK:-0} of ${NNODES:-1}, rendezvous at $MASTER_ADDR:$port" >&2
exec torchrun "${handled[@]}" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --nproc-per-node "${NPROC_PER_NODE:-8}" --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:$port" --rdzv-id "${RDZV_ID:-megatron_cosmos3}" \
  -m megatron_cosmos3.training.train "$@"
