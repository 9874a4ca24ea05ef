"""Group advantages as TRL's GRPOTrainer computes them, for the score job of a GRPO round over the
arrays (jobs.scoring.rounds), with TRL's own nanstd."""

from __future__ import annotations

import math

import torch
from trl.trainer.utils import nanstd


def totals(rewards_per_func: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Each sample's weighted sum of the rewards that scored it; NaN where none did (TRL's unscorable)."""
    summed = (rewards_per_func * torch.tensor(weights, dtype=rewards_per_func.dtype)).nansum(dim=1)
    summed[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
    return summed


def advantages(rewards_per_func: torch.Tensor, weights: list[float], group_size: int, scale_rewards: str) -> torch.Tensor:
    """TRL's advantages (GRPOTrainer._generate_and_score_completions, sum_then_normalize): groups side
    by side, the reward minus its group's mean, divided by the group's std (``group``), the batch's
    (``batch``) or nothing (``none``) plus 1e-4; unscorable samples 0."""
    rewards = totals(rewards_per_func, weights)
    mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    centered = rewards - mean
    if scale_rewards == "group":
        centered = centered / (nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size) + 1e-4)
    elif scale_rewards == "batch":
        centered = centered / (nanstd(rewards) + 1e-4)
    return torch.nan_to_num(centered, nan=0.0)
