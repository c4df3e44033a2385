#!/usr/bin/env bash
# The reference trainer's example settings (Qwen3-1.7B, 4096 tokens, lr 2e-6, 64-step accumulation,
# bf16, gradient checkpointing, DeepSpeed ZeRO-3) as a Ray job on a GPU cluster.
#   RAY_ADDRESS=http://head:8265 TRAIN=s3://bucket/train/ EVAL=s3://bucket/test/ bash jobs/run_qwen_rm.sh
set -euo pipefail
: "${TRAIN:?set TRAIN to the training pairs (parquet file, directory, glob or cloud URI)}"
: "${EVAL:?set EVAL to the held-out pairs}"
NUM_WORKERS="${NUM_WORKERS:-8}"
STORAGE="${STORAGE:-/mnt/shared/btrm-runs}"

ray job submit --working-dir . -- python jobs/train.py \
    --model_name Qwen/Qwen3-1.7B \
    --train_set_path "$TRAIN" \
    --eval_set_path "$EVAL" \
    --dataset_format "${FORMAT:-standard}" \
    --output_path "${OUTPUT:-./outputs/qwen3-1.7b-rm}" \
    --max_length 4096 \
    --learning_rate 2e-6 \
    --num_train_epochs 1 \
    --bf16 true \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 64 \
    --gradient_checkpointing true \
    --deepspeed zero3 \
    --num_workers "$NUM_WORKERS" \
    --use_gpu true \
    --logging_steps 1 \
    --eval_steps 50 \
    --save_steps 50 \
    --storage_path "$STORAGE" \
    --run_name "${RUN_NAME:-qwen3-1.7b-rm}" \
    --report_to "${REPORT_TO:-none}"
