#!/bin/bash
# LLaVA-1.5 stage 2 with LoRA (LLaVA's scripts/v1_5/finetune_lora.sh). Run from the repository root:
#   bash scripts/v1_5/finetune_lora.sh
# then merge into a full checkpoint:
#   python -m dynamic_llava.tools.merge_lora_weights --model-path ./checkpoints/llava-v1.5-13b-lora \
#       --model-base lmsys/vicuna-13b-v1.5 --save-model-path ./checkpoints/llava-v1.5-13b-lora-merged
# On fewer GPUs keep per_device_train_batch_size x gradient_accumulation_steps x GPUs = 128. Extra arguments
# are appended and win.
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-lmsys/vicuna-13b-v1.5}
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
PROJECTOR=${PROJECTOR:-./checkpoints/llava-v1.5-13b-pretrain/mm_projector.bin}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-13b-lora}

deepspeed --module dynamic_llava.train.train_mem \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed ./scripts/zero3.json \
    --model_name_or_path "$MODEL_PATH" \
    --version v1 \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --vision_tower "$VISION_TOWER" \
    --pretrain_mm_mlp_adapter "$PROJECTOR" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-4 \
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
