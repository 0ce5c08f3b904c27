"""Reward models fitted at runtime (envs/feedback/fitting.py): they learn, are cached by what they
were fitted on, refuse a cache of other data, sit in an env's reward slot by directory, and the
build's recipe of preference data can be run without the build."""

from __future__ import annotations

import json

import pytest
import torch

from feedback_fixtures import marker_preferences
from rlhfgym.envs.feedback import fitting
from rlhfgym.envs.feedback.fitting import FIT_FILE, FittedReward, RewardFitError, fit_reward_model

FIT = dict(epochs=2, lr=3e-3, batch_size=16, seed=0)


@pytest.fixture(scope="module")
def fitted(fb_lm_dir, fb_tokenizer, tmp_path_factory):
    cache = tmp_path_factory.mktemp("fit") / "rm"
    train, heldout = marker_preferences(96, seed=0), marker_preferences(48, seed=1)
    rm = fit_reward_model(train, heldout, cache_dir=cache, backbone=fb_lm_dir, tokenizer=fb_tokenizer, **FIT)
    return rm, cache, train, heldout


def test_a_fitted_model_learns_and_records_what_it_was_fitted_on(fitted):
    rm, cache, train, heldout = fitted
    saved = json.loads((cache / FIT_FILE).read_text())
    assert saved["metrics"]["n_train_pairs"] == 96 and saved["metrics"]["n_eval_pairs"] == 48
    assert saved["metrics"]["eval_accuracy"] >= 0.85  # the marker rule; chance is 0.5
    assert saved["train"] == fitting.preferences_digest(train) and saved["settings"]["epochs"] == 2
    assert [h["epoch"] for h in saved["metrics"]["history"]] == [0, 1]
    assert not list(cache.parent.glob(".rm.loop"))  # the loop's snapshot dir is gone once the fit ends


def test_the_same_fit_again_loads_the_cache_and_other_records_are_refused(fitted, fb_lm_dir, fb_tokenizer, monkeypatch):
    rm, cache, train, heldout = fitted
    from rlhfgym.envs.feedback import training

    monkeypatch.setattr(training, "train_reward_model", lambda *a, **k: pytest.fail("trained again despite the cache"))
    again = fit_reward_model(train, heldout, cache_dir=cache, backbone=fb_lm_dir, tokenizer=fb_tokenizer, **FIT)
    x, y = list(heldout["prompt"][:6]), list(heldout["chosen"][:6])
    assert torch.allclose(again.score(x, y), rm.score(x, y), atol=1e-5)
    with pytest.raises(RewardFitError, match=r"fitted on other records or settings \(differing: train\)"):
        fit_reward_model(marker_preferences(96, seed=7), heldout, cache_dir=cache, backbone=fb_lm_dir,
                         tokenizer=fb_tokenizer, **FIT)
    with pytest.raises(RewardFitError, match=r"differing: settings"):
        fit_reward_model(train, heldout, cache_dir=cache, backbone=fb_lm_dir, tokenizer=fb_tokenizer, **{**FIT, "lr": 1e-3})


@pytest.mark.parametrize("prefs, kwargs, message", [
    (None, {}, "train_prefs is None"),
    ([], {}, "no preference records"),
    ("/no/such/file.jsonl", {}, "no such file"),
    (42, {}, "must be preference records"),
    ("MARKER", {"epochs": 0}, "epochs must be a positive integer"),
    ("MARKER", {"lr": -1.0}, "lr must be a positive number"),
    ("MARKER", {"tokenizer": "TOK"}, "a tokenizer without a backbone"),
    ("MARKER", {"backbone": "/no/such/dir", "tokenizer": "TOK"}, "is not a directory"),
])
def test_bad_input_is_refused_with_the_fix(prefs, kwargs, message, fb_tokenizer):
    from rlhfgym.envs.feedback.preferences import PreferenceDataError

    prefs = marker_preferences(8, seed=0) if prefs == "MARKER" else prefs
    kwargs = {k: fb_tokenizer if v == "TOK" else v for k, v in kwargs.items()}
    with pytest.raises((RewardFitError, PreferenceDataError), match=message):
        fit_reward_model(prefs, **kwargs)


def test_missing_columns_are_named():
    class Columns:
        column_names = ["prompt", "chosen"]

        def __len__(self):
            return 1

        def __getitem__(self, key):
            return ["x"]

    with pytest.raises(RewardFitError, match=r"lacks the column\(s\) \['rejected', 'label_prob'\]"):
        fitting.as_preferences(Columns())


def test_an_env_pays_a_fitted_model_named_by_its_directory(fitted):
    import gymnasium as gym

    import rlhfgym.envs  # noqa: F401

    rm, cache, _, heldout = fitted
    env = gym.make("RLHF-Summarize-v0", reward_model=str(cache))
    reward = env.unwrapped.reward_model
    assert isinstance(reward, FittedReward) and reward.fit["metrics"]["n_train_pairs"] == 96
    x, a, b = list(heldout["prompt"][:4]), list(heldout["chosen"][:4]), list(heldout["rejected"][:4])
    assert torch.allclose(reward.score(x, a), rm.score(x, a), atol=1e-5)
    assert torch.allclose(reward.prefer(x, a, b), torch.sigmoid(rm.score(x, a) - rm.score(x, b)), atol=1e-5)
    env.close()
    with pytest.raises(ValueError, match="is not a saved reward model"):
        gym.make("RLHF-Summarize-v0", reward_model=str(cache.parent))
    with pytest.raises(ValueError, match="unknown reward model 'lerned'"):
        gym.make("RLHF-Summarize-v0", reward_model="lerned")


def test_the_build_recipe_pairs_every_two_samples_and_asks_three_annotators():
    from rlhfgym.envs.tasks.news import NewsTask

    task = NewsTask()
    prompts, held = task.prompts("train", 3), task.prompts("validation", 2)
    train, heldout, (xs, ys) = fitting.sample_labelled_pairs(task, prompts, heldout_prompts=held, seed=0)
    assert 0 < len(train) <= 3 * 6 and 0 < len(heldout) <= 2 * 6
    assert set(train["prompt"]) <= set(prompts) and all(c != r for c, r in zip(train["chosen"], train["rejected"]))
    assert all(name.count("+") == 2 for name in train["labeler_id"])  # three annotators per training pair
    assert all(0.0 <= p <= 1.0 for p in train["label_prob"]) and set(heldout["label_prob"]) == {1.0}
    assert xs == prompts and len(ys) == 3
    again, _, _ = fitting.sample_labelled_pairs(task, prompts, seed=0)
    assert again["chosen"] == train["chosen"] and again["label_prob"] == train["label_prob"]  # seeded
