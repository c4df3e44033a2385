"""The GPU benchmarks in their tiny CPU modes, end to end, so that they keep running: train_throughput.py,
random_reward_model.py (the serving benchmark's model) and serve_load.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_tiny_mode_prints_figures_for_both_systems(tmp_path, capsys, monkeypatch):
    report_path = tmp_path / "throughput.json"
    command = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--mode", "tiny",
               "--json", str(report_path)]
    run = subprocess.run(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    report = json.loads(report_path.read_text())
    rows = report["results"]
    assert report["header"]["versions"]["torch"] == __import__("torch").__version__
    assert {row["system"] for row in rows} == {"btrm", "trl"}
    lines = run.stdout.splitlines()
    for row in rows:
        assert not row["failed"], row
        assert row["pairs_per_s"] > 0 and row["computed_tokens_per_step"] > 0, row
        assert 0 <= row["padding_share"] < 1, row
        assert row["peak_memory_gib"] is None and row["mfu"] is None  # CPU: n/a
        # Both systems trained on exactly the same pairs: every token of them, no pair dropped.
        pair_tokens = report["header"]["data"][row["data"]]["pair_tokens"]
        assert round(row["pair_tokens_per_s"] * row["measured_s"]) == pair_tokens, row
        # ... and the table shows the figures the JSON holds.
        line = next(line for line in lines if line.startswith(row["system"]) and row["data"] in line
                    and row["setting"] in line)
        assert f"{row['pairs_per_s']:.2f}" in line and "n/a" in line, line
    assert {row["setting"] for row in rows if row["system"] == "btrm"} == {"micro 4 x2", "1024 tokens"}
    compared = [line for line in lines if "at 4 pairs per micro-batch btrm is" in line]
    assert compared, run.stdout
    # gpu_figures.sh runs each system in a stage of its own: --compare joins their files into the same ratios.
    apart = []
    for system in ("btrm", "trl"):
        apart.append(tmp_path / f"{system}.json")
        apart[-1].write_text(json.dumps({**report, "results": [row for row in rows if row["system"] == system]}))
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "benchmarks" / "train_throughput.py")
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # (its dataclasses look their module up there)
    spec.loader.exec_module(benchmark)
    assert benchmark.compare_reports(apart) == report["comparison"]
    printed = capsys.readouterr().out.splitlines()
    assert all(line in printed for line in compared), (compared, printed)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**report, "header": {**report["header"], "pairs_per_step": 64}}))
    with pytest.raises(SystemExit, match="was measured otherwise than .* \\(pairs_per_step\\): no comparison"):
        benchmark.compare_reports([apart[0], other])


@pytest.fixture(scope="module")
def random_model(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """benchmarks/random_reward_model.py's export (the serving benchmark's model on a GPU), in its tiny shape."""
    output = tmp_path_factory.mktemp("random") / "model"
    command = [sys.executable, str(REPO / "benchmarks" / "random_reward_model.py"), "--tokenizer", qwen_tokenizer_dir,
               "--shape", "tiny", "--max_length", "512", "--output", str(output)]
    run = subprocess.run(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return output


def test_random_reward_model_is_an_export_the_scorer_and_plain_transformers_load(random_model):
    import torch
    from transformers import AutoModelForSequenceClassification

    from btrm.scoring import RewardScorer

    scorer = RewardScorer(str(random_model))
    assert scorer.encoder.spec.max_length == 512 and scorer.packed
    question = [{"role": "user", "content": "What is 2 + 2?"}]
    conversations = [question + [{"role": "assistant", "content": answer}] for answer in ("4.", "5, surely.")]
    rewards, encoded = scorer.score_group(conversations)
    # The packed, prompt-shared score is the plain classifier's on each whole sequence.
    plain = AutoModelForSequenceClassification.from_pretrained(random_model, dtype=torch.float32).eval()
    with torch.no_grad():
        alone = [plain(input_ids=torch.tensor([encoded.prompt_ids + tail])).logits.item() for tail in encoded.tails]
    assert rewards == pytest.approx(alone, abs=1e-5) and rewards[0] != pytest.approx(rewards[1])


@pytest.mark.parametrize("forward", ["model", "stand-in"])
def test_serve_load_prints_a_level_per_concurrency_without_failures(random_model, forward):
    """The load benchmark on loopback, bounded by count: each level sends exactly its requests, none fails."""
    command = [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--model_path", str(random_model),
               "--concurrency", "1", "4", "--requests", "12", "--seconds", "60", "--warmup", "2"]
    if forward == "stand-in":
        command += ["--stand_in_forward", "5,0.5"]
    run = subprocess.run(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if re.match(r"\|\s+\d+ \|", line)]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [(1, 12, 0), (4, 12, 0)], run.stdout
    assert all(float(r[4]) > 0 and 0 < float(r[5]) <= float(r[6]) for r in rows), run.stdout
    assert "4 clients: " in run.stdout and ("stand-in" in run.stdout) == (forward == "stand-in"), run.stdout
