"""Mixed precision: ``precision="bfloat16"`` runs the policy's forward passes under ``torch.autocast``
(bfloat16 matrix products) while weights, gradients and optimizer state stay float32, on every path
a policy computes on (sampling, acting through the env, teacher forcing, the value head's warm-up).
``float32``, the default, changes nothing, not even the identity of a zoo run."""

from __future__ import annotations

import contextlib
import json
import warnings

import gymnasium as gym
import pytest
import torch

import rlhfgym.agents as agents
from rlhfgym.agents.common import EnvSampler, stream_prompt_indices
from rlhfgym.agents.policy import CausalLMPolicy
from rlhfgym.envs.hf import mixed_precision, precision_dtype
from rlhfgym.envs.registration import register_envs
from rlhfgym.zoo.train import RunDirError, run_identity, start_run

register_envs()


@pytest.fixture(scope="module")
def env():
    return gym.make("RLHF-Summarize-v0", max_new_tokens=12)


@contextlib.contextmanager
def linear_output_dtypes(model: torch.nn.Module):
    """The dtypes of every ``nn.Linear`` output of ``model`` while the block runs (any thread)."""
    seen: set[torch.dtype] = set()
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
               for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def test_precision_names():
    assert precision_dtype("float32") is None and precision_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="float16 needs loss scaling.*use bfloat16"):
        precision_dtype("float16")
    assert isinstance(mixed_precision("cpu", None), contextlib.nullcontext)
    with mixed_precision("cpu", torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_a_bfloat16_policy_computes_in_bfloat16_on_float32_weights(env):
    core = env.unwrapped
    policy = CausalLMPolicy.from_env(env, value_head=True)
    prompts = [core.task.prompt("train", i) for i in range(6)]
    torch.manual_seed(0)
    roll = policy.sample(prompts)
    full, full_values = policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask, with_values=True)
    policy.autocast_dtype = torch.bfloat16
    with linear_output_dtypes(policy.model) as seen:
        half, half_values = policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask, with_values=True)
    assert seen == {torch.bfloat16}
    assert half.dtype == half_values.dtype == torch.float32  # log-softmax and the value head in float32
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert not torch.equal(half, full)  # bfloat16 rounding moved the log-probs...
    torch.testing.assert_close(half, full, atol=0.3, rtol=0)  # ...by rounding only
    torch.testing.assert_close(half_values, full_values)  # the zero-initialised value head reads either
    with linear_output_dtypes(policy.model) as seen:
        policy.sample(prompts[:2])
        policy.act({"input_ids": torch.tensor([roll.prompt_ids[0]]), "attention_mask": torch.ones(1, len(roll.prompt_ids[0]))})
    assert seen == {torch.bfloat16}


def test_bfloat16_env_rollout_draws_what_the_policy_samples(env):
    """The one sampling rule holds in bfloat16 too, with the policy reading its tokens in a second
    thread (autocast is thread-local: the sampler enters it in the thread that runs the model)."""
    core = env.unwrapped
    policy = CausalLMPolicy.from_env(env)
    policy.autocast_dtype = torch.bfloat16
    idx = stream_prompt_indices(core, 8, seed=3, position=0).repeat(2)
    prompts = [core.task.prompt("train", int(i)) for i in idx]
    sampler = EnvSampler(env, kl_coef=0.05)
    assert sampler.overlap
    torch.manual_seed(7)
    direct = policy.sample(prompts)
    torch.manual_seed(7)
    with linear_output_dtypes(policy.model) as seen:
        roll = sampler.rollout(policy, idx)
    assert seen == {torch.bfloat16}
    t = direct.tokens.shape[1]
    assert torch.equal(roll.tokens[:, :t], direct.tokens) and roll.texts == direct.texts
    torch.testing.assert_close(roll.logprobs[:, :t], direct.logprobs)
    # the env's reward (its reference and reward model) is the world's: it does not follow the agent's precision
    with torch.no_grad():
        ref = policy.forward_logprobs(direct.prompt_ids, direct.tokens, direct.mask, model=core.reference_model)
    assert not torch.equal(roll.ref_logprobs[:, :t], ref)
    policy.autocast_dtype = None
    with torch.no_grad():
        ref = policy.forward_logprobs(direct.prompt_ids, direct.tokens, direct.mask, model=core.reference_model)
    torch.testing.assert_close(roll.ref_logprobs[:, :t], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("algo, kwargs, budget", [
    ("rloo", {"batch_size": 8}, 16),
    ("ppo", {"batch_size": 8, "mini_batch_size": 4, "value_warmup_steps": 2}, 16),
    ("dpo", {"batch_size": 8}, 16),
    ("nash-md", {"batch_size": 8}, 16),
])
def test_agents_train_in_bfloat16(env, algo, kwargs, budget):
    policy = CausalLMPolicy.from_env(env)
    before = [p.detach().clone() for p in policy.model.parameters()]
    agent = agents.make(algo, policy=policy, precision="bfloat16", **kwargs)
    metrics = []
    with linear_output_dtypes(policy.model) as seen:
        agent.learn(env, budget, callback=lambda _a, m: metrics.append(m), progress_bar=False)
    assert seen == {torch.bfloat16} and agent.policy is policy and policy.autocast_dtype is torch.bfloat16
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    states = [s for s in agent.optimizer.state.values() if "exp_avg" in s]
    assert states and {s["exp_avg"].dtype for s in states} == {torch.float32}
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))  # it trained
    numbers = [v for m in metrics for v in m.values() if isinstance(v, float)]
    assert metrics and numbers and all(torch.isfinite(torch.tensor(numbers)))


def test_precision_is_checked(env):
    with pytest.raises(agents.AgentError, match="unknown precision 'float16'.*'float32', 'bfloat16'"):
        agents.make("rloo", precision="float16")
    with pytest.raises(agents.AgentError, match="sb3-ppo: precision='bfloat16' is not supported: Stable-Baselines3"):
        agents.make("sb3-ppo", precision="bfloat16")

    class Custom(agents.Agent):  # an agent without a Config gets the base class's check
        name = "custom"

        def learn(self, env, budget, callback=None):
            return self

    with pytest.raises(agents.AgentError, match="custom: precision must be one of float32, bfloat16"):
        Custom(precision="half")
    assert Custom(precision="bfloat16").config["precision"] == "bfloat16"


def test_a_saved_bfloat16_agent_loads_in_bfloat16(env, tmp_path):
    agent = agents.make("rloo", precision="bfloat16", batch_size=8)
    agent.learn(env, 8, progress_bar=False)
    loaded = agents.load(agent.save(tmp_path / "agent"))
    assert loaded.config["precision"] == "bfloat16" and loaded.policy.autocast_dtype is torch.bfloat16
    with linear_output_dtypes(loaded.policy.model) as seen:
        loaded.generate(["summarize : a b c tl;dr :"])
    assert seen == {torch.bfloat16}


def test_float32_keeps_a_runs_identity_and_bfloat16_is_another_run(tmp_path):
    common = dict(seed=0, budget=64, env_kwargs={})
    before = run_identity("rloo", "RLHF-Summarize-v0", hyperparams={"learning_rate": 1e-5}, **common)
    default = run_identity("rloo", "RLHF-Summarize-v0", hyperparams=agents.make("rloo", learning_rate=1e-5).config, **common)
    half = run_identity("rloo", "RLHF-Summarize-v0",
                        hyperparams=agents.make("rloo", learning_rate=1e-5, precision="bfloat16").config, **common)
    assert "precision" not in default["hyperparams"] and half["hyperparams"]["precision"] == "bfloat16"
    assert default["hyperparams"]["learning_rate"] == before["hyperparams"]["learning_rate"]
    assert default != half
    assert start_run(tmp_path, default, eval_n=8) is None  # a new run
    with pytest.raises(RunDirError, match=r"holds another run \(hyperparams precision='float32', not 'bfloat16'\)"):
        start_run(tmp_path, half, eval_n=8)


def test_resuming_a_checkpoint_saved_before_precision_existed(env, tmp_path):
    """Checkpoints written before the setting existed were float32: resuming one in float32 changes no
    hyperparameter (no warning), in bfloat16 it says precision changed."""
    ckpt = tmp_path / "ckpt"
    agents.make("rloo", batch_size=8).learn(env, 8, checkpoint_dir=ckpt, progress_bar=False)
    meta = json.loads((ckpt / "agent.json").read_text())
    del meta["config"]["precision"]
    (ckpt / "agent.json").write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = agents.make("rloo", batch_size=8).learn(env, 16, checkpoint_dir=ckpt, progress_bar=False)
    assert resumed.spent == 16
    with pytest.warns(UserWarning, match=r"changed hyperparameters \['precision'\]"):
        agents.make("rloo", batch_size=8, precision="bfloat16").learn(env, 24, checkpoint_dir=ckpt, progress_bar=False)
