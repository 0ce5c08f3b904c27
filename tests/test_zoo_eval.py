"""`rlhf-zoo eval`: the one evaluation protocol of a run (rlhfgym.zoo.evaluate)."""

import json
import math

import pytest

from rlhfgym.zoo.evaluate import (
    EvaluationError,
    check_protocol,
    distinct_n,
    evaluate_run,
    majority_wins,
    mean_se,
    read_run_info,
)

ENV_ID = "RLHF-Summarize-Gold-v0"


def test_mean_se_is_over_prompts_when_a_prompt_has_several_samples():
    # two prompts, two samples each: the per-prompt means are 1 and 3
    stat = mean_se([0.0, 2.0, 2.0, 4.0], groups=2)
    assert stat["mean"] == 2.0
    assert stat["se"] == pytest.approx(math.sqrt(2.0 / 2))  # var of (1, 3) = 2, over n = 2 prompts
    assert mean_se([0.0, 2.0, 2.0, 4.0])["se"] == pytest.approx(math.sqrt((4 + 0 + 0 + 4) / 3 / 4))
    assert mean_se([1.5])["se"] is None and mean_se([])["mean"] is None


def test_distinct_n_and_majority_verdicts():
    assert distinct_n(["a b a", "a b"], 1) == pytest.approx(2 / 5)
    assert distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["a", ""], 2) is None
    assert majority_wins([0.9, 0.1, 0.5, 0.5000001]) == [1.0, 0.0, 0.5, 1.0]


def test_bad_protocols_and_run_dirs_say_what_to_do(tmp_path):
    with pytest.raises(EvaluationError, match="prompts must be a positive integer"):
        check_protocol("test", 0, 1, 1.0, 0)
    with pytest.raises(EvaluationError, match="temperature"):
        check_protocol("test", 8, 1, -1.0, 0)
    with pytest.raises(EvaluationError, match="split"):
        check_protocol("dev", 8, 1, 1.0, 0)
    with pytest.raises(EvaluationError, match="no results.json; train the run first"):
        evaluate_run(tmp_path, prompts=8)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(EvaluationError, match="not valid JSON"):
        read_run_info(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"algo": "sft"}))
    with pytest.raises(EvaluationError, match="lacks"):
        read_run_info(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"algo": "sft", "env_id": ENV_ID, "seed": 0, "budget": 8}))
    with pytest.raises(EvaluationError, match="no agent/ checkpoint"):
        evaluate_run(tmp_path, prompts=8)


@pytest.fixture(scope="module")
def env():
    import gymnasium as gym

    import rlhfgym.envs  # noqa: F401

    return gym.make(ENV_ID)


@pytest.mark.slow
def test_the_sft_policy_ties_itself_and_evaluation_is_deterministic(env, tmp_path):
    """An untrained copy of π_ref samples exactly π_ref's completions (same prompts, same seed): every
    comparison is a tie, so its win rate is 1/2 by construction, and its Monte-Carlo KL is ~0."""
    from rlhfgym.agents import make
    from rlhfgym.agents.policy import CausalLMPolicy
    from rlhfgym.zoo.evaluate import evaluate_agent

    agent = make("sft")
    agent.policy = CausalLMPolicy.from_env(env)
    info = {"algo": "sft", "env_id": ENV_ID, "seed": 0, "budget": 8, "hyperparams": {}}
    first = evaluate_agent(env, agent, info, prompts=8, samples=2, progress=False, run_dir=tmp_path / "a")
    m = first["metrics"]
    assert m["win_rate_labelers"] == {"mean": 0.5, "se": 0.0}
    assert first["sft"]["win_rate_labelers"]["mean"] == 0.5
    assert m["kl"]["method"] == "monte-carlo" and abs(m["kl"]["mean"]) < 1e-4
    assert m["gold"]["mean"] == first["sft"]["gold"]["mean"]
    assert m["win_rate_judge"] is None  # the gold env has no judge
    assert m["completions"] == 16 and 0.0 <= m["eos_rate"]["mean"] <= 1.0 and m["length"]["mean"] > 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "completions.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows[:3]] == [(0, 0), (0, 1), (1, 0)] and len(rows) == 16
    assert rows[0]["gold"] == pytest.approx(max(-1.0, min(1.0, sum(rows[0]["components"].values()))))
    # the same evaluation again: the same bytes on disk
    evaluate_agent(env, agent, info, prompts=8, samples=2, progress=False, run_dir=tmp_path / "b")
    for name in ("eval.json", "completions.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # another seed samples other completions
    other = evaluate_agent(env, agent, info, prompts=8, samples=2, seed=1, progress=False)
    assert other["metrics"]["gold"]["mean"] != m["gold"]["mean"]


@pytest.mark.slow
def test_train_writes_eval_json_and_rlhf_zoo_eval_reproduces_it(tmp_path):
    from rlhfgym.zoo.train import train

    run = tmp_path / "run"
    result = train("best-of-n", ENV_ID, budget=8, seed=2, run_dir=str(run), eval_n=8, overrides={"n": 2, "batch_size": 8})
    record = json.loads((run / "eval.json").read_text())
    assert set(record) >= {"format", "algo", "env_id", "seed", "budget", "protocol", "metrics", "sft", "hyperparams",
                           "versions", "machine"}
    assert (record["algo"], record["env_id"], record["seed"], record["budget"]) == ("best-of-n", ENV_ID, 2, 8)
    protocol = {k: record["protocol"][k] for k in ("split", "prompts", "samples", "temperature", "seed")}
    assert protocol == {"split": "test", "prompts": 8, "samples": 1, "temperature": 1.0, "seed": 2}  # the run's seed
    assert record["hyperparams"]["n"] == 2
    assert set(record["versions"]) == {"rlhf-gym", "torch", "transformers", "python"}
    assert set(record["machine"]) >= {"platform", "cpu_count", "device"}
    m = record["metrics"]
    assert m["kl"] == {"mean": pytest.approx(math.log(2) - 1 / 2), "se": None, "method": "analytic"}
    for name in ("gold", "proxy", "win_rate_labelers", "length", "eos_rate"):
        assert set(m[name]) == {"mean", "se"} and m[name]["se"] >= 0
    assert 0 < m["distinct_1"] <= 1 and 0 < m["distinct_2"] <= 1
    # results.json keeps its rows, now from the same evaluation
    assert result["policy"]["gold"] == m["gold"]["mean"] and result["policy"]["kl"] == m["kl"]["mean"]
    assert result["sft"]["gold"] == record["sft"]["gold"]["mean"]
    assert json.loads((run / "results.json").read_text())["policy"] == result["policy"]
    # `rlhf-zoo eval` on the saved run (by default with the run's seed): the loaded agent (its reward
    # given back) gives the same numbers; another seed, other samples
    again = evaluate_run(run, prompts=8, progress=False)
    assert again["metrics"] == m
    other = evaluate_run(run, prompts=8, seed=0, progress=False)
    assert other["protocol"]["seed"] == 0 and other["metrics"]["gold"] != m["gold"]
    evaluate_run(run, prompts=8, progress=False)  # put the protocol's evaluation back
    assert len((run / "completions.jsonl").read_text().splitlines()) == 8
