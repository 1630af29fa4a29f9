"""Build-time check of the image: the pinned megatron-core, this package, and NVIDIA's
torch / Transformer Engine / apex all present. Imports only what loads without a GPU."""

import importlib.metadata as md
import importlib.util

import megatron.core  # noqa: F401  (torch + megatron-core import without a GPU)
import megatron_mile  # noqa: F401

assert md.version("megatron-core") == "0.16.1", md.version("megatron-core")
for module in ("transformer_engine", "apex"):
    # Their import needs the CUDA driver, which a build does not have: locate them only.
    assert importlib.util.find_spec(module) is not None, f"{module} missing from the base image"
for dist in ("torch", "megatron-core", "transformer-engine", "apex", "megatron-mile"):
    try:
        print(f"{dist:20s} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist:20s} (no distribution metadata)")
