"""Tokenized pairs → model inputs, and a step's pairs → micro-batches.

Two layouts of the same pairs; both give exactly the rewards of the plain two-sequence forward.

**Padded** (:class:`PairBatch`, any model): rows ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``,
each ``prompt + answer``, right-padded to the longest sequence of the batch.

**Packed and prefix-shared** (:class:`PackedBatch`, decoders): every group (a prompt and its answers: a
pair, or a prompt with N candidates) is laid out once as ``[prompt | answer_1 | ... | answer_N]`` and
the groups are concatenated into one row without padding. Answer tokens continue the prompt's
positions, attend to the prompt and to their own answer only, and the reward is read at each answer's
last token. The prompt is computed once instead of once per answer, and no token is padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

# FlexAttention computes in blocks of 128 tokens; packed rows are padded to a multiple of this so that
# compiled kernels see few distinct shapes.
FLEX_BLOCK = 128
# Without FlexAttention (on CPUs) a packed row's mask is dense, [T, T], and attention spans the whole row:
# rows stay this short there (a longer pair goes alone; the options' help texts say this figure).
DENSE_MASK_TOKENS = 1024


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [2B, L]
    attention_mask: torch.Tensor  # [2B, L]
    margin: torch.Tensor  # [B]
    num_pairs: int
    num_tokens: int  # tokens of both sides, prompt counted twice (what a peer would compute unpadded)

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.margin.to(device),
                         self.num_pairs, self.num_tokens)

    def pair_rewards(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rewards of this batch → (chosen, rejected)."""
        return rewards[: self.num_pairs], rewards[self.num_pairs :]


@dataclass
class PackedBatch:
    """Groups packed into one row. ``group``/``segment`` say, for every position, which group it belongs
    to (-1: padding at the row's end) and which part of it (0: the prompt, k: answer k); they are all the
    attention rule needs. ``reward_index`` lists each answer's last position, group by group."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    group: torch.Tensor  # [T] int32
    segment: torch.Tensor  # [T] int32
    reward_index: torch.Tensor  # [sum of answers]
    margin: torch.Tensor  # [groups] (pairs: the preference strength)
    num_pairs: int  # groups
    num_tokens: int  # tokens of every answer's full sequence, prompt counted once per answer
    computed_tokens: int  # tokens in the row, the padding at its end included

    def to(self, device: torch.device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.group.to(device),
                           self.segment.to(device), self.reward_index.to(device), self.margin.to(device),
                           self.num_pairs, self.num_tokens, self.computed_tokens)

    def pair_rewards(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rewards of a batch of pairs → (chosen, rejected)."""
        return rewards[0::2], rewards[1::2]

    def mask_mod(self) -> Callable:
        """The attention rule as a FlexAttention ``mask_mod``: same group, causal, and an answer never sees
        another answer. Written with tensor indexing, so it also broadcasts over index grids."""
        group, segment = self.group, self.segment

        def allowed(batch, head, q, kv):
            same_group = group[q] == group[kv]
            visible_part = (segment[kv] == 0) | (segment[kv] == segment[q])
            return same_group & visible_part & (kv <= q)

        return allowed

    def block_mask(self):
        """The attention rule as FlexAttention's ``BlockMask``, read off the layout block by block: the
        blocks ``create_block_mask`` finds, without its ``[T, T]`` evaluation (eager) or its compilation
        (17-60 s on an H200 machine, again for the first rows of a new length). Rows must be whole blocks.

        Groups lie in order along the row, each as prompt, answer 1, answer 2, ...; so the groups a block
        holds are a range, and a KV block ``j`` before a Q block ``i`` can share only one group: ``j``'s
        last and ``i``'s first. Within it, ``j``'s part is a run of segments (its tail) and ``i``'s part
        another (its head): some query there sees some key iff the tail holds prompt tokens or the two
        runs share a segment. The pair is full (no masking inside) iff both blocks lie wholly in that group
        and every key is prompt or the one answer all the queries are in. A diagonal block is partial.
        """
        from torch.nn.attention.flex_attention import BlockMask

        length = self.input_ids.shape[1]
        if length % FLEX_BLOCK:
            raise ValueError(f"a packed row of {length} tokens: FlexAttention rows are padded to a multiple of {FLEX_BLOCK}")
        blocks = length // FLEX_BLOCK
        # The end padding (group -1, segment 0) is one more group after the last: ids then rise along the row.
        group = torch.where(self.group < 0, self.num_pairs, self.group).view(blocks, FLEX_BLOCK)
        segment = self.segment.view(blocks, FLEX_BLOCK)
        first_group, last_group = group[:, 0], group[:, -1]
        tail_start = (group == last_group[:, None]).int().argmax(1, keepdim=True)
        tail_min, tail_max = segment.gather(1, tail_start).squeeze(1), segment[:, -1]
        head_end = FLEX_BLOCK - 1 - (group == first_group[:, None]).flip(1).int().argmax(1, keepdim=True)
        head_min, head_max = segment[:, 0], segment.gather(1, head_end).squeeze(1)
        index = torch.arange(blocks, device=group.device)
        below = (index[None, :] < index[:, None]) & (last_group[None, :] == first_group[:, None])  # [q, kv]
        seen = (tail_min[None, :] == 0) | (torch.maximum(tail_min[None, :], head_min[:, None])
                                           <= torch.minimum(tail_max[None, :], head_max[:, None]))
        whole = first_group == last_group
        one_answer = (tail_min.clamp(min=1) == tail_max)[None, :] & (head_min[:, None] == tail_max[None, :]) & \
            (head_max[:, None] == tail_max[None, :])
        full = below & whole[None, :] & whole[:, None] & ((tail_max == 0)[None, :] | one_answer)
        partial = (below & seen & ~full) | (index[None, :] == index[:, None])

        def kv_blocks(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """[q, kv] booleans → per Q block, how many KV blocks and which (kept ones first, in order)."""
            order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)
            return kept.sum(1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

        return BlockMask.from_kv_blocks(*kv_blocks(partial), *kv_blocks(full), BLOCK_SIZE=FLEX_BLOCK,
                                        mask_mod=self.mask_mod(), seq_lengths=(length, length))

    def attention_mask(self, implementation: str):
        """The rule in the form the attention implementation takes: a ``BlockMask`` for flex_attention, a
        dense ``[1, 1, T, T]`` mask otherwise (boolean for sdpa, additive for eager)."""
        length = self.input_ids.shape[1]
        if implementation == "flex_attention":
            return self.block_mask()
        index = torch.arange(length, device=self.input_ids.device)
        dense = self.mask_mod()(None, None, index[:, None], index[None, :])[None, None]
        if implementation == "sdpa":
            return dense
        return torch.zeros(dense.shape, dtype=torch.float32, device=dense.device).masked_fill(
            ~dense, torch.finfo(torch.float32).min)


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


def pack_groups(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]],
                pad_token_id: int, margin: Sequence[float] | None = None, pad_to_multiple: int = 1) -> PackedBatch:
    """Groups (``prompts[g]`` with its answers ``answers[g]``) → one :class:`PackedBatch` row.

    Every answer must be non-empty (its last token carries its reward; tokenization guarantees it)."""
    ids: list[np.ndarray] = []
    positions, groups, segments, reward_index = [], [], [], []
    num_tokens = 0
    offset = 0
    for g, (prompt, tails) in enumerate(zip(prompts, answers)):
        prompt = np.asarray(prompt, dtype=np.int64)
        ids.append(prompt)
        positions.append(np.arange(len(prompt)))
        groups.append(np.full(len(prompt), g))
        segments.append(np.zeros(len(prompt), dtype=np.int64))
        offset += len(prompt)
        for k, tail in enumerate(tails, start=1):
            tail = np.asarray(tail, dtype=np.int64)
            if len(tail) == 0:
                raise ValueError(f"group {g}, answer {k}: an empty answer has no token to read a reward at")
            ids.append(tail)
            positions.append(np.arange(len(prompt), len(prompt) + len(tail)))
            groups.append(np.full(len(tail), g))
            segments.append(np.full(len(tail), k))
            offset += len(tail)
            reward_index.append(offset - 1)
            num_tokens += len(prompt) + len(tail)
    padding = -offset % pad_to_multiple
    if pad_to_multiple > 1:
        # Two blocks at least: compiled FlexAttention kernels are traced for dynamic row lengths, which never cover
        # one block, so a row of one (a short request to the service) compiled them again, for seconds.
        padding = max(padding, 2 * pad_to_multiple - offset)
    if padding:
        ids.append(np.full(padding, pad_token_id))
        positions.append(np.arange(padding))
        groups.append(np.full(padding, -1))
        segments.append(np.zeros(padding, dtype=np.int64))
    as_tensor = lambda parts, dtype: torch.from_numpy(np.concatenate(parts).astype(dtype))  # noqa: E731
    return PackedBatch(
        input_ids=as_tensor(ids, np.int64)[None],
        position_ids=as_tensor(positions, np.int64)[None],
        group=as_tensor(groups, np.int32),
        segment=as_tensor(segments, np.int32),
        reward_index=torch.tensor(reward_index, dtype=torch.long),
        margin=torch.tensor(list(margin) if margin is not None else [0.0] * len(prompts), dtype=torch.float32),
        num_pairs=len(prompts),
        num_tokens=num_tokens,
        computed_tokens=offset + padding,
    )


def pack_pairs(batch: dict[str, Any], pad_token_id: int, pad_to_multiple: int = 1) -> PackedBatch:
    """A Ray Data numpy batch of tokenized pairs → a :class:`PackedBatch` (rewards: chosen, rejected, ...)."""
    return pack_groups(batch["prompt_ids"], list(zip(batch["chosen_ids"], batch["rejected_ids"])), pad_token_id,
                       margin=batch["margin"], pad_to_multiple=pad_to_multiple)


def packed_length(batch: dict[str, Any], i: int) -> int:
    """Tokens pair ``i`` takes in a packed row: the prompt once, both answers."""
    return len(batch["prompt_ids"][i]) + len(batch["chosen_ids"][i]) + len(batch["rejected_ids"][i])


def plan_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices cut into micro-batches of at most ``max_tokens`` tokens, longest first into the first one
    that has room (first-fit decreasing: few, full micro-batches). A longer item goes alone."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b in range(len(bins)):
            if lengths[i] <= room[b]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def plan_by_count(order: Sequence[int], per_batch: int) -> list[list[int]]:
    """``order`` cut in turn, ``per_batch`` indices at a time."""
    return [sorted(order[start : start + per_batch]) for start in range(0, len(order), per_batch)]


def padded_length(batch: dict[str, Any], i: int) -> int:
    """The row length pair ``i`` pads its micro-batch to: its longer sequence."""
    return len(batch["prompt_ids"][i]) + max(len(batch["chosen_ids"][i]), len(batch["rejected_ids"][i]))


def split_to(plan: list[list[int]], count: int, lengths: Sequence[int]) -> list[list[int]]:
    """Splits the heaviest micro-batches in two until there are ``count`` (workers must run as many
    forwards as each other: ZeRO pairs up their collectives). ``count`` may not exceed the items."""
    plan = [list(b) for b in plan]
    if count > sum(len(b) for b in plan):
        raise ValueError(f"cannot cut {sum(len(b) for b in plan)} items into {count} micro-batches")
    weight = lambda b: sum(lengths[i] for i in b)  # noqa: E731
    while len(plan) < count:
        heaviest = max((b for b in plan if len(b) > 1), key=weight)
        plan.remove(heaviest)
        halves: tuple[list[int], list[int]] = ([], [])
        for i in sorted(heaviest, key=lambda i: -lengths[i]):
            min(halves, key=weight).append(i)
        plan.extend(sorted(h) for h in halves)
    return plan


def take(batch: dict[str, Any], indices: Sequence[int]) -> dict[str, Any]:
    """The rows ``indices`` of a numpy batch."""
    return {k: v[list(indices)] if isinstance(v, np.ndarray) else [v[i] for i in indices] for k, v in batch.items()}


@dataclass(frozen=True)
class MicroBatcher:
    """How pairs become micro-batches: packed under a token budget, or padded a fixed number at a time.
    Training, evaluation during training and the benchmark all cut pairs with it."""

    packed: bool
    pad_token_id: int
    max_tokens: int  # packed: tokens per micro-batch (0: pairs_per_batch pairs, packed)
    pairs_per_batch: int  # padded, or packed without a token budget: pairs per micro-batch
    pad_to_multiple: int = 1  # packed rows for flex_attention: FLEX_BLOCK

    def lengths(self, pairs: dict[str, Any]) -> list[int]:
        """What each pair costs its micro-batch: its packed tokens, or the length of its padded rows."""
        length = packed_length if self.packed else padded_length
        return [length(pairs, i) for i in range(len(pairs["prompt_ids"]))]

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Micro-batches (index lists) of pairs that cost ``lengths`` (see :meth:`lengths`). Padded ones
        are cut from the pairs in order of length, so that each pads to a length close to all of its own;
        a step's loss and gradients are the same however its pairs are cut."""
        if self.packed and self.max_tokens:
            return plan_by_tokens(lengths, self.max_tokens)
        if self.packed:
            return plan_by_count(range(len(lengths)), self.pairs_per_batch)
        return plan_by_count(sorted(range(len(lengths)), key=lambda i: -lengths[i]), self.pairs_per_batch)

    def collate(self, pairs: dict[str, Any]) -> PairBatch | PackedBatch:
        if self.packed:
            return pack_pairs(pairs, self.pad_token_id, self.pad_to_multiple)
        return collate_pairs(pairs, self.pad_token_id)

    def describe(self) -> str:
        if self.packed:
            size = f"at most {self.max_tokens} tokens" if self.max_tokens else f"{self.pairs_per_batch} pair(s)"
            return f"packed micro-batches of {size}, the prompt computed once per pair"
        return f"padded micro-batches of {self.pairs_per_batch} pair(s), the step's pairs taken in order of length"
