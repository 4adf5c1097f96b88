#!/usr/bin/env bash
# GPU check of the CuPy backend, for a bare machine with one CUDA GPU, CuPy (+ PyTorch, JAX)
# preinstalled and no network.  From the repository root:
#
#     scripts/gpu_check.sh            # about 6 minutes at most; the summary table prints last
#
# Stages, each under its own timeout so one hang cannot eat the budget:
#   1. environment  (30 s)  python, CuPy, the device, NVRTC; fails fast without a GPU
#   2. gpu tests   (240 s)  pytest -m gpu across tests/ (needs pytest + hypothesis; if they
#                           are missing the stage says so and is skipped, nothing is fetched)
#   3. benchmark    (75 s)  bench/bench_cupy.py: lsoftmax-core vs three cuBLAS GEMMs
#   4. optional, PEER_BENCH=1 (200 s): python -m bench --gpu (PyTorch and peers), into $OUT/peers
# Nothing is installed from a network: the package is laid out from the checkout into a
# private folder as pip would install it (pyproject's package-dir map), and wheels carried in ./.whl are installed offline (see below).  Logs and the
# benchmark table go to $OUT_DIR (default: ./out/gpu-check, git-ignored).  Override the interpreter with
# PYTHON=..., the limits with ENV_TIMEOUT / TEST_TIMEOUT / BENCH_TIMEOUT (seconds).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-$PWD/out/gpu-check}
mkdir -p "$OUT"
SITE=${TMPDIR:-/tmp}/lsoftmax-gpu-site
rm -rf "$SITE" && mkdir -p "$SITE"
# The installed layout without pip or setuptools (neither may be on a bare machine): a
# folder per package of pyproject's [tool.setuptools.package-dir], holding links to its
# source files.  The repository root never goes first on sys.path (python -P): its
# lsoftmax_core/ has no adapters, and adapters/ must not be importable a second time.
"$PY" - "$SITE" <<'EOF_STAGE' || { echo "could not lay out the package"; exit 1; }
import os, sys, tomllib
site = sys.argv[1]
cfg = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
for pkg, src in cfg.items():
    dst = os.path.join(site, *pkg.split("."))
    os.makedirs(dst, exist_ok=True)
    for entry in os.listdir(src):
        if entry != "__pycache__":
            os.symlink(os.path.abspath(os.path.join(src, entry)), os.path.join(dst, entry))
EOF_STAGE
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export CI=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} PYTHONDONTWRITEBYTECODE=1
# One pytest process runs the CuPy, PyTorch and JAX GPU tests: without this, JAX's first
# GPU use would take 75% of the device for XLA and leave CuPy and PyTorch the rest.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
declare -a SUMMARY=()

# Wheels carried along in ./.whl (scripts/fetch_gpu_wheels.sh: pytorch-metric-learning for
# the peer benchmark) are installed into a private folder, offline, without dependencies.
if compgen -G ".whl/*.whl" >/dev/null; then
  WHEELS=${TMPDIR:-/tmp}/lsoftmax-gpu-wheels
  if PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WHEELS" .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$WHEELS"
  else
    echo "warning: could not install the wheels in .whl; going on without them"
  fi
fi

stage() {  # stage NAME SECONDS COMMAND...: run with a timeout, log, record status and time
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT"; elif [ $rc -ne 0 ]; then status="FAILED (rc=$rc)"; fi
  SUMMARY+=("| $name | $status | $((SECONDS - t0)) s |")
  return $rc
}

stage environment "${ENV_TIMEOUT:-30}" "$PY" - <<'EOF'
import sys
import cupy
from cupy.cuda import runtime
from cupy_backends.cuda.libs import nvrtc
n = runtime.getDeviceCount()
props = runtime.getDeviceProperties(0)
name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
print(f"python {sys.version.split()[0]}, cupy {cupy.__version__}, CUDA runtime {runtime.runtimeGetVersion()}, "
      f"driver {runtime.driverGetVersion()}, NVRTC {nvrtc.getVersion()}, {n} device(s): {name}, "
      f"cc {props['major']}.{props['minor']}")
import lsoftmax_core as lsm
print("CuPy backend dtypes:", ", ".join(str(d) for d in lsm.supported_dtypes("cupy")))
EOF
env_rc=$?

if [ $env_rc -ne 0 ]; then
  SUMMARY+=("| gpu tests | not run (no usable GPU/CuPy) | 0 s |" "| benchmark | not run | 0 s |")
elif ! "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
  echo "pytest and/or hypothesis are not installed: the GPU tests cannot run here (nothing is fetched)."
  SUMMARY+=("| gpu tests | SKIPPED: pytest/hypothesis missing | 0 s |")
else
  stage "gpu tests" "${TEST_TIMEOUT:-240}" "$PY" -P -m pytest -m gpu tests/ -q -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml" -o junit_family=xunit2
fi

if [ $env_rc -eq 0 ]; then
  stage benchmark "${BENCH_TIMEOUT:-75}" "$PY" bench/bench_cupy.py --markdown "$OUT/bench_cupy.md"
fi

# Optional (PEER_BENCH=1): the full comparison with PyTorch and pytorch-metric-learning,
# `python -m bench --gpu` (2-3 min), which does not fit the 6-minute default budget.
if [ $env_rc -eq 0 ] && [ "${PEER_BENCH:-0}" = 1 ]; then
  stage "peer benchmark" "${PEER_TIMEOUT:-200}" "$PY" -m bench --gpu --out "$OUT/peers" --no-doc
fi

counts=""
if [ -f "$OUT/gpu-tests.xml" ]; then
  counts=$("$PY" - "$OUT/gpu-tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
t, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(f"{t - f - e - s} passed, {f} failed, {e} errors, {s} skipped")
EOF
)
fi

echo
echo "=== summary"
echo "| stage | status | time |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
[ -n "$counts" ] && echo "gpu tests: $counts"
[ -f "$OUT/bench_cupy.md" ] && { echo; cat "$OUT/bench_cupy.md"; }
for line in "${SUMMARY[@]}"; do
  case "$line" in *"| ok |"*|*SKIPPED*) ;; *) exit 1 ;; esac
done
exit 0
