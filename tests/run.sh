#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs the whole suite.
#   bash tests/run.sh            # everything: unit + multi-process + end-to-end tiers
#   bash tests/run.sh --fast     # the unit tier only (-m "not slow"), for the edit loop
#   bash tests/run.sh -k loss    # extra arguments go to pytest
# .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The package and the test extras; the installed torch is kept (the CPU build is installed
# only where none is importable, see tools/install.sh).
bash tools/install.sh test

# Slurm daemons, munge, shellcheck (apt) and hadolint for the launch/Slurm/lint tests.
if [[ "$(id -u)" == 0 ]]; then
    bash .ci/install_test_tools.sh
else
    echo "tests/run.sh: not root, so Slurm/shellcheck/hadolint are not installed;" \
         "the tests that need them skip unless they are already present" >&2
fi

tier=()
if [[ ${1:-} == --fast ]]; then
    shift
    tier=(-m "not slow")
fi
# pytest exits 5 when it collects nothing: that is a failure here too, as is any test failure.
exec python -m pytest -q tests "${tier[@]}" "$@"
