"""Single-episode gymnasium view of the token-level RLHF MDP."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode

from .config import EnvConfig
from .core import SequenceAccess, TokenMDPCore
from .rewards import RewardFunction
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


class TokenMDPEnv(SequenceAccess, gym.Env):
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

    **Construction**: ``TokenMDPEnv(task, tokenizer, reference, reward_model, config=None, **settings)``
    with an :class:`~.config.EnvConfig` (``settings`` override its fields; ``num_envs`` must be 1 and
    ``autoreset_mode`` None or DISABLED: the single env never autoresets).

    Sequence-level access (for evaluation and baselines, shared with the vector env and the SB3
    adaptor through :class:`~.core.SequenceAccess`): :meth:`prompts`, :meth:`score`, :meth:`gold`,
    :meth:`prefer`, :attr:`config`, :attr:`tokenizer`, :attr:`reference_model`, :attr:`task`,
    :attr:`max_new_tokens`, ...
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        task: Task,
        tokenizer,
        reference: torch.nn.Module,
        reward_model: RewardFunction,
        config: EnvConfig | None = None,
        **settings,
    ):
        config = EnvConfig.merged(config, settings, where="TokenMDPEnv")
        if config.num_envs != 1:
            raise ValueError(
                f"TokenMDPEnv is one episode at a time, got num_envs={config.num_envs}; use "
                "TokenMDPVectorEnv or gym.make_vec(id, num_envs=N) for a batch."
            )
        if config.autoreset_mode not in (None, AutoresetMode.DISABLED):
            raise ValueError(
                f"the single env never autoresets (call reset() after an episode ends), got "
                f"autoreset_mode={config.autoreset_mode.value!r}; autoreset_mode is for gym.make_vec."
            )
        self.core = TokenMDPCore(task, tokenizer, reference, reward_model, config, autoreset_default=AutoresetMode.DISABLED)
        self.observation_space, self.action_space = token_spaces(self.core.vocab_size, self.core.window)
        if config.seed is not None:  # seed now, so the first reset() without a seed is reproducible
            self._np_random, self._np_random_seed = seeding.np_random(config.seed)

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        # The episode's prompt is drawn from the env's own np_random, so gymnasium's seeding rules
        # hold (reset(seed=s) -> same prompts as any other env seeded s, e.g. row 0 of a vector env).
        self.core.rngs[0] = self.np_random
        ids, mask = self.core.reset(options=options)
        return self._obs(ids, mask), {"prompt_index": int(self.core.prompt_index[0]), "prompt": self.core.prompt_text[0]}

    def step(self, action):
        if np.size(action) != 1:  # checked here: the core would read an array as one action per env
            raise ValueError(
                f"the single env takes one action (an int token id in [0, {self.core.vocab_size})), got "
                f"{np.shape(action)} values; batch actions belong to gym.make_vec(...)."
            )
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
