#!/usr/bin/env bash
# Run a command in the megatron-mile image on this machine, with all its GPUs.
#
# Usage: docker/run.sh [COMMAND ...]        (no command: an interactive shell)
#   One node, 468M MiLe run (data and checkpoints mounted from the host):
#     IMAGE=megatron-mile:0.1.0 DATA_DIR=/data/pile CKPT_ROOT=/scratch/ckpt \
#       CONFIG=llama_468m LOSS=mile DATA_PATH=/data/pile_text_document \
#       TOKENIZER_MODEL=/data/llama.model CKPT_DIR=/checkpoints/468m-mile \
#       docker/run.sh examples/launch.sh
#   Several nodes: the same on each node, with NNODES, NODE_RANK and MASTER_ADDR set
#   (the container uses the host's network, so the rendezvous port must be open).
#   Tests inside the image:   docker/run.sh python -m pytest -q tests
# Mounts: DATA_DIR -> /data (read-only), CKPT_ROOT -> /checkpoints, LOG_ROOT -> /logs; the
# variables of examples/launch.sh (CONFIG, LOSS, TP, ...) and NCCL_* are passed in when set.
set -euo pipefail

IMAGE=${IMAGE:-megatron-mile:latest}
DATA_DIR=${DATA_DIR:-$PWD/data}
CKPT_ROOT=${CKPT_ROOT:-$PWD/runs/checkpoints}
LOG_ROOT=${LOG_ROOT:-$PWD/runs/logs}
GPUS=${GPUS:-all}                           # "all", a count, "device=0,1", or "none" (CPU)
SHM_SIZE=${SHM_SIZE:-}                      # only needed with DOCKER_IPC other than host
DOCKER_IPC=${DOCKER_IPC:-host}              # NCCL and data loader workers share memory
mkdir -p "$CKPT_ROOT" "$LOG_ROOT"

DOCKER_ARGS=(
    --rm
    --network=host                          # NCCL, gloo and the rendezvous between nodes
    --ipc="$DOCKER_IPC"
    --ulimit memlock=-1                     # pinned memory for NCCL/InfiniBand
    --ulimit stack=67108864
    --ulimit nofile=65536:65536
    --workdir /opt/megatron-mile
    --volume "$CKPT_ROOT:/checkpoints"
    --volume "$LOG_ROOT:/logs"
)
if [[ -d $DATA_DIR ]]; then DOCKER_ARGS+=(--volume "$DATA_DIR:/data:ro"); fi
if [[ $GPUS != none ]]; then DOCKER_ARGS+=(--gpus "$GPUS"); fi
if [[ -n $SHM_SIZE ]]; then DOCKER_ARGS+=(--shm-size "$SHM_SIZE"); fi
if [[ -t 0 && -t 1 ]]; then DOCKER_ARGS+=(--interactive --tty); fi
# --env NAME copies the host's value when it is set.
for var in DEVICE NPROC_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT RDZV_ID CONFIG LOSS \
           GAMMA SIGMA TP PP VPP SEQUENCE_PARALLEL DISTRIBUTED_OPTIMIZER MICRO_BATCH GLOBAL_BATCH \
           TRAIN_ITERS DTYPE FP8 DATA_PATH TOKENIZER_MODEL MOCK_DATA CKPT_DIR SAVE_INTERVAL \
           AUTO_RESUME TENSORBOARD_DIR SHUTDOWN_TIMEOUT GLOO_SOCKET_IFNAME \
           $(compgen -e | grep '^NCCL_' || true); do
    if [[ -n ${!var+set} ]]; then DOCKER_ARGS+=(--env "$var"); fi
done

if (( $# == 0 )); then set -- bash; fi
exec docker run "${DOCKER_ARGS[@]}" "$IMAGE" "$@"
