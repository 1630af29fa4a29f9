"""Build-time check of the image: the pinned megatron-core, this package and its console
scripts, and NVIDIA's torch / Transformer Engine / apex all present. Imports only what loads
without a GPU."""

import importlib.metadata as md
import importlib.util
import shutil

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

# The console scripts of setup.py (megatron_mile/cli/): on PATH, and their main() importable.
scripts = [ep for ep in md.distribution("megatron-mile").entry_points
           if ep.group == "console_scripts"]
assert scripts, "megatron-mile installed without its console scripts"
for ep in scripts:
    assert shutil.which(ep.name), f"{ep.name} is not on PATH"
    ep.load()
print("console scripts     " + " ".join(sorted(ep.name for ep in scripts)))
