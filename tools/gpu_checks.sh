#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a machine with one CUDA GPU (e.g. a lent
# H100): the GPU test tier, the loss benchmark, and MiLe-vs-CE training throughput on a
# ~125M-parameter BF16 model, and the fused output layer + loss vs the unfused one.
# Results go to $OUT (default runs/gpu_checks).
#
#   bash tools/gpu_checks.sh
#
# Without network: put wheels for megatron-core 0.16.1 (and its deps) for that machine's
# Python in .wheels/ first; they are installed from there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [[ -d .wheels ]]; then
    python -m pip install --quiet --no-index --find-links .wheels megatron-core==0.16.1 pyyaml \
        sentencepiece pytest pytest-timeout
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)" \
    | tee -a "$OUT/device.txt"

status=0
python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
run1=(python -m torch.distributed.run --standalone --nproc-per-node 1)
"${run1[@]}" tools/bench_loss.py --reps 10 --json "$OUT/bench_loss.json" 2>&1 \
    | tee "$OUT/bench_loss.md" || status=1
"${run1[@]}" tools/bench_train.py --config bench_125m --rounds 3 --iters 20 --warmup 5 \
    2>&1 | tee "$OUT/bench_train.md" || status=1
# Output layer + loss fused (loss.fused_output_layer) vs unfused: the kernel at a LLaMA-size
# hidden, then end to end with a 128000 vocabulary. Decides the fused path's GPU default.
"${run1[@]}" tools/bench_loss.py --fused --tp 1 --hidden 4096 --vocab 32000 128000 \
    --dtype bf16 fp32 --reps 10 --json "$OUT/bench_fused.json" 2>&1 \
    | tee "$OUT/bench_fused.md" || status=1
"${run1[@]}" tools/bench_train.py --config bench_125m --losses mile --compare-fused --rounds 3 \
    --iters 20 --warmup 5 data.vocab_size=128000 2>&1 | tee "$OUT/bench_train_fused.md" \
    || status=1
exit "$status"
