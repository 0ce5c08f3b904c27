"""The agents collect experience through the token MDP: every episode they learn from is one of a
vector env's, and acting through the env draws exactly the completions ``CausalLMPolicy.sample``
draws for the same seed (the env adds no randomness and changes no token)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhfgym.agents as agents
from rlhfgym.agents.common import EnvSampler, stream_prompt_indices
from rlhfgym.agents.policy import CausalLMPolicy
from rlhfgym.envs.lm import IncrementalLM
from rlhfgym.envs.registration import register_envs
from rlhfgym.envs.vector_env import TokenMDPVectorEnv

register_envs()


@pytest.fixture(scope="module")
def env():
    return gym.make("RLHF-Summarize-v0", max_new_tokens=12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_env_rollout_draws_what_the_policy_samples(env, temperature):
    core = env.unwrapped
    policy = CausalLMPolicy.from_env(env)
    idx = stream_prompt_indices(core, 12, seed=3, position=0).repeat(2)  # duplicates, as RLOO has them
    prompts = [core.task.prompt("train", int(i)) for i in idx]
    sampler = EnvSampler(env, kl_coef=0.05)
    torch.manual_seed(7)
    direct = policy.sample(prompts, temperature=temperature)
    torch.manual_seed(7)
    roll = sampler.rollout(policy, idx, temperature=temperature)
    t = direct.tokens.shape[1]
    assert torch.equal(roll.tokens[:, :t], direct.tokens) and not roll.mask[:, t:].any()
    assert torch.equal(roll.mask[:, :t], direct.mask) and torch.equal(roll.ended, direct.ended)
    assert roll.texts == direct.texts and roll.prompts == prompts and roll.prompt_ids == direct.prompt_ids
    torch.testing.assert_close(roll.logprobs[:, :t], direct.logprobs)
    # what the env's step reported: log pi_ref of each action, RM at the end, gold
    with torch.no_grad():
        ref = policy.forward_logprobs(direct.prompt_ids, direct.tokens, direct.mask, model=core.reference_model)
    torch.testing.assert_close(roll.ref_logprobs[:, :t], ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(roll.scores, core.score(prompts, direct.texts), atol=1e-4, rtol=0)
    np.testing.assert_allclose(roll.gold, core.gold(prompts, direct.texts), atol=1e-6)
    # the per-step rewards are the env's: 0.05 log pi_ref, plus RM on the last step of each episode
    last = roll.mask.sum(1) - 1
    expected = 0.05 * roll.ref_logprobs
    expected[torch.arange(len(idx)), last] += roll.scores
    torch.testing.assert_close(roll.rewards, expected * roll.mask, atol=1e-5, rtol=0)


def test_overlapping_the_policy_with_the_env_changes_nothing(env):
    """The policy reading its token in a second thread while the env steps gives the same episodes."""
    policy = CausalLMPolicy.from_env(env)
    idx = list(range(6))
    out = []
    for overlap in (False, True):
        sampler = EnvSampler(env, kl_coef=0.05, overlap=overlap)
        torch.manual_seed(3)
        out.append(sampler.rollout(policy, idx))
    assert EnvSampler(env, kl_coef=0.05).overlap  # on by default on a CPU
    serial, overlapped = out
    assert torch.equal(serial.tokens, overlapped.tokens) and serial.texts == overlapped.texts
    assert torch.equal(serial.rewards, overlapped.rewards) and torch.equal(serial.logprobs, overlapped.logprobs)


def test_rollouts_reuse_the_policys_kv_cache_and_follow_its_updates(env, monkeypatch):
    """An EnvSampler makes the policy's IncrementalLM once per batch size (on CUDA: one graph capture),
    and after the weights change in place its rollouts still draw what the policy samples."""
    import rlhfgym.envs.lm as lm_module

    made = []
    real_init = lm_module.IncrementalLM.__init__

    def counting_init(self, model, *args, **kwargs):
        made.append(model)
        real_init(self, model, *args, **kwargs)

    monkeypatch.setattr(lm_module.IncrementalLM, "__init__", counting_init)
    policy = CausalLMPolicy.from_env(env)
    sampler = EnvSampler(env, kl_coef=0.05)
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.5)
    for step in range(3):
        idx = [step, step + 1, step + 2, step + 3]
        torch.manual_seed(step)
        roll = sampler.rollout(policy, idx)
        direct_made = len(made)
        torch.manual_seed(step)
        direct = policy.sample(roll.prompts)  # a new IncrementalLM
        del made[direct_made:]
        t = direct.tokens.shape[1]
        assert torch.equal(roll.tokens[:, :t], direct.tokens) and roll.texts == direct.texts
        loss = -policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert sum(m is policy.model for m in made) == 1  # one for the policy over three rollouts
    assert len(made) == 2  # and the env's reference, made with the env


def test_the_policy_acts_on_the_envs_prompt_tokens(env):
    """A policy that would cut prompts shorter than the env still acts on the env's state."""
    short, full = CausalLMPolicy.from_env(env), CausalLMPolicy.from_env(env)
    short.max_prompt_tokens = 8
    sampler = EnvSampler(env, kl_coef=0.0)
    torch.manual_seed(5)
    a = sampler.rollout(short, [0, 1, 2])
    torch.manual_seed(5)
    b = sampler.rollout(full, [0, 1, 2])
    assert a.prompt_ids == full.encode_prompts(a.prompts) and max(map(len, a.prompt_ids)) > 8
    assert torch.equal(a.tokens, b.tokens)  # sampled from the whole prompt, not the policy's cut


def test_env_rollout_follows_the_agents_kl_coef(env):
    """The rollout env pays the agent's beta; beta = 0 runs no reference unless asked."""
    policy = CausalLMPolicy.from_env(env)
    assert EnvSampler(env, kl_coef=0.2).vector_env(4).kl_coef == 0.2
    assert EnvSampler(env, kl_coef=0.0).vector_env(4).core.ref_lm is None
    roll = EnvSampler(env, kl_coef=0.0, compute_ref=True).rollout(policy, [0, 1, 2])
    taken = roll.ref_logprobs[roll.mask.bool()]
    assert (taken <= 0).all() and (taken < -1e-3).float().mean() > 0.5  # log pi_ref of the actions, not zeros
    sampler = EnvSampler(env, kl_coef=0.1)
    assert sampler.vector_env(3) is sampler.vector_env(3)  # made once per batch size
    assert sampler.vector_env(3).metadata["autoreset_mode"] == gym.vector.AutoresetMode.DISABLED


def test_an_env_sampler_without_the_reward_model_pays_the_kl_term_only(env, monkeypatch):
    """score=False (Nash-MD's players): the same episodes, no reward-model pass, rewards = the KL term,
    scores NaN; gold is still reported."""
    core = env.unwrapped
    policy = CausalLMPolicy.from_env(env)
    out, calls, real = {}, [], core.reward_model.score
    monkeypatch.setattr(core.reward_model, "score", lambda p, c: calls.append(len(c)) or real(p, c))
    for score in (True, False):
        calls.clear()
        torch.manual_seed(5)
        out[score] = EnvSampler(env, kl_coef=0.05, score=score).rollout(policy, [0, 1, 2, 3])
        assert (sum(calls) == 4) if score else not calls  # every episode scored once, or none
    scored, unscored = out[True], out[False]
    assert torch.equal(scored.tokens, unscored.tokens) and scored.texts == unscored.texts
    torch.testing.assert_close(unscored.rewards, 0.05 * unscored.ref_logprobs * unscored.mask)
    assert torch.isnan(unscored.scores).all() and not torch.isnan(scored.scores).any()
    np.testing.assert_allclose(unscored.gold, scored.gold)


def test_env_sampler_refuses_other_envs():
    with pytest.raises(agents.AgentError, match="token MDP"):
        EnvSampler(gym.make("CartPole-v1"), kl_coef=0.0)


def test_distinct_rows_in_order_of_first_appearance():
    from rlhfgym.envs.lm import distinct_rows

    ids = torch.tensor([[0, 5, 6], [1, 2, 3], [0, 5, 6], [9, 5, 6], [1, 2, 3]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])  # row 3 differs only where row 0 is masked
    first, copies = distinct_rows(ids, mask)
    assert first.tolist() == [0, 1, 3] and copies.tolist() == [0, 1, 0, 2, 1]
    assert [t.tolist() for t in distinct_rows(ids[:0], mask[:0])] == [[], []]


def test_repeated_prompts_are_read_once_with_the_row_by_row_results(env):
    """forward_logprobs on k copies of prompts of several lengths, completions of several lengths:
    each prompt runs through the network once and rows of similar length are batched together, and
    log-probs, values and gradients are those of scoring every row alone."""
    import copy

    torch.manual_seed(0)
    shared = CausalLMPolicy.from_env(env, value_head=True)
    torch.nn.init.normal_(shared.value_head.weight, std=0.1)
    alone = copy.deepcopy(shared)
    prompts = env.unwrapped.prompts("train", 20)
    roll = shared.sample(prompts * 2, temperature=1.0)  # 40 rows: every prompt twice
    lengths = roll.mask.sum(1)
    assert len({len(p) for p in roll.prompt_ids}) > 3 and int(lengths.min()) < int(lengths.max())
    read = []
    hook = shared.model.get_input_embeddings().register_forward_hook(lambda m, i, o: read.append(i[0].numel()))
    logp, values = shared.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask, with_values=True)
    hook.remove()
    rows = [alone.forward_logprobs(roll.prompt_ids[i:i + 1], roll.tokens[i:i + 1], roll.mask[i:i + 1], with_values=True)
            for i in range(40)]
    torch.testing.assert_close(logp, torch.cat([r[0] for r in rows]), atol=1e-4, rtol=0)
    torch.testing.assert_close(values, torch.cat([r[1] for r in rows]), atol=1e-5, rtol=0)
    assert sum(read) < 0.7 * roll.tokens.numel() + 40 * max(map(len, roll.prompt_ids))  # prompts once, less padding
    weights = torch.randn(40, roll.tokens.shape[1])
    ((logp + values) * weights).sum().backward()
    sum(((r[0] + r[1]) * weights[i]).sum() for i, r in enumerate(rows)).backward()
    for (name, a), b in zip(alone.model.named_parameters(), shared.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)
    torch.testing.assert_close(shared.value_head.weight.grad, alone.value_head.weight.grad, atol=1e-4, rtol=1e-3)


def test_duplicate_prompts_are_prefilled_once(env):
    """IncrementalLM prefills a repeated prompt once and copies it: same logits and cache as row by row."""
    model = env.unwrapped.reference_model
    tok = env.unwrapped.tokenizer
    prompts = [tok(p)["input_ids"] for p in env.unwrapped.prompts("train", 3)]
    rows = [prompts[0], prompts[1], prompts[0], prompts[2], prompts[1]]
    together, one_by_one = IncrementalLM(model, 5, 160), IncrementalLM(model, 5, 160)
    a = together.reset_rows(range(5), rows)
    b = torch.cat([one_by_one.reset_rows([i], [rows[i]]) for i in range(5)])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    step = torch.tensor([5, 6, 7, 8, 9])
    torch.testing.assert_close(together.step(step), one_by_one.step(step), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algo", "hyperparams", "budget"),
    [
        ("reinforce", {"batch_size": 4}, 8),
        ("rloo", {"batch_size": 4, "rloo_k": 2}, 8),
        ("ppo", {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1}, 8),
        ("nash-md", {"batch_size": 2, "preference": "reward"}, 8),
        ("rest", {"grow_steps": 1, "samples_per_prompt": 2, "prompts_per_grow": 4, "thresholds": [0.0],
                  "eval_prompts": 0}, 12),
    ],
)
def test_agents_learn_from_the_envs_episodes(env, monkeypatch, algo, hyperparams, budget):
    """Every completion an RL agent trains on is an episode of the vector env (counted at its step)."""
    ended = []
    step = TokenMDPVectorEnv.step

    def counting_step(self, actions):
        out = step(self, actions)
        ended.append(int((out[2] | out[3]).sum()))
        return out

    monkeypatch.setattr(TokenMDPVectorEnv, "step", counting_step)
    agent = agents.make(algo, **hyperparams)
    agent.learn(env, budget, progress_bar=False)
    episodes = sum(ended)
    # ReST also reads each prompt's original completion (budget 1 each), which is not an episode
    assert episodes == (budget - 4 if algo == "rest" else budget)


def test_bench_rollout_times_both_ways_on_the_same_tokens(capsys):
    from rlhfgym.zoo.bench_rollout import bench_rollout

    result = bench_rollout(batch=4, samples_per_prompt=2, repeats=1)
    assert result["same_tokens"] and result["env_median"] > 0 and result["sequence_median"] > 0
    assert result["ratio"] == pytest.approx(result["sequence_median"] / result["env_median"])
    assert "| 4 | 2 | 0.05 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        bench_rollout(batch=5, samples_per_prompt=2)
