"""REINFORCE with a moving-average baseline, and RLOO (REINFORCE leave-one-out), on whole completions.

Both treat a completion ``y`` of a prompt ``x`` as one action (a bandit over sequences, as in
Ahmadian et al. 2024 "Back to Basics" and TRL's ``RLOOTrainer``) and optimise the seeds' RLHF
objective with the sequence-level KL-regularised reward::

    R(x, y) = RM(x, y) - beta * sum_t log( pi_theta(y_t | x, y_<t) / pi_ref(y_t | x, y_<t) )

This is the return of one episode of the token MDP (docs/DESIGN.md), and the agent collects it
by acting in the MDP: a batch of completions is one batch of episodes of a vector view of the env
(:class:`~.common.EnvSampler`, one row per completion), whose ``step`` pays
``beta * log pi_ref(a_t|s_t)`` per token plus ``RM`` on the last one; the agent adds its own
``-beta * log pi_theta(a_t|s_t)`` (:meth:`~.common.EnvRollout.kl_rewards`).

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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import Agent, AgentError
from .common import SPLITS, AgentConfig, EnvSampler, TrainingAgent, TrainingRun, param, stream_prompt_indices
from .policy import CausalLMPolicy


# ---------------------------------------------------------------------------------------------- the math
# Pure functions of tensors: the agents call them, tests/test_agent_math.py checks them by hand.


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO's advantages for ``k`` consecutive samples of each prompt (rewards (B,), B a multiple of k)::

        A_i = R_i - b_i,    b_i = (sum_j R_j - R_i) / (k - 1)        (the mean reward of the *other* samples)
    """
    r = rewards.view(-1, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
    return (r - baseline).view(-1)


def policy_gradient_loss(seq_logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline, as a loss to minimise: ``-mean_i[A_i * log pi_theta(y_i|x_i)]``
    (``A`` a constant; its gradient is the policy-gradient estimate ``-mean_i[A_i grad log pi_theta(y_i|x_i)]``)."""
    return -(advantages * seq_logp).mean()


class Reinforce(TrainingAgent):
    """REINFORCE on the KL-regularised sequence reward with a moving-average baseline.

    Args:
        policy: a :class:`CausalLMPolicy`; None = a copy of the env's reference model.
        hyperparameters: the fields of :class:`Reinforce.Config`.
    """

    @dataclass
    class Config(AgentConfig):
        """Hyperparameters of :class:`Reinforce`.

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

        learning_rate: float = param(1e-4, low=0, low_open=True)
        batch_size: int = param(32, low=1)
        kl_coef: float | None = param(None, low=0)
        baseline_decay: float = param(0.9, low=0, high=1, high_open=True)
        normalize_advantages: bool = False
        missing_eos_penalty: float | None = param(None, low=0)
        max_grad_norm: float = param(1.0, low=0, low_open=True)
        temperature: float = param(1.0, low=0, low_open=True)
        split: str = param("train", choices=SPLITS)

    name = "reinforce"

    def __init__(self, policy: CausalLMPolicy | None = None, **hyperparameters):
        super().__init__(policy, **hyperparameters)
        self.baseline: float | None = None  # moving average of R (REINFORCE only)

    # the baseline travels in train_state.pt (and is restored by load())
    def train_state(self) -> dict:
        return {"baseline": self.baseline}

    def restore_train_state(self, state: dict) -> None:
        self.baseline = state.get("baseline")

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
            core, _, _ = self.start(run, env)  # resume, policy, seeding
            policy = self.policy
            beta = core.kl_coef if c["kl_coef"] is None else c["kl_coef"]
            self.make_optimizer("adam", c["learning_rate"], eps=1e-5)
            sampler = EnvSampler(env, kl_coef=beta, split=c["split"], device=policy.device)

            while not run.stopped and run.remaining >= k:
                n_prompts = min(c["batch_size"] // k, run.remaining // k)
                prompt_index = stream_prompt_indices(core, n_prompts, seed=self.seed, position=self.spent, split=c["split"])
                prompt_index = prompt_index.repeat(k)  # k samples of each prompt, side by side
                n = len(prompt_index)

                # ---- rollout: one episode per completion y ~ pi_theta(.|x) in the token MDP, which pays
                # beta * log pi_ref(a_t|s_t) per token and RM(x, y) at the end
                roll = sampler.rollout(policy, prompt_index, temperature=c["temperature"])
                penalty = 0.0 if c["missing_eos_penalty"] is None else c["missing_eos_penalty"] * (~roll.ended).float()

                # ---- log pi_theta(y|x) with gradients (eval mode: the log-probs of the policy that sampled y, no dropout)
                policy.eval()
                logp = policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask, temperature=c["temperature"])
                with torch.no_grad():
                    # R(x, y) = sum_t [r_t - beta log pi_theta(a_t|s_t)] = RM(x, y) - beta sum_t log(pi_theta / pi_ref)
                    rewards = roll.kl_rewards(logp.detach(), beta).sum(1) - penalty
                    kl = (logp.detach() - roll.ref_logprobs).sum(1)
                    adv = self.advantages(rewards)  # R - b (moving average, or leave-one-out for RLOO)
                    if c["normalize_advantages"]:
                        adv = adv / (adv.std() + 1e-8)

                # ---- policy gradient: maximise E[(R - b) * log pi_theta(y|x)]
                seq_logp = logp.sum(1)
                loss = policy_gradient_loss(seq_logp, adv)
                grad_norm = self.step(loss)  # zero_grad, backward, clip at max_grad_norm, Adam step

                metrics = {
                    "score": roll.scores.mean().item(),
                    "reward": (roll.scores - penalty).mean().item(),
                    "kl": kl.mean().item(),
                    "objective": (roll.scores - beta * kl).mean().item(),
                    "loss": loss.item(),
                    "grad_norm": grad_norm,
                    "length": roll.mask.float().sum(1).mean().item(),
                    "eos_rate": roll.ended.float().mean().item(),
                }
                if self.baseline is not None:
                    metrics["baseline"] = self.baseline
                metrics["gold"] = roll.mean_gold()  # reported, never trained on; None without a gold scorer
                run.update(n, metrics)
        return self


class RLOO(Reinforce):
    """REINFORCE leave-one-out: ``rloo_k`` samples per prompt, each baselined by the mean of the others.

    Args: those of :class:`Reinforce` (``batch_size`` counts completions: ``batch_size // rloo_k``
    prompts per update; ``baseline_decay`` is unused), plus ``rloo_k >= 2``. A budget that is not a
    multiple of ``rloo_k`` leaves the remainder unspent.
    """

    @dataclass
    class Config(Reinforce.Config):
        """Hyperparameters of :class:`RLOO`: those of :class:`Reinforce`, plus ``rloo_k`` samples per
        prompt (>= 2: the leave-one-out baseline needs another sample)."""

        rloo_k: int = param(4, low=2)

        def check(self, agent: str) -> None:
            if self.batch_size < self.rloo_k:
                raise AgentError(f"{agent}: batch_size must be an int >= rloo_k={self.rloo_k} (k samples per prompt), "
                                 f"got {self.batch_size!r}.")

    name = "rloo"

    @property
    def samples_per_prompt(self) -> int:
        return self.config["rloo_k"]

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """``R_i - (sum_j R_j - R_i) / (k - 1)`` over the ``k`` samples of each prompt."""
        return leave_one_out_advantages(rewards, self.config["rloo_k"])
