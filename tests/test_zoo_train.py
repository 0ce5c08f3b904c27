"""`rlhf-zoo train` end to end on built-in agents whose evaluation differs from plain sampling."""

import json
import math

import pytest

from rlhfgym.zoo.train import train


def test_best_of_n_is_evaluated_by_its_own_outputs_and_analytic_kl(tmp_path):
    result = train("best-of-n", "RLHF-Summarize-Gold-v0", budget=1, run_dir=str(tmp_path / "run"), eval_n=8,
                   overrides={"n": 2, "batch_size": 8})
    assert result["policy"]["kl"] == pytest.approx(math.log(2) - 1 / 2)  # Gao et al.'s bound, not a sampled KL
    assert result["sft"]["kl"] == pytest.approx(0.0, abs=1e-4)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["algo"] == "best-of-n" and saved["hyperparams"]["n"] == 2


def test_the_build_report_and_the_zoo_give_the_same_sft_number():
    """One evaluation protocol: the SFT policy's mean gold at temperature 1, evaluated by the asset
    build's report (a model loaded from the asset files) and by ``rlhf-zoo train``'s evaluation
    (:func:`rlhfgym.zoo.evaluate.evaluate_agent` of an agent holding the env's reference policy), is
    the same number for the same prompts, seed and batch size."""
    import gymnasium as gym
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    import rlhfgym.envs  # noqa: F401
    from rlhfgym.agents import make
    from rlhfgym.agents.policy import CausalLMPolicy
    from rlhfgym.envs.assets import load_micro_assets
    from rlhfgym.envs.build.sft import evaluate_policy as build_report
    from rlhfgym.envs.tasks.news import NewsTask
    from rlhfgym.zoo.evaluate import BATCH_SIZE, evaluate_agent

    env = gym.make("RLHF-Summarize-Gold-v0")

    def zoo_eval(seed):
        agent = make("sft")
        agent.policy = CausalLMPolicy.from_env(env)
        info = {"algo": "sft", "env_id": "RLHF-Summarize-Gold-v0", "seed": 0, "budget": 1, "hyperparams": {}}
        return evaluate_agent(env, agent, info, prompts=12, seed=seed, progress=False)["metrics"]

    zoo = zoo_eval(3)
    root = load_micro_assets().root
    model = AutoModelForCausalLM.from_pretrained(root / "sft")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    report = build_report(model, tokenizer, NewsTask(seed=0), n=12, best_of=2, seed=3, batch_size=BATCH_SIZE)
    assert report["sft_sampled_t1"] == zoo["gold"]["mean"]
    assert zoo["kl"]["mean"] == pytest.approx(0.0, abs=1e-4)  # the SFT policy is the reference
    # the other rows are measured on the same articles: greedy decoding and the best of two samples
    # beat a single sample, and the expert writer beats them all
    assert report["sft_best_of_2_gold"] > report["sft_sampled_t1"]
    assert report["writer_expert"] > max(report["sft_greedy"], report["sft_best_of_2_gold"])
    # another seed draws other samples (the number is not a constant of the policy)
    assert zoo_eval(4)["gold"]["mean"] != zoo["gold"]["mean"]
