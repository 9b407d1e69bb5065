#!/usr/bin/env bash
# The GPU check: the CUDA tests (tests/test_gpu.py, marked cuda) and every benchmark table with
# --device cuda at --quick sizes, in under 5 minutes on one GPU. Installs nothing; what needs a package
# that is missing is skipped with the reason. Writes one summary, $OUT/gpu_summary.md when OUT is set,
# else benchmarks/gpu_summary.md, with the whole log beside it (gpu_check.log); exits 1 if a check failed.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --device cpu    # the CPU side: the CUDA tests skip, benchmarks on CPU
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -u -o pipefail

DEVICE=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="${2:?--device needs cpu or cuda}"; shift 2 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (use --device cpu|cuda)" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in cpu|cuda) ;; *) echo "gpu_check.sh: --device must be cpu or cuda, got '$DEVICE'" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-$ROOT/benchmarks}"
mkdir -p "$OUTDIR"
SUMMARY="$OUTDIR/gpu_summary.md"
LOG="$OUTDIR/gpu_check.log"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled WANDB_SILENT=true PYTHONUNBUFFERED=1
# Seconds for the whole script and per step (each gets at most what is left). The CPU side only checks
# the script itself, on whatever cores there are: it gets 4x the time.
SCALE=$([ "$DEVICE" = cpu ] && echo 4 || echo 1)
BUDGET=$((285 * SCALE))
START=$SECONDS
: >"$LOG"
ROWS=""
TABLES=""
FAILED=0

row() { ROWS+="| $1 | $2 | $3 | $4 |"$'\n'; echo "[gpu_check] $1: $2 ($3 s) $4" | tee -a "$LOG"; }

# step NAME LIMIT CMD...: runs CMD with a timeout (at most what is left of the budget); its output goes
# to the log and to $STEP_OUT, its exit status to $STEP_RC. Returns 1, with a FAIL row, when no time is left.
step() {
    local name="$1" limit="$2"; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    [ "$left" -lt "$limit" ] && limit="$left"
    if [ "$limit" -lt 5 ]; then
        row "$name" FAIL 0 "not run: the ${BUDGET} s budget is spent"; FAILED=1; return 1
    fi
    STEP_OUT="$(mktemp)"
    echo "[gpu_check] \$ $*" >>"$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$STEP_OUT" 2>&1
    STEP_RC=$?
    STEP_SECONDS=$((SECONDS - t0))
    cat "$STEP_OUT" >>"$LOG"
    if [ "$STEP_RC" -eq 124 ] || [ "$STEP_RC" -eq 137 ]; then echo "[gpu_check] timed out after ${limit} s" >>"$STEP_OUT"; fi
    return 0
}

# missing_module FILE: the module a failed run could not import, if that is why it failed.
missing_module() { grep -oE "ModuleNotFoundError: No module named '[^']+'" "$1" | tail -1 | sed -E "s/.*'([^']+)'/\1/"; }

# ------------------------------------------------------------------------------------ environment
ENV_INFO="$("$PY" - <<'EOF' 2>&1
import importlib.util, platform, sys
import torch
print(f"- python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, CUDA build {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible")
else:
    print("- GPU: none visible (torch.cuda.is_available() is False)")
def have(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except Exception:  # a broken install counts as missing
        return False
names = ["captum", "numba", "scipy", "sklearn", "matplotlib", "lightning", "torchmetrics", "timm", "pytest", "hypothesis", "wandb"]
print("- installed: " + ", ".join(n for n in names if have(n)))
print("- missing: " + (", ".join(n for n in names if not have(n)) or "none"))
EOF
)"
ENV_RC=$?
echo "$ENV_INFO" | tee -a "$LOG"
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
READY=1
if [ "$ENV_RC" -ne 0 ]; then
    row environment FAIL 0 "the environment probe failed under $PY (is torch installed? see the log)"; FAILED=1; READY=0
elif [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    row environment FAIL 0 "--device cuda but CUDA is not available"; FAILED=1; READY=0
fi

# ------------------------------------------------------------------------------------ CUDA tests
if [ "$READY" -eq 1 ]; then
    if ! "$PY" -c "import pytest" 2>/dev/null; then
        row "CUDA tests" SKIP 0 "pytest is not installed"
    # -p no:cacheprovider: nothing written into the checkout; -rsfE lists every skip with its reason
    elif step "CUDA tests" $((150 * SCALE)) "$PY" -m pytest tests/test_gpu.py -m cuda -q -rsfE -p no:cacheprovider; then
        counts="$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)" "$STEP_OUT" | tail -1 | sed -E 's/=//g; s/^ +| +$//g')"
        if [ "$STEP_RC" -eq 0 ]; then
            row "CUDA tests" PASS "$STEP_SECONDS" "${counts:-no count line}"
        else
            row "CUDA tests" FAIL "$STEP_SECONDS" "exit $STEP_RC; ${counts:-see the log}"; FAILED=1
        fi
        TABLES+=$'\n'"### tests/test_gpu.py (device $DEVICE)"$'\n\n```\n'"$(grep -E "^(SKIPPED|FAILED|ERROR|E  )|passed|failed|skipped|timed out" "$STEP_OUT" | tail -60)"$'\n```\n'
        rm -f "$STEP_OUT"
    fi
fi

# ------------------------------------------------------------------------------------ benchmarks
# Every script of benchmarks/ that takes --device, at its --quick sizes; synthetic_speed.py measures
# CPU data generation only and has no device.
BENCHMARKS="train_step.py push.py last_layer.py prototree.py metrics.py dissect.py icnn_vs_plain.py"
if [ "$READY" -eq 1 ]; then
    for script in $BENCHMARKS; do
        step "$script" $((60 * SCALE)) "$PY" "benchmarks/$script" --quick --device "$DEVICE" || continue
        missing="$(missing_module "$STEP_OUT")"
        if [ "$STEP_RC" -eq 0 ]; then
            row "$script" PASS "$STEP_SECONDS" "table below"
        elif [ -n "$missing" ]; then
            row "$script" SKIP "$STEP_SECONDS" "needs $missing, which is not installed"
        else
            row "$script" FAIL "$STEP_SECONDS" "exit $STEP_RC: $(tail -1 "$STEP_OUT" | tr '|' '/' | cut -c1-160)"; FAILED=1
        fi
        TABLES+=$'\n'"### benchmarks/$script --quick --device $DEVICE"$'\n\n```\n'"$(grep -v -E "^\[rank|Warning|warnings.warn|^ *$|^(GPU|TPU) available|Tip: |LeafSpec|Trainer.fit. stopped" "$STEP_OUT" | tail -40)"$'\n```\n'
        rm -f "$STEP_OUT"
    done
fi

# ------------------------------------------------------------------------------------ summary
VERDICT=$([ "$FAILED" -eq 0 ] && echo "every check passed or was skipped with its reason" || echo "FAILED")
{
    echo "# GPU check ($DEVICE): $VERDICT"
    echo
    echo "Commit $COMMIT, $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - START)) s in all (budget ${BUDGET} s); made by benchmarks/gpu_check.sh."
    echo
    echo "$ENV_INFO"
    echo
    echo "| check | result | seconds | note |"
    echo "|---|---|---|---|"
    printf '%s' "$ROWS"
    printf '%s' "$TABLES"
} >"$SUMMARY"
echo "[gpu_check] summary: $SUMMARY ($VERDICT); log: $LOG"
exit "$FAILED"
