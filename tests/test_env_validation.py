"""Bad input to the token-level envs fails at once with one clear error naming the parameter and
the fix; the settings live in one validated EnvConfig; the single, vector and SB3 views share one
set of sequence-level accessors; prompts and completions follow the one text<->token convention."""

from __future__ import annotations

import dataclasses
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded

import rlhfgym.envs  # noqa: F401  (registers the ids)
from rlhfgym.envs.config import EnvConfig
from rlhfgym.envs.core import SequenceAccess
from rlhfgym.envs.lm import encode_completions, encode_prompts
from rlhfgym.envs.registration import ENV_IDS
from rlhfgym.envs.rewards import GoldReward, RewardFunction
from rlhfgym.envs.token_env import TokenMDPEnv
from rlhfgym.envs.vector_env import TokenMDPVectorEnv

GOLD_ID = "RLHF-Summarize-Gold-v0"


@pytest.fixture
def make_env(toy_task, tiny_tokenizer, tiny_lm):
    def make(vector: bool = False, reward=None, **settings):
        if "config" not in settings:  # keywords override a config: keep its values
            settings.setdefault("max_new_tokens", 4)
            settings.setdefault("max_prompt_tokens", 32)
        cls = TokenMDPVectorEnv if vector else TokenMDPEnv
        return cls(toy_task, tiny_tokenizer, tiny_lm, reward or GoldReward(toy_task), **settings)

    return make


@pytest.fixture
def tiny_kwargs(toy_task, tiny_lm_dir):
    """gym.make keywords for the registered ids on the offline toy task and tiny model."""
    return dict(reference=str(tiny_lm_dir), task=toy_task, max_new_tokens=4, max_prompt_tokens=32)


# ---------------------------------------------------------------------------------- EnvConfig
def test_config_defaults_are_the_registered_ids_defaults():
    c = EnvConfig()
    assert (c.split, c.kl_coef, c.max_new_tokens, c.max_prompt_tokens, c.device) == ("train", 0.05, 32, 96, "cpu")
    assert (c.seed, c.compute_ref, c.num_envs, c.autoreset_mode) == (None, None, 1, None)
    assert c.window == 128
    for env_id in ENV_IDS:  # the spec kwargs only choose the reward model; every number is EnvConfig's default
        assert set(gym.spec(env_id).kwargs) == {"reward_model"}


@pytest.mark.parametrize("value", [-1, -1e-9, "a", None, True, float("nan"), float("inf"), [0.1]])
def test_kl_coef_must_be_a_finite_number_at_least_zero(value):
    with pytest.raises(ValueError, match=r"kl_coef must be a finite number >= 0"):
        EnvConfig(kl_coef=value)


def test_kl_coef_accepts_ints_and_numpy_floats():
    assert EnvConfig(kl_coef=0).kl_coef == 0.0 and type(EnvConfig(kl_coef=np.float32(0.5)).kl_coef) is float


@pytest.mark.parametrize("name", ["max_new_tokens", "max_prompt_tokens", "num_envs"])
@pytest.mark.parametrize("value", [1.9, 2.0, "32", True, 0, -3, None])
def test_int_settings_must_be_ints_at_least_one(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be an int >= 1"):
        EnvConfig(**{name: value})


def test_int_settings_accept_numpy_ints():
    c = EnvConfig(max_new_tokens=np.int64(8), num_envs=np.int32(3))
    assert (c.max_new_tokens, c.num_envs) == (8, 3) and type(c.max_new_tokens) is int


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"seed": "1"}, "seed must be an int >= 0"),
        ({"compute_ref": "yes"}, "compute_ref must be True, False or None"),
        ({"autoreset_mode": "sometimes"}, "unknown autoreset_mode 'sometimes'"),
        ({"split": 0}, "split must be a str"),
        ({"device": "gpu0"}, "unknown device 'gpu0'"),
    ],
)
def test_other_settings_are_validated(settings, match):
    with pytest.raises(ValueError, match=match):
        EnvConfig(**settings)


def test_config_is_frozen_and_replace_revalidates():
    c = EnvConfig(autoreset_mode="same_step")
    assert c.autoreset_mode == gym.vector.AutoresetMode.SAME_STEP
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.kl_coef = -1
    with pytest.raises(ValueError, match="kl_coef"):
        dataclasses.replace(c, kl_coef=-1)


def test_unknown_keywords_name_the_closest_valid_one(make_env, tiny_kwargs):
    with pytest.raises(ValueError, match=r"unknown keyword argument\(s\) 'kl_coeff' \(did you mean 'kl_coef'\?\)"):
        gym.make(GOLD_ID, kl_coeff=0.1, **tiny_kwargs)
    with pytest.raises(ValueError, match=r"'num_env' \(did you mean 'num_envs'\?\)"):
        gym.make_vec(GOLD_ID, num_envs=2, num_env=2, **tiny_kwargs)
    with pytest.raises(ValueError, match=r"'refrence' \(did you mean 'reference'\?\)"):
        gym.make(GOLD_ID, refrence="x", task=tiny_kwargs["task"])
    with pytest.raises(ValueError, match=r"TokenMDPEnv got unknown.*'max_new_token' \(did you mean 'max_new_tokens'\?\)"):
        make_env(max_new_token=3)
    with pytest.raises(ValueError, match=r"configure vector envs; use gym.make_vec"):
        gym.make(GOLD_ID, num_envs=2, **tiny_kwargs)


def test_env_settings_reach_the_config_through_every_door(make_env, tiny_kwargs):
    env = gym.make(GOLD_ID, config=EnvConfig(kl_coef=0.2, seed=3), **tiny_kwargs)
    assert env.unwrapped.config == EnvConfig(kl_coef=0.2, seed=3, max_new_tokens=4, max_prompt_tokens=32)
    assert env.unwrapped.kl_coef == 0.2 and env.observation_space["input_ids"].shape == (36,)
    venv = gym.make_vec(GOLD_ID, num_envs=3, kl_coef=0.0, **tiny_kwargs)
    assert venv.config.num_envs == 3 and venv.kl_coef == 0.0 and venv.core.ref_lm is None
    direct = make_env(config=EnvConfig(split="test", max_new_tokens=7))
    assert direct.config.split == "test" and direct.max_new_tokens == 7 and direct.max_prompt_tokens == 96
    overridden = make_env(config=EnvConfig(split="test", max_new_tokens=7), max_new_tokens=5)
    assert overridden.max_new_tokens == 5 and overridden.config.split == "test"
    with pytest.raises(ValueError, match="config must be an rlhfgym.envs.config.EnvConfig"):
        make_env(config={"kl_coef": 0.1})


@pytest.mark.parametrize("kwargs", [{"kl_coef": -1}, {"max_new_tokens": 1.9}, {"max_new_tokens": "32"}])
def test_gym_make_rejects_bad_settings_before_loading(kwargs):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        gym.make(GOLD_ID, **kwargs)  # the real micro assets: nothing may be loaded first
    assert time.perf_counter() - t0 < 2.0


def test_window_must_fit_the_reference_models_positions(make_env):
    with pytest.raises(ValueError, match=r"32 \+ 300 = 332 exceeds the reference model's max_position_embeddings \(256\).*at most 224"):
        make_env(max_new_tokens=300)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make_env(max_new_tokens=10**6)  # refused before any (N, W) buffer or KV cache is allocated
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(ValueError, match="lower max_prompt_tokens below 256"):
        make_env(max_prompt_tokens=300)
    make_env(max_prompt_tokens=200, max_new_tokens=56)  # exactly 256 fits


def test_window_check_on_the_micro_model():
    with pytest.raises(ValueError, match=r"96 \+ 300 = 396 exceeds.*max_position_embeddings \(256\)"):
        gym.make(GOLD_ID, max_new_tokens=300)


# ---------------------------------------------------------------------------------- make_vec
@pytest.mark.parametrize("num_envs", [2.5, "2", 0, True])
def test_make_vec_num_envs_must_be_an_int(num_envs, tiny_kwargs):
    with pytest.raises(ValueError, match="num_envs must be an int >= 1"):
        gym.make_vec(GOLD_ID, num_envs=num_envs, **tiny_kwargs)


@pytest.mark.timeout(60)
def test_make_vec_async_is_refused_at_once(tiny_kwargs):
    t0 = time.perf_counter()
    with pytest.raises(gym.error.Error, match=r"natively batched.*vectorization_mode='async'.*gym.make_vec\(id, num_envs=N\)"):
        gym.make_vec(GOLD_ID, num_envs=2, vectorization_mode="async", **tiny_kwargs)
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.timeout(60)
def test_make_vec_async_is_refused_before_loading_the_micro_assets():
    t0 = time.perf_counter()
    with pytest.raises(gym.error.Error, match="vectorization_mode='async'"):
        gym.make_vec("RLHF-Summarize-v0", num_envs=2, vectorization_mode="async")
    assert time.perf_counter() - t0 < 5.0


def test_make_vec_sync_still_builds_copies(tiny_kwargs):
    venv = gym.make_vec(GOLD_ID, num_envs=2, vectorization_mode="sync", **tiny_kwargs)
    obs, _ = venv.reset(seed=0)
    assert obs["input_ids"].shape == (2, 36)
    venv.close()


# ---------------------------------------------------------------------------------- reference loading
@pytest.mark.parametrize("path", ["/nonexistent/model", "./missing-model", "../missing/model", "~/missing-rlhf-model"])
def test_missing_local_reference_says_no_such_directory(path, toy_task):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"reference=.*no such directory"):
        gym.make(GOLD_ID, reference=path, task=toy_task)
    assert time.perf_counter() - t0 < 5.0


def test_missing_local_tokenizer_says_no_such_directory(toy_task, tiny_lm):
    with pytest.raises(ValueError, match=r"tokenizer='/nonexistent/tok'.*no such directory"):
        gym.make(GOLD_ID, reference=tiny_lm, tokenizer="/nonexistent/tok", task=toy_task)


def test_uncached_hub_reference_fails_at_once_when_offline(monkeypatch, toy_task):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"reference='org/x' is not in the local Hugging Face cache and the hub is offline"):
        gym.make(GOLD_ID, reference="org/x", task=toy_task)
    assert time.perf_counter() - t0 < 5.0


def test_existing_directory_reference_loads(tiny_kwargs):
    env = gym.make(GOLD_ID, **tiny_kwargs)
    assert isinstance(env.unwrapped.reference_model, torch.nn.Module)


# ---------------------------------------------------------------------------------- score / gold / prefer
def test_score_and_gold_refuse_a_single_string(make_env):
    env = make_env()
    with pytest.raises(ValueError, match="prompts must be a list of str, got a single str"):
        env.score("ab", "cd")
    with pytest.raises(ValueError, match="prompts must be a list of str, got a single str"):
        env.gold("ab", "cd")
    with pytest.raises(ValueError, match="completions must be a list of str, got a single str"):
        env.score(["ab"], "cd")


def test_empty_batch_scores_to_an_empty_tensor(make_env):
    env = make_env()
    scores = env.score([], [])
    assert isinstance(scores, torch.Tensor) and scores.shape == (0,) and scores.dtype == torch.float32
    assert env.gold([], []) == []
    assert env.prefer([], [], []).shape == (0,)


def test_score_and_gold_name_bad_items_generators_and_lengths(make_env, toy_task):
    env = make_env()
    prompts = toy_task.prompts("test", 3)
    with pytest.raises(ValueError, match=r"completions\[0\] is int 1, not str"):
        env.gold(prompts, [1, 2, 3])
    with pytest.raises(ValueError, match=r"completions\[1\] is NoneType"):
        env.score(prompts, ["ana", None, "ben"])
    with pytest.raises(ValueError, match="prompts must be a list of str, got generator; pass list"):
        env.score((p for p in prompts), ["a", "b", "c"])
    with pytest.raises(ValueError, match="got 3 prompts but 2 completions"):
        env.score(prompts, ["a", "b"])
    with pytest.raises(ValueError, match="got 3 prompts but 1 b"):
        env.prefer(prompts, ["a", "b", "c"], ["a"])
    with pytest.raises(ValueError, match=r"toy.gold: completions\[0\] is int"):
        toy_task.gold(prompts, [1, 2, 3])  # the task checks its own input too
    assert env.score(tuple(prompts), np.array(["ana", "ben", "cai"])).shape == (3,)


class _Broken:
    """A reward function that returns what it is told to."""

    def __init__(self, value):
        self.value = value

    def score(self, prompts, completions):
        return self.value(len(prompts))

    def __repr__(self) -> str:
        return "BrokenRM()"


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (lambda n: torch.full((n,), float("nan")), r"BrokenRM\(\).score\(\) returned a non-finite score \(nan\)"),
        (lambda n: ["good"] * n, r"BrokenRM\(\).score\(\) returned list .* must return a float tensor"),
        (lambda n: torch.zeros(n, 2), r"BrokenRM\(\).score\(\) returned shape \(1, 2\)"),
    ],
)
def test_bad_reward_output_is_refused_naming_the_reward_model(make_env, toy_task, value, match):
    env = make_env(reward=_Broken(value))
    with pytest.raises(ValueError, match=match):
        env.score(toy_task.prompts("test", 1), ["ana"])
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):  # and never reaches a reward
        env.step(env.unwrapped.tokenizer.eos_token_id)


def test_reward_function_is_the_slot_interface_and_the_old_name_warns():
    assert isinstance(GoldReward.__new__(GoldReward), RewardFunction)
    import rlhfgym.envs.rewards as rewards

    with pytest.warns(DeprecationWarning, match="RewardModel moved to rlhfgym.envs.rewards.RewardFunction"):
        old = rewards.RewardModel
    assert old is RewardFunction
    with pytest.raises(AttributeError):
        rewards.NoSuchName  # noqa: B018


# ---------------------------------------------------------------------------------- prompts / reset / step
@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("test", -1), r"n must be an int >= 0 \(or None"),
        (("test", 1.5), "n must be an int >= 0"),
        (("test", "2"), "n must be an int >= 0"),
        (("test", 1, 10**7), r"start must be in \[0, split_size\) = \[0, 8\)"),
        (("test", 1, -1), r"start must be in \[0, split_size\)"),
        (("test", None, 8), r"start must be in \[0, split_size\)"),
        (("test", 4, 6), r"prompts \[6, 10\) run past the end of split 'test' of size 8; ask for at most 2"),
    ],
)
def test_prompts_arguments(make_env, args, match):
    with pytest.raises(ValueError, match=match):
        make_env().prompts(*args)


def test_prompts_valid_ranges(make_env, toy_task):
    env = make_env()
    assert env.prompts("test", 0) == [] and len(env.prompts("test")) == 8
    assert env.prompts("test", 2, 6) == [toy_task.prompt("test", i) for i in (6, 7)]


@pytest.mark.parametrize("index", ["a", 1.5, [1, 2], True, -1.0])
def test_reset_prompt_index_names_the_option_and_range(make_env, index):
    env = make_env()
    with pytest.raises(ValueError, match=r"reset option prompt_index must be an int in \[0, 24\) for split 'train'"):
        env.reset(options={"prompt_index": index})
    _, info = env.reset(options={"prompt_index": np.int64(23)})
    assert info["prompt_index"] == 23


def test_bad_reset_leaves_the_env_as_it_was(make_env):
    venv = make_env(vector=True, num_envs=2)
    venv.reset(options={"prompt_index": [3, 4]})
    with pytest.raises(ValueError, match=r"outside split 'test' of size 8"):
        venv.reset(options={"split": "test", "prompt_index": 9})
    assert venv.core.split == "train"
    with pytest.raises(ValueError, match="a sequence of 2 such ints"):
        venv.reset(options={"prompt_index": [1, 2, 3]})
    with pytest.raises(ValueError, match="reset seed must be an int >= 0"):
        venv.reset(seed="x")
    with pytest.raises(ValueError, match="reset options must be a dict"):
        venv.reset(options=[("prompt_index", 1)])


def test_single_env_takes_one_action(make_env):
    env = make_env()
    env.reset(seed=0)
    V = env.action_space.n
    with pytest.raises(ValueError, match=rf"the single env takes one action \(an int token id in \[0, {V}\)\)"):
        env.step(np.array([1, 2]))
    env.step(np.array([7]))  # one action, however it is wrapped
    env.step(np.int64(8))


def test_existing_errors_stay(make_env):
    env = make_env()
    with pytest.raises(ResetNeeded, match="before reset"):
        env.step(1)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="out of range"):
        env.step(env.action_space.n)
    for _ in range(4):
        *_, truncated, _ = env.step(7)
    assert truncated
    with pytest.raises(ResetNeeded, match="after the episode ended"):
        env.step(7)


# ---------------------------------------------------------------------------------- one accessor set
def test_single_vector_and_sb3_views_share_one_accessor_set(tiny_kwargs):
    from rlhfgym.envs.sb3 import SB3VecEnv, make_sb3_vec_env

    single = gym.make(GOLD_ID, kl_coef=0.1, **tiny_kwargs).unwrapped
    vector = gym.make_vec(GOLD_ID, num_envs=2, kl_coef=0.1, **tiny_kwargs)
    sb3 = make_sb3_vec_env(GOLD_ID, num_envs=2, kl_coef=0.1, **tiny_kwargs)
    views = (single, vector, sb3)
    names = set(SequenceAccess.SEQUENCE_ACCESS)
    assert {"prompts", "score", "gold", "prefer", "tokenizer", "reference_model", "task", "max_new_tokens", "config"} <= names
    for view in views:
        assert isinstance(view, SequenceAccess)
        assert all(hasattr(view, n) for n in names), type(view)
    public = [{n for n in dir(type(v)) if n in names} for v in (single, vector, sb3)]
    assert public[0] == public[1] == public[2] == names
    assert isinstance(sb3, SB3VecEnv)

    prompts = single.prompts("validation", 3, 1)
    comps = ["ana bought 3", "ben", "cai sold 2 boats in oslo ."]
    for view in views[1:]:
        assert view.task is single.task and view.tokenizer is not None
        assert view.prompts("validation", 3, 1) == prompts
        assert torch.equal(view.score(prompts, comps), single.score(prompts, comps))
        assert view.gold(prompts, comps) == single.gold(prompts, comps)
        assert torch.equal(view.prefer(prompts, comps, comps[::-1]), single.prefer(prompts, comps, comps[::-1]))
        assert (view.max_new_tokens, view.max_prompt_tokens, view.kl_coef) == (4, 32, 0.1)
        assert view.device == single.device
        assert type(view.reference_model) is type(single.reference_model)
        shared = {f: getattr(view.config, f) for f in EnvConfig.field_names() if f not in ("num_envs", "autoreset_mode")}
        assert shared == {f: getattr(single.config, f) for f in shared}
    assert (single.config.num_envs, vector.config.num_envs, sb3.config.num_envs) == (1, 2, 2)
    assert sb3.config.autoreset_mode == gym.vector.AutoresetMode.SAME_STEP


# ---------------------------------------------------------------------------------- text <-> tokens
@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory):
    """A hub-style tokenizer whose post-processor prepends "<bos>", and a tiny random Llama, saved
    together with save_pretrained (as a downloaded checkpoint would be)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from conftest import TOY_VOCAB, make_tiny_llama

    vocab = [*TOY_VOCAB, "<bos>"]
    bos = vocab.index("<bos>")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("bos_model")
    fast.save_pretrained(path)
    model = make_tiny_llama(len(fast), pad_id=fast.pad_token_id, eos_id=fast.eos_token_id)
    model.config.bos_token_id = bos
    model.save_pretrained(path)
    return path


def test_prompt_gets_bos_and_completion_text_round_trips(bos_model_dir, toy_task):
    env = gym.make(GOLD_ID, reference=str(bos_model_dir), task=toy_task, max_new_tokens=8, max_prompt_tokens=40)
    tok = env.unwrapped.tokenizer
    bos = tok.bos_token_id
    assert tok("ana")["input_ids"][0] == bos  # the tokenizer adds BOS itself (a hub-style post-processor)

    obs, info = env.reset(seed=0)
    prompt_ids = obs["input_ids"][obs["attention_mask"] == 1].tolist()
    assert prompt_ids[0] == bos and prompt_ids == encode_prompts(tok, [info["prompt"]])[0]

    text = "ana bought 3 boats in oslo ."
    actions = encode_completions(tok, [text])[0]
    assert bos not in actions and len(actions) == 7
    for a in [*actions, tok.eos_token_id]:
        obs, reward, terminated, truncated, info = env.step(a)
    assert terminated and not truncated
    assert info["completion"] == text  # no "<bos>", no "<eos>", spacing exactly as written
    assert info["rm_score"] == pytest.approx(toy_task.gold_one(env.unwrapped.core.prompt_text[0], text))
