#!/usr/bin/env bash
# GPU check of the CuPy backend, for a bare machine with one CUDA GPU, CuPy (+ PyTorch, JAX)
# preinstalled and no network.  From the repository root:
#
#     scripts/gpu_check.sh                 # GPU tests, layer benchmark, demo smoke, overhead (about 3 min on an H200)
#     LOSS_BENCH=1 scripts/gpu_check.sh    # the loss suite alone at 8192x512x256k: one 5-minute device call
#     DRY_RUN=1 LOSS_BENCH=1 scripts/gpu_check.sh   # anywhere: print the stages and the benchmark plans, run nothing
#
# Stages, each under its own timeout so one hang cannot eat the budget:
#   1. environment  (30 s)  python, CuPy, the device, NVRTC; fails fast without a GPU
#   2. gpu tests   (240 s)  pytest -m gpu across tests/ (needs pytest + hypothesis, else skipped)
#   3. benchmark    (75 s)  python -m bench layer --gpu --exclude torch: the CuPy backend against
#                           three cuBLAS GEMMs, every GPU layer size, float32 and float16
#      PEER_BENCH=1 (200 s) python -m bench layer lenet --gpu (PyTorch adapter, peers, LeNet)
#   4. demo smoke  (120 s)  lsoftmax-demo --device cuda on scikit-learn's digits, margins 1 and 4
#   5. overhead     (60 s)  python -m bench overhead --gpu (host time per call at 256x2x10), then
#                           scripts/profile_overhead.py --paths cupy (60 s)
# LOSS_BENCH=1 replaces all but the environment with python -m bench loss --gpu (LOSS_TIMEOUT,
# 240 s): the fused loss (CuPy) against F.linear_cross_entropy with LinearCrossEntropyOptions(),
# F.linear + F.cross_entropy, the unfused L-Softmax loss, pytorch-metric-learning and the three
# GEMMs, float32 and bfloat16, inputs drawn on the device, 5 repetitions.  Its default size,
# ce-256k (8192x512x256k: 8 GB of float32 logits), is sized to finish within the call;
# LOSS_SIZES=ce-1m (8192x512x1M, 32 GB of logits) is the opt-in larger one, with a call of its own.
# Measured on an H200 (2026-11-30, before LOSS_BENCH was resized): the default script 154-176 s.
# Nothing is installed from a network: the package is laid out from the checkout into a private
# folder as pip would install it (pyproject's package-dir map); wheels carried in ./.whl are
# installed offline.  Logs and the benchmark's files go to $OUT_DIR (default ./out/gpu-check,
# git-ignored) and once more into one archive, $OUT_DIR/gpu-check.tgz; back in the checkout,
# copy its bench/ files into bench/results/ (they are the generated CSV, env and markdown).
# Override the interpreter with PYTHON=..., the limits with ENV_TIMEOUT / TEST_TIMEOUT /
# BENCH_TIMEOUT / PEER_TIMEOUT / LOSS_TIMEOUT / DEMO_TIMEOUT / OVERHEAD_TIMEOUT (seconds).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-$PWD/out/gpu-check}
if [ "${DRY_RUN:-0}" = 1 ]; then
  # What the GPU call would run, checked here without a GPU: the shell parses, the benchmark's
  # arguments parse and name existing suites and sizes (python -m bench --dry-run measures nothing).
  if [ "${LOSS_BENCH:-0}" = 1 ]; then set -- loss --gpu ${LOSS_SIZES:+--sizes "$LOSS_SIZES"}
  elif [ "${PEER_BENCH:-0}" = 1 ]; then set -- layer lenet --gpu
  else set -- layer --gpu --exclude torch; fi
  echo "stages: environment$([ "${LOSS_BENCH:-0}" = 1 ] || echo ', gpu tests, demo smoke, overhead'), benchmark"
  exec "$PY" -m bench "$@" --dry-run --out "$OUT/bench"
fi
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
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/${name// /-}.log"  # no spaces: file names travel back
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

LOSS=${LOSS_BENCH:-0}
if [ $env_rc -ne 0 ]; then
  SUMMARY+=("| gpu tests | not run (no usable GPU/CuPy) | 0 s |" "| benchmark | not run | 0 s |")
elif [ "$LOSS" = 1 ]; then
  echo "LOSS_BENCH=1: the GPU tests, demo smoke and overhead stages are left to a call of their own"
elif ! "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
  echo "pytest and/or hypothesis are not installed: the GPU tests cannot run here (nothing is fetched)."
  SUMMARY+=("| gpu tests | SKIPPED: pytest/hypothesis missing | 0 s |")
else
  stage "gpu tests" "${TEST_TIMEOUT:-240}" "$PY" -P -m pytest -m gpu tests/ -q -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml" -o junit_family=xunit2
fi

# The benchmark: `python -m bench`, the same suites and files as on CPU (docs/BENCHMARKS.md),
# run with -P like pytest above, so the repository root (whose lsoftmax_core/ has no adapters)
# is not first on sys.path; a folder holding only a link to bench/ goes at the END of
# PYTHONPATH, after the laid-out package.
if [ $env_rc -eq 0 ]; then
  BENCH_PATH=${TMPDIR:-/tmp}/lsoftmax-gpu-bench
  rm -rf "$BENCH_PATH" "$OUT/bench" && mkdir -p "$BENCH_PATH" && ln -s "$PWD/bench" "$BENCH_PATH/bench"
  if [ "$LOSS" = 1 ]; then
    bench_args=(loss --gpu ${LOSS_SIZES:+--sizes "$LOSS_SIZES"}) bench_limit=${LOSS_TIMEOUT:-240}
  elif [ "${PEER_BENCH:-0}" = 1 ]; then
    bench_args=(layer lenet --gpu) bench_limit=${PEER_TIMEOUT:-200}
  else
    bench_args=(layer --gpu --exclude torch) bench_limit=${BENCH_TIMEOUT:-75}
  fi
  stage benchmark "$bench_limit" env PYTHONPATH="$PYTHONPATH:$BENCH_PATH" \
    "$PY" -P -m bench "${bench_args[@]}" --out "$OUT/bench"
fi

# --- demo smoke (issue 14) -------------------------------------------------------------
# lsoftmax-demo --device cuda on scikit-learn's bundled 8x8 digits (no data to fetch):
# margins 1 and 4, 20 epochs of 20 steps, 800 training steps of the demo's CNN in PyTorch
# with the L-Softmax layer on CUDA through the CuPy backend.  Fails when a margin's test
# accuracy is under 0.9; skipped, and said so, without torch (CUDA), scikit-learn,
# matplotlib or tqdm.  Adds 2 files to $OUT: demo-smoke.log and demo-results.json (the
# run's results.json, CuPy's version included).  Limit DEMO_TIMEOUT (120 s).
if [ $env_rc -eq 0 ] && [ "$LOSS" != 1 ]; then
  if ! "$PY" -c "import torch, sklearn, matplotlib, tqdm; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "demo smoke: torch with CUDA, scikit-learn, matplotlib or tqdm missing; skipped"
    SUMMARY+=("| demo smoke | SKIPPED: demo dependencies missing | 0 s |")
  else
    DEMO_DIR=${TMPDIR:-/tmp}/lsoftmax-gpu-demo
    rm -rf "$DEMO_DIR"
    stage "demo smoke" "${DEMO_TIMEOUT:-120}" "$PY" -P - "$DEMO_DIR" "$OUT/demo-results.json" <<'EOF'
import json, shutil, sys
from lsoftmax_core.demo import main
out, keep = sys.argv[1], sys.argv[2]
main(["--device", "cuda", "--margins", "1,4", "--epochs", "20", "--out", out])
shutil.copy(f"{out}/results.json", keep)
runs = json.load(open(keep))["runs"]
for r in runs:
    print(f"margin {r['margin']}: {100 * r['test_accuracy']:.1f}%, intra-class {r['intra_class_angle_deg']:.2f} deg, "
          f"{r['train_seconds']:.1f} s")
low = [r["margin"] for r in runs if r["test_accuracy"] < 0.9]
if low:
    sys.exit(f"demo smoke: test accuracy under 0.9 at margins {low}")
EOF
  fi
elif [ "$LOSS" != 1 ]; then
  SUMMARY+=("| demo smoke | not run | 0 s |")
fi
# --- end demo smoke ------------------------------------------------------------------------

# --- per-call overhead ---------------------------------------------------------------
# python -m bench overhead --gpu: the CuPy backend's host time per forward+backward at 256x2x10
# (goal <= 60 us), its device time, CuPy's three cuBLAS GEMMs and the backend with its
# small-problem kernels off, interleaved; then scripts/profile_overhead.py splits the host time.
if [ $env_rc -eq 0 ] && [ "$LOSS" != 1 ]; then
  stage overhead "${OVERHEAD_TIMEOUT:-60}" env PYTHONPATH="$PYTHONPATH:$BENCH_PATH" \
    "$PY" -P -m bench overhead --gpu --out "$OUT/bench"
  stage "overhead profile" "${OVERHEAD_PROFILE_TIMEOUT:-60}" env PYTHONPATH="$PYTHONPATH:$BENCH_PATH" \
    "$PY" -P scripts/profile_overhead.py --paths cupy --top 15
elif [ "$LOSS" != 1 ]; then
  SUMMARY+=("| overhead | not run | 0 s |")
fi
# --- end per-call overhead -------------------------------------------------------------

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

# The benchmarks' generated tables, then the summary table, last.
for md in "$OUT"/bench/gpu_*.md; do
  [ -f "$md" ] && { echo; echo "=== benchmark: $md"; cat "$md"; }
done
tar czf "$OUT/gpu-check.tgz.part" --exclude=gpu-check.tgz --exclude=gpu-check.tgz.part -C "$OUT" . \
  && mv "$OUT/gpu-check.tgz.part" "$OUT/gpu-check.tgz" && echo "all of the above: $OUT/gpu-check.tgz"
echo
echo "=== summary"
echo "| stage | status | time |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
[ -n "$counts" ] && echo "gpu tests: $counts"
for line in "${SUMMARY[@]}"; do
  case "$line" in *"| ok |"*|*SKIPPED*) ;; *) exit 1 ;; esac
done
exit 0
