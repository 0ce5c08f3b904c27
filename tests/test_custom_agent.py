"""A user's own agent in the zoo: defined outside the repository, registered by ``register()`` in a
module the zoo imports (``rlhf-zoo --import``) or by an entry point, and given the zoo's run services
(TensorBoard, a saved agent) even though its ``learn`` takes none of their keywords."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import rlhfgym.agents as agents
from rlhfgym.agents import AgentError, base

#: the whole agent, as a user would write it in their own file (no checkpoint_dir/log_dir in learn)
MY_AGENT = textwrap.dedent('''
    """My agent: samples from the env's reference policy and reports the mean reward (it does not learn)."""
    from rlhfgym.agents import Agent, register


    class MeanReward(Agent):
        name = "my-agent"

        def __init__(self, batch_size=4, **kw):  # device and seed arrive in **kw, for Agent.__init__
            if batch_size < 1:
                raise ValueError("my-agent: batch_size must be >= 1")
            super().__init__(batch_size=batch_size, **kw)

        def learn(self, env, budget, callback=None):
            self.check_budget(budget)
            policy = self.policy_for(env)
            core = env.unwrapped
            while self.spent < budget:
                n = min(self.config["batch_size"], budget - self.spent)
                prompts = core.prompts("train", n, start=self.spent)
                completions = policy.generate_text(prompts)
                self.spent += n
                reward = float(core.score(prompts, completions).mean())
                if callback is not None and callback(self, {"reward": reward}) is False:
                    break
            return self


    register("my-agent", MeanReward)
''')


def zoo_command() -> list[str]:
    script = Path(sys.executable).parent / "rlhf-zoo"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rlhfgym.zoo.cli"]


@pytest.mark.slow
def test_an_agent_file_outside_the_repo_trains_in_the_zoo(tmp_path):
    agent_file = tmp_path / "elsewhere" / "my_agent.py"
    agent_file.parent.mkdir()
    agent_file.write_text(MY_AGENT)
    run = tmp_path / "run"
    result = subprocess.run(
        [*zoo_command(), "--import", str(agent_file), "train", "my-agent", "RLHF-Summarize-Gold-v0", "--budget", "8",
         "--eval-n", "4", "--run-dir", str(run)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((run / "results.json").read_text())
    assert saved["algo"] == "my-agent" and saved["budget"] == 8
    assert saved["policy"]["kl"] == pytest.approx(0.0, abs=1e-3)  # it kept the reference policy
    # the zoo's run services, although learn() takes neither log_dir nor checkpoint_dir
    assert list((run / "tb").glob("events.out.tfevents.*")), "the zoo did not log the callback's metrics"
    meta = json.loads((run / "agent" / "agent.json").read_text())
    assert meta["agent"] == "my-agent" and meta["spent"] == 8
    assert meta["config"]["batch_size"] == 4


def test_run_services_log_the_callback_and_save_at_the_end(tmp_path):
    """In process: what the zoo adds around a ``learn`` without ``log_dir``/``checkpoint_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhfgym.zoo.train import run_services

    namespace: dict = {}
    exec(MY_AGENT.replace('register("my-agent", MeanReward)', ""), namespace)
    agent = namespace["MeanReward"]()
    seen = []
    with run_services(agent, tmp_path, {}, callback=lambda a, m: seen.append(m) or False) as callback:
        agent.spent = 4
        assert callback(agent, {"reward": 0.5, "note": "text is not logged"}) is False  # the user's answer comes back
        agent.spent = 8
        callback(agent, {"reward": 0.25, "spent": 8})
    assert seen == [{"reward": 0.5, "note": "text is not logged"}, {"reward": 0.25, "spent": 8}]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["my-agent/reward"]
    assert [(e.step, e.value) for e in events.Scalars("my-agent/reward")] == [(4, 0.5), (8, 0.25)]
    assert json.loads((tmp_path / "agent" / "agent.json").read_text())["spent"] == 8

    # an agent that checkpoints and logs itself gets its own callback back, and no second save
    with run_services(agent, tmp_path / "own", {"log_dir": "x", "checkpoint_dir": "y"}) as callback:
        assert callback is None
    assert not (tmp_path / "own").exists()
    # after an exception in learn, the half-updated agent is not saved
    with pytest.raises(RuntimeError), run_services(agent, tmp_path / "crash", {}):
        raise RuntimeError("learn failed")
    assert not (tmp_path / "crash" / "agent").exists()


def test_a_constructor_without_device_and_seed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class NoKeywords(agents.Agent):
        name = "no-keywords"

        def __init__(self, batch_size=4):
            super().__init__(batch_size=batch_size)

        def learn(self, env, budget, callback=None):
            return self

    agents.register("no-keywords", NoKeywords)
    with pytest.raises(AgentError, match=r"does not accept device and seed; every agent's __init__ must take"):
        agents.make("no-keywords", device="cpu", seed=0)
    with pytest.raises(AgentError, match=r"unknown hyperparameter 'batch_sise' \(did you mean 'batch_size'\?\)"):
        agents.make("no-keywords", batch_sise=2)
    assert agents.make("no-keywords", batch_size=2).config["batch_size"] == 2


def test_a_learn_without_the_callback_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class NoCallback(agents.Agent):
        name = "no-callback"

        def learn(self, env, budget):  # the zoo calls learn(env, budget, callback)
            return self

    agents.register("no-callback", NoCallback)
    with pytest.raises(AgentError, match=r"learn\(self, env, budget\) cannot be called as learn\(env, budget, callback\)"):
        agents.make("no-callback", device="cpu", seed=0)


# ---------------------------------------------------------------------------------------- entry points
@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Write ``my_plugin.py`` and declare entry points, in process (``importlib.metadata.entry_points`` is
    replaced, so the shared environment is left alone). Returns ``write(source, **entry_points)``."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)
    declared: list[metadata.EntryPoint] = []
    real = metadata.entry_points

    def entry_points(**selection):
        if selection.get("group") == "rlhfgym.agents":
            return metadata.EntryPoints(declared)
        return real(**selection)

    monkeypatch.setattr(metadata, "entry_points", entry_points)

    def write(source: str, **eps: str) -> None:
        (tmp_path / "my_plugin.py").write_text(source)
        declared.extend(metadata.EntryPoint(name=k, value=v, group="rlhfgym.agents") for k, v in eps.items())

    yield write
    sys.modules.pop("my_plugin", None)


def test_an_entry_point_agent_is_found(plugin):
    plugin(MY_AGENT.replace('register("my-agent", MeanReward)', ""), **{"my-agent": "my_plugin:MeanReward"})
    assert "my-agent" in agents.registered()
    assert agents.agent_class("my-agent").__name__ == "MeanReward"
    assert agents.make("my-agent", device="cpu", seed=1).config == {"device": "cpu", "seed": 1, "precision": "float32",
                                                                         "batch_size": 4}


def test_register_and_an_entry_point_of_the_same_class_do_not_collide(plugin):
    """The module registers itself when imported, and an entry point names it too: both orders work."""
    plugin(MY_AGENT, **{"my-agent": "my_plugin:MeanReward"})
    assert agents.agent_class("my-agent").__name__ == "MeanReward"  # entry point first; the import registers
    import my_plugin

    assert agents.agent_class("my-agent") is my_plugin.MeanReward
    agents.register("my-agent", my_plugin.MeanReward)  # again: a no-op
    agents.register("my-agent", "my_plugin:MeanReward")


def test_register_first_then_the_entry_point_of_the_same_class(plugin):
    plugin(MY_AGENT, **{"my-agent": "my_plugin:MeanReward"})
    import my_plugin  # as `rlhf-zoo --import my_plugin` does, before the entry points are read

    assert "my-agent" in agents.registered()
    assert agents.agent_class("my-agent") is my_plugin.MeanReward


OTHER = '''

class Other(MeanReward):
    name = "other"
'''


def test_register_and_an_entry_point_of_different_classes_name_both(plugin):
    source = MY_AGENT.replace('register("my-agent", MeanReward)', OTHER + '\nregister("my-agent", MeanReward)')
    plugin(source, **{"my-agent": "my_plugin:Other"})
    with pytest.raises(AgentError, match=r"'my-agent' is already registered \(my_plugin:Other\); cannot register "
                                         r"my_plugin:MeanReward"):
        agents.agent_class("my-agent")


def test_a_class_registered_while_another_is_being_defined_names_both(plugin):
    """The entry point's class does not exist yet when the module registers: checked once the import is done."""
    plugin(MY_AGENT + OTHER, **{"my-agent": "my_plugin:Other"})
    with pytest.raises(AgentError, match=r"names my_plugin:Other .*registered my_plugin:MeanReward under the same name"):
        agents.agent_class("my-agent")


def test_an_entry_point_claiming_a_registered_name_names_both(plugin):
    plugin(MY_AGENT.replace('register("my-agent", MeanReward)', ""), ppo="my_plugin:MeanReward")
    assert "ppo" in agents.registered()  # listing still works
    with pytest.raises(AgentError, match=r"'ppo' is claimed twice: rlhfgym.agents.ppo:PPO .* and my_plugin:MeanReward"):
        agents.agent_class("ppo")
    assert agents.agent_class("reinforce").__name__ == "Reinforce"  # the other agents are unaffected


def test_a_broken_entry_point_is_a_clear_error(plugin):
    plugin("", **{"my-agent": "my_plugin:Missing", "gone": "no_such_module_xyz:Agent"})
    with pytest.raises(AgentError, match="names my_plugin:Missing, which cannot be imported"):
        agents.agent_class("my-agent")
    with pytest.raises(AgentError, match="no_such_module_xyz"):
        agents.make("gone")


@pytest.mark.slow
def test_an_installed_package_agent_runs_in_benchmark_and_leaderboard(tmp_path):
    """A real package with an ``rlhfgym.agents`` entry point, built and installed in the test (into a
    private target dir, so the shared environment is untouched), shows up in ``rlhf-zoo benchmark``
    and in its leaderboard like a built-in agent, without any --import."""
    pkg = tmp_path / "pkg"
    (pkg / "tiny_agent_pkg").mkdir(parents=True)
    (pkg / "tiny_agent_pkg" / "__init__.py").write_text(MY_AGENT.replace('register("my-agent", MeanReward)\n', "")
                                                         .replace('name = "my-agent"', 'name = "tiny-agent"'))
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "tiny-agent-pkg"
        version = "0.0.1"

        [project.entry-points."rlhfgym.agents"]
        tiny-agent = "tiny_agent_pkg:MeanReward"
    """))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(pkg)], check=True)
    spec = tmp_path / "tiny-bench.yml"
    spec.write_text(textwrap.dedent("""
        description: one custom agent from an installed package and one built-in
        envs: [RLHF-Summarize-Gold-v0]
        agents: [tiny-agent, best-of-n]
        budgets: {default: [8]}
        seeds: 1
        eval: {split: test, prompts: 4, samples: 1, temperature: 1.0}
        hyperparams: {best-of-n: {n: 2}}
    """))
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    out = tmp_path / "runs"
    subprocess.run([*zoo_command(), "benchmark", str(spec), "--out", str(out)], check=True, env=env,
                   capture_output=True, text=True)
    boards = list(out.glob("*/leaderboard.md"))
    assert len(boards) == 1, list(out.rglob("*"))
    board = boards[0].read_text()
    assert "| tiny-agent |" in board and "| best-of-n |" in board, board
    evals = sorted(p.relative_to(out).parts[2] for p in out.glob("*/*/*/*/*/eval.json"))
    assert evals == ["best-of-n", "tiny-agent"], evals
