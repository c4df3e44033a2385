"""Shared fixtures: one private local Ray per test session, the real Qwen3 tokenizer, tiny models built
from a config, and real preference pairs from ../shared/data, or the folder $BTRM_TEST_DATA names (tests
skip with a reason without it)."""

from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# No test may reach a model hub (CI has no internet): fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("SWANLAB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BTRM_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: these tests use the real data in ../shared/data "
                    "(or set BTRM_TEST_DATA to a copy of it)")
    return SHARED_DATA


# Ray Train's controller polls its workers every 2 s and takes one report a poll: a run's end (its final
# checkpoint, then the finish) waits two polls. The tests' ~20 short runs poll faster; users' runs keep 2 s.
RAY_TRAIN_QUICK_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@pytest.fixture(scope="session")
def ray_session():
    """A private local Ray (never a cluster that `ray start` left running). More logical CPUs than the
    2 physical ones: two train workers plus data tasks must all get a slot (PLATFORM.md)."""
    import ray

    ray.init(address="local", num_cpus=6, object_store_memory=400 * 1024 * 1024, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                       **RAY_TRAIN_QUICK_POLL}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(shared_data, tmp_path_factory) -> str:
    """The real Qwen3 tokenizer, saved once with its fast-tokenizer file so later loads are quick."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("qwen3-tokenizer")
    AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "qwen3").save_pretrained(directory)
    return str(directory)


def build_tiny_qwen(tokenizer_dir: str, directory: Path, seed: int = 0) -> str:
    """A 2-layer Qwen3 sequence classifier (hidden 64) with the real tokenizer, random weights."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Qwen3Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, num_labels=1)
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_qwen_dir(qwen_tokenizer_dir, tmp_path_factory) -> str:
    return build_tiny_qwen(qwen_tokenizer_dir, tmp_path_factory.mktemp("tiny-qwen3"))


def _rm_gallery_module():
    spec = importlib.util.spec_from_file_location("hh_helpful_build", REPO / "examples" / "hh_helpful" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def hh_helpful(shared_data) -> dict[str, list[dict]]:
    """Real hh-rlhf helpful pairs (RM-Gallery's copy) in the standard format: 909 train, 228 test."""
    to_pair = _rm_gallery_module().to_pair
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for line in (shared_data / "rm-gallery" / "anthropic_helpful_0521.jsonl").read_text().splitlines():
        record = json.loads(line)
        splits[record["extra_metadata"]["group"]].append(to_pair(record))
    return splits


def write_parquet_shards(rows: list[dict], directory: Path, shards: int = 1, row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    size = -(-len(rows) // shards)
    for k in range(shards):
        part = rows[k * size : (k + 1) * size]
        pq.write_table(pa.Table.from_pylist(part), directory / f"part-{k:05d}.parquet", row_group_size=row_group_size)
    return directory


def train_tiny(tmp: Path, model_dir: str, train_rows: list[dict], eval_rows: list[dict] | None, **options):
    """Runs the real training job (TorchTrainer, 2 DeepSpeed workers on CPU) and returns (result, output dir)."""
    from btrm.config import TrainConfig
    from btrm.train import run_training

    train_dir = write_parquet_shards(train_rows, tmp / "train", shards=2)
    eval_dir = write_parquet_shards(eval_rows, tmp / "eval") if eval_rows else None
    values = dict(model_name=model_dir, train_set_path=str(train_dir), eval_set_path=str(eval_dir) if eval_dir else None,
                  output_path=str(tmp / "model"), storage_path=str(tmp / "runs"), run_name="tiny", max_length=256,
                  per_device_train_batch_size=4, per_device_eval_batch_size=16, gradient_accumulation_steps=2,
                  num_workers=2, learning_rate=1e-3, warmup_ratio=0.0, logging_steps=2, gradient_checkpointing=False,
                  deepspeed="zero2", num_data_workers=1, data_worker_cpus=0.5)
    values.update(options)
    config = TrainConfig(**values)
    config.validate()
    return run_training(config), tmp / "model"


def assert_export_scores_as_the_engine(model_dir, eval_pairs: list[dict], count: int) -> list[dict]:
    """Plain transformers, no btrm: the exported model gives ``count`` eval pairs the rewards the trained
    engine gave them (eval_rewards.parquet); returns the engine's rewards."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, loading = AutoModelForSequenceClassification.from_pretrained(model_dir, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading  # (else random weights score)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    pairs = {p["id"]: p for p in eval_pairs}
    engine_rewards = pq.read_table(model_dir / "eval_rewards.parquet").to_pylist()
    for row in engine_rewards[:count]:
        sides = {side: tokenizer.apply_chat_template(pairs[row["id"]][side], tokenize=True)["input_ids"]
                 for side in ("chosen", "rejected")}
        if max(map(len, sides.values())) > 256:
            continue  # its prompt, shared by both answers, cut in training; covered by the tokenization tests
        for side, ids in sides.items():
            with torch.no_grad():
                reward = model(input_ids=torch.tensor([ids])).logits.item()
            assert reward == pytest.approx(row[f"reward_{side}"], abs=1e-4)
    return engine_rewards


@pytest.fixture(scope="session")
def trained_model_dir(ray_session, tiny_qwen_dir, hh_helpful, tmp_path_factory) -> Path:
    """A tiny Qwen3 reward model trained by the real training code on real pairs, exported."""
    tmp = tmp_path_factory.mktemp("trained")
    # 160 pairs (two identical ones dropped), 2 workers x 4 pairs x 2 accumulation: 10 steps an epoch, 2 epochs.
    _, model_dir = train_tiny(tmp, tiny_qwen_dir, hh_helpful["train"][:160], hh_helpful["test"][:96],
                              num_train_epochs=2, eval_before_training=True, learning_rate=2e-3)
    return model_dir


def headless_export(model_dir: Path, directory: Path) -> Path:
    """A copy of an export whose score head is stored under another name, as btrm before 2026-12-06 exported a
    BERT's (`classifier.weight` as `weight`): transformers would load it with a random head, without an error."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, directory)
    weights = load_file(directory / "model.safetensors")
    weights["weight"] = weights.pop("score.weight")
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def run_pipeline(path, tokenizer_dir: str, max_drop_fraction: float = 1.0, **options):
    """Runs the Ray Data pair pipeline over ``path``; returns (rows sorted by file and row, ledger)."""
    from btrm.data import DataSpec, build_pair_dataset, check_drop_fraction, close_ledger, new_ledger
    from btrm.tokenize import TokenizationSpec

    tokenization = TokenizationSpec(max_length=options.pop("max_length", 1024),
                                    overlong=options.pop("overlong", "truncate_prompt"),
                                    chat_template=options.pop("chat_template", None))
    ledger = new_ledger("test", max_drop_fraction)
    spec = DataSpec(path=str(path), tokenizer_path=tokenizer_dir, tokenization=tokenization, **options)
    rows = build_pair_dataset(spec, ledger, num_tasks=2, task_cpus=0.5).take_all()
    summary = close_ledger(ledger)
    check_drop_fraction(summary, max_drop_fraction)
    return sorted(rows, key=lambda r: (r["file"], r["row"])), summary


@dataclass
class S3Server:
    filesystem: Any  # pyarrow.fs.S3FileSystem, with the credentials
    credentials: str  # KEY:SECRET, as a URI carries them: s3://KEY:SECRET@bucket/path?{options}
    options: str  # what a URI's query names the server by


@pytest.fixture
def s3_server():
    """An S3 server on 127.0.0.1 (moto, in this process): cloud storage without a cloud."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        key, secret = "btrm", "s3cret"
        filesystem = pafs.S3FileSystem(access_key=key, secret_key=secret, endpoint_override=f"127.0.0.1:{port}",
                                       scheme="http", region="us-east-1", allow_bucket_creation=True)
        yield S3Server(filesystem, f"{key}:{secret}", f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1")
    finally:
        server.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ScoringService:
    url: str
    options: Any  # btrm.serving.ServiceOptions
    token: str

    def client(self, token: str | None = "", **kwargs):
        """An HTTP client with the service's token ("": the right one; None: no token; else that one)."""
        import httpx

        token = self.token if token == "" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)


@contextmanager
def scoring_service(model_dir, secrets: Path, token: str, name: str, **limits):
    """The Serve application on 127.0.0.1 (a free port), built as a Serve config builds it; shut down after."""
    from ray import serve

    from btrm.serving import ServiceOptions, app_builder

    token_file = secrets / "token"
    token_file.write_text(token + "\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    try:
        args = dict(model_path=str(model_dir), token_file=str(token_file), **limits)
        serve.run(app_builder(args), name=name, route_prefix="/")
        yield ScoringService(f"http://127.0.0.1:{port}", ServiceOptions(**args), token)
    finally:
        serve.shutdown()
