"""Torch-native vector env: ``N`` token-level RLHF episodes as one batch on the device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from .config import EnvConfig
from .core import SequenceAccess, StepResult, TokenMDPCore
from .rewards import RewardFunction
from .tasks.base import Task
from .token_env import token_spaces

__all__ = ["TokenMDPVectorEnv"]

_END_KEYS = ("rm_score", "gold", "ref_logprob_sum", "length")


class TokenMDPVectorEnv(SequenceAccess, VectorEnv):
    """``N`` copies of :class:`~.token_env.TokenMDPEnv` stepped as one batch; everything stays torch.

    Observations are ``{"input_ids": (N, W), "attention_mask": (N, W)}`` int64 tensors on the env's
    device, rewards ``(N,)`` float32, terminations/truncations ``(N,)`` bool tensors. ``step`` takes
    a ``(N,)`` integer tensor (numpy arrays and lists are accepted too). Rewards, spaces and the
    per-episode semantics are exactly those of the single env; with the same seeds and actions, row
    ``i`` of ``reset(seed=s)`` behaves like a ``TokenMDPEnv`` reset with ``seed=s + i``.

    Autoreset (``metadata["autoreset_mode"]``):

    * ``NEXT_STEP`` (default): the step after an episode ended starts the next one in that row: its
      action is ignored, its reward is 0, terminated/truncated are False.
    * ``SAME_STEP``: the step that ends an episode already returns the next episode's first
      observation; ``info["final_obs"]`` holds the batched last observations (``(N, W)`` tensors,
      valid where ``info["_final_obs"]``) and ``info["final_info"]`` the episode-end infos.
    * ``DISABLED``: no autoreset. A row whose episode ended stays idle (its actions are ignored, its
      reward is 0 and terminated/truncated are False) until ``reset()``, or
      ``reset(options={"reset_mask": mask})`` for some rows; stepping once every row has ended
      raises ``ResetNeeded``. This is the mode for collecting one episode per row, a batch at a
      time, as the built-in agents do (``rlhfgym.agents.common.env_rollout``):
      ``reset(options={"prompt_index": idx})``, then step until every row has ended.

    infos (gymnasium's dict-of-arrays layout, each key ``k`` with a bool mask ``_k``):
    ``ref_logprob`` (``(N,)`` float32 tensor, every step); when episodes end, ``rm_score``, ``gold``,
    ``ref_logprob_sum`` (float32 tensors), ``length`` (int64 tensor) and ``completion`` (numpy
    object array of str, because tensors cannot hold text); masks are bool tensors. Rows that start
    a new episode (every row at ``reset``, autoreset rows in ``step``) report the new prompt's
    ``prompt_index`` (int64 tensor, masked).

    Construction: ``TokenMDPVectorEnv(task, tokenizer, reference, reward_model, config=None, **settings)``
    with an :class:`~.config.EnvConfig` (``settings`` override its fields; ``config.num_envs`` rows,
    ``config.autoreset_mode`` None means NEXT_STEP). The sequence-level access (:meth:`prompts`,
    :meth:`score`, :meth:`gold`, :meth:`prefer`, :attr:`config`, :attr:`tokenizer`, ...) is the
    single env's (:class:`~.core.SequenceAccess`).

    A policy kept in step with the env by :class:`~.lm.IncrementalLM` (same loop for both modes)::

        obs, info = envs.reset(seed=0)
        lm = IncrementalLM(policy, envs.num_envs, window=obs["input_ids"].shape[1])
        logits = lm.reset_rows(range(envs.num_envs), obs["input_ids"], obs["attention_mask"])
        for _ in range(n_steps):
            actions = torch.distributions.Categorical(logits=logits).sample()
            obs, rewards, terminated, truncated, info = envs.step(actions)
            logits = lm.step(actions)
            if "prompt_index" in info:  # rows that started a new episode: prefill their prompts
                rows = info["_prompt_index"].nonzero().view(-1)
                logits[rows] = lm.reset_rows(rows, obs["input_ids"][rows], obs["attention_mask"][rows])
    """

    def __init__(
        self,
        task: Task,
        tokenizer,
        reference: torch.nn.Module,
        reward_model: RewardFunction,
        config: EnvConfig | None = None,
        **settings,
    ):
        config = EnvConfig.merged(config, settings, where="TokenMDPVectorEnv")
        self.core = TokenMDPCore(task, tokenizer, reference, reward_model, config)
        self.num_envs = self.core.num_envs
        self.single_observation_space, self.single_action_space = token_spaces(self.core.vocab_size, self.core.window)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.metadata = {"autoreset_mode": self.core.autoreset_mode, "torch": True, "render_modes": []}
        if config.seed is not None:  # seed now (row i <- seed + i), so a first reset() without a seed is reproducible
            self._np_random, self._np_random_seed = seeding.np_random(config.seed)
            self.core.rngs = [seeding.np_random(config.seed + i)[0] for i in range(self.num_envs)]

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None):
        """Start a new episode in every row (``options={"reset_mask": mask}``: in the rows where
        ``mask`` is True). ``seed=s`` seeds row ``i`` with ``s + i``. Other options:
        :meth:`TokenMDPCore.reset <rlhfgym.envs.core.TokenMDPCore.reset>`."""
        if isinstance(seed, (int, np.integer)):
            super().reset(seed=int(seed))
        ids, mask = self.core.reset(seed=seed, options=options)
        started = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        if options and options.get("reset_mask") is not None:
            started = torch.as_tensor(options["reset_mask"], device=self.device)
        idx = torch.as_tensor(self.core.prompt_index, device=self.device)
        info = {"prompt_index": torch.where(started, idx, 0), "_prompt_index": started}
        return {"input_ids": ids.clone(), "attention_mask": mask.clone()}, info

    def step(self, actions):
        r = self.core.step(actions)
        dev = self.device
        terminated, truncated = torch.from_numpy(np.stack([r.terminated, r.truncated])).to(dev)  # one copy
        info: dict[str, Any] = {"ref_logprob": r.ref_logprob}
        if r.finished.size:
            end = self._end_info(r)
            if self.core.autoreset_mode == AutoresetMode.SAME_STEP:
                fin_mask = self._mask(r.finished)
                info["final_obs"] = {"input_ids": r.final_input_ids.clone(), "attention_mask": r.final_attention_mask.clone()}
                info["_final_obs"] = fin_mask
                info["final_info"] = end
                info["_final_info"] = fin_mask
            else:
                info.update(end)
        if r.reset_rows.size:  # rows that started a new episode in this step
            started = np.zeros(self.num_envs, dtype=bool)
            started[r.reset_rows] = True
            info["prompt_index"] = torch.from_numpy(np.where(started, self.core.prompt_index, 0)).to(dev)
            info["_prompt_index"] = torch.from_numpy(started).to(dev)
        obs = {"input_ids": r.input_ids.clone(), "attention_mask": r.attention_mask.clone()}
        return obs, r.reward, terminated, truncated, info

    def _mask(self, rows: np.ndarray) -> torch.Tensor:
        m = np.zeros(self.num_envs, dtype=bool)
        m[rows] = True
        return torch.from_numpy(m).to(self.device)

    def _end_info(self, r: StepResult) -> dict[str, Any]:
        """Episode-end infos as full-length (N,) arrays with masks (gymnasium's vector layout)."""
        n, dev, rows = self.num_envs, self.device, r.finished
        rows_t = torch.as_tensor(rows, device=dev)
        mask = self._mask(rows)
        values = {
            "rm_score": r.rm_score.float(),
            "gold": torch.as_tensor(r.gold, dtype=torch.float32, device=dev),
            "ref_logprob_sum": r.ref_logprob_sum.float(),
            "length": torch.as_tensor(r.length, dtype=torch.long, device=dev),
        }
        info: dict[str, Any] = {}
        for key in _END_KEYS:
            v = values[key]
            full = torch.zeros(n, dtype=v.dtype, device=dev).index_copy(0, rows_t, v)
            info[key], info[f"_{key}"] = full, mask
        completion = np.full(n, None, dtype=object)
        for row, text in zip(rows, r.completions):
            completion[row] = text
        info["completion"], info["_completion"] = completion, mask
        return info
