"""The Agent interface from a user's side: a custom agent from another package runs in the zoo."""

import json
import sys
import textwrap

import pytest

import rlhfgym.agents as agents
from rlhfgym.agents import AgentError, base

CUSTOM_AGENT = textwrap.dedent('''
    from rlhfgym.agents import Agent
    from rlhfgym.agents.policy import CausalLMPolicy


    class Greedy(Agent):
        """Does not learn: the env's reference policy, counted against the budget."""

        name = "my-greedy"

        def __init__(self, temperature=1.0, **kw):
            if temperature <= 0:
                raise ValueError("temperature must be > 0")
            super().__init__(temperature=temperature, **kw)

        def learn(self, env, budget, callback=None):
            self.check_budget(budget)
            self.policy = CausalLMPolicy.from_env(env)
            self.spent = budget
            return self
''')


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution `my-agents` installed on sys.path with an `rlhfgym.agents` entry point."""
    (tmp_path / "my_agents.py").write_text(CUSTOM_AGENT)
    dist = tmp_path / "my_agents-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-agents\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rlhfgym.agents]\nmy-greedy = my_agents:Greedy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    yield
    sys.modules.pop("my_agents", None)


def test_entry_point_agent_is_found_and_runs_in_the_zoo(installed_plugin, tmp_path):
    from rlhfgym.zoo.train import train

    assert "my-greedy" in agents.registered()
    result = train("my-greedy", "RLHF-Summarize-Gold-v0", budget=4, run_dir=str(tmp_path / "run"), eval_n=8)
    assert result["policy"]["kl"] == pytest.approx(0.0, abs=1e-4)  # it is the reference policy
    assert -1 <= result["policy"]["gold"] <= 1
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["algo"] == "my-greedy" and (tmp_path / "run" / "results.md").exists()


def test_register_by_hand_save_and_load(tmp_path, monkeypatch):
    import gymnasium as gym

    import rlhfgym.envs  # noqa: F401

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    namespace: dict = {}
    exec(CUSTOM_AGENT, namespace)
    agents.register("my-greedy-2", namespace["Greedy"])
    agents.register("my-greedy-2", namespace["Greedy"])  # the same class again (e.g. a module imported twice): a no-op
    with pytest.raises(AgentError, match=r"'my-greedy-2' is already registered \(\S*:Greedy\); cannot register "
                                         r"rlhfgym.agents.best_of_n:BestOfN under the same name"):
        agents.register("my-greedy-2", agents.agent_class("best-of-n"))
    with pytest.raises(AgentError, match="a subclass of rlhfgym.agents.Agent"):
        agents.register("not-an-agent", dict)
    agent = agents.make("my-greedy-2", temperature=0.5)
    agent.learn(gym.make("RLHF-Summarize-Gold-v0"), budget=2)
    agent.save(tmp_path / "a")
    # Greedy.name is "my-greedy", not registered here: load() names the fix
    with pytest.raises(AgentError, match="unknown agent 'my-greedy'"):
        agents.load(tmp_path / "a")
    loaded = namespace["Greedy"].load(tmp_path / "a")
    assert loaded.config["temperature"] == 0.5 and loaded.spent == 2
    assert loaded.generate(["summarize : tl;dr :"], temperature=0)[0] == agent.generate(["summarize : tl;dr :"], temperature=0)[0]


def test_bad_budget_unknown_agent_and_foreign_checkpoint(tmp_path):
    with pytest.raises(AgentError, match="unknown agent 'nope'"):
        agents.make("nope")
    with pytest.raises(AgentError, match=r"unknown agent 'rlo' \(did you mean 'rloo'"):
        agents.make("rlo")
    (tmp_path / "agent.json").write_text(json.dumps({"format": 99, "agent": "ppo", "config": {}}))
    with pytest.raises(AgentError, match="format 99"):
        agents.load(tmp_path)
    with pytest.raises(AgentError, match="not a saved agent"):
        agents.load(tmp_path / "missing")
    agent = agents.make("best-of-n")
    with pytest.raises(AgentError, match="budget must be a positive"):
        agent.check_budget(0)


# ---------------------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize("name", sorted(agents.BUILTIN_AGENTS))
def test_every_builtin_agent_declares_its_hyperparameters_as_one_dataclass(name):
    import dataclasses

    cls = agents.agent_class(name)
    config = agents.make(name).config
    assert dataclasses.is_dataclass(cls.Config)
    assert list(config) == [f.name for f in dataclasses.fields(cls.Config)]
    assert json.loads(json.dumps(config)) == config  # checkpoints store it; load() rebuilds the agent from it
    assert type(cls(**config)).__name__ == cls.__name__


def test_hyperparameter_types_follow_the_dataclass():
    a = agents.make("ppo", learning_rate="1e-4", vf_coef=1, batch_size=8, mini_batch_size=4)
    assert a.config["learning_rate"] == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert type(a.config["vf_coef"]) is float and type(a.config["batch_size"]) is int
    assert agents.make("rest", thresholds=(0, 0.5)).config["thresholds"] == [0.0, 0.5]
    with pytest.raises(AgentError, match="dpo: batch_size must be an integer, got 8.0"):
        agents.make("dpo", batch_size=8.0)
    with pytest.raises(AgentError, match="kto: soft_labels must be true or false, got 'yes'"):
        agents.make("kto", soft_labels="yes")
    with pytest.raises(AgentError, match=r"rest: thresholds must be in \[0, 1\], got 2.0"):
        agents.make("rest", thresholds=[0.0, 2])
    with pytest.raises(AgentError, match=r"nash-md: unknown opponent 'emma' \(did you mean 'ema'\?\)"):
        agents.make("nash-md", opponent="emma")
    with pytest.raises(AgentError, match=r"reinforce: kl_coef must be >= 0, got -1.0"):
        agents.make("reinforce", kl_coef=-1.0)
    with pytest.raises(AgentError, match="ppo: mini_batch_size must be an int in"):
        agents.make("ppo", batch_size=4, mini_batch_size=8)
    with pytest.raises(AgentError, match=r"unknown hyperparameter 'ppo_epoch' \(did you mean 'ppo_epochs'\?\)"):
        agents.make("ppo", ppo_epoch=2)
