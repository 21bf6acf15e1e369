#!/usr/bin/env bash
# The GPU checks in one run (issue 21): versions, `pytest -m gpu` (tests/test_gpu.py and the compiled
# FlexAttention masked softmax), then the benchmarks on cuda: the training step at 7B layer shapes (dense vs
# masked vs flex-masked) first, as the newest, then prefill and decode; each step under its own timeout
# and within a total budget (GPU_CHECK_BUDGET_S, default 540 s);
# a failed step does not stop the later ones. Everything goes to OUT_DIR/log.txt, one line per step to
# OUT_DIR/summary.txt, the benchmarks' JSON to OUT_DIR/*.json.
#
#   bash scripts/gpu_check.sh OUT_DIR
#
# Exit status: 0 if every step passed, 1 if one failed or was skipped for lack of time, 3 without CUDA.
set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.txt
: > "$LOG"
: > "$SUMMARY"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
START=$SECONDS
FAILED=0
export PYTHONUNBUFFERED=1
# the console script, or the same command through PYTHON where its bin folder is not on PATH
if command -v dynamic-llava > /dev/null 2>&1; then DL=(dynamic-llava); else DL=("$PYTHON" -m dynamic_llava.cli); fi

say() {
    echo "$*" | tee -a "$LOG"
}

# step NAME TIMEOUT_S COMMAND...: runs COMMAND under min(TIMEOUT_S, what is left of the budget), logs it
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        say "== $name: skipped, ${left} s of the budget left"
        echo "$name skipped (budget)" >> "$SUMMARY"
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "== $name (timeout ${limit} s, $(date -u +%H:%M:%S) UTC): $*"
    local began=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - began))
    if [ "$rc" -eq 0 ]; then
        echo "$name ok ${took}s" >> "$SUMMARY"
    else
        [ "$rc" -eq 124 ] && say "== $name: timed out after ${limit} s"
        echo "$name FAILED rc=$rc ${took}s" >> "$SUMMARY"
        FAILED=1
    fi
    say "== $name: rc=$rc, ${took} s"
}

say "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), budget ${BUDGET} s"
if ! command -v nvidia-smi > /dev/null 2>&1; then
    say "no CUDA: nvidia-smi is not on PATH; nothing run"
    echo "cuda absent (no nvidia-smi)" >> "$SUMMARY"
    exit 3
fi
step nvidia-smi 30 nvidia-smi
step versions 60 "$PYTHON" -c "import sys, torch, transformers
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| cuDNN', torch.backends.cudnn.version(), '| transformers', transformers.__version__)
print('cuda available:', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device:', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
    print('flash / mem-efficient SDPA enabled:', torch.backends.cuda.flash_sdp_enabled(),
          torch.backends.cuda.mem_efficient_sdp_enabled())"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >> "$LOG" 2>&1; then
    say "no CUDA: torch.cuda.is_available() is False (torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)); nothing more run"
    echo "cuda absent (torch)" >> "$SUMMARY"
    exit 3
fi

step install 90 "$PYTHON" -m pip install --no-deps -e .
step pytest-gpu 220 "$PYTHON" -m pytest -m gpu -v -p no:cacheprovider -rs tests/test_gpu.py \
    tests/test_flex_masked_attention.py tests/test_attention_kernels.py
# 8 of 7B's layers (6 masked), batch 8 with gradient checkpointing as scripts/train_dynamic_llava_7b.sh;
# the warm-up step compiles flex-masked's kernels
step train-7b 180 "${DL[@]}" bench train --shape llava-1.5-7b --layers 8 --batch-size 8 --gradient-checkpointing \
    --modes dense,masked,flex-masked --dtype bf16 --device cuda --repeats 5 --json "$OUT/train_7b.json"
step prefill-7b-bs1 75 "${DL[@]}" bench prefill --shape llava-1.5-7b --dtype bfloat16 --device cuda \
    --batch-size 1 --repeats 5 --json "$OUT/prefill_bs1.json"
step prefill-7b-bs8 75 "${DL[@]}" bench prefill --shape llava-1.5-7b --dtype bfloat16 --device cuda \
    --batch-size 8 --repeats 3 --json "$OUT/prefill_bs8.json"
step decode-7b-bs1 100 "${DL[@]}" bench decode --shape llava-1.5-7b --dtype bfloat16 --device cuda \
    --batch-size 1 --lengths 1024,2048,4096 --check-length 64 --no-cache-lengths "" --json "$OUT/decode_bs1.json"

say "== summary (${SECONDS}s in all)"
tee -a "$LOG" < "$SUMMARY"
exit "$FAILED"
