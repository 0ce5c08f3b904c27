"""Stable-Baselines3's PPO on the token MDP, as a zoo agent: ``rlhf-zoo train sb3-ppo RLHF-Summarize-v0``.

Stock ``stable_baselines3.PPO`` with :class:`~rlhfgym.agents.sb3_policy.LMActorCriticPolicy` (actor:
the LM's head; critic: a zero-initialised ``Linear(hidden, 1)`` on the same last hidden state; rollouts
KV-cached), acting one token per ``step`` of an SB3 ``VecEnv`` that shares the given env's task,
tokenizer, reference model and reward model (:func:`sb3_vec_env`). Every experience goes through the
Gym contract (``VecEnv.step`` with a batch of tokens, rewards from the env), as for the built-in
``ppo``; the difference is SB3's own loop: fixed-length rollouts of ``n_steps`` tokens that cut
across episodes, and updates on minibatches of single steps, each re-running the whole window.

**The reward** SB3 optimises, per token ``a_t`` in state ``s_t`` (``beta = kl_coef``)::

    r_t = beta * log pi_ref(a_t|s_t)                 paid by the env (its kl_coef is set to beta)
        - beta * log pi_theta(a_t|s_t)               the agent's half (:class:`KLPenalizedRolloutBuffer`)
        + RM(x, y) - missing_eos_penalty * [no EOS]  on the last token (RM by the env)

so an episode's return is ``RM(x, y) - beta * log(pi_theta(y|x) / pi_ref(y|x))``, the objective of
the built-in agents (docs/DESIGN.md, "The token MDP"). ``log pi_theta(a_t|s_t)`` is the log-prob SB3
recorded when it sampled ``a_t`` (a constant, like the built-in PPO's KL-shaped rewards).

**Episode ends**: an episode cut at ``max_new_tokens`` is over (the RM has paid for it), so it is
not bootstrapped: the SB3 adaptor (:mod:`rlhfgym.envs.sb3`) never sets SB3's ``TimeLimit.truncated``,
without which SB3 would add ``gamma * V(last observation)`` to the last reward as if the episode went
on; :class:`EpisodeEnds` applies ``missing_eos_penalty`` to the episodes that ended without EOS.

**Budget**: completions, like every agent: ``spent`` counts the episodes finished. SB3 updates on
whole rollouts of ``n_steps * num_envs`` env steps, so training stops at the end of the rollout in
which the ``budget``-th completion finished; ``spent`` then exceeds ``budget`` by the completions of
that rollout past it (about ``n_steps * num_envs / mean length``). Episodes still running when a
rollout ends continue in the next one.

**Per update** the callback gets ``score`` (the RM's mean over the completions finished in the
rollout), ``reward`` (after ``missing_eos_penalty``), ``kl`` (mean ``sum_t log pi_theta - log pi_ref``
of those completions), ``objective`` (``score - beta * kl``), ``gold``, ``length``, ``eos_rate`` (the
built-in agents' keys, all None (left out) in a rollout that finished none), and SB3's training
statistics ``loss``, ``policy_loss``, ``value_loss``, ``entropy``, ``approx_kl``, ``clip_fraction``,
``explained_variance``.

**Saved** like every agent: ``policy/`` is a :class:`~rlhfgym.agents.policy.CausalLMPolicy` (the LM,
and SB3's critic as its ``value_head.pt``), evaluated by ``rlhf-zoo eval`` and the leaderboard like
any other; ``train_state.pt`` holds SB3's Adam state and the random streams. A resumed run continues
those; the episodes in flight at the checkpoint are dropped and the env's prompt stream restarts from
a seed derived from ``(seed, spent)``, so it is a continuation, not a bit-identical replay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnvWrapper

from .base import Agent, AgentError
from .common import SPLITS, AgentConfig, TrainingAgent, TrainingRun, param, sub_seed

__all__ = ["SB3PPO", "sb3_vec_env", "KLPenalizedRolloutBuffer", "EpisodeEnds", "EpisodeStats"]

#: SB3's training statistics (``model.logger``) reported per update, under the agent's names
SB3_TRAIN_STATS = {"train/loss": "loss", "train/policy_gradient_loss": "policy_loss", "train/value_loss": "value_loss",
                   "train/approx_kl": "approx_kl", "train/clip_fraction": "clip_fraction",
                   "train/explained_variance": "explained_variance"}


def sb3_vec_env(env, num_envs: int, **settings):
    """An SB3 ``VecEnv`` of ``num_envs`` rows on ``env``'s task, tokenizer, reference model and reward
    model (the same objects: nothing is loaded again), with ``env``'s settings (split, kl_coef, window,
    device, ...) updated by ``settings`` (:class:`~rlhfgym.envs.config.EnvConfig` fields) and SAME_STEP
    autoreset, as SB3 needs. ``env``: an rlhf-gym env, single or vector (``gym.make("RLHF-Summarize-v0")``)."""
    from gymnasium.vector import AutoresetMode

    from rlhfgym.envs.sb3 import SB3VecEnv
    from rlhfgym.envs.vector_env import TokenMDPVectorEnv

    core = getattr(env, "unwrapped", env)
    inner = getattr(core, "core", None)
    if inner is None or not hasattr(inner, "config"):
        raise AgentError(f"sb3-ppo: env {env!r} is not an rlhf-gym token env; pass one such as gym.make('RLHF-Summarize-v0').")
    config = dataclasses.replace(inner.config, num_envs=num_envs, autoreset_mode=AutoresetMode.SAME_STEP, **settings)
    return SB3VecEnv(TokenMDPVectorEnv(inner.task, inner.tokenizer, inner.reference, inner.reward_model, config))


class KLPenalizedRolloutBuffer(DictRolloutBuffer):
    """SB3's rollout buffer for Dict observations, storing ``r_t - kl_coef * log pi_theta(a_t|s_t)``: the
    agent's half of the KL penalty, with the log-prob SB3 recorded when it sampled ``a_t``."""

    def __init__(self, *args, kl_coef: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_coef = float(kl_coef)

    def add(self, obs, action, reward, episode_start, value, log_prob) -> None:
        reward = np.asarray(reward, dtype=np.float32) - self.kl_coef * log_prob.detach().cpu().numpy().reshape(-1)
        super().add(obs, action, reward, episode_start, value, log_prob)


class EpisodeEnds(VecEnvWrapper):
    """``missing_eos_penalty`` (if any) subtracted from the last reward of each episode that ended
    without EOS (``infos[i]["eos"]`` False: cut at ``max_new_tokens``, which the adaptor does not
    bootstrap)."""

    def __init__(self, venv, missing_eos_penalty: float | None = None):
        super().__init__(venv)
        self.missing_eos_penalty = missing_eos_penalty

    def reset(self):
        return self.venv.reset()

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        rewards = np.array(rewards, dtype=np.float32)  # our copy: never write into the env's arrays
        if self.missing_eos_penalty is not None:
            for i in np.flatnonzero(dones):
                if not infos[i]["eos"]:
                    rewards[i] -= self.missing_eos_penalty
        return obs, rewards, dones, infos


class EpisodeStats(BaseCallback):
    """Reads SB3's rollout loop (``self.locals``, read only): per env row, the running sum of
    ``log pi_theta(a_t|s_t)``; per finished episode, its RM score, gold, length, EOS and KL
    ``sum_t log pi_theta - log pi_ref``. :meth:`pop` returns and clears the finished ones."""

    def __init__(self, num_envs: int):
        super().__init__()
        self.logp_sum = np.zeros(num_envs)
        self.finished: list[dict] = []

    def _on_step(self) -> bool:
        self.logp_sum += self.locals["log_probs"].detach().cpu().numpy().reshape(-1)
        infos = self.locals["infos"]
        for i in np.flatnonzero(self.locals["dones"]):
            info = infos[i]
            self.finished.append({"score": info["rm_score"], "gold": info["gold"], "length": info["length"],
                                  "eos": info["eos"], "kl": self.logp_sum[i] - info["ref_logprob_sum"]})
            self.logp_sum[i] = 0.0
        return True

    def pop(self) -> list[dict]:
        out, self.finished = self.finished, []
        return out


class SB3PPO(TrainingAgent):
    """Stable-Baselines3 PPO with :class:`LMActorCriticPolicy` on the token MDP (module docstring).

    Args:
        policy: a :class:`CausalLMPolicy` (its ``value_head``, if any, starts SB3's critic); None = a
            copy of the env's reference model with a zero critic.
        hyperparameters: the fields of :class:`SB3PPO.Config`.
    """

    @dataclass
    class Config(AgentConfig):
        """Hyperparameters of :class:`SB3PPO`; those named as in ``stable_baselines3.PPO`` mean what they mean there.

        num_envs: env rows stepped together (one ``VecEnv``).
        n_steps: env steps per row per rollout; an update trains on ``n_steps * num_envs`` steps.
        batch_size: env steps per minibatch (<= ``n_steps * num_envs``).
        n_epochs: passes over each rollout.
        learning_rate: Adam step size.
        gamma, gae_lambda: discount and GAE lambda (per token).
        clip_range: PPO's ratio clip; clip_range_vf: the value clip (None = no clip).
        normalize_advantage: whiten advantages per minibatch.
        ent_coef, vf_coef: entropy bonus and value-loss weights.
        max_grad_norm: gradient clipping (global norm).
        target_kl: stop an update's epochs when the approximate KL to the rollout policy exceeds it (None = never).
        kl_coef: beta of the reward's KL to pi_ref (both halves); None = the env's ``kl_coef``.
        missing_eos_penalty: subtract this from the last reward of completions cut without EOS.
        split: the task split training prompts come from.
        """

        num_envs: int = param(16, low=1)
        n_steps: int = param(16, low=1)
        batch_size: int = param(128, low=2)
        n_epochs: int = param(2, low=1)
        learning_rate: float = param(1e-5, low=0, low_open=True)
        gamma: float = param(1.0, low=0, high=1)
        gae_lambda: float = param(0.95, low=0, high=1)
        clip_range: float = param(0.2, low=0, low_open=True)
        clip_range_vf: float | None = param(None, low=0, low_open=True)
        normalize_advantage: bool = True
        ent_coef: float = param(0.0, low=0)
        vf_coef: float = param(0.5, low=0)
        max_grad_norm: float = param(0.5, low=0, low_open=True)
        target_kl: float | None = param(None, low=0, low_open=True)
        kl_coef: float | None = param(None, low=0)
        missing_eos_penalty: float | None = param(None, low=0)
        split: str = param("train", choices=SPLITS)

        def check(self, agent: str) -> None:
            if self.precision != "float32":
                raise AgentError(f"{agent}: precision={self.precision!r} is not supported: Stable-Baselines3 computes its "
                                 "policy in float32; use precision='float32' (or the built-in ppo).")
            rollout = self.n_steps * self.num_envs
            if self.batch_size > rollout:
                raise AgentError(f"{agent}: batch_size must be an int <= n_steps * num_envs = {self.n_steps} * "
                                 f"{self.num_envs} = {rollout} (the env steps of one rollout), got {self.batch_size}; "
                                 "lower batch_size or raise n_steps / num_envs.")

    name = "sb3-ppo"

    def __init__(self, policy=None, **hyperparameters):
        super().__init__(policy, **hyperparameters)
        self.model = None  # the stable_baselines3.PPO of the last learn()

    def build_model(self, venv, beta: float):
        """``stable_baselines3.PPO(LMActorCriticPolicy, venv, ...)`` on this agent's policy: SB3's LM (a copy
        of ``self.policy.model``) becomes the policy's model and SB3's critic its ``value_head`` (shared
        modules, so saving the policy saves what SB3 trains); a saved optimizer state is restored."""
        import stable_baselines3 as sb3

        from .sb3_policy import LMActorCriticPolicy

        c = self.config
        model = sb3.PPO(
            LMActorCriticPolicy, venv, learning_rate=c["learning_rate"], n_steps=c["n_steps"], batch_size=c["batch_size"],
            n_epochs=c["n_epochs"], gamma=c["gamma"], gae_lambda=c["gae_lambda"], clip_range=c["clip_range"],
            clip_range_vf=c["clip_range_vf"], normalize_advantage=c["normalize_advantage"], ent_coef=c["ent_coef"],
            vf_coef=c["vf_coef"], max_grad_norm=c["max_grad_norm"], target_kl=c["target_kl"],
            rollout_buffer_class=KLPenalizedRolloutBuffer, rollout_buffer_kwargs={"kl_coef": beta},
            policy_kwargs={"model": self.policy.model}, device=self.device, verbose=0,
        )  # no seed: SB3 would reseed torch; start() has seeded it (or restored a checkpoint's streams)
        sb3_policy = model.policy
        self.policy.model = sb3_policy.features_extractor.lm
        sb3_policy.value_net.load_state_dict(self.policy.value_head.state_dict())  # in place: the optimizer keeps its params
        self.policy.value_head = sb3_policy.value_net
        if self._pending_optimizer is not None:
            sb3_policy.optimizer.load_state_dict(self._pending_optimizer)
            self._pending_optimizer = None
            for group in sb3_policy.optimizer.param_groups:
                group["lr"] = c["learning_rate"]
        self.optimizer = sb3_policy.optimizer  # saved in train_state.pt
        return model

    def learn(self, env, budget: int, callback: Callable[[Agent, dict], bool | None] | None = None, *,
              checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
              log_dir: str | Path | None = None, progress_bar: bool = True):
        """Train on ``env`` until ``budget`` completions (in total, over resumes) have finished.

        ``checkpoint_dir``: resume from it when it holds a checkpoint, save to it every
        ``checkpoint_every`` completions and at the end. ``log_dir``: TensorBoard scalars.
        """
        c = self.config
        with TrainingRun(self, budget, callback=callback, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         log_dir=log_dir, progress_bar=progress_bar) as run:
            core, _, _ = self.start(run, env, value_head=True)  # resume, policy (+ critic), seeding
            beta = core.kl_coef if c["kl_coef"] is None else c["kl_coef"]
            # the env pays beta * log pi_ref (compute_ref: also with beta = 0, for the kl metric); prompts
            # drawn from a seed of (seed, spent), so a resumed run does not replay the first prompts
            venv = EpisodeEnds(sb3_vec_env(env, c["num_envs"], kl_coef=beta, compute_ref=True, split=c["split"],
                                           seed=sub_seed(self.seed, self.spent)), c["missing_eos_penalty"])
            try:
                self.model = model = self.build_model(venv, beta)
                stats = EpisodeStats(c["num_envs"])
                rollout = c["n_steps"] * c["num_envs"]
                while not run.done:
                    # one rollout of n_steps * num_envs env steps, then n_epochs of minibatch updates
                    model.learn(total_timesteps=rollout, callback=stats, log_interval=None, reset_num_timesteps=False)
                    episodes = stats.pop()
                    run.update(len(episodes), self.metrics(episodes, model.logger.name_to_value, beta))
                model.policy.set_training_mode(False)  # SB3 leaves it in train mode after an update
            finally:
                venv.close()
        return self

    def metrics(self, episodes: list[dict], sb3_stats: dict, beta: float) -> dict:
        """One update's metrics: the finished completions' means (None without any) and SB3's training statistics."""
        def mean(key):
            return float(np.mean([e[key] for e in episodes])) if episodes else None

        score, kl, eos_rate = mean("score"), mean("kl"), mean("eos")
        penalty = self.config["missing_eos_penalty"]
        gold = [e["gold"] for e in episodes if np.isfinite(e["gold"])]
        out = {
            "score": score,
            "reward": None if score is None else score - (penalty or 0.0) * (1.0 - eos_rate),
            "kl": kl,
            "objective": None if score is None else score - beta * kl,
            "length": mean("length"),
            "eos_rate": eos_rate,
            "gold": float(np.mean(gold)) if gold else None,
        }
        out.update({ours: float(sb3_stats[key]) for key, ours in SB3_TRAIN_STATS.items() if key in sb3_stats})
        if "train/entropy_loss" in sb3_stats:
            out["entropy"] = -float(sb3_stats["train/entropy_loss"])
        return out
