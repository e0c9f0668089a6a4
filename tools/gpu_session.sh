#!/usr/bin/env bash
# One prepared visit to a GPU machine (issue 10): correctness first, then the speed table.
#
#   OUT=/some/dir tools/gpu_session.sh            # on the GPU machine, from the repo root
#   OUT=/tmp/x tools/gpu_session.sh --dry-run     # anywhere: the same steps at toy sizes
#
# Runs msr from the working tree (PYTHONPATH=src, the machine's own python3/torch; nothing is
# installed). Every step has its own time limit and the whole visit a budget (default 540 s,
# GPU_SESSION_BUDGET_S); a step that no longer fits is recorded as skipped, a failing or
# timed-out step is recorded and the next one runs. Everything lands in $OUT:
#   steps.tsv            step, status (ok|failed|timeout|skipped), exit code, seconds
#   env.txt              GPU, driver, torch/CUDA/cuDNN versions
#   <step>.log           each step's output
#   bench_*.json         `msr bench` tables (written after every row: a cut-short step keeps rows)
#   digits_compare.json  the same short digits run on CUDA and on the CPU, side by side
#   summary.md           all of the above in one page
# Without --dry-run on a machine with no GPU, the CUDA steps fail quickly with their reason and
# the rest still runs. Exit status: 0 if every step that ran passed, 1 otherwise.
# GPU_SESSION_STEPS=env,bench_a,... runs only the steps named (the others: "not selected").
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -gt 0 ]; then echo "usage: OUT=DIR $0 [--dry-run]" >&2; exit 2; fi

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/msr-gpu-session-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python3}
BUDGET=${GPU_SESSION_BUDGET_S:-540}
RESERVE=15  # seconds kept for the summary at the end
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" || exit 2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
FAILED=0
printf 'step\tstatus\trc\tseconds\n' > "$OUT/steps.tsv"

# step NAME CAP_S MIN_S CMD...: run CMD with a limit of min(CAP, what the budget has left)
step() {
    local name=$1 cap=$2 min=$3; shift 3
    if [ -n "${GPU_SESSION_STEPS:-}" ] && [[ ",$GPU_SESSION_STEPS," != *",$name,"* ]]; then
        printf '%s\tnot selected\t-\t0\n' "$name" >> "$OUT/steps.tsv"
        return 0
    fi
    local left=$((BUDGET - (SECONDS - START) - RESERVE))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt "$min" ]; then
        printf '%s\tskipped\t-\t0\n' "$name" >> "$OUT/steps.tsv"
        echo "[gpu_session] $name: skipped (${left}s of budget left, needs ${min}s)"
        return 0
    fi
    echo "[gpu_session] $name: running (limit ${limit}s)"
    local t0=$SECONDS rc status
    if declare -F "$1" > /dev/null; then  # a function of this script: timeout needs a program
        timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" > "$OUT/$name.log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    fi
    rc=$?
    if [ $rc -eq 0 ]; then status=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; else status=failed; fi
    [ $rc -eq 0 ] || FAILED=1
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
    echo "[gpu_session] $name: $status (exit $rc, $((SECONDS - t0))s)"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
    return 0
}

if [ $DRY -eq 1 ]; then
    # toy sizes; the bench runs on whatever device there is, the CUDA-only steps still ask for CUDA
    BENCH_DEV=auto
    BENCH=(--batch-size 16 --n-train 64 --steps 2 --warmup 1 --repeats 1 --k 2)
    ARCH_A=resnet8; ARCH_B=resnet14; VARIANTS=bn,msr_noise
    DIGITS=(--arch resnet8 --epochs 1)
    GPU_TESTS=(tests/test_bench.py tests/test_gpu_slots.py)
    TRAIN_TESTS=(tests/test_train.py -k cuda)
else
    BENCH_DEV=cuda
    BENCH=(--batch-size 128 --steps 50 --warmup 10 --repeats 3 --k 4)
    ARCH_A=resnet20; ARCH_B=resnet56,resnet110; VARIANTS=bn,msr_noise
    DIGITS=(--arch resnet20 --epochs 3)
    mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)  # the files with CUDA tests
    TRAIN_TESTS=(tests/test_train.py)
fi

env_info() {
    echo "date: $(date -Is)  host: $(hostname)  dry_run: $DRY  budget: ${BUDGET}s"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| cpus", len(__import__("os").sched_getaffinity(0)))
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

compare_digits() {
    "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for dev in ("cuda", "cpu"):
    p = out / "digits" / dev / "summary.json"
    rows[dev] = json.loads(p.read_text()) if p.exists() else None
keys = ["status", "final_test_acc", "final_train_acc", "epochs_completed", "train_seconds", "images_per_s", "peak_memory_mb"]
table = {dev: ({k: s.get(k) for k in keys} if s else "no summary (run failed or skipped)") for dev, s in rows.items()}
if rows["cuda"] and rows["cpu"]:
    table["same_status"] = rows["cuda"]["status"] == rows["cpu"]["status"]
    table["test_acc_difference"] = rows["cuda"]["final_test_acc"] - rows["cpu"]["final_test_acc"]
(out / "digits_compare.json").write_text(json.dumps(table, indent=2) + "\n")
print(json.dumps(table, indent=2))
sys.exit(0 if rows["cuda"] and rows["cpu"] and table["same_status"] else 1)
EOF
}

export OUT PY DRY BUDGET
export -f env_info compare_digits
step env 30 5 env_info
step gpu_tests 150 20 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors "${GPU_TESTS[@]}" --junitxml="$OUT/gpu_tests.xml"
step bench_a 150 40 "$PY" -m msr bench --device "$BENCH_DEV" --arch "$ARCH_A" --variant "$VARIANTS" \
    --methods eager,cuda_graph,processes,stacked,stacked_graph "${BENCH[@]}" --json "$OUT/bench_a.json"
step digits_cuda 90 20 "$PY" -m msr train --dataset digits --variant msr --seed 0 --device cuda "${DIGITS[@]}" \
    --data-root "$WORK/data" --out "$OUT/digits/cuda" --progress lines
step digits_cpu 90 20 "$PY" -m msr train --dataset digits --variant msr --seed 0 --device cpu "${DIGITS[@]}" \
    --data-root "$WORK/data" --out "$OUT/digits/cpu" --progress lines
step digits_compare 20 5 compare_digits
step bench_b 180 40 "$PY" -m msr bench --device "$BENCH_DEV" --arch "$ARCH_B" --variant "$VARIANTS" \
    --methods eager,cuda_graph,processes,stacked,stacked_graph "${BENCH[@]}" --json "$OUT/bench_b.json"
step train_tests 120 30 "$PY" -m pytest -q -rs -p no:cacheprovider "${TRAIN_TESTS[@]}" --junitxml="$OUT/train_tests.xml"
step bench_compile 200 60 "$PY" -m msr bench --device "$BENCH_DEV" --arch "$ARCH_A" --variant msr_noise \
    --methods eager,compile,compile_cudagraphs "${BENCH[@]}" --json "$OUT/bench_compile.json"

# one page: the steps and every table measured
{
    echo "# GPU session $(date -Is) (dry run: $DRY)"
    echo; echo '```'; cat "$OUT/env.log" 2>/dev/null; echo '```'
    echo; echo "## Steps"; echo '```'; column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"; echo '```'
    for f in "$OUT"/bench_*.json; do
        [ -e "$f" ] || continue
        echo; echo "## $(basename "$f")"; echo '```'
        "$PY" -c 'import json, sys; from msr.infra.bench import format_table; print(format_table(json.load(open(sys.argv[1]))))' "$f" 2>&1
        echo '```'
    done
    if [ -e "$OUT/digits_compare.json" ]; then echo; echo "## digits, CUDA vs CPU"; echo '```'; cat "$OUT/digits_compare.json"; echo '```'; fi
} > "$OUT/summary.md"
echo "[gpu_session] done in $((SECONDS - START))s; see $OUT/summary.md"
exit $FAILED
