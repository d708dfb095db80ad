#!/usr/bin/env bash
# torchrun wrapper (torchtitan's run_train.sh style). Environment variables:
#   NGPU / NPROC   processes per node (default: GPUs on this node, else 1)
#   NNODES         nodes (default 1); NODE_RANK this node's index (default 0)
#   MASTER_ADDR    rendezvous host (default localhost); MASTER_PORT (default 29500)
#   PYTHON         interpreter (default .venv/bin/python if present)
#   MAX_RESTARTS   torchrun restarts after a worker failure (default 0); each resumes the newest
#                  checkpoint (checkpoint.resume=auto)
#   SHUTDOWN_TIMEOUT  seconds torchrun waits for workers after a failure before SIGKILL (10)
# SIGUSR1 (SLURM's --signal=USR1@120) is ignored by the torchrun agent and handled by the
# workers: they checkpoint the current step and exit 75 (docs/operations.md).
# Everything after the script name is passed to `python -m train` as Hydra overrides, e.g.
#   NGPU=8 launch/run.sh experiment=tp2_pp2_dp2
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NGPU=8 launch/run.sh parallel.dp_replicate=2
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
default_nproc=$(( gpus > 0 ? gpus : 1 ))
NPROC=${NPROC:-${NGPU:-$default_nproc}}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
# One thread per rank on CPU-only boxes; set OMP_NUM_THREADS yourself to override.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Ignored signals survive exec: the agent ignores SIGUSR1 (its default action would kill it),
# the workers install their own handler.
trap '' USR1
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --max-restarts="${MAX_RESTARTS:-0}" --shutdown-timeout="${SHUTDOWN_TIMEOUT:-10}" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --local-ranks-filter="${LOG_RANKS:-0}" --role rank --tee 3 \
  -m train "$@"
