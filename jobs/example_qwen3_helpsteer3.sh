#!/usr/bin/env bash
# Qwen3-1.7B reward model on HelpSteer3, end to end on a running Ray GPU cluster: train (the reference
# trainer's settings), evaluate on the validation split, deploy the service with `serve deploy`, call it.
# Each step is the command you would type; tests/test_end_to_end.py runs the same four on a local cluster.
#
#   ray up cluster/aws-gpu.yaml                  # or cluster/onprem.yaml; KubeRay: see cluster/kuberay-*.yaml
#   ray dashboard cluster/aws-gpu.yaml &         # forwards the head's dashboard to 127.0.0.1:8265
#   ray attach cluster/aws-gpu.yaml -p 8000      # (another terminal) forwards the service's port 8000
#   export RAY_ADDRESS=http://127.0.0.1:8265
#   TRAIN=s3://my-bucket/helpsteer3/train.jsonl.gz EVAL=s3://my-bucket/helpsteer3/validation.jsonl.gz \
#       bash jobs/example_qwen3_helpsteer3.sh    # from the repository root
#
# TRAIN / EVAL: HelpSteer3 preference data in NVIDIA's layout (context, response1, response2,
# overall_preference) or RM-Gallery's (input, output[].answer.label.is_preferred): parquet, JSON/JSONL(.gz), a
# directory, a glob or a cloud URI. Ties (overall_preference 0) are dropped and counted in the ledger (apart:
# they do not count against --max_drop_fraction).
# TOKEN_FILE: a file every node reads (on SHARED, say) holding a bearer token the service then requires.
# SHARED: a directory every node mounts (NFS, EFS, a PVC): the export, the evaluation and the service
# all read the model from there. If the cluster uses token auth (Ray 2.60 turns it on when the head has
# a token), also `export RAY_AUTH_MODE=token` with the head's token in ~/.ray/auth_token (or
# RAY_AUTH_TOKEN_PATH pointing at a copy).
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard of the cluster, e.g. http://127.0.0.1:8265}"
: "${TRAIN:?set TRAIN to HelpSteer3 training pairs}"
: "${EVAL:?set EVAL to HelpSteer3 held-out pairs}"
if [[ -n "${TOKEN_FILE:-}" && -z "${BTRM_API_TOKEN:-}" ]]; then
    echo "TOKEN_FILE is set: also set BTRM_API_TOKEN here to the same token (step 4 sends it)" >&2; exit 1
fi
SHARED="${SHARED:-/mnt/shared/btrm}"
MODEL="${MODEL:-$SHARED/models/qwen3-1.7b-helpsteer3-rm}"
EVAL_OUTPUT="${EVAL_OUTPUT:-$SHARED/eval/qwen3-1.7b-helpsteer3-rm/validation.parquet}"
NUM_WORKERS="${NUM_WORKERS:-8}"
# Where this repository is on every node (cluster/*.yaml's file_mounts put it in ~/btrm; the KubeRay
# image at /app): `serve deploy` takes no local directory, so the application imports serve.app from there.
REPO_ON_NODES="${REPO_ON_NODES:-/home/ubuntu/btrm}"
SERVE_URL="${SERVE_URL:-http://127.0.0.1:8000}"

cd "$(dirname "$0")/.."
export RAY_ADDRESS
STAMP="$(date +%Y%m%d-%H%M%S)"
RUN_NAME="${RUN_NAME:-qwen3-helpsteer3}"

# 1. Train: the reference trainer's example settings (configs/qwen3_1.7b_rm.yaml: 4096 tokens, lr 1e-5, two epochs, 64-step
#    accumulation, bf16, gradient checkpointing, ZeRO-3) on the HelpSteer3 processor. `ray job submit` follows the logs until the job ends
#    (Ctrl-C detaches, the job goes on: `ray job logs -f <submission id>`, `ray job list`). A run name already
#    in $STORAGE is refused: RESUME=true continues it from its latest checkpoint, or pick another RUN_NAME.
ray job submit --submission-id "$RUN_NAME-train-$STAMP" --working-dir . -- python jobs/train.py \
    --config configs/qwen3_1.7b_rm.yaml \
    --dataset_format helpsteer3 \
    --train_set_path "$TRAIN" \
    --eval_set_path "$EVAL" \
    --output_path "$MODEL" \
    --num_workers "$NUM_WORKERS" \
    --storage_path "${STORAGE:-$SHARED/runs}" \
    --run_name "$RUN_NAME" \
    --resume "${RESUME:-false}" \
    --report_to "${REPORT_TO:-none}" \
    --tracking_dir "$SHARED/tracking"

# 2. Evaluate the export on the held-out pairs: per-pair rewards, accuracy (per domain too), length bias.
#    The figures land next to the output as validation.summary.json.
ray job submit --submission-id "$RUN_NAME-evaluate-$STAMP" --working-dir . -- python jobs/evaluate.py \
    --model_path "$MODEL" \
    --dataset_format helpsteer3 \
    --data_path "$EVAL" \
    --output "$EVAL_OUTPUT" \
    --use_gpu true \
    --show 5

# 3. Serve it: serve/config.yaml with this model and the repository on the nodes as working_dir.
SERVE_CONFIG="${TMPDIR:-/tmp}/btrm-serve-$STAMP.yaml"
python - "$SERVE_CONFIG" "$MODEL" "$REPO_ON_NODES" "${TOKEN_FILE:-}" <<'EOF'
import sys, yaml
path, model, repo, token_file = sys.argv[1:]
config = yaml.safe_load(open("serve/config.yaml"))
app = config["applications"][0]
app["args"]["model_path"] = model
app["args"]["replica_gpus"] = "1"  # not auto: that judges by the GPUs up when the app is built (none, on demand)
app["runtime_env"] = {"working_dir": f"local://{repo}"}
if token_file:  # read where the application is built, on any node; without it the deploy fails, not opens
    app["args"].update(token_file=token_file, require_token=True)
open(path, "w").write(yaml.safe_dump(config, sort_keys=False))
EOF
serve deploy -a "$RAY_ADDRESS" "$SERVE_CONFIG"
# The application goes DEPLOYING → RUNNING once its replicas have loaded the model; a GPU node that never
# starts (quota, capacity) would keep it DEPLOYING: give up after SERVE_WAIT_S (default 30 minutes).
deadline=$((SECONDS + ${SERVE_WAIT_S:-1800}))
while true; do
    status="$(serve status -a "$RAY_ADDRESS" -n btrm)"   # this application's only: the cluster may run others
    grep -q "^status: RUNNING" <<<"$status" && break
    if grep -q "^status: DEPLOY_FAILED" <<<"$status"; then echo "$status"; exit 1; fi
    if ((SECONDS > deadline)); then
        echo "$status"; echo "btrm: not RUNNING after ${SERVE_WAIT_S:-1800} s (are GPU nodes starting? ray status)"; exit 1
    fi
    sleep 10
done
echo "$status"

# 4. Call it (through `ray attach ... -p 8000`, or on the head itself). With TOKEN_FILE, the service
#    requires the token: $BTRM_API_TOKEN here is sent as it. A status other than 200 fails the script.
curl -sS --fail-with-body "$SERVE_URL/compare" -H 'content-type: application/json' ${BTRM_API_TOKEN:+-H "authorization: Bearer $BTRM_API_TOKEN"} \
    -d '{"prompt": "What is the capital of Australia?", "chosen": "Canberra.", "rejected": "Sydney."}'
echo
