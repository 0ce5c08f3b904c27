"""The token-level MDP: single env, torch vector env, SB3 adaptor, registration, errors."""

from __future__ import annotations

import dataclasses
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode

from rlhfgym.envs.config import EnvConfig
from rlhfgym.envs.core import TokenMDPCore
from rlhfgym.envs.lm import sequence_logprobs
from rlhfgym.envs.rewards import GoldReward
from rlhfgym.envs.token_env import TokenMDPEnv
from rlhfgym.envs.vector_env import TokenMDPVectorEnv

MAX_NEW = 5
MAX_PROMPT = 32


@pytest.fixture
def make_env(toy_task, tiny_tokenizer, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    def make(vector: bool = False, **kwargs):
        kwargs.setdefault("max_new_tokens", MAX_NEW)
        kwargs.setdefault("max_prompt_tokens", MAX_PROMPT)
        reference = kwargs.pop("reference", None) or AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
        cls = TokenMDPVectorEnv if vector else TokenMDPEnv
        return cls(toy_task, tiny_tokenizer, reference, GoldReward(toy_task), **kwargs)

    return make


def eos_id(env) -> int:
    return env.unwrapped.tokenizer.eos_token_id


def scripted_actions(rng: np.random.Generator, n: int, vocab: int, eos: int) -> np.ndarray:
    """Random tokens, with EOS often enough that episodes both terminate and truncate."""
    a = rng.integers(0, vocab, size=n)
    a[rng.random(n) < 0.2] = eos
    return a


# ---------------------------------------------------------------------------------- checkers
def test_gymnasium_env_checker(make_env):
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*render.*")
        check_env(make_env(), skip_render_check=True)


def test_sb3_env_checker(make_env):
    from stable_baselines3.common.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SB3's checker reports problems as warnings: none expected
        check_env(make_env(), warn=True)


# ---------------------------------------------------------------------------------- semantics
def test_rewards_match_teacher_forced_reference_and_gold(make_env, toy_task, tiny_tokenizer):
    """r_t = kl_coef * log pi_ref(a_t|s_t), plus the gold score of the decoded completion at the end."""
    kl = 0.3
    env = make_env(kl_coef=kl)
    obs, info = env.reset(seed=3)
    prompt = info["prompt"]
    prompt_ids = obs["input_ids"][obs["attention_mask"] == 1].tolist()
    assert tiny_tokenizer.decode(prompt_ids) == prompt
    actions = [tiny_tokenizer.convert_tokens_to_ids(w) for w in ["ana", "bought", "3", "oslo"]] + [eos_id(env)]
    rewards, lps = [], []
    for a in actions:
        obs, r, terminated, truncated, info = env.step(a)
        rewards.append(r)
        lps.append(info["ref_logprob"])
    assert terminated and not truncated
    assert obs["input_ids"][-len(actions) :].tolist() == actions

    ids = torch.tensor([prompt_ids + actions])
    comp = torch.zeros_like(ids)
    comp[0, len(prompt_ids) :] = 1
    with torch.no_grad():
        expected = sequence_logprobs(env.reference_model, ids, torch.ones_like(ids), comp)[0, len(prompt_ids) :]
    np.testing.assert_allclose(lps, expected.numpy(), atol=1e-4)
    gold = toy_task.gold_one(prompt, "ana bought 3 oslo")
    assert info["completion"] == "ana bought 3 oslo"
    assert info["rm_score"] == pytest.approx(gold) and info["gold"] == pytest.approx(gold)
    np.testing.assert_allclose(rewards[:-1], kl * expected[:-1].numpy(), atol=1e-4)
    assert rewards[-1] == pytest.approx(kl * expected[-1].item() + gold, abs=1e-4)
    assert info["ref_logprob_sum"] == pytest.approx(expected.sum().item(), abs=1e-4)
    assert info["length"] == len(actions)


def test_truncation_and_types(make_env):
    env = make_env()
    obs, _ = env.reset(seed=0)
    for t in range(MAX_NEW):
        action = 7 if t % 2 else 8  # never EOS
        obs, r, terminated, truncated, info = env.step(action)
        assert type(r) is float and type(terminated) is bool and type(truncated) is bool
        assert obs["input_ids"].dtype == np.int64 and obs["input_ids"].shape == (MAX_NEW + MAX_PROMPT,)
        assert env.observation_space.contains(obs)
        assert not terminated
        assert truncated == (t == MAX_NEW - 1)
    assert "completion" in info and info["length"] == MAX_NEW


def test_observations_are_fresh_arrays(make_env):
    env = make_env()
    obs0, _ = env.reset(seed=0)
    keep = obs0["input_ids"].copy()
    obs1, *_ = env.step(7)
    obs1["input_ids"][:] = 3  # scribbling on a returned observation must not reach the env
    obs2, *_ = env.step(8)
    assert (obs0["input_ids"] == keep).all()
    assert obs2["input_ids"][-2:].tolist() == [7, 8]
    assert obs2["input_ids"][-3] == keep[-1]


def test_same_seed_same_episode(make_env):
    def rollout(seed):
        env = make_env()
        rng = np.random.default_rng(0)
        out = []
        for ep in range(3):
            obs, info = env.reset(seed=seed if ep == 0 else None)
            out.append(info["prompt_index"])
            done = False
            while not done:
                obs, r, te, tr, info = env.step(int(rng.integers(0, env.action_space.n)))
                out.append(round(r, 5))
                done = te or tr
        return out

    assert rollout(11) == rollout(11)
    assert rollout(11) != rollout(12)


def test_kl_coef_zero_skips_reference(make_env):
    env = make_env(kl_coef=0.0)
    assert env.unwrapped.core.ref_lm is None
    env.reset(seed=0)
    _, r, _, _, info = env.step(7)
    assert r == 0.0 and info["ref_logprob"] == 0.0
    env = make_env(kl_coef=0.0, compute_ref=True)
    env.reset(seed=0)
    _, r, _, _, info = env.step(7)
    assert r == 0.0 and info["ref_logprob"] < 0.0


def test_long_prompts_keep_their_last_tokens(make_env, toy_task, tiny_tokenizer):
    env = make_env(max_prompt_tokens=6)
    with pytest.warns(UserWarning, match="keeping its last 6"):
        obs, info = env.reset(seed=0)
    full = tiny_tokenizer(info["prompt"])["input_ids"]
    assert len(full) > 6
    assert obs["attention_mask"].sum() == 6
    assert obs["input_ids"][-6:].tolist() == full[-6:]  # the answer cue "tl;dr :" survives


def test_reset_options(make_env, toy_task):
    env = make_env()
    _, info = env.reset(options={"prompt_index": 5})
    assert info["prompt_index"] == 5 and info["prompt"] == toy_task.prompt("train", 5)
    _, info = env.reset(options={"split": "test", "prompt_index": 2})
    assert info["prompt"] == toy_task.prompt("test", 2)
    with pytest.raises(ValueError, match="outside split 'test' of size 8"):
        env.reset(options={"prompt_index": 8})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"promt_index": 1})


def test_sequence_level_access(make_env, toy_task):
    env = make_env()
    prompts = env.prompts("validation", n=2, start=1)
    assert prompts == toy_task.prompts("validation", 2, 1)
    scores = env.score(prompts, ["ana", "ben"])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert env.gold(prompts, ["ana", "ben"]) == pytest.approx(scores.tolist())
    assert env.task is toy_task and env.tokenizer is not None
    assert isinstance(env.reference_model, torch.nn.Module)


# ---------------------------------------------------------------------------------- errors
def test_error_action_out_of_range(make_env):
    env = make_env()
    env.reset(seed=0)
    V = env.action_space.n
    with pytest.raises(ValueError, match=rf"out of range.*\[0, {V - 1}\]"):
        env.step(V)
    with pytest.raises(ValueError, match="out of range"):
        env.step(-1)
    with pytest.raises(ValueError, match="integer token ids"):
        env.step(1.5)


def test_error_step_after_episode_end(make_env):
    env = make_env()
    with pytest.raises(ResetNeeded, match="before reset"):
        env.step(1)
    env.reset(seed=0)
    env.step(eos_id(env))
    with pytest.raises(ResetNeeded, match=r"after the episode ended.*call reset\(\)"):
        env.step(7)


def test_error_unknown_split(make_env):
    with pytest.raises(ValueError, match="unknown split 'dev'; use one of train, validation, test"):
        make_env(split="dev")


def test_error_device_without_cuda(make_env):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"CUDA is not available.*device='cpu'"):
        make_env(device="cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        make_env(device="gpu0")


def test_error_vocab_mismatch(make_env, tiny_tokenizer):
    from conftest import make_tiny_llama

    small = make_tiny_llama(len(tiny_tokenizer) - 3)
    with pytest.raises(ValueError, match=rf"vocab mismatch.*{len(tiny_tokenizer)} tokens.*{len(tiny_tokenizer) - 3} logits"):
        make_env(reference=small)


def test_error_vector_env_action_shape(make_env):
    venv = make_env(vector=True, num_envs=3)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected 3 action\(s\)"):
        venv.step(torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------- vector env
@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_vector_env_matches_single_envs(make_env, mode):
    """N envs in one batch == N single envs with seeds s+i, step for step, across autoresets."""
    N, seed, steps = 3, 5, 3 * MAX_NEW + 4
    venv = make_env(vector=True, num_envs=N, kl_coef=0.1, autoreset_mode=mode)
    assert venv.metadata["autoreset_mode"] == mode and venv.metadata["torch"] is True
    singles = [make_env(kl_coef=0.1) for _ in range(N)]
    V = venv.single_action_space.n

    vobs, vinfo = venv.reset(seed=seed)
    sobs = [env.reset(seed=seed + i)[0] for i, env in enumerate(singles)]
    for i in range(N):
        assert vobs["input_ids"][i].tolist() == sobs[i]["input_ids"].tolist()
    needs_reset = [False] * N
    rng = np.random.default_rng(0)
    n_ended = n_terminated = 0
    for _ in range(steps):
        actions = scripted_actions(rng, N, V, eos_id(venv))
        vobs, vrew, vterm, vtrunc, vinfo = venv.step(torch.as_tensor(actions))
        assert isinstance(vobs["input_ids"], torch.Tensor) and vrew.dtype == torch.float32
        for i, env in enumerate(singles):
            if needs_reset[i]:  # NEXT_STEP: this step resets row i and ignores its action
                obs_i, _ = env.reset()
                r_i, te_i, tr_i = 0.0, False, False
                needs_reset[i] = False
            else:
                obs_i, r_i, te_i, tr_i, info_i = env.step(int(actions[i]))
                assert vinfo["ref_logprob"][i].item() == pytest.approx(info_i["ref_logprob"], abs=1e-4)
                if te_i or tr_i:
                    n_ended += 1
                    n_terminated += te_i
                    end = vinfo["final_info"] if mode == AutoresetMode.SAME_STEP else vinfo
                    assert bool(end["_rm_score"][i])
                    assert end["rm_score"][i].item() == pytest.approx(info_i["rm_score"], abs=1e-5)
                    assert end["completion"][i] == info_i["completion"]
                    if mode == AutoresetMode.SAME_STEP:
                        assert vinfo["final_obs"]["input_ids"][i].tolist() == obs_i["input_ids"].tolist()
                        obs_i, _ = env.reset()
                    else:
                        needs_reset[i] = True
            assert vobs["input_ids"][i].tolist() == obs_i["input_ids"].tolist()
            assert vobs["attention_mask"][i].tolist() == obs_i["attention_mask"].tolist()
            assert vrew[i].item() == pytest.approx(r_i, abs=1e-4)
            assert (bool(vterm[i]), bool(vtrunc[i])) == (te_i, tr_i)
    assert n_ended >= N and 0 < n_terminated < n_ended  # both kinds of episode end were exercised


def test_make_and_make_vec(toy_task, tiny_lm_dir):
    from rlhfgym.envs.registration import register_envs

    register_envs()
    kwargs = dict(reference=str(tiny_lm_dir), task=toy_task, max_new_tokens=4, max_prompt_tokens=32)
    for env_id, reward in (("RLHF-Summarize-Gold-v0", {}), ("RLHF-Summarize-v0", {"reward_model": "gold"})):
        env = gym.make(env_id, **kwargs, **reward)
        assert isinstance(env.unwrapped, TokenMDPEnv)
        assert isinstance(env.unwrapped.reward_model, GoldReward)
        env.reset(seed=0)
        env.step(3)
        venv = gym.make_vec(env_id, num_envs=2, autoreset_mode="SameStep", seed=1, **kwargs, **reward)
        assert isinstance(venv, TokenMDPVectorEnv)
        assert venv.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
        assert venv.observation_space["input_ids"].shape == (2, 36)
        obs, _ = venv.reset()
        assert obs["input_ids"].shape == (2, 36)


def test_sb3_adaptor(make_env):
    from rlhfgym.envs.sb3 import SB3VecEnv

    with pytest.raises(ValueError, match="SAME_STEP"):
        SB3VecEnv(make_env(vector=True, num_envs=2))
    venv = SB3VecEnv(make_env(vector=True, num_envs=2, autoreset_mode="SameStep"))
    ref = make_env(vector=True, num_envs=2, autoreset_mode="SameStep")
    venv.seed(4)
    obs = venv.reset()
    robs, _ = ref.reset(seed=4)
    assert isinstance(obs["input_ids"], np.ndarray) and (obs["input_ids"] == robs["input_ids"].numpy()).all()
    eos = ref.tokenizer.eos_token_id
    seen_trunc = seen_term = False
    for t in range(2 * MAX_NEW):
        actions = np.array([eos if t == 2 else 7, 8])
        obs, rewards, dones, infos = venv.step(actions)
        robs, rrew, rterm, rtrunc, rinfo = ref.step(torch.as_tensor(actions))
        assert (obs["input_ids"] == robs["input_ids"].numpy()).all()
        np.testing.assert_allclose(rewards, rrew.numpy(), atol=1e-6)
        for i in range(2):
            assert dones[i] == bool(rterm[i] or rtrunc[i])
            if dones[i]:
                term_obs = infos[i]["terminal_observation"]["input_ids"]
                assert (term_obs == rinfo["final_obs"]["input_ids"][i].numpy()).all()
                # a cut episode has ended for good: no TimeLimit.truncated, so SB3 does not bootstrap it
                assert "TimeLimit.truncated" not in infos[i] and infos[i]["eos"] == bool(rterm[i])
                seen_trunc |= bool(rtrunc[i])
                seen_term |= bool(rterm[i])
    assert seen_trunc and seen_term


def test_core_rejects_bad_configuration(toy_task, tiny_tokenizer, tiny_lm):
    with pytest.raises(ValueError, match="score"):
        TokenMDPCore(toy_task, tiny_tokenizer, tiny_lm, reward_model=object())
    with pytest.raises(ValueError, match="unknown autoreset_mode"):
        TokenMDPCore(toy_task, tiny_tokenizer, tiny_lm, GoldReward(toy_task), autoreset_mode="sometimes")
    with pytest.raises(ValueError, match="max_new_tokens"):
        TokenMDPCore(toy_task, tiny_tokenizer, tiny_lm, GoldReward(toy_task), max_new_tokens=0)
    with pytest.raises(ValueError, match="reference must be a causal LM"):
        TokenMDPCore(toy_task, tiny_tokenizer, "not a model", GoldReward(toy_task))
    with pytest.raises(ValueError, match=r"TokenMDPCore got unknown keyword.*'kl_coeff' \(did you mean 'kl_coef'\?\)"):
        TokenMDPCore(toy_task, tiny_tokenizer, tiny_lm, GoldReward(toy_task), kl_coeff=0.1)


def test_core_takes_one_config(toy_task, tiny_tokenizer, tiny_lm):
    """The core, the single env and the vector env are built from one EnvConfig (keywords override it)."""
    config = EnvConfig(num_envs=3, kl_coef=0.0, max_new_tokens=4, max_prompt_tokens=16, autoreset_mode="SameStep")
    core = TokenMDPCore(toy_task, tiny_tokenizer, tiny_lm, GoldReward(toy_task), config)
    assert core.config is config and (core.num_envs, core.window, core.ref_lm) == (3, 20, None)
    assert core.autoreset_mode == AutoresetMode.SAME_STEP
    assert TokenMDPCore(toy_task, tiny_tokenizer, tiny_lm, GoldReward(toy_task)).autoreset_mode == AutoresetMode.NEXT_STEP
    venv = TokenMDPVectorEnv(toy_task, tiny_tokenizer, tiny_lm, GoldReward(toy_task), config, kl_coef=0.5)
    assert venv.config == dataclasses.replace(config, kl_coef=0.5) and venv.num_envs == 3
    assert venv.observation_space["input_ids"].shape == (3, 20)
    env = TokenMDPEnv(toy_task, tiny_tokenizer, tiny_lm, GoldReward(toy_task), EnvConfig(max_new_tokens=4, max_prompt_tokens=16))
    assert env.core.autoreset_mode == AutoresetMode.DISABLED and env.config.autoreset_mode is None
    with pytest.raises(ValueError, match="one episode at a time, got num_envs=3"):
        TokenMDPEnv(toy_task, tiny_tokenizer, tiny_lm, GoldReward(toy_task), config)
    with pytest.raises(ValueError, match="the single env never autoresets"):
        TokenMDPEnv(toy_task, tiny_tokenizer, tiny_lm, GoldReward(toy_task), autoreset_mode="NextStep")


def test_vector_env_without_autoreset_keeps_ended_rows_idle(make_env):
    """autoreset_mode=Disabled: one episode per row; ended rows ignore actions, pay nothing and
    do not report an end again; stepping after every row ended is refused until reset."""
    N = 3
    envs = make_env(vector=True, num_envs=N, kl_coef=0.1, autoreset_mode="Disabled")
    obs, info = envs.reset(options={"prompt_index": [0, 1, 2]})
    assert info["prompt_index"].tolist() == [0, 1, 2]
    eos = eos_id(envs)
    ends = np.zeros(N, dtype=int)
    # row 0 ends at once (EOS), the others run to truncation
    actions = torch.tensor([eos, 5, 5])
    for t in range(MAX_NEW):
        obs, rewards, terminated, truncated, info = envs.step(actions)
        ended = (terminated | truncated).numpy()
        ends += ended
        if t == 0:
            assert ended.tolist() == [True, False, False] and info["_rm_score"].tolist() == [True, False, False]
        if t > 0:  # row 0 is idle: its EOS is ignored, no reward, no log pi_ref
            assert not ended[0] and float(rewards[0]) == 0.0 and float(info["ref_logprob"][0]) == 0.0
            assert "prompt_index" not in info  # nothing restarts
    assert ends.tolist() == [1, 1, 1]
    with pytest.raises(ResetNeeded, match="all 3 episodes ended"):
        envs.step(actions)
    # a partial reset restarts only the masked rows, with their prompts; the others stay idle
    obs, info = envs.reset(options={"reset_mask": np.array([False, True, False]), "prompt_index": [0, 4, 0]})
    assert info["_prompt_index"].tolist() == [False, True, False] and int(info["prompt_index"][1]) == 4
    obs, rewards, terminated, truncated, info = envs.step(torch.tensor([5, eos, 5]))
    assert terminated.tolist() == [False, True, False] and float(rewards[0]) == 0.0


def test_reset_mask_is_checked(make_env):
    envs = make_env(vector=True, num_envs=2, autoreset_mode="Disabled")
    with pytest.raises(ValueError, match="needs a full reset"):
        envs.reset(options={"reset_mask": np.array([True, False])})
    envs.reset()
    with pytest.raises(ValueError, match="selects no env"):
        envs.reset(options={"reset_mask": np.array([False, False])})
    with pytest.raises(ValueError, match=r"bool array of shape \(2,\)"):
        envs.reset(options={"reset_mask": np.array([1, 0])})


@pytest.mark.parametrize("mode", ["NextStep", "SameStep"])
def test_agent_incremental_lm_stays_in_sync(make_env, mode):
    """The loop in TokenMDPVectorEnv's docstring: an agent whose policy *is* the reference model
    sees exactly the env's log pi_ref(a|s) for every action, across autoresets."""
    from rlhfgym.envs.lm import IncrementalLM

    N = 3
    envs = make_env(vector=True, num_envs=N, autoreset_mode=mode)
    obs, info = envs.reset(seed=0)
    lm = IncrementalLM(envs.reference_model, N, window=obs["input_ids"].shape[1])
    logits = lm.reset_rows(range(N), obs["input_ids"], obs["attention_mask"])
    g = torch.Generator().manual_seed(0)
    acted = ~envs.core.done.copy()
    resets = 0
    for _ in range(3 * MAX_NEW):
        logprobs = torch.log_softmax(logits.float(), -1)
        actions = torch.multinomial(logprobs.exp(), 1, generator=g).view(-1)
        obs, rewards, terminated, truncated, info = envs.step(actions)
        mine = logprobs.gather(1, actions.view(-1, 1)).view(-1)
        acting = torch.as_tensor(acted)
        torch.testing.assert_close(info["ref_logprob"][acting], mine[acting], atol=1e-4, rtol=0)
        logits = lm.step(actions)
        if "prompt_index" in info:
            rows = info["_prompt_index"].nonzero().view(-1)
            resets += len(rows)
            logits[rows] = lm.reset_rows(rows, obs["input_ids"][rows], obs["attention_mask"][rows])
        acted = ~envs.core.done.copy()  # NEXT_STEP: rows that just ended do not act next step
    assert resets >= N
