#!/usr/bin/env bash
# Fetch, on a machine with package-registry access, the pure-Python wheels the GPU check
# wants but a bare GPU machine may lack, into ./.whl (git-ignored).  Carry that folder to
# the GPU machine; scripts/gpu_check.sh installs what it finds there (no network needed).
#
#     scripts/fetch_gpu_wheels.sh           # then carry .whl along with the checkout
#
# Only pytorch-metric-learning (a benchmark peer, measured by `PEER_BENCH=1 scripts/gpu_check.sh`,
# i.e. the whole `python -m bench --gpu`) is fetched: its own needs (torch, numpy,
# scikit-learn, tqdm) are on the GPU image already, so --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
  -d .whl "pytorch-metric-learning==${PML_VERSION:-2.9.0}"
ls -l .whl
