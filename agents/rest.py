"""ReST: Reinforced Self-Training (Gulcehre et al. 2023), offline RL by filtered behaviour cloning.

ReST alternates two loops over a fixed set of prompts D_x (with their original supervised
completions D, when the task has them)::

    for g in 1..G:                                           # Grow (episodes of the token MDP)
        D_g = D  ∪  { (x, y) : x in D_x, y ~ pi_theta(.|x) at temperature 0.8, N per prompt }
        R(x, y) = RM(x, y) once per sample (the env's reward at the episode's end), normalised to [0, 1]
        for i, tau_i in enumerate(thresholds):               # Improve, tau_0 < tau_1 < ...
            D_g^i = { (x, y) in D_g : R(x, y) >= tau_i }
            theta <- argmin  -1/|D_g^i| sum log pi_theta(y|x)     (BC / NLL, from the previous theta,
                                                                   learning rate lr * lr_decay^i)
            keep theta if its validation reward is the best so far
        continue from the best theta

Reward normalisation and thresholds (our choice, see ``threshold_mode``):

* ``"absolute"`` (default, the paper's): ``R = (r - lo) / (hi - lo)`` clipped to [0, 1] with
  ``reward_range = (lo, hi)``; without a ``reward_range``, the env's gold reward uses its known
  range [-1, 1] and any other reward model the min and max of the Grow set (fixed for that Grow
  step, so thresholds keep rising on one scale). ``tau`` is a reward level.
* ``"quantile"``: ``tau_i`` is a quantile of the Grow set's rewards, i.e. Improve step i keeps
  the best ``1 - tau_i`` fraction whatever the reward's scale (robust for learned reward models).

The filter keeps ``R >= tau`` (so ``tau = 0`` is plain BC on all of D_g). An Improve step whose
filtered set is empty is skipped together with the higher thresholds.

Budget: every sampled completion and every original completion (once) costs 1. Validation
samples that pick the best checkpoint are evaluation, not training data, and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import AgentError
from .common import (
    AgentConfig,
    EnvSampler,
    TrainingAgent,
    TrainingRun,
    draw_prompt_indices,
    param,
    sub_seed,
    trim,
)

__all__ = ["ReST", "DEFAULT_THRESHOLDS", "normalise_rewards", "rest_filter", "bc_loss"]

DEFAULT_THRESHOLDS = (0.0, 0.7, 0.8, 0.9, 0.95, 0.99)
GROW_BATCH = 256  # episodes collected at once in a Grow step (rows of the vector env)


# ---------------------------------------------------------------------------------------------- the math
# Pure functions (arrays in, arrays out): the agent calls them, tests/test_agent_math.py checks them by hand.


def normalise_rewards(rewards: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Rewards -> [0, 1]: ``R = clip((r - lo) / (hi - lo), 0, 1)``; all ones when ``hi <= lo`` (no spread)."""
    if hi <= lo:
        return np.ones_like(rewards)
    return np.clip((rewards - lo) / (hi - lo), 0.0, 1.0)


def rest_filter(normalised: np.ndarray, tau: float, mode: str = "absolute") -> np.ndarray:
    """Indices kept by one Improve step: ``{i : R_i >= tau}`` ("absolute": tau is a reward level on [0, 1];
    "quantile": tau is first replaced by the tau-quantile of the R_i). Rising thresholds
    tau_0 < tau_1 < ... keep nested, shrinking subsets of the Grow set."""
    if mode == "quantile":
        tau = float(np.quantile(normalised, tau))
    return np.flatnonzero(normalised >= tau)


def bc_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Improve's behaviour-cloning loss from per-token log-probs (B, T) (0 on padding): the NLL per token,
    ``-(1 / #tokens) sum_{i,t} log pi(y_it | x_i, y_i,<t)``."""
    return -logp.sum() / mask.sum().clamp(min=1).to(logp.device)


class ReST(TrainingAgent):
    """Reinforced Self-Training: Grow (sample + score) then Improve (filter + BC) with rising thresholds.

    Args:
        grow_steps: G, the number of Grow steps.
        thresholds: one per Improve step (I = len(thresholds)), strictly increasing, in [0, 1].
        threshold_mode: "absolute" (reward levels on [0, 1]-normalised rewards) or "quantile".
        reward_range: (lo, hi) of the env's reward for "absolute" normalisation (see module doc).
        samples_per_prompt: N completions sampled per prompt in each Grow step.
        prompts_per_grow: |D_x|; default: as many as the budget affords (1 + G N completions each).
        temperature: Grow sampling temperature (0.8 in the paper).
        include_original: add the task's original supervised completion of each prompt (``task.reference``).
        learning_rate, lr_decay: Improve step i uses learning_rate * lr_decay**i (< 1: lower each step).
        improve_epochs, batch_size, max_grad_norm: BC fine-tuning per Improve step.
        eval_prompts: validation prompts that score each Improve step's policy (0: keep the last).
        eval_temperature: sampling temperature of the validation samples.
    """

    @dataclass
    class Config(AgentConfig):
        """Hyperparameters of :class:`ReST` (see the class docstring)."""

        grow_steps: int = param(1, low=1)
        thresholds: list[float] = param(DEFAULT_THRESHOLDS, low=0, high=1)
        threshold_mode: str = param("absolute", choices=("absolute", "quantile"))
        reward_range: list[float] | None = None
        samples_per_prompt: int = param(4, low=1)
        prompts_per_grow: int | None = param(None, low=1)
        temperature: float = param(0.8, low=0, low_open=True)
        include_original: bool = True
        learning_rate: float = param(1e-4, low=0, low_open=True)
        lr_decay: float = param(0.5, low=0, high=1, low_open=True)
        improve_epochs: int = param(1, low=1)
        batch_size: int = param(16, low=1)
        max_grad_norm: float = param(1.0, low=0, low_open=True)
        eval_prompts: int = param(64, low=0)
        eval_temperature: float = param(0.8, low=0)

        def check(self, agent: str) -> None:
            t = self.thresholds
            if not t:
                raise AgentError(f"{agent}: thresholds must list at least one Improve threshold, e.g. [0.0, 0.7, 0.9].")
            if any(b <= a for a, b in zip(t, t[1:])):
                raise AgentError(f"{agent}: thresholds must be strictly increasing (each Improve step filters harder), got {t}.")
            r = self.reward_range
            if r is not None and (len(r) != 2 or not r[0] < r[1]):
                raise AgentError(f"{agent}: reward_range must be [lo, hi] with lo < hi, got {r!r}.")

    name = "rest"

    # ------------------------------------------------------------------ helpers
    def _plan(self, core, budget: int) -> tuple[int, bool]:
        """(number of prompts, whether original completions are used) for this budget."""
        cfg = self.config
        original = cfg["include_original"] and hasattr(core.task, "reference")
        per_prompt = cfg["grow_steps"] * cfg["samples_per_prompt"] + (1 if original else 0)
        n = cfg["prompts_per_grow"] or budget // per_prompt
        if n < 1 or n * per_prompt > budget:
            raise AgentError(
                f"{self.name}: a budget of {budget} does not cover {max(n, 1)} prompt(s) at {per_prompt} completions each "
                f"({cfg['grow_steps']} Grow steps x {cfg['samples_per_prompt']} samples"
                f"{' + 1 original' if original else ''}); raise the budget or lower prompts_per_grow / samples_per_prompt."
            )
        return n, original

    def _normalise(self, core, rewards: np.ndarray) -> np.ndarray:
        """Rewards -> [0, 1] (absolute mode); quantile mode only needs the order."""
        from rlhfgym.envs.rewards import GoldReward

        lo_hi = self.config["reward_range"]
        if lo_hi is None and isinstance(getattr(core, "reward_model", None), GoldReward):
            lo_hi = (-1.0, 1.0)  # the task's gold score lives in [-1, 1]
        lo, hi = lo_hi if lo_hi is not None else (float(rewards.min()), float(rewards.max()))
        return normalise_rewards(rewards, lo, hi)

    def _filter(self, normalised: np.ndarray, tau: float) -> np.ndarray:
        return rest_filter(normalised, tau, self.config["threshold_mode"])

    @torch.no_grad()
    def validation_reward(self, env, n_prompts: int | None = None, split: str = "validation",
                          temperature: float | None = None) -> float:
        """Mean reward-model score of policy samples on the first ``n_prompts`` prompts of ``split``."""
        core = env.unwrapped if hasattr(env, "unwrapped") else env
        n = self.config["eval_prompts"] if n_prompts is None else n_prompts
        prompts = core.prompts(split, n, 0)
        t = self.config["eval_temperature"] if temperature is None else temperature
        torch.manual_seed(sub_seed(self.seed, 99))  # the same draw for every candidate: a fair comparison
        texts = self.policy.generate_text(prompts, temperature=t)
        return float(core.score(prompts, texts).float().mean())

    def _bc_epoch(self, run, data, idx: np.ndarray, key: tuple) -> bool:
        """One pass of BC (NLL) over ``data[idx]``. Returns False when the callback stops."""
        prompt_ids, tokens, mask = data
        bs = self.config["batch_size"]
        order = torch.as_tensor(idx)[torch.randperm(len(idx), generator=torch.Generator().manual_seed(sub_seed(self.seed, *key)))]
        self.policy.train()
        for s in range(0, len(order), bs):
            b = order[s:s + bs].tolist()
            tok, m = trim(tokens[b], mask[b])
            # BC / NLL: -(1 / #tokens) sum_t log pi(y_t | x, y_<t)
            logp = self.policy.forward_logprobs([prompt_ids[i] for i in b], tok, m)
            loss = bc_loss(logp, m)
            metrics = {"loss": loss.item(), "grad_norm": self.step(loss)}
            if not run.update(0, metrics):  # the data was paid for when it was grown
                return False
        return True

    # ------------------------------------------------------------------ learning
    def learn(self, env, budget: int, callback=None, *, checkpoint_dir=None, checkpoint_every: int | None = None,
              log_dir=None, progress_bar: bool = True) -> "ReST":
        """Grow and Improve until the Grow steps are done; ``budget`` is the agent's total of
        completions sampled or read (it sets the number of prompts unless ``prompts_per_grow``).

        Checkpoints (``checkpoint_dir``) are written when ``checkpoint_every`` completions are due
        (after a Grow step) and, with ``checkpoint_every`` set, after every Improve step; the best
        policy so far travels in the checkpoint. At the end the agent holds the best policy.
        """
        with TrainingRun(self, budget, callback=callback, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         log_dir=log_dir, progress_bar=progress_bar) as run:
            core, _, resumed = self.start(run, env)  # resume, policy, checks, seeding
            cfg, st = self.config, self.trainer_state
            if not resumed:
                st.update(run_start=self.spent, grow=0, improve=0, data=None, best_score=None, best_state=None)
            n_prompts, original = self._plan(core, budget - st["run_start"])
            self.make_optimizer("adamw", cfg["learning_rate"], weight_decay=0.0)
            idx = draw_prompt_indices(core, n_prompts, sub_seed(self.seed, 11))
            prompts = [core.task.prompt("train", int(i)) for i in idx]
            sampler = EnvSampler(env, kl_coef=0.0, device=self.policy.device)  # ReST's reward is RM alone
            if st["best_score"] is None and cfg["eval_prompts"] > 0:  # the starting policy is a candidate too
                st["best_score"], st["best_state"] = self.validation_reward(core), self._state_copy()
                run.update(0, {"validation_reward": st["best_score"]})
            while st["grow"] < cfg["grow_steps"] and not run.stopped:
                # ---------------- Grow: D_g = D ∪ samples of the current policy, each scored once
                if st["data"] is None:
                    torch.manual_seed(sub_seed(self.seed, 12, st["grow"]))
                    x, y, rewards, cost = [], [], [], 0
                    if original:  # the task's own completions are not episodes: the reward model scores them
                        x += prompts
                        y += [core.task.reference("train", int(i)) for i in idx]
                        rewards.append(core.score(x, y).float().cpu())
                        cost += len(prompts) if st["grow"] == 0 else 0  # the original data is paid for once
                    for _ in range(cfg["samples_per_prompt"]):  # one episode of the token MDP per sample
                        for s in range(0, len(idx), GROW_BATCH):
                            roll = sampler.rollout(self.policy, idx[s:s + GROW_BATCH], temperature=cfg["temperature"])
                            x += roll.prompts
                            y += roll.texts
                            rewards.append(roll.scores.float().cpu())
                        cost += len(prompts)
                    rewards = torch.cat(rewards).numpy()
                    st["data"] = {"prompts": x, "completions": y, "rewards": rewards.tolist()}
                    if not run.update(cost, {"grow_reward": float(rewards.mean()), "grow_size": len(y)}):
                        break
                data = st["data"]
                rewards = np.asarray(data["rewards"], dtype=np.float64)
                normalised = self._normalise(core, rewards)
                tokens, mask = self.policy.encode_completions(data["completions"])
                tensors = (self.policy.encode_prompts(data["prompts"]), tokens, mask)
                # ---------------- Improve: filter with rising thresholds, BC from the previous policy
                while st["improve"] < len(cfg["thresholds"]) and not run.stopped:
                    i = st["improve"]
                    keep = self._filter(normalised, cfg["thresholds"][i])
                    if len(keep) == 0:  # nothing passes: the higher thresholds neither
                        st["improve"] = len(cfg["thresholds"])
                        break
                    for group in self.optimizer.param_groups:  # a lower learning rate each Improve step
                        group["lr"] = cfg["learning_rate"] * cfg["lr_decay"] ** i
                    for epoch in range(cfg["improve_epochs"]):
                        if not self._bc_epoch(run, tensors, keep, (13, st["grow"], i, epoch)):
                            break
                    if run.stopped:
                        break
                    metrics = {"threshold": cfg["thresholds"][i], "filtered": len(keep),
                               "filtered_reward": float(rewards[keep].mean())}
                    if cfg["eval_prompts"] > 0:  # keep the best policy by validation reward
                        metrics["validation_reward"] = score = self.validation_reward(core)
                        if score > st["best_score"]:
                            st["best_score"], st["best_state"] = score, self._state_copy()
                    st["improve"] += 1
                    run.update(0, metrics)
                    if checkpoint_every is not None:
                        run.save()
                if run.stopped:
                    break
                if st["best_state"] is not None:  # the next Grow step starts from the best policy so far
                    self.policy.load_state_dict(st["best_state"])
                st.update(grow=st["grow"] + 1, improve=0, data=None)
            if run.stopped:
                run.save()  # the state where it stopped, resumable
            if st["best_state"] is not None:  # the agent keeps the best checkpoint by validation reward
                self.policy.load_state_dict(st["best_state"])
            if not run.stopped:
                st.update(best_state=None, data=None)  # finished: nothing left to resume
                run.save()
        return self

    def _state_copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
