#!/usr/bin/env bash
# Download, on a machine with network, the wheels tools/gpu_checks.sh installs on a GPU machine
# without it (one CUDA GPU, Python 3.12, its own torch with CUDA and Triton, no Transformer
# Engine): into .wheels/ (git-ignored), which travels with the checkout.
#
#   bash tools/fetch_gpu_wheels.sh                 # for CPython 3.12 on x86_64 Linux
#   PYTHON_VERSION=3.11 bash tools/fetch_gpu_wheels.sh
#
# torch is never downloaded: the GPU machine's own CUDA build is used (megatron-core's wheel
# declares torch, so the list below is explicit, --no-deps). Only what the GPU checks import
# is fetched: megatron-core 0.16.1 with numpy and packaging, pyyaml, sentencepiece, pytest
# and its dependencies, and the fused loss's peers for tools/bench_peers.py (liger-kernel and
# cut-cross-entropy: pure Python + Triton, requiring only torch and triton, which the GPU
# machine has); tools/gpu_checks.sh installs them with --no-deps too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
# glibc 2.28+ (any current CUDA image); older manylinux tags are accepted by it too.
PLATFORMS=${PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64"}
platform_args=()
for p in $PLATFORMS; do platform_args+=(--platform "$p"); done
mkdir -p .wheels
python -m pip download --quiet --disable-pip-version-check --dest .wheels \
    --python-version "$PYTHON_VERSION" "${platform_args[@]}" --only-binary=:all: --no-deps \
    -r tools/gpu_wheels.txt
ls -l .wheels
echo "fetch_gpu_wheels.sh: $(find .wheels -name '*.whl' | wc -l) wheels," \
     "$(du -sh .wheels | cut -f1) in .wheels/ (for Python $PYTHON_VERSION: $PLATFORMS)"
