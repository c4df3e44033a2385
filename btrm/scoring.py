"""Scoring with an exported reward model: what the evaluation job and the Serve deployment share.

The tokenization comes from the model's manifest (chat template, max length, truncation policy, reward
token), so a score here equals the score training optimised and the score of every other consumer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from btrm.batching import pad_sequences
from btrm.export import read_manifest
from btrm.model import forward_rewards, load_reward_model, load_tokenizer
from btrm.tokenize import PairTokenizer, SharedPromptIds, TokenizationSpec


class RewardScorer:
    """An exported model ready to score token sequences and conversations."""

    def __init__(self, model_dir: str, device: str | torch.device | None = None, max_length: int | None = None):
        self.manifest = read_manifest(model_dir)
        tokenization = dict(self.manifest["tokenization"])
        if max_length is not None:
            tokenization["max_length"] = max_length
        self.spec = TokenizationSpec(**tokenization)
        self.tokenizer = PairTokenizer(load_tokenizer(model_dir), self.spec)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_reward_model(model_dir, self.tokenizer.tokenizer.pad_token_id).to(self.device).eval()

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.tokenizer.pad_token_id

    @torch.no_grad()
    def rewards(self, sequences: Sequence[Sequence[int]], max_batch_tokens: int = 32768) -> list[float]:
        """Rewards of token sequences. Sorted by length and cut into batches of at most
        ``max_batch_tokens`` padded tokens, so short sequences are not padded to long ones."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        rewards = [0.0] * len(sequences)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(sequences[order[end]]) <= max_batch_tokens:
                end += 1
            chunk = order[start:end]
            input_ids, attention_mask = pad_sequences([sequences[i] for i in chunk], self.pad_token_id)
            scores = forward_rewards(self.model, input_ids.to(self.device), attention_mask.to(self.device))
            for i, score in zip(chunk, scores.tolist()):
                rewards[i] = score
            start = end
        return rewards

    def encode_group(self, conversations: Sequence[Sequence[dict]]) -> SharedPromptIds:
        """Conversations sharing a prompt → token ids under the manifest's policy (RowDropped if overlong)."""
        return self.tokenizer.encode_group(conversations)

    def score_group(self, conversations: Sequence[Sequence[dict]]) -> tuple[list[float], SharedPromptIds]:
        encoded = self.encode_group(conversations)
        return self.rewards([encoded.sequence(k) for k in range(len(encoded.tails))]), encoded
