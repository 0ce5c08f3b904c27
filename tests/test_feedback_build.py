"""Building the micro world's feedback assets (envs/build/feedback.py, trained by envs/build/training.py)
and the env factories over them (envs/feedback/factories.py).

One tiny build (the real frozen SFT policy, a few dozen prompts, 1-layer models) runs once per
module into a temp dir; the tests read its metrics and load what it wrote. The judge's ability to
read the principle text is trained on a synthetic task small enough for seconds on CPU, and checked
on the shipped judge asset once the full build is in the package.
"""

from __future__ import annotations

import json
import random
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from feedback_fixtures import make_lm, make_tokenizer
from rlhfgym.envs.build import feedback as bf
from rlhfgym.envs.build.training import train_judge_lm
from rlhfgym.envs.feedback import factories as fe
from rlhfgym.envs.assets import AssetError, asset_dir
from rlhfgym.envs.feedback.judge import ConstitutionJudge, answer_token_ids, as_constitution
from rlhfgym.envs.feedback.labelers import LabelerPopulation
from rlhfgym.envs.tasks.news import NewsTask

pytestmark = pytest.mark.slow  # the module's tiny build trains four models (about a minute on CPU)

PACKAGE_ROOT = asset_dir("micro-v0", must_exist=False)


@pytest.fixture(scope="module")
def task():
    return NewsTask()


@pytest.fixture(scope="module")
def world_root(tmp_path_factory):
    """A micro-v0-shaped root holding copies of the real frozen tokenizer and SFT policy."""
    if not (PACKAGE_ROOT / "sft").is_dir():
        pytest.skip("the frozen SFT asset is not in this checkout")
    root = tmp_path_factory.mktemp("assets") / "micro-v0"
    root.mkdir()
    for part in ("tokenizer", "sft"):
        shutil.copytree(PACKAGE_ROOT / part, root / part)
    return root


@pytest.fixture(scope="module")
def tiny(world_root):
    """Preference data and every feedback asset at a tiny scale (about a minute on one CPU thread)."""
    data = bf.build_preference_data(
        world_root, "cpu", 0, n_train_prompts=160, n_heldout_prompts=80, samples_per_prompt=2,
        temperatures=(0.7, 1.3), gen_batch_size=64, progress=False,
    )
    metrics = bf.build_all_feedback(
        world_root, "cpu", 0, data=data, rm_epochs=2, pm_epochs=2, batch_size=16, n_layers=1,
        judge_pairs=16, judge_epochs=1, judge_batch_size=16, cycle_prompts=200,
        overrides={"reward": {"lr": 3e-3}, "reward_fact": {"lr": 3e-3}, "preference": {"lr": 3e-3},
                   "judge": {"n_eval_pairs": 16, "n_constructed_eval_prompts": 4}},
        progress=False,
    )
    return world_root, data, metrics


# ----------------------------------------------------------------------------------------------
# preference data


def test_preference_data_pairs_labels_and_ceiling(tiny, task):
    _, data, _ = tiny
    m = data.metrics
    assert m["n_train_pairs"] == len(data.train) > 150 and m["n_heldout_pairs"] == len(data.heldout) > 75
    for pairs in (data.train, data.heldout):
        assert all(a != b for a, b in zip(pairs.a, pairs.b))  # identical samples are not a comparison
        i = len(pairs) // 2
        comps = task.gold_components(pairs.prompts[i], pairs.a[i])
        assert pairs.comp_a[i].tolist() == [comps[k] for k in ("coverage", "faithfulness", "distractor", "brevity")]
        assert set(np.unique(pairs.label)) <= {0, 1}
    # three annotators answer each training comparison (soft label = their mean probability), one
    # each held-out comparison (its click is what the Bayes ceiling is about)
    assert m["annotators_per_pair"] == 3
    assert all(name.count("+") == 2 for name in data.train.labeler) and all("+" not in n for n in data.heldout.labeler)
    assert 0.0 < data.train.prob.min() and data.train.prob.max() < 1.0
    # the population's probabilities: the Bayes ceiling is their mean max(p, 1 - p)
    p = data.heldout.p_pop
    c = m["bayes_ceiling"]
    assert c["exact"] == pytest.approx(float(np.mean(np.maximum(p, 1 - p))))
    assert 0.5 < c["exact"] <= 0.875 + 1e-9  # 25% flips cap any predictor at 87.5%
    assert abs(c["empirical"] - c["exact"]) < 4 * c["stderr"] + 0.02
    # the SFT policy writes better summaries at a lower temperature
    assert m["heldout_gold_by_temperature"]["0.7"] > m["heldout_gold_by_temperature"]["1.3"] + 0.2


def test_records_soft_for_training_hard_for_evaluation(tiny, tmp_path):
    _, data, _ = tiny
    soft, hard = data.train.records(soft=True), data.heldout.records(soft=False)
    assert len(soft) == len(data.train) and set(hard["label_prob"]) == {1.0}
    i = int(np.argmax(data.train.label))  # a pair where the labeler picked a
    assert soft["chosen"][i] == data.train.a[i] and soft["label_prob"][i] == pytest.approx(data.train.prob[i])
    # JSONL in our schema, readable by the preferences module
    path = soft.select(range(5)).to_jsonl(tmp_path / "train.jsonl")
    from rlhfgym.envs.feedback.preferences import load_preferences

    ds = load_preferences(path)
    assert ds["chosen"] == soft["chosen"][:5] and ds["label_prob"] == pytest.approx(soft["label_prob"][:5])


# ----------------------------------------------------------------------------------------------
# what the build wrote


def test_build_writes_assets_and_strict_json_metrics(tiny):
    root, _, metrics = tiny
    text = (root / "feedback_metrics.json").read_text()
    on_disk = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert set(on_disk) >= {"preference_data", "reward", "reward_fact", "preference", "judge", "preference_cycle", "asset_bytes"}
    assert on_disk["reward"]["heldout_accuracy"] == pytest.approx(metrics["reward"]["heldout_accuracy"])
    for name in ("reward", "reward_fact", "preference", "judge"):
        d = root / name
        assert (d / "model.safetensors").is_file() and (d / "build_metrics.json").is_file()
        for f in d.iterdir():  # shipped assets must be readable by everyone
            assert f.stat().st_mode & stat.S_IROTH, f
        assert json.loads((d / "config.json").read_text())["dtype"] == "float32"
        from safetensors import safe_open

        with safe_open(d / "model.safetensors", "pt") as f:  # stored as float16
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert not any(p.name.startswith(".") for p in root.iterdir())  # no temp dirs left behind
    # the size is taken before the metrics file itself is written
    assert metrics["asset_bytes"] == bf.asset_bytes(root) - (root / "feedback_metrics.json").stat().st_size


def test_reward_model_beats_chance_by_a_wide_margin(tiny):
    _, data, metrics = tiny
    m = metrics["reward"]
    n = len(data.heldout)
    # chance is 1/2 with a standard error of sqrt(1/4n) ~ 0.056 here; the labels' own noise caps
    # the accuracy at the Bayes ceiling (~0.83), agreement with the population's majority at 1
    assert n >= 75
    assert m["heldout_majority_agreement"] >= 0.7, m
    assert m["heldout_accuracy"] >= 0.6, m
    assert m["accuracy_over_ceiling"] == pytest.approx(m["heldout_accuracy"] / m["bayes_ceiling"])


def test_learned_factory_loads_what_the_build_wrote(tiny, task):
    root, data, metrics = tiny
    reward = fe.learned_reward(task, None, "cpu", root=root)
    assert next(reward.rm.model.parameters()).dtype == torch.float32
    h = data.heldout
    ra, rb = reward.score(h.prompts, h.a).numpy(), reward.score(h.prompts, h.b).numpy()
    decided = np.abs(h.p_pop - 0.5) > 1e-12
    agreement = float(((ra > rb) == (h.p_pop > 0.5))[decided].mean())
    assert agreement == pytest.approx(metrics["reward"]["heldout_majority_agreement"], abs=1e-9)  # the same model
    # centred on SFT samples at temperature 1 (what pi_ref writes)
    p, c = data.sft_train
    assert abs(float(reward.score(p, c).mean())) < 1e-4
    from rlhfgym.envs.rewards import RewardFunction

    assert isinstance(reward, RewardFunction)


def test_fact_reward_model_reads_the_facts(tiny, task):
    root, data, metrics = tiny
    reward = fe.fact_reward(task, None, "cpu", root=root)
    prompt = data.heldout.prompts[0]
    text = reward.rm.format_input(prompt, "x")
    key = [f for f in task.facts(prompt) if f.key]
    assert text.startswith(key[0].clause()) and text.endswith(prompt + " x")
    assert metrics["reward_fact"]["heldout_majority_agreement"] >= 0.7, metrics["reward_fact"]
    assert metrics["reward_fact"]["heldout_accuracy"] >= 0.6, metrics["reward_fact"]
    plain = fe.learned_reward(task, None, "cpu", root=root)
    assert not torch.allclose(reward.score(data.heldout.prompts[:8], data.heldout.a[:8]),
                              plain.score(data.heldout.prompts[:8], data.heldout.a[:8]))


def test_preference_model_is_antisymmetric_and_loads(tiny, task):
    root, data, metrics = tiny
    prefer = fe.make_prefer("learned", task, None, "cpu", root=root)
    h = data.heldout
    p_ab, p_ba = prefer(h.prompts, h.a, h.b), prefer(h.prompts, h.b, h.a)
    assert torch.allclose(p_ab + p_ba, torch.ones_like(p_ab), atol=1e-5)
    assert torch.allclose(prefer(h.prompts[:4], h.a[:4], h.a[:4]), torch.full((4,), 0.5), atol=1e-6)
    acc = float(((p_ab.numpy() > 0.5) == h.label.astype(bool)).mean())
    assert acc == pytest.approx(metrics["preference"]["heldout_accuracy"], abs=1e-9)
    assert metrics["preference"]["heldout_majority_agreement"] > 0.6, metrics["preference"]
    # the learned reward exposes the same oracle for Nash learning
    reward = fe.learned_reward(task, None, "cpu", root=root)
    assert torch.allclose(reward.prefer(h.prompts[:4], h.a[:4], h.b[:4]), p_ab[:4])


# ----------------------------------------------------------------------------------------------
# judge


def test_judge_asset_has_its_own_tokenizer_and_answers(tiny, task):
    root, data, metrics = tiny
    from transformers import PreTrainedTokenizerFast

    world = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    judge_tok = PreTrainedTokenizerFast.from_pretrained(root / "judge")
    world_vocab, judge_vocab = world.get_vocab(), judge_tok.get_vocab()
    assert all(judge_vocab[w] == i for w, i in world_vocab.items())  # the SFT embeddings keep their ids
    a_id, b_id = answer_token_ids(judge_tok, ("A", "B"))
    assert a_id >= len(world_vocab) and b_id >= len(world_vocab)
    for principle in as_constitution("micro"):  # every word of the constitution is known
        assert judge_tok.unk_token_id not in judge_tok(principle.text)["input_ids"]
    cfg = json.loads((root / "judge" / bf.JUDGE_CONFIG).read_text())
    assert [p["name"] for p in cfg["principles"]] == ["coverage", "faithfulness", "relevance", "brevity"]
    hm = metrics["judge"]["heldout"]
    assert {"labeler_agreement/all", "checker_agreement/coverage", "gold_agreement/all"} <= set(hm)
    # the swap test counts the (pair, principle) cases where the principle's own checker and the
    # checker of the text it is given instead disagree; each verdict then follows exactly one of them
    h, names = data.heldout, as_constitution("micro").names
    n_eval = min(16, len(h))  # the build's n_eval_pairs
    by_name = bf.checker_verdicts(h.comp_a[:n_eval], h.comp_b[:n_eval], names)
    by_text = bf.checker_verdicts(h.comp_a[:n_eval], h.comp_b[:n_eval], names[1:] + names[:1])
    swapped = metrics["judge"]["swapped_principles"]
    assert swapped["n"] == int(((by_name != 0.5) & (by_text != 0.5) & (by_name != by_text)).sum()) > 0
    assert swapped["follows_text"] + swapped["follows_name"] == pytest.approx(1.0)


def test_judge_reward_against_a_reference(tiny, task):
    root, data, _ = tiny
    reward = fe.judge_reward(task, None, "cpu", root=root, reference="expert")
    h = data.heldout
    s = reward.score(h.prompts[:6], h.a[:6])
    refs = reward.reference.batch(h.prompts[:6])
    assert s.shape == (6,) and s.dtype == torch.float32
    assert torch.allclose(s, reward.prefer(h.prompts[:6], h.a[:6], refs) - 0.5)
    # the judge asks both orders, so prefer(a, b) = 1 - prefer(b, a) exactly
    p, q = reward.prefer(h.prompts[:6], h.a[:6], h.b[:6]), reward.prefer(h.prompts[:6], h.b[:6], h.a[:6])
    assert torch.allclose(p + q, torch.ones(6), atol=1e-5)
    # the "expert" reference is the expert writer's summary of the parsed article: every key fact
    assert min(task.gold(h.prompts[:6], refs)) > 0.95


def _marker_judge_data(n: int, seed: int):
    """Pairs whose options carry one marker each ("good" or "bad"); principle "likes good" prefers the
    option with "good", "likes bad" the one with "bad": no answer is right under both."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(24)]
    prompts, a, b, a_good = [], [], [], []
    for _ in range(n):
        prompts.append("summarize : " + " ".join(rng.choices(words, k=3)) + " tl;dr :")
        good_first = rng.random() < 0.5
        options = []
        for marker in (("good", "bad") if good_first else ("bad", "good")):
            ws = rng.choices(words, k=rng.randint(1, 3))
            ws.insert(rng.randrange(len(ws) + 1), marker)
            options.append(" ".join(ws))
        a.append(options[0])
        b.append(options[1])
        a_good.append(good_first)
    return prompts, a, b, np.array(a_good)


MARKER_TEMPLATE = "{principle} : {prompt} ( A ) {a} ( B ) {b} ("
MARKER_PRINCIPLES = [{"name": "likes-good", "text": "w20 w21 good"}, {"name": "likes-bad", "text": "w20 w21 bad"}]


@pytest.fixture(scope="module")
def marker_judge():
    """A tiny LM trained with the build's judge trainer on the marker task (seconds on CPU)."""
    tok = make_tokenizer()
    model = make_lm(tok, seed=0, hidden=32, layers=2)
    model.config.pad_token_id = tok.pad_token_id
    constitution = as_constitution(MARKER_PRINCIPLES)
    P, A, B, a_good = _marker_judge_data(256, seed=0)
    verdicts = np.stack([a_good.astype(float), (~a_good).astype(float)])  # (K, N) P_k(a > b)
    build = lambda pr, x, ya, yb: ConstitutionJudge.build_prompt(  # noqa: E731
        type("T", (), {"template": MARKER_TEMPLATE})(), pr, x, ya, yb)
    texts, targets = bf.judge_examples(build, constitution, P, A, B, verdicts)
    history = train_judge_lm(model, tok, texts, targets, answer_token_ids(tok, ("A", "B")), epochs=6, lr=3e-3,
                             batch_size=32, device="cpu", seed=0, group_size=2 * len(constitution))
    return model, tok, history


def _judge(model, tok, principles, debias):
    return ConstitutionJudge(model, tok, principles, template=MARKER_TEMPLATE, answer_tokens=("A", "B"), debias=debias)


def test_trained_judge_flips_with_swapped_content(marker_judge):
    model, tok, history = marker_judge
    assert history[-1]["train_checker_accuracy"] > 0.95, history
    P, A, B, _ = _marker_judge_data(64, seed=1)
    judge = _judge(model, tok, MARKER_PRINCIPLES, debias=False)  # one order: no symmetrisation to lean on
    p_ab, p_ba = judge.per_principle(P, A, B), judge.per_principle(P, B, A)
    flipped = ((p_ab > 0.5) != (p_ba > 0.5)).float().mean()
    assert flipped > 0.9, flipped


def test_trained_judge_follows_the_principle_text(marker_judge):
    model, tok, _ = marker_judge
    P, A, B, a_good = _marker_judge_data(64, seed=2)
    judge = _judge(model, tok, MARKER_PRINCIPLES, debias=True)
    verdict = judge.per_principle(P, A, B).numpy() > 0.5
    assert (verdict[0] == a_good).mean() > 0.9 and (verdict[1] == ~a_good).mean() > 0.9
    # the same names with each other's text: verdicts follow the text, not the name
    swapped = [{"name": "likes-good", "text": MARKER_PRINCIPLES[1]["text"]}, {"name": "likes-bad", "text": MARKER_PRINCIPLES[0]["text"]}]
    verdict = _judge(model, tok, swapped, debias=True).per_principle(P, A, B).numpy() > 0.5
    assert (verdict[0] == ~a_good).mean() > 0.9 and (verdict[1] == a_good).mean() > 0.9


def _shipped(component: str) -> Path:
    try:
        from rlhfgym.envs.assets import load_micro_assets

        assets = load_micro_assets()
    except AssetError as e:
        pytest.skip(f"package assets unusable: {e}")
    if not any(rel.startswith(f"{component}/") for rel in assets.manifest["files"]):
        pytest.skip(f"the package assets have no {component}/ yet (run build_all_feedback)")
    return assets.root / component


def test_shipped_judge_reads_the_principle_text(task):
    """The full-scale judge: swapping principle texts moves its verdicts to the text's checker."""
    path = _shipped("judge")
    rng = random.Random(0)
    P, A, B = [], [], []
    for i in range(48):  # constructed pairs on which the principles disagree
        pool = bf._constructed(task, "test", i, rng)
        for x, y in (("cycle_A", "cycle_B"), ("cycle_B", "cycle_C"), ("cycle_C", "cycle_A")):
            P.append(task.prompt("test", i))
            A.append(pool[x])
            B.append(pool[y])
    memo = bf._Memo(task.gold_components)
    pairs = bf.PairSet(P, A, B, memo.array(P, A), memo.array(P, B), np.full(len(P), 0.5), np.full(len(P), 0.5),
                       np.zeros(len(P), dtype=int), ["-"] * len(P))
    swap = bf._swap_metrics(path, "cpu", pairs, as_constitution("micro"), 64)
    assert swap["n"] >= 50 and swap["follows_text"] > 0.7 and swap["follows_text"] > swap["follows_name"] + 0.3, swap
    judge = bf.load_judge(path, "cpu", debias=False)
    p_ab, p_ba = judge.per_principle(P, A, B), judge.per_principle(P, B, A)
    checks = bf.checker_verdicts(pairs.comp_a, pairs.comp_b, judge.constitution.names)
    decided = torch.as_tensor(checks != 0.5)
    assert ((p_ab > 0.5) != (p_ba > 0.5))[decided].float().mean() > 0.8


def test_shipped_reward_and_preference_models_agree_with_fresh_labels(task):
    """The shipped reward and preference models on 300 pairs they never saw: fresh samples of the
    SFT policy on validation prompts (seed 1, not the build's seed), labelled by the same labeler
    population. A random model agrees with the population's majority on half the decided pairs
    (standard error 0.03 here); the shipped ones measured about 0.85 and 0.77."""
    _shipped("reward")
    _shipped("preference")
    from rlhfgym.envs.assets import load_micro_assets
    from rlhfgym.envs.feedback.reward_model import pair_scores

    data = bf.build_preference_data(load_micro_assets().root, "cpu", 1, n_train_prompts=2, n_heldout_prompts=100,
                                    samples_per_prompt=3, gen_batch_size=300, progress=False)
    h = data.heldout
    assert len(h) >= 280  # 3 pairs per prompt, a few identical samples dropped
    decided = np.abs(h.p_pop - 0.5) > 1e-12
    clicks, majority = h.label.astype(bool), h.p_pop > 0.5
    reward = fe.learned_reward(task, None, "cpu")
    ra, rb = pair_scores(reward.rm, {"prompt": h.prompts, "chosen": h.a, "rejected": h.b})
    rm_a = (ra > rb).numpy()
    assert (rm_a == majority)[decided].mean() >= 0.75
    assert (rm_a == clicks).mean() >= 0.62  # the sampled clicks are noisy: the Bayes ceiling is about 0.8
    pm_a = fe.make_prefer("learned", task, None, "cpu")(h.prompts, h.a, h.b).numpy() > 0.5
    assert (pm_a == majority)[decided].mean() >= 0.68
    assert (pm_a == clicks).mean() >= 0.58


# ----------------------------------------------------------------------------------------------
# intransitive preferences


def test_measured_preference_cycle(task):
    out = bf.measure_preference_cycle(200)
    assert out["n"] == 200
    for key in ("P(A>B)", "P(B>C)", "P(C>A)"):
        assert out[key] > 0.55, out
    assert out["prompt_cycle_rate"] > 0.9
    # a single scalar utility (the gold labeler) cannot cycle on the same sets
    gold = bf.measure_preference_cycle(200, population="gold")
    assert not all(gold[k] > 0.5 for k in ("P(A>B)", "P(B>C)", "P(C>A)")), gold


def test_tiny_build_recorded_the_cycle(tiny):
    _, _, metrics = tiny
    assert all(metrics["preference_cycle"][k] > 0.5 for k in ("P(A>B)", "P(B>C)", "P(C>A)"))


def test_intransitive_reward_and_prefer(task, world_root):
    prompts = task.prompts("test", 8)
    sets = {k: [] for k in bf.CYCLE_SETS}
    for i in range(8):
        for k, v in bf.cycle_completions(task.example("test", i), random.Random(f"t{i}")).items():
            sets[k].append(v)
    reward = fe.intransitive_reward(task, None, "cpu", root=world_root, reference="B")
    assert float(reward.score(prompts, sets["A"]).mean()) > 0  # A beats the reference B
    assert float(reward.score(prompts, sets["C"]).mean()) < 0  # C loses to B
    cycle = [reward.prefer(prompts, sets[x], sets[y]).mean() for x, y in (("A", "B"), ("B", "C"), ("C", "A"))]
    assert all(p > 0.5 for p in cycle), cycle
    # the default reference is the SFT policy's greedy summary (generated once per prompt, cached)
    sft = fe.intransitive_reward(task, None, "cpu", root=world_root)
    s = sft.score(prompts[:3], sets["A"][:3])
    assert s.shape == (3,) and set(sft.reference._cache) == set(prompts[:3])
    assert torch.allclose(sft.score(prompts[:3], sft.reference.batch(prompts[:3])), torch.zeros(3))


def test_prefer_oracles_by_name(task, tiny):
    root, data, _ = tiny
    for name in ("intransitive", "alpacafarm", "gold", "judge", "learned"):
        prefer = fe.make_prefer(name, task, None, "cpu", root=root)
        p = prefer(data.heldout.prompts[:3], data.heldout.a[:3], data.heldout.b[:3])
        assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    with pytest.raises(ValueError, match="unknown preference oracle"):
        fe.make_prefer("nope", task)


# ----------------------------------------------------------------------------------------------
# registration, sizes, helpers, errors


def test_registration_names_every_feedback_reward_model():
    pytest.importorskip("gymnasium")
    from rlhfgym.envs import registration

    for name in ("learned", "fact", "judge", "intransitive"):
        assert registration.REWARD_MODELS[name] is fe.REWARD_FACTORIES[name]
    registered = {kw["reward_model"] for kw in registration.ENV_IDS.values()} - {"gold"}
    assert registered <= set(fe.REWARD_FACTORIES)  # every registered id's reward has a factory


def test_full_size_models_fit_the_asset_budget(world_root, tmp_path):
    """Four 3-layer float16 models (the full build's size) next to the SFT model stay under 25 MB."""
    from transformers import PreTrainedTokenizerFast

    model = bf.truncated_backbone(world_root / "sft", 3)
    assert model.config.num_hidden_layers == 3
    tok, added = bf.extend_tokenizer(PreTrainedTokenizerFast.from_pretrained(world_root / "tokenizer"),
                                     bf.judge_words("micro", "{principle} {prompt} ( A ) {a} ( B ) {b} the answer is : (", ("A", "B")))
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    bf._store_fp16(tmp_path, model)
    one = (tmp_path / "model.safetensors").stat().st_size
    sft = bf.asset_bytes(world_root / "sft") + bf.asset_bytes(world_root / "tokenizer")
    # reward, reward_fact, preference, judge: a model plus a tokenizer copy and small json files each
    assert sft + 4 * (one + 20_000) <= bf.SIZE_LIMIT_BYTES, (sft, one)
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert back.dtype == torch.float32  # float16 on disk, float32 in memory


def test_truncated_backbone_keeps_the_lower_layers(world_root):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(world_root / "sft")
    cut = bf.truncated_backbone(world_root / "sft", 2)
    assert len(cut.model.layers) == 2
    assert torch.equal(cut.model.layers[1].mlp.up_proj.weight, full.model.layers[1].mlp.up_proj.weight)
    assert cut.lm_head.weight.data_ptr() == cut.model.embed_tokens.weight.data_ptr()  # still tied
    with pytest.raises(ValueError, match="n_layers"):
        bf.truncated_backbone(world_root / "sft", 0)


def test_extend_tokenizer_appends_whole_words(world_root):
    from transformers import PreTrainedTokenizerFast

    world = PreTrainedTokenizerFast.from_pretrained(world_root / "tokenizer")
    tok, added = bf.extend_tokenizer(world, ["more", "summary", "A", "("])
    assert "more" not in added and added == ["summary", "A", "("]  # "more" is a world word already
    text = "in dunmore , more summary ( A"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == len(text.split())  # whole words only
    assert world(text.replace(" summary ( A", ""))["input_ids"] == ids[:4]


def test_samples_pair_up_all_or_consecutive():
    samples = [["a", "b", "c", "a"], ["x", "x"]]
    P, A, B, dropped = bf._pairs(["p", "q"], samples, "all")
    assert list(zip(A, B)) == [("a", "b"), ("a", "c"), ("b", "c"), ("b", "a"), ("c", "a")] and P == ["p"] * 5
    assert dropped == 2  # ("a", "a") of p and ("x", "x") of q are no comparison
    P, A, B, dropped = bf._pairs(["p", "q"], samples, "consecutive")
    assert list(zip(A, B)) == [("a", "b"), ("c", "a")] and dropped == 1
    with pytest.raises(ValueError, match="pairing must be"):
        bf._pairs(["p"], [["a", "b"]], "random")


def test_several_annotators_give_the_mean_probability_and_the_majority_click():
    def components(prompt, completion):
        return {"coverage": len(completion.split()) / 10, "faithfulness": 0.0, "distractor": 0.0, "brevity": 0.0}

    memo = bf._Memo(components)
    pop = LabelerPopulation.preset("alpacafarm", components_fn=memo, flip_prob=0.25)
    P, A, B = ["p"] * 200, ["a b c"] * 200, ["a"] * 200
    pairs = bf._label(pop, memo, P, A, B, np.random.default_rng(0), annotators=3)
    rng = np.random.default_rng(0)
    answers = [pop.label(P, A, B, rng=rng) for _ in range(3)]
    assert np.allclose(pairs.prob, np.mean([x.prob for x in answers], axis=0))
    assert np.array_equal(pairs.label, (np.sum([x.label for x in answers], axis=0) >= 2).astype(int))
    assert pairs.labeler[0].count("+") == 2 and np.allclose(pairs.p_pop, answers[0].prob_population)


def test_checker_verdicts_map_principles_to_components():
    ca = np.array([[0.8, 0.0, -0.25, 0.0], [0.4, -0.15, 0.0, -0.1]])
    cb = np.array([[0.4, -0.15, 0.0, 0.0], [0.4, -0.15, 0.0, 0.0]])
    v = bf.checker_verdicts(ca, cb, ["coverage", "faithfulness", "relevance", "brevity"])
    assert v.tolist() == [[1.0, 0.5], [1.0, 0.5], [0.0, 0.5], [0.5, 0.0]]
    with pytest.raises(ValueError, match="no checker"):
        bf.checker_verdicts(ca, cb, ["humour"])


def test_missing_assets_say_how_to_build_them(tmp_path, task):
    with pytest.raises(FileNotFoundError, match="build-assets"):
        bf.build_reward_model(tmp_path, "cpu", data=None, progress=False)
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(AssetError, match="build_all_feedback"):
        fe.learned_reward(task, None, "cpu", root=tmp_path)
    with pytest.raises(ValueError, match="unknown reference"):
        fe.ReferenceCompletions("nobody")
