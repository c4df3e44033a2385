"""Options (flags over YAML over defaults), DeepSpeed config filling, and the loss's options."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

from btrm.batching import collate_pairs
from btrm.config import TrainConfig, build_parser, check_job_outputs, parse_config
from btrm.deepspeed_configs import SHIPPED, fill_deepspeed_config, load_deepspeed_config, precision_note
from btrm.loss import bradley_terry_loss, pair_correct


def test_flags_override_yaml_override_defaults(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train_set_path: a.parquet\nlearning_rate: 1.0e-5\nbf16: false\nlogging_steps: 3\n")
    config = parse_config(TrainConfig, "t", ["--config", str(yaml_file), "--learning_rate", "3e-6", "--gradient_checkpointing", "false"])
    assert (config.train_set_path, config.learning_rate, config.bf16, config.logging_steps) == ("a.parquet", 3e-6, False, 3)
    assert config.gradient_checkpointing is False and config.max_length == 4096 and config.model_name == "Qwen/Qwen3-1.7B"
    assert parse_config(TrainConfig, "t", ["--train_set_path", "x", "--bf16"]).bf16 is True
    # A path under ~, where no shell expands it: in a YAML file, or after --option= (taken as written, it named a
    # folder called "~" in the job's working directory).
    yaml_file.write_text("train_set_path: ~/data/train.parquet\n")
    config = parse_config(TrainConfig, "t", ["--config", str(yaml_file), "--output_path=~/models/rm"])
    assert (config.train_set_path, config.output_path) == (os.path.expanduser("~/data/train.parquet"),
                                                           os.path.expanduser("~/models/rm"))


def test_bad_options_are_refused_with_the_reason(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("learnin_rate: 1\n")
    for argv, words in ((["--learning_rate", "1e-5"], "--train_set_path is required"),
                        (["--train_set_path", "x", "--custom_bt_dataset_path", "p.py"], "go together"),
                        (["--train_set_path", "x", "--custom_bt_dataset_path", "p.py", "--custom_bt_dataset_name", "P",
                          "--dataset_format", "hh_rlhf"], "--dataset_format hh_rlhf and --custom_bt_dataset_path: one "
                                                          "processor reads the data; give one or the other"),
                        (["--train_set_path", "x", "--overlong", "cut"], "invalid choice"),
                        (["--train_set_path", "x", "--gradient_accumulation_steps", "0"], "at least 1"),
                        (["--train_set_path", "x", "--eval_split_ratio", "1"], "must be in [0, 1)"),
                        (["--train_set_path", "x", "--eval_set_path", "y", "--eval_split_ratio", "0.1"],
                         "give one or the other"),
                        (["--train_set_path", "x", "--save_total_limit", "0"], "--save_total_limit must be at least 1"),
                        (["--train_set_path", "x", "--eval_steps", "-5"], "--eval_steps must be at least 0"),
                        (["--train_set_path", "x", "--learning_rate=-1e-5"], "--learning_rate must be at least 0"),
                        (["--train_set_path", "x", "--learning_rate", "inf"], "--learning_rate must be at least 0, and finite"),
                        (["--train_set_path", "x", "--cpus_per_worker", "0"], "--cpus_per_worker must be above 0"),
                        (["--train_set_path", "x", "--data_worker_cpus=-1"], "--data_worker_cpus must be above 0"),
                        (["--train_set_path", "x", "--num_data_workers", "0"], "--num_data_workers must be at least 1"),
                        (["--train_set_path", "x", "--packing", "false", "--max_tokens_per_batch", "-5"],
                         "--max_tokens_per_batch must be at least 0"),
                        (["--train_set_path", "x", "--max_steps", "0"], "--max_steps must be at least 1, or -1"),
                        (["--train_set_path", "x", "--output_path", "s3://b/rm"], "a local directory"),
                        (["--train_set_path", "x", "--report_to", "wandb", "--tracking_dir", "s3://b/t"],
                         "--tracking_dir s3://b/t: a local directory"),
                        (["--train_set_path", "x", "--deepspeed", "zero-3"], "neither a shipped config"),
                        (["--train_set_path", "x", "--eval_before_training"], "give --eval_set_path or"),
                        (["--train_set_path", "x", "--eval_steps", "50"], "--eval_steps evaluates on the evaluation set: give"),
                        (["--train_set_path", "x", "--deepspeed", str(tmp_path / "bad.yaml")], "not valid JSON"),
                        # The reference trainer's command lines: told what btrm calls it, or that it does without.
                        (["--train_set_path", "x", "--eval_every_steps=50", "--logging_strategy", "steps"],
                         "unrecognized arguments: --eval_every_steps=50 --logging_strategy steps; from the reference "
                         "trainer: --eval_every_steps (btrm's is --eval_steps); --logging_strategy (btrm logs every "
                         "--logging_steps steps; leave it out)")):
        with pytest.raises(SystemExit):
            parse_config(TrainConfig, "t", argv)
        assert words in capsys.readouterr().err
    # A tracking directory in the cloud matters only where a tracker writes there (jobs/run_qwen_rm.sh derives it).
    parse_config(TrainConfig, "t", ["--train_set_path", "x", "--tracking_dir", "s3://b/t"])
    with pytest.raises(SystemExit, match="unknown option"):
        parse_config(TrainConfig, "t", ["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(SystemExit, match="cannot be read"):
        parse_config(TrainConfig, "t", ["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "broken.yaml").write_text("learning_rate: [1\n")
    with pytest.raises(SystemExit, match="not valid YAML"):
        parse_config(TrainConfig, "t", ["--config", str(tmp_path / "broken.yaml")])


def test_yaml_values_are_read_like_flags_and_bad_ones_name_the_option(tmp_path):
    # PyYAML reads 2e-6 as a string and `true` as a bool: both mean what the same text means as a flag.
    (tmp_path / "run.yaml").write_text("train_set_path: a\nlearning_rate: 2e-6\nuse_gpu: true\nmax_steps: '7'\n")
    config = parse_config(TrainConfig, "t", ["--config", str(tmp_path / "run.yaml")])
    assert (config.learning_rate, config.use_gpu, config.max_steps) == (2e-6, "true", 7)
    # --config=~/...: no shell expands that ~.
    home = tmp_path / "home"
    home.mkdir()
    (home / "run.yaml").write_text("train_set_path: a\n")
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("HOME", str(home))
        assert parse_config(TrainConfig, "t", ["--config=~/run.yaml"]).train_set_path == "a"
    for text, words in (("max_length: 2.5", "max_length: expected an integer, got 2.5"),
                        ("learning_rate: fast", "learning_rate: expected a number, got 'fast'"),
                        ("bf16: maybe", "bf16: expected true or false, got 'maybe'"),
                        ("overlong: cut", "overlong: 'cut' is not one of ['truncate_prompt', 'drop']"),
                        ("logging_steps: true", "logging_steps: expected an integer, got True"),
                        ("project:", "project: null; give it a value, or leave it out for its default ('btrm')"),
                        # (str() of a list would read as a glob of one character class)
                        ("eval_set_path: [b.parquet, c.parquet]", "eval_set_path: a list (['b.parquet', 'c.parquet']); "
                                                                 "an option takes one value")):
        (tmp_path / "bad.yaml").write_text(f"train_set_path: a\n{text}\n")
        with pytest.raises(SystemExit, match=re.escape(f"--config {tmp_path / 'bad.yaml'}: {words}")):
            parse_config(TrainConfig, "t", ["--config", str(tmp_path / "bad.yaml")])


def test_help_explains_every_option():
    text = " ".join(build_parser(TrainConfig, "t").format_help().split())
    for name in ("--model_name", "--train_set_path", "--eval_set_path", "--output_path", "--max_length",
                 "--learning_rate", "--num_train_epochs", "--bf16", "--per_device_train_batch_size",
                 "--gradient_accumulation_steps", "--gradient_checkpointing", "--deepspeed", "--custom_bt_dataset_path",
                 "--custom_bt_dataset_name", "--report_to", "--run_name", "--logging_steps", "--num_workers", "--use_gpu",
                 "--seed", "--weight_decay", "--warmup_ratio", "--lr_scheduler_type", "--max_grad_norm", "--eval_steps",
                 "--save_steps", "--storage_path", "--config"):
        assert name in text
    assert "(default: 2e-06)" in text and "(default: Qwen/Qwen3-1.7B)" in text


def test_the_btrm_command_lists_its_commands_and_names_a_mistyped_one(monkeypatch, capsys):
    from btrm import cli

    for argv, code in ((["btrm", "--help"], 0), (["btrm"], 2)):
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as ended:
            cli.main()
        assert ended.value.code == code
        out, err = capsys.readouterr()
        listing = out if code == 0 else err
        assert "usage: btrm COMMAND" in listing and "btrm COMMAND --help" in listing
        for name, words in (("train", "Train a Bradley-Terry"), ("evaluate", "Score preference pairs"),
                            ("serve", "Serve an exported reward model")):
            assert re.search(rf"^  {name} +{words}", listing, re.MULTILINE), listing
    monkeypatch.setattr("sys.argv", ["btrm", "trian", "--model_name", "x"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 2
    assert "btrm: unknown command 'trian' (did you mean 'train'?)" in capsys.readouterr().err


def test_recorded_options_mask_the_credentials_of_source_uris():
    """What the manifest, the trackers and checkpoints keep of the options: a URI's credentials masked, its
    options kept; local paths, with a glob's '?', as given."""
    import json

    from btrm.config import recorded_options

    config = parse_config(TrainConfig, "t", ["--model_name", "m", "--train_set_path",
                                        "s3://KEY:S3CRET@bucket/train/?endpoint_override=minio:9000&scheme=http",
                                        "--eval_set_path", "data/part-?.parquet", "--storage_path", "gs://runs"])
    recorded = recorded_options(config)
    assert recorded["train_set_path"] == "s3://***@bucket/train/?endpoint_override=minio:9000&scheme=http"
    assert recorded["eval_set_path"] == "data/part-?.parquet" and recorded["storage_path"] == "gs://runs"
    assert "S3CRET" not in json.dumps(recorded) and recorded["learning_rate"] == config.learning_rate


def test_a_job_that_uploaded_its_working_directory_is_told_every_relative_output_at_once(monkeypatch):
    """(tests/test_end_to_end.py submits such a job for real.)"""
    outputs = {"--output_path": "outputs/rm", "--storage_path": "s3://bucket/runs", "--tracking_dir": "./tracking"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    check_job_outputs(outputs)  # a local run: relative paths are the user's own folders
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}')
    with pytest.raises(SystemExit, match=r"^--output_path outputs/rm, --tracking_dir ./tracking: relative paths, and "
                                         r"this Ray job runs in its unpacked copy of the working directory"):
        check_job_outputs(outputs)
    with pytest.raises(SystemExit, match=r"^--output ~x: a relative path, and this Ray job runs"):
        check_job_outputs({"--output": "~x", "--storage_path": "/abs/runs"})
    check_job_outputs({"--output": "~/x", "--storage_path": "/abs/runs", "--data": "gs://b/x"})


def test_deepspeed_configs_fill_auto_values_and_refuse_contradictions():
    assert set(SHIPPED) == {"zero0", "zero1", "zero2", "zero3", "zero3_offload"}
    filled = fill_deepspeed_config(load_deepspeed_config("zero3"), micro_batch=2, accumulation=8, world_size=4,
                                   max_grad_norm=1.0, bf16=True, hidden_size=64)
    assert (filled["train_batch_size"], filled["gradient_accumulation_steps"], filled["bf16"]["enabled"]) == (64, 8, True)
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 but the job's options give 2"):
        fill_deepspeed_config({"train_micro_batch_size_per_gpu": 4}, micro_batch=2, accumulation=1, world_size=1,
                              max_grad_norm=1.0, bf16=False, hidden_size=64)
    offload = fill_deepspeed_config(load_deepspeed_config("zero3_offload"), micro_batch=2, accumulation=1,
                                    world_size=1, max_grad_norm=1.0, bf16=False, hidden_size=64)
    assert offload["zero_force_ds_cpu_optimizer"] is False  # btrm's AdamW is meant (a step test trains with it)
    with pytest.raises(ValueError, match=r"remove the \['optimizer'\] section"):
        fill_deepspeed_config({"optimizer": {"type": "AdamW"}}, micro_batch=2, accumulation=1, world_size=1,
                              max_grad_norm=1.0, bf16=False, hidden_size=64)
    # Hugging Face's ZeRO templates (their optimizer and scheduler sections removed) as they are: fp16 "auto" is off.
    hugging_face = {"fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16}, "bf16": {"enabled": "auto"},
                    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}, "gradient_clipping": "auto",
                    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}
    for bf16 in (True, False):
        filled = fill_deepspeed_config(hugging_face, micro_batch=2, accumulation=1, world_size=1, max_grad_norm=1.0,
                                       bf16=bf16, hidden_size=64)
        assert (filled["bf16"]["enabled"], filled["fp16"]["enabled"]) == (bf16, False)
    with pytest.raises(FileNotFoundError, match="neither a shipped config"):
        load_deepspeed_config("zero9")
    # What DeepSpeed would refuse on every GPU worker, after the data is read (CPU workers train in float32).
    for raw, words in (({"fp16": {"enabled": True}}, "fp16 and bf16 both enabled"),
                       ({**load_deepspeed_config("zero1"), "zero_optimization": {"stage": 0}}, "needs ZeRO")):
        with pytest.raises(ValueError, match=words):
            fill_deepspeed_config(raw, micro_batch=2, accumulation=1, world_size=1, max_grad_norm=1.0, bf16=True,
                                  hidden_size=64)
        fill_deepspeed_config(raw, micro_batch=2, accumulation=1, world_size=1, max_grad_norm=1.0, bf16=False,
                              hidden_size=64)


def test_workers_are_told_the_precision_the_engine_trains_and_sums_gradients_in():
    def filled(raw, bf16):
        return fill_deepspeed_config(raw, micro_batch=2, accumulation=1, world_size=1, max_grad_norm=1.0, bf16=bf16,
                                     hidden_size=64)

    def note(raw, *, bf16, use_gpu, deepspeed, pairs_per_step=2, bf16_asked=None):
        return precision_note(filled(raw, bf16), use_gpu=use_gpu, bf16_asked=bf16 if bf16_asked is None else bf16_asked,
                              deepspeed=deepspeed, pairs_per_step=pairs_per_step)

    # The driver passes bf16 = --bf16 and GPUs: on CPU workers "auto" is float32, whatever --bf16 says.
    assert note(load_deepspeed_config("zero2"), bf16=False, bf16_asked=True, use_gpu=False, deepspeed="zero2") == \
        "--bf16 needs GPUs; these CPU workers train in float32"
    assert note(load_deepspeed_config("zero2"), bf16=False, use_gpu=False, deepspeed="zero2") is None
    # A config that enables bf16 itself trains CPU workers in bf16, --bf16 or not: the note must not say float32.
    for asked in (True, False):
        assert note({"bf16": {"enabled": True}}, bf16=False, bf16_asked=asked, use_gpu=False, deepspeed="my.json") == \
            "--deepspeed my.json enables bf16: these CPU workers train in bf16"
    assert note({"fp16": {"enabled": True}}, bf16=False, use_gpu=False, deepspeed="my.json") == \
        "--deepspeed my.json enables fp16: these CPU workers train in fp16"
    # On GPUs in bf16: the shipped ZeRO configs sum a step's micro-batch gradients in float32, and say nothing.
    for name in ("zero1", "zero2", "zero3", "zero3_offload"):
        assert note(load_deepspeed_config(name), bf16=True, use_gpu=True, deepspeed=name) is None
    # Stage 0 cannot (DeepSpeed refuses float32 sums without ZeRO), nor a config of the user's without data_types:
    # bfloat16 sums, 0.75% off over 42 micro-batches (README), said with what sums in float32.
    assert note(load_deepspeed_config("zero0"), bf16=True, use_gpu=True, deepspeed="zero0") == (
        "note: --deepspeed zero0 with bf16 sums the gradients of a step's micro-batches in bfloat16 (DeepSpeed sums "
        "in float32 under ZeRO only): --deepspeed zero1 or zero2 sum them in float32")
    assert note({"zero_optimization": {"stage": 2}}, bf16=True, use_gpu=True, deepspeed="my.json") == (
        "note: --deepspeed my.json with bf16 sums the gradients of a step's micro-batches in bfloat16: its "
        "\"data_types\": {\"grad_accum_dtype\": \"fp32\"} (as btrm's zero1-3 have) sums them in float32")
    # One pair a step is one micro-batch: nothing is summed. Float32 training sums in float32.
    assert note(load_deepspeed_config("zero0"), bf16=True, use_gpu=True, deepspeed="zero0", pairs_per_step=1) is None
    assert note(load_deepspeed_config("zero0"), bf16=False, use_gpu=True, deepspeed="zero0") is None


def test_workers_wanting_more_cpus_than_the_cluster_has_are_warned_of_before_ray_train_waits_for_them():
    from btrm.train import cpu_shortfall_note

    config = TrainConfig(train_set_path="x", num_workers=3)
    assert cpu_shortfall_note(config, cluster_cpus=4) is None
    assert cpu_shortfall_note(config, cluster_cpus=2) == (
        "WARNING: --num_workers 3 x --cpus_per_worker 1 = 3 CPUs, and this Ray cluster has 2: the workers start only "
        "once an autoscaler adds CPUs (until then Ray Train logs WorkerGroupStartupTimeoutError every 60 s and retries); "
        "on one machine, lower --num_workers or --cpus_per_worker")
    assert "= 1.5 CPUs, and this Ray cluster has 1:" in cpu_shortfall_note(
        TrainConfig(train_set_path="x", num_workers=1, cpus_per_worker=1.5), cluster_cpus=1)


def test_loss_margin_and_centering():
    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    plain = bradley_terry_loss(r_c, r_r)
    assert plain.item() == pytest.approx((-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2)
    with_margin = bradley_terry_loss(r_c, r_r, margin=torch.tensor([1.0, 1.0]))
    assert with_margin.item() == pytest.approx((math.log(2) + math.log(1 + math.exp(2))) / 2)
    centered = bradley_terry_loss(r_c, r_r, center_rewards_coefficient=0.5)
    assert centered.item() == pytest.approx(plain.item() + 0.5 * (9 + 1) / 2)
    assert pair_correct(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])).tolist() == [1.0, 0.0]  # a tie is wrong


def test_padded_batches_and_summed_loss():
    batch = collate_pairs({"prompt_ids": [[1, 2, 3], [4, 5]], "chosen_ids": [[6, 7], [8]], "rejected_ids": [[9], [10, 11, 12]],
                           "margin": [2.0, 1.0]}, pad_token_id=151643)
    assert batch.input_ids.shape == (4, 5) and batch.num_tokens == 5 + 3 + 4 + 5 and batch.computed_tokens == 20
    assert batch.input_ids[1].tolist() == [4, 5, 8, 151643, 151643] and batch.attention_mask[1].tolist() == [1, 1, 1, 0, 0]
    chosen, rejected = batch.pair_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert chosen.tolist() == [1.0, 2.0] and rejected.tolist() == [3.0, 4.0]
    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    summed = bradley_terry_loss(r_c, r_r, batch.margin, 0.1, reduction="sum")
    assert summed.item() == pytest.approx(2 * bradley_terry_loss(r_c, r_r, batch.margin, 0.1).item())

def test_position_limit_leaves_out_the_rows_roberta_never_uses():
    """RoBERTa numbers positions from pad_token_id + 1: its 514 position rows read 512 tokens."""
    from transformers import AutoConfig

    from btrm.model import position_limit

    assert position_limit(AutoConfig.for_model("roberta", max_position_embeddings=514, pad_token_id=1)) == 512
    assert position_limit(AutoConfig.for_model("bert", max_position_embeddings=512)) == 512
