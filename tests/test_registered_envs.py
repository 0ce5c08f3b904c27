"""The registered ids on the real micro-v0 assets, as a user meets them."""

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import rlhfgym.envs  # noqa: F401  (registers the ids)
from rlhfgym.envs import assets
from rlhfgym.envs.assets import AssetError
from rlhfgym.envs.config import EnvConfig
from rlhfgym.envs.registration import ENV_IDS


@pytest.mark.parametrize("env_id", sorted(ENV_IDS))
def test_registered_env_passes_check_env(env_id):
    env = gym.make(env_id, kl_coef=0.05)
    check_env(env.unwrapped, skip_render_check=True)
    assert gym.make(f"rlhfgym.envs:{env_id}").spec.id == env_id


def test_registered_ids_use_the_default_config():
    """Every number of a registered id is EnvConfig's default; gym.make keywords override them."""
    env = gym.make("RLHF-Summarize-Gold-v0")
    assert env.unwrapped.config == EnvConfig()
    assert env.observation_space["input_ids"].shape == (128,) and env.unwrapped.kl_coef == 0.05
    assert env.unwrapped.max_new_tokens == 32 and env.unwrapped.max_prompt_tokens == 96
    env = gym.make("RLHF-Summarize-v0", kl_coef=0.1, max_new_tokens=16, device="cpu", split="test", seed=1)
    assert env.unwrapped.config == EnvConfig(kl_coef=0.1, max_new_tokens=16, split="test", seed=1)
    assert env.observation_space["input_ids"].shape == (112,)
    venv = gym.make_vec("RLHF-Summarize-Gold-v0", num_envs=2)
    assert venv.config == EnvConfig(num_envs=2) and venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP


def test_sft_policy_episode_reports_rm_gold_and_completion():
    env = gym.make("RLHF-Summarize-Gold-v0", split="test")
    obs, info = env.reset(seed=3)
    assert info["prompt"].startswith("summarize :") and info["prompt"].endswith("tl;dr :")
    ref = env.unwrapped.reference_model
    total, ref_sum, done = 0.0, 0.0, False
    while not done:  # greedy SFT policy, no cache: the plain gymnasium loop
        ids = torch.as_tensor(obs["input_ids"])[None]
        mask = torch.as_tensor(obs["attention_mask"])[None]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            action = int(ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0, -1].argmax())
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        ref_sum += info["ref_logprob"]
        done = terminated or truncated
    assert info["rm_score"] == pytest.approx(info["gold"])  # the Gold id's reward model is the gold scorer
    assert total == pytest.approx(info["rm_score"] + 0.05 * ref_sum, abs=1e-4)
    assert info["gold"] > 0  # the SFT policy writes a real summary
    assert len(info["completion"].split()) >= 5


@pytest.mark.parametrize("reward_model", ["learned", "fact"])
def test_shipped_reward_models_rank_writers_like_gold(reward_model):
    """The shipped reward models pay for what gold pays for: on test articles they rank the expert
    writer above the omitter (a key fact missing), and an episode reports their score and gold."""
    env = gym.make("RLHF-Summarize-v0", split="test", reward_model=reward_model)
    core = env.unwrapped
    task, n = core.task, 64
    prompts = core.prompts("test", n)
    expert = [task.reference("test", i, "expert") for i in range(n)]
    omitter = [task.reference("test", i, "omitter") for i in range(n)]
    r_expert, r_omitter = core.score(prompts, expert), core.score(prompts, omitter)
    assert float((r_expert > r_omitter).float().mean()) > 0.7
    assert not torch.allclose(r_expert, torch.tensor(core.gold(prompts, expert), dtype=torch.float32))
    env.reset(seed=0)
    words = core.tokenizer(expert[0].split()[:4], is_split_into_words=True, add_special_tokens=False)["input_ids"]
    for token in [*words, core.tokenizer.eos_token_id]:
        _, _, terminated, truncated, info = env.step(int(token))
    assert terminated and not truncated
    assert {"rm_score", "gold"} <= set(info) and info["rm_score"] != info["gold"]


def test_v0_pays_the_shipped_reward_model_which_meets_its_target():
    """RLHF-Summarize-v0 means: reward from the learned Bradley-Terry RM, gold only in ``info``.
    It switched to it once the shipped RM reached 90% of the labelers' Bayes ceiling; a rebuilt
    reward model below the target fails here instead of silently changing what v0 measures."""
    assert gym.spec("RLHF-Summarize-v0").kwargs["reward_model"] == "learned"
    metrics = json.loads((assets.asset_dir("micro-v0") / "feedback_metrics.json").read_text())
    assert metrics["reward"]["accuracy_over_ceiling"] >= 0.90
    v0 = gym.make("RLHF-Summarize-v0").unwrapped
    learned = gym.make("RLHF-Summarize-v0", reward_model="learned").unwrapped
    prompts = v0.prompts("test", 16)
    writers = [v0.task.reference("test", i, "expert" if i % 2 else "omitter") for i in range(16)]
    assert torch.allclose(v0.score(prompts, writers), learned.score(prompts, writers))
    assert not torch.allclose(v0.score(prompts, writers), torch.tensor(v0.gold(prompts, writers), dtype=torch.float32))


def test_aif_v0_pays_the_shipped_constitution_judge():
    """RLHF-Summarize-AIF-v0: reward P_judge(y > SFT greedy summary) - 1/2 from the shipped judge,
    gold only in ``info``; the judge prefers the expert writer to the one that omits a key fact."""
    assert gym.spec("RLHF-Summarize-AIF-v0").kwargs["reward_model"] == "judge"
    env = gym.make("RLHF-Summarize-AIF-v0").unwrapped
    prompts = env.prompts("test", 16)
    expert = [env.task.reference("test", i, "expert") for i in range(16)]
    omitter = [env.task.reference("test", i, "omitter") for i in range(16)]
    s_expert, s_omitter = env.score(prompts, expert), env.score(prompts, omitter)
    assert ((s_expert >= -0.5) & (s_expert <= 0.5)).all()
    assert (s_expert > s_omitter).float().mean() > 0.8, (s_expert, s_omitter)
    # the reference itself scores exactly 0: both answer orders are asked and averaged
    reference = env.reward_model.reference.batch(prompts[:4])
    assert torch.allclose(env.score(prompts[:4], reference), torch.zeros(4), atol=1e-6)


def test_vector_env_on_real_assets_runs_batched():
    venv = gym.make_vec("RLHF-Summarize-Gold-v0", num_envs=4)
    obs, _ = venv.reset(seed=0)
    assert isinstance(obs["input_ids"], torch.Tensor) and obs["input_ids"].shape == (4, 128)
    assert venv.metadata["torch"] is True
    ended = torch.zeros(4, dtype=torch.bool)
    for _ in range(33):
        eos = torch.full((4,), venv.unwrapped.tokenizer.eos_token_id)
        obs, reward, terminated, truncated, info = venv.step(eos)
        ended |= terminated | truncated
    assert bool(ended.all())


@pytest.fixture
def broken_assets(tmp_path, monkeypatch):
    root = tmp_path / "assets"
    shutil.copytree(assets.ASSETS_ROOT, root)
    monkeypatch.setattr(assets, "ASSETS_ROOT", root)
    assets.clear_cache()
    yield root / "micro-v0"
    assets.clear_cache()


def test_corrupted_asset_fails_make_with_a_clear_message(broken_assets):
    weights = broken_assets / "sft" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(AssetError, match=r"sft/model.safetensors.*(reinstall|build-assets)"):
        gym.make("RLHF-Summarize-Gold-v0")


def test_missing_asset_fails_make_with_a_clear_message(broken_assets):
    (broken_assets / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(AssetError, match="tokenizer/tokenizer.json"):
        gym.make("RLHF-Summarize-Gold-v0")


def test_gold_score_of_random_actions_is_low():
    env = gym.make("RLHF-Summarize-Gold-v0", split="test")
    env.reset(seed=0)
    env.action_space.seed(0)
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    assert info["gold"] < 0.2
    assert np.isfinite(info["rm_score"])
