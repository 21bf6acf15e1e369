#!/bin/bash
# GQA testdev-balanced, as LLaVA's eval_for_gqa.sh: data-parallel answers, merge, predictions, accuracy.
# Environment (defaults in brackets): MODEL [./results/dynamic-llava-7b], CKPT [dynamic-llava-7b],
# SPLIT [llava_gqa_testdev_balanced], EVALDIR [./playground/data/eval/gqa],
# GQADIR [$EVALDIR/data: images/ and testdev_balanced_questions.json],
# CHUNKS [one per entry of CUDA_VISIBLE_DEVICES, else 1], DEVICES [every visible GPU, else cpu],
# EXTRA_ARGS [none: more runner flags, e.g. "--batch-size 8 --vision-keep-rate 0.2"].
set -euo pipefail

gpu_list="${CUDA_VISIBLE_DEVICES:-0}"
IFS=',' read -ra GPULIST <<< "$gpu_list"

MODEL="${MODEL:-./results/dynamic-llava-7b}"
CKPT="${CKPT:-dynamic-llava-7b}"
SPLIT="${SPLIT:-llava_gqa_testdev_balanced}"
EVALDIR="${EVALDIR:-./playground/data/eval/gqa}"
GQADIR="${GQADIR:-$EVALDIR/data}"
CHUNKS="${CHUNKS:-${#GPULIST[@]}}"

output_file="$EVALDIR/answers/$SPLIT/$CKPT/merge.jsonl"

python -m dynamic_llava.eval.launch --runner model_vqa_loader --num-chunks "$CHUNKS" \
    ${DEVICES:+--devices "$DEVICES"} \
    --answers-file "$output_file" -- \
    --model-path "$MODEL" \
    --question-file "$EVALDIR/$SPLIT.jsonl" \
    --image-folder "$GQADIR/images" \
    --temperature 0 \
    --conv-mode vicuna_v1 \
    ${EXTRA_ARGS:-}

python -m dynamic_llava.eval.convert_gqa_for_eval --src "$output_file" \
    --dst "$GQADIR/testdev_balanced_predictions.json"

python -m dynamic_llava.eval.eval_gqa --tier testdev_balanced \
    --questions "$GQADIR/testdev_balanced_questions.json" \
    --predictions "$GQADIR/testdev_balanced_predictions.json"
