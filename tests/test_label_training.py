"""Training straight from the labeling database: the reward-model build
(``rlhf-zoo build-assets --only reward --preferences URL --out DIR``) and DPO's ``dataset=URL``."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sqlalchemy", reason="the labeling database needs the label extra: pip install 'rlhf-gym[label]'")

from rlhfgym.envs.feedback.store import PreferenceStore  # noqa: E402
from rlhfgym.zoo.cli import main  # noqa: E402

N = 16


@pytest.fixture(scope="module")
def env():
    import gymnasium as gym

    import rlhfgym.envs  # noqa: F401

    return gym.make("RLHF-Summarize-Gold-v0")


@pytest.fixture
def labelled_db(env, tmp_path):
    """N test prompts; a = the first sentence of the article, b = an invented summary; alice picks a on all
    but two pairs, which she calls a tie and skips."""
    core = env.unwrapped
    prompts = core.prompts("test", N)
    a = [p.split(" : ", 1)[1].split(" . ")[0] + " ." for p in prompts]
    b = ["nadia sold 99 ovens in holt ." for _ in prompts]
    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    with PreferenceStore(url) as store:
        store.add_pairs(prompts, a, b)
        answers = {}
        while (pair := store.next_pair("alice")) is not None:
            k = len(answers)
            choice = "tie" if k == 0 else "skip" if k == 1 else "left" if pair.left_is_a else "right"
            store.record("alice", pair.pair_id, choice)
            answers[pair.pair_id] = choice
    return url, prompts, a, b


def test_dpo_trains_on_the_database(env, labelled_db):
    from rlhfgym.agents.dpo import DPO, resolve_dataset

    url, _, a, _ = labelled_db
    ds = resolve_dataset(url, "dpo")
    assert len(ds) == N - 1  # the skip is left out, the tie kept with label_prob 1/2
    assert sorted(ds["label_prob"]) == [0.5] + [1.0] * (N - 2)
    assert all(c in a for c, p in zip(ds["chosen"], ds["label_prob"]) if p == 1.0)
    agent = DPO(dataset=url, batch_size=4)  # the URL as a hyperparameter, as the zoo's YAML would give it
    agent.learn(env, 1000, progress_bar=False)
    assert agent.spent == 2 * (N - 1)  # every pair of the database was trained on once
    assert agent.config["dataset"] == url


def test_build_assets_trains_the_reward_model_from_the_database(labelled_db, tmp_path, capsys):
    url, prompts, a, b = labelled_db
    out = tmp_path / "assets"
    assert main(["build-assets", "--only", "reward", "--preferences", url]) == 2  # would replace the shipped RM
    assert "pass --out DIR" in capsys.readouterr().err
    assert main(["build-assets", "--only", "reward,sft", "--preferences", url, "--out", str(out)]) == 2
    assert "use --only reward" in capsys.readouterr().err

    assert main(["build-assets", "--only", "reward", "--preferences", url, "--out", str(out)]) == 0
    metrics = json.loads((out / "reward" / "build_metrics.json").read_text())
    assert metrics["n_records"] == N - 1 and metrics["n_train_pairs"] + metrics["n_heldout_pairs"] == N - 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert "--preferences " + url in manifest["parts"]["reward"]["command"]
    assert any(f.startswith("reward/") for f in manifest["files"])

    from rlhfgym.envs.feedback.factories import learned_reward

    rm = learned_reward(root=out)
    scores_a, scores_b = rm.score(prompts, a), rm.score(prompts, b)
    assert float((scores_a > scores_b).float().mean()) >= 0.75  # it learned what alice prefers


def test_pairs_from_a_saved_agent_and_the_sft_policy(env, tmp_path):
    from rlhfgym.agents import make
    from rlhfgym.agents.policy import CausalLMPolicy
    from rlhfgym.zoo.label.sources import PairSourceError, pairs_from_policies

    agent = make("sft")
    agent.policy = CausalLMPolicy.from_env(env)  # an untrained copy of pi_ref, saved as `rlhf-zoo train` saves runs
    agent.save(tmp_path / "run" / "agent")
    batch = pairs_from_policies(["sft", str(tmp_path / "run")], "RLHF-Summarize-Gold-v0", 4, split="validation", env=env)
    core = env.unwrapped
    assert batch.prompts == core.prompts("validation", 4)
    assert batch.source_a == ["sft"] * 4 and batch.source_b == [str(tmp_path / "run")] * 4
    assert batch.a != batch.b  # two different sampling seeds
    assert batch.rm_a == pytest.approx(core.score(batch.prompts, batch.a).tolist())  # the env's reward, for the admin view
    with pytest.raises(PairSourceError, match="neither 'sft' nor a saved agent"):
        pairs_from_policies(["sft", str(tmp_path / "nothing")], "RLHF-Summarize-Gold-v0", 2, env=env)
