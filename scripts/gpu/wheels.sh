#!/usr/bin/env bash
# Fetch the wheels the GPU check needs beyond the H200 image (torch, transformers, numpy, pyarrow,
# pytest are there; Megatron-Core and pydantic are not) into .cache/gpu-wheels/, an ignored folder
# that the device tool's `run` carries (carry: [".cache/gpu-wheels"]), and check that they and the
# working tree that travels fit the 64 MiB a call may send.
#
#   PYTHON=.venv/bin/python bash scripts/gpu/wheels.sh
#
# The image's Python is 3.12 on x86-64, so the two compiled wheels (megatron-core's dataset helper,
# pydantic-core) are the cp312 manylinux builds. Versions are the ones this project runs with;
# typing-extensions and packaging are carried because pydantic and megatron-core need newer ones
# than an image may hold. Hydra/OmegaConf, Ray and vLLM are not needed: the check imports none.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=.cache/gpu-wheels
LIMIT=$((64 * 1024 * 1024))
WHEELS=(
  megatron-core==0.16.1
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  packaging==26.4
)
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
if [ "$(ls "$DEST"/*.whl | wc -l)" -ne "${#WHEELS[@]}" ]; then
  echo "expected ${#WHEELS[@]} wheels in $DEST, got: $(ls "$DEST")" >&2
  exit 1
fi
ls -l "$DEST"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
wheel_bytes=$(cat "$DEST"/*.whl | wc -c)
# What a call sends besides the carried folder: tracked files and untracked ones git does not ignore
# (a tracked file deleted in the work tree has no size and does not travel).
tree_bytes=$(set +o pipefail; git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
total=$((wheel_bytes + tree_bytes))
awk -v w="$wheel_bytes" -v t="$tree_bytes" 'BEGIN {m = 1048576
  printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 MiB a call may send\n", w / m, t / m, (w + t) / m}'
if [ "$total" -gt "$LIMIT" ]; then
  echo "too large: carry less, or ignore what need not travel" >&2
  exit 1
fi
