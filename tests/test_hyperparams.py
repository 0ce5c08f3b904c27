"""Every entry of every ``zoo/hyperparams/<algo>.yml`` resolves through ``load_hyperparams`` and builds
its agent: a misspelled key, a value out of range, a deprecated key or an unknown env id fails here,
not hours into a zoo run. Agents are only constructed (no env, no training), so this is fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import gymnasium as gym
import pytest
import yaml

import rlhfgym.agents as agents
import rlhfgym.envs  # noqa: F401  (registers the env ids)
import rlhfgym.zoo.train as zoo_train
from rlhfgym.agents import AgentError
from rlhfgym.zoo.train import load_hyperparams

#: keys of an entry that configure the run, not the agent
RUN_KEYS = ("budget", "env_kwargs")


def yaml_entries() -> list[tuple[str, str]]:
    """(algo, entry) for every entry of every hyperparameter file ("default" included)."""
    out = []
    for path in sorted(zoo_train.HYPERPARAMS.glob("*.yml")):
        data = yaml.safe_load(path.read_text()) or {}
        out += [(path.stem, key) for key in data]
    return out


def accepted_keys(cls) -> set[str]:
    """The hyperparameter names an agent class takes: its ``Config`` dataclass's fields when it has one,
    else the named keyword parameters of the ``__init__`` methods along its MRO."""
    config = getattr(cls, "Config", None)
    if config is not None and dataclasses.is_dataclass(config):
        return {f.name for f in dataclasses.fields(config)}
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "policy"):
                names.add(p.name)
    return names


def same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == pytest.approx(float(b))
    return a == b


def check_entry(algo: str, entry: str):
    """Resolve ``entry`` of ``<algo>.yml`` and construct the agent; returns the agent. Raises
    (AssertionError, AgentError, TypeError, DeprecationWarning) on any problem."""
    assert algo in agents.registered(), f"{algo}.yml names no registered agent ({sorted(agents.registered())})"
    if entry != "default":
        assert entry in gym.registry, f"{algo}.yml: entry {entry!r} is not a registered env id"
    hp = load_hyperparams(algo, entry)
    budget = hp.pop("budget", None)
    assert budget is None or (isinstance(budget, int) and not isinstance(budget, bool) and budget > 0), \
        f"{algo}.yml[{entry}]: budget must be a positive int of completions, got {budget!r}"
    env_kwargs = hp.pop("env_kwargs", None)
    assert env_kwargs is None or isinstance(env_kwargs, dict), f"{algo}.yml[{entry}]: env_kwargs must be a mapping"
    cls = agents.agent_class(algo)
    unknown = sorted(set(hp) - accepted_keys(cls))
    assert not unknown, f"{algo}.yml[{entry}]: {unknown} are not hyperparameters of {cls.__name__}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # a deprecated spelling in the zoo is a bug too
        agent = agents.make(algo, **hp)
    for key, value in hp.items():  # each YAML value reaches the agent's config as written
        assert key in agent.config and same_value(agent.config[key], value), \
            f"{algo}.yml[{entry}]: {key}={value!r} became {agent.config.get(key)!r}"
    return agent


@pytest.mark.parametrize("algo, entry", yaml_entries())
def test_yaml_entry_builds_its_agent(algo, entry):
    agent = check_entry(algo, entry)
    assert agent.name == algo


def test_every_agent_has_a_yaml_file():
    assert {algo for algo, _ in yaml_entries()} == set(agents.BUILTIN_AGENTS)


@pytest.mark.parametrize("entry, error", [
    ({"default": {"learning_rte": 1e-4}}, "learning_rte"),        # misspelled key
    ({"default": {"cliprange": -0.2}}, "cliprange"),              # out of range
    ({"default": {"objective": "trust_region"}}, "objective"),    # not a choice
    ({"default": {"kl_mode": "fixed"}}, "kl_mode"),               # deprecated spelling
    ({"default": {"budget": 0}}, "budget"),
    ({"RLHF-Summarize-Nope-v0": {"budget": 64}}, "not a registered env id"),
])
def test_a_bad_entry_fails(tmp_path, monkeypatch, entry, error):
    """The check above does fail: a PPO file with one bad entry."""
    (tmp_path / "ppo.yml").write_text(yaml.safe_dump(entry))
    monkeypatch.setattr(zoo_train, "HYPERPARAMS", tmp_path)
    with pytest.raises((AssertionError, AgentError, TypeError, DeprecationWarning), match=error):
        for algo, key in yaml_entries():
            check_entry(algo, key)
