#!/usr/bin/env bash
# Every GPU check and benchmark in one command, for a machine with one CUDA GPU and no
# network (e.g. a lent H100/H200: Python 3.12, its own torch with CUDA and Triton, no
# Transformer Engine). At most 8 minutes: each step has its own time limit (480 s in all),
# so a hang costs that step only. Results go to $OUT (default runs/gpu_checks), one file per step.
#
#   bash tools/fetch_gpu_wheels.sh     # beforehand, with network: wheels into .wheels/
#   bash tools/gpu_checks.sh           # on the GPU machine, from the checkout
#
# Steps: the GPU test tier (tests/test_gpu.py: the loss on the device against float64, BF16
# training with each available layer implementation), a short training run whose log must
# hold no third-party warnings (and the one-line kernel notice where TE/apex are missing),
# the loss benchmark (tools/bench_loss.py), MiLe vs cross-entropy training throughput and MFU
# of a 125M-parameter BF16 model (tools/bench_train.py), and the fused output layer + loss
# (loss.fused_output_layer) against the unfused one, as a kernel at a LLaMA-size hidden and end
# to end with a 128000 vocabulary: the figures that decide its GPU default; and its peers,
# side by side in one process (tools/bench_peers.py: Liger-Kernel's
# LigerFusedLinearCrossEntropyLoss and Cut-Cross-Entropy's linear_cross_entropy against the
# project's fused MiLe and CE at h = 4096, v = 128256, 8192 tokens, bf16: time and peak
# memory; both are pure Python + Triton wheels from tools/gpu_wheels.txt, needing only torch
# and triton: liger-kernel 0.8.5 declares torch>=2.1.2, triton>=2.3.1, cut-cross-entropy
# 25.1.1 any torch and triton, so the device's torch 2.11 / Triton 3.6 qualify). Exits 1 if
# any step failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [[ -d .wheels ]]; then
    # --no-deps: megatron-core's wheel declares torch, and the machine's CUDA torch must stay.
    python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --no-index --find-links .wheels --no-deps -r tools/gpu_wheels.txt
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch, megatron.core as m; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| megatron-core', m.__version__)"
} | tee "$OUT/device.txt"

status=0
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    if ! timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"; then
        echo "== $name FAILED (or timed out)"
        status=1
    fi
}
run1=(python -m torch.distributed.run --standalone --nproc-per-node 1)

step gpu_tests 110 python -m pytest -q -m gpu tests/test_gpu.py
step quiet_log 50 "${run1[@]}" -m megatron_mile.train --config tiny data.mock=true \
    precision.dtype=bf16 training.train_iters=10 training.log_interval=5
if grep -nE "Warning|warnings\.warn|Traceback" "$OUT/quiet_log.txt"; then
    echo "== quiet_log FAILED: third-party warnings in the training log"
    status=1
fi
step bench_loss 50 "${run1[@]}" tools/bench_loss.py --reps 10 --json "$OUT/bench_loss.json"
step bench_train 80 "${run1[@]}" tools/bench_train.py --config bench_125m --rounds 2 \
    --iters 20 --warmup 5 --losses cross_entropy mile precision.dtype=bf16 data.vocab_size=32000
step bench_fused 50 "${run1[@]}" tools/bench_loss.py --fused --tp 1 --hidden 4096 \
    --vocab 32000 128000 --dtype bf16 fp32 --reps 6 --json "$OUT/bench_fused.json"
step bench_train_fused 80 "${run1[@]}" tools/bench_train.py --config bench_125m --losses mile \
    --compare-fused --rounds 2 --iters 20 --warmup 5 data.vocab_size=128000
# Triton compiles the peers' kernels in the warm-up rep, inside the limit.
step bench_peers 60 python tools/bench_peers.py --tokens 8192 --vocab 128256 --hidden 4096 \
    --dtype bf16 --reps 5 --json "$OUT/bench_peers.json"
exit "$status"
