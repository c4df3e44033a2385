"""The Bradley-Terry objective and its metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """``-log(sigmoid(r_chosen - r_rejected - margin))``, averaged over pairs.

    ``margin`` asks the chosen reward to win by at least that much (a preference strength, as in
    Llama 2's reward models). ``center_rewards_coefficient`` adds ``c * mean((r_chosen + r_rejected)^2)``,
    which keeps rewards centred on zero (as TRL's RewardTrainer does). ``reduction="sum"`` sums over pairs
    instead (a training step divides the sum of its micro-batches by the step's pair count).
    """
    difference = r_chosen - r_rejected
    if margin is not None:
        difference = difference - margin
    per_pair = -F.logsigmoid(difference)
    if center_rewards_coefficient:
        per_pair = per_pair + center_rewards_coefficient * (r_chosen + r_rejected) ** 2
    return per_pair.sum() if reduction == "sum" else per_pair.mean()


def pair_correct(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """1 where the chosen answer scores strictly higher; a tie counts as wrong."""
    return (r_chosen > r_rejected).float()
