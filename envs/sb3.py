"""Stable-Baselines3 ``VecEnv`` adaptor for the token-level RLHF MDP.

SB3 wants numpy observations and SAME_STEP autoreset with the last observation of an ended episode
in ``infos[i]["terminal_observation"]``. This adaptor gives exactly that on top of the batched torch
core (one batch for all envs, not one env object per env). An episode cut at ``max_new_tokens`` has
ended for good (the reward model has paid for the whole completion, nothing follows), so the adaptor
never sets SB3's ``infos[i]["TimeLimit.truncated"]``: SB3 would otherwise add ``gamma * V(last
observation)`` to that episode's last reward. ``infos[i]["eos"]`` says whether the episode ended
with EOS (terminated) rather than at ``max_new_tokens`` (truncated)::

    from rlhfgym.envs.sb3 import make_sb3_vec_env
    venv = make_sb3_vec_env("RLHF-Summarize-Gold-v0", num_envs=8, max_new_tokens=16)
    model = stable_baselines3.PPO("MultiInputPolicy", venv)
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv

from .core import SequenceAccess
from .vector_env import TokenMDPVectorEnv

__all__ = ["SB3VecEnv", "make_sb3_vec_env"]


class SB3VecEnv(SequenceAccess, VecEnv):
    """Present a SAME_STEP :class:`~.vector_env.TokenMDPVectorEnv` as an SB3 ``VecEnv``.

    All sub-envs share one batched core, so ``get_attr``/``env_method`` are evaluated once on the
    vector env (attribute or method of the same name) and the result is repeated per index. The
    sequence-level access (:meth:`prompts`, :meth:`score`, :meth:`gold`, :meth:`prefer`,
    :attr:`config`, :attr:`task`, :attr:`tokenizer`, :attr:`reference_model`, ...) is the one of
    the single and vector envs (:class:`~.core.SequenceAccess`).
    """

    def __init__(self, venv: TokenMDPVectorEnv):
        venv = venv.unwrapped
        if not isinstance(venv, TokenMDPVectorEnv):
            raise ValueError(f"SB3VecEnv wraps a TokenMDPVectorEnv, got {type(venv).__name__}.")
        if venv.core.autoreset_mode != AutoresetMode.SAME_STEP:
            raise ValueError(
                "SB3 needs SAME_STEP autoreset; create the vector env with autoreset_mode='SameStep' "
                "(or use make_sb3_vec_env, which does)."
            )
        self.venv = venv
        self.core = venv.core
        self._actions: torch.Tensor | None = None
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)

    # ------------------------------------------------------------------ VecEnv API
    def reset(self):
        seeds = None if all(s is None for s in self._seeds) else list(self._seeds)
        options = self._options[0] if self._options else {}
        if any(o != options for o in self._options):
            raise ValueError("SB3VecEnv: all envs share one core; pass the same reset options to every env.")
        ids, mask = self.core.reset(seed=seeds, options=options or None)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = [{"prompt_index": int(i)} for i in self.core.prompt_index]
        return {"input_ids": ids.cpu().numpy().copy(), "attention_mask": mask.cpu().numpy().copy()}

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = torch.as_tensor(np.asarray(actions, dtype=np.int64))

    def step_wait(self):
        r = self.core.step(self._actions)
        # copies: on CPU .numpy() would share memory with the core's state
        obs = {"input_ids": r.input_ids.cpu().numpy().copy(), "attention_mask": r.attention_mask.cpu().numpy().copy()}
        rewards = r.reward.float().cpu().numpy()
        dones = r.terminated | r.truncated
        infos: list[dict[str, Any]] = [{"ref_logprob": lp} for lp in r.ref_logprob.cpu().tolist()]
        if r.finished.size:
            final_ids = r.final_input_ids[torch.as_tensor(r.finished, device=self.core.device)].cpu().numpy()
            final_mask = r.final_attention_mask[torch.as_tensor(r.finished, device=self.core.device)].cpu().numpy()
            rm, lp_sum = r.rm_score.cpu().tolist(), r.ref_logprob_sum.cpu().tolist()
            for j, row in enumerate(r.finished):
                infos[row].update(
                    terminal_observation={"input_ids": final_ids[j], "attention_mask": final_mask[j]},
                    eos=bool(r.terminated[row]),
                    rm_score=rm[j],
                    gold=float(r.gold[j]),
                    completion=r.completions[j],
                    ref_logprob_sum=lp_sum[j],
                    length=int(r.length[j]),
                )
                self.reset_infos[row] = {"prompt_index": int(self.core.prompt_index[row])}
        return obs, rewards, dones, infos

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        value = None if attr_name == "render_mode" else getattr(self.venv, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices=None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


def make_sb3_vec_env(env_id: str, num_envs: int = 1, **kwargs: Any) -> SB3VecEnv:
    """``gym.make_vec(env_id, num_envs, autoreset_mode=SAME_STEP, **kwargs)`` wrapped for SB3."""
    kwargs["autoreset_mode"] = AutoresetMode.SAME_STEP
    return SB3VecEnv(gym.make_vec(env_id, num_envs=num_envs, **kwargs))
