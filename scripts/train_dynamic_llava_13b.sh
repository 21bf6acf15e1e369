#!/bin/bash
# Dynamic-LLaVA-13B sparsification training from LLaVA-1.5-13B (the reference's run/train_dynamic_llava_13b.sh).
# Run from the repository root, on 8 A100-80GB GPUs in the reference:
#   CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 bash scripts/train_dynamic_llava_13b.sh
# On fewer GPUs keep per_device_train_batch_size x gradient_accumulation_steps x GPUs = 64. Extra arguments are
# appended and win, e.g. on 4 GPUs: bash scripts/train_dynamic_llava_13b.sh --gradient_accumulation_steps 2
# Paths: override the environment variables below.
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-./checkpoints/llava-v1.5-13b}                 # liuhaotian/llava-v1.5-13b
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}      # instruction-following data
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}                        # coco, gqa, ocr_vqa, textvqa, vg
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
OUTPUT_DIR=${OUTPUT_DIR:-./results/dynamic-llava-13b}

deepspeed --module dynamic_llava.train.train_sparse \
    --deepspeed ./scripts/zero3.json \
    --model_name_or_path "$MODEL_PATH" \
    --version v1 \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --vision_tower "$VISION_TOWER" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length False \
    --requires_image True \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1.0 \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 40000 \
    --save_total_limit 1 \
    --learning_rate 5e-6 \
    --weight_decay 0. \
    --predictor_lr 2e-4 \
    --predictor_weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to wandb \
    --mask_loss_weight 100.0 \
    --gumbel_start_tau 1.0 \
    --gumbel_end_tau 0.1 \
    --use_vision_predictor True \
    --use_text_predictor True \
    --use_output_text_predictor True \
    --use_instruct_predictor False \
    --vision_keep_rate 0.2 \
    --output_text_keep_rate 0.5 \
    --output_text_len_for_training 50 \
    "$@"
