"""The one small interface every learner implements, and the agent registry.

An agent owns a policy (usually a :class:`~rlhfgym.agents.policy.CausalLMPolicy`) and trains it
against an rlhf-gym environment::

    agent = rlhfgym.agents.make("ppo", env=env, learning_rate=1e-4)
    agent.learn(env, budget=20_000)
    agent.generate(["summarize : ... tl;dr :"])
    agent.save("runs/ppo"); agent = rlhfgym.agents.load("runs/ppo")

``budget`` is counted in **completions**: every completion the agent samples from a policy, or
consumes from a dataset (a preference pair counts two), costs one unit. Algorithms are compared
at equal budgets this way, whatever they do with the samples.

External packages add agents through the entry-point group ``rlhfgym.agents``::

    [project.entry-points."rlhfgym.agents"]
    my_agent = "my_package.agent:MyAgent"
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
CONFIG_FILE = "agent.json"


class AgentError(ValueError):
    """A bad hyperparameter, budget, checkpoint or policy/env mismatch."""


class Agent(ABC):
    """Base class of all learners.

    Subclasses set :attr:`name`, declare their hyperparameters as keyword arguments of
    ``__init__`` (validated there, with errors that say the allowed range), store them in
    ``self.config`` (a JSON-serialisable dict), and implement :meth:`learn`.

    ``callback(agent, metrics: dict) -> bool | None`` is called after each update; returning
    ``False`` stops training early.
    """

    name: str = "agent"

    def __init__(self, policy=None, *, device: str = "cpu", seed: int = 0, **config: Any):
        self.policy = policy
        self.device = device
        self.seed = int(seed)
        self.config: dict[str, Any] = {"device": device, "seed": self.seed, **config}
        self.spent = 0  # completions sampled or consumed so far

    # ------------------------------------------------------------------ learning
    @abstractmethod
    def learn(self, env, budget: int, callback: Callable[["Agent", dict], bool | None] | None = None) -> "Agent":
        """Train on ``env`` until ``budget`` completions are spent (or the callback says stop)."""

    def policy_for(self, env, **from_env: Any):
        """This agent's policy, made from the env's reference model on first use
        (``CausalLMPolicy.from_env(env, device=self.device, **from_env)``), after checking that it
        speaks the env's tokens (:func:`check_policy_env`)."""
        if self.policy is None:
            from .policy import CausalLMPolicy

            self.policy = CausalLMPolicy.from_env(env, device=self.device, **from_env)
        check_policy_env(self, self.policy, env)
        return self.policy

    def check_budget(self, budget: int) -> int:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
            raise AgentError(f"{self.name}: budget must be a positive number of completions, got {budget!r}.")
        return budget

    # ------------------------------------------------------------------ acting
    def generate(self, prompts: Sequence[str], *, temperature: float = 1.0, max_new_tokens: int | None = None) -> list[str]:
        """Completions for ``prompts`` from the current policy (greedy when ``temperature == 0``)."""
        if self.policy is None:
            raise AgentError(f"{self.name}: no policy yet; call learn(env, budget) or load(dir) first.")
        return self.policy.generate_text(prompts, temperature=temperature, max_new_tokens=max_new_tokens)

    def predict(self, obs, deterministic: bool = False):
        """Next-token actions for token-env observations (a dict with ``input_ids``/``attention_mask``)."""
        if self.policy is None:
            raise AgentError(f"{self.name}: no policy yet; call learn(env, budget) or load(dir) first.")
        return self.policy.act(obs, deterministic=deterministic)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Save the policy (Hugging Face ``save_pretrained`` format) and the agent's config, atomically."""
        from rlhfgym.envs.assets import atomic_save_dir, atomic_write_text

        directory = Path(directory)
        with atomic_save_dir(directory) as tmp:
            if self.policy is not None:
                self.policy.save(Path(tmp) / "policy")
            self.save_extra(Path(tmp))
            atomic_write_text(
                Path(tmp) / CONFIG_FILE,
                json.dumps({"format": FORMAT_VERSION, "agent": self.name, "spent": self.spent, "config": self.config}, indent=2),
            )
        return directory

    def save_extra(self, directory: Path) -> None:
        """Hook: write algorithm state beside the policy (optimizer, controller, ...)."""

    def load_extra(self, directory: Path) -> None:
        """Hook: read what :meth:`save_extra` wrote."""

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None) -> "Agent":
        """Load an agent saved with :meth:`save` (use :func:`rlhfgym.agents.load` when the class is unknown)."""
        from .policy import CausalLMPolicy

        directory = Path(directory)
        meta = read_agent_config(directory)
        if meta["agent"] != cls.name and cls is not Agent:
            raise AgentError(f"{directory} holds a {meta['agent']!r} agent, not {cls.name!r}; use rlhfgym.agents.load().")
        config = dict(meta["config"])
        if device is not None:
            config["device"] = device
        agent = cls(**config)
        if (directory / "policy").exists():
            agent.policy = CausalLMPolicy.from_pretrained(directory / "policy", device=config.get("device", "cpu"))
        agent.spent = int(meta.get("spent", 0))
        agent.load_extra(directory)
        return agent


def read_agent_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise AgentError(f"{directory} is not a saved agent (no {CONFIG_FILE}); save one with agent.save(dir).")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise AgentError(
            f"{path} was written by agent format {meta.get('format')!r}, this rlhf-gym reads format {FORMAT_VERSION}; "
            "retrain, or load it with the rlhf-gym version that wrote it."
        )
    return meta


# ---------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Agent] | str] = {}
_ENTRY_POINTS_LOADED = False


def register(name: str, cls: type[Agent] | str, *, override: bool = False) -> None:
    """Register an agent class (or a ``"module:Class"`` string, imported on first use) under ``name``."""
    if name in _REGISTRY and not override:
        raise AgentError(f"an agent named {name!r} is already registered; pass override=True to replace it.")
    _REGISTRY[name] = cls


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group="rlhfgym.agents"):
        _REGISTRY.setdefault(ep.name, ep.value)


def registered() -> list[str]:
    """Names of every known agent (built-in, registered, and from installed entry points)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def agent_class(name: str) -> type[Agent]:
    _load_entry_points()
    if name not in _REGISTRY:
        raise AgentError(f"unknown agent {name!r}; known agents: {', '.join(registered())}.")
    cls = _REGISTRY[name]
    if isinstance(cls, str):
        import importlib

        module, _, attr = cls.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = cls
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise AgentError(f"agent {name!r} resolves to {cls!r}, which is not a subclass of rlhfgym.agents.Agent.")
    return cls


def make(name: str, **hyperparams: Any) -> Agent:
    """Create a registered agent by name with its hyperparameters."""
    return agent_class(name)(**hyperparams)


def load(directory: str | os.PathLike, device: str | None = None) -> Agent:
    """Load any saved agent; the class is read from the checkpoint."""
    meta = read_agent_config(Path(directory))
    return agent_class(meta["agent"]).load(directory, device=device)


# ---------------------------------------------------------------------------------------------- policy/env check


def check_policy_env(agent: Agent, policy, env) -> None:
    """Raise :class:`AgentError` unless ``policy`` speaks the env's tokens (same vocabulary and EOS)."""
    env_tok, tok = env.unwrapped.tokenizer, policy.tokenizer
    if tok is env_tok:
        return
    if tok.get_vocab() != env_tok.get_vocab() or tok.eos_token_id != env_tok.eos_token_id:
        raise AgentError(
            f"{agent.name}: the policy's tokenizer ({len(tok)} tokens, eos id {tok.eos_token_id}) is not the env's "
            f"({len(env_tok)} tokens, eos id {env_tok.eos_token_id}); the env scores token ids, so start from the "
            "env's reference model (CausalLMPolicy.from_env(env)) or a model trained with its tokenizer."
        )

