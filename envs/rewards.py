"""Reward functions: anything that scores a batch of (prompt, completion) texts.

The environment calls ``score`` once per step with *all* the episodes that ended in that step, so a
learned reward model gets one batched forward pass instead of one call per episode.

:class:`RewardFunction` is the interface of the env's reward slot (named so it does not clash with
the trainable Bradley-Terry :class:`rlhfgym.envs.feedback.reward_model.RewardModel`, one of the
objects that fill the slot). ``rlhfgym.envs.rewards.RewardModel`` is its old name, kept for one
release with a ``DeprecationWarning``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from .moved import moved_attributes
from .tasks.base import Task

__all__ = ["RewardFunction", "GoldReward", "ZeroReward", "check_scores"]


@runtime_checkable
class RewardFunction(Protocol):
    """The reward-slot interface (structural: any object with this ``score`` method qualifies).

    ``score(prompts, completions)`` returns a float tensor of shape ``(B,)`` with one finite scalar
    reward per pair; ``len(prompts) == len(completions) == B``. It may live on any device (the env
    moves it). Higher is better.
    """

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor: ...


class GoldReward:
    """The task's gold scorer as a reward function (``Task.gold``, in ``[-1, 1]`` for built-in tasks)."""

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


class ZeroReward:
    """Scores every completion 0: an env whose only reward is its KL term. For agents that learn from
    preferences alone (Nash-MD), whose episodes need no reward-model pass."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        return torch.zeros(len(completions), dtype=torch.float32)

    def __repr__(self) -> str:
        return "ZeroReward()"


def check_scores(reward_model: RewardFunction, scores, n: int) -> torch.Tensor:
    """What ``reward_model.score`` returned for ``n`` pairs, as a float tensor of shape ``(n,)``.

    Raises:
        ValueError: the scores are not numbers, do not have shape ``(n,)``, or are not all finite
            (a NaN or inf reward would silently poison every return it is summed into).
    """
    if not isinstance(scores, torch.Tensor):
        try:
            scores = torch.as_tensor(scores, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{reward_model!r}.score() returned {type(scores).__name__} {scores!r:.60} for {n} completions; "
                f"it must return a float tensor of shape ({n},)."
            ) from None
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"{reward_model!r}.score() returned a {scores.dtype} tensor; it must return real-valued scores.")
    if scores.shape != (n,):
        raise ValueError(
            f"{reward_model!r}.score() returned shape {tuple(scores.shape)} for {n} completions; "
            f"it must return a tensor of shape ({n},) with one score per completion."
        )
    scores = scores.float()
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{reward_model!r}.score() returned a non-finite score ({float(scores[i])}) for pair {i}; "
            "a reward function must return finite scores: fix the reward function (or clip its output)."
        )
    return scores


# the old name of RewardFunction (it clashed with the Bradley-Terry RewardModel of envs/feedback)
__getattr__ = moved_attributes(__name__, {"RewardModel": "rlhfgym.envs.rewards:RewardFunction"})
