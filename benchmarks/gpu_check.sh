#!/usr/bin/env bash
# One-command GPU check, for a machine with an NVIDIA GPU and NO network, where only torch, triton,
# numpy, pytest and setuptools may be installed (no ninja on PATH, no scipy/hypothesis/matplotlib):
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]
#
# Everything it writes goes to OUT_DIR (the only folder that comes back from a lent GPU machine):
# summary.txt, build.log, tests-gpu.log/.xml, tests-cpu.log/.xml, bench.log, cuda-*.csv,
# backend_choice.json, tuning.log. One global deadline (GPU_CHECK_BUDGET, default 480 s) covers
# everything; each step gets min(its cap, what is left minus the reserve of the steps after it), is
# stopped with SIGINT (pytest then still writes its junit file, a benchmark its rows) and SIGKILL 15 s
# later, and is skipped when less than 10 s would be left for it. Order, most valuable first:
#   preflight  python, torch + CUDA, the GPU's architecture (TORCH_CUDA_ARCH_LIST set from it, whatever
#              was inherited), nvcc, ninja (found where pip put it, else the build runs serially)
#   build      pip editable install (no isolation, no index); fallback: setup.py build_ext --inplace
#              (PYTHONPATH covers the repository, so the benchmarks import that build too)
#   GPU tests  the tests that run CUDA or Triton kernels, with --durations
#   benchmarks the headline BatchNorm rows first (256x256x56x56, stock eager and compiled), then
#              BatchNorm+add+ReLU, clipping and init, the torchvision end-to-end step (if installed)
#   tuning     which GPU backend is faster per op (backend_choice.json, for TORCHFAST_BACKEND_CHOICE)
#   CPU tests  the rest of the suite, only in the time left
#   summary    always, last
# --dry-run: the preflight, then the plan (each step's command and time slot) without running it: the CPU
# CI runs this (tests/test_benchmarks.py).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="${1:-./gpu-results}"
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
start=$(date +%s)
VIRTUAL=0  # --dry-run: the slots planned so far, as if every step used all of its slot
elapsed() { echo $(( $(date +%s) - start + VIRTUAL )); }
GRACE=15   # SIGINT, then SIGKILL this much later
stamp() { echo "[$(elapsed)s] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# run_step NAME CAP RESERVE LOG CMD...: CMD under min(CAP, left - RESERVE) seconds, output to LOG.
declare -A RC
run_step() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local slot=$(( BUDGET - $(elapsed) - reserve - GRACE ))
  (( slot > cap )) && slot=$cap
  if (( slot < 10 )); then
    stamp "$name: skipped (${slot}s left for it)"
    RC[$name]=skipped
    return 0
  fi
  if (( DRY )); then
    stamp "$name: would run for up to ${slot}s (+${GRACE}s to stop): $*"
    VIRTUAL=$(( VIRTUAL + slot + GRACE ))
    RC[$name]=planned
    return 0
  fi
  stamp "$name: up to ${slot}s"
  timeout -s INT -k "$GRACE" "$slot" "$@" >> "$OUT/$log" 2>&1
  RC[$name]=$?
  stamp "$name: exit code ${RC[$name]}"
}

# ---- preflight ---------------------------------------------------------------------------------
stamp "preflight (budget ${BUDGET}s$( ((DRY)) && echo ', dry run'))"
if ! $PY -c "import torch" 2>/dev/null; then stamp "FAILED: $PY cannot import torch"; exit 1; fi
$PY - "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "| gpu:",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible")
for mod in ("triton", "numpy", "pytest", "setuptools", "ninja", "scipy", "hypothesis", "matplotlib", "torchvision"):
    try:
        m = __import__(mod)
        print("  %-12s %s" % (mod, getattr(m, "__version__", "present")))
    except Exception:
        print("  %-12s absent" % mod)
EOF
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None; print('%d.%d' % c if c else '')" 2>/dev/null)
if [ -n "$ARCH" ]; then
  export TORCH_CUDA_ARCH_LIST="$ARCH"  # the visible device's, whatever was inherited
  stamp "architecture: sm_${ARCH/./} (TORCH_CUDA_ARCH_LIST=$ARCH)"
elif (( DRY )); then
  stamp "architecture: no GPU visible (dry run: the build would use the visible device's)"
else
  stamp "FAILED: no CUDA device visible to torch"
  exit 1
fi
CUDA_HOME_FOUND=$($PY -c "import sys; sys.path.insert(0, '$ROOT'); import setup; print(setup.find_cuda_home() or '')" 2>/dev/null)
stamp "CUDA toolkit: ${CUDA_HOME_FOUND:-not found (the build will fail: set CUDA_HOME)}"
if ! command -v ninja >/dev/null 2>&1; then
  NINJA_DIR=$($PY -c "import ninja, os; print(os.path.dirname(ninja.__file__) + '/data/bin')" 2>/dev/null)
  if [ -n "$NINJA_DIR" ] && [ -x "$NINJA_DIR/ninja" ]; then
    export PATH="$NINJA_DIR:$PATH"
  else
    for d in "$($PY -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)" "$HOME/.local/bin"; do
      [ -x "$d/ninja" ] && export PATH="$d:$PATH" && break
    done
  fi
fi
if command -v ninja >/dev/null 2>&1; then
  stamp "ninja: $(command -v ninja) (parallel build, MAX_JOBS=${MAX_JOBS:-$(nproc)})"
  BUILD_CAP=150
else
  stamp "ninja: not found; the sources compile one after another (~4 min)"
  BUILD_CAP=270
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCHFAST_FORCE_CUDA=1

# ---- the steps ------------------------------------------------------------------------------------
# Reserves: what the steps after each one need at least (a partial benchmark is still worth having).
build() {
  $PY -m pip install --no-build-isolation --no-deps --no-index -e . ||
    { echo "pip editable install failed; trying setup.py build_ext --inplace"; $PY setup.py build_ext --inplace; }
}
run_step build "$BUILD_CAP" 200 build.log build
if [ "${RC[build]}" != 0 ] && [ "${RC[build]}" != planned ]; then
  stamp "BUILD FAILED (last lines of build.log):"
  tail -30 "$OUT/build.log" | tee -a "$OUT/summary.txt"
  exit 1
fi
(( DRY )) || $PY -m torchfast.info > "$OUT/info.txt" 2>&1

# One Triton config per kernel while testing (correctness, not tuning): fewer JIT compiles.
export TORCHFAST_TRITON_AUTOTUNE=0
PYTEST=($PY -m pytest -q -ra -p no:cacheprovider --durations=15)
run_step "GPU tests" 140 85 tests-gpu.log "${PYTEST[@]}" tests -k "cuda or triton" --junitxml="$OUT/tests-gpu.xml"

BENCH=($PY benchmarks/run.py --device cuda --quick --out "$OUT")
run_step "bench bn_relu" 60 40 bench.log "${BENCH[@]}" --ops bn_relu
run_step "bench bn_add_relu, clip, init" 35 25 bench.log "${BENCH[@]}" --ops bn_add_relu,clip_grad,init --no-compile
run_step "bench e2e" 30 25 bench.log "${BENCH[@]}" --ops e2e --no-compile
run_step tuning 25 0 tuning.log $PY -m torchfast.tuning --scale 0.5 --reps 5 --save "$OUT/backend_choice.json"
run_step "CPU tests" 600 0 tests-cpu.log "${PYTEST[@]}" tests -k "not cuda and not triton" \
  --junitxml="$OUT/tests-cpu.xml"

# ---- summary ---------------------------------------------------------------------------------------
stamp "summary"
{
  for step in build "GPU tests" "bench bn_relu" "bench bn_add_relu, clip, init" "bench e2e" tuning "CPU tests"; do
    echo "  $step: ${RC[$step]:-not run}"
  done
  for log in tests-gpu tests-cpu; do
    [ -f "$OUT/$log.log" ] && echo "$log: $(grep -Eo '[0-9]+ (passed|failed|skipped|error)[a-z]*' "$OUT/$log.log" | tr '\n' ' ')"
  done
  [ -f "$OUT/tuning.log" ] && grep -A4 "^op " "$OUT/tuning.log"
  (( DRY )) || $PY - "$OUT" <<'EOF'
import csv, glob, sys
rows = []
for path in glob.glob(sys.argv[1] + "/cuda-*.csv"):
    rows += list(csv.DictReader(open(path)))
rows = [r for r in rows if r["impl"].startswith("torchfast")]
print("%-10s %-20s %-18s %-9s %-13s %-16s %8s %9s %6s" % ("op", "case", "shape", "dtype", "layout", "impl",
                                                          "x eager", "x compile", "%copy"))
for r in rows:
    f = lambda k: ("%.2f" % float(r[k])) if r.get(k) not in (None, "", "None") else "-"
    print("%-10s %-20s %-18s %-9s %-13s %-16s %8s %9s %6s" % (r["op"], r["case"][:20], r["shape"][:18], r["dtype"],
          r["layout"], r["impl"], f("vs_eager"), f("vs_compile"), f("pct_copy_bw")))
EOF
} 2>&1 | tee -a "$OUT/summary.txt"
stamp "done"
