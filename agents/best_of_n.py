"""Best-of-n sampling (rejection sampling against the reward model): no training, n times the inference.

For each prompt ``x`` draw ``y_1 .. y_n ~ pi(.|x)`` and answer ``argmax_i RM(x, y_i)``. Gao et al. (2022)
use it as the simplest way to optimise a reward model: its KL to ``pi`` is analytic,
``KL_bon = log n - (n - 1) / n``, and its gold score follows ``d (alpha - beta d)`` with
``d = sqrt(KL_bon)``; AlpacaFarm's best-of-16 came close to PPO (45.0% vs 46.8%).

``learn(env, budget)`` only keeps the env's reward model (``env.unwrapped.score``) and, without a
policy, a copy of the env's reference policy; it trains nothing and spends none of the budget (which
is still validated, so the zoo can treat every agent alike). The cost is at generation time: ``n``
completions per prompt, sampled in one batch with the policy's KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import Agent, AgentError
from .common import AgentConfig, param, parse_config
from .policy import CausalLMPolicy


class BestOfN(Agent):
    """Answer with the highest-scoring of ``n`` samples.

    Args:
        policy: the :class:`CausalLMPolicy` to sample from; None = a copy of the env's reference model.
        hyperparameters: the fields of :class:`BestOfN.Config`.
    """

    @dataclass
    class Config(AgentConfig):
        """Hyperparameters of :class:`BestOfN`.

        n: samples per prompt, >= 1 (n = 1 is plain sampling).
        temperature: sampling temperature of the candidates, > 0 (n greedy samples would all be equal).
        batch_size: prompts per sampling batch (``batch_size * n`` rows at once).
        """

        n: int = param(4, low=1)
        temperature: float = param(1.0, low=0, low_open=True)
        batch_size: int = param(64, low=1)

    name = "best-of-n"

    def __init__(self, policy: CausalLMPolicy | None = None, **hyperparameters):
        super().__init__(policy, **parse_config(self.Config, self.name, hyperparameters))
        self.score_fn: Callable[[Sequence[str], Sequence[str]], torch.Tensor] | None = None

    def learn(self, env, budget: int, callback=None, *, checkpoint_dir: str | Path | None = None,
              checkpoint_every: int | None = None, log_dir: str | Path | None = None,
              progress_bar: bool = True) -> "BestOfN":
        """Keep ``env``'s reward model for :meth:`generate` (nothing is trained; ``budget`` is validated only).

        ``checkpoint_dir``: the agent (policy + config) is saved there; ``checkpoint_every``, ``log_dir``
        and ``progress_bar`` are accepted for a uniform interface and have nothing to do.
        """
        self.check_budget(budget)
        self.policy_for(env)
        self.score_fn = env.unwrapped.score
        if checkpoint_dir is not None:
            self.save(checkpoint_dir)
        if callback is not None:
            callback(self, {"spent": self.spent})
        return self

    def set_reward(self, score_fn: Callable[[Sequence[str], Sequence[str]], torch.Tensor]) -> "BestOfN":
        """Use ``score_fn(prompts, completions) -> (B,)`` scores (e.g. after :meth:`load`, instead of learn)."""
        if not callable(score_fn):
            raise AgentError("best-of-n: score_fn must be callable as score_fn(prompts, completions) -> scores.")
        self.score_fn = score_fn
        return self

    @torch.no_grad()
    def kl_to_reference(self) -> float:
        """KL(best-of-n || pi) upper bound log n - (n-1)/n (Gao et al. 2022), in nats."""
        import math

        n = self.config["n"]
        return math.log(n) - (n - 1) / n

    def generate(self, prompts: Sequence[str], *, temperature: float | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
        """For each prompt, the best of ``n`` sampled completions by the reward model. At
        ``temperature=0`` the ``n`` candidates would all be the greedy completion, so that one is
        returned (no sampling, no reward-model call)."""
        if self.policy is None or self.score_fn is None:
            raise AgentError("best-of-n: no reward model yet; call learn(env, budget) (or set_reward(score_fn)) first.")
        n = self.config["n"]
        temperature = self.config["temperature"] if temperature is None else temperature
        if temperature == 0:
            return self.policy.generate_text(list(prompts), temperature=0, max_new_tokens=max_new_tokens)
        if not temperature > 0:
            raise AgentError(f"best-of-n: temperature must be >= 0, got {temperature}.")
        out: list[str] = []
        bs = self.config["batch_size"]
        for s in range(0, len(prompts), bs):
            chunk = list(prompts[s:s + bs])
            rep = [p for p in chunk for _ in range(n)]  # the n candidates of a prompt side by side
            texts = self.policy.sample(rep, temperature=temperature, max_new_tokens=max_new_tokens).texts
            scores = torch.as_tensor(self.score_fn(rep, texts), dtype=torch.float32).view(len(chunk), n)
            best = scores.argmax(1).tolist()
            out.extend(texts[i * n + b] for i, b in enumerate(best))
        return out
