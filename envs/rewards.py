"""Reward models: anything that scores a batch of (prompt, completion) texts.

The environment calls ``score`` once per step with *all* the episodes that ended in that step, so a
learned reward model gets one batched forward pass instead of one call per episode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from .tasks.base import Task

__all__ = ["RewardModel", "GoldReward", "check_scores"]


@runtime_checkable
class RewardModel(Protocol):
    """The reward-model interface (structural: any object with this ``score`` method qualifies).

    ``score(prompts, completions)`` returns a float32 tensor of shape ``(B,)`` with one scalar
    reward per pair; ``len(prompts) == len(completions) == B``. It may live on any device (the env
    moves it). Higher is better.
    """

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor: ...


class GoldReward:
    """The task's gold scorer as a reward model (``Task.gold``, in ``[-1, 1]`` for built-in tasks)."""

    def __init__(self, task: Task):
        if not task.has_gold:
            raise ValueError(
                f"task {task.name!r} has no gold scorer, so GoldReward cannot score it; "
                "pass a learned reward model instead."
            )
        self.task = task

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        return torch.tensor(self.task.gold(prompts, completions), dtype=torch.float32)

    def __repr__(self) -> str:
        return f"GoldReward(task={self.task.name!r})"


def check_scores(reward_model: RewardModel, scores, n: int) -> torch.Tensor:
    """Validate what ``reward_model.score`` returned for ``n`` pairs: a float tensor of shape ``(n,)``."""
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.shape != (n,):
        raise ValueError(
            f"{reward_model!r}.score() returned shape {tuple(scores.shape)} for {n} completions; "
            f"it must return a tensor of shape ({n},) with one score per completion."
        )
    return scores.float()
