"""Preference-family agents (agents/dpo.py, rest.py, nash_md.py) on the micro news world.

Learning tests train on the real frozen SFT policy with fixed seeds and small CPU budgets and check
each algorithm's own objective against its starting point:

* DPO / KTO: implicit-reward accuracy and DPO loss on held-out labelled pairs (gold labeler);
* ReST: mean gold reward of the policy's samples on test prompts vs the SFT policy's;
* Nash-MD: win rate (preference) of the policy's samples against the SFT policy's.

The rest checks the mixture sampler against teacher forcing, bad inputs, save/load, and that an
interrupted run resumed from its checkpoint ends exactly where the uninterrupted one does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rlhfgym.agents as agents
from rlhfgym.agents import AgentError
from rlhfgym.agents.dpo import DPO, KTO, make_preference_pairs, reference_policy
from rlhfgym.agents.nash_md import GeometricMixture, NashMD
from rlhfgym.agents.policy import CausalLMPolicy
from rlhfgym.agents.rest import ReST


class Interrupt(Exception):
    """Stands in for a crash / Ctrl-C in the middle of a run."""


@pytest.fixture(scope="module")
def env():
    import gymnasium as gym

    import rlhfgym.envs  # noqa: F401  (registers the env ids)

    return gym.make("RLHF-Summarize-Gold-v0")


@pytest.fixture(scope="module")
def pairs(env):
    """128 training pairs and 128 held-out pairs of pi_ref samples, labelled by the (noiseless) gold labeler."""
    train = make_preference_pairs(env, 128, "train", labeler_flip_prob=0.0, seed=0, start=0)
    held = make_preference_pairs(env, 128, "validation", labeler_flip_prob=0.0, seed=1, start=0)
    return train, held


def state_of(agent) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in agent.policy.state_dict().items()}


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by {worst}"


def adam_steps(agent) -> int:
    return max(int(s["step"]) for s in agent.optimizer.state_dict()["state"].values())


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_dpo_offline_raises_heldout_preference_accuracy(env, pairs, tmp_path):
    train, held = pairs
    agent = DPO(beta=0.1, learning_rate=5e-4, batch_size=16, epochs=2)
    agent.policy = CausalLMPolicy.from_env(env)
    before = agent.evaluate(env, held)
    # the policy starts as pi_ref: every implicit reward is 0, the loss is log 2
    assert before["margin"] == pytest.approx(0.0, abs=1e-4)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-4)
    losses = []
    agent.learn(env, 256, callback=lambda a, m: losses.append(m["loss"]), dataset=train,
                log_dir=str(tmp_path / "tb"), progress_bar=False)
    assert agent.spent == 256  # 128 pairs x 2 completions, paid once over 2 epochs
    assert len(losses) == 16
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2, losses
    after = agent.evaluate(env, held)
    assert after["accuracy"] >= 0.6, after
    assert after["loss"] < before["loss"] - 0.03, after
    assert after["margin"] > 0.05, after
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    # save / load round trip: same class, config, spent and weights
    agent.save(tmp_path / "dpo")
    loaded = agents.load(tmp_path / "dpo")
    assert type(loaded) is DPO and loaded.config == agent.config and loaded.spent == 256
    assert_same_weights(state_of(loaded), state_of(agent))


@pytest.mark.slow
def test_kto_raises_heldout_preference_accuracy(env, pairs):
    train, held = pairs
    agent = KTO(beta=0.1, learning_rate=2e-4, batch_size=32, epochs=2)
    losses = []
    agent.learn(env, 256, callback=lambda a, m: losses.append(m["loss"]), dataset=train, progress_bar=False)
    assert agent.spent == 256  # 256 unpaired completions
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, losses  # starts at lambda * (1 - sigmoid(0)) = 0.5
    after = agent.evaluate(env, held)
    assert after["accuracy"] >= 0.6, after
    assert after["loss"] < math.log(2) - 0.03, after
    assert after["margin"] > 0.05, after


@pytest.mark.slow
def test_rest_raises_the_reward_of_policy_samples(env):
    agent = ReST(samples_per_prompt=4, learning_rate=5e-4, batch_size=16, eval_prompts=32)
    history = []
    agent.learn(env, 240, callback=lambda a, m: history.append(m), progress_bar=False)
    assert agent.spent == 240  # 48 prompts x (1 original + 4 samples)
    grown = [m for m in history if "grow_reward" in m]
    improved = [m for m in history if "threshold" in m]
    assert len(grown) == 1 and [m["threshold"] for m in improved] == list(ReST().config["thresholds"])[: len(improved)]
    # the filtered data get better as the threshold rises
    assert improved[-1]["filtered_reward"] > improved[0]["filtered_reward"] + 0.2
    core = env.unwrapped
    prompts = core.prompts("test", 96, 0)
    torch.manual_seed(5)
    mine = agent.policy.generate_text(prompts, temperature=1.0)
    torch.manual_seed(5)
    sft = reference_policy(core).generate_text(prompts, temperature=1.0)
    gold_mine, gold_sft = np.mean(core.gold(prompts, mine)), np.mean(core.gold(prompts, sft))
    assert gold_mine > gold_sft + 0.08, (gold_mine, gold_sft)


@pytest.mark.slow
def test_nash_md_win_rate_against_sft_rises_above_half(env):
    # a decisive Bradley-Terry preference over the gold reward: sigmoid((gold(a) - gold(b)) / 0.1)
    agent = NashMD(learning_rate=2e-4, batch_size=16, preference="reward", preference_temperature=0.1)
    agent.policy = CausalLMPolicy.from_env(env)
    start = agent.win_rate(env, 96)  # pi_ref against itself (other samples)
    assert abs(start - 0.5) < 0.08, start
    history = []
    agent.learn(env, 640, callback=lambda a, m: history.append(m), progress_bar=False)
    assert agent.spent == 640 and len(history) == 20
    after = agent.win_rate(env, 96)
    assert after > 0.6 and after > start + 0.1, (start, after)


# ---------------------------------------------------------------------------------------------- mechanics


def test_nash_md_log_probs_use_the_sampling_temperature(env, monkeypatch):
    """The policy samples y at ``temperature``; the loss's log pi(y) must be that tempered policy's (as in
    PPO and REINFORCE), while log pi_ref is the env's (its step reports it) at temperature 1."""
    import rlhfgym.agents.nash_md as nash_md
    from rlhfgym.agents.common import EnvSampler

    agent = NashMD(batch_size=2, temperature=0.7, preference="reward")
    agent.policy = CausalLMPolicy.from_env(env)
    calls, rollouts, loss_refs = [], [], []
    original = agent.policy.forward_logprobs

    def spy(*args, **kwargs):
        calls.append((kwargs.get("model") is None, kwargs.get("temperature", 1.0)))
        return original(*args, **kwargs)

    rollout, loss = EnvSampler.rollout, nash_md.nash_md_loss
    monkeypatch.setattr(EnvSampler, "rollout", lambda self, *a, **k: rollouts.append(rollout(self, *a, **k)) or rollouts[-1])
    monkeypatch.setattr(nash_md, "nash_md_loss", lambda logp, ref_logp, *a: loss_refs.append(ref_logp) or loss(logp, ref_logp, *a))
    agent.policy.forward_logprobs = spy
    agent.learn(env, 4, progress_bar=False)
    assert calls == [(True, 0.7)]  # the policy's own log-probs: tempered; pi_ref's come from the env
    y = rollouts[0]  # the player's episodes (the opponent's follow)
    with torch.no_grad():
        ref = original(y.prompt_ids, y.tokens, y.mask, model=env.unwrapped.reference_model)  # untempered
    t = loss_refs[0].shape[1]
    torch.testing.assert_close(loss_refs[0], ref[:, :t], atol=1e-4, rtol=0)


def test_reference_log_probs_of_pairs_come_back_in_the_given_order(env, pairs):
    """batched_pair_logps batches pairs by prompt length; each pair still gets its own log-probs,
    the same as scoring its two completions alone."""
    from rlhfgym.agents.common import batched_pair_logps, pad_cat, sequence_logps
    from rlhfgym.agents.dpo import Pairs

    policy = CausalLMPolicy.from_env(env)
    data = Pairs.from_dataset(policy, pairs[0].select(range(12)))
    lengths = [len(p) for p in data.prompt_ids]
    assert len(set(lengths)) > 3 and lengths != sorted(lengths)  # several lengths, not in length order
    w, l = batched_pair_logps(policy, data.prompt_ids, data.chosen, data.chosen_mask, data.rejected,
                              data.rejected_mask, batch_size=5)
    with torch.no_grad():
        for i in range(12):
            alone = sequence_logps(policy, [data.prompt_ids[i]] * 2,
                                   pad_cat(data.chosen[i:i + 1], data.rejected[i:i + 1], policy.pad_id),
                                   pad_cat(data.chosen_mask[i:i + 1], data.rejected_mask[i:i + 1], 0))
            torch.testing.assert_close(torch.stack([w[i], l[i]]), alone, atol=1e-4, rtol=0)


def test_geometric_mixture_sampling_matches_teacher_forcing(env):
    """The KV-cached per-token mixture equals log_softmax((1 - b) log pi + b log pi_ref) recomputed
    from full forward passes of both models."""
    from rlhfgym.envs.hf import position_ids

    core = env.unwrapped
    policy = CausalLMPolicy.from_env(env)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # make pi differ from pi_ref
    ref, beta, v = core.reference_model, 0.3, len(policy.tokenizer)
    mix = GeometricMixture(ref, beta, policy.max_prompt_tokens + policy.max_new_tokens, v)
    torch.manual_seed(1)
    roll = policy.sample(core.prompts("validation", 4, 0), mixture=mix)
    ids, att, p = policy.batch(roll.prompt_ids, roll.tokens, roll.mask)
    with torch.no_grad():
        pos = position_ids(att)
        lp = torch.log_softmax(policy.model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, p - 1:-1, :v].float(), -1)
        lr = torch.log_softmax(ref(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, p - 1:-1, :v].float(), -1)
    expected = torch.log_softmax((1 - beta) * lp + beta * lr, -1).gather(-1, roll.tokens[..., None]).squeeze(-1) * roll.mask
    assert float((expected - roll.logprobs).abs().max()) < 1e-4
    policy_only = lp.gather(-1, roll.tokens[..., None]).squeeze(-1) * roll.mask
    assert float((policy_only - roll.logprobs).abs().max()) > 0.1  # the mixture is not the policy


def test_online_dpo_with_a_judge_and_offline_dpo_from_a_jsonl_file(env, tmp_path):
    from rlhfgym.envs.feedback.preferences import export_jsonl

    core = env.unwrapped
    calls = []

    def judge(prompts, a, b):  # a gold judge: P(a > b) = sigmoid((gold(a) - gold(b)) / 0.05)
        calls.append(len(prompts))
        return torch.sigmoid((torch.tensor(core.gold(prompts, a)) - torch.tensor(core.gold(prompts, b))) / 0.05)

    agent = DPO(online=True, pairs_per_round=3, batch_size=2, loss_type="hinge", label_smoothing=0.1)
    history = []
    agent.learn(env, 14, callback=lambda a, m: history.append(m), judge=judge, progress_bar=False)
    assert calls == [3, 3, 1] and agent.spent == 14  # rounds of 3, 3 and (what is left) 1 pair
    assert len(history) == 3 and all(math.isfinite(m["loss"]) for m in history)

    ds = make_preference_pairs(env, 4, "train", seed=3, judge=judge, soft_labels=True)
    assert all(0.5 <= p <= 1 for p in ds["label_prob"])
    export_jsonl(ds, tmp_path / "prefs.jsonl")
    offline = DPO(loss_type="ipo", batch_size=2)
    offline.learn(env, 100, dataset=str(tmp_path / "prefs.jsonl"), progress_bar=False)
    assert offline.spent == 8  # the file holds 4 pairs: the budget is not reached


def test_labelers_env_labels_pairs_with_the_envs_own_prefer(env, monkeypatch):
    """labelers="env": the env's pairwise oracle (the judge on RLHF-Summarize-AIF-v0) labels the pairs."""
    core = env.unwrapped
    calls = []

    def shorter_wins(prompts, a, b):
        calls.append(len(prompts))
        return torch.tensor([0.9 if len(x) <= len(y) else 0.2 for x, y in zip(a, b)])

    monkeypatch.setattr(core, "prefer", shorter_wins, raising=False)
    ds = make_preference_pairs(env, 6, "train", seed=3, labelers="env", soft_labels=True)
    assert calls == [6]
    assert all(len(c) <= len(r) for c, r in zip(ds["chosen"], ds["rejected"]))
    assert all(min(abs(p - 0.9), abs(p - 0.8)) < 1e-6 for p in ds["label_prob"])  # P(chosen > rejected)
    agent = DPO(labelers="env", online=True, pairs_per_round=2, batch_size=2)
    agent.learn(env, 4, progress_bar=False)
    assert calls == [6, 2] and agent.spent == 4
    monkeypatch.setattr(core, "prefer", None, raising=False)  # an env without a pairwise oracle
    with pytest.raises(AgentError, match="has no prefer"):
        make_preference_pairs(env, 2, "train", labelers="env")


def test_kto_on_an_unpaired_dataset(env):
    import datasets

    prompts = env.unwrapped.prompts("train", 3, 0)
    ds = datasets.Dataset.from_dict({
        "prompt": prompts * 2,
        "completion": [env.unwrapped.task.reference("train", i, "expert") for i in range(3)]
        + [env.unwrapped.task.reference("train", i, "inventor") for i in range(3)],
        "label": [True] * 3 + [False] * 3,
    })
    agent = KTO(batch_size=4)
    history = []
    agent.learn(env, 5, callback=lambda a, m: history.append(m), dataset=ds, progress_bar=False)
    assert agent.spent == 5 and len(history) == 2  # 5 of the 6 records, in batches of 4 and 1


def test_nash_md_preference_sources(env, monkeypatch):
    core = env.unwrapped
    prompts = core.prompts("validation", 2, 0)
    a = [core.task.reference("validation", i, "expert") for i in range(2)]
    b = [core.task.reference("validation", i, "omitter") for i in range(2)]
    # from the env's reward model: sigmoid((r(a) - r(b)) / T)
    expected = torch.sigmoid((core.score(prompts, a) - core.score(prompts, b)) / 0.2)
    from_reward = NashMD(preference="reward", preference_temperature=0.2).preference_fn(env)
    assert torch.allclose(from_reward(prompts, a, b), expected)
    labelers = NashMD(preference="labelers", labelers="intransitive").preference_fn(env)(prompts, a, b)
    assert labelers.shape == (2,) and bool(((labelers >= 0) & (labelers <= 1)).all())

    monkeypatch.setattr(core, "prefer", None, raising=False)  # an env without a pairwise oracle
    with pytest.raises(AgentError, match="no prefer"):
        NashMD(preference="env").preference_fn(env)
    with pytest.raises(AgentError, match="no prefer.*preference='reward'"):  # the default: no silent fallback
        NashMD().preference_fn(env)
    assert torch.allclose(NashMD(preference="reward", preference_temperature=0.2).preference_fn(env)(prompts, a, b), expected)

    def oracle(p, x, y):
        return torch.full((len(p),), 0.75)

    monkeypatch.setattr(core, "prefer", oracle)
    assert NashMD().preference_fn(env) is oracle  # the default "env": the env's own oracle
    with pytest.warns(DeprecationWarning, match="preference='auto' is deprecated"):
        auto = NashMD(preference="auto")  # the former default: an alias of "env" for one release
    assert auto.config["preference"] == "env" and auto.preference_fn(env) is oracle
    assert NashMD(preference="reward").preference_fn(env) is not oracle

    def mine(p, x, y):
        return torch.full((len(p),), 0.25)

    assert NashMD().preference_fn(env, mine) is mine  # an explicit preference wins over everything
    with pytest.raises(AgentError, match="probabilities"):
        NashMD().learn(env, 4, preference=lambda p, x, y: torch.full((len(p),), 2.0), progress_bar=False)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (DPO, {"beta": 0.0}, "beta"),
        (DPO, {"beta": -1.0}, "beta"),
        (DPO, {"loss_type": "squared"}, "unknown loss_type"),
        (DPO, {"label_smoothing": 0.5}, "label_smoothing"),
        (DPO, {"labelers": "nobody"}, "unknown labelers"),
        (DPO, {"batch_size": 0}, "batch_size"),
        (KTO, {"beta": 0}, "beta"),
        (KTO, {"desirable_weight": -1.0}, "desirable_weight"),
        (ReST, {"thresholds": [0.0, 0.9, 0.8]}, "strictly increasing"),
        (ReST, {"thresholds": [0.0, 1.5]}, "threshold"),
        (ReST, {"thresholds": []}, "at least one"),
        (ReST, {"threshold_mode": "relative"}, "threshold_mode"),
        (ReST, {"lr_decay": 1.5}, "lr_decay"),
        (ReST, {"reward_range": [1.0, -1.0]}, "reward_range"),
        (NashMD, {"mixture_coef": 1.5}, "mixture_coef"),
        (NashMD, {"mixture_coef": -0.1}, "mixture_coef"),
        (NashMD, {"opponent": "future"}, "unknown opponent"),
        (NashMD, {"ema_decay": 1.0}, "ema_decay"),
        (NashMD, {"kl_coef": -0.1}, "kl_coef"),
        (NashMD, {"preference": "best"}, "unknown preference"),
    ],
)
def test_hyperparameters_out_of_range_raise(cls, kwargs, match):
    with pytest.raises(AgentError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("name", ["dpo", "kto", "rest", "nash-md"])
def test_bad_budget_and_mismatched_policy_raise(env, name, tiny_lm, tiny_tokenizer):
    with pytest.raises(AgentError, match="budget must be a positive"):
        agents.make(name).learn(env, 0)
    foreign = CausalLMPolicy(tiny_lm, tiny_tokenizer)
    with pytest.raises(AgentError, match="tokenizer"):
        agents.make(name, policy=foreign).learn(env, 64, progress_bar=False)
    with pytest.raises(AgentError, match="budget of 1|cannot buy|does not cover"):
        agents.make(name).learn(env, 1, progress_bar=False)


@pytest.mark.parametrize("name, kwargs", [
    ("dpo", {"beta": 0.3, "loss_type": "ipo", "online": True}),
    ("kto", {"desirable_weight": 1.2}),
    ("rest", {"thresholds": [0.1, 0.5], "threshold_mode": "quantile", "reward_range": [-2, 2]}),
    ("nash-md", {"mixture_coef": 0.5, "opponent": "ema"}),
])
def test_config_round_trip_through_save_and_load(name, kwargs, tmp_path):
    agent = agents.make(name, seed=7, **kwargs)
    agent.save(tmp_path / name)
    loaded = agents.load(tmp_path / name)
    assert type(loaded) is type(agent) and loaded.config == agent.config and loaded.seed == 7


# ---------------------------------------------------------------------------------------------- resume


def _interrupt_after(n_updates: int):
    seen = []

    def callback(agent, metrics):
        seen.append(metrics)
        if len(seen) == n_updates:
            raise Interrupt

    return callback


@pytest.mark.slow
def test_dpo_resumes_where_it_was_interrupted(env, pairs, tmp_path):
    train = pairs[0].select(range(24))
    kw = dict(learning_rate=5e-4, batch_size=8, epochs=2)
    full = DPO(**kw)
    full.learn(env, 48, dataset=train, progress_bar=False)

    ckpt = tmp_path / "ckpt"
    crashed = DPO(**kw)
    with pytest.raises(Interrupt):
        crashed.learn(env, 48, _interrupt_after(4), dataset=train, checkpoint_dir=ckpt, checkpoint_every=16,
                      progress_bar=False)
    assert agents.load(ckpt).spent == 48  # checkpointed after the 3 updates of the first epoch

    resumed = DPO(**kw)
    resumed.learn(env, 48, dataset=train, checkpoint_dir=ckpt, progress_bar=False)
    assert resumed.spent == 48 and adam_steps(resumed) == adam_steps(full) == 6
    assert_same_weights(state_of(resumed), state_of(full))


@pytest.mark.slow
def test_nash_md_resumes_with_its_opponent_pool(env, tmp_path):
    kw = dict(learning_rate=2e-4, batch_size=4, opponent="past", snapshot_every=1, n_snapshots=2)
    full = NashMD(**kw)
    full.learn(env, 32, progress_bar=False)

    ckpt = tmp_path / "ckpt"
    crashed = NashMD(**kw)
    with pytest.raises(Interrupt):
        crashed.learn(env, 32, _interrupt_after(3), checkpoint_dir=ckpt, checkpoint_every=8, progress_bar=False)
    assert agents.load(ckpt).spent == 24

    resumed = NashMD(**kw)
    resumed.learn(env, 32, checkpoint_dir=ckpt, progress_bar=False)
    assert resumed.spent == 32 and adam_steps(resumed) == 4
    assert len(resumed.trainer_state["snapshots"]) == 2
    assert_same_weights(state_of(resumed), state_of(full))


@pytest.mark.slow
def test_rest_resumes_inside_its_improve_steps(env, tmp_path):
    kw = dict(samples_per_prompt=2, prompts_per_grow=8, thresholds=[0.0, 0.7], eval_prompts=8, batch_size=8,
              learning_rate=5e-4, grow_steps=2)
    full = ReST(**kw)
    full.learn(env, 40, progress_bar=False)
    assert full.spent == 40  # 8 originals (once) + 2 Grow steps x 8 prompts x 2 samples

    ckpt = tmp_path / "ckpt"
    crashed = ReST(**kw)
    seen = []

    def crash_in_second_grow(agent, metrics):
        seen.append(metrics)
        if sum("grow_reward" in m for m in seen) == 2 and "loss" in metrics:
            raise Interrupt

    with pytest.raises(Interrupt):
        crashed.learn(env, 40, crash_in_second_grow, checkpoint_dir=ckpt, checkpoint_every=1, progress_bar=False)
    assert agents.load(ckpt).spent == 40  # the second Grow set was sampled and checkpointed

    resumed = ReST(**kw)
    resumed.learn(env, 40, checkpoint_dir=ckpt, progress_bar=False)
    assert resumed.spent == 40
    assert_same_weights(state_of(resumed), state_of(full))
