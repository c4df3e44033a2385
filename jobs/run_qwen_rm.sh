#!/usr/bin/env bash
# The reference trainer's example settings (configs/qwen3_1.7b_rm.yaml: Qwen3-1.7B, 4096 tokens, lr 1e-5, two
# epochs, 64-step accumulation, bf16, gradient checkpointing; DeepSpeed ZeRO-3) as a Ray job on a GPU cluster.
#   RAY_ADDRESS=http://head:8265 TRAIN=s3://bucket/train/ EVAL=s3://bucket/test/ bash jobs/run_qwen_rm.sh [--option value ...]
# SHARED (default /mnt/shared/btrm): a directory every node mounts; the model is exported to
# $SHARED/models/qwen3-1.7b-rm unless OUTPUT says otherwise (a local directory every node reads: a relative
# path would land in the job's unpacked copy of the repository on the head node), tracker files go to
# $SHARED/tracking. STORAGE (default $SHARED/runs): the run's checkpoints, a directory or a cloud URI (s3://...).
# RUN_NAME (default qwen3-1.7b-rm), FORMAT (the data's processor, default standard), REPORT_TO (wandb, swanlab,
# default none), RESUME=true to continue the run RUN_NAME; further options after the script's name.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: what --working-dir . uploads
: "${TRAIN:?set TRAIN to the training pairs (parquet file, directory, glob or cloud URI)}"
: "${EVAL:?set EVAL to the held-out pairs}"
NUM_WORKERS="${NUM_WORKERS:-8}"
SHARED="${SHARED:-/mnt/shared/btrm}"

ray job submit --working-dir . -- python jobs/train.py \
    --config configs/qwen3_1.7b_rm.yaml \
    --train_set_path "$TRAIN" \
    --eval_set_path "$EVAL" \
    --dataset_format "${FORMAT:-standard}" \
    --output_path "${OUTPUT:-$SHARED/models/qwen3-1.7b-rm}" \
    --num_workers "$NUM_WORKERS" \
    --storage_path "${STORAGE:-$SHARED/runs}" \
    --run_name "${RUN_NAME:-qwen3-1.7b-rm}" \
    --resume "${RESUME:-false}" \
    --report_to "${REPORT_TO:-none}" \
    --tracking_dir "$SHARED/tracking" \
    "$@"
