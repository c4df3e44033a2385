"""A training worker killed mid-run: Ray Train restarts the workers from the last checkpoint and the
run finishes with the step count and pairs seen of an uninterrupted run (within one checkpoint interval)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import ray
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import train_tiny


def _train_workers_of_this_session() -> list[psutil.Process]:
    """RayTrainWorker processes under this test session's raylet (other Ray instances may run here)."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    workers = []
    for process in psutil.Process(raylet).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:  # an idle Ray worker that exited meanwhile
            continue
    return workers


def _checkpoint_registered(run_dir) -> bool:
    """Ray Train has registered a checkpoint: restarted workers get it. Its directory shows up in storage
    earlier, while it is being uploaded; a worker killed then restarts from the beginning. The controller
    records each registration in this snapshot file."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return False
    return snapshot.get("latest_checkpoint_result") is not None


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_session, tiny_qwen_dir, hh_helpful, tmp_path):
    # 160 pairs on 2 workers x 4 pairs x 2 accumulation: 10 steps an epoch; 15 steps (--max_steps: one epoch
    # and a half, as in transformers, so the restarted workers cross an epoch's end); a checkpoint every 5.
    options = dict(max_steps=15, save_steps=5, logging_steps=5, max_failures=1)
    outcome: dict = {}

    def train():
        try:
            outcome["result"], outcome["model_dir"] = train_tiny(tmp_path, tiny_qwen_dir, hh_helpful["train"][:160],
                                                                 hh_helpful["test"][:32], **options)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=train)
    thread.start()
    deadline, killed = time.monotonic() + 300, None
    try:
        while thread.is_alive() and time.monotonic() < deadline and killed is None:
            # Once the first checkpoint (step 5) is registered, the workers are past it.
            if _checkpoint_registered(tmp_path / "runs" / "tiny"):
                workers = _train_workers_of_this_session()
                if workers:
                    killed = workers[-1].pid
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
    finally:  # never a run left training into the next test
        thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert killed is not None, "the run finished before a worker could be killed"

    result, model_dir = outcome["result"], outcome["model_dir"]
    manifest = json.loads((model_dir / "btrm.json").read_text())
    log = [json.loads(line) for line in (model_dir / "training_log.jsonl").read_text().splitlines()]
    uninterrupted_pairs = 15 * 2 * 4 * 2
    assert result.metrics["step"] == manifest["training"]["steps"] == 15
    assert abs(manifest["training"]["pairs_seen"] - uninterrupted_pairs) <= 5 * 2 * 4 * 2  # one interval
    # The restarted workers took the log up from the checkpoint: every logging step once, none lost or repeated.
    assert [line["step"] for line in log if "train/loss" in line] == list(range(5, 16, 5))

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(hh_helpful["test"][0]["chosen"], tokenize=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
