#!/bin/bash
# LLaVA-1.5 stage 1: feature-alignment pre-training of the projector only (LLaVA's scripts/v1_5/pretrain.sh).
# Run from the repository root (8 A100-80GB GPUs in LLaVA): bash scripts/v1_5/pretrain.sh
# On fewer GPUs keep per_device_train_batch_size x gradient_accumulation_steps x GPUs = 256. Extra arguments
# are appended and win. The output folder gets mm_projector.bin, the input of stage 2.
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-lmsys/vicuna-13b-v1.5}
DATA_PATH=${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-13b-pretrain}

deepspeed --module dynamic_llava.train.train_mem \
    --deepspeed ./scripts/zero2.json \
    --model_name_or_path "$MODEL_PATH" \
    --version plain \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --vision_tower "$VISION_TOWER" \
    --mm_projector_type mlp2x_gelu \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 32 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 24000 \
    --save_total_limit 1 \
    --learning_rate 1e-3 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to wandb \
    "$@"
