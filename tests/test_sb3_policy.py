"""LMActorCriticPolicy: stock stable_baselines3.PPO training the micro world's LM token by token."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3 as sb3
import torch

from rlhfgym.agents.policy import CausalLMPolicy
from rlhfgym.agents.sb3_policy import LMActorCriticPolicy
from rlhfgym.envs.hf import position_ids
from rlhfgym.envs.registration import register_envs
from rlhfgym.envs.sb3 import make_sb3_vec_env

register_envs()
ENV_ID = "RLHF-Summarize-Gold-v0"


def lm_policy(model, core) -> CausalLMPolicy:
    """The SB3 policy's LM as a KV-cached sampler (same weights), to evaluate whole episodes quickly."""
    return CausalLMPolicy(model.policy.features_extractor.lm, core.tokenizer, max_prompt_tokens=core.core.max_prompt_tokens,
                          max_new_tokens=core.max_new_tokens)


def mean_return(model, core, prompts, seed: int = 1) -> tuple[float, float, float]:
    """Mean episode return of the token MDP, ``RM + kl_coef * sum_t log pi_ref(a_t|s_t)``, over one
    episode per prompt (sampled with a KV cache: the same distribution SB3's rollouts draw from), its
    standard error, and the mean gold."""
    pol = lm_policy(model, core)
    torch.manual_seed(seed)
    roll = pol.sample(prompts)
    with torch.no_grad():
        ref = pol.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask, model=core.reference_model).sum(1)
    gold = np.asarray(core.gold(prompts, roll.texts))
    ret = gold + core.kl_coef * ref.numpy()
    return float(ret.mean()), float(ret.std() / np.sqrt(len(ret))), float(gold.mean())


def test_initial_policy_is_the_reference_model():
    venv = make_sb3_vec_env(ENV_ID, num_envs=3, seed=0, max_new_tokens=4)
    model = sb3.PPO(LMActorCriticPolicy, venv, n_steps=4, batch_size=12, seed=0)
    obs = venv.reset()
    for _ in range(2):
        obs, *_ = venv.step(model.predict(obs)[0])
    dist = model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0])
    ids, att = torch.as_tensor(obs["input_ids"]), torch.as_tensor(obs["attention_mask"])
    with torch.no_grad():
        logits = venv.venv.reference_model(input_ids=ids, attention_mask=att, position_ids=position_ids(att)).logits[:, -1]
    torch.testing.assert_close(dist.distribution.logits, torch.log_softmax(logits, -1), atol=1e-4, rtol=0)
    assert dist.distribution.logits.shape == (3, venv.action_space.n)
    values = model.policy.predict_values(model.policy.obs_to_tensor(obs)[0])
    assert values.shape == (3, 1) and values.abs().max() == 0  # zero-initialised critic
    assert model.policy.features_extractor.lm is not venv.venv.reference_model  # a copy: pi_ref stays frozen


def test_rollout_cache_gives_the_full_forward_features(monkeypatch):
    """Stepping a vector env through episodes and resets, the cached features (eval mode, no grad) equal
    the full forward's, row by row, while only new episodes are prefilled; a batch of another size or a
    mode switch starts over."""
    from rlhfgym.envs.lm import IncrementalLM

    prefilled = []
    reset_rows = IncrementalLM.reset_rows
    monkeypatch.setattr(IncrementalLM, "reset_rows", lambda self, rows, *a, **k: (  # the policy's (not the env's)
        self.keep_hidden and prefilled.append(len(rows)), reset_rows(self, rows, *a, **k))[1])
    venv = make_sb3_vec_env(ENV_ID, num_envs=4, seed=0, max_new_tokens=5)
    model = sb3.PPO(LMActorCriticPolicy, venv, n_steps=4, batch_size=16, seed=0)
    extractor = model.policy.features_extractor
    model.policy.set_training_mode(False)
    obs = venv.reset()
    for _ in range(13):  # > 2 episodes of 5 tokens: every row resets while the others continue
        tensor_obs = model.policy.obs_to_tensor(obs)[0]
        with torch.no_grad():
            cached = extractor(tensor_obs)
            extractor.use_cache = False
            full = extractor(tensor_obs)
            extractor.use_cache = True
        torch.testing.assert_close(cached, full, atol=2e-4, rtol=1e-4)
        with torch.no_grad():
            actions, _, _ = model.policy(tensor_obs)
        obs, *_ = venv.step(actions.numpy())
    # 13 steps of 4 rows: 4 first prefills, then one a row per new episode (autoreset after 5 tokens,
    # so 2 more each); the policy's call on the observation just seen reuses its features
    assert sum(prefilled) == 4 + 4 * 2, prefilled
    # another batch size: a new cache, still the full forward's numbers
    two = {k: v[:2] for k, v in model.policy.obs_to_tensor(obs)[0].items()}
    with torch.no_grad():
        cached = extractor(two)
        extractor.use_cache = False
        torch.testing.assert_close(cached, extractor(two), atol=2e-4, rtol=1e-4)
        extractor.use_cache = True
    assert extractor._rollout.batch_size == 2 and sum(prefilled) == 12 + 2
    model.policy.set_training_mode(True)  # an update may move the weights: the cache is dropped
    assert extractor._rollout is None and extractor._last_call is None


def test_single_env_learns_and_round_trips(tmp_path):
    env = gym.make(ENV_ID, max_new_tokens=3)
    ref_before = {k: v.clone() for k, v in env.unwrapped.reference_model.state_dict().items()}
    model = sb3.PPO(LMActorCriticPolicy, env, n_steps=8, batch_size=8, n_epochs=1, learning_rate=1e-3, seed=0)
    start = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(8)
    assert any(not torch.equal(start[k], v) for k, v in model.policy.state_dict().items())  # it trained
    for k, v in env.unwrapped.reference_model.state_dict().items():
        assert torch.equal(v, ref_before[k]), k  # ...its own copy, not the env's reference

    model.save(tmp_path / "ppo.zip")
    loaded = sb3.PPO.load(tmp_path / "ppo.zip", env=env)
    obs, _ = env.reset(seed=3)
    a = model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0]).distribution.logits
    b = loaded.policy.get_distribution(loaded.policy.obs_to_tensor(obs)[0]).distribution.logits
    torch.testing.assert_close(a, b)


def test_bad_configurations():
    venv = make_sb3_vec_env(ENV_ID, num_envs=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="ortho_init=True would overwrite the pretrained"):
        sb3.PPO(LMActorCriticPolicy, venv, policy_kwargs={"ortho_init": True})
    with pytest.raises(ValueError, match="net_arch is fixed"):
        sb3.PPO(LMActorCriticPolicy, venv, policy_kwargs={"net_arch": [64]})
    with pytest.raises(ValueError, match="Dict observation with 'input_ids' and 'attention_mask'"):
        sb3.PPO(LMActorCriticPolicy, "CartPole-v1")


def test_model_with_too_few_logits_is_refused(tiny_lm):
    venv = make_sb3_vec_env(ENV_ID, num_envs=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="logits but the env's action space is Discrete"):
        sb3.PPO(LMActorCriticPolicy, venv, policy_kwargs={"model": tiny_lm})


@pytest.mark.slow
def test_sb3_ppo_raises_the_episode_return():
    # Short episodes (8 tokens) so that ~100 episodes fit in 768 env steps; the env's default
    # kl_coef (0.05): the return is gold + 0.05 * sum_t log pi_ref(a_t|s_t), as SB3 sees it.
    venv = make_sb3_vec_env(ENV_ID, num_envs=16, seed=0, max_new_tokens=8)
    core = venv.venv
    prompts = core.prompts("validation", 256)
    model = sb3.PPO(LMActorCriticPolicy, venv, learning_rate=1e-4, n_steps=16, batch_size=64, n_epochs=2, gamma=1.0,
                    seed=0)
    before, se, gold_before = mean_return(model, core, prompts)
    model.learn(768)
    after, _, gold_after = mean_return(model, core, prompts)
    assert after > before + max(0.05, 2.5 * se), (before, after, se)  # observed: -0.16 -> -0.04 (se 0.02)
    assert gold_after > gold_before, (gold_before, gold_after)
