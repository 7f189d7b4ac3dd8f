#!/usr/bin/env bash
# Multi-GPU training on one node with torchrun (DDP). Rank 0 logs and writes checkpoints.
#   scripts/torchrun_train.sh NUM_GPUS autoencoder --data DATA --run RUN --config configs/autoencoder/adni.yaml
#   scripts/torchrun_train.sh NUM_GPUS diffusion --data DATA --autoencoder AE_RUN --run RUN --config configs/diffusion/adni.yaml
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (see scripts/slurm_train.sbatch).
set -euo pipefail
NPROC=${1:?number of GPUs per node}; shift
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m medldm train "$@"
