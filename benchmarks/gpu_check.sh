#!/usr/bin/env bash
# One-command GPU check, for a machine with an NVIDIA GPU and NO network:
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default ./gpu-results)
# 1. builds torchfast against the torch already installed (no build isolation, no downloads),
#    for the architecture of the visible GPU;
# 2. runs the whole test suite, CUDA tests included;
# 3. runs the quick GPU benchmarks (every backend vs stock eager and torch.compile);
# 4. measures which GPU backend (cuda or triton) is faster per op (torchfast.tuning), saved as
#    OUT_DIR/backend_choice.json for TORCHFAST_BACKEND_CHOICE;
# 5. prints a short summary table last.
# Budget: under 8 minutes on one H100/H200, build included. Full logs and CSV go to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-./gpu-results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }

stamp "environment" | tee "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/summary.txt"

stamp "build"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCHFAST_FORCE_CUDA=1
if ! $PY -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
  stamp "pip editable install failed (see build.log); trying setup.py build_ext --inplace"
  $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { stamp "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
fi
$PY -m torchfast.info 2>&1 | tee "$OUT/info.txt"

stamp "tests"
# One Triton config per kernel while testing (correctness, not tuning): fewer JIT compiles.
TORCHFAST_TRITON_AUTOTUNE=0 timeout -k 20 200 $PY -m pytest tests -q -ra -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
test_rc=$?
tail -25 "$OUT/tests.log"

stamp "benchmarks"
# A run stopped by `timeout` (SIGTERM) still writes the rows it measured.
# BatchNorm+ReLU against stock eager and torch.compile; the multi-tensor ops against eager only
# (compiling stock clipping over ~150 gradients takes longer than the whole budget allows).
timeout -k 20 140 $PY benchmarks/run.py --device cuda --quick --ops bn_relu,bn_add_relu --out "$OUT" > "$OUT/bench.log" 2>&1
bench_rc=$?
timeout -k 20 40 $PY benchmarks/run.py --device cuda --quick --ops clip_grad,init --no-compile --out "$OUT" \
  >> "$OUT/bench.log" 2>&1
bench_rc=$(( bench_rc | $? ))
# torchvision resnet50/resnet18 fused by torchfast.nn.fuse vs stock, bf16 autocast, channels_last
# (skipped with a message when torchvision is not installed).
timeout -k 20 40 $PY benchmarks/run.py --device cuda --quick --ops e2e --no-compile --out "$OUT" >> "$OUT/bench.log" 2>&1
bench_rc=$(( bench_rc | $? ))
tail -5 "$OUT/bench.log"

stamp "backend choice"
timeout -k 20 60 $PY -m torchfast.tuning --scale 0.5 --reps 5 --save "$OUT/backend_choice.json" > "$OUT/tuning.log" 2>&1
tune_rc=$?
tail -6 "$OUT/tuning.log"

stamp "summary"
{
  echo "backend choice: exit code $tune_rc"
  grep -A4 "^op " "$OUT/tuning.log"
  echo "tests: exit code $test_rc ($(grep -Eo '[0-9]+ (passed|failed|skipped|error)[a-z]*' "$OUT/tests.log" | tr '\n' ' '))"
  echo "benchmarks: exit code $bench_rc"
  $PY - "$OUT" <<'EOF'
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
