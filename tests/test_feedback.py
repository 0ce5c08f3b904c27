"""The reward side of RLHF: labelers, preference records, reward model, judge, preference model.

Everything runs offline on tiny models built in temp dirs (tests/feedback_fixtures.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from feedback_fixtures import ANTI, MARKER, make_lm, make_tokenizer, marker_preferences
from rlhfgym.envs.build.training import train_preference_model, train_reward_model
from rlhfgym.envs.feedback.judge import (
    ConstitutionError,
    ConstitutionJudge,
    JudgeTokenError,
    Principle,
    judge_agreement,
    load_constitution,
)
from rlhfgym.envs.feedback.labelers import Labeler, LabelerPopulation
from rlhfgym.envs.feedback.preference_model import PreferenceModel, evaluate_preference_model
from rlhfgym.envs.feedback.preferences import (
    PreferenceDataError,
    export_jsonl,
    load_preferences,
    make_preferences,
    save_preferences,
)
from rlhfgym.envs.feedback.reward_model import (
    RewardModel,
    evaluate_reward_model,
    load_scalar_model,
    prepend_facts,
)


# ----------------------------------------------------------------------------------------------
# Labelers


class FakeTask:
    """Completions are names of rows in a table of gold components."""

    TABLE = {
        # Condorcet profiles: X best on coverage, Y on faithfulness, Z on brevity, cyclically
        "X": {"coverage": 0.9, "faithfulness": -0.6, "distractor": 0.0, "brevity": -0.3},
        "Y": {"coverage": 0.6, "faithfulness": 0.0, "distractor": 0.0, "brevity": -0.6},
        "Z": {"coverage": 0.3, "faithfulness": -0.3, "distractor": 0.0, "brevity": 0.0},
        "best": {"coverage": 1.0, "faithfulness": 0.0, "distractor": 0.0, "brevity": 0.0},
        "worst": {"coverage": 0.0, "faithfulness": -0.5, "distractor": -0.25, "brevity": -0.2},
    }

    def gold_components(self, prompt, completion):
        return dict(self.TABLE[completion])

    def gold_one(self, prompt, completion):
        return sum(self.TABLE[completion].values())


def test_noiseless_gold_labeler_picks_the_higher_gold_score():
    pop = LabelerPopulation.preset("gold", FakeTask(), temperature=0.0, flip_prob=0.0)
    a, b = ["best", "worst", "X", "Z"], ["worst", "best", "worst", "Y"]
    labels = pop.label(["p"] * 4, a, b, rng=0)
    gold = FakeTask().gold_one
    expected = [int(gold("p", x) > gold("p", y)) for x, y in zip(a, b)]
    assert labels.label.tolist()[:3] == expected[:3]
    # the Condorcet profiles X, Y, Z all have gold 0: a gold tie is a fair coin
    assert labels.prob.tolist() == [1.0, 0.0, 1.0, 0.5]


def test_label_flips_match_the_alpacafarm_noise_model():
    # temperature 0 and a clear winner: P(label = best) = (1 - 0.25) * 1 + 0.25 * 0.5 = 0.875
    pop = LabelerPopulation.preset("gold", FakeTask(), temperature=0.0)
    n = 4000
    labels = pop.label(["p"] * n, ["best"] * n, ["worst"] * n, rng=1)
    assert np.allclose(labels.prob, 0.875)
    se = math.sqrt(0.875 * 0.125 / n)
    assert abs(labels.label.mean() - 0.875) < 4 * se
    ceiling = pop.bayes_ceiling(["p"] * n, ["best"] * n, ["worst"] * n, rng=2)
    assert ceiling.exact == pytest.approx(0.875)
    assert abs(ceiling.empirical - ceiling.exact) < 4 * se


def test_bayes_ceiling_is_mean_of_max_p():
    pop = LabelerPopulation.preset("alpacafarm", FakeTask())
    a, b = ["X", "Y", "Z", "best"] * 50, ["Y", "Z", "X", "X"] * 50
    c = pop.bayes_ceiling(["p"] * len(a), a, b, rng=3)
    p = pop.population_prob(["p"] * len(a), a, b)
    assert c.exact == pytest.approx(np.mean(np.maximum(p, 1 - p)))
    assert 0.5 <= c.exact <= c.exact_known_labeler <= 0.875 + 1e-12


def test_intransitive_population_has_cyclic_majority_preferences():
    task = FakeTask()
    pop = LabelerPopulation.preset("intransitive", task, temperature=0.01, flip_prob=0.0)
    p = pop.population_prob(["p"] * 3, ["X", "Y", "Z"], ["Y", "Z", "X"])
    assert (p > 0.6).all(), p  # X > Y, Y > Z and Z > X by majority: a Condorcet cycle
    # each single labeler is transitive (utilities are scalars), only the mixture cycles
    noisy, _ = pop.probabilities(["p"] * 3, ["X", "Y", "Z"], ["Y", "Z", "X"])
    assert not (noisy > 0.5).all(axis=1).any()
    # the gold labeler (a single scalar utility) can never cycle
    g = LabelerPopulation.preset("gold", task, flip_prob=0.0).population_prob(["p"] * 3, ["X", "Y", "Z"], ["Y", "Z", "X"])
    assert not (g > 0.5).all()


def test_labels_become_preference_records():
    pop = LabelerPopulation.preset("alpacafarm", FakeTask())
    a, b = ["best", "worst", "X"] * 10, ["worst", "best", "Z"] * 10
    labels = pop.label(["p"] * 30, a, b, rng=4)
    ds = labels.to_preferences(["p"] * 30, a, b, soft=True)
    assert len(ds) == 30 and set(ds["labeler_id"]) <= set(pop.names)
    for row, x, y, lab, p in zip(ds, a, b, labels.label, labels.prob):
        assert row["chosen"] == (x if lab else y)
        assert row["label_prob"] == pytest.approx(p if lab else 1 - p)
    hard = labels.to_preferences(["p"] * 30, a, b)
    assert set(hard["label_prob"]) == {1.0}


def test_labeler_with_unknown_component_names_the_fix():
    lab = Labeler("odd", {"humour": 1.0})
    with pytest.raises(KeyError, match="humour"):
        LabelerPopulation([lab], FakeTask().gold_components).label(["p"], ["X"], ["Y"])


def test_labelers_on_the_micro_news_world():
    from rlhfgym.envs.tasks.news import NewsTask

    task = NewsTask()
    prompts = task.prompts("train", 8)
    expert = [task.reference("train", i, "expert") for i in range(8)]
    wordy = [task.reference("train", i, "wordy") for i in range(8)]
    pop = LabelerPopulation.preset("alpacafarm", task)
    labels = pop.label(prompts, expert, wordy, rng=0)
    assert labels.prob.shape == (8,) and ((labels.prob >= 0.125) & (labels.prob <= 0.875)).all()
    gold = LabelerPopulation.preset("gold", task, flip_prob=0.0, temperature=0.0)
    g = gold.population_prob(prompts, expert, wordy)
    assert (g >= 0.5).all()  # the expert summary never loses on gold


# ----------------------------------------------------------------------------------------------
# Preference records


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_preferences_roundtrip_datasets_dir_and_jsonl(tmp_path):
    ds = make_preferences(["p1", "p2"], ["good a", "good b"], ["bad a", "bad b"], [1.0, 0.7], ["h1", "h2"])
    out = tmp_path / "prefs"
    save_preferences(ds, out)
    save_preferences(ds.select([1]), out)  # overwriting an existing directory is atomic too
    assert load_preferences(out).to_list() == ds.select([1]).to_list()
    assert [p.name for p in tmp_path.iterdir()] == ["prefs"]  # no temp dirs left behind
    export_jsonl(ds, tmp_path / "prefs.jsonl")
    back = load_preferences(tmp_path / "prefs.jsonl")
    assert back.to_list() == ds.to_list()
    assert back.features == ds.features


def test_tldr_schemas_are_read(tmp_path):
    nested = {
        "info": {"post": "my cat sat", "title": "cats", "subreddit": "pets"},
        "summaries": [{"text": " cat sat"}, {"text": " dog ran"}],
        "choice": 1,
        "worker": "w7",
    }
    flat = {"post": "a post", "summary_0": "s0", "summary_1": "s1", "choice": 0}
    flat_list = {"prompt": "a prompt", "summaries": ["x", "y"], "choice": 1}
    ds = load_preferences(_write_jsonl(tmp_path / "tldr.jsonl", [nested, flat, flat_list]))
    assert ds[0]["chosen"] == " dog ran" and ds[0]["rejected"] == " cat sat"
    assert ds[0]["prompt"] == "SUBREDDIT: r/pets\nTITLE: cats\nPOST: my cat sat\n\nTL;DR:"
    assert ds[0]["labeler_id"] == "w7" and ds[0]["label_prob"] == 1.0
    assert (ds[1]["prompt"], ds[1]["chosen"], ds[1]["rejected"]) == ("a post", "s0", "s1")
    assert (ds[2]["chosen"], ds[2]["rejected"]) == ("y", "x")
    # a save_to_disk copy of the TL;DR comparisons (columns info, summaries, choice) reads the same
    import datasets

    datasets.Dataset.from_list([nested]).save_to_disk(str(tmp_path / "tldr_ds"))
    assert load_preferences(tmp_path / "tldr_ds").to_list() == ds.select([0]).to_list()


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([GOOD, {"prompt": "p", "chosen": "a"}], r"record 2: missing field\(s\) \['rejected'\]"),
        ([GOOD, GOOD, {**GOOD, "label_prob": 1.5}], r"record 3: label_prob 1.5 is outside \[0, 1\]"),
        ([{"post": "p", "summaries": ["a", "b", "c"], "choice": 0}], r"record 1: mismatched lengths: 3 summaries"),
        ([{"post": "p", "summaries": ["a", "b"], "choice": 2}], r"record 1: choice 2 is outside \{0, 1\}"),
        ([{"post": "p", "summaries": ["a", "b"]}], r'record 1: missing field "choice"'),
        ([{"question": "q", "answer": "a"}], r"record 1: unknown schema with fields \['answer', 'question'\]"),
        ([{"info": {"title": "t"}, "summaries": ["a", "b"], "choice": 0}], r'missing field "info.post"'),
    ],
)
def test_malformed_preference_files_raise_clear_errors(tmp_path, records, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(PreferenceDataError, match=match):
        load_preferences(path)


def test_empty_and_broken_files_raise_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PreferenceDataError, match="the file is empty"):
        load_preferences(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(PreferenceDataError, match=r"record 2 \(line 2\) is not valid JSON"):
        load_preferences(tmp_path / "broken.jsonl")
    with pytest.raises(PreferenceDataError, match="no such file"):
        load_preferences(tmp_path / "missing.jsonl")
    (tmp_path / "notds").mkdir()
    with pytest.raises(PreferenceDataError, match="not a datasets directory"):
        load_preferences(tmp_path / "notds")
    with pytest.raises(PreferenceDataError, match="mismatched lengths"):
        make_preferences(["p", "q"], ["a"], ["b", "c"])


# ----------------------------------------------------------------------------------------------
# Reward model


@pytest.fixture(scope="module")
def trained_rm(fb_lm_dir, fb_tokenizer):
    train, held_out = marker_preferences(256, seed=0), marker_preferences(128, seed=1)
    sft_prompts = held_out["prompt"][:64]
    sft_completions = held_out["rejected"][:64]  # stand-in for SFT samples
    rm = train_reward_model(
        fb_lm_dir, fb_tokenizer, train, held_out, epochs=2, lr=3e-3, batch_size=32, seed=0, progress=False,
        normalise_on=(sft_prompts, sft_completions),
    )
    return rm, held_out, (sft_prompts, sft_completions)


def test_reward_model_learns_the_marker_rule(trained_rm):
    rm, held_out, _ = trained_rm
    metrics = evaluate_reward_model(rm, held_out)
    assert metrics["n"] == 128
    assert metrics["accuracy"] >= 0.9, metrics  # chance is 0.5
    assert [h["epoch"] for h in rm.history] == [0, 1] and "eval_accuracy" in rm.history[-1]


def test_reward_model_is_centred_on_sft_completions(trained_rm):
    rm, _, (prompts, completions) = trained_rm
    r = rm.score(prompts, completions)
    assert r.shape == (64,) and r.dtype == torch.float32
    assert abs(float(r.mean())) < 1e-4
    assert rm.offset != 0.0


def test_reward_model_scores_do_not_depend_on_batching(trained_rm):
    rm, held_out, _ = trained_rm
    prompts, completions = held_out["prompt"][:8], held_out["chosen"][:8]
    batched = rm.score(prompts, completions)
    alone = torch.cat([rm.score([p], [c]) for p, c in zip(prompts, completions)])
    assert torch.allclose(batched, alone, atol=1e-4)


def test_reward_model_correlates_with_gold(trained_rm):
    rm, held_out, _ = trained_rm

    def gold(prompts, completions):  # the rule the labels came from
        return [float(MARKER in c.split()) for c in completions]

    m = evaluate_reward_model(rm, held_out, gold=gold)
    assert m["pearson"] > 0.7 and m["spearman"] > 0.7 and m["gold_pair_accuracy"] >= 0.9


def test_reward_model_save_load_roundtrip(trained_rm, tmp_path):
    rm, held_out, _ = trained_rm
    rm.save(tmp_path / "rm")
    assert (tmp_path / "rm" / "reward_config.json").is_file()
    back = RewardModel.load(tmp_path / "rm")
    assert back.offset == rm.offset
    prompts, completions = held_out["prompt"][:8], held_out["chosen"][:8]
    assert torch.allclose(back.score(prompts, completions), rm.score(prompts, completions), atol=1e-5)


def test_soft_labels_are_respected(fb_lm_dir, fb_tokenizer):
    """Half the records list the marker completion as 'rejected' with label_prob 0 (it still won):
    a loss that ignored label_prob would learn nothing (or the opposite rule)."""
    base = marker_preferences(256, seed=2)
    rows = base.to_list()
    for i, r in enumerate(rows):
        if i % 2:
            r["chosen"], r["rejected"], r["label_prob"] = r["rejected"], r["chosen"], 0.0
    train = make_preferences(*[[r[k] for r in rows] for k in ("prompt", "chosen", "rejected", "label_prob")])
    rm = train_reward_model(fb_lm_dir, fb_tokenizer, train, epochs=2, lr=3e-3, batch_size=32, progress=False)
    assert evaluate_reward_model(rm, marker_preferences(128, seed=3))["accuracy"] >= 0.9


def test_all_pairs_of_a_prompt_are_scored_once_per_sequence(fb_lm_dir, fb_tokenizer, monkeypatch):
    """k samples of a prompt compared in all k(k-1)/2 pairs: the trainer forwards each distinct
    (prompt, completion) once per step (k sequences, not k(k-1)) and still learns the rule."""
    import itertools

    from rlhfgym.envs.feedback import reward_model as rm_module
    from rlhfgym.envs.feedback import training

    base = marker_preferences(48, seed=4).to_list()
    rows = []
    for i in range(0, 48, 2):  # per prompt: 2 marker and 2 plain completions, all 6 pairs
        x = base[i]["prompt"]
        ys = [(base[i]["chosen"], 1), (base[i + 1]["chosen"], 1), (base[i]["rejected"], 0), (base[i + 1]["rejected"], 0)]
        for (a, ma), (b, mb) in itertools.combinations(ys, 2):
            rows.append((x, a, b, 0.5 if ma == mb else float(ma > mb)))
    train = make_preferences(*map(list, zip(*rows)))
    assert len(train) == 24 * 6
    pairs, chosen, rejected, groups = rm_module.distinct_pairs(train)
    assert len(pairs) == 24 * 4 and [len(g) for g in groups] == [6] * 24
    assert all(pairs[c] == (x, y) for c, x, y in zip(chosen, train["prompt"], train["chosen"]))

    rows_forwarded = []
    real_forward = training.scalar_forward

    def counting_forward(model, seqs, pad, device, **kw):
        rows_forwarded.append(len(seqs))
        return real_forward(model, seqs, pad, device, **kw)

    monkeypatch.setattr(training, "scalar_forward", counting_forward)
    rm = train_reward_model(fb_lm_dir, fb_tokenizer, train, epochs=3, lr=3e-3, batch_size=36, progress=False,
                            normalise_on=(train["prompt"][:8], train["rejected"][:8]))
    monkeypatch.setattr(training, "scalar_forward", real_forward)
    assert rows_forwarded[0] == 24  # the first step: 36 pairs = 6 whole prompts = 24 distinct sequences
    assert sum(rows_forwarded[:12]) == 3 * 24 * 4  # three epochs, each sequence once per epoch
    assert evaluate_reward_model(rm, marker_preferences(128, seed=3))["accuracy"] >= 0.9


def test_prefix_groups_share_the_longest_common_start():
    from rlhfgym.envs.feedback.reward_model import prefix_groups

    prompt = list(range(10, 30))
    seqs = [prompt + [5, 6, 1], [3] * 12 + [1], prompt + [5, 7, 1], prompt + [8, 1], prompt[:9] + [4, 1]]
    group, first, prefix_len = prefix_groups(seqs, min_shared=8)
    assert group[0] == group[2] == group[3] == group[4] != group[1]
    assert prefix_len[group[0]] == 9  # the start all four share: prompt[:9]
    assert prefix_len[group[1]] == 12  # alone: all its tokens but the last
    group, _, prefix_len = prefix_groups(seqs[:3], min_shared=8)
    assert prefix_len[group[0]] == 21  # prompt + [5], then each row's own tokens
    group, _, prefix_len = prefix_groups([prompt + [1], prompt + [1, 2]], min_shared=8)
    assert prefix_len == [20]  # the shorter row keeps its last token
    assert prefix_groups([prompt + [1], prompt[:5] + [1]], min_shared=8)[1] == [1, 0]  # 5 shared < 8


def _scalar_llama(tokenizer, seed=0):
    from feedback_fixtures import make_lm

    from rlhfgym.envs.feedback.reward_model import load_scalar_model

    return load_scalar_model(make_lm(tokenizer, seed=seed, layers=2), tokenizer).train()


def test_shared_prefix_scores_and_gradients_equal_the_plain_pass(fb_tokenizer):
    """Rows sharing a prompt (chosen/rejected pairs, prompts of different lengths, a row alone) give the
    plain pass's scores and gradients while the model reads fewer tokens."""
    import copy

    from rlhfgym.envs.feedback.reward_model import RewardModel, scalar_forward

    plain_model = _scalar_llama(fb_tokenizer)
    shared_model = copy.deepcopy(plain_model)
    base = marker_preferences(24, seed=5)
    enc = RewardModel(plain_model, fb_tokenizer).encode
    seqs = enc(list(base["prompt"]) * 2 + ["summarize : alone tl;dr :"], list(base["chosen"]) + list(base["rejected"]) + ["x"])
    read = []
    hook = shared_model.base_model.embed_tokens.register_forward_hook(lambda m, i, o: read.append(i[0].numel()))
    weights = torch.randn(len(seqs))
    plain = scalar_forward(plain_model, seqs, fb_tokenizer.pad_token_id, torch.device("cpu"))
    shared = scalar_forward(shared_model, seqs, fb_tokenizer.pad_token_id, torch.device("cpu"), share_prefixes=True)
    hook.remove()
    assert torch.allclose(shared, plain, atol=1e-5), (shared - plain).abs().max()
    (plain * weights).sum().backward()
    (shared * weights).sum().backward()
    for (name, a), b in zip(plain_model.named_parameters(), shared_model.parameters()):
        assert torch.allclose(b.grad, a.grad, atol=1e-5, rtol=1e-4), name
    padded = len(seqs) * max(map(len, seqs))
    assert len(read) > 2 and sum(read) < 0.8 * padded  # prefixes once, rows of similar length together


def test_encoders_that_read_both_ways_do_not_share_prefixes():
    """BERT-like scorers see the whole sequence from every token: a shared prefix would be wrong, so
    they take the plain pass."""
    from transformers import BertConfig, BertForSequenceClassification

    from rlhfgym.envs.feedback.reward_model import reads_left_to_right, scalar_forward

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32, num_labels=1)).eval()
    assert not reads_left_to_right(bert)
    seqs = [[2] * 10 + [5, 3], [2] * 10 + [6, 3]]
    shared = scalar_forward(bert, seqs, 0, torch.device("cpu"), share_prefixes=True)
    assert torch.equal(shared, scalar_forward(bert, seqs, 0, torch.device("cpu")))


def test_centring_scores_in_sorted_shared_batches_and_keeps_the_order(fb_tokenizer):
    from rlhfgym.envs.feedback.reward_model import RewardModel

    rm = RewardModel(_scalar_llama(fb_tokenizer, seed=1), fb_tokenizer, batch_size=8)
    base = marker_preferences(20, seed=6)
    prompts, completions = list(base["prompt"]) * 2, list(base["chosen"]) + list(base["rejected"])
    plain = rm.raw_scores(prompts, completions)
    assert torch.allclose(rm.raw_scores(prompts, completions, share_prefixes=True), plain, atol=1e-5)
    stats = rm.normalise(prompts, completions)
    assert stats["raw_mean"] == pytest.approx(float(plain.double().mean()), abs=1e-6)


def test_reward_model_without_centring_keeps_the_raw_head(fb_lm_dir, fb_tokenizer):
    rm = train_reward_model(fb_lm_dir, fb_tokenizer, marker_preferences(32, seed=7), epochs=1, lr=1e-3, batch_size=16,
                            progress=False, normalise=False)
    assert rm.offset == 0.0 and rm.scale == 1.0 and rm.norm_stats == {}


def test_reward_model_trains_in_bfloat16_autocast(fb_lm_dir, fb_tokenizer, monkeypatch):
    from rlhfgym.envs.feedback import training

    seen, real = [], training.scalar_forward

    def recording(model, *a, **kw):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(model, *a, **kw)

    monkeypatch.setattr(training, "scalar_forward", recording)
    rm = train_reward_model(fb_lm_dir, fb_tokenizer, marker_preferences(32, seed=7), epochs=1, lr=1e-3, batch_size=16,
                            progress=False, normalise=False, precision="bfloat16")
    assert seen == [torch.bfloat16] * 2  # both training steps
    assert {p.dtype for p in rm.model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16"):
        train_reward_model(fb_lm_dir, fb_tokenizer, marker_preferences(8, seed=7), progress=False, precision="fp8")


def test_old_homes_of_the_trainers_warn_and_give_the_build_functions():
    """train_reward_model moved to rlhfgym.envs.feedback.training (re-exported by the build's
    training module), train_preference_model to rlhfgym.envs.build.training; the old names still work
    for one release, with a DeprecationWarning, and the runtime modules import the build only when
    such a name is asked for."""
    import subprocess
    import sys

    from rlhfgym.envs.build import training
    from rlhfgym.envs.feedback import preference_model as pm_module
    from rlhfgym.envs.feedback import reward_model as rm_module

    with pytest.warns(DeprecationWarning, match=r"reward_model\.train_reward_model moved to rlhfgym\.envs\.feedback\.training"):
        assert rm_module.train_reward_model is training.train_reward_model
    with pytest.warns(DeprecationWarning, match="train_preference_model moved to rlhfgym.envs.build.training"):
        from rlhfgym.envs.feedback.preference_model import train_preference_model as old
    assert old is training.train_preference_model
    with pytest.raises(AttributeError, match="no attribute 'train_nothing'"):
        rm_module.train_nothing  # noqa: B018
    assert "train_reward_model" not in rm_module.__all__ and "train_preference_model" not in pm_module.__all__
    code = ("import sys, rlhfgym.envs, rlhfgym.envs.evaluation, rlhfgym.envs.feedback.factories, rlhfgym.envs.feedback.judge, "
            "rlhfgym.envs.feedback.preference_model, rlhfgym.envs.feedback.reward_model, rlhfgym.envs.feedback.ratings; "
            "print(sorted(m for m in sys.modules if m.startswith('rlhfgym.envs.build')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # runtime code never imports the asset build


def test_format_input_hook_and_fact_prepending(fb_lm_dir, fb_tokenizer):
    fmt = prepend_facts(lambda prompt: "w1 w2")
    assert fmt("summarize : w3 tl;dr :", "w4") == "w1 w2 summarize : w3 tl;dr : w4"
    model = load_scalar_model(fb_lm_dir, fb_tokenizer)
    rm = RewardModel(model, fb_tokenizer, format_input=lambda p, c: "w1 w2 w3")
    r = rm.score(["a", "b"], ["c", "d good"])
    assert r[0] == r[1]  # the model only sees what format_input gives it

    from rlhfgym.envs.tasks.news import NewsTask

    task = NewsTask()
    prompt = task.prompt("train", 0)
    text = prepend_facts(task.facts)(prompt, "x")
    key = [f.clause() for f in task.facts(prompt) if f.key]
    assert text == " ".join(key) + " " + prompt + " x"


def test_causal_lm_object_becomes_a_scalar_model(fb_tokenizer):
    lm = make_lm(fb_tokenizer, seed=5)
    model = load_scalar_model(lm, fb_tokenizer)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert torch.equal(model.model.embed_tokens.weight, lm.model.embed_tokens.weight)


# ----------------------------------------------------------------------------------------------
# Constitution judge


class MarkerJudgeLM(torch.nn.Module):
    """A stub judge LM with a known answer: logit(A) - logit(B) = 3 * (#marker in option A -
    #marker in option B) + 1 (the +1 is a position bias toward "A")."""

    def __init__(self, tokenizer):
        super().__init__()
        self.vocab = len(tokenizer)
        self.a_id, self.b_id = tokenizer.convert_tokens_to_ids(["A", "B"])
        self.marker = tokenizer.convert_tokens_to_ids(MARKER)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for r, row in enumerate(input_ids.tolist()):
            # the template is "... ( A ) <a> ( B ) <b> answer (": options lie between the A and B labels
            start = row.index(self.a_id)
            split = row.index(self.b_id, start + 1)
            count_a = sum(t == self.marker for t in row[start:split])
            count_b = sum(t == self.marker for t in row[split:])
            logits[r, :, self.a_id] = 3.0 * (count_a - count_b) + 1.0
        return type("Out", (), {"logits": logits})()


TEMPLATE = "{principle} {prompt} ( A ) {a} ( B ) {b} answer ("
PRINCIPLES = [Principle("rule", "w1 w2"), Principle("other", "w3")]


def test_judge_cancels_position_bias_and_flips_with_swapped_content(fb_tokenizer):
    judge = ConstitutionJudge(MarkerJudgeLM(fb_tokenizer), fb_tokenizer, PRINCIPLES, template=TEMPLATE)
    prompts, a, b = ["w5 w6", "w7"], [f"w1 {MARKER}", "w2 w3"], ["w4", f"w9 {MARKER} w1"]
    p_ab, p_ba = judge.prefer(prompts, a, b), judge.prefer(prompts, b, a)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # a wins: order AB gives sigmoid(3 + 1); order BA gives P("B") = sigmoid(3 - 1)
    expected_win = 0.5 * (sig(4.0) + sig(2.0))
    assert p_ab.tolist() == pytest.approx([expected_win, 1 - expected_win], abs=1e-6)
    assert torch.allclose(p_ab + p_ba, torch.ones(2), atol=1e-6)
    # one order only: the position bias shows and the swap identity fails
    biased = ConstitutionJudge(MarkerJudgeLM(fb_tokenizer), fb_tokenizer, PRINCIPLES, template=TEMPLATE, debias=False)
    assert biased.prefer(prompts, a, b).tolist() == pytest.approx([sig(4.0), sig(-2.0)], abs=1e-6)
    assert not torch.allclose(biased.prefer(prompts, a, b) + biased.prefer(prompts, b, a), torch.ones(2), atol=0.05)
    assert judge.per_principle(prompts, a, b).shape == (2, 2)


def test_judge_clamp_and_reward_against_a_reference(fb_tokenizer):
    refs = {"w5": "w2 w3", "w6": f"{MARKER} w1"}
    judge = ConstitutionJudge(
        MarkerJudgeLM(fb_tokenizer), fb_tokenizer, PRINCIPLES, clamp=(0.4, 0.6), template=TEMPLATE, reference=refs
    )
    p = judge.prefer(["w5", "w6"], [f"w1 {MARKER}", "w4"], ["w2", f"w9 {MARKER}"])
    assert p.tolist() == pytest.approx([0.6, 0.4])
    r = judge.score(["w5", "w6"], ["w2 w3", f"{MARKER} w1"])  # the references themselves
    assert r.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    r = judge.score(["w5", "w6"], [f"{MARKER} w4", "w4"])
    assert r.tolist() == pytest.approx([0.1, -0.1])
    agreement = judge_agreement(judge, make_preferences(["w5"], [f"{MARKER}"], ["w4"]))
    assert agreement == {"n": 1, "all": 1.0, "rule": 1.0, "other": 1.0}


def test_judge_with_a_real_tiny_lm_is_antisymmetric(fb_tokenizer):
    lm = make_lm(fb_tokenizer, seed=1)
    judge = ConstitutionJudge(lm, fb_tokenizer, PRINCIPLES, template=TEMPLATE, batch_size=3)
    prompts, a, b = ["w1 w2", "w3", "w4 w5 w6"], ["w7", f"{MARKER} w8 w9", "w1"], ["w2 w3 w4", "w5", f"w6 {ANTI}"]
    p_ab, p_ba = judge.prefer(prompts, a, b), judge.prefer(prompts, b, a)
    assert torch.allclose(p_ab + p_ba, torch.ones(3), atol=1e-5)
    assert ((p_ab > 0) & (p_ab < 1)).all()


def test_shared_prefix_scoring_equals_one_pass_per_question(fb_tokenizer):
    """Questions about one pair share the request: it runs once and its KV cache serves the whole
    group. Values and gradients equal one full pass per question (prefixes of different lengths,
    ragged rests)."""
    from rlhfgym.envs.feedback.judge import answer_logit_diff

    lm = make_lm(fb_tokenizer, seed=2)
    ids = fb_tokenizer.convert_tokens_to_ids
    answer = ids(["A", "B"])
    groups = [("summarize : w1 w2 w3 w4 tl;dr :", ["w5 ( A ) w6", "w7 w8 ( B ) good w9 w1", "w2 (", "bad"]),
              ("summarize : w5 tl;dr :", ["( A ) w1 w2 w3", "w4", "w6 w7 good ( B )", "A"])]
    seqs = [ids(f"{head} {tail}".split()) for head, tails in groups for tail in tails]
    lm.train()
    full = answer_logit_diff(lm, seqs, answer, fb_tokenizer.pad_token_id, "cpu", group_size=1)
    full.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    shared = answer_logit_diff(lm, seqs, answer, fb_tokenizer.pad_token_id, "cpu", group_size=4)
    shared.pow(2).sum().backward()
    assert torch.allclose(shared, full, atol=1e-5)
    for n, p in lm.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n
    # through the judge: the default template opens with the request, so its questions share it
    judge = ConstitutionJudge(lm.eval(), fb_tokenizer, PRINCIPLES, answer_tokens=("A", "B"), batch_size=5,
                              template="summarize : {prompt} tl;dr : {principle} ( A ) {a} ( B ) {b} (")
    prompts, a, b = ["w1 w2", "w3 w4 w5"], ["w7", f"{MARKER} w8"], ["w2 w3 w4", "w5"]
    texts = [judge.build_prompt(pr, x, *o) for x, ya, yb in zip(prompts, a, b) for pr in PRINCIPLES
             for o in ((ya, yb), (yb, ya))]
    assert torch.allclose(judge._answer_logit_diff(texts, group_size=4), judge._answer_logit_diff(texts), atol=1e-5)
    p_ab, p_ba = judge.prefer(prompts, a, b), judge.prefer(prompts, b, a)
    assert torch.allclose(p_ab + p_ba, torch.ones(2), atol=1e-5)


def test_judge_tokenizer_without_answer_tokens_names_them(fb_tokenizer):
    lm = make_lm(fb_tokenizer)
    with pytest.raises(JudgeTokenError, match=r"no single token for answer token\(s\) \['Yes', 'No'\]"):
        ConstitutionJudge(lm, fb_tokenizer, PRINCIPLES, template=TEMPLATE, answer_tokens=("Yes", "No"))
    vocab = make_tokenizer().get_vocab()
    no_ab = make_tokenizer([t for t in sorted(vocab, key=vocab.get) if t not in ("A", "B")])
    with pytest.raises(JudgeTokenError, match=r"\['A', 'B'\]"):
        ConstitutionJudge(make_lm(no_ab), no_ab, PRINCIPLES)


def test_constitution_files(tmp_path):
    micro = load_constitution("micro")
    assert micro.names == ["coverage", "faithfulness", "relevance", "brevity"]
    assert all(p.text for p in micro)
    for text, match in [
        ("principles: []\n", "has no principles"),
        ("", "has no principles"),
        ("- name: a\n  text: b\n- name: c\n", "principle 2 lacks a non-empty text"),
        ("- just a string\n", "principle 1 is a str, not a mapping"),
        ("principles: [\n", "not valid YAML"),
        ("- name: a\n  text: b\n- name: a\n  text: c\n", "repeats the name 'a'"),
    ]:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConstitutionError, match=match):
            load_constitution(path)
    with pytest.raises(ConstitutionError, match="has no principles"):
        ConstitutionJudge(torch.nn.Linear(1, 1), make_tokenizer(), [])
    with pytest.raises(ConstitutionError, match="no such constitution"):
        load_constitution(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------------------------
# Preference model


def test_preference_model_is_antisymmetric_by_construction(fb_lm_dir, fb_tokenizer):
    pm = PreferenceModel(load_scalar_model(fb_lm_dir, fb_tokenizer), fb_tokenizer, batch_size=2)
    prompts, a, b = ["w1", "w2 w3", "w4"], ["w5 w6", "good", "w7"], ["w8", "w9 w10", "w7"]
    p_ab, p_ba = pm.prefer(prompts, a, b), pm.prefer(prompts, b, a)
    assert torch.allclose(p_ab + p_ba, torch.ones(3), atol=1e-5)
    assert p_ab[2] == pytest.approx(0.5, abs=1e-6)  # a completion ties with itself
    assert not torch.allclose(p_ab[:2], torch.full((2,), 0.5), atol=1e-4)  # yet it is not constant


def test_preference_model_reads_the_shared_prompt_once_with_the_plain_result(fb_lm_dir, fb_tokenizer):
    """Both orders of a pair start with "x [SEP]": the model reads it once, and P(a > b) is the plain pass's."""
    from rlhfgym.envs.feedback.reward_model import scalar_forward

    pm = PreferenceModel(load_scalar_model(fb_lm_dir, fb_tokenizer), fb_tokenizer, batch_size=16)
    base = marker_preferences(12, seed=8)
    fwd, rev = pm.encode_pairs(base["prompt"], base["chosen"], base["rejected"])
    read = []
    hook = pm.model.base_model.embed_tokens.register_forward_hook(lambda m, i, o: read.append(i[0].numel()))
    shared = pm.prefer(base["prompt"], base["chosen"], base["rejected"])
    hook.remove()
    with torch.no_grad():
        f = scalar_forward(pm.model.eval(), fwd + rev, fb_tokenizer.pad_token_id, pm.device)
    torch.testing.assert_close(shared, torch.sigmoid(f[:12] - f[12:]), atol=1e-5, rtol=0)
    assert sum(read) < 24 * max(map(len, fwd))


def test_preference_model_learns_the_marker_rule(fb_lm_dir, fb_tokenizer, tmp_path):
    train, held_out = marker_preferences(256, seed=4), marker_preferences(128, seed=5)
    pm = train_preference_model(fb_lm_dir, fb_tokenizer, train, held_out, epochs=2, lr=3e-3, batch_size=32, progress=False)
    metrics = evaluate_preference_model(pm, held_out)
    assert metrics["accuracy"] >= 0.9, metrics
    p = pm.prefer(held_out["prompt"][:8], held_out["chosen"][:8], held_out["rejected"][:8])
    q = pm.prefer(held_out["prompt"][:8], held_out["rejected"][:8], held_out["chosen"][:8])
    assert torch.allclose(p + q, torch.ones(8), atol=1e-5)
    pm.save(tmp_path / "pm")
    back = PreferenceModel.load(tmp_path / "pm")
    assert torch.allclose(back.prefer(held_out["prompt"][:8], held_out["chosen"][:8], held_out["rejected"][:8]), p, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# With the shared fixtures (tests/conftest.py): a task that has a gold scorer but no components


def test_feedback_pipeline_on_a_task_without_gold_components(toy_task, tiny_lm_dir, tiny_tokenizer):
    prompts = toy_task.prompts("train", 12)
    good = [" ".join(p.split()[2:9]) for p in prompts]  # the first sentence: every key word
    bad = ["today" for _ in prompts]
    gold = LabelerPopulation.preset("gold", toy_task, temperature=0.0, flip_prob=0.0)
    labels = gold.label(prompts, good, bad, rng=0)
    assert labels.label.tolist() == [1] * 12  # the gold labeler reads task.gold_one
    with pytest.raises(KeyError, match=r"the task only gives \['gold'\]"):
        LabelerPopulation.preset("alpacafarm", toy_task).label(prompts, good, bad)

    prefs = labels.to_preferences(prompts, good, bad)
    rm = RewardModel(load_scalar_model(tiny_lm_dir, tiny_tokenizer), tiny_tokenizer, batch_size=5)
    assert rm.score(prompts, good).shape == (12,)
    m = evaluate_reward_model(rm, prefs, gold=toy_task)
    assert m["n"] == 12 and 0.0 <= m["accuracy"] <= 1.0 and -1.0 <= m["spearman"] <= 1.0
