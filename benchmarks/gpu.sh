#!/usr/bin/env bash
# The GPU run, in one go (about 8 minutes on one GPU): the device; benchmarks.speed in bf16 at batch
# 64 and 256 for ViLT-B/32, METER-384 and ViT-B/16 (throughput, latency, peak memory); a compiled
# pair (torch.compile, inductor) beside its eager pair; a vision-language LLM geometry
# (benchmarks.vlm, where that module is there); 20 training steps of every recipe (ViLT and METER on
# VQAv2, SNLI-VE, NLVR2 and Flickr30k retrieval, PuMer presets) through accelerate, --mixed-precision
# bf16, on data and random checkpoints generated on the spot (no dataset, no download).
#
#   bash benchmarks/gpu.sh                       # on a CUDA machine; results in $OUT if set, else results/gpu/
#   bash benchmarks/gpu.sh --dry-run             # the same steps on CPU at tiny sizes (tests/test_benchmarks.py)
#   bash benchmarks/gpu.sh --out DIR --skip vlm  # another folder; leave steps out (device speed compile vlm train)
#
# Writes three files to the results folder: gpu.json (the device, each step's status, exit code and
# seconds, and each step's own JSON), gpu.md (the same as tables) and gpu.log (everything printed).
# Each step has its own time limit and a failing step does not stop the others; the exit code is 1
# when any step failed or ran out of time. Needs pumer-patch installed (pip install -e ".[recipes]":
# the recipes' accelerate, lmdb and safetensors; open_clip for METER); a step whose packages are
# missing is skipped and says which. PYTHON picks the interpreter (default python3). bf16 means
# torch.autocast to bfloat16 with fp32 weights, in the benchmarks as in accelerate's mixed precision.
set -u -o pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
OUT_DIR=${OUT:-results/gpu}
SKIP=" "
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) OUT_DIR=$2; shift ;;
        --skip) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do SKIP="$SKIP$1 "; shift; done; continue ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (--dry-run, --out DIR, --skip STEP...)" >&2; exit 2 ;;
    esac
    shift
done
for s in $SKIP; do
    case $s in device|speed|compile|vlm|train) ;; *) echo "gpu.sh: --skip $s: the steps are device speed compile vlm train" >&2; exit 2 ;; esac
done

mkdir -p "$OUT_DIR" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pumer-gpu.XXXXXX") || exit 2  # step outputs; only the three files go to OUT_DIR
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT_DIR/gpu.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
echo "gpu.sh: results in $OUT_DIR, work folder $WORK, dry run: $DRY" | tee -a "$LOG"

if ! "$PY" -c "import importlib.metadata as m; m.distribution('pumer-patch')" 2>>"$LOG"; then  # adapters/ maps in only installed
    echo "gpu.sh: pumer_patch is not installed; installing it (editable, no dependencies)" | tee -a "$LOG"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
        || { echo "gpu.sh: could not install pumer-patch: pip install -e . first" | tee -a "$LOG"; exit 2; }
fi
if [ $DRY = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: torch sees no CUDA device here; run with --dry-run for the CPU path" | tee -a "$LOG"
    exit 2
fi
# the packages that do not import (open_clip also needs ftfy, so importing, not finding, is the test)
MISSING=$("$PY" - timm transformers open_clip accelerate lmdb safetensors <<'EOF'
import importlib, sys
def fails(name):
    try:
        importlib.import_module(name)
    except Exception:
        return True
    return False
print(" ".join(m for m in sys.argv[1:] if fails(m)))
EOF
)
[ -n "$MISSING" ] && echo "gpu.sh: not importable here: $MISSING" | tee -a "$LOG"
missing() {  # those of "$@" that are in MISSING
    local m out=""
    for m in "$@"; do case " $MISSING " in *" $m "*) out="$out $m" ;; esac; done
    echo "${out# }"
}

FAILED=0
record() {  # step status rc seconds note
    printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d, "note": "%s"}\n' "$1" "$2" "$3" "$4" "$5" >>"$WORK/steps.jsonl"
    echo "gpu.sh: step $1: $2 (exit $3, $4 s) $5" | tee -a "$LOG"
}
step() {  # name limit note command...: run under a time limit, output to the log, status recorded
    local name=$1 limit=$2 note=$3
    shift 3
    case $SKIP in *" $name "*) record "$name" skipped 0 0 "left out with --skip"; return ;; esac
    echo "gpu.sh: step $name (at most $limit s): $*" | tee -a "$LOG"
    local start=$SECONDS rc status=ok
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status=failed; fi
    [ $status = ok ] || FAILED=1
    record "$name" "$status" "$rc" $((SECONDS - start)) "$note"
}

# ---- the device ----------------------------------------------------------------------------------
if [ $DRY = 0 ] && command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | tee -a "$LOG"; fi
CPU_FLAG=()
[ $DRY = 1 ] && CPU_FLAG=(--cpu)
step device 60 "" "$PY" -m benchmarks.gpu_report device "$WORK/device.json" "${CPU_FLAG[@]}"

# ---- sizes: the run, or the dry run ---------------------------------------------------------------
MODELS="vilt40 meter384_32 vit_base_patch16_224"
NO_METER=$(missing open_clip)
[ -n "$NO_METER" ] && MODELS="vilt40 vit_base_patch16_224"
SPEED_NOTE=${NO_METER:+without METER: open_clip is not installed}
COMPILE=(--models vit_base_patch16_224 --configs "prune+merge p0.2-r0.2-369" --compile --no-latency)
if [ $DRY = 1 ]; then
    SIZES=(--tiny --device cpu --dtype bf16 --batch-sizes 2 --repeats 1)
    # one reducing row per model: the dry run checks the path, not the rows
    SPEED=(--models $MODELS --configs p0.1-r0.3-t0.2-258 p0.2r0.2t0.2-0246 "prune+merge p0.2-r0.2-369" --no-latency)
    COMPILE+=(--compile-backend eager)  # inductor's C++ builds take minutes on a small CPU
    VLM=(--tiny --batch-sizes 1 --repeats 1 --decode 2)
    TRAIN=(--tiny --cpu --steps 2 --batch 4 --retrieval-batch 2 --workers 0)
    LAUNCH=(--cpu)
    LIMITS=(300 300 300 600)
else
    SIZES=(--device cuda --dtype bf16 --batch-sizes 64 256 --repeats 5)
    SPEED=(--models $MODELS)
    COMPILE+=(--batch-sizes 256)  # after SIZES: one batch size, one compile per config
    VLM=(--batch-sizes 1 8 --repeats 3)
    TRAIN=(--steps 20 --batch 32 --retrieval-batch 4 --workers 8)
    LAUNCH=()
    LIMITS=(90 150 30 170)  # speed compile vlm train: with the device and the setup, within 8 minutes
fi

step speed "${LIMITS[0]}" "$SPEED_NOTE" "$PY" -m benchmarks.speed "${SIZES[@]}" "${SPEED[@]}" --out "$WORK/speed"
step compile "${LIMITS[1]}" "ViT-B/16: unpatched and prune+merge, eager and compiled" \
    "$PY" -m benchmarks.speed "${SIZES[@]}" "${COMPILE[@]}" --out "$WORK/compile"

# ---- a vision-language LLM, where benchmarks.vlm is there -----------------------------------------
if [ ! -f benchmarks/vlm.py ]; then
    record vlm skipped 0 0 "benchmarks.vlm is not in this checkout"
else
    HELP=$("$PY" -m benchmarks.vlm --help 2>/dev/null)
    NOTE=""
    if [ $DRY = 0 ]; then
        case $HELP in *--device*) VLM+=(--device cuda) ;; *) NOTE="on the CPU: benchmarks.vlm takes no --device" ;; esac
        case $HELP in *--dtype*) VLM+=(--dtype bf16) ;; esac
    fi
    step vlm "${LIMITS[2]}" "$NOTE" "$PY" -m benchmarks.vlm "${VLM[@]}" --out "$WORK/vlm"
fi

# ---- training steps of every recipe through accelerate ---------------------------------------------
NO_TRAIN=$(missing accelerate lmdb safetensors open_clip)
if [ -n "$NO_TRAIN" ]; then
    record train skipped 0 0 "not installed: $NO_TRAIN (pip install -e .[recipes])"
else
    step train "${LIMITS[3]}" "" "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
        --mixed_precision bf16 --dynamo_backend no "${LAUNCH[@]}" -m benchmarks.train_steps "${TRAIN[@]}" \
        --mixed-precision bf16 --out "$WORK/train" --work "$WORK/train-work"
fi

"$PY" -m benchmarks.gpu_report merge "$WORK" "$OUT_DIR" || FAILED=1
echo "gpu.sh: wrote $OUT_DIR/gpu.json, gpu.md, gpu.log" | tee -a "$LOG"
exit $FAILED
