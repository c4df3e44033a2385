#!/usr/bin/env bash
# The reference trainer's example settings (configs/qwen3_1.7b_rm.yaml: Qwen3-1.7B, 4096 tokens, lr 2e-6,
# 64-step accumulation, bf16, gradient checkpointing, DeepSpeed ZeRO-3) as a Ray job on a GPU cluster.
#   RAY_ADDRESS=http://head:8265 TRAIN=s3://bucket/train/ EVAL=s3://bucket/test/ bash jobs/run_qwen_rm.sh
# STORAGE (default /mnt/shared/btrm-runs): storage every node reads; the model is exported to
# $STORAGE/models/qwen3-1.7b-rm unless OUTPUT says otherwise (a relative path would land in the job's
# unpacked copy of the repository on the head node).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: what --working-dir . uploads
: "${TRAIN:?set TRAIN to the training pairs (parquet file, directory, glob or cloud URI)}"
: "${EVAL:?set EVAL to the held-out pairs}"
NUM_WORKERS="${NUM_WORKERS:-8}"
STORAGE="${STORAGE:-/mnt/shared/btrm-runs}"

ray job submit --working-dir . -- python jobs/train.py \
    --config configs/qwen3_1.7b_rm.yaml \
    --train_set_path "$TRAIN" \
    --eval_set_path "$EVAL" \
    --dataset_format "${FORMAT:-standard}" \
    --output_path "${OUTPUT:-$STORAGE/models/qwen3-1.7b-rm}" \
    --num_workers "$NUM_WORKERS" \
    --storage_path "$STORAGE" \
    --run_name "${RUN_NAME:-qwen3-1.7b-rm}" \
    --report_to "${REPORT_TO:-none}" \
    --tracking_dir "$STORAGE/tracking"
