"""Single-episode gymnasium view of the token-level RLHF MDP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode

from .core import TokenMDPCore
from .rewards import RewardModel
from .tasks.base import Task

__all__ = ["TokenMDPEnv", "token_spaces"]


def token_spaces(vocab_size: int, window: int) -> tuple[spaces.Dict, spaces.Discrete]:
    """Observation and action space of one episode (see docs/DESIGN.md, "The token MDP")."""
    observation_space = spaces.Dict(
        {
            "input_ids": spaces.Box(0, vocab_size - 1, shape=(window,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(window,), dtype=np.int64),
        }
    )
    return observation_space, spaces.Discrete(vocab_size)


class TokenMDPEnv(gym.Env):
    """Generate a completion for a prompt, one token per step.

    **Observation**: ``{"input_ids": int64 (W,), "attention_mask": int64 (W,)}``, right-aligned
    (left-padded): the newest token is the last column, ``W = max_prompt_tokens + max_new_tokens``.
    The first observation is the (possibly left-truncated) prompt.

    **Action**: ``Discrete(V)``, the next token id (``V = len(tokenizer)``).

    **Episode end**: *terminated* when the action is the EOS token; *truncated* after
    ``max_new_tokens`` actions. Stepping after either raises ``gymnasium.error.ResetNeeded``:
    call ``reset()``.

    **Reward** for action ``a_t`` in state ``s_t`` (prompt + the tokens so far)::

        r_t = kl_coef * log pi_ref(a_t | s_t)          (+ RM(prompt, completion) on the last step)

    so an agent that adds ``-kl_coef * log pi(a_t | s_t)`` to every reward gets the return
    ``sum_t r_t - kl_coef * log pi(a_t|s_t) = RM(prompt, completion) - kl_coef * sum_t log(pi(a_t|s_t) / pi_ref(a_t|s_t))``,
    the KL-regularised RLHF objective. With ``kl_coef == 0`` the reference model is not run and
    ``info["ref_logprob"]`` is ``0.0``.

    **info**: ``ref_logprob`` (float, ``log pi_ref(a_t|s_t)``) every step; on the last step also
    ``rm_score``, ``gold`` (NaN if the task has none), ``completion`` (text, special tokens removed),
    ``ref_logprob_sum`` and ``length`` (tokens generated, EOS included). ``reset`` returns
    ``{"prompt_index", "prompt"}``.

    **reset options**: ``{"prompt_index": i}`` uses prompt ``i`` of the split instead of sampling;
    ``{"split": "validation"}`` switches the split for this and later episodes.

    Sequence-level helpers (for evaluation and baselines): :meth:`prompts`, :meth:`score`,
    :meth:`gold`, :attr:`tokenizer`, :attr:`reference_model`, :attr:`task`.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        task: Task,
        tokenizer,
        reference: torch.nn.Module,
        reward_model: RewardModel,
        *,
        split: str = "train",
        kl_coef: float = 0.05,
        max_prompt_tokens: int = 128,
        max_new_tokens: int = 32,
        device: str | torch.device = "cpu",
        compute_ref: bool | None = None,
        seed: int | None = None,
    ):
        self.core = TokenMDPCore(
            task,
            tokenizer,
            reference,
            reward_model,
            num_envs=1,
            split=split,
            kl_coef=kl_coef,
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_new_tokens,
            device=device,
            autoreset_mode=AutoresetMode.DISABLED,
            compute_ref=compute_ref,
        )
        self.observation_space, self.action_space = token_spaces(self.core.vocab_size, self.core.window)
        if seed is not None:  # seed now, so the first reset() without a seed is reproducible
            self._np_random, self._np_random_seed = seeding.np_random(seed)

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        # The episode's prompt is drawn from the env's own np_random, so gymnasium's seeding rules
        # hold (reset(seed=s) -> same prompts as any other env seeded s, e.g. row 0 of a vector env).
        self.core.rngs[0] = self.np_random
        ids, mask = self.core.reset(options=options)
        return self._obs(ids, mask), {"prompt_index": int(self.core.prompt_index[0]), "prompt": self.core.prompt_text[0]}

    def step(self, action):
        r = self.core.step(np.asarray(action).reshape(1))
        terminated, truncated = bool(r.terminated[0]), bool(r.truncated[0])
        info: dict[str, Any] = {"ref_logprob": float(r.ref_logprob[0])}
        if r.finished.size:
            info.update(
                rm_score=float(r.rm_score[0]),
                gold=float(r.gold[0]),
                completion=r.completions[0],
                ref_logprob_sum=float(r.ref_logprob_sum[0]),
                length=int(r.length[0]),
            )
        return self._obs(r.input_ids, r.attention_mask), float(r.reward[0]), terminated, truncated, info

    @staticmethod
    def _obs(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
        # fresh arrays: the caller may keep or modify them without touching the env's state
        return {"input_ids": ids[0].cpu().numpy().copy(), "attention_mask": mask[0].cpu().numpy().copy()}

    # ------------------------------------------------------------------ sequence-level access
    @property
    def task(self) -> Task:
        return self.core.task

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def reference_model(self) -> torch.nn.Module:
        """The frozen reference policy ``pi_ref`` (a causal LM on the env's device)."""
        return self.core.reference

    @property
    def reward_model(self) -> RewardModel:
        return self.core.reward_model

    @property
    def kl_coef(self) -> float:
        return self.core.kl_coef

    @property
    def max_new_tokens(self) -> int:
        return self.core.max_new_tokens

    @property
    def device(self) -> torch.device:
        return self.core.device

    def prompts(self, split: str = "train", n: int | None = None, start: int = 0) -> list[str]:
        """``n`` consecutive prompts of a task split from ``start`` (all of it when ``n`` is None)."""
        return self.core.prompts(split, n, start)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Reward-model scores ``(B,)`` of (prompt, completion) pairs, as the env would reward them."""
        return self.core.score(prompts, completions)

    def gold(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Gold scores of (prompt, completion) pairs from the task."""
        return self.core.gold(prompts, completions)

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """P(a ≻ b | prompt) from the env's feedback (see :meth:`~.core.TokenMDPCore.prefer`)."""
        return self.core.prefer(prompts, a, b)
