#!/usr/bin/env bash
# Install this checkout (editable) into the current Python environment, keeping its torch.
#
#   bash tools/install.sh          # the package
#   bash tools/install.sh test     # with an extra: test, eval, ...
#   PYTHON=/path/to/python bash tools/install.sh
#
# torch: where one is importable (NVIDIA's PyTorch container, a CUDA install, a cluster's
# module) it is kept, and said: version, CUDA or CPU build, location. Only where none is
# importable is the pinned CPU build installed (torch==2.13.0; an unpinned torch would pull a
# CUDA build of several GB). Every other dependency is then installed with that torch pinned
# through a constraint file, so pip never replaces it; a PIP_CONSTRAINT already set (NVIDIA's
# containers pin their torch, Transformer Engine and apex builds so) stays in force too.
# examples/quickstart.sh and tests/run.sh install through this script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python}
CPU_TORCH="torch==2.13.0"
extra=${1:-}
pip_install=("$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore)

describe_torch() {
    "$PYTHON" - <<'EOF' 2>/dev/null
import torch
build = f"CUDA {torch.version.cuda}" if getattr(torch.version, "cuda", None) else "CPU build"
print(torch.__version__)
print(f"torch {torch.__version__} ({build}) from {torch.__file__.rsplit('/', 2)[0]}")
EOF
}

if ! torch_info=$(describe_torch); then
    echo "install.sh: no torch importable by $PYTHON: installing the CPU build ($CPU_TORCH)"
    "${pip_install[@]}" "$CPU_TORCH"
    torch_info=$(describe_torch)
    echo "install.sh: installed ${torch_info#*$'\n'}"
else
    echo "install.sh: keeping the installed ${torch_info#*$'\n'}"
fi
torch_version=${torch_info%%$'\n'*}
# setup.py's floor (megatron-core 0.16.1 needs it): refuse rather than let pip replace torch.
if ! "$PYTHON" -c "import re, sys; sys.exit(tuple(map(int, re.match(r'(\d+)\.(\d+)', '$torch_version').groups())) < (2, 6))"; then
    echo "install.sh: the installed torch $torch_version is older than 2.6, which megatron-core" \
         "0.16.1 needs; install torch >= 2.6 for your CUDA (or use NVIDIA's container, docker/)" >&2
    exit 2
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"
"${pip_install[@]}" --constraint "$constraints" -e ".${extra:+[$extra]}"
