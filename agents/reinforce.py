"""REINFORCE with a moving-average baseline, and RLOO (REINFORCE leave-one-out), on whole completions.

Both treat a completion ``y`` of a prompt ``x`` as one action (a bandit over sequences, as in
Ahmadian et al. 2024 "Back to Basics" and TRL's ``RLOOTrainer``) and optimise the seeds' RLHF
objective with the sequence-level KL-regularised reward::

    R(x, y) = RM(x, y) - beta * sum_t log( pi_theta(y_t | x, y_<t) / pi_ref(y_t | x, y_<t) )

This is exactly the return of one episode of the token MDP (docs/DESIGN.md): the env pays
``beta * log pi_ref(a_t|s_t)`` per token plus ``RM`` on the last one, the agent adds its own
``-beta * log pi_theta(a_t|s_t)``; here the whole batch is computed at once (``pi_ref`` by one
teacher-forced pass of ``env.unwrapped.reference_model``, ``RM`` by ``env.unwrapped.score``).

Policy gradient with a baseline (Williams 1992; the seeds' "REINFORCE with a baseline")::

    grad J = E_y~pi [ (R(x, y) - b) * grad log pi_theta(y | x) ],    log pi_theta(y|x) = sum_t log pi_theta(y_t | ...)

* :class:`Reinforce`: ``b`` = exponential moving average of past batches' mean reward
  (``b <- decay * b + (1 - decay) * mean(R)``, updated after the batch is used, so ``b`` does not
  depend on the samples it baselines and the gradient stays unbiased).
* :class:`RLOO`: ``rloo_k`` completions per prompt; the baseline of sample ``i`` is the mean reward of
  the *other* ``k - 1`` samples of the same prompt, ``b_i = (sum_j R_j - R_i) / (k - 1)`` (unbiased,
  and per prompt, so it also removes the prompt's difficulty).

``R`` is treated as a constant (``detach``): its KL part is the reward, not a second loss. One
gradient step per batch (on-policy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .base import Agent, AgentError, TrainingRun, load_train_state, reference_for, save_train_state
from .policy import CausalLMPolicy
from .ppo import _gold, _rng_state, _set_rng_state, _train_prompts


class Reinforce(Agent):
    """REINFORCE on the KL-regularised sequence reward with a moving-average baseline.

    Args:
        policy: a :class:`CausalLMPolicy`; None = a copy of the env's reference model.
        learning_rate: Adam step size.
        batch_size: completions per update.
        kl_coef: beta; None = the env's ``kl_coef``.
        baseline_decay: ``b <- decay * b + (1 - decay) * mean(R)``, in [0, 1) (0 = last batch's mean).
        normalize_advantages: divide ``R - b`` by its batch standard deviation.
        missing_eos_penalty: subtract this from the RM score of completions truncated without EOS.
        max_grad_norm: gradient clipping (global norm).
        temperature: sampling temperature (``pi_theta`` is the tempered policy).
        split: the task split training prompts come from.
    """

    name = "reinforce"

    def __init__(self, policy: CausalLMPolicy | None = None, *, learning_rate: float = 1e-4, batch_size: int = 32,
                 kl_coef: float | None = None, baseline_decay: float = 0.9, normalize_advantages: bool = False,
                 missing_eos_penalty: float | None = None, max_grad_norm: float = 1.0, temperature: float = 1.0,
                 split: str = "train", device: str = "cpu", seed: int = 0):
        require = self._require
        require(learning_rate > 0, f"learning_rate must be > 0, got {learning_rate}.")
        require(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be an int >= 1, got {batch_size!r}.")
        require(kl_coef is None or (math.isfinite(kl_coef) and kl_coef >= 0),
                f"kl_coef must be >= 0 (or None for the env's), got {kl_coef}.")
        require(0 <= baseline_decay < 1, f"baseline_decay must be in [0, 1), got {baseline_decay}.")
        require(missing_eos_penalty is None or missing_eos_penalty >= 0,
                f"missing_eos_penalty must be >= 0 or None, got {missing_eos_penalty}.")
        require(max_grad_norm > 0, f"max_grad_norm must be > 0, got {max_grad_norm}.")
        require(temperature > 0, f"temperature must be > 0 (the policy must stay stochastic), got {temperature}.")
        require(split in ("train", "validation", "test"), f"split must be train, validation or test, got {split!r}.")
        super().__init__(policy, device=device, seed=seed, learning_rate=learning_rate, batch_size=batch_size,
                         kl_coef=kl_coef, baseline_decay=baseline_decay, normalize_advantages=normalize_advantages,
                         missing_eos_penalty=missing_eos_penalty, max_grad_norm=max_grad_norm, temperature=temperature,
                         split=split)
        self.baseline: float | None = None  # moving average of R (REINFORCE only)
        self.optimizer: torch.optim.Optimizer | None = None
        self._train_state: dict | None = None

    def _require(self, ok: bool, message: str) -> None:
        if not ok:
            raise AgentError(f"{self.name}: {message}")

    # ------------------------------------------------------------------------------------------ the baselines
    @property
    def samples_per_prompt(self) -> int:
        return 1

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """``R - b`` with ``b`` the moving average of earlier batches (the first batch uses its own mean)."""
        mean = rewards.mean().item()
        b = mean if self.baseline is None else self.baseline
        d = self.config["baseline_decay"]
        self.baseline = mean if self.baseline is None else d * self.baseline + (1 - d) * mean
        return rewards - b

    # ------------------------------------------------------------------------------------------ learning
    def learn(self, env, budget: int, callback: Callable[[Agent, dict], bool | None] | None = None, *,
              checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
              log_dir: str | Path | None = None, progress_bar: bool = True):
        """Train on ``env`` until ``budget`` completions (in total, over resumes) have been sampled.

        ``checkpoint_dir``: resume from it when it holds a checkpoint, save to it every
        ``checkpoint_every`` completions and at the end. ``log_dir``: TensorBoard scalars.
        """
        c, k = self.config, self.samples_per_prompt
        if isinstance(budget, int) and 0 < budget < k:
            raise AgentError(f"{self.name}: budget={budget} is less than rloo_k={k} samples of one prompt; raise the budget.")
        with TrainingRun(self, budget, callback=callback, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         log_dir=log_dir, progress_bar=progress_bar) as run:
            run.resume()
            policy = self.policy_for(env)
            ref = reference_for(policy, env)
            core = env.unwrapped
            beta = core.kl_coef if c["kl_coef"] is None else c["kl_coef"]
            self.optimizer = torch.optim.Adam(policy.parameters(), lr=c["learning_rate"], eps=1e-5)
            state = self._train_state or {}
            if "optimizer" in state:
                self.optimizer.load_state_dict(state["optimizer"])
            self.baseline = state.get("baseline", self.baseline)
            if state:  # resumed (or loaded): continue the random stream where the checkpoint left it
                _set_rng_state(state)
            else:
                torch.manual_seed(self.seed)
            self._train_state = None

            while not run.stopped and run.remaining >= k:
                n_prompts = min(c["batch_size"] // k, run.remaining // k)
                prompts = _train_prompts(core, c["split"], n_prompts, seed=self.seed, spent=self.spent)
                prompts = [p for p in prompts for _ in range(k)]  # k samples of each prompt, side by side
                n = len(prompts)

                # ---- rollout y ~ pi_theta(.|x) (KV cache), scored by the env's reward model
                roll = policy.sample(prompts, temperature=c["temperature"])
                scores = core.score(prompts, roll.texts).to(policy.device).float()
                raw_scores = scores.clone()
                if c["missing_eos_penalty"] is not None:
                    scores = scores - c["missing_eos_penalty"] * (~roll.ended).float()

                # ---- log pi_theta(y|x) with gradients (eval mode: the log-probs of the policy that sampled y,
                # no dropout); log pi_ref(y|x) without
                policy.eval()
                logp = policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask, temperature=c["temperature"])
                with torch.no_grad():
                    ref_logp = policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask, model=ref)
                    # R(x, y) = RM(x, y) - beta * sum_t log(pi_theta / pi_ref)   (the token MDP's return)
                    kl = (logp.detach() - ref_logp).sum(1)
                    rewards = scores - beta * kl
                    adv = self.advantages(rewards)  # R - b (moving average, or leave-one-out for RLOO)
                    if c["normalize_advantages"]:
                        adv = adv / (adv.std() + 1e-8)

                # ---- policy gradient: maximise E[(R - b) * log pi_theta(y|x)]
                seq_logp = logp.sum(1)
                loss = -(adv * seq_logp).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), c["max_grad_norm"])
                self.optimizer.step()

                metrics = {
                    "score": raw_scores.mean().item(),
                    "reward": scores.mean().item(),
                    "kl": kl.mean().item(),
                    "objective": (raw_scores - beta * kl).mean().item(),
                    "loss": loss.item(),
                    "grad_norm": float(grad_norm),
                    "length": roll.mask.float().sum(1).mean().item(),
                    "eos_rate": roll.ended.float().mean().item(),
                }
                if self.baseline is not None:
                    metrics["baseline"] = self.baseline
                gold = _gold(core, prompts, roll.texts)
                if gold is not None:
                    metrics["gold"] = gold
                run.update(n, metrics)
        return self

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_extra(self, directory: Path) -> None:
        if self.optimizer is not None:
            save_train_state(directory, {"optimizer": self.optimizer.state_dict(), "baseline": self.baseline, **_rng_state()})

    def load_extra(self, directory: Path) -> None:
        self._train_state = load_train_state(directory, device=self.device)
        if self._train_state:
            self.baseline = self._train_state.get("baseline")


class RLOO(Reinforce):
    """REINFORCE leave-one-out: ``rloo_k`` samples per prompt, each baselined by the mean of the others.

    Args: those of :class:`Reinforce` (``batch_size`` counts completions: ``batch_size // rloo_k``
    prompts per update; ``baseline_decay`` is unused), plus ``rloo_k >= 2``. A budget that is not a
    multiple of ``rloo_k`` leaves the remainder unspent.
    """

    name = "rloo"

    def __init__(self, policy: CausalLMPolicy | None = None, *, rloo_k: int = 4, batch_size: int = 32, **kwargs):
        if not isinstance(rloo_k, int) or isinstance(rloo_k, bool) or rloo_k < 2:
            raise AgentError(f"rloo: rloo_k must be an int >= 2 (the leave-one-out baseline needs another sample), got {rloo_k!r}.")
        if not isinstance(batch_size, int) or batch_size < rloo_k:
            raise AgentError(f"rloo: batch_size must be an int >= rloo_k={rloo_k} (k samples per prompt), got {batch_size!r}.")
        super().__init__(policy, batch_size=batch_size, **kwargs)
        self.config["rloo_k"] = rloo_k

    @property
    def samples_per_prompt(self) -> int:
        return self.config["rloo_k"]

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """``R_i - (sum_j R_j - R_i) / (k - 1)`` over the ``k`` samples of each prompt."""
        k = self.config["rloo_k"]
        r = rewards.view(-1, k)
        baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
        return (r - baseline).view(-1)
