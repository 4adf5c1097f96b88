#!/usr/bin/env bash
# GPU check of the CuPy backend, for a bare machine with one CUDA GPU, CuPy (+ PyTorch, JAX)
# preinstalled and no network.  From the repository root:
#
#     scripts/gpu_check.sh            # about 6 minutes at most; the benchmark section, then the summary table, print last
#
# Stages, each under its own timeout so one hang cannot eat the budget:
#   1. environment  (30 s)  python, CuPy, the device, NVRTC; fails fast without a GPU
#   2. gpu tests   (240 s)  pytest -m gpu across tests/ (needs pytest + hypothesis; if they
#                           are missing the stage says so and is skipped, nothing is fetched)
#   3. benchmark    (75 s)  python -m bench --gpu --layer-only, the one benchmark harness: the
#                           CuPy backend's forward+backward against the three cuBLAS GEMMs of a
#                           linear layer, every GPU size of the one size table, float32 and
#                           float16, 30 repetitions; into $OUT/bench
#      PEER_BENCH=1 (200 s) the whole python -m bench --gpu instead (PyTorch adapter,
#                           pytorch-metric-learning, autograd, LeNet): about 8 minutes in all
#      LOSS_BENCH=1 (240 s) python -m bench --gpu --loss instead: the fused cross-entropy
#                           comparison at 8192x512x1M, float32 and bfloat16 (the unfused
#                           PyTorch contenders may run out of memory there, which their rows
#                           say); into $OUT/bench/gpu_loss.{csv,md}, gpu_loss_env.json.  240 s is
#                           too short: on an H200 (2026-11-30) float32 alone had not finished
#                           after 250 s.  Give it a device call of its own, LOSS_TIMEOUT=540.
# Budget: 30 + 240 + 75 s of limits.  Measured on an H200 (2026-11-30, two runs): the whole
# script 154-176 s, of which the GPU tests 117-136 s, the benchmark 6-7 s, the demo smoke
# 18-23 s and the overhead 1-2 s.
# Nothing is installed from a network: the package is laid out from the checkout into a
# private folder as pip would install it (pyproject's package-dir map), and wheels carried in ./.whl are installed offline (see below).  Logs and the
# benchmark's files go to $OUT_DIR (default: ./out/gpu-check, git-ignored), and all of them
# once more into one archive, $OUT_DIR/gpu-check.tgz (a remote GPU tool may bring back only a
# few files: fetch that one); back where the checkout is, unpack it and
# `python -m bench --render gpu --from DIR/bench` puts them into docs/BENCHMARKS.md.  Override the interpreter with PYTHON=..., the limits with
# ENV_TIMEOUT / TEST_TIMEOUT / BENCH_TIMEOUT / PEER_TIMEOUT / LOSS_TIMEOUT (seconds).
# `python -m bench --render gpu --loss --from DIR/bench` renders a LOSS_BENCH=1 run.
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

if [ $env_rc -ne 0 ]; then
  SUMMARY+=("| gpu tests | not run (no usable GPU/CuPy) | 0 s |" "| benchmark | not run | 0 s |")
elif ! "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
  echo "pytest and/or hypothesis are not installed: the GPU tests cannot run here (nothing is fetched)."
  SUMMARY+=("| gpu tests | SKIPPED: pytest/hypothesis missing | 0 s |")
else
  stage "gpu tests" "${TEST_TIMEOUT:-240}" "$PY" -P -m pytest -m gpu tests/ -q -p no:cacheprovider \
    --junitxml="$OUT/gpu-tests.xml" -o junit_family=xunit2
fi

# The benchmark: `python -m bench`, the same harness, size table and files as on CPU (see
# docs/BENCHMARKS.md).  Like pytest above it runs with -P, so the current directory (the
# repository root, whose lsoftmax_core/ has no adapters) is not put first on sys.path;
# bench itself is not part of the package, so a folder holding only a link to bench/ goes at
# the END of PYTHONPATH, after the laid-out package: `import bench` finds the checkout's,
# `import lsoftmax_core` still the laid-out one, and nothing else of the root is exposed.
# --no-doc --no-plot: the section (gpu.md) and the data go into $OUT/bench, no plot (the
# render draws it).
if [ $env_rc -eq 0 ]; then
  BENCH_PATH=${TMPDIR:-/tmp}/lsoftmax-gpu-bench
  rm -rf "$BENCH_PATH" "$OUT/bench" && mkdir -p "$BENCH_PATH" && ln -s "$PWD/bench" "$BENCH_PATH/bench"
  if [ "${LOSS_BENCH:-0}" = 1 ]; then
    # The fused cross-entropy comparison in place of the layer one (7 files in $OUT in all).
    bench_args=(--gpu --loss) bench_limit=${LOSS_TIMEOUT:-240}
  elif [ "${PEER_BENCH:-0}" = 1 ]; then
    bench_args=(--gpu) bench_limit=${PEER_TIMEOUT:-200}
  else
    # The layer contenders only: bench_cupy.py's comparison at full repetitions (30), which
    # needs neither PyTorch nor LeNet and fits the 6-minute budget.
    bench_args=(--gpu --layer-only) bench_limit=${BENCH_TIMEOUT:-75}
  fi
  stage benchmark "$bench_limit" env PYTHONPATH="$PYTHONPATH:$BENCH_PATH" \
    "$PY" -P -m bench "${bench_args[@]}" --no-doc --no-plot --out "$OUT/bench"
fi

# --- demo smoke (issue 14) -------------------------------------------------------------
# lsoftmax-demo --device cuda on scikit-learn's bundled 8x8 digits (no data to fetch):
# margins 1 and 4, 20 epochs of 20 steps, 800 training steps of the demo's CNN in PyTorch
# with the L-Softmax layer on CUDA through the CuPy backend.  Fails when a margin's test
# accuracy is under 0.9; skipped, and said so, without torch (CUDA), scikit-learn,
# matplotlib or tqdm.  Adds 2 files to $OUT: demo-smoke.log and demo-results.json (the
# run's results.json, CuPy's version included).  Limit DEMO_TIMEOUT (120 s).
if [ $env_rc -eq 0 ]; then
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
else
  SUMMARY+=("| demo smoke | not run | 0 s |")
fi
# --- end demo smoke ------------------------------------------------------------------------

# --- per-call overhead (issue 13) ------------------------------------------------------
# python -m bench --gpu --overhead: the CuPy backend's host time per forward+backward at the
# seed's 256x2x10 (call to return, no synchronisation inside; goal <= 60 us), its device
# time, the host time of CuPy's three cuBLAS GEMMs and the backend's host time with its
# small-problem kernels off (the cuBLAS plan), interleaved.  Then python -m
# bench.profile_overhead --paths cupy splits the host time into its steps, under its own
# limit OVERHEAD_PROFILE_TIMEOUT (60 s).  Adds 5 files to $OUT: overhead.log,
# overhead-profile.log, bench/gpu_overhead.csv, _env.json and .md (printed below with the other sections);
# `python -m bench --render gpu --overhead --from DIR/bench` puts it into docs/BENCHMARKS.md.
# Limit OVERHEAD_TIMEOUT (60 s).
if [ $env_rc -eq 0 ]; then
  stage overhead "${OVERHEAD_TIMEOUT:-60}" env PYTHONPATH="$PYTHONPATH:$BENCH_PATH" \
    "$PY" -P -m bench --gpu --overhead --no-doc --out "$OUT/bench"
  stage "overhead profile" "${OVERHEAD_PROFILE_TIMEOUT:-60}" env PYTHONPATH="$PYTHONPATH:$BENCH_PATH" \
    "$PY" -P -m bench.profile_overhead --paths cupy --top 15
else
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

# The benchmark's section, goals included (the text the render puts into docs/BENCHMARKS.md),
# then the summary table, last.
[ -f "$OUT/bench/gpu.md" ] && { echo; echo "=== benchmark: $OUT/bench/gpu.md"; cat "$OUT/bench/gpu.md"; }
[ -f "$OUT/bench/gpu_loss.md" ] && { echo; echo "=== benchmark: $OUT/bench/gpu_loss.md"; cat "$OUT/bench/gpu_loss.md"; }
[ -f "$OUT/bench/gpu_overhead.md" ] && { echo; echo "=== benchmark: $OUT/bench/gpu_overhead.md"; cat "$OUT/bench/gpu_overhead.md"; }
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
