"""PPO for RLHF: clipped surrogate, GAE on per-token KL-shaped rewards, a value head on the policy.

Reads top to bottom like CleanRL's ``ppo.py``; the equations are those of the seed lectures
(Schulman et al. 2017, "PPO with Clipped Objective" and "PPO with Adaptive KL Penalty") and of the
RLHF papers that put PPO on language models (Ziegler et al. 2019, Stiennon et al. 2020, InstructGPT),
with the defaults of TRL's ``PPOTrainer`` (Huang et al. 2024, "The N+ implementation details of RLHF
with PPO") where the papers say nothing.

**One iteration** (``batch_size`` completions, the budget's unit):

1. *Rollout*: one episode per training prompt in the token MDP (a vector view of the env with one
   row per completion, :class:`~.common.EnvSampler`): ``pi_theta`` picks each token (with a KV
   cache), the env's ``step`` pays ``beta * log pi_ref(a_t|s_t)`` per token and the reward model's
   ``RM(x, y)`` on the last one.
2. *Rewards* per token (KL shaping, Ziegler et al. 2019): the env's reward plus the agent's own
   ``-beta * log pi_theta(a_t|s_t)`` (docs/DESIGN.md, "The token MDP"; :meth:`~.common.EnvRollout.kl_rewards`)::

       r_t = -beta * (log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t))      + RM(x, y) at the last token

   So ``sum_t r_t`` is the episode return ``RM - beta * log(pi_theta(y|x) / pi_ref(y|x))``, and its
   expectation is the seeds' RLHF objective ``E[RM] - beta * KL(pi_theta || pi_ref)``. (When the
   adaptive controller has moved ``beta`` away from the env's, the env's ``log pi_ref`` term is
   re-weighted to the current ``beta``.)
3. *Advantages* by GAE (Schulman et al. 2016), ``gamma = 1``, ``lambda = 0.95``::

       delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)          (V = 0 after the last token)
       A_t     = sum_l (gamma * lambda)^l * delta_{t+l},     R_t = A_t + V(s_t)  (value targets)

   whitened over the batch's tokens.
4. *Update*: ``ppo_epochs`` passes (K) of minibatch Adam on the policy loss of ``objective`` plus the
   value loss. ``objective="clip"`` (default) is the clipped surrogate (seeds, Algorithm 5)::

       ratio_t = pi_theta(a_t|s_t) / pi_theta_old(a_t|s_t)
       L_clip  = E_t[ min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t) ]       (maximised)

   ``objective="kl_penalty"`` is the adaptive KL penalty (seeds, Algorithm 4), with ``pi_theta_old`` the
   policy that collected the batch and the per-token KL estimated on its tokens::

       L_klpen = E_t[ ratio_t * A_t ]  -  beta_k * E_t[ KL(pi_theta_old(.|s_t) || pi_theta(.|s_t)) ]

   and in both cases::

       L_V     = E_t[ 1/2 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2) ]
       loss    = -L + vf_coef * L_V

   stopping the epoch loop early when the approximate KL between the new and the old policy exceeds
   ``target_kl`` (as SB3 does).
5. *Coefficients*. (a) The penalty's ``beta_k`` (``objective="kl_penalty"`` only): with
   ``d = E_t[KL(pi_theta_k || pi_theta_k+1)]`` measured on the batch after the K epochs and the target
   ``delta = kl_penalty_target``: ``beta_k+1 = 2 beta_k`` if ``d >= 1.5 delta``, ``beta_k / 2`` if
   ``d <= delta / 1.5``. (b) The *reference*-KL coefficient ``beta`` of the reward (step 2), a different
   thing: ``kl_controller="fixed"`` keeps it; ``"adaptive"`` is Ziegler et al. 2019's proportional
   controller (TRL's ``AdaptiveKLController``) on the rollout's ``KL = E[sum_t log pi_theta/pi_ref]``::

       e    = clip(KL / kl_target - 1, -0.2, 0.2)
       beta = beta * (1 + e * n / kl_horizon)          (n = completions in the batch)

The losses and both controllers are small pure functions right below (tested by hand in
``tests/test_agent_math.py``); the update calls them.

The value head (``Linear(hidden, 1)``, zero-initialised) shares the policy's transformer; with
``value_warmup_steps > 0`` it is first fitted alone to the first rollout's Monte-Carlo returns, so
early advantages are not just rewards-to-go.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rlhfgym.envs.hf import position_ids

from .base import Agent, AgentError
from .common import SPLITS, AgentConfig, EnvSampler, TrainingAgent, TrainingRun, param, stream_prompt_indices
from .policy import CausalLMPolicy

KL_MODES = ("fixed", "adaptive")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates (Schulman et al. 2016) of (B, T) per-token rewards.

    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`` with ``V = 0`` after a completion's last token,
    ``A_t = delta_t + gamma * lam * A_{t+1}``; zero on padding.
    """
    values = values * mask
    adv = torch.zeros_like(rewards)
    gae = torch.zeros_like(rewards[:, 0])
    horizon = rewards.shape[1]
    for t in reversed(range(horizon)):
        next_v = values[:, t + 1] if t + 1 < horizon else torch.zeros_like(gae)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        gae = (delta + gamma * lam * gae) * mask[:, t]
        adv[:, t] = gae
    return adv


# ---------------------------------------------------------------------------------------------- the losses
# Pure functions of tensors (no model, no env): the update below calls them, tests/test_agent_math.py
# checks them against hand-computed values. ``log_ratio = log pi_theta(a_t|s_t) - log pi_theta_k(a_t|s_t)``
# per token (zero on padding), ``mask`` (B, T) marks real tokens; means are over real tokens.


def clipped_surrogate_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                           cliprange: float) -> torch.Tensor:
    """Minus the clipped surrogate (seeds, Algorithm 5; Schulman et al. 2017, eq. 7)::

        r_t    = exp(log_ratio_t) = pi_theta(a_t|s_t) / pi_theta_k(a_t|s_t)
        L_clip = E_t[ min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) ]          returns -L_clip

    (``-min(x, y) = max(-x, -y)``: the loss is ``E_t[max(-A_t r_t, -A_t clip(r_t))]``).
    """
    ratio = torch.exp(log_ratio)
    pg_losses = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
    return masked_mean(pg_losses, mask)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       cliprange_value: float) -> torch.Tensor:
    """The clipped value loss (PPO2 / TRL)::

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L_V    = 1/2 E_t[ max((V - R)^2, (V_clip - R)^2) ]
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def approx_kl_to_old(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta_k || pi_theta) on tokens sampled from pi_theta_k (Schulman's k3)::

        KL_t ~ (r_t - 1) - log r_t          (>= 0; unbiased, since E_{a ~ pi_theta_k}[r_t] = 1)
    """
    return masked_mean((torch.exp(log_ratio) - 1) - log_ratio, mask)


def kl_penalty_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """Minus the KL-penalised surrogate (seeds, Algorithm 4; Schulman et al. 2017, eq. 8)::

        L_KLPEN = E_t[ r_t A_t ]  -  beta_k * E_t[ KL(pi_theta_k(.|s_t) || pi_theta(.|s_t)) ]      returns -L_KLPEN

    with the per-token KL estimated by :func:`approx_kl_to_old` (whose gradient is, in expectation over
    the sampled tokens, the gradient of the exact per-state KL).
    """
    ratio = torch.exp(log_ratio)
    return masked_mean(-advantages * ratio, mask) + beta * approx_kl_to_old(log_ratio, mask)


def kl_penalty_beta_update(beta: float, kl: float, target: float) -> float:
    """Algorithm 4's coefficient rule after the K epochs, with ``kl`` the measured mean per-token
    KL(pi_theta_k || pi_theta_{k+1}) and ``target`` delta::

        beta_{k+1} = 2 beta_k     if KL >= 1.5 delta
                   = beta_k / 2   if KL <= delta / 1.5
                   = beta_k       otherwise
    """
    if kl >= 1.5 * target:
        return beta * 2.0
    if kl <= target / 1.5:
        return beta / 2.0
    return beta


def fixed_kl_controller(beta: float, kl: float, n: int, target: float, horizon: float) -> float:
    """The reference-KL coefficient of the RLHF reward, kept fixed: ``beta_{k+1} = beta_k``."""
    return beta


def adaptive_kl_controller(beta: float, kl: float, n: int, target: float, horizon: float) -> float:
    """Ziegler et al. 2019's proportional controller of the reference-KL coefficient (TRL's
    ``AdaptiveKLController``), with ``kl`` the batch's mean KL(pi_theta || pi_ref) per completion and
    ``n`` the completions in the batch::

        e         = clip(KL / KL_target - 1, -0.2, 0.2)
        beta_{k+1} = beta_k * (1 + e * n / horizon)
    """
    e = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + e * n / horizon)


KL_CONTROLLERS = {"fixed": fixed_kl_controller, "adaptive": adaptive_kl_controller}
OBJECTIVES = ("clip", "kl_penalty")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AgentError(f"ppo: {message}")


class PPO(TrainingAgent):
    """PPO with a KL-shaped reward against the env's reference policy (see the module docstring).

    Args:
        policy: a :class:`CausalLMPolicy` (gets a value head if it has none); None = a copy of the
            env's reference model, made in :meth:`learn`.
        hyperparameters: the fields of :class:`PPO.Config`.
    """

    @dataclass
    class Config(AgentConfig):
        """Hyperparameters of :class:`PPO`.

        learning_rate: Adam step size (TRL uses 3e-6 for 1B models; the 2.4M micro policy 3e-5 to 1e-4).
        batch_size: completions per rollout (and per update round).
        mini_batch_size: completions per gradient step; ``batch_size / mini_batch_size`` steps per epoch.
        ppo_epochs: passes over each rollout (K in the seeds).
        cliprange: epsilon of the clipped surrogate, > 0.
        cliprange_value: clip of the value update around the rollout's values, > 0.
        vf_coef: weight of the value loss.
        gamma, lam: discount and GAE lambda, in [0, 1].
        kl_coef: initial beta; None = the env's ``kl_coef`` (the objective the env defines).
        objective: the policy loss: "clip" (the clipped surrogate, Algorithm 5) or "kl_penalty" (the
            surrogate minus ``beta_k * KL(pi_theta_k || pi_theta)`` per token, with beta_k adapted between
            iterations toward ``kl_penalty_target``, Algorithm 4).
        kl_penalty_target: delta of "kl_penalty", the per-token KL(pi_theta_k || pi_theta_k+1) aimed at, in nats
            (Schulman et al. 2017 found 0.01 best of 0.003, 0.01, 0.03).
        kl_penalty_beta: beta_0 of "kl_penalty" (Schulman et al. 2017 start at 1; the rule adapts it quickly).
        kl_controller: how the *reference*-KL coefficient beta of the reward evolves: "fixed", or "adaptive"
            (Ziegler et al. 2019's proportional controller toward ``kl_target``, horizon ``kl_horizon``).
        kl_target: KL(pi_theta || pi_ref) per completion, in nats, that "adaptive" steers toward.
        kl_horizon: the controller's horizon in completions (TRL: 10000; beta moves by at most
            ``0.2 * batch_size / kl_horizon`` of itself per rollout).
        kl_mode, adaptive_kl_target: deprecated spellings of ``kl_controller`` / ``kl_target`` (kept for one
            release, with a DeprecationWarning). ``kl_mode="adaptive"`` used to double/halve beta (the PPO
            penalty's rule applied to the reference KL); it now selects the proportional controller.
        target_kl: stop this rollout's epochs once the approximate KL(old || new) exceeds it; None = never.
        whiten_advantages: normalise advantages over the batch's tokens.
        missing_eos_penalty: subtract this from the RM score of completions that never emitted EOS
            (TRL's option; they were truncated at ``max_new_tokens``); None = no penalty.
        max_grad_norm: gradient clipping (global norm).
        temperature: sampling temperature of the policy (``pi_theta`` is the tempered policy; 1 = the MDP's).
        value_warmup_steps: Adam steps fitting the value head alone before the first update.
        split: the task split training prompts come from.
        """

        learning_rate: float = param(3e-5, low=0, low_open=True)
        batch_size: int = param(64, low=1)
        mini_batch_size: int = param(16, low=1)
        ppo_epochs: int = param(4, low=1)
        cliprange: float = param(0.2, low=0, low_open=True)
        cliprange_value: float = param(0.2, low=0, low_open=True)
        vf_coef: float = param(0.1, low=0)
        gamma: float = param(1.0, low=0, high=1)
        lam: float = param(0.95, low=0, high=1)
        kl_coef: float | None = param(None, low=0)
        objective: str = param("clip", choices=OBJECTIVES)
        kl_penalty_target: float = param(0.01, low=0, low_open=True)
        kl_penalty_beta: float = param(1.0, low=0, low_open=True)
        kl_controller: str = param("fixed", choices=tuple(KL_CONTROLLERS))
        kl_target: float = param(3.0, low=0, low_open=True)
        kl_horizon: float = param(10000.0, low=0, low_open=True)
        target_kl: float | None = param(None, low=0, low_open=True)
        whiten_advantages: bool = True
        missing_eos_penalty: float | None = param(None, low=0)
        max_grad_norm: float = param(1.0, low=0, low_open=True)
        temperature: float = param(1.0, low=0, low_open=True)
        value_warmup_steps: int = param(50, low=0)
        split: str = param("train", choices=SPLITS)

        def check(self, agent: str) -> None:
            if self.mini_batch_size > self.batch_size:
                raise AgentError(f"{agent}: mini_batch_size must be an int in [1, batch_size={self.batch_size}], "
                                 f"got {self.mini_batch_size!r}.")

    name = "ppo"

    def __init__(self, policy: CausalLMPolicy | None = None, **hyperparameters):
        kl_mode = hyperparameters.pop("kl_mode", None)
        adaptive_kl_target = hyperparameters.pop("adaptive_kl_target", None)
        kl_controller = hyperparameters.get("kl_controller", "fixed")
        kl_target = hyperparameters.get("kl_target", 3.0)
        if kl_mode is not None:  # deprecated (one release): kl_mode -> kl_controller
            _require(kl_mode in KL_MODES, f"kl_mode must be one of {KL_MODES} (deprecated: use kl_controller=), got {kl_mode!r}.")
            _require(kl_controller in ("fixed", kl_mode),
                     f"kl_mode={kl_mode!r} (deprecated) contradicts kl_controller={kl_controller!r}; pass only kl_controller.")
            how = ("Ziegler et al.'s proportional controller, no longer the x2 / /2 rule"
                   if kl_mode == "adaptive" else "the same behaviour")
            warnings.warn(f"ppo: kl_mode={kl_mode!r} is deprecated and will be removed in the next release; it now means "
                          f"kl_controller={kl_mode!r} ({how}). For PPO's adaptive KL penalty (seeds, Algorithm 4) "
                          "use objective='kl_penalty'.", DeprecationWarning, stacklevel=2)
            hyperparameters["kl_controller"] = kl_mode
        if adaptive_kl_target is not None:  # deprecated (one release): adaptive_kl_target -> kl_target
            _require(kl_target in (3.0, adaptive_kl_target),
                     f"adaptive_kl_target={adaptive_kl_target} (deprecated) contradicts kl_target={kl_target}; pass only kl_target.")
            warnings.warn("ppo: adaptive_kl_target is deprecated and will be removed in the next release; "
                          "use kl_target (the same nats per completion).", DeprecationWarning, stacklevel=2)
            hyperparameters["kl_target"] = adaptive_kl_target
        super().__init__(policy, **hyperparameters)
        self.beta: float | None = None  # current reference-KL coefficient (set in learn; kl_controller adapts it)
        self.penalty_beta: float | None = None  # beta_k of objective="kl_penalty" (set in learn)
        self._restored = False  # the coefficients came from a checkpoint (load() or resume): learn() continues them

    # the coefficients travel in train_state.pt (and are restored by load())
    def train_state(self) -> dict:
        return {"beta": self.beta, "penalty_beta": self.penalty_beta}

    def restore_train_state(self, state: dict) -> None:
        self.beta, self.penalty_beta = state.get("beta"), state.get("penalty_beta")
        self._restored = True

    # ------------------------------------------------------------------------------------------ learning
    def learn(self, env, budget: int, callback: Callable[[Agent, dict], bool | None] | None = None, *,
              checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
              log_dir: str | Path | None = None, progress_bar: bool = True) -> "PPO":
        """Train on ``env`` until ``budget`` completions (in total, over resumes) have been sampled.

        ``checkpoint_dir``: resume from it when it holds a checkpoint, save to it every
        ``checkpoint_every`` completions and at the end. ``log_dir``: TensorBoard scalars.
        """
        c = self.config
        with TrainingRun(self, budget, callback=callback, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         log_dir=log_dir, progress_bar=progress_bar) as run:
            # resume, the policy with a value head V(s) (added to a given policy without one), seeding
            core, _, _ = self.start(run, env, value_head=True)
            policy = self.policy
            self.make_optimizer("adam", c["learning_rate"], eps=1e-5)
            restored, self._restored = self._restored, False
            if not (restored and self.beta is not None):  # a fresh run starts from the configured coefficients
                self.beta = core.kl_coef if c["kl_coef"] is None else c["kl_coef"]
            if not (restored and self.penalty_beta is not None):
                self.penalty_beta = c["kl_penalty_beta"]
            self.beta, self.penalty_beta = float(self.beta), float(self.penalty_beta)
            # the env's beta: this run's first; the adaptive controller may move self.beta away from it
            sampler = EnvSampler(env, kl_coef=self.beta, split=c["split"], device=policy.device)

            while not run.done:
                n = min(c["batch_size"], run.remaining)
                prompt_index = stream_prompt_indices(core, n, seed=self.seed, position=self.spent, split=c["split"])

                # ---- 1. rollout: one episode per prompt in the token MDP, pi_theta acting (KV cache)
                roll = sampler.rollout(policy, prompt_index, temperature=c["temperature"])
                mask = roll.mask.float()
                policy.eval()  # and it stays so: dropout would make pi_theta_old != pi_theta at step 0
                with torch.no_grad():
                    old_logp, old_values = policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask,
                                                                   temperature=c["temperature"], with_values=True)

                    # ---- 2. per-token rewards r_t = -beta (log pi - log pi_ref), RM(x, y) added at the last token
                    kl_t = (old_logp - roll.ref_logprobs) * mask
                    rewards = roll.kl_rewards(old_logp, self.beta)
                    last = mask.sum(1).long().clamp(min=1) - 1
                    scores = roll.scores.float()
                    if c["missing_eos_penalty"] is not None:  # TRL: truncated completions lose a fixed amount
                        penalty = c["missing_eos_penalty"] * (~roll.ended).float()
                        rewards[torch.arange(n, device=policy.device), last] -= penalty
                        scores = scores - penalty

                    # ---- optional value warm-up: fit V alone to the Monte-Carlo returns G_t = sum_{t'>=t} r_t'
                    if c["value_warmup_steps"] and self.spent == 0:
                        mc_returns = rewards.flip(1).cumsum(1).flip(1) * mask
                        self._warm_up_value(roll, mc_returns, mask, c["value_warmup_steps"])
                        old_logp, old_values = policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask,
                                                                       temperature=c["temperature"], with_values=True)

                    # ---- 3. GAE: delta_t = r_t + gamma V(s_{t+1}) - V(s_t); A_t = sum_l (gamma lam)^l delta_{t+l}
                    adv = gae_advantages(rewards, old_values, mask, c["gamma"], c["lam"])
                    returns = (adv + old_values) * mask  # value targets R_t = A_t + V(s_t)
                    adv = masked_whiten(adv, mask) if c["whiten_advantages"] else adv * mask

                # ---- 4. K epochs of minibatch Adam on the policy loss, clipped (Algorithm 5) or KL-penalised
                # (Algorithm 4) (eval mode: no dropout, so the ratio is exactly 1 before the first step, as the
                # surrogate assumes)
                stats: dict[str, list[float]] = {"pg_loss": [], "vf_loss": [], "approx_kl": [], "clipfrac": []}
                stop = False
                for _epoch in range(c["ppo_epochs"]):
                    for mb in torch.randperm(n).split(c["mini_batch_size"]):
                        mb_list, mb = mb.tolist(), mb.to(policy.device)
                        m = mask[mb]
                        new_logp, values = policy.forward_logprobs([roll.prompt_ids[i] for i in mb_list], roll.tokens[mb],
                                                                   roll.mask[mb], temperature=c["temperature"], with_values=True)
                        log_ratio = (new_logp - old_logp[mb]) * m  # log r_t(theta) = log pi_theta - log pi_theta_old
                        a = adv[mb]
                        if c["objective"] == "clip":
                            # -L_clip = -E_t[min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)]
                            pg_loss = clipped_surrogate_loss(log_ratio, a, m, c["cliprange"])
                        else:
                            # -L_klpen = -E_t[r_t A_t] + beta_k E_t[KL(pi_theta_old || pi_theta)]
                            pg_loss = kl_penalty_loss(log_ratio, a, m, self.penalty_beta)
                        # clipped value loss: 1/2 E_t[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)]
                        vf_loss = clipped_value_loss(values, old_values[mb], returns[mb], m, c["cliprange_value"])
                        loss = pg_loss + c["vf_coef"] * vf_loss
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        nn.utils.clip_grad_norm_(policy.parameters(), c["max_grad_norm"])
                        self.optimizer.step()
                        with torch.no_grad():
                            ratio = torch.exp(log_ratio)  # r_t(theta) = pi_theta / pi_theta_old
                            approx_kl = approx_kl_to_old(log_ratio, m).item()  # k3 estimator of KL(old || new)
                            stats["pg_loss"].append(pg_loss.item())
                            stats["vf_loss"].append(vf_loss.item())
                            stats["approx_kl"].append(approx_kl)
                            stats["clipfrac"].append(masked_mean(((ratio - 1).abs() > c["cliprange"]).float(), m).item())
                        if c["target_kl"] is not None and approx_kl > c["target_kl"]:
                            stop = True  # the policy moved too far from the one that sampled the data
                            break
                    if stop:
                        break

                # ---- 5. the coefficients of the next iteration
                kl = kl_t.sum(1).mean().item()  # E_y~pi[log pi(y|x) - log pi_ref(y|x)], per completion
                beta_used, penalty_beta_used = self.beta, self.penalty_beta
                # reference KL (the reward's beta): "fixed" keeps it; "adaptive" (Ziegler et al. 2019):
                #   e = clip(KL / KL_target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n / horizon)
                self.beta = KL_CONTROLLERS[c["kl_controller"]](self.beta, kl, n, c["kl_target"], c["kl_horizon"])
                policy_kl = None
                if c["objective"] == "kl_penalty":
                    # Algorithm 4: d = E_t[KL(pi_theta_k || pi_theta_k+1)] after the K epochs;
                    #   beta_k+1 = 2 beta_k if d >= 1.5 delta,  beta_k / 2 if d <= delta / 1.5
                    policy_kl = self._kl_to_rollout(roll, old_logp, mask)
                    self.penalty_beta = kl_penalty_beta_update(self.penalty_beta, policy_kl, c["kl_penalty_target"])

                metrics = {
                    "score": roll.scores.mean().item(),
                    "reward": scores.mean().item(),
                    "kl": kl,
                    "objective": (roll.scores - beta_used * kl_t.sum(1)).mean().item(),
                    "beta": beta_used,
                    "length": mask.sum(1).mean().item(),
                    "eos_rate": roll.ended.float().mean().item(),
                    "epochs_run": len(stats["pg_loss"]) / max(1, math.ceil(n / c["mini_batch_size"])),
                    **{k: float(np.mean(v)) for k, v in stats.items()},
                }
                if policy_kl is not None:
                    metrics.update(kl_penalty_beta=penalty_beta_used, policy_kl=policy_kl)
                metrics["gold"] = roll.mean_gold()  # reported, never trained on; None without a gold scorer
                run.update(n, metrics)
        return self

    @torch.no_grad()
    def _kl_to_rollout(self, roll, old_logp: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean per-token KL(pi_theta_old || pi_theta) over the rollout's tokens (:func:`approx_kl_to_old`)."""
        c, policy = self.config, self.policy
        total, tokens = 0.0, 0.0
        for s in range(0, len(roll.prompt_ids), c["mini_batch_size"]):
            rows, m = slice(s, s + c["mini_batch_size"]), mask[s:s + c["mini_batch_size"]]
            new_logp = policy.forward_logprobs(roll.prompt_ids[rows], roll.tokens[rows], roll.mask[rows],
                                               temperature=c["temperature"])
            total += approx_kl_to_old((new_logp - old_logp[rows]) * m, m).item() * m.sum().item()
            tokens += m.sum().item()
        return total / max(tokens, 1.0)

    def _warm_up_value(self, roll, targets: torch.Tensor, mask: torch.Tensor, steps: int) -> None:
        """Fit the value head alone (linear regression on frozen last hidden states) to ``targets``."""
        policy = self.policy
        ids, att, p = policy.batch(roll.prompt_ids, roll.tokens, roll.mask)
        with torch.no_grad(), policy.autocast():
            out = policy.model(input_ids=ids, attention_mask=att, position_ids=position_ids(att), output_hidden_states=True)
            hidden = out.hidden_states[-1][:, p - 1:-1].float()
        opt = torch.optim.Adam(policy.value_head.parameters(), lr=1e-2)
        with torch.enable_grad():
            for _ in range(steps):
                v = policy.value_head(hidden).squeeze(-1)
                loss = masked_mean((v - targets) ** 2, mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
