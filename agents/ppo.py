"""PPO for RLHF: clipped surrogate, GAE on per-token KL-shaped rewards, a value head on the policy.

Reads top to bottom like CleanRL's ``ppo.py``; the equations are those of the seed lectures
(Schulman et al. 2017, "PPO with Clipped Objective" and "PPO with Adaptive KL Penalty") and of the
RLHF papers that put PPO on language models (Ziegler et al. 2019, Stiennon et al. 2020, InstructGPT),
with TRL's ``PPOTrainer`` defaults where the lectures say nothing (docs: /work/shared/REFERENCES.md).

**One iteration** (``batch_size`` completions, the budget's unit):

1. *Rollout*: sample one completion per training prompt from ``pi_theta`` with a KV cache
   (:meth:`CausalLMPolicy.sample`), score it with the env's reward model ``RM(x, y)``.
2. *Rewards* per token (KL shaping, Ziegler et al. 2019)::

       r_t = -beta * (log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t))      + RM(x, y) at the last token

   This is exactly the token MDP's reward ``beta * log pi_ref(a_t|s_t)`` (+ RM on the last step)
   plus the agent's own ``-beta * log pi_theta(a_t|s_t)`` (docs/DESIGN.md, "The token MDP"), computed
   for the whole batch at once: the env's ``reference_model`` gives ``log pi_ref`` by one teacher-forced
   pass and ``env.unwrapped.score`` gives the final reward. So ``sum_t r_t`` is the episode return
   ``RM - beta * log(pi_theta(y|x) / pi_ref(y|x))`` the env + agent would produce step by step, and its
   expectation is the seeds' RLHF objective ``E[RM] - beta * KL(pi_theta || pi_ref)``.
3. *Advantages* by GAE (Schulman et al. 2016), ``gamma = 1``, ``lambda = 0.95``::

       delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)          (V = 0 after the last token)
       A_t     = sum_l (gamma * lambda)^l * delta_{t+l},     R_t = A_t + V(s_t)  (value targets)

   whitened over the batch's tokens.
4. *Update*: ``ppo_epochs`` passes of minibatch Adam on the clipped surrogate (seeds, Algorithm 5)::

       ratio_t = pi_theta(a_t|s_t) / pi_theta_old(a_t|s_t)
       L_clip  = E_t[ min(ratio_t * A_t, clip(ratio_t, 1 - eps, 1 + eps) * A_t) ]       (maximised)
       L_V     = E_t[ 1/2 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2) ]
       loss    = -L_clip + vf_coef * L_V

   stopping the epoch loop early when the approximate KL between the new and the old policy exceeds
   ``target_kl`` (as SB3 does).
5. *KL coefficient*: ``kl_mode="fixed"`` keeps ``beta``; ``kl_mode="adaptive"`` applies the seeds'
   Algorithm 4 rule to the measured ``KL = E[sum_t log pi_theta/pi_ref]`` of the rollout against the
   target ``adaptive_kl_target`` (delta): ``beta *= 2`` if ``KL > 1.5 * delta``, ``beta /= 2`` if
   ``KL < delta / 1.5`` (the role Ziegler et al.'s proportional controller plays in RLHF).

The value head (``Linear(hidden, 1)``, zero-initialised) shares the policy's transformer; with
``value_warmup_steps > 0`` it is first fitted alone to the first rollout's Monte-Carlo returns, so
early advantages are not just rewards-to-go.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rlhfgym.envs.hf import position_ids

from .base import Agent, AgentError, TrainingRun, load_train_state, reference_for, save_train_state
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


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AgentError(f"ppo: {message}")


class PPO(Agent):
    """PPO with a KL-shaped reward against the env's reference policy (see the module docstring).

    Args:
        policy: a :class:`CausalLMPolicy` (gets a value head if it has none); None = a copy of the
            env's reference model, made in :meth:`learn`.
        learning_rate: Adam step size (TRL uses 3e-6 for 1B models; the 2.4M micro policy 3e-5 to 1e-4).
        batch_size: completions per rollout (and per update round).
        mini_batch_size: completions per gradient step; ``batch_size / mini_batch_size`` steps per epoch.
        ppo_epochs: passes over each rollout (K in the seeds).
        cliprange: epsilon of the clipped surrogate, > 0.
        cliprange_value: clip of the value update around the rollout's values, > 0.
        vf_coef: weight of the value loss.
        gamma, lam: discount and GAE lambda, in [0, 1].
        kl_coef: initial beta; None = the env's ``kl_coef`` (the objective the env defines).
        kl_mode: "fixed" or "adaptive" (the seeds' doubling/halving rule, target ``adaptive_kl_target`` nats).
        target_kl: stop this rollout's epochs once the approximate KL(old || new) exceeds it; None = never.
        whiten_advantages: normalise advantages over the batch's tokens.
        missing_eos_penalty: subtract this from the RM score of completions that never emitted EOS
            (TRL's option; they were truncated at ``max_new_tokens``); None = no penalty.
        max_grad_norm: gradient clipping (global norm).
        temperature: sampling temperature of the policy (``pi_theta`` is the tempered policy; 1 = the MDP's).
        value_warmup_steps: Adam steps fitting the value head alone before the first update.
        split: the task split training prompts come from.
    """

    name = "ppo"

    def __init__(self, policy: CausalLMPolicy | None = None, *, learning_rate: float = 3e-5, batch_size: int = 64,
                 mini_batch_size: int = 16, ppo_epochs: int = 4, cliprange: float = 0.2, cliprange_value: float = 0.2,
                 vf_coef: float = 0.1, gamma: float = 1.0, lam: float = 0.95, kl_coef: float | None = None,
                 kl_mode: str = "fixed", adaptive_kl_target: float = 3.0, target_kl: float | None = None,
                 whiten_advantages: bool = True, missing_eos_penalty: float | None = None, max_grad_norm: float = 1.0,
                 temperature: float = 1.0, value_warmup_steps: int = 50, split: str = "train",
                 device: str = "cpu", seed: int = 0):
        _require(learning_rate > 0, f"learning_rate must be > 0, got {learning_rate}.")
        _require(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be an int >= 1, got {batch_size!r}.")
        _require(isinstance(mini_batch_size, int) and 1 <= mini_batch_size <= batch_size,
                 f"mini_batch_size must be an int in [1, batch_size={batch_size}], got {mini_batch_size!r}.")
        _require(isinstance(ppo_epochs, int) and ppo_epochs >= 1, f"ppo_epochs must be an int >= 1, got {ppo_epochs!r}.")
        _require(cliprange > 0, f"cliprange must be > 0 (0.2 is usual), got {cliprange}.")
        _require(cliprange_value > 0, f"cliprange_value must be > 0 (0.2 is usual), got {cliprange_value}.")
        _require(vf_coef >= 0, f"vf_coef must be >= 0, got {vf_coef}.")
        _require(0 <= gamma <= 1 and 0 <= lam <= 1, f"gamma and lam must be in [0, 1], got {gamma} and {lam}.")
        _require(kl_coef is None or (math.isfinite(kl_coef) and kl_coef >= 0),
                 f"kl_coef must be >= 0 (or None for the env's), got {kl_coef}.")
        _require(kl_mode in KL_MODES, f"kl_mode must be one of {KL_MODES}, got {kl_mode!r}.")
        _require(adaptive_kl_target > 0, f"adaptive_kl_target must be > 0 nats, got {adaptive_kl_target}.")
        _require(target_kl is None or target_kl > 0, f"target_kl must be > 0 or None, got {target_kl}.")
        _require(missing_eos_penalty is None or missing_eos_penalty >= 0,
                 f"missing_eos_penalty must be >= 0 or None, got {missing_eos_penalty}.")
        _require(max_grad_norm > 0, f"max_grad_norm must be > 0, got {max_grad_norm}.")
        _require(temperature > 0, f"temperature must be > 0 (the policy must stay stochastic), got {temperature}.")
        _require(isinstance(value_warmup_steps, int) and value_warmup_steps >= 0,
                 f"value_warmup_steps must be an int >= 0, got {value_warmup_steps!r}.")
        _require(split in ("train", "validation", "test"), f"split must be train, validation or test, got {split!r}.")
        super().__init__(policy, device=device, seed=seed, learning_rate=learning_rate, batch_size=batch_size,
                         mini_batch_size=mini_batch_size, ppo_epochs=ppo_epochs, cliprange=cliprange,
                         cliprange_value=cliprange_value, vf_coef=vf_coef, gamma=gamma, lam=lam, kl_coef=kl_coef,
                         kl_mode=kl_mode, adaptive_kl_target=adaptive_kl_target, target_kl=target_kl,
                         whiten_advantages=whiten_advantages, missing_eos_penalty=missing_eos_penalty,
                         max_grad_norm=max_grad_norm, temperature=temperature, value_warmup_steps=value_warmup_steps,
                         split=split)
        self.beta: float | None = None  # current KL coefficient (set in learn; adapted in kl_mode="adaptive")
        self.optimizer: torch.optim.Optimizer | None = None
        self._train_state: dict | None = None

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
            run.resume()
            policy = self.policy_for(env, value_head=True)
            if policy.value_head is None:  # a policy given without one: add V(s) on its last hidden state
                policy.value_head = nn.Linear(policy.model.config.hidden_size, 1).to(policy.device)
                nn.init.zeros_(policy.value_head.weight), nn.init.zeros_(policy.value_head.bias)
            ref = reference_for(policy, env)
            core = env.unwrapped
            self.optimizer = torch.optim.Adam(policy.parameters(), lr=c["learning_rate"], eps=1e-5)
            state = self._train_state or {}
            self.beta = float(state.get("beta", core.kl_coef if c["kl_coef"] is None else c["kl_coef"]))
            if "optimizer" in state:
                self.optimizer.load_state_dict(state["optimizer"])
            if state:  # resumed (or loaded): continue the random stream where the checkpoint left it
                _set_rng_state(state)
            else:
                torch.manual_seed(self.seed)
            self._train_state = None

            while not run.done:
                n = min(c["batch_size"], run.remaining)
                prompts = _train_prompts(core, c["split"], n, seed=self.seed, spent=self.spent)

                # ---- 1. rollout: y ~ pi_theta(.|x) with a KV cache, scored by the env's reward model
                roll = policy.sample(prompts, temperature=c["temperature"])
                mask = roll.mask.float()
                scores = core.score(prompts, roll.texts).to(policy.device).float()
                raw_scores = scores.clone()
                if c["missing_eos_penalty"] is not None:  # TRL: truncated completions lose a fixed amount
                    scores = scores - c["missing_eos_penalty"] * (~roll.ended).float()
                policy.eval()  # and it stays so: dropout would make pi_theta_old != pi_theta at step 0
                with torch.no_grad():
                    old_logp, old_values = policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask,
                                                                   temperature=c["temperature"], with_values=True)
                    ref_logp = policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask, model=ref)

                    # ---- 2. per-token rewards r_t = -beta (log pi - log pi_ref), RM(x, y) added at the last token
                    kl_t = (old_logp - ref_logp) * mask
                    rewards = -self.beta * kl_t
                    last = mask.sum(1).long().clamp(min=1) - 1
                    rewards[torch.arange(n, device=policy.device), last] += scores

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

                # ---- 4. K epochs of minibatch Adam on the clipped surrogate (eval mode: no dropout, so the
                # ratio is exactly 1 before the first step, as the surrogate assumes)
                stats: dict[str, list[float]] = {"pg_loss": [], "vf_loss": [], "approx_kl": [], "clipfrac": []}
                stop = False
                for _epoch in range(c["ppo_epochs"]):
                    for mb in torch.randperm(n).split(c["mini_batch_size"]):
                        mb_list, mb = mb.tolist(), mb.to(policy.device)
                        m = mask[mb]
                        new_logp, values = policy.forward_logprobs([roll.prompt_ids[i] for i in mb_list], roll.tokens[mb],
                                                                   roll.mask[mb], temperature=c["temperature"], with_values=True)
                        log_ratio = (new_logp - old_logp[mb]) * m
                        ratio = torch.exp(log_ratio)  # r_t(theta) = pi_theta / pi_theta_old
                        a = adv[mb]
                        # L_clip = min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t); we minimise its negative
                        pg_losses = torch.max(-a * ratio, -a * torch.clamp(ratio, 1 - c["cliprange"], 1 + c["cliprange"]))
                        pg_loss = masked_mean(pg_losses, m)
                        # clipped value loss: 1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
                        v_old, ret = old_values[mb], returns[mb]
                        v_clipped = v_old + torch.clamp(values - v_old, -c["cliprange_value"], c["cliprange_value"])
                        vf_loss = 0.5 * masked_mean(torch.max((values - ret) ** 2, (v_clipped - ret) ** 2), m)
                        loss = pg_loss + c["vf_coef"] * vf_loss
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        nn.utils.clip_grad_norm_(policy.parameters(), c["max_grad_norm"])
                        self.optimizer.step()
                        with torch.no_grad():
                            approx_kl = masked_mean((ratio - 1) - log_ratio, m).item()  # k3 estimator of KL(old||new)
                            stats["pg_loss"].append(pg_loss.item())
                            stats["vf_loss"].append(vf_loss.item())
                            stats["approx_kl"].append(approx_kl)
                            stats["clipfrac"].append(masked_mean(((ratio - 1).abs() > c["cliprange"]).float(), m).item())
                        if c["target_kl"] is not None and approx_kl > c["target_kl"]:
                            stop = True  # the policy moved too far from the one that sampled the data
                            break
                    if stop:
                        break

                # ---- 5. KL coefficient: fixed, or the seeds' adaptive rule on KL(pi_theta || pi_ref)
                kl = kl_t.sum(1).mean().item()  # E_y~pi[log pi(y|x) - log pi_ref(y|x)], per completion
                beta_used = self.beta
                if c["kl_mode"] == "adaptive":
                    if kl > 1.5 * c["adaptive_kl_target"]:
                        self.beta *= 2.0
                    elif kl < c["adaptive_kl_target"] / 1.5:
                        self.beta /= 2.0

                metrics = {
                    "score": raw_scores.mean().item(),
                    "reward": scores.mean().item(),
                    "kl": kl,
                    "objective": (raw_scores - beta_used * kl_t.sum(1)).mean().item(),
                    "beta": beta_used,
                    "length": mask.sum(1).mean().item(),
                    "eos_rate": roll.ended.float().mean().item(),
                    "epochs_run": len(stats["pg_loss"]) / max(1, math.ceil(n / c["mini_batch_size"])),
                    **{k: float(np.mean(v)) for k, v in stats.items()},
                }
                gold = _gold(core, prompts, roll.texts)
                if gold is not None:
                    metrics["gold"] = gold
                run.update(n, metrics)
        return self

    def _warm_up_value(self, roll, targets: torch.Tensor, mask: torch.Tensor, steps: int) -> None:
        """Fit the value head alone (linear regression on frozen last hidden states) to ``targets``."""
        policy = self.policy
        ids, att, p = policy.batch(roll.prompt_ids, roll.tokens, roll.mask)
        with torch.no_grad():
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

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_extra(self, directory: Path) -> None:
        if self.optimizer is not None:
            save_train_state(directory, {"optimizer": self.optimizer.state_dict(), "beta": self.beta, **_rng_state()})

    def load_extra(self, directory: Path) -> None:
        self._train_state = load_train_state(directory, device=self.device)
        if self._train_state:
            self.beta = self._train_state.get("beta")


# ---------------------------------------------------------------------------------------------- helpers
# (shared with reinforce.py, which imports them: same prompts, same RNG bookkeeping, same gold report)


def _train_prompts(core, split: str, n: int, *, seed: int, spent: int) -> list[str]:
    """``n`` prompts drawn (with replacement) from ``split``; a pure function of (seed, spent), so a resumed
    run sees the prompts the uninterrupted one would have seen."""
    size = core.task.split_size(split)
    idx = np.random.default_rng([seed, spent]).integers(size, size=n)
    return [core.prompts(split, 1, int(i))[0] for i in idx]


def _gold(core, prompts, completions) -> float | None:
    """Mean gold score (reported only, never trained on) when the task has a gold scorer."""
    if not getattr(core.task, "has_gold", False):
        return None
    return float(np.mean(core.gold(prompts, completions)))


def _rng_state() -> dict:
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
