#!/usr/bin/env bash
# Multi-GPU training with torchrun (DDP). Rank 0 logs and writes checkpoints; every rank checks at each
# checkpoint that its weights are the ones saved.
#   scripts/torchrun_train.sh NUM_GPUS autoencoder --data DATA --run-dir RUN --config configs/autoencoder/adni.yaml
#   scripts/torchrun_train.sh NUM_GPUS diffusion --data DATA --autoencoder AE_RUN --run-dir RUN --config configs/diffusion/adni.yaml
# One node: a free rendezvous port is picked (set MASTER_PORT to choose one). Several nodes: run it once per node
# with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT set (scripts/slurm_train.sbatch does).
# On CPUs (gloo) NUM_GPUS is the number of processes.
set -euo pipefail
NPROC=${1:?number of GPUs (processes) per node}; shift
for arg in "$@"; do
  if [[ $arg == --run || $arg == --run=* ]]; then
    # torchrun would read it as an abbreviation of its own --run-path and stop with "ambiguous option"
    echo "torchrun_train.sh: write --run-dir instead of --run (torchrun takes --run for its own --run-path)" >&2
    exit 2
  fi
done
NNODES=${NNODES:-1}
if [[ $NNODES == 1 && -z ${MASTER_PORT:-} ]]; then
  RENDEZVOUS=(--standalone)
else
  RENDEZVOUS=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}"
              --master_port "${MASTER_PORT:-29500}")
fi
exec torchrun "${RENDEZVOUS[@]}" --nproc_per_node "$NPROC" -m medldm train "$@"
