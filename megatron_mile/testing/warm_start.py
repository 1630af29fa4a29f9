"""What ``run_distributed``'s fork server imports once: torch and megatron-core (most of a
rank's start-up, about 10 s on 2 CPU cores), under the entry points' warning filters. Every
rank is then forked from that server with these modules already imported."""

from megatron_mile.log_filters import install_warning_filters

install_warning_filters(cuda=False)

import megatron.core  # noqa: E402,F401 - the import is the point
import torch  # noqa: E402,F401
