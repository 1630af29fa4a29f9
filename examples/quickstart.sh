#!/usr/bin/env bash
# Quickstart: from a fresh clone to a small LLaMA trained with MiLe, on CPU, in minutes.
#
#   bash examples/quickstart.sh
#
# 1. installs megatron-mile (tools/install.sh: keeps an installed torch, else installs the
#    pinned CPU build, so no CUDA build is downloaded);
# 2. prepares the embedded corpus (the Python standard library's docstrings, ~2 MB of text,
#    see docs/data.md), trains a SentencePiece tokenizer and writes Megatron .bin/.idx files;
# 3. trains the `quickstart` config with MiLe (gamma=1, sigma=1) at TP=2 + sequence parallel
#    over 2 processes (gloo), with validation and a checkpoint every 100 iterations;
# 4. prints where the TensorBoard logs and the checkpoint are.
#
# Settings (environment variables):
#   ITERS=400            training iterations
#   NPROC=2              processes (tensor-parallel size follows: TP=NPROC)
#   LOSS=mile            mile | focal | cross_entropy
#   DATA=data/quickstart prepared data (reused when already there)
#   OUT=runs/quickstart-<time>   logs and checkpoints (a new directory per run)
#   SKIP_INSTALL=0       1: do not pip install (e.g. already installed)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ITERS=${ITERS:-400}
NPROC=${NPROC:-2}
LOSS=${LOSS:-mile}
DATA=${DATA:-data/quickstart}
OUT=${OUT:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-python}

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    echo "== [1/3] installing megatron-mile (megatron-core 0.16.1)"
    PYTHON=$PYTHON bash tools/install.sh
fi

echo "== [2/3] preparing the embedded corpus, tokenizer and indexed data in $DATA"
# megatron-mile-prepare-corpus, through $PYTHON: the interpreter that also trains below.
"$PYTHON" -m megatron_mile.cli.prepare_corpus --output-dir "$DATA" --tokenize

echo "== [3/3] training with loss=$LOSS, TP=$NPROC, $ITERS iterations -> $OUT"
TRAIN_ARGS=(
    --config quickstart
    "loss.type=$LOSS"
    "parallel.tensor_model_parallel_size=$NPROC"
    "training.train_iters=$ITERS"
    "data.data_path=[$DATA/train]"
    "data.valid_data_path=[$DATA/validation]"
    "data.tokenizer_model=$DATA/tokenizer.model"
    "checkpoint.save=$OUT/checkpoints"
    "logging.tensorboard_dir=$OUT/tensorboard"
)
if (( NPROC == 1 )); then
    TRAIN_ARGS+=("parallel.sequence_parallel=false")
fi
# The cores shared out between the processes (torchrun would print a banner and use 1).
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC > 0 ? cores / NPROC : 1 ))}
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m megatron_mile.train "${TRAIN_ARGS[@]}"

latest=$(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt")
echo
echo "Done. Checkpoint: $OUT/checkpoints (latest iteration $latest)"
echo "      TensorBoard: tensorboard --logdir $OUT/tensorboard"
