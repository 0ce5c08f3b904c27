"""What only a GPU runs: the CUDA-graph step of ``IncrementalLM`` (float32 and bfloat16 autocast), the
token env, the agents' env rollouts and their training on ``cuda``.

Skipped where there is no CUDA device (CI has none); ``docs/results/gpu/run.sh`` runs this file first
on the device machine. ``RLHFGYM_TEST_DEVICE=cpu python -m pytest tests/test_gpu.py`` runs the tests
that do not need CUDA graphs on the CPU, to check the tests themselves.
"""

from __future__ import annotations

import os

import gymnasium as gym
import pytest
import torch

import rlhfgym.agents as agents
from rlhfgym.agents.common import EnvSampler, stream_prompt_indices
from rlhfgym.agents.policy import CausalLMPolicy
from rlhfgym.envs.hf import mixed_precision
from rlhfgym.envs.lm import IncrementalLM, IncrementalLMPool
from rlhfgym.envs.registration import register_envs

register_envs()

DEVICE = os.environ.get("RLHFGYM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device: these tests are for GPU machines (docs/results/gpu/run.sh)")
needs_cuda = pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA graphs need a CUDA device")
PRECISIONS = [None, torch.bfloat16]


@pytest.fixture(scope="module")
def env():
    return gym.make("RLHF-Summarize-v0", max_new_tokens=12, device=DEVICE)


@needs_cuda
@pytest.mark.parametrize("dtype", PRECISIONS, ids=["float32", "bfloat16"])
def test_the_cuda_graph_step_gives_the_eager_steps_logits(env, dtype):
    core = env.unwrapped
    model = core.reference_model
    prompts = [core.task.prompt("train", i) for i in range(8)]
    ids = [core.tokenizer(p)["input_ids"][-64:] for p in prompts]
    torch.manual_seed(0)
    tokens = torch.randint(0, len(core.tokenizer), (6, 8), device=DEVICE)
    out = {}
    for graph in (False, True):
        with mixed_precision(DEVICE, dtype, cache=False):
            lm = IncrementalLM(model, 8, 96, backend="static", cuda_graph=graph)
            steps = [lm.reset_rows(range(8), ids)]
            for t in range(6):
                if t == 3:  # restart two rows mid-way: the captured graph reads the rewritten ring
                    lm.reset_rows([1, 5], [ids[0], ids[2]])
                steps.append(lm.step(tokens[t], active=torch.arange(8, device=DEVICE) != 7))
        assert (lm._graph is not None) == graph
        out[graph] = torch.stack(steps).float()
    tol = 1e-3 if dtype is None else 5e-2
    torch.testing.assert_close(out[True], out[False], atol=tol, rtol=0)


@needs_cuda
@pytest.mark.parametrize("dtype", PRECISIONS, ids=["float32", "bfloat16"])
def test_a_pooled_graph_is_replayed_again_and_reads_weights_updated_in_place(env, dtype):
    """What the agents' rollouts rely on (IncrementalLMPool): one capture per batch shape, replayed in
    later rollouts after optimizer.step() changed the weights in place, gives the eager step's logits."""
    core = env.unwrapped
    model = CausalLMPolicy.from_env(env, device=DEVICE).model.eval()
    ids = [core.tokenizer(core.task.prompt("train", i))["input_ids"][-64:] for i in range(8)]
    tokens = torch.randint(0, len(core.tokenizer), (4, 8), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    pool = IncrementalLMPool()

    def decode(lm):
        steps = [lm.reset_rows(range(8), ids)]
        steps += [lm.step(tokens[t]) for t in range(4)]
        return torch.stack(steps).float()

    with mixed_precision(DEVICE, dtype, cache=False):
        lm = pool.get(model, 8, 96)
        decode(lm)
        graph = lm._graph
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        optimizer.step()
        assert pool.get(model, 8, 96) is lm
        replayed = decode(lm)
        assert graph is not None and lm._graph is graph  # not captured again
        eager = decode(IncrementalLM(model, 8, 96, backend="static", cuda_graph=False))
    tol = 1e-3 if dtype is None else 5e-2
    torch.testing.assert_close(replayed, eager, atol=tol, rtol=0)


def test_the_vector_env_runs_on_the_device():
    vec = gym.make_vec("RLHF-Summarize-v0", num_envs=16, max_new_tokens=8, device=DEVICE)
    obs, _ = vec.reset(seed=0)
    assert obs["input_ids"].device.type == torch.device(DEVICE).type
    ended = torch.zeros(16, dtype=torch.bool, device=DEVICE)
    for _ in range(8):
        actions = torch.randint(0, vec.single_action_space.n, (16,), device=DEVICE)
        obs, reward, terminated, truncated, info = vec.step(actions)
        assert reward.device == actions.device and torch.isfinite(reward).all()
        ended |= terminated | truncated
    assert bool(ended.all())


@pytest.mark.parametrize("dtype", PRECISIONS, ids=["float32", "bfloat16"])
def test_env_rollout_draws_what_the_policy_samples(env, dtype):
    core = env.unwrapped
    policy = CausalLMPolicy.from_env(env, device=DEVICE)
    policy.autocast_dtype = dtype
    idx = stream_prompt_indices(core, 8, seed=3, position=0).repeat(2)
    prompts = [core.task.prompt("train", int(i)) for i in idx]
    sampler = EnvSampler(env, kl_coef=0.05, device=DEVICE)
    torch.manual_seed(7)
    direct = policy.sample(prompts)
    torch.manual_seed(7)
    roll = sampler.rollout(policy, idx)
    t = direct.tokens.shape[1]
    assert torch.equal(roll.tokens[:, :t], direct.tokens) and roll.texts == direct.texts
    torch.testing.assert_close(roll.logprobs[:, :t], direct.logprobs)
    assert torch.isfinite(roll.scores).all() and torch.isfinite(roll.ref_logprobs).all()


@pytest.mark.parametrize("algo, kwargs", [
    ("rloo", {"batch_size": 16}),
    ("ppo", {"batch_size": 16, "mini_batch_size": 8, "value_warmup_steps": 2}),
    ("dpo", {"batch_size": 8}),
])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_agents_train_on_the_device(env, algo, kwargs, precision):
    agent = agents.make(algo, device=DEVICE, precision=precision, **kwargs)
    metrics = []
    agent.learn(env, 32, callback=lambda _a, m: metrics.append(m), progress_bar=False)
    params = list(agent.policy.parameters())
    assert {p.device.type for p in params} == {torch.device(DEVICE).type} and {p.dtype for p in params} == {torch.float32}
    numbers = torch.tensor([v for m in metrics for v in m.values() if isinstance(v, float)])
    assert len(metrics) >= 2 and torch.isfinite(numbers).all()
    assert agent.generate(["summarize : a b c tl;dr :"])  # the trained policy samples
