#!/usr/bin/env bash
# Train cross-entropy, focal and MiLe models on the embedded quickstart corpus (Python stdlib
# docstrings) with identical seeds, data order and budget, then evaluate each overall and per
# training-frequency bucket (the paper's 80% / 15% / 5% split).
#
# Usage:
#   bash examples/compare_losses.sh                       # defaults below, ~10-20 min on 2 CPU cores
#   STEPS=20 SEEDS="1" OUT_DIR=/tmp/cmp bash examples/compare_losses.sh
#   LOSSES="cross_entropy mile" GAMMA=2 bash examples/compare_losses.sh
#   EXTRA_ARGS="model.hidden_size=128 model.num_layers=4" bash examples/compare_losses.sh
#
# Settings (environment variables, defaults in brackets):
#   OUT_DIR [runs/compare_losses]  everything goes here: data/, <loss>_seed<S>/, results.md, freq.png
#   DATA_DIR [$OUT_DIR/data]       quickstart corpus + tokenizer (built once, then reused)
#   VOCAB [4096]                   tokenizer vocabulary size
#   STEPS [300]                    optimizer steps per run (global batch GBS x SEQ tokens each)
#   SEEDS ["1234 1235"]            one run per loss and seed: same seed = same init and data order
#   LOSSES ["cross_entropy focal mile"]
#   GAMMA [1.0] SIGMA [1.0]        focal/MiLe exponent, MiLe offset (the paper's defaults)
#   SEQ [128] MBS [8] GBS [16]     sequence length, micro-batch, global batch
#   EVAL_SAMPLES [all]             cap on validation windows of SEQ tokens
#   CONFIG [tiny]                  base config (megatron_mile/configs/), EXTRA_ARGS: more overrides
#   PYTHON [python]  OMP_NUM_THREADS [2]
# Needs megatron-mile installed for $PYTHON (pip install -e .); the tools run as
# `$PYTHON -m megatron_mile.cli.<tool>`, i.e. megatron-mile-prepare-corpus and
# megatron-mile-eval-frequency of that interpreter.
#
# Outputs: $OUT_DIR/results.md (per-run table and the mean over seeds), $OUT_DIR/freq.png,
# $OUT_DIR/<loss>_seed<S>/{ckpt/,train.log,freq.json}. Finished runs are not retrained.
set -euo pipefail

OUT_DIR="${OUT_DIR:-runs/compare_losses}"
DATA_DIR="${DATA_DIR:-$OUT_DIR/data}"
VOCAB="${VOCAB:-4096}"
STEPS="${STEPS:-300}"
SEEDS="${SEEDS:-1234 1235}"
LOSSES="${LOSSES:-cross_entropy focal mile}"
GAMMA="${GAMMA:-1.0}"
SIGMA="${SIGMA:-1.0}"
SEQ="${SEQ:-128}"
MBS="${MBS:-8}"
GBS="${GBS:-16}"
EVAL_SAMPLES="${EVAL_SAMPLES:-}"
CONFIG="${CONFIG:-tiny}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

mkdir -p "$OUT_DIR"
start=$SECONDS
echo "== data: $DATA_DIR"
"$PYTHON" -m megatron_mile.cli.prepare_corpus --output-dir "$DATA_DIR" --tokenize \
    --vocab-size "$VOCAB"

read -r -a extra <<< "$EXTRA_ARGS"
common=(
    data.mock=false data.vocab_size=null data.num_workers=0
    "data.data_path=[$DATA_DIR/train]" "data.valid_data_path=[$DATA_DIR/validation]"
    "data.tokenizer_model=$DATA_DIR/tokenizer.model"
    "model.seq_length=$SEQ" "training.micro_batch_size=$MBS" "training.global_batch_size=$GBS"
    "training.train_iters=$STEPS" training.eval_interval=0
    "training.log_interval=$(( STEPS < 50 ? 1 : 50 ))"
    "loss.gamma=$GAMMA" "loss.sigma=$SIGMA"
)
eval_args=()
if [[ -n "$EVAL_SAMPLES" ]]; then
    eval_args=(--max-samples "$EVAL_SAMPLES")
fi

results=()
for seed in $SEEDS; do
    for loss in $LOSSES; do
        run="$OUT_DIR/${loss}_seed${seed}"
        tracker="$run/ckpt/latest_checkpointed_iteration.txt"
        if [[ -f "$tracker" && "$(cat "$tracker")" == "$STEPS" ]]; then
            echo "== $run: already trained for $STEPS steps, evaluating"
        elif [[ -e "$run/ckpt" ]]; then
            echo "$run/ckpt holds another run (not $STEPS steps): remove it" >&2
            exit 1
        else
            mkdir -p "$run"
            echo "== train $loss, seed $seed, $STEPS steps -> $run"
            t0=$SECONDS
            "$PYTHON" -m megatron_mile.train --config "$CONFIG" "${common[@]}" \
                "loss.type=$loss" "training.seed=$seed" "checkpoint.save=$run/ckpt" \
                ${extra[@]+"${extra[@]}"} > "$run/train.log" 2>&1 \
                || { tail -n 30 "$run/train.log"; exit 1; }
            grep -E "iteration +$STEPS/" "$run/train.log" | tail -n 1 || true
            echo "   trained in $(( SECONDS - t0 )) s; evaluating"
        fi
        "$PYTHON" -m megatron_mile.cli.eval_frequency eval --load "$run/ckpt" \
            --output "$run/freq.json" --label "$loss seed $seed" \
            ${eval_args[@]+"${eval_args[@]}"} 2> "$run/eval.log" \
            || { tail -n 30 "$run/eval.log"; exit 1; }
        results+=("$run/freq.json")
    done
done

echo "== compare"
"$PYTHON" -m megatron_mile.cli.eval_frequency compare "${results[@]}" --mean-over-seeds \
    --markdown "$OUT_DIR/results.md" --plot "$OUT_DIR/freq.png"
{
    echo
    echo "Budget: $STEPS steps x $GBS x $SEQ tokens per run, seeds: $SEEDS," \
        "config $CONFIG${EXTRA_ARGS:+ ($EXTRA_ARGS)}, gamma $GAMMA, sigma $SIGMA;" \
        "wall time $(( SECONDS - start )) s."
} >> "$OUT_DIR/results.md"
echo "== done in $(( SECONDS - start )) s: $OUT_DIR/results.md, $OUT_DIR/freq.png"
