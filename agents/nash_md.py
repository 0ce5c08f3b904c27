"""Nash-MD: Nash learning from human feedback by mirror descent (Munos et al. 2023).

A reward model scores one completion; a *preference model* compares two, P(y > y' | x), and can
express preferences no scalar reward can (e.g. cyclic ones). Nash learning seeks the policy that
no other policy beats, ``pi* = argmax_pi min_pi' P(pi > pi')`` (regularised toward pi_ref), which
exists even for non-transitive preferences.

Mirror-descent view. With mu = pi_ref, step size eta and regularisation tau, Nash-MD iterates::

    pi_t^mu(y|x)  ∝  pi_t(y|x)^(1 - eta tau) * mu(y|x)^(eta tau)          (geometric mixture)
    pi_{t+1}      =  argmax_pi  eta P(pi > pi_t^mu) - KL(pi || pi_t^mu)

i.e. a mirror-descent (KL-proximal) step on the game against the mixture of the current policy
and the reference; its *last iterate* converges to the regularised Nash equilibrium. For language
models the mixture is taken per token (``beta = eta tau``, the ``mixture_coef``)::

    log pi^mu(y_t | s_t) = log_softmax( (1 - beta) log pi(. | s_t) + beta log pi_ref(. | s_t) )[y_t]

and the argmax is replaced by one gradient step on TRL's loss, for y ~ pi and y' ~ pi^mu::

    p    = P(y > y' | x)
    loss = beta_kl * KL(pi || pi_ref)  -  (p - 1/2) * sum_t log pi(y_t | s_t)

(the 1/2 is a control variate: beating the opponent half the time is neutral). The KL term is
also a REINFORCE surrogate on the sampled tokens: ``sum_t sg(log pi(y_t) - log pi_ref(y_t)) log pi(y_t)``.

Opponents (``opponent``): "mixture" (the current policy, mixed with pi_ref; ``mixture_coef = 0``
is pure self-play, ``= 1`` a best response to pi_ref), "past" (a uniformly drawn snapshot among
the last ``n_snapshots`` past policies, mixed with pi_ref: Munos et al.'s mixture of past
policies) or "ema" (an exponential moving average of past parameters, Nash-EMA, mixed with pi_ref).

The preference: a callable passed to :meth:`NashMD.learn` (``(prompts, a, b) -> P(a > b)`` or an
object with ``prefer``, e.g. a :class:`~rlhfgym.envs.feedback.preference_model.PreferenceModel`), else
``env.unwrapped.prefer`` (or its reward model's ``prefer``) when the env offers one, else the env's reward model as
``sigmoid((r(a) - r(b)) / preference_temperature)``; ``preference="labelers"`` uses the env's
simulated labeler population (its mixture probability, e.g. the non-transitive preset).

Budget: two completions per prompt per update (the policy's and the opponent's).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from rlhfgym.envs.lm import IncrementalLM

from .base import AgentError, TrainingRun, reference_for
from .dpo import (
    TrainingAgent,
    _mean_gold,
    as_preference_fn,
    check_range,
    env_core,
    env_prefer,
    labeler_population,
    preference_probs,
    reference_policy,
    seed_everything,
    sub_seed,
    train_prompts,
    trim,
)

__all__ = ["NashMD", "GeometricMixture", "OPPONENTS"]

OPPONENTS = ("mixture", "past", "ema")


class GeometricMixture:
    """The ``mixture`` hook of :meth:`CausalLMPolicy.sample`: per-token geometric mixture
    pi^mu ∝ pi^(1 - beta) pi_ref^beta, with the reference stepped on its own KV cache.

    ``start(prompt_ids, max_new_tokens)`` prefills the reference and returns the per-rollout
    stepper; ``mix(logp)`` turns the sampling model's log-probs into the mixture's; ``step(tokens,
    active)`` feeds the sampled tokens to the reference.
    """

    def __init__(self, reference, beta: float, window: int, vocab_size: int, temperature: float = 1.0):
        self.reference, self.beta, self.window, self.vocab_size = reference, float(beta), int(window), int(vocab_size)
        self.temperature = max(float(temperature), 1e-6)

    def start(self, prompt_ids, max_new_tokens: int) -> "GeometricMixture":
        run = copy.copy(self)
        run.lm = IncrementalLM(self.reference, len(prompt_ids), max(self.window, max(map(len, prompt_ids)) + max_new_tokens))
        run.ref_logits = run.lm.reset_rows(range(len(prompt_ids)), prompt_ids)
        return run

    def mix(self, logp: torch.Tensor) -> torch.Tensor:
        # log pi^mu = log_softmax((1 - beta) log pi + beta log pi_ref)
        ref_logp = torch.log_softmax(self.ref_logits.float()[:, : self.vocab_size] / self.temperature, dim=-1)
        return torch.log_softmax((1.0 - self.beta) * logp + self.beta * ref_logp.to(logp.device), dim=-1)

    def step(self, tokens: torch.Tensor, active: torch.Tensor) -> None:
        self.ref_logits = self.lm.step(tokens, active=active)


class NashMD(TrainingAgent):
    """Nash-MD with a two-argument preference and a geometric-mixture opponent.

    Args:
        mixture_coef: beta in [0, 1], the weight of pi_ref in the opponent's geometric mixture.
        kl_coef: beta_kl >= 0, the KL(pi || pi_ref) penalty.
        opponent: "mixture" (default), "past" or "ema" (see the module docstring).
        n_snapshots / snapshot_every: "past" keeps the last n_snapshots policies, one every
            snapshot_every updates (the starting policy is the first).
        ema_decay: "ema" keeps theta_ema <- d theta_ema + (1 - d) theta after each update, d in [0, 1).
        preference: "auto" (a callable given to learn, else env.prefer, else the reward model),
            "reward" (always the reward model), "env" (env.prefer, required) or "labelers"
            (the env's labeler population ``labelers``).
        preference_temperature: T > 0 in sigmoid((r(a) - r(b)) / T) for reward-derived preferences.
        learning_rate, batch_size (prompts per update), max_grad_norm, temperature (sampling).
    """

    name = "nash-md"

    def __init__(self, policy=None, *, mixture_coef: float = 0.25, kl_coef: float = 0.05, opponent: str = "mixture",
                 n_snapshots: int = 4, snapshot_every: int = 4, ema_decay: float = 0.9, preference: str = "auto",
                 preference_temperature: float = 0.1, labelers: str = "gold", learning_rate: float = 5e-5,
                 batch_size: int = 16, max_grad_norm: float = 1.0, temperature: float = 1.0, **kwargs: Any):
        from rlhfgym.envs.feedback.labelers import PRESETS

        n = self.name
        check_range("mixture_coef", n, mixture_coef, low=0, high=1)
        check_range("kl_coef", n, kl_coef, low=0)
        if opponent not in OPPONENTS:
            raise AgentError(f"{n}: unknown opponent {opponent!r}; use one of {', '.join(OPPONENTS)}.")
        check_range("n_snapshots", n, n_snapshots, low=1, integer=True)
        check_range("snapshot_every", n, snapshot_every, low=1, integer=True)
        check_range("ema_decay", n, ema_decay, low=0, high=1, high_open=True)
        if preference not in ("auto", "reward", "env", "labelers"):
            raise AgentError(f"{n}: unknown preference {preference!r}; use 'auto', 'reward', 'env' or 'labelers'.")
        check_range("preference_temperature", n, preference_temperature, low=0, low_open=True)
        if labelers not in PRESETS:
            raise AgentError(f"{n}: unknown labelers preset {labelers!r}; use one of {', '.join(PRESETS)}.")
        check_range("learning_rate", n, learning_rate, low=0, low_open=True)
        check_range("batch_size", n, batch_size, low=1, integer=True)
        check_range("max_grad_norm", n, max_grad_norm, low=0, low_open=True)
        check_range("temperature", n, temperature, low=0, low_open=True)
        self._opp = None  # the opponent's network for "past" / "ema"
        super().__init__(policy, mixture_coef=float(mixture_coef), kl_coef=float(kl_coef), opponent=opponent,
                         n_snapshots=n_snapshots, snapshot_every=snapshot_every, ema_decay=float(ema_decay),
                         preference=preference, preference_temperature=float(preference_temperature),
                         labelers=labelers, learning_rate=float(learning_rate), batch_size=batch_size,
                         max_grad_norm=float(max_grad_norm), temperature=float(temperature), **kwargs)

    # ------------------------------------------------------------------ the preference P(a > b | x)
    def preference_fn(self, env, preference=None):
        """The preference function ``(prompts, a, b) -> (B,) P(a > b)`` this agent trains against."""
        core = env_core(env, self.name)
        cfg = self.config
        if preference is not None:
            return as_preference_fn(preference, self.name)
        source = cfg["preference"]
        oracle = env_prefer(core)
        if source in ("auto", "env") and oracle is not None:
            return oracle
        if source == "env":
            raise AgentError(f"{self.name}: preference='env' but the env has no prefer(prompts, a, b); "
                             "use preference='reward' or pass preference= to learn().")
        if source == "labelers":
            pop = labeler_population(core, cfg["labelers"], None, None)
            return lambda p, a, b: torch.as_tensor(pop.population_prob(p, a, b), dtype=torch.float32)
        temp = cfg["preference_temperature"]

        def from_reward(prompts, a, b):  # sigmoid((r(a) - r(b)) / T): Bradley-Terry from the env's RM
            return torch.sigmoid((core.score(prompts, a).float().cpu() - core.score(prompts, b).float().cpu()) / temp)

        return from_reward

    # ------------------------------------------------------------------ opponents
    def _mixture(self, ref) -> GeometricMixture | None:
        beta = self.config["mixture_coef"]
        if beta == 0.0:
            return None  # pure self-play: the opponent samples from itself
        return GeometricMixture(ref, beta, self.policy.max_prompt_tokens + self.policy.max_new_tokens,
                                len(self.policy.tokenizer), self.config["temperature"])

    def _opponent_policy(self, st):
        """The policy the opponent's tokens come from before mixing with pi_ref."""
        from .policy import CausalLMPolicy

        kind = self.config["opponent"]
        if kind == "mixture":
            return self.policy
        if self._opp is None:
            self._opp = CausalLMPolicy(copy.deepcopy(self.policy.model), self.policy.tokenizer,
                                       max_prompt_tokens=self.policy.max_prompt_tokens,
                                       max_new_tokens=self.policy.max_new_tokens, device=self.policy.device)
            self._opp.requires_grad_(False)
            if kind == "ema":
                self._opp.model.load_state_dict(st["ema"])
        if kind == "past":  # a uniformly drawn past policy
            rng = np.random.default_rng(sub_seed(self.seed, 21, st["step"]))
            snap = st["snapshots"][int(rng.integers(len(st["snapshots"])))]
            self._opp.model.load_state_dict(snap)
        return self._opp

    def _after_update(self, st) -> None:
        cfg = self.config
        if cfg["opponent"] == "past" and st["step"] % cfg["snapshot_every"] == 0:
            st["snapshots"] = (st["snapshots"] + [self._model_state()])[-cfg["n_snapshots"]:]
        elif cfg["opponent"] == "ema":  # theta_ema <- d theta_ema + (1 - d) theta
            d = cfg["ema_decay"]
            with torch.no_grad():
                for k, v in self.policy.model.state_dict().items():
                    if v.is_floating_point():
                        st["ema"][k].mul_(d).add_(v.detach().to(st["ema"][k].device), alpha=1 - d)
            if self._opp is not None:
                self._opp.model.load_state_dict(st["ema"])

    def _model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.policy.model.state_dict().items()}

    # ------------------------------------------------------------------ learning
    def learn(self, env, budget: int, callback=None, *, preference=None, checkpoint_dir=None,
              checkpoint_every: int | None = None, log_dir=None, progress_bar: bool = True) -> "NashMD":
        """Play against the opponent until the agent has sampled ``budget`` completions in total.

        ``preference``: ``(prompts, a, b) -> P(a > b)`` (or an object with ``prefer``); see the
        module docstring for the default. ``checkpoint_dir`` / ``checkpoint_every`` (completions) /
        ``log_dir`` / ``progress_bar``: see :class:`~rlhfgym.agents.base.TrainingRun`.
        """
        with TrainingRun(self, budget, callback=callback, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         log_dir=log_dir, progress_bar=progress_bar) as run:
            core, ref, resumed = self._start(run, env)
            if run.remaining == 1:
                raise AgentError(f"{self.name}: 1 completion left in the budget cannot buy one comparison (2); raise it.")
            prefer = self.preference_fn(core, preference)
            cfg, st = self.config, self.trainer_state
            if not resumed:
                seed_everything(self.seed)
                st.update(step=0)
                if cfg["opponent"] == "past":
                    st["snapshots"] = [self._model_state()]
                elif cfg["opponent"] == "ema":
                    st["ema"] = self._model_state()
            self._opp = None
            self._make_optimizer(cfg["learning_rate"])
            mixture = self._mixture(ref)
            while run.remaining >= 2 and not run.stopped:
                n = min(cfg["batch_size"], run.remaining // 2)
                prompts = train_prompts(core, n, sub_seed(self.seed, 22, st["step"]))
                torch.manual_seed(sub_seed(self.seed, 23, st["step"]))
                # y ~ pi,  y' ~ pi^mu  (the opponent mixed per token with pi_ref)
                y = self.policy.sample(prompts, temperature=cfg["temperature"])
                y_opp = self._opponent_policy(st).sample(prompts, temperature=cfg["temperature"], mixture=mixture)
                # p = P(y > y' | x)
                p = preference_probs(prefer, prompts, y.texts, y_opp.texts, self.name).to(self.policy.device)
                # loss = beta_kl KL(pi || pi_ref) - (p - 1/2) sum_t log pi(y_t)
                self.policy.train()
                tokens, mask = trim(y.tokens, y.mask)
                logp = self.policy.forward_logprobs(y.prompt_ids, tokens, mask)
                with torch.no_grad():
                    ref_logp = self.policy.forward_logprobs(y.prompt_ids, tokens, mask, model=ref)
                    log_ratio = logp.detach() - ref_logp
                score = (p - 0.5) * logp.sum(-1)
                kl_term = (log_ratio * logp).sum(-1)  # REINFORCE surrogate: its gradient is grad KL(pi || pi_ref)
                loss = (cfg["kl_coef"] * kl_term - score).mean()
                metrics = {"loss": loss.item(), "win_rate": float(p.mean()), "kl": float(log_ratio.sum(-1).mean()),
                           "length": float(mask.sum(-1).float().mean()), "gold": _mean_gold(core, prompts, y.texts)}
                metrics["grad_norm"] = self._step(loss)
                st["step"] += 1
                self._after_update(st)
                run.update(2 * n, metrics)
        return self

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def win_rate(self, env, n_prompts: int = 64, split: str = "validation", *, preference=None,
                 temperature: float = 1.0, seed: int = 1234) -> float:
        """Mean P(policy sample > reference sample) on the first ``n_prompts`` prompts of ``split``
        under this agent's preference (or ``preference``)."""
        if self.policy is None:
            raise AgentError(f"{self.name}: no policy yet; call learn(env, budget) or load(dir) first.")
        core = env_core(env, self.name)
        prefer = self.preference_fn(core, preference)
        prompts = core.prompts(split, n_prompts, 0)
        torch.manual_seed(seed)
        mine = self.policy.generate_text(prompts, temperature=temperature)
        torch.manual_seed(seed + 1)
        theirs = reference_policy(core, reference_for(self.policy, core)).generate_text(prompts, temperature=temperature)
        return float(preference_probs(prefer, prompts, mine, theirs, self.name).mean())
