#!/usr/bin/env bash
# A prepared GPU visit (issue 15), two commands back to back on one warm machine:
#
#   OUT=... tools/gpu_session.sh --quick               # command 1, 240 s: env, pytest -m gpu (the
#                                                      #   CUDA smoke test of every variant included),
#                                                      #   the bench at 32x32, digits CUDA vs CPU
#   OUT=... tools/gpu_session.sh --train visit/plan.json   # command 2, 390 s: the bench at 28x28,
#                                                      #   the fastest exact path chosen from it, then
#                                                      #   the plan's runs under one deadline, packed
#   add --dry-run to either: the same steps at toy sizes, anywhere (tests/test_gpu_session.py)
#
# The plan is made HERE, where Snakemake is (msr plan-runs; docs/gpu-visit.md has every command),
# and travels with the tree; the device runs msr from the tree (PYTHONPATH=src, its own python3 and
# torch), never make or pip. Every step has a cap, and the caps add up inside the budget
# (GPU_SESSION_BUDGET_S; checked before anything runs); a step that no longer fits is skipped,
# a failing or timed-out one is recorded and the next one runs.
#
# $OUT receives at most 8 files and no folder (the device returns at most 8 files):
#   summary.md        what was measured, against the goals (msr visit-report summary)
#   steps.tsv         step, status (ok|failed|timeout|skipped|not selected), exit code, seconds, cap
#                     (rewritten after every step: a visit cut short still says how far it got)
#   session.tar.gz    every log, bench table, status.json, the digits runs (no checkpoints)
#   runs-<i>.tar.gz   (--train, at most 4 of at most 14 MiB) the trained runs for `msr import`
# GPU_SESSION_STEPS=env,bench_32,... runs only the steps named. Exit status: 0 if every step
# that ran passed.
set -uo pipefail

usage() { echo "usage: OUT=DIR $0 --quick | --train PLAN  [--dry-run]" >&2; exit 2; }
MODE=; PLAN=; DRY=0
while [ $# -gt 0 ]; do
    case $1 in
        --quick) MODE=quick ;;
        --train) MODE=train; PLAN=${2:-}; [ -n "$PLAN" ] || usage; shift ;;
        --dry-run) DRY=1 ;;
        *) usage ;;
    esac
    shift
done
[ -n "$MODE" ] || usage

cd "$(dirname "$0")/.." || exit 2
if [ "$MODE" = train ] && [ ! -f "$PLAN" ]; then echo "$0: no plan file $PLAN (make it with msr plan-runs)" >&2; exit 2; fi
OUT=${OUT:-/tmp/msr-gpu-$MODE-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python3}
if [ "$MODE" = quick ]; then BUDGET=${GPU_SESSION_BUDGET_S:-240}; else BUDGET=${GPU_SESSION_BUDGET_S:-390}; fi
RESERVE=20  # seconds kept for the summary and the session tarball
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset MSR_PREFORK_SOCKET
mkdir -p "$OUT" || exit 2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
FAILED=0
CPUS=$(nproc 2>/dev/null || echo 2)
printf 'step\tstatus\trc\tseconds\tcap\n' > "$WORK/steps.tsv"
cp "$WORK/steps.tsv" "$OUT/steps.tsv"

# the steps of each mode and their caps in seconds; a step whose cap is "rest" gets what the
# others leave (the training phase)
if [ "$MODE" = quick ]; then
    STEPS=(env gpu_tests bench_32 digits digits_compare); CAPS=(15 85 65 45 5)  # env: importing torch takes ~7 s on a loaded 2-core CPU (the dry-run tests)
else
    STEPS=(env bench_28 choose train pack); CAPS=(15 60 5 rest 20)
fi
FIXED=0
for c in "${CAPS[@]}"; do [ "$c" = rest ] || FIXED=$((FIXED + c)); done
REST=$((BUDGET - RESERVE - FIXED))
if [ "$REST" -lt 0 ] || { [ "$MODE" = train ] && [ "$REST" -lt 60 ]; }; then
    echo "$0: the step caps ($FIXED s + $RESERVE s reserve) do not fit the budget of $BUDGET s" >&2
    exit 2
fi
cap_of() { local i; for i in "${!STEPS[@]}"; do [ "${STEPS[$i]}" = "$1" ] && { [ "${CAPS[$i]}" = rest ] && echo "$REST" || echo "${CAPS[$i]}"; return; }; done; echo 0; }

# step NAME MIN_S CMD...: run CMD with a limit of min(its cap, what the budget has left)
step() {
    local name=$1 min=$2; shift 2
    local cap; cap=$(cap_of "$name")
    if [ -n "${GPU_SESSION_STEPS:-}" ] && [[ ",$GPU_SESSION_STEPS," != *",$name,"* ]]; then
        printf '%s\tnot selected\t-\t0\t%s\n' "$name" "$cap" >> "$WORK/steps.tsv"
        cp "$WORK/steps.tsv" "$OUT/steps.tsv"
        return 0
    fi
    local left=$((BUDGET - (SECONDS - START) - RESERVE))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt "$min" ]; then
        printf '%s\tskipped\t-\t0\t%s\n' "$name" "$cap" >> "$WORK/steps.tsv"
        cp "$WORK/steps.tsv" "$OUT/steps.tsv"
        echo "[gpu_session] $name: skipped (${left}s of budget left, needs ${min}s)"
        return 0
    fi
    echo "[gpu_session] $name: running (limit ${limit}s)"
    local t0=$SECONDS rc status
    export STEP_LIMIT=$limit
    if declare -F "$1" > /dev/null; then  # a function of this script: timeout needs a program
        timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" > "$WORK/$name.log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    fi
    rc=$?
    if [ $rc -eq 0 ]; then status=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; else status=failed; fi
    [ $rc -eq 0 ] || FAILED=1
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$cap" >> "$WORK/steps.tsv"
    cp "$WORK/steps.tsv" "$OUT/steps.tsv"
    echo "[gpu_session] $name: $status (exit $rc, $((SECONDS - t0))s)"
    tail -n 3 "$WORK/$name.log" | sed 's/^/    /'
    return 0
}

if [ $DRY -eq 1 ]; then
    # toy sizes; the bench runs on whatever device there is, the CUDA-only steps still ask for CUDA
    DEV=auto
    BENCH=(--arch resnet8 --batch-size 16 --n-train 64 --steps 2 --warmup 1 --repeats 1)
    K_PROCS=2; K_STACK=2
    DIGITS=(--arch resnet8 --epochs 1 --image-size 8)
    GPU_TESTS=(tests/test_bench.py)
else
    DEV=cuda
    BENCH=(--arch resnet20 --batch-size 128 --steps 10 --warmup 3 --repeats 3)
    K_PROCS=8; K_STACK=5  # 28x28: 8 runs at once; 5 seeds = one cell of the grid
    DIGITS=(--arch resnet20)  # the digits defaults: 10 epochs at 16x16
    # the files with CUDA tests; the smoke test of every variant (test_cuda_graph.py) last, so a
    # cap that cuts it short keeps the other results
    mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py | grep -v test_cuda_graph.py; echo tests/test_cuda_graph.py)
fi
DIGITS_VARIANTS=bn,msr
DIGITS_TOLERANCE=0.03  # |test acc CUDA - CPU| per variant: about 11 of digits' 360 test images

env_info() {
    echo "date: $(date -Is)  host: $(hostname)  mode: $MODE  dry_run: $DRY  budget: ${BUDGET}s"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| cpus", len(os.sched_getaffinity(0)))
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "| cuDNN", torch.backends.cudnn.version(),
          "| capability", torch.cuda.get_device_capability(0))
for mod in ("numpy", "pandas", "sklearn", "yaml", "tqdm", "pytest", "snakemake", "hypothesis", "PIL", "torchvision"):
    try:
        m = __import__(mod)
        print(f"  {mod} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"  {mod}: missing ({type(e).__name__})")
EOF
}

# the same digits runs on CUDA and on the CPU at once (the CPU ones get most cores)
digits_runs() {
    local v pids=() half=$(( (CPUS - 4) / 2 > 1 ? (CPUS - 4) / 2 : 1 ))
    for v in ${DIGITS_VARIANTS//,/ }; do
        "$PY" -m msr train --dataset digits --variant "$v" --seed 0 --device cuda --threads 2 "${DIGITS[@]}" \
            --data-root "$WORK/data" --out "$WORK/digits/cuda/$v" --progress lines > "$WORK/digits_cuda_$v.log" 2>&1 & pids+=($!)
        "$PY" -m msr train --dataset digits --variant "$v" --seed 0 --device cpu --threads "$half" "${DIGITS[@]}" \
            --data-root "$WORK/data" --out "$WORK/digits/cpu/$v" --progress lines > "$WORK/digits_cpu_$v.log" 2>&1 & pids+=($!)
    done
    local rc=0 p
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    tail -n 1 "$WORK"/digits_*.log
    return $rc
}

# the 28x28 table: K processes (eager / graph) and 5 stacked seeds (a cell of the grid)
bench_28() {
    "$PY" -m msr bench --device "$DEV" "${BENCH[@]}" --variant msr_noise --image-shape 1,28,28 --k "$K_PROCS" \
        --methods eager,cuda_graph,processes,processes_graph --json "$WORK/bench_28.json" || return 1
    "$PY" -m msr bench --device "$DEV" "${BENCH[@]}" --variant msr_noise --image-shape 1,28,28 --k "$K_STACK" \
        --methods stacked,stacked_graph --json "$WORK/bench_28_stacked.json"
}

choose() {
    local files=()
    for f in "$WORK"/bench_28*.json; do [ -e "$f" ] && files+=("$f"); done
    [ ${#files[@]} -gt 0 ] || { echo "no bench table: eager, one process"; echo "1 1" > "$WORK/choice.txt"; return 0; }
    "$PY" -m msr visit-report choose "${files[@]}" --out "$WORK/choice.json" > "$WORK/choice.txt"
    cat "$WORK/choice.txt"
}

train_plan() {
    local procs=1 stack=1 extra=
    [ -s "$WORK/choice.txt" ] && read -r procs stack extra < "$WORK/choice.txt"
    local threads=$(( CPUS / procs > 1 ? CPUS / procs : 1 ))
    # stop the runs 25 s before this step's own limit: SIGTERM, the grace, status.json
    local deadline=$(( STEP_LIMIT - 25 > 10 ? STEP_LIMIT - 25 : 10 ))
    echo "run-plan: $procs process(es), stack $stack, extra '$extra', $threads thread(s) each, deadline ${deadline}s"
    "$PY" -m msr run-plan "$PLAN" --procs "$procs" --stack "$stack" --extra "$extra" --threads "$threads" \
        --deadline-s "$deadline" --grace-s 10 --min-start-s 20 --status "$WORK/status.json"
}

export OUT PY DRY BUDGET WORK PLAN MODE CPUS DEV DIGITS_VARIANTS K_PROCS K_STACK
export -f env_info digits_runs bench_28 choose train_plan
export DIGITS_STR="${DIGITS[*]}" BENCH_STR="${BENCH[*]}"
# functions run in a child bash: arrays do not cross, so they are rebuilt there
digits_runs_() { DIGITS=($DIGITS_STR); digits_runs; }
bench_28_() { BENCH=($BENCH_STR); bench_28; }
export -f digits_runs_ bench_28_

if [ "$MODE" = quick ]; then
    step env 3 env_info
    step gpu_tests 20 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider "${GPU_TESTS[@]}" --junitxml="$WORK/gpu_tests.xml"
    step bench_32 20 "$PY" -m msr bench --device "$DEV" "${BENCH[@]}" --variant bn,msr_noise --image-shape 3,32,32 --k "$((K_PROCS / 2))" \
        --methods eager,cuda_graph,processes,processes_graph,stacked,stacked_graph --json "$WORK/bench_32.json"
    step digits 15 digits_runs_
    step digits_compare 2 "$PY" -m msr visit-report compare "$WORK/digits" --variants "$DIGITS_VARIANTS" \
        --tolerance "$DIGITS_TOLERANCE" --out "$WORK/digits_compare.json"
else
    step env 3 env_info
    step bench_28 20 bench_28_
    step choose 2 choose
    step train 60 train_plan
    step pack 5 "$PY" -m msr pack-runs --status "$WORK/status.json" --out "$OUT" --max-files 4 --max-mib 14
fi

# the page, then everything else in one tarball (the digits runs without their checkpoints)
"$PY" -m msr visit-report summary "$WORK" --mode "$MODE" ${PLAN:+--plan "$PLAN"} --out "$OUT/summary.md" \
    || echo "# GPU visit: $MODE (the summary failed; see session.tar.gz)" > "$OUT/summary.md"
tar -czf "$OUT/session.tar.gz" -C "$WORK" --exclude=checkpoint.pt --exclude=data --exclude=.lock . 2>/dev/null
cp "$WORK/steps.tsv" "$OUT/steps.tsv"
echo "[gpu_session] done in $((SECONDS - START))s; $(ls "$OUT" | wc -l) files in $OUT; see $OUT/summary.md"
exit $FAILED
