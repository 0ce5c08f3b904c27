"""The ``sb3-ppo`` agent: Stable-Baselines3's PPO as a zoo agent (agents/sb3_ppo.py).

Short episodes (``max_new_tokens`` 3-6) and rollouts of a few env steps keep every run to seconds;
whether SB3 PPO *learns* is measured by ``rlhf-zoo train sb3-ppo`` (README), not here.
"""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhfgym.agents as agents
from rlhfgym.agents import AgentError
from rlhfgym.agents.sb3_ppo import SB3PPO, EpisodeEnds, KLPenalizedRolloutBuffer, sb3_vec_env
from rlhfgym.envs.registration import register_envs

register_envs()
ENV_ID = "RLHF-Summarize-Gold-v0"
#: a rollout of 4 envs x 4 steps, two minibatches of 8, one epoch; a large step so the weights move
TINY = {"num_envs": 4, "n_steps": 4, "batch_size": 8, "n_epochs": 1, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def env():
    return gym.make(ENV_ID, max_new_tokens=4)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------- the reward


def test_the_buffer_stores_the_env_reward_minus_the_agents_half_of_the_kl(env):
    venv = sb3_vec_env(env, 2)
    buf = KLPenalizedRolloutBuffer(2, venv.observation_space, venv.action_space, n_envs=2, kl_coef=0.1)
    obs = {k: np.zeros((2, *s.shape), dtype=s.dtype) for k, s in venv.observation_space.spaces.items()}
    log_prob = torch.tensor([-2.0, -0.5])
    buf.add(obs, np.zeros((2, 1)), np.array([1.0, 0.25], dtype=np.float32), np.ones(2), torch.zeros(2), log_prob)
    # r_t - kl_coef * log pi_theta(a_t|s_t)
    np.testing.assert_allclose(buf.rewards[0], [1.0 + 0.1 * 2.0, 0.25 + 0.1 * 0.5], rtol=1e-6)


def test_a_cut_episode_has_ended_and_pays_the_missing_eos_penalty(env):
    """Stepping a non-EOS token twice with max_new_tokens=2 cuts every episode: no TimeLimit.truncated
    (SB3 does not bootstrap it), eos False, and the wrapper subtracts the penalty from exactly the last
    reward of the unwrapped env's same episodes."""
    plain = sb3_vec_env(env, 3, max_new_tokens=2, seed=0)
    wrapped = EpisodeEnds(sb3_vec_env(env, 3, max_new_tokens=2, seed=0), missing_eos_penalty=1.5)
    plain.reset(), wrapped.reset()
    token = next(i for i in range(10, 100) if i != env.unwrapped.tokenizer.eos_token_id)
    actions = np.full(3, token)
    for step in range(2):
        _, r_plain, d_plain, i_plain = plain.step(actions)
        _, r_wrapped, d_wrapped, i_wrapped = wrapped.step(actions)
        np.testing.assert_array_equal(d_plain, d_wrapped)
        if step == 0:
            np.testing.assert_allclose(r_wrapped, r_plain)
    assert d_wrapped.all() and not any("TimeLimit.truncated" in i for i in i_plain + i_wrapped)
    assert not any(i["eos"] for i in i_plain + i_wrapped)
    np.testing.assert_allclose(r_wrapped, r_plain - 1.5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- learning


def test_learn_spends_completions_reports_metrics_and_saves_a_loadable_policy(env, tmp_path):
    agent = agents.make("sb3-ppo", seed=0, **TINY)
    start = state(torch.nn.ModuleDict({"lm": env.unwrapped.reference_model}))
    calls = []
    agent.learn(env, 12, lambda a, m: calls.append(m), progress_bar=False)

    spent = [m["spent"] for m in calls]
    assert spent == sorted(spent) and spent[-1] == agent.spent >= 12
    assert all(s < 12 for s in spent[:-1])  # it stopped at the first rollout that crossed the budget
    finished = next(m for m in calls if "score" in m)
    assert {"score", "reward", "kl", "objective", "gold", "length", "eos_rate", "loss", "policy_loss", "value_loss",
            "entropy", "approx_kl", "clip_fraction", "explained_variance"} <= set(finished)
    assert 1 <= finished["length"] <= 4 and 0 <= finished["eos_rate"] <= 1
    # trained: the policy moved away from pi_ref, which stayed frozen
    assert_same_state(start, state(torch.nn.ModuleDict({"lm": env.unwrapped.reference_model})))
    moved = [k for k, v in agent.policy.model.state_dict().items() if not torch.equal(v, start[f"lm.{k}"])]
    assert moved, "no weight of the policy changed"
    assert agent.policy.value_head is agent.model.policy.value_net  # SB3's critic is what gets saved

    agent.save(tmp_path / "agent")
    loaded = agents.load(tmp_path / "agent")
    assert isinstance(loaded, SB3PPO) and loaded.spent == agent.spent and loaded.config == agent.config
    assert_same_state(state(agent.policy), state(loaded.policy))
    assert loaded.policy.value_head is not None and loaded.policy.value_head.weight.abs().sum() > 0
    prompts = env.unwrapped.prompts("test", 3)
    assert loaded.generate(prompts, temperature=0) == agent.generate(prompts, temperature=0)


def test_a_callback_stop_ends_training_after_that_update(env):
    agent = agents.make("sb3-ppo", **TINY)
    calls = []
    agent.learn(env, 10_000, lambda a, m: calls.append(m) or False, progress_bar=False)
    assert len(calls) == 1 and agent.spent == calls[0]["spent"] < 10_000


def test_a_killed_run_resumes_its_policy_critic_and_optimizer(env, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = agents.make("sb3-ppo", seed=1, **TINY)
    first.learn(env, 8, checkpoint_dir=ckpt, progress_bar=False)
    steps = first.optimizer.state_dict()["state"][0]["step"]

    resumed = agents.make("sb3-ppo", seed=1, **TINY)
    seen = []
    resumed.learn(env, first.spent + 8, lambda a, m: seen.append(m["spent"]), checkpoint_dir=ckpt, progress_bar=False)
    assert seen[0] > first.spent and resumed.spent >= first.spent + 8  # continued the count
    assert resumed.optimizer.state_dict()["state"][0]["step"] > steps  # and Adam's state
    assert json.loads((ckpt / "agent.json").read_text())["spent"] == resumed.spent


# ---------------------------------------------------------------------------------------------- the zoo


@pytest.mark.slow
def test_rlhf_zoo_trains_evaluates_and_reloads_sb3_ppo(tmp_path):
    """``rlhf-zoo train sb3-ppo`` (its implementation, ``train``) with the YAML's settings shrunk: a run
    dir evaluated like every agent's, and ``rlhf-zoo eval`` (``evaluate_run``) on it."""
    from rlhfgym.zoo.evaluate import evaluate_run
    from rlhfgym.zoo.train import train

    run = tmp_path / "run"
    result = train("sb3-ppo", ENV_ID, budget=8, run_dir=str(run), eval_n=8,
                   overrides={**TINY, "env_kwargs": {"max_new_tokens": 3}})
    assert result["algo"] == "sb3-ppo" and result["policy"]["n"] == 8
    assert np.isfinite(result["policy"]["gold"]) and result["policy"]["kl"] is not None
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert agents.load(run / "agent").spent >= 8
    record = evaluate_run(run, prompts=8, progress=False)  # rlhf-zoo eval RUN_DIR
    assert record["algo"] == "sb3-ppo" and record["metrics"]["gold"]["mean"] == pytest.approx(result["policy"]["gold"])


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("hp, message", [
    ({"batch_size": 512}, r"sb3-ppo: batch_size must be an int <= n_steps \* num_envs = 16 \* 16 = 256"),
    ({"n_step": 8}, r"unknown hyperparameter 'n_step' \(did you mean 'n_steps'\?\)"),
    ({"learning_rate": 0}, r"sb3-ppo: learning_rate must be > 0, got 0.0"),
    ({"gamma": 1.5}, r"sb3-ppo: gamma must be in \[0, 1\], got 1.5"),
    ({"num_envs": 2.0}, r"sb3-ppo: num_envs must be an integer, got 2.0"),
    ({"split": "dev"}, r"sb3-ppo: unknown split 'dev'"),
])
def test_a_bad_hyperparameter_fails_at_construction(hp, message):
    with pytest.raises(AgentError, match=message):
        agents.make("sb3-ppo", **hp)


def test_the_zoo_refuses_a_bad_hyperparameter_before_making_a_run_dir(tmp_path, capsys):
    from rlhfgym.zoo.cli import main

    run = tmp_path / "run"
    assert main(["train", "sb3-ppo", ENV_ID, "--run-dir", str(run), "--hp", "batch_size=4096"]) == 2
    assert "batch_size must be an int <= n_steps * num_envs" in capsys.readouterr().err
    assert not run.exists()


def test_the_yaml_holds_the_working_settings():
    from rlhfgym.zoo.train import load_hyperparams

    hp = load_hyperparams("sb3-ppo", "RLHF-Summarize-Gold-v0")
    assert {k: hp[k] for k in ("num_envs", "n_steps", "batch_size", "n_epochs", "learning_rate", "gamma", "gae_lambda",
                               "ent_coef")} == {"num_envs": 16, "n_steps": 16, "batch_size": 128, "n_epochs": 2,
                                                 "learning_rate": 1e-5, "gamma": 1.0, "gae_lambda": 0.95, "ent_coef": 0.0}
    assert load_hyperparams("sb3-ppo", "RLHF-Summarize-v0")["missing_eos_penalty"] == 1.0
