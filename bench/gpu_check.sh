#!/usr/bin/env bash
# The one GPU check: on a GPU machine without network, install bnnops from this checkout, run the
# CUDA test suite, the training-step comparison and the full benchmark, write everything flat into
# OUTDIR, print a summary last.
#
#   bash bench/gpu_check.sh OUTDIR
#
# Steps, in order, each bounded in time so the whole script ends within GPU_CHECK_BUDGET seconds:
#   env.txt       date, nvidia-smi, GPU, python / torch / CUDA / triton versions, commit, pip install log
#   tests.log     python -m pytest $TEST_PATHS $PYTEST_ARGS (plus --timeout if pytest-timeout is installed)
#   train_step.json / .md  python -m bench.train_evidence --gpu-step --profile --channels-last --cuda-graphs: BinaryNet
#                 training step, ours against plain PyTorch (images/s, peak memory) and where each step's
#                 time goes, NCHW then channels_last
#   gemm_sweep.txt with GEMM_SWEEP=1: python -m bench.sweeps.gemm on W1A16 at M = 1, 2, 4, 8, 16, N = K = 8192 (the GEMV and
#                 small-batch configs, CUDA graph replays)
#   bench.log     python -m bench: progress and the final table
#   results.json  the benchmark's rows, rewritten after every shape (a killed run keeps what it measured);
#                 headline shapes of every kernel run first
#   table.md      the README "Performance" markdown of the run
#   speedup.png   the speedup chart (when matplotlib is installed)
# Up to ten files (train_step.log too), no folders. Then `python -m bench --record OUTDIR/results.json` on the development
# machine puts the run under bench/results/.
#
# Environment (all optional):
#   GPU_CHECK_BUDGET  seconds for the whole script (default 450); the benchmark gets what the tests and
#                     the training step leave (the training step never takes the benchmark's last 150 s)
#   TESTS_TIMEOUT     seconds for the test suite (default 200)
#   TEST_PATHS        the test files or folders to run (default "tests", the whole suite), split on spaces
#   PYTEST_ARGS       default "-x -q"
#   QUICK=1           benchmark only the headline shape of every case
#   BENCH_ARGS        more arguments for python -m bench, split on spaces, no inner quotes:
#                     e.g. BENCH_ARGS="--filter gemm|bop" (the script passes it unquoted)
#   SKIP_TESTS=1      benchmark only
#   TRAIN_STEP_TIMEOUT seconds for the training-step comparison and profile (default 150; below 60,
#                     or with under 220 s of the budget left, it is skipped)
#   TRAIN_STEP_COMPILE=1  the training step under torch.compile too (compiles take a minute or two)
#   GEMM_SWEEP=1      the W1A16 config sweep above, after the training step (at most 120 s, never the
#                     benchmark's last 150 s)
#   PYTHON            default python3
set -uo pipefail

out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-450}
tests_timeout=${TESTS_TIMEOUT:-200}
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
say() { echo "[gpu_check $((SECONDS - start)) s] $*"; }

say "environment -> $out/env.txt"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "unknown (no git here)")"
    command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
    $py - <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible to torch")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
EOF
    $py -m pip list 2>/dev/null | grep -iE "^(torch|triton|numpy|pytest|pytest-benchmark|pytest-timeout|matplotlib|setuptools) "
    echo "== pip install --no-deps --no-build-isolation -e ."
    $py -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 5
    $py -c "import bnnops, bnnops.kernels; print('import bnnops: ok', bnnops.__file__)" 2>&1
} >"$out/env.txt" 2>&1
grep -E "^(GPU|torch [0-9]|triton [0-9])|import bnnops" "$out/env.txt"

tests_rc=skipped
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout_opt=""
    $py -c "import pytest_timeout" 2>/dev/null && timeout_opt="--timeout=120"
    say "tests (at most ${tests_timeout} s) -> $out/tests.log"
    # shellcheck disable=SC2086 # TEST_PATHS and PYTEST_ARGS are lists of arguments
    timeout -k 10 "$tests_timeout" $py -m pytest ${TEST_PATHS:-tests} ${PYTEST_ARGS:--x -q} $timeout_opt >"$out/tests.log" 2>&1
    tests_rc=$?
    [ "$tests_rc" = 124 ] && echo "gpu_check: the tests ran past ${tests_timeout} s and were stopped" >>"$out/tests.log"
fi

# At most TRAIN_STEP_TIMEOUT, and never the benchmark's last 150 s (10 s more for timeout's kill
# grace); with under 60 s for it, it is skipped (a BinaryNet step needs its kernels compiled first).
train_step_timeout=${TRAIN_STEP_TIMEOUT:-150}
if [ "$train_step_timeout" -gt $(( $(left) - 160 )) ]; then train_step_timeout=$(( $(left) - 160 )); fi
train_rc="skipped: ${train_step_timeout} s for it (TRAIN_STEP_TIMEOUT, budget left $(left) s) is under 60 s"
rm -f "$out"/train_step.*
if [ "$train_step_timeout" -ge 60 ]; then
    say "training step profile (at most ${train_step_timeout} s) -> $out/train_step.json"
    compile=""
    [ "${TRAIN_STEP_COMPILE:-0}" = 1 ] && compile="--compile"
    timeout -k 10 "$train_step_timeout" $py -m bench.train_evidence --gpu-step --profile --channels-last --cuda-graphs $compile \
        --out "$out/train_step.json" >"$out/train_step.log" 2>&1
    train_rc=$?
fi

# After the training step, at most 120 s and never the benchmark's last 150 s (+ 10 s grace).
rm -f "$out/gemm_sweep.txt"
sweep_rc="not asked (GEMM_SWEEP=1)"
if [ "${GEMM_SWEEP:-0}" = 1 ]; then
    sweep_timeout=$(( $(left) - 160 ))
    if [ "$sweep_timeout" -gt 120 ]; then sweep_timeout=120; fi
    sweep_rc="skipped: ${sweep_timeout} s left for it is under 45 s"
    if [ "$sweep_timeout" -ge 45 ]; then
        say "W1A16 config sweep (at most ${sweep_timeout} s) -> $out/gemm_sweep.txt"
        timeout -k 10 "$sweep_timeout" $py -m bench.sweeps.gemm --case w1a16 --batch 1 2 4 8 16 \
            >"$out/gemm_sweep.txt" 2>&1
        sweep_rc=$?
    fi
fi

# The benchmark stops starting shapes 60 s before its hard limit, so it can still write its table.
bench_limit=$(( $(left) - 15 ))
if [ "$bench_limit" -lt 90 ]; then bench_limit=90; fi
quick=""
[ "${QUICK:-0}" = 1 ] && quick="--quick"
say "benchmark (at most ${bench_limit} s) -> $out/bench.log"
# shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
timeout -k 10 "$bench_limit" $py -m bench --out "$out" --budget $((bench_limit - 60)) $quick ${BENCH_ARGS:-} \
    >"$out/bench.log" 2>&1
bench_rc=$?

echo
echo "================ gpu_check summary ($((SECONDS - start)) s) ================"
grep -E "^(GPU|torch [0-9]|triton [0-9])" "$out/env.txt"
echo "tests (exit $tests_rc): $(tail -n 1 "$out/tests.log" 2>/dev/null)"
grep -E "^(FAILED|ERROR) " "$out/tests.log" 2>/dev/null | head -n 20
echo "training step (exit $train_rc$([ "$train_rc" = 124 ] && echo ', stopped at its time limit: the rows it finished'))"
# The first table of train_step.md: from its header row to the blank line after it.
[ -f "$out/train_step.md" ] && sed -n '3,/^$/p' "$out/train_step.md"
echo "W1A16 sweep (exit $sweep_rc$([ "$sweep_rc" = 124 ] && echo ', stopped at its time limit: the rows it finished'))"
[ -f "$out/gemm_sweep.txt" ] && grep -E "^[* ] w1a16|failed|Error" "$out/gemm_sweep.txt"
echo "benchmark exit $bench_rc$([ "$bench_rc" = 124 ] && echo ' (stopped at its time limit)')"
if [ -f "$out/results.json" ]; then
    $py -c "import json, sys; from bench import report; print(report.text_report(json.load(open(sys.argv[1]))))" \
        "$out/results.json"
else
    tail -n 30 "$out/bench.log"
fi
echo "files: $(cd "$out" && ls | tr '\n' ' ')"
