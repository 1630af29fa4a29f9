#!/usr/bin/env bash
# Submit one of the paper's pretraining runs (arXiv 2310.19531) to Slurm, with the MiLe,
# focal or cross-entropy loss: presets for nodes, parallelism and batch, then
# `sbatch examples/slurm/pretrain.sbatch`.
#
# Usage: examples/slurm/submit.sh SIZE [KEY=VALUE trainer overrides ...]
#   SIZE   config       nodes x GPUs  layout (the config's: TP, micro-batch x accumulation x DP)
#   468m   llama_468m   2 x 8         TP=1, 32 x 2 x 16 = 1024 sequences of 1024 tokens
#   1.2b   llama_1.2b   4 x 8         TP=2, 16 x 4 x 16 = 1024 sequences of 1024 tokens
#   6.7b   llama_6.7b   16 x 8        TP=4, 16 x 4 x 32 = 2048 sequences of 2048, full recompute
#   tiny   tiny         1 x 1 (or CPU: DEVICE=cpu NPROC_PER_NODE=2 TP=2), mock data: a smoke test
# (the paper: 16, 32 and 128 GPUs; megatron-mile-estimate-memory gives the memory per GPU)
# Examples (the data: megatron-mile-preprocess output prefixes, see docs/launching.md):
#   export DATA_PATH=/data/pile/pile_text_document TOKENIZER_MODEL=/data/llama.model
#   LOSS=mile GAMMA=1.0        examples/slurm/submit.sh 6.7b
#   LOSS=focal GAMMA=1.0       examples/slurm/submit.sh 6.7b
#   LOSS=cross_entropy         examples/slurm/submit.sh 6.7b
#   FP8=hybrid LOSS=mile       examples/slurm/submit.sh 6.7b      # Hopper or newer
#   CONTAINER=pyxis CONTAINER_IMAGE=registry#megatron-mile:0.1.0 \
#     CONTAINER_MOUNTS=/data:/data,/ckpt:/ckpt CKPT_ROOT=/ckpt LOSS=mile examples/slurm/submit.sh 1.2b
#   DEVICE=cpu NPROC_PER_NODE=2 TP=2 examples/slurm/submit.sh tiny training.train_iters=20
# Every variable of examples/launch.sh can be set (TP, MICRO_BATCH, RECOMPUTE, ... override
# the config's layout); the presets below only fill in what is unset. Site flags: SBATCH_EXTRA_ARGS="--account=X --partition=Y --qos=Z", or Slurm's own
# SBATCH_ACCOUNT / SBATCH_PARTITION. TIME is the limit of one job; the job requeues itself
# before it and resumes from the latest checkpoint, so a run spans as many jobs as it needs.
# Submitting the same SIZE and LOSS (and GAMMA) again also resumes: runs are named
# CONFIG-LOSS[-gGAMMA], with checkpoints in CKPT_ROOT/NAME and logs in LOG_DIR.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export MILE_ROOT=${MILE_ROOT:-$(cd "$here/../.." && pwd)}
size=${1:?usage: submit.sh 468m|1.2b|6.7b|tiny [KEY=VALUE ...]}
shift

case $size in
    468m) : "${CONFIG:=llama_468m}" "${NODES:=2}" ;;
    1.2b) : "${CONFIG:=llama_1.2b}" "${NODES:=4}" ;;
    6.7b) : "${CONFIG:=llama_6.7b}" "${NODES:=16}" ;;
    tiny) : "${CONFIG:=tiny}" "${NODES:=1}" "${GPUS_PER_NODE:=1}" "${MOCK_DATA:=true}" ;;
    *) echo "submit.sh: SIZE must be 468m, 1.2b, 6.7b or tiny, not '$size'" >&2; exit 2 ;;
esac
: "${LOSS:=mile}" "${GAMMA:=1.0}" "${DEVICE:=gpu}" "${GPUS_PER_NODE:=8}" "${TIME:=24:00:00}"
case $LOSS in
    mile|focal) : "${RUN_NAME:=$CONFIG-$LOSS-g$GAMMA}" ;;
    cross_entropy) : "${RUN_NAME:=$CONFIG-$LOSS}" ;;
    *) echo "submit.sh: LOSS must be mile, focal or cross_entropy, not '$LOSS'" >&2; exit 2 ;;
esac
: "${CKPT_ROOT:=$MILE_ROOT/runs/checkpoints}" "${LOG_DIR:=$MILE_ROOT/runs/logs}"
: "${CKPT_DIR:=$CKPT_ROOT/$RUN_NAME}" "${TENSORBOARD_DIR:=$MILE_ROOT/runs/tensorboard/$RUN_NAME}"
export CONFIG LOSS GAMMA DEVICE CKPT_DIR TENSORBOARD_DIR MOCK_DATA AUTO_RESUME=${AUTO_RESUME:-true}
mkdir -p "$CKPT_DIR" "$LOG_DIR" "$TENSORBOARD_DIR"

SBATCH_ARGS=(
    --job-name="mile-$RUN_NAME"
    --nodes="$NODES"
    --exclusive
    --time="$TIME"
    --output="$LOG_DIR/%x-%j.out"
)
if [[ $DEVICE != cpu ]]; then SBATCH_ARGS+=(--gpus-per-node="$GPUS_PER_NODE"); fi
read -r -a extra <<<"${SBATCH_EXTRA_ARGS:-}"

echo "submit.sh: $RUN_NAME on $NODES node(s), checkpoints $CKPT_DIR, log $LOG_DIR/mile-$RUN_NAME-<job>.out"
exec sbatch "${SBATCH_ARGS[@]}" "${extra[@]}" "$here/pretrain.sbatch" "$@"
