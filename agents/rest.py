"""ReST: Reinforced Self-Training (Gulcehre et al. 2023), offline RL by filtered behaviour cloning.

ReST alternates two loops over a fixed set of prompts D_x (with their original supervised
completions D, when the task has them)::

    for g in 1..G:                                           # Grow
        D_g = D  ∪  { (x, y) : x in D_x, y ~ pi_theta(.|x) at temperature 0.8, N per prompt }
        R(x, y) = RM(x, y) once per sample, normalised to [0, 1]
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

from typing import Any

import numpy as np
import torch

from .base import AgentError, TrainingRun
from .dpo import (
    TrainingAgent,
    check_range,
    seed_everything,
    sub_seed,
    trim,
)

__all__ = ["ReST", "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = (0.0, 0.7, 0.8, 0.9, 0.95, 0.99)


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

    name = "rest"

    def __init__(self, policy=None, *, grow_steps: int = 1, thresholds=DEFAULT_THRESHOLDS,
                 threshold_mode: str = "absolute", reward_range=None, samples_per_prompt: int = 4,
                 prompts_per_grow: int | None = None, temperature: float = 0.8, include_original: bool = True,
                 learning_rate: float = 1e-4, lr_decay: float = 0.5, improve_epochs: int = 1, batch_size: int = 16,
                 max_grad_norm: float = 1.0, eval_prompts: int = 64, eval_temperature: float = 0.8, **kwargs: Any):
        n = self.name
        check_range("grow_steps", n, grow_steps, low=1, integer=True)
        thresholds = [float(check_range("threshold", n, t, low=0, high=1)) for t in list(thresholds)]
        if not thresholds:
            raise AgentError(f"{n}: thresholds must list at least one Improve threshold, e.g. [0.0, 0.7, 0.9].")
        if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
            raise AgentError(f"{n}: thresholds must be strictly increasing (each Improve step filters harder), got {thresholds}.")
        if threshold_mode not in ("absolute", "quantile"):
            raise AgentError(f"{n}: unknown threshold_mode {threshold_mode!r}; use 'absolute' or 'quantile'.")
        if reward_range is not None:
            if len(reward_range) != 2 or not float(reward_range[0]) < float(reward_range[1]):
                raise AgentError(f"{n}: reward_range must be [lo, hi] with lo < hi, got {reward_range!r}.")
            reward_range = [float(reward_range[0]), float(reward_range[1])]
        check_range("samples_per_prompt", n, samples_per_prompt, low=1, integer=True)
        if prompts_per_grow is not None:
            check_range("prompts_per_grow", n, prompts_per_grow, low=1, integer=True)
        check_range("temperature", n, temperature, low=0, low_open=True)
        check_range("learning_rate", n, learning_rate, low=0, low_open=True)
        check_range("lr_decay", n, lr_decay, low=0, high=1, low_open=True)
        check_range("improve_epochs", n, improve_epochs, low=1, integer=True)
        check_range("batch_size", n, batch_size, low=1, integer=True)
        check_range("max_grad_norm", n, max_grad_norm, low=0, low_open=True)
        check_range("eval_prompts", n, eval_prompts, low=0, integer=True)
        check_range("eval_temperature", n, eval_temperature, low=0)
        super().__init__(policy, grow_steps=grow_steps, thresholds=thresholds, threshold_mode=threshold_mode,
                         reward_range=reward_range, samples_per_prompt=samples_per_prompt,
                         prompts_per_grow=prompts_per_grow, temperature=float(temperature),
                         include_original=bool(include_original), learning_rate=float(learning_rate),
                         lr_decay=float(lr_decay), improve_epochs=improve_epochs, batch_size=batch_size,
                         max_grad_norm=float(max_grad_norm), eval_prompts=eval_prompts,
                         eval_temperature=float(eval_temperature), **kwargs)

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
        if hi <= lo:
            return np.ones_like(rewards)
        return np.clip((rewards - lo) / (hi - lo), 0.0, 1.0)

    def _filter(self, normalised: np.ndarray, tau: float) -> np.ndarray:
        if self.config["threshold_mode"] == "quantile":
            tau = float(np.quantile(normalised, tau))
        return np.flatnonzero(normalised >= tau)

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
            loss = -logp.sum() / m.sum().clamp(min=1).to(logp.device)
            metrics = {"loss": loss.item(), "grad_norm": self._step(loss)}
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
            core, _, resumed = self._start(run, env)
            cfg, st = self.config, self.trainer_state
            if not resumed:
                seed_everything(self.seed)
                st.update(run_start=self.spent, grow=0, improve=0, data=None, best_score=None, best_state=None)
            n_prompts, original = self._plan(core, budget - st["run_start"])
            self._make_optimizer(cfg["learning_rate"])
            rng = np.random.default_rng(sub_seed(self.seed, 11))
            size = core.task.split_size("train")
            idx = rng.choice(size, n_prompts, replace=size < n_prompts)
            prompts = [core.task.prompt("train", int(i)) for i in idx]
            if st["best_score"] is None and cfg["eval_prompts"] > 0:  # the starting policy is a candidate too
                st["best_score"], st["best_state"] = self.validation_reward(core), self._state_copy()
                run.update(0, {"validation_reward": st["best_score"]})
            while st["grow"] < cfg["grow_steps"] and not run.stopped:
                # ---------------- Grow: D_g = D ∪ samples of the current policy, each scored once
                if st["data"] is None:
                    torch.manual_seed(sub_seed(self.seed, 12, st["grow"]))
                    x, y, cost = [], [], 0
                    if original:
                        x += prompts
                        y += [core.task.reference("train", int(i)) for i in idx]
                        cost += len(prompts) if st["grow"] == 0 else 0  # the original data is paid for once
                    for _ in range(cfg["samples_per_prompt"]):
                        x += prompts
                        y += self.policy.generate_text(prompts, temperature=cfg["temperature"])
                        cost += len(prompts)
                    rewards = core.score(x, y).float().cpu().numpy()
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
