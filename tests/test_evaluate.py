"""The evaluation job on local Ray: a tiny model trained by the real training code, scored on real pairs.

Every summary figure is recomputed from the per-pair output with pandas, and the per-pair rewards are
checked against a plain transformers forward of the exported model (and the trained engine's own rewards).
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from btrm.config import parse_config
from btrm.evaluate import EvalConfig, PairScorer, eval_tokenization, format_summary, main, summarize, summary_path
from conftest import REPO, headless_export, write_parquet_shards

MAX_LENGTH = 256  # what conftest's trained_model_dir was trained with

PANDALM_PROCESSOR = '''
from btrm.processors import BaseBradleyTerryTrainDataset, RowDropped
from btrm.processors.base import require


class PandaLMDataset(BaseBradleyTerryTrainDataset):
    """PandaLM: two responses, three annotators voting 1, 2 or 0 (a tie); the majority wins."""

    required_fields = ("instruction", "response1", "response2")

    def convert(self, row):
        prompt = require(row, "instruction") + ("\\n\\n" + row["input"] if row.get("input") else "")
        votes = [row.get(f"annotator{k}") for k in (1, 2, 3)]
        if votes.count(1) == votes.count(2):
            raise RowDropped("tie", f"annotators voted {votes}")
        chosen, rejected = ("response1", "response2") if votes.count(1) > votes.count(2) else ("response2", "response1")
        user = {"role": "user", "content": prompt}
        return {"chosen": [user, {"role": "assistant", "content": require(row, chosen)}],
                "rejected": [user, {"role": "assistant", "content": require(row, rejected)}],
                "id": str(row["idx"]), "source": row.get("motivation_app")}
'''


@dataclass
class Evaluation:
    pairs: pd.DataFrame
    summary: dict
    stdout: str
    data_path: Path


def _evaluate(argv: list[str], failure: str | None = None) -> tuple[dict, str]:
    """Runs the job's entry point as `btrm evaluate` would; returns the summary JSON and what it printed.
    ``failure``: the message the job must end with, once it has written its files."""
    stdout = io.StringIO()
    ends = pytest.raises(SystemExit, match=failure) if failure else contextlib.nullcontext()
    with contextlib.redirect_stdout(stdout), ends:
        main(argv + ["--batch_size", "32", "--num_data_workers", "1", "--data_worker_cpus", "0.5"])
    output = Path(argv[argv.index("--output") + 1])
    return json.loads(summary_path(output).read_text()), stdout.getvalue()


@pytest.fixture(scope="module")
def hh_eval(ray_session, trained_model_dir, hh_helpful, tmp_path_factory) -> Evaluation:
    """The 228 held-out hh-rlhf helpful pairs, parquet in and out, manifest's tokenization."""
    tmp = tmp_path_factory.mktemp("evaluate-hh")
    data = write_parquet_shards(hh_helpful["test"], tmp / "test", shards=2)
    output = tmp / "out" / "scores.parquet"
    summary, stdout = _evaluate(["--model_path", str(trained_model_dir), "--data_path", str(data),
                                 "--output", str(output), "--show", "3"])
    return Evaluation(pq.read_table(output).to_pandas(), summary, stdout, data)


@pytest.fixture(scope="module")
def pandalm_eval(ray_session, trained_model_dir, shared_data, tmp_path_factory) -> Evaluation:
    """A custom processor on PandaLM (JSONL with one corrupt line), --max_length override, JSONL out; its ties,
    overlong and invalid rows are more than the default --max_drop_fraction: the job fails, after writing."""
    tmp = tmp_path_factory.mktemp("evaluate-pandalm")
    processor = tmp / "pandalm.py"
    processor.write_text(PANDALM_PROCESSOR)
    lines = [json.dumps(item) for item in json.loads((shared_data / "pandalm" / "testset-v1.json").read_text())[:120]]
    lines.insert(5, '{"idx": "broken", ')  # row 5 of the file
    data = tmp / "pandalm.jsonl"
    data.write_text("\n".join(lines) + "\n")
    output = tmp / "out" / "scores.jsonl"
    summary, stdout = _evaluate(["--model_path", str(trained_model_dir), "--data_path", str(data),
                                 "--output", str(output), "--custom_bt_dataset_path", str(processor),
                                 "--custom_bt_dataset_name", "PandaLMDataset", "--max_length", "128"],
                                failure=r"eval: \d+\.\d% of pairs dropped \(ties aside\) > --max_drop_fraction 5\.0%; fix the data or "
                                        r"raise the limit \(the ledger above\)$")
    assert stdout.count("[eval] 121 rows read") == 1  # the ledger, once
    return Evaluation(pd.read_json(output, lines=True, dtype=False), summary, stdout, data)


def _check_summary_against_pairs(summary: dict, pairs: pd.DataFrame) -> None:
    """Every figure, recomputed from the per-pair file without btrm."""
    scored = pairs[pairs.error.isna()]
    r_c, r_r = scored.reward_chosen.astype(float), scored.reward_rejected.astype(float)
    both = pd.concat([r_c, r_r], ignore_index=True)
    margin = r_c - r_r
    assert summary["pairs"] == len(scored) and summary["unscored"] == len(pairs) - len(scored)
    assert np.allclose(scored.reward_margin, margin)
    assert summary["accuracy"] == pytest.approx((r_c > r_r).sum() / len(scored))
    assert summary["tie_rate"] == pytest.approx((r_c == r_r).sum() / len(scored))
    assert summary["loss"] == pytest.approx(float(-torch.nn.functional.logsigmoid(torch.tensor(margin.values)).mean()))
    assert summary["mean_margin"] == pytest.approx(margin.mean())
    assert summary["reward_chosen_mean"] == pytest.approx(r_c.mean())
    assert summary["reward_rejected_mean"] == pytest.approx(r_r.mean())
    assert summary["reward_mean"] == pytest.approx(both.mean())
    assert summary["reward_std"] == pytest.approx(both.std(ddof=0))
    assert summary["truncated_pairs"] == scored.truncated.sum() == (scored.truncated_tokens > 0).sum()
    assert summary["truncated_tokens"] == scored.truncated_tokens.sum()
    by_source = {name: {"pairs": len(group), "accuracy": pytest.approx((group.reward_margin > 0).mean())}
                 for name, group in scored.groupby("source")}
    assert summary["accuracy_by_source"] == by_source
    bias = summary["length_bias"]
    length_c, length_r = scored.chosen_answer_tokens, scored.rejected_answer_tokens
    assert bias["longer_answer_accuracy"] == pytest.approx((length_c > length_r).mean())
    assert bias["equal_length_rate"] == pytest.approx((length_c == length_r).mean())
    lengths = pd.concat([length_c, length_r], ignore_index=True).astype(float)
    assert bias["reward_length_correlation"] == pytest.approx(both.corr(lengths))
    assert bias["margin_length_correlation"] == pytest.approx(margin.corr((length_c - length_r).astype(float)))
    assert "tokens" in bias["answer_length"]


def test_summary_figures_match_the_per_pair_output(hh_eval):
    summary, pairs = hh_eval.summary, hh_eval.pairs
    _check_summary_against_pairs(summary, pairs)
    ledger = summary["data"]
    assert ledger["rows_read"] == 228 and ledger["pairs"] == len(pairs) == 228 - ledger["dropped_total"]
    assert ledger["truncated"] == summary["truncated_pairs"] > 0
    assert summary["unscored"] == 0 and summary["unscored_pairs"] == []
    assert list(summary["accuracy_by_source"]) == ["hh-rlhf-helpful"]
    assert summary["tokenization"]["max_length"] == MAX_LENGTH  # the manifest's, no --max_length given
    # Input order: the first shard's rows, then the second's.
    assert list(pairs.sort_values(["file", "row"]).id) == list(pairs.id)


def test_rewards_match_a_plain_transformers_forward(hh_eval, trained_model_dir, hh_helpful):
    model = AutoModelForSequenceClassification.from_pretrained(trained_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained_model_dir)
    originals = {p["id"]: p for p in hh_helpful["test"]}
    whole = hh_eval.pairs[~hh_eval.pairs.truncated]
    for pair in whole.head(20).itertuples():
        for side in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(originals[pair.id][side], tokenize=True)["input_ids"]
            assert getattr(pair, f"{side}_tokens") == len(ids)
            with torch.no_grad():
                reward = model(input_ids=torch.tensor([ids])).logits.item()
            assert getattr(pair, f"reward_{side}") == pytest.approx(reward, abs=1e-4)
    # Truncated pairs: the prompt was cut from the left until the longer side fits exactly.
    for pair in hh_eval.pairs[hh_eval.pairs.truncated].itertuples():
        full = len(tokenizer.apply_chat_template(originals[pair.id]["chosen"], tokenize=True)["input_ids"])
        assert pair.chosen_tokens == full - pair.truncated_tokens
        assert max(pair.chosen_tokens, pair.rejected_tokens) == MAX_LENGTH
    # The trained engine's own rewards for the pairs it evaluated at the end of training.
    engine = pq.read_table(trained_model_dir / "eval_rewards.parquet").to_pandas()
    shared = hh_eval.pairs.merge(engine, on="id", suffixes=("", "_engine"))
    assert len(shared) > 80
    assert np.allclose(shared.reward_chosen, shared.reward_chosen_engine, atol=1e-4)
    assert np.allclose(shared.reward_rejected, shared.reward_rejected_engine, atol=1e-4)


def test_show_prints_the_first_pairs_the_table_and_the_ledger(hh_eval):
    out = hh_eval.stdout
    first = hh_eval.pairs.head(4)
    positions = [out.index(f"[{k}] id {pair.id}") for k, pair in enumerate(first.head(3).itertuples(), 1)]
    assert positions == sorted(positions)
    assert first.question.iloc[0] in out and f"[4] id {first.id.iloc[3]}" not in out
    assert "228 rows read" in out  # the ledger
    assert re.search(rf"^  accuracy +{hh_eval.summary['accuracy']:.4f}$", out, re.MULTILINE)
    assert "longer answer wins" in out and "accuracy [hh-rlhf-helpful]" in out


def test_custom_processor_length_override_bad_rows_and_sources(pandalm_eval):
    summary, pairs = pandalm_eval.summary, pandalm_eval.pairs
    _check_summary_against_pairs(summary, pairs)
    assert summary["tokenization"]["max_length"] == 128
    assert summary["processor"] == {"name": "PandaLMDataset", "path": str(pandalm_eval.data_path.parent / "pandalm.py")}
    assert (pairs[["chosen_tokens", "rejected_tokens"]] <= 128).all().all()
    truncated = pairs[pairs.truncated]
    assert len(truncated) > 0 and (truncated[["chosen_tokens", "rejected_tokens"]].max(axis=1) == 128).all()
    ledger = summary["data"]
    assert ledger["rows_read"] == 121 and ledger["pairs"] == len(pairs) == summary["pairs"]
    assert ledger["dropped"]["tie"] > 0 and ledger["dropped"]["overlong"] > 0 and ledger["drop_fraction"] > 0.05
    assert not list(pandalm_eval.data_path.parent.glob("out/.*partial*"))
    # The corrupt line, and PandaLM's own empty responses, are reported with their place; the rest go on.
    invalid = {e["row"]: e for e in ledger["examples"] if e["reason"] == "invalid"}
    assert ledger["dropped"]["invalid"] == len(invalid) > 1
    assert invalid[5]["file"] == str(pandalm_eval.data_path) and "not valid JSON" in invalid[5]["message"]
    assert all(e["field"].endswith(".content") for row, e in invalid.items() if row != 5)
    assert len(summary["accuracy_by_source"]) > 5 and "Wikipedia" in summary["accuracy_by_source"]


def _tokenized_batch(scorer: PairScorer, pairs: list[dict]) -> dict[str, np.ndarray]:
    """A batch as Ray Data hands it to the scoring actor (numpy format, list columns as object arrays)."""
    encoded = [scorer.scorer.encoder.encode_group([p["chosen"], p["rejected"]]) for p in pairs]

    def objects(values) -> np.ndarray:
        array = np.empty(len(values), dtype=object)
        array[:] = [np.asarray(v, dtype=np.int32) for v in values]
        return array

    return {
        "id": np.array([p["id"] for p in pairs], dtype=object),
        "source": np.array([p["source"] for p in pairs], dtype=object),
        "file": np.array(["test.parquet"] * len(pairs), dtype=object),
        "row": np.arange(len(pairs), dtype=np.int64),
        "question": np.array(["q"] * len(pairs), dtype=object),
        "prompt_ids": objects([e.prompt_ids for e in encoded]),
        "chosen_ids": objects([e.tails[0] for e in encoded]),
        "rejected_ids": objects([e.tails[1] for e in encoded]),
        "truncated": np.array([e.truncated for e in encoded], dtype=np.int32),
    }


def test_a_pair_the_model_fails_on_is_reported_and_the_rest_are_scored(trained_model_dir, hh_helpful):
    scorer = PairScorer(str(trained_model_dir), MAX_LENGTH, max_batch_tokens=4096)
    batch = _tokenized_batch(scorer, hh_helpful["test"][:4])
    clean = scorer(batch).to_pandas()
    batch["chosen_ids"][2] = np.append(batch["chosen_ids"][2], 10**7)  # no such token: the forward fails
    broken = scorer(batch)
    rows = broken.to_pandas()
    assert rows.error.notna().tolist() == [False, False, True, False]
    assert "IndexError" in rows.error[2] and np.isnan(rows.reward_chosen[2])
    ok = rows.error.isna()
    assert np.allclose(rows.reward_chosen[ok], clean.reward_chosen[ok], atol=1e-5)
    summary = summarize(broken)
    assert summary["pairs"] == 3 and summary["unscored"] == 1
    assert summary["unscored_pairs"] == [{"file": "test.parquet", "row": 2, "id": rows.id[2], "error": rows.error[2]}]
    assert summary["accuracy"] == pytest.approx((rows.reward_margin[ok] > 0).mean())
    assert "not scored: test.parquet row 2" in format_summary(summary)
    # A pair whose reward overflows (here: a token whose embedding is NaN) blanks no other pair, though packed
    # in one row with them (a masked-out NaN value times its zero attention weight is still NaN).
    batch = _tokenized_batch(scorer, hh_helpful["test"][:4])
    elsewhere = {int(t) for i in (0, 2, 3) for side in ("prompt_ids", "chosen_ids", "rejected_ids") for t in batch[side][i]}
    poisoned = next(int(t) for t in batch["chosen_ids"][1] if int(t) not in elsewhere)
    embedding = scorer.scorer.model.get_input_embeddings().weight
    with torch.no_grad():
        kept, embedding[poisoned] = embedding[poisoned].clone(), float("nan")
    rows = scorer(batch).to_pandas()
    with torch.no_grad():
        embedding[poisoned] = kept
    assert rows.error.notna().tolist() == [False, True, False, False] and "not finite" in rows.error[1]
    ok = rows.error.isna()
    assert np.allclose(rows.reward_chosen[ok], clean.reward_chosen[ok], atol=1e-5)
    assert np.allclose(rows.reward_rejected[ok], clean.reward_rejected[ok], atol=1e-5)
    # A diverged model (NaN weights): its pairs are reported unscored, not NaN figures (nor NaN in JSON).
    torch.nn.init.constant_(scorer.scorer.model.score.weight, float("nan"))
    batch = _tokenized_batch(scorer, hh_helpful["test"][:4])
    diverged = scorer(batch).to_pandas()
    assert diverged.error.str.contains("not finite").all() and diverged.reward_chosen.isna().all()
    summary = summarize(scorer(batch))
    assert summary["unscored"] == 4 and re.search(r"\n  accuracy +n/a\n", format_summary(summary))  # the job fails
    # A CUDA error sticks to the process (raised by hand: no GPU here): the batch fails, naming it, rather than
    # every pair of it and of every later batch being scored alone, each one more error.
    def broken_gpu(*args, **kwargs):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    scorer.scorer.pair_rewards = broken_gpu
    with pytest.raises(RuntimeError, match="the GPU of this scoring actor failed .*illegal memory access.*run the "
                                           "evaluation again"):
        scorer(batch)

    # So is one met while its batch, failed otherwise (out of memory), is scored pair by pair.
    def out_of_memory_then_broken_gpu(pairs, max_batch_tokens):
        if len(pairs["prompt_ids"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        broken_gpu()

    scorer.scorer.pair_rewards = out_of_memory_then_broken_gpu
    with pytest.raises(RuntimeError, match="the GPU of this scoring actor failed .*illegal memory access"):
        scorer(batch)


def test_inputs_that_overflow_in_every_packed_row_cost_only_their_own_pairs(trained_model_dir, hh_helpful):
    """Every packed row of a batch scoring NaN is most often a diverged model, but may be one overflowing pair
    in each row: a one-token forward tells which. Inputs: the other pairs are scored as without them. A
    diverged model: no pair is scored alone (a forward each, for nothing)."""
    from btrm.batching import plan_by_tokens

    scorer = PairScorer(str(trained_model_dir), MAX_LENGTH, max_batch_tokens=4096)
    batch = _tokenized_batch(scorer, hh_helpful["test"][:8])
    lengths = [len(batch["prompt_ids"][i]) + len(batch["chosen_ids"][i]) + len(batch["rejected_ids"][i]) for i in range(8)]
    # A budget that packs the 8 pairs into rows of two or more.
    scorer.max_batch_tokens = next(budget for budget in range(max(lengths), sum(lengths), 8)
                                   if all(len(row) >= 2 for row in plan_by_tokens(lengths, budget)))
    rows = plan_by_tokens(lengths, scorer.max_batch_tokens)
    assert len(rows) >= 2
    clean = scorer(batch).to_pandas()
    # One pair of each row gets a token of its own whose embedding is NaN: every row scores NaN.
    tokens = [{int(t) for side in ("prompt_ids", "chosen_ids", "rejected_ids") for t in batch[side][i]} for i in range(8)]
    poisoned = {}
    for row in rows:
        pair = next(i for i in row if tokens[i] - set().union(*(tokens[j] for j in range(8) if j != i)))
        poisoned[pair] = min(tokens[pair] - set().union(*(tokens[j] for j in range(8) if j != pair)))
    embedding = scorer.scorer.model.get_input_embeddings().weight
    kept = embedding.detach().clone()
    with torch.no_grad():
        embedding[list(poisoned.values())] = float("nan")
    scored = scorer(batch).to_pandas()
    with torch.no_grad():
        embedding.copy_(kept)
    assert scored.error.notna().tolist() == [i in poisoned for i in range(8)], (rows, poisoned)
    ok = scored.error.isna()
    assert np.allclose(scored.reward_chosen[ok], clean.reward_chosen[ok], atol=1e-5)
    assert np.allclose(scored.reward_rejected[ok], clean.reward_rejected[ok], atol=1e-5)
    # Diverged (a NaN head): one forward a row, then the one-token forward, and no more.
    forwards = []
    model_forward = scorer.scorer.reward_model.forward
    scorer.scorer.reward_model.forward = lambda *args, **kwargs: forwards.append(1) or model_forward(*args, **kwargs)
    torch.nn.init.constant_(scorer.scorer.model.score.weight, float("nan"))
    assert scorer(batch).to_pandas().error.str.contains("not finite").all()
    assert len(forwards) == len(rows) + 1


def test_pairs_the_model_fails_on_count_against_max_drop_fraction(ray_session, trained_model_dir, hh_helpful, tmp_path):
    """The figures leave out the pairs the model could not score: past --max_drop_fraction of them (here 0), the
    job fails (after writing its output whole), rather than report an accuracy of what was left."""
    import shutil

    pairs = [dict(p) for p in hh_helpful["test"][:20]]
    last = pairs[3]["chosen"][-1]
    pairs[3]["chosen"] = pairs[3]["chosen"][:-1] + [{**last, "content": last["content"] + " Zyzzyvaqx"}]
    tokenizer = AutoTokenizer.from_pretrained(trained_model_dir)
    elsewhere = set(tokenizer(json.dumps(pairs[:3] + pairs[4:]))["input_ids"])
    poisoned = [t for t in tokenizer(" Zyzzyvaqx")["input_ids"] if t not in elsewhere]
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model_dir, model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight[poisoned] = float("nan")  # its reward overflows
    model.save_pretrained(model_dir)
    data = write_parquet_shards(pairs, tmp_path / "data")
    output = tmp_path / "scores.parquet"
    argv = ["--model_path", str(model_dir), "--data_path", str(data), "--output", str(output)]
    with pytest.raises(SystemExit, match=r"1 of the 20 pairs could not be scored \(5.0% > --max_drop_fraction 0.0%\): "
                                         r"the figures above leave them out. The first, .*part-00000.parquet row 3: "
                                         "the model's rewards are not finite"):
        _evaluate(argv + ["--max_drop_fraction", "0"])
    # Written first, whole: the pair's error in the output, the figures of the 19 others in the summary.
    summary = json.loads(summary_path(output).read_text())
    assert (summary["pairs"], summary["unscored"]) == (19, 1)
    assert pq.read_table(output).column("error").null_count == 19 and not list(tmp_path.glob(".*partial*"))
    # None scored (a diverged model) fails whatever the limit, saying so.
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(model_dir)
    with pytest.raises(SystemExit, match=r"^none of the 20 pairs could be scored \(whatever --max_drop_fraction\). "
                                         r"The first, .*part-00000.parquet row 0: the model's rewards are not finite"):
        _evaluate(argv + ["--max_drop_fraction", "1"])


def test_the_scorers_load_the_model_without_a_progress_bar_in_the_job_log(ray_session, trained_model_dir, hh_helpful,
                                                                          tmp_path):
    """Ray streams each scorer actor's console into the job's: transformers' "Loading weights" bar would be a
    line there per actor (the training workers turn theirs off too). Read from the actors' own log files, where
    Ray keeps what it streams (what reaches the driver's console arrives late, or in another test's capture)."""
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    before = {path.name for path in logs.glob("**/worker-*.err")}  # (a file moves to old/ when its worker exits)
    data = write_parquet_shards(hh_helpful["test"][:8], tmp_path / "data")
    _evaluate(["--model_path", str(trained_model_dir), "--data_path", str(data),
               "--output", str(tmp_path / "scores.parquet")])
    consoles = [path.read_text() for path in logs.glob("**/worker-*.err") if path.name not in before]
    scorers = [text for text in consoles if re.search(r"^:actor_name:.*PairScorer", text, re.MULTILINE)]
    assert scorers and not any("Loading weights" in text for text in scorers)


def test_options_are_checked_before_any_work(trained_model_dir, tiny_qwen_dir, tmp_path, capsys):
    def parse(*argv):
        return parse_config(EvalConfig, "test", list(argv))

    config = parse("--model_path", str(trained_model_dir), "--data_path", "x.parquet")
    shards = tmp_path / "scores.parquet"
    shards.mkdir()
    parse("--model_path", "m", "--data_path", "data/*.parquet", "--output", "data/scores/s.parquet")  # no match
    assert config.max_length is None and config.overlong is None and config.output.endswith(".parquet")
    for argv, words in ((["--data_path", "x"], "--model_path is required"), (["--model_path", "m"], "--data_path"),
                        (["--model_path", "m", "--data_path", "x", "--output", "scores.csv"], "must end in"),
                        (["--model_path", "m", "--data_path", "x", "--output", "s3://b/s.parquet"], "a local file"),
                        (["--model_path", "m", "--data_path", "x.parquet", "--output", "./x.parquet"],
                         "is --data_path: the scores would replace the pairs"),
                        (["--model_path", "m", "--data_path", str(tmp_path), "--output", str(tmp_path / "s.parquet")],
                         "is inside --data_path"),
                        (["--model_path", "m", "--data_path", f"{tmp_path}/**/*.parquet", "--output",
                          str(tmp_path / "eval" / "s.parquet")], "/**/*.parquet matches"),
                        # The summary, s.summary.json, is what this glob would read back.
                        (["--model_path", "m", "--data_path", "data/*.json", "--output", "data/s.jsonl"],
                         "matches data/s.summary.json"),
                        # A folder the pattern names is read whole (Spark's folders of parts), the scores in it too.
                        (["--model_path", "m", "--data_path", "data/*", "--output", "data/scores/s.parquet"],
                         "matches data/scores/s.parquet"),
                        # A folder of that name (an earlier Ray Data write, say) would be found after the scoring.
                        (["--model_path", "m", "--data_path", "x", "--output", str(shards)],
                         f"{shards} is a directory; give a file's path"),
                        (["--model_path", "m", "--data_path", "x", "--scorer_cpus", "0"], "--scorer_cpus must be above 0")):
        with pytest.raises(SystemExit):
            parse(*argv)
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit, match="4096 positions"):
        eval_tokenization(parse("--model_path", "m", "--data_path", "x", "--max_length", "5000"),
                          json.loads((trained_model_dir / "btrm.json").read_text()),
                          AutoConfig.from_pretrained(trained_model_dir))
    with pytest.raises(SystemExit, match="--model_path .*: no btrm.json; is this a model exported by btrm"):
        main(["--model_path", tiny_qwen_dir, "--data_path", "x.parquet", "--output", str(tmp_path / "s.parquet")])
    with pytest.raises(SystemExit, match=f"--model_path {tmp_path}/absent: no such directory on {socket.gethostname()}; "
                                         "on a cluster, a model must be where every node reads it"):
        main(["--model_path", str(tmp_path / "absent"), "--data_path", "x.parquet", "--output", str(tmp_path / "s.parquet")])
    with pytest.raises(SystemExit, match="4096 positions"):
        main(["--model_path", str(trained_model_dir), "--data_path", "x.parquet", "--max_length", "5000"])
    headless = headless_export(trained_model_dir, tmp_path / "headless")
    with pytest.raises(SystemExit, match=r"--model_path .*/headless: the model's files lack weight\(s\) \['score.weight'\] "
                                         r"\(its files hold \['weight'\] instead\): scored, they would be random"):
        main(["--model_path", str(headless), "--data_path", "x.parquet", "--output", str(tmp_path / "s.parquet")])
    with pytest.raises(SystemExit, match="--max_length/--overlong: max_length must be at least 8 tokens, got 4"):
        main(["--model_path", str(trained_model_dir), "--data_path", "x.parquet", "--max_length", "4"])
    # A chat template that cannot render a plain exchange: found here, not in every data task.
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(SystemExit, match="--chat_template: the template cannot render a user/assistant exchange "
                                         "\\(TemplateSyntaxError: "):
        main(["--model_path", str(trained_model_dir), "--data_path", "x.parquet", "--chat_template",
              str(tmp_path / "broken.jinja")])
    # An output that cannot be written is found now, not after the scoring.
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=f"--output {tmp_path}/file/s.jsonl: cannot write in {tmp_path}/file "):
        main(["--model_path", str(trained_model_dir), "--data_path", "x.parquet", "--output", str(tmp_path / "file" / "s.jsonl")])
    # One that can is not made yet: a job that stops later (here: no such data) leaves no empty folders behind.
    with pytest.raises(SystemExit, match="x.parquet: no such file"):
        main(["--model_path", str(trained_model_dir), "--data_path", "x.parquet", "--output", str(tmp_path / "new" / "deep" / "s.jsonl")])
    assert not (tmp_path / "new").exists()


def test_an_evaluation_reading_with_another_processor_than_training_says_which_to_pass():
    """A model trained through a processor of the user's: its evaluation with the standard one would drop every row
    of the training's layout as invalid, saying only that fields are missing."""
    from btrm.evaluate import processor_note

    def config(*argv):
        return parse_config(EvalConfig, "test", ["--model_path", "m", "--data_path", "x.jsonl", *argv])

    custom = {"training": {"options": {"dataset_format": "standard", "custom_bt_dataset_path": "/p/mine.py",
                                       "custom_bt_dataset_name": "MyPairs"}}}
    assert processor_note(config(), custom) == (
        "the model trained on pairs read by processor MyPairs; this evaluation reads --data_path with standard. For "
        "data in the training's layout, pass --custom_bt_dataset_path /p/mine.py --custom_bt_dataset_name MyPairs")
    assert processor_note(config("--custom_bt_dataset_path", "/p/mine.py", "--custom_bt_dataset_name", "MyPairs"),
                          custom) is None
    helpsteer = {"training": {"options": {"dataset_format": "helpsteer3", "custom_bt_dataset_path": None}}}
    assert processor_note(config(), helpsteer).endswith("pass --dataset_format helpsteer3")
    assert processor_note(config(), {"training": {"options": {"dataset_format": "standard"}}}) is None
    assert processor_note(config(), {}) is None


def test_a_ledger_over_its_limits_read_with_another_processor_than_training_ends_with_the_note(
        trained_model_dir, hh_helpful, tmp_path):
    """The note, printed as the job began, has scrolled away under Ray's output when every row is dropped."""
    data = write_parquet_shards(hh_helpful["test"][:12], tmp_path / "pairs")
    with pytest.raises(SystemExit) as stopped:
        main(["--model_path", str(trained_model_dir), "--data_path", str(data), "--output", str(tmp_path / "s.jsonl"),
              "--dataset_format", "hh_rlhf", "--num_data_workers", "1", "--data_worker_cpus", "0.5"])
    assert str(stopped.value).endswith(
        "\nnote: the model trained on pairs read by processor standard; this evaluation reads --data_path with "
        "hh_rlhf. For data in the training's layout, pass --dataset_format standard"), str(stopped.value)


def test_job_script_is_the_cli():
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(f"--{name}" in result.stdout for name in ("model_path", "data_path", "output", "max_length", "show"))
