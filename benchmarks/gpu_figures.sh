#!/bin/bash
# The README's GPU figures on one GPU, stage by stage, each bounded in time and logged into OUTDIR:
#
#   bash benchmarks/gpu_figures.sh OUTDIR [STAGE ...]
#
# Stages (default: preflight train-btrm train-trl serve-1):
#   preflight    a few seconds: the GPU, the imports and their versions, the tokenizer files (before minutes are spent)
#   train-btrm   btrm's training step, packed: 4 pairs per micro-batch, and 65,536-token micro-batches (synthetic)
#   train-btrm-eager   the same with no compiled layers (packing alone; FlexAttention is still compiled, by
#                transformers, at the first step and again at a new row length: the warm-up pass absorbs it)
#   train-trl    TRL's RewardTrainer at its own 4 pairs per micro-batch (synthetic)
#   train-real   both on real pairs (the Qwen3 tokenizer, hh-rlhf and RM-Bench from BTRM_TEST_DATA or ../shared/data)
#   serve-1      the service's load benchmark, one replica on the GPU
#   serve-4      the same, four model replicas sharing the GPU (each launching kernels on its own core)
#   exactness    tests/test_packing.py's GPU test (bf16 FlexAttention against float32)
# The first btrm stage compiles the decoder layers (minutes; the second pass it reports is warm); btrm's
# stages log each recompilation (TORCH_LOGS=recompiles) and why.
# Exits non-zero if any stage failed or ran out of time. PYTHON picks the interpreter (default python3).
# Each stage writes its rows as it finishes them (a stage cut off by its limit keeps those). At its limit a
# benchmark prints every thread's stack into its log (SIGUSR1), and is killed 20 s later; a failed serving
# stage leaves Ray's logs in OUTDIR/ray-logs-STAGE.tgz (its replicas log there, not to the stage's log). The stage limits
# of one call must fit the device's 10 minutes a command: on a GPU session of 15 minutes (start-up included),
# `preflight train-btrm train-trl` (at most 520 s) in one call, then `serve-1` (its model built first: at most
# 410 s) in a second on the same card, if time is left.
set -u
out=${1:?usage: bash benchmarks/gpu_figures.sh OUTDIR [STAGE ...]}
shift
stages=${*:-preflight train-btrm train-trl serve-1}
for name in $stages; do  # all checked before any runs
  case $name in
    preflight|train-btrm|train-btrm-eager|train-trl|train-real|serve-1|serve-4|exactness) ;;
    *) echo "unknown stage $name" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
data=${BTRM_TEST_DATA:-$(dirname "$0")/../../shared/data}
export BTRM_TEST_DATA=$(cd "$data" 2>/dev/null && pwd || echo "$data")  # the exactness test reads it too
data=$BTRM_TEST_DATA
cd "$(dirname "$0")/.."  # the repository root: the scripts and tests below are named from there
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # btrm from this checkout (it is not installed there)
model=${BTRM_SERVE_MODEL:-/tmp/btrm-random-qwen3-1.7b}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
worst=0

stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output into OUTDIR/NAME.log
  local name=$1 seconds=$2 rc
  shift 2
  echo "=== $(( $(date +%s) - start )) s: $name (at most $seconds s)"
  timeout -s USR1 -k 20 "$seconds" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "=== $name: exit $rc$( { [ $rc = 124 ] || [ $rc = 137 ]; } && echo ', out of time')"
  grep -vE "^\(|^\[|^INFO|^[0-9]{4}-|raylet|[Ww]arning" "$out/$name.log" | tail -20
  [ $rc = 0 ] || worst=$rc
  return $rc
}

ray_logs() {  # what the replicas of a failed serving stage logged
  tar czf "$out/ray-logs-$1.tgz" -C /tmp/ray/session_latest logs 2>/dev/null || true
}

serve_model() {  # the serving stages' model, built once
  [ -f "$model/btrm.json" ] && return 0
  timeout -k 10 240 "$python" benchmarks/random_reward_model.py --tokenizer "$data/tokenizers/qwen3" --shape full \
    --output "$model" > "$out/serve-model.log" 2>&1 && return 0
  echo "=== building the serving model failed (see $out/serve-model.log)"
  worst=1
  return 1
}

throughput=("$python" benchmarks/train_throughput.py --mode full --data_dir "$data")
# Two HTTP replicas: one tokenizes and handles ~100 requests/s on a CPU core, about the 8x target's rate.
load=("$python" benchmarks/serve_load.py --model_path "$model" --seconds 12 --warmup 4 --replica_cpus 2 --api_replicas 2)
preflight=$(cat <<'PY'
import importlib.metadata as m, os, sys, torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(), "torch", torch.__version__, "python", sys.version.split()[0])
for package in ("ray", "deepspeed", "fastapi", "transformers", "trl", "datasets", "httpx", "pyarrow", "fsspec"):
    __import__(package)
    print(package, m.version(package))
try:  # transformers' and TRL's trainers import peft wherever it is installed (the CPU tests run without it)
    print("peft", m.version("peft"))
except m.PackageNotFoundError:
    print("peft: not installed")
import btrm.train_loop, btrm.serving  # noqa: E401 - btrm and what it imports, from this checkout
import transformers.trainer  # noqa: E401 - the trainers' lazy imports, loaded now rather than after btrm's stage
from trl import RewardConfig, RewardTrainer  # noqa: F401
tokenizer = os.path.join(os.environ["BTRM_TEST_DATA"], "tokenizers", "qwen3")
assert os.path.isfile(os.path.join(tokenizer, "vocab.json")), f"no Qwen3 tokenizer in {tokenizer}"
print("tokenizer", tokenizer)
PY
)
for name in $stages; do
  case $name in
    # A failed preflight (no GPU, a missing package, no tokenizer) ends the run: every stage would fail as it did,
    # on device time. Out of time (cold imports on a fresh machine), the stages go on.
    preflight) stage "$name" 60 "$python" -c "$preflight" || { rc=$?; [ $rc = 124 ] || [ $rc = 137 ] || {
                 echo "=== preflight failed: no other stage runs"; exit $rc; }; } ;;
    train-btrm) TORCH_LOGS=recompiles stage "$name" 330 "${throughput[@]}" --data synthetic --systems btrm \
                  --btrm_micro_batches 4 --btrm_max_tokens 65536 --json "$out/$name.json" ;;
    train-btrm-eager) TORCH_LOGS=recompiles stage "$name" 200 "${throughput[@]}" --data synthetic --systems btrm \
                        --btrm_micro_batches 4 --btrm_max_tokens 65536 --btrm_compile_layers false --json "$out/$name.json" ;;
    train-trl) stage "$name" 130 "${throughput[@]}" --data synthetic --systems trl --trl_micro_batches 4 \
                 --json "$out/$name.json" ;;
    train-real) stage "$name" 400 "${throughput[@]}" --data real --trl_micro_batches 4 --btrm_micro_batches 4 \
                  --btrm_max_tokens 65536 --json "$out/$name.json" ;;
    serve-1) serve_model && { stage "$name" 170 "${load[@]}" || ray_logs "$name"; } ;;
    serve-4) serve_model && { stage "$name" 120 "${load[@]}" --num_replicas 4 --replica_gpus 0.25 || ray_logs "$name"; } ;;
    exactness) stage "$name" 150 "$python" -m pytest -q -p no:cacheprovider tests/test_packing.py -k gpu ;;
  esac
done
# btrm's and TRL's stages write apart: their ratios (the issue's targets), where this call ran both.
if [ -f "$out/train-trl.json" ] && ls "$out"/train-btrm*.json > /dev/null 2>&1; then
  "$python" benchmarks/train_throughput.py --compare "$out"/train-btrm*.json "$out/train-trl.json" \
    > "$out/comparison.txt" 2>&1
  cat "$out/comparison.txt"
fi
echo "=== $(( $(date +%s) - start )) s: done"
exit $worst
