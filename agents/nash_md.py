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
a REINFORCE surrogate on the sampled tokens, ``sum_t sg(log pi(y_t|s_t) - log pi_ref(y_t|s_t)) log pi(y_t|s_t)``.
Its gradient is, in expectation over ``y_t ~ pi(.|s_t)``, the gradient of the *per-state* KL
``sum_t KL(pi(.|s_t) || pi_ref(.|s_t))`` with the states ``s_t`` (the sampled prefixes) held fixed::

    E_{a ~ pi(.|s)}[ (log pi(a|s) - log pi_ref(a|s)) grad log pi(a|s) ] = grad_theta KL(pi(.|s) || pi_ref(.|s))

(``sum_a pi grad log pi = 0`` removes the other term). It is *not* the gradient of the sequence-level
KL(pi || pi_ref), which would also credit each token with the log-ratios of the later tokens it leads to
(a reward-to-go ``sum_{t' >= t}``); TRL's Nash-MD uses the same per-token surrogate.

``log pi`` is the log-probability of the policy that sampled ``y``, i.e. at the sampling ``temperature``
(as PPO and REINFORCE do); ``log pi_ref`` is the env's reference at temperature 1 (the KL the env's
objective charges).

Opponents (``opponent``): "mixture" (the current policy, mixed with pi_ref; ``mixture_coef = 0``
is pure self-play, ``= 1`` a best response to pi_ref), "past" (a uniformly drawn snapshot among
the last ``n_snapshots`` past policies, mixed with pi_ref: Munos et al.'s mixture of past
policies) or "ema" (an exponential moving average of past parameters, Nash-EMA, mixed with pi_ref).

The preference: a callable passed to :meth:`NashMD.learn` (``(prompts, a, b) -> P(a > b)`` or an
object with ``prefer``, e.g. a :class:`~rlhfgym.envs.feedback.preference_model.PreferenceModel`) wins;
otherwise the ``preference`` hyperparameter picks one source, explicitly:

* ``"env"`` (default): the env's own pairwise oracle ``env.unwrapped.prefer`` (or its reward model's
  ``prefer``); every rlhf-gym env has one (the preference model on RLHF-Summarize-v0, the judge on
  AIF-v0, Bradley-Terry ``sigmoid(r(a) - r(b))`` over the gold score on Gold-v0). An env without one is
  an error, never a silent fallback.
* ``"reward"``: Bradley-Terry over the env's reward model, ``sigmoid((r(a) - r(b)) / preference_temperature)``.
* ``"labelers"``: the env's simulated labeler population ``labelers`` (its mixture probability, e.g.
  the non-transitive preset).

(``"auto"``, the former default, is a deprecated alias of ``"env"``: its fallback to the reward model could
never run, since every env core has ``prefer``.)

Budget: two completions per prompt per update (the policy's and the opponent's).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhfgym.envs.lm import IncrementalLMPool

from .base import AgentError
from .common import (
    AgentConfig,
    EnvSampler,
    TrainingAgent,
    TrainingRun,
    as_preference_fn,
    draw_prompt_indices,
    env_core,
    env_prefer,
    labeler_population,
    param,
    preference_probs,
    reference_for,
    reference_policy,
    sub_seed,
    trim,
)

__all__ = ["NashMD", "GeometricMixture", "OPPONENTS", "PREFERENCES", "geometric_mixture_logprobs", "nash_md_loss"]

OPPONENTS = ("mixture", "past", "ema")
PREFERENCES = ("env", "reward", "labelers")


# ---------------------------------------------------------------------------------------------- the math
# Pure functions of tensors: the sampler and the update call them, tests/test_agent_math.py checks them by hand.


def geometric_mixture_logprobs(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token geometric mixture of two next-token distributions (log-probs over the vocabulary, last dim)::

        log pi^mu(. | s) = log_softmax( (1 - beta) log pi(. | s) + beta log pi_ref(. | s) )

    i.e. ``pi^mu ∝ pi^(1 - beta) pi_ref^beta`` normalised over the vocabulary (beta = 0: pi, 1: pi_ref).
    """
    return torch.log_softmax((1.0 - beta) * logp + beta * ref_logp, dim=-1)


def nash_md_loss(logp: torch.Tensor, ref_logp: torch.Tensor, p: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """TRL's Nash-MD loss of a batch, from the per-token log-probs (B, T) of the policy's samples ``y``
    (``logp``, with gradients; 0 on padding), the reference's (``ref_logp``) and ``p = P(y > y' | x)`` (B,)::

        loss = mean_b[ kl_coef * sum_t sg(log pi(y_t) - log pi_ref(y_t)) log pi(y_t)  -  (p - 1/2) sum_t log pi(y_t) ]

    The first term is the per-state KL surrogate (see the module docstring: its gradient is that of
    ``sum_t KL(pi(.|s_t) || pi_ref(.|s_t))`` with the states held fixed); the second is REINFORCE on the
    preference with the baseline 1/2.
    """
    log_ratio = logp.detach() - ref_logp
    score = (p - 0.5) * logp.sum(-1)
    kl_term = (log_ratio * logp).sum(-1)
    return (kl_coef * kl_term - score).mean()


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
        self._lms = IncrementalLMPool()  # the reference's KV caches, shared by the runs (one at a time)

    def start(self, prompt_ids, max_new_tokens: int) -> "GeometricMixture":
        run = copy.copy(self)
        window = max(self.window, max(map(len, prompt_ids)) + max_new_tokens)
        run.lm = self._lms.get(self.reference, len(prompt_ids), window)
        run.ref_logits = run.lm.reset_rows(range(len(prompt_ids)), prompt_ids)
        return run

    def mix(self, logp: torch.Tensor) -> torch.Tensor:
        # log pi^mu = log_softmax((1 - beta) log pi + beta log pi_ref)
        ref_logp = torch.log_softmax(self.ref_logits.float()[:, : self.vocab_size] / self.temperature, dim=-1)
        return geometric_mixture_logprobs(logp, ref_logp.to(logp.device), self.beta)

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
        preference: where P(a > b) comes from when learn() gets no ``preference=`` callable: "env"
            (default: ``env.unwrapped.prefer``, an error if the env has none), "reward" (sigmoid of the
            reward model's score difference / preference_temperature) or "labelers" (the env's labeler
            population ``labelers``). "auto" is a deprecated alias of "env".
        preference_temperature: T > 0 in sigmoid((r(a) - r(b)) / T) for reward-derived preferences.
        learning_rate, batch_size (prompts per update), max_grad_norm, temperature (sampling).
    """

    @dataclass
    class Config(AgentConfig):
        """Hyperparameters of :class:`NashMD` (see the class docstring)."""

        mixture_coef: float = param(0.25, low=0, high=1)
        kl_coef: float = param(0.05, low=0)
        opponent: str = param("mixture", choices=OPPONENTS)
        n_snapshots: int = param(4, low=1)
        snapshot_every: int = param(4, low=1)
        ema_decay: float = param(0.9, low=0, high=1, high_open=True)
        preference: str = param("env", choices=PREFERENCES)
        preference_temperature: float = param(0.1, low=0, low_open=True)
        labelers: str = "gold"
        learning_rate: float = param(5e-5, low=0, low_open=True)
        batch_size: int = param(16, low=1)
        max_grad_norm: float = param(1.0, low=0, low_open=True)
        temperature: float = param(1.0, low=0, low_open=True)

        def check(self, agent: str) -> None:
            from rlhfgym.envs.feedback.labelers import PRESETS

            if self.labelers not in PRESETS:
                raise AgentError(f"{agent}: unknown labelers preset {self.labelers!r}; use one of {', '.join(PRESETS)}.")

    name = "nash-md"

    def __init__(self, policy=None, **hyperparameters: Any):
        if hyperparameters.get("preference") == "auto":  # deprecated (one release): its reward-model fallback could never run
            warnings.warn(f"{self.name}: preference='auto' is deprecated and will be removed in the next release; it always "
                          "meant the env's own prefer(): use preference='env' (or 'reward' for sigmoid((r(a) - r(b)) / "
                          "preference_temperature)).", DeprecationWarning, stacklevel=2)
            hyperparameters["preference"] = "env"
        self._opp = None  # the opponent's network for "past" / "ema"
        super().__init__(policy, **hyperparameters)

    # ------------------------------------------------------------------ the preference P(a > b | x)
    def preference_fn(self, env, preference=None):
        """The preference function ``(prompts, a, b) -> (B,) P(a > b)`` this agent trains against."""
        core = env_core(env, self.name)
        cfg = self.config
        if preference is not None:
            return as_preference_fn(preference, self.name)
        source = cfg["preference"]
        if source == "env":  # the env's own pairwise oracle; no silent fallback
            oracle = env_prefer(core)
            if oracle is None:
                raise AgentError(f"{self.name}: preference='env' but the env has no prefer(prompts, a, b); "
                                 "use preference='reward' or 'labelers', or pass preference= to learn().")
            return oracle
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
                                       max_new_tokens=self.policy.max_new_tokens, device=self.policy.device,
                                       autocast_dtype=self.policy.autocast_dtype)
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
            core, ref, resumed = self.start(run, env)  # resume, policy, checks, seeding
            if run.remaining == 1:
                raise AgentError(f"{self.name}: 1 completion left in the budget cannot buy one comparison (2); raise it.")
            prefer = self.preference_fn(core, preference)
            cfg, st = self.config, self.trainer_state
            if not resumed:
                st.update(step=0)
                if cfg["opponent"] == "past":
                    st["snapshots"] = [self._model_state()]
                elif cfg["opponent"] == "ema":
                    st["ema"] = self._model_state()
            self._opp = None
            self.make_optimizer("adamw", cfg["learning_rate"], weight_decay=0.0)
            mixture = self._mixture(ref)
            # both players act in the token MDP; the player's episodes also report log pi_ref (at
            # temperature 1, the KL the objective charges), the opponent's need none; the preference
            # compares the two, so neither needs the env's reward-model score
            players = EnvSampler(env, kl_coef=cfg["kl_coef"], compute_ref=True, device=self.policy.device, score=False)
            opponents = EnvSampler(env, kl_coef=0.0, device=self.policy.device, score=False)
            while run.remaining >= 2 and not run.stopped:
                n = min(cfg["batch_size"], run.remaining // 2)
                idx = draw_prompt_indices(core, n, sub_seed(self.seed, 22, st["step"]))
                torch.manual_seed(sub_seed(self.seed, 23, st["step"]))
                # y ~ pi,  y' ~ pi^mu  (the opponent mixed per token with pi_ref)
                y = players.rollout(self.policy, idx, temperature=cfg["temperature"])
                y_opp = opponents.rollout(self._opponent_policy(st), idx, temperature=cfg["temperature"], mixture=mixture)
                # p = P(y > y' | x)
                p = preference_probs(prefer, y.prompts, y.texts, y_opp.texts, self.name).to(self.policy.device)
                # loss = beta_kl KL(pi || pi_ref) - (p - 1/2) sum_t log pi(y_t)
                self.policy.train()
                tokens, mask = trim(y.tokens, y.mask)
                # log pi of the policy that sampled y: at the sampling temperature (pi_ref at 1, as in PPO)
                logp = self.policy.forward_logprobs(y.prompt_ids, tokens, mask, temperature=cfg["temperature"])
                ref_logp = y.ref_logprobs[:, : tokens.shape[1]]
                log_ratio = logp.detach() - ref_logp
                # kl term: per-token surrogate, gradient = grad sum_t KL(pi(.|s_t) || pi_ref(.|s_t)), states s_t fixed
                loss = nash_md_loss(logp, ref_logp, p, cfg["kl_coef"])
                metrics = {"loss": loss.item(), "win_rate": float(p.mean()), "kl": float(log_ratio.sum(-1).mean()),
                           "length": float(mask.sum(-1).float().mean()), "gold": y.mean_gold()}
                metrics["grad_norm"] = self.step(loss)
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
