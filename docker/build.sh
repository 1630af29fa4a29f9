#!/usr/bin/env bash
# Build the megatron-mile training image (docker/Dockerfile) from this checkout.
#
# Usage:
#   docker/build.sh                      # tags megatron-mile:<git describe>
#   docker/build.sh megatron-mile:0.1.0  # a tag of your choice
#   BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3 docker/build.sh   # another pinned base
# Then, for Slurm:
#   pyxis/enroot:  enroot import -o mile.sqsh dockerd://megatron-mile:0.1.0
#                  (or push to a registry) and CONTAINER=pyxis CONTAINER_IMAGE=$PWD/mile.sqsh
#   apptainer:     apptainer build mile.sif docker-daemon://megatron-mile:0.1.0
#                  and CONTAINER=apptainer CONTAINER_IMAGE=$PWD/mile.sif
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tag=${1:-megatron-mile:$(git -C "$root" describe --always --dirty 2>/dev/null || echo dev)}
build_args=()
if [[ -n ${BASE_IMAGE:-} ]]; then build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE"); fi

docker build "${build_args[@]}" --file "$root/docker/Dockerfile" --tag "$tag" "$root"
echo "built $tag"
