"""Scoring with an exported reward model: what the evaluation job and the Serve deployment share.

The tokenization comes from the model's manifest (chat template, max length, truncation policy, reward
token), so a score here equals the score training optimised and the score of every other consumer.
Decoders score packed, prompt-shared rows, as training computed them; encoders padded sequences.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Sequence

import torch

from btrm.batching import DENSE_MASK_TOKENS, FLEX_BLOCK, pack_groups, pad_sequences, plan_by_tokens
from btrm.config import SCORING_DTYPES
from btrm.export import read_manifest
from btrm.model import RewardModel, embedding_rows, load_reward_model, packing_unsupported, reward_head
from btrm.tokenize import (PairTokenizer, SharedPromptIds, TokenizationSpec, Tools, load_tokenizer,
                           tokens_past_embedding)


def length_buckets(lengths: Sequence[int], max_padding_ratio: float = 2.0) -> list[list[int]]:
    """Indices grouped so that no sequence is padded to more than ``max_padding_ratio`` times its length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and lengths[i] <= max_padding_ratio * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def _answer_parts(group: SharedPromptIds, max_tokens: int) -> list[list[int]]:
    """A group's answers cut into parts that fit a row with the prompt (each part repeats it)."""
    parts: list[list[int]] = [[]]
    room = max_tokens - len(group.prompt_ids)
    for k, tail in enumerate(group.tails):
        if parts[-1] and len(tail) > room:
            parts.append([])
            room = max_tokens - len(group.prompt_ids)
        parts[-1].append(k)
        room -= len(tail)
    return parts


def scoring_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a GPU that computes in it natively (as bf16 training computes its rewards, at half
    the memory and twice the speed of float32), float32 elsewhere (CPUs and older GPUs only emulate it)."""
    if name not in SCORING_DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {list(SCORING_DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    return getattr(torch, name)


class ConversationEncoder:
    """An exported model's tokenization, without its weights: conversations → the token ids its manifest's
    policy gives (chat template, max length, truncation, reward token), checked against its embedding.
    What the scoring service's HTTP replicas hold; a :class:`RewardScorer` loads one when asked to score
    conversations."""

    def __init__(self, model_dir: str, max_length: int | None = None):
        from transformers import AutoConfig

        self.manifest = read_manifest(model_dir)
        tokenization = dict(self.manifest["tokenization"])
        if max_length is not None:
            tokenization["max_length"] = max_length
        self.spec = TokenizationSpec(**tokenization)
        self.tokenizer = PairTokenizer(load_tokenizer(model_dir), self.spec)
        # From the config, as training and evaluation read it (resize_token_embeddings keeps it in step).
        self.embedding_rows = embedding_rows(AutoConfig.from_pretrained(model_dir))

    def encode_group(self, conversations: Sequence[Sequence[dict]], tools: Tools = None) -> SharedPromptIds:
        """Conversations sharing a prompt (offering ``tools``) → token ids under the manifest's policy
        (RowDropped if overlong; TokensPastEmbedding if the text holds a token the model has no row for)."""
        encoded = self.tokenizer.encode_group(conversations, tools)
        error = tokens_past_embedding(self.tokenizer.tokenizer, encoded, self.embedding_rows)
        if error:
            raise error
        return encoded


def is_cuda_error(error: BaseException) -> bool:
    """A CUDA error: it sticks to the process (a device-side assert, an illegal memory access), and every later
    forward on its GPU fails. Out of memory is not one: it leaves the GPU usable. A compiled kernel's launch
    (Triton's: FlexAttention's kernels) reports one as a plain RuntimeError."""
    return isinstance(error, torch.AcceleratorError) or (isinstance(error, RuntimeError)
                                                         and str(error).startswith("Triton Error [CUDA]"))


def ray_actor_device() -> str | None:
    """Where a Ray actor scores: on its GPU where Ray gave it one, else on the CPU (Ray leaves an actor given
    no GPU the machine's CUDA_VISIBLE_DEVICES: torch would find the GPUs and take one Ray gave another).
    None outside an actor (a driver, a script): RewardScorer's own choice."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return "cuda" if ray.get_gpu_ids() else "cpu"


def actor_scorer(model_dir: str, **options) -> "RewardScorer":
    """A :class:`RewardScorer` in a Ray actor (an evaluation's scorer, the service's model replica): on the device
    Ray gave the actor, and without transformers' "Loading weights" bar, which Ray streams into the job's or the
    service's console once per actor (the training workers turn theirs off too)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return RewardScorer(model_dir, ray_actor_device(), **options)


class RewardScorer:
    """An exported model ready to score token sequences and conversations."""

    def __init__(self, model_dir: str, device: str | torch.device | None = None, max_length: int | None = None,
                 dtype: str = "auto"):
        self.model_dir, self.max_length = model_dir, max_length
        self.manifest = read_manifest(model_dir)
        self.pad_token_id = self.manifest["pad_token_id"]  # the export's tokenizer's, recorded
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = scoring_dtype(dtype, self.device)
        self.model = load_reward_model(model_dir, self.pad_token_id, self.dtype, trained=True).to(self.device).eval()
        head = reward_head(self.model)
        if self.dtype != torch.float32 and head is not None:
            # The score head in float32 (one dot product a token): a bfloat16 one puts rewards on a grid of 2^-8 of
            # their size (steps of 1/64 at a reward of 3), where close answers tie and margins step.
            head.float()
            head.register_forward_pre_hook(lambda module, args: (args[0].float(),))
        self.packed = packing_unsupported(self.model) is None
        self.flex = self.packed and self.device.type == "cuda"
        if self.packed:
            self.model.set_attn_implementation("flex_attention" if self.flex else "sdpa")
        self.reward_model = RewardModel(self.model)
        # time.monotonic() when the latest forward began: a batch is many forwards, and a service that watches for
        # a hung GPU (RewardModelDeployment.check_health) times each of them, not the whole batch.
        self.forward_began = -math.inf

    @functools.cached_property
    def encoder(self) -> ConversationEncoder:
        """The model's tokenization, loaded on first use: the service's model replicas and the evaluation's
        scoring actors are handed token ids, and never load a tokenizer."""
        return ConversationEncoder(self.model_dir, self.max_length)

    @torch.no_grad()
    def rewards(self, sequences: Sequence[Sequence[int]], max_batch_tokens: int = 32768) -> list[float]:
        """Rewards of whole token sequences, padded: grouped by length (none padded to more than twice its
        length) and cut into batches of at most ``max_batch_tokens`` padded tokens."""
        rewards = [0.0] * len(sequences)
        for bucket in length_buckets([len(s) for s in sequences]):
            start = 0
            while start < len(bucket):
                end = start + 1
                while end < len(bucket) and (end - start + 1) * len(sequences[bucket[end]]) <= max_batch_tokens:
                    end += 1
                chunk = bucket[start:end]
                input_ids, attention_mask = pad_sequences([sequences[i] for i in chunk], self.pad_token_id)
                self.forward_began = time.monotonic()
                scores = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=attention_mask.to(self.device)).logits.squeeze(-1).float()
                for i, score in zip(chunk, scores.tolist()):
                    rewards[i] = score
                start = end
        return rewards

    @torch.no_grad()
    def group_rewards(self, groups: Sequence[SharedPromptIds], max_batch_tokens: int = 32768) -> list[list[float]]:
        """Rewards of groups (a prompt and its answers: a pair, or candidates), each group's in answer
        order. Decoders: packed rows of at most ``max_batch_tokens`` tokens, each prompt computed once per
        row (a group too long for one row is split, the prompt repeated); encoders: padded sequences. A
        group's identical answers are scored once: they get exactly one reward (in a packed row their places
        would make them differ in the last bits, and a ranking would put one first)."""
        unique = [list(dict.fromkeys(map(tuple, group.tails))) for group in groups]
        if any(len(answers) < len(group.tails) for answers, group in zip(unique, groups)):
            distinct = [SharedPromptIds(group.prompt_ids, [list(t) for t in answers], group.truncated)
                        for group, answers in zip(groups, unique)]
            rewards = self.group_rewards(distinct, max_batch_tokens)
            return [[scores[answers.index(tuple(tail))] for tail in group.tails]
                    for group, answers, scores in zip(groups, unique, rewards)]
        if not self.packed:
            flat = iter(self.rewards([g.sequence(k) for g in groups for k in range(len(g.tails))], max_batch_tokens))
            return [[next(flat) for _ in g.tails] for g in groups]
        budget = max_batch_tokens if self.flex else min(max_batch_tokens, DENSE_MASK_TOKENS)
        parts = [(g, answers) for g, group in enumerate(groups) for answers in _answer_parts(group, budget)]
        lengths = [len(groups[g].prompt_ids) + sum(len(groups[g].tails[k]) for k in answers) for g, answers in parts]
        rewards = [[0.0] * len(g.tails) for g in groups]
        rows, broken = plan_by_tokens(lengths, budget), []
        for row in rows:
            batch = pack_groups([groups[parts[i][0]].prompt_ids for i in row],
                                [[groups[parts[i][0]].tails[k] for k in parts[i][1]] for i in row],
                                self.pad_token_id, pad_to_multiple=FLEX_BLOCK if self.flex else 1)
            self.forward_began = time.monotonic()
            scores = self.reward_model(batch.to(self.device)).tolist()
            if not all(map(math.isfinite, scores)):
                broken.append({parts[i][0] for i in row})
            scores = iter(scores)
            for i in row:
                g, answers = parts[i]
                for k in answers:
                    rewards[g][k] = next(scores)
        # A packed row is one attention: a group whose activations overflow makes every reward of its row NaN
        # (a masked-out NaN value times its zero weight is still NaN). The groups of such a row are scored again
        # alone, so that an overflow costs its own group only. Where every row of several broke, the model may
        # have diverged, and scoring alone would mend nothing at a forward a group: a one-token forward tells.
        if len(broken) == len(rows) > 1 and not self.scores_finitely():
            return rewards
        for g in sorted(set().union(*(row for row in broken if len(row) > 1))):
            rewards[g] = self.group_rewards([groups[g]], max_batch_tokens)[0]
        return rewards

    @torch.no_grad()
    def scores_finitely(self) -> bool:
        """Whether the model scores a one-token answer to a one-token prompt as a finite number: a diverged
        model (NaN weights) does not, where a model that some inputs overflow does."""
        batch = pack_groups([[self.pad_token_id]], [[[self.pad_token_id]]], self.pad_token_id,
                            pad_to_multiple=FLEX_BLOCK if self.flex else 1)
        return all(map(math.isfinite, self.reward_model(batch.to(self.device)).tolist()))

    def pair_rewards(self, pairs: dict[str, Any], max_batch_tokens: int = 32768) -> tuple[list[float], list[float]]:
        """Rewards of tokenized pairs (columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids``)."""
        groups = [SharedPromptIds(list(p), [list(c), list(r)], 0)
                  for p, c, r in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"])]
        rewards = self.group_rewards(groups, max_batch_tokens)
        return [r[0] for r in rewards], [r[1] for r in rewards]

    def score_group(self, conversations: Sequence[Sequence[dict]],
                    tools: Tools = None) -> tuple[list[float], SharedPromptIds]:
        encoded = self.encoder.encode_group(conversations, tools)
        return self.group_rewards([encoded])[0], encoded
