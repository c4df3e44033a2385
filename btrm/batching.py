"""Batches of tokenized pairs → model inputs.

Chosen and rejected go through one forward: rows ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``,
right-padded to the longest sequence of the batch (not to max_length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [2B, L]
    attention_mask: torch.Tensor  # [2B, L]
    margin: torch.Tensor  # [B]
    num_pairs: int
    num_tokens: int  # tokens of both sides, prompt counted twice (what a peer would compute unpadded)

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.margin.to(device),
                         self.num_pairs, self.num_tokens)


def pad_sequences(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = torch.from_numpy(np.array(s, dtype=np.int64))
        attention_mask[i, : len(s)] = 1
    return input_ids, attention_mask


def collate_pairs(batch: dict[str, Any], pad_token_id: int) -> PairBatch:
    """A Ray Data numpy batch of tokenized pairs → a :class:`PairBatch`."""
    prompts = [np.asarray(p, dtype=np.int64) for p in batch["prompt_ids"]]
    chosen = [np.concatenate([p, np.asarray(c, dtype=np.int64)]) for p, c in zip(prompts, batch["chosen_ids"])]
    rejected = [np.concatenate([p, np.asarray(r, dtype=np.int64)]) for p, r in zip(prompts, batch["rejected_ids"])]
    input_ids, attention_mask = pad_sequences(chosen + rejected, pad_token_id)
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        margin=torch.from_numpy(np.array(batch["margin"], dtype=np.float32)),
        num_pairs=len(prompts),
        num_tokens=int(sum(len(s) for s in chosen) + sum(len(s) for s in rejected)),
    )
