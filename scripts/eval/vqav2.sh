#!/bin/bash
# VQAv2 test-dev, as LLaVA's eval_for_vqav2.sh: data-parallel answers, merge, EvalAI upload file.
# Environment (defaults in brackets): MODEL [./results/dynamic-llava-7b], CKPT [dynamic-llava-7b],
# SPLIT [llava_vqav2_mscoco_test-dev2015], EVALDIR [./playground/data/eval/vqav2],
# CHUNKS [one per entry of CUDA_VISIBLE_DEVICES, else 1], DEVICES [every visible GPU, else cpu],
# EXTRA_ARGS [none: more runner flags, e.g. "--batch-size 8 --vision-keep-rate 0.2"].
set -euo pipefail

gpu_list="${CUDA_VISIBLE_DEVICES:-0}"
IFS=',' read -ra GPULIST <<< "$gpu_list"

MODEL="${MODEL:-./results/dynamic-llava-7b}"
CKPT="${CKPT:-dynamic-llava-7b}"
SPLIT="${SPLIT:-llava_vqav2_mscoco_test-dev2015}"
EVALDIR="${EVALDIR:-./playground/data/eval/vqav2}"
CHUNKS="${CHUNKS:-${#GPULIST[@]}}"

python -m dynamic_llava.eval.launch --runner model_vqa_loader --num-chunks "$CHUNKS" \
    ${DEVICES:+--devices "$DEVICES"} \
    --answers-file "$EVALDIR/answers/$SPLIT/$CKPT/merge.jsonl" -- \
    --model-path "$MODEL" \
    --question-file "$EVALDIR/$SPLIT.jsonl" \
    --image-folder "$EVALDIR/test2015" \
    --temperature 0 \
    --conv-mode vicuna_v1 \
    ${EXTRA_ARGS:-}

python -m dynamic_llava.eval.convert_vqav2_for_submission --dir "$EVALDIR" --split "$SPLIT" --ckpt "$CKPT"
