"""The micro news world: determinism, disjoint splits, and a gold scorer that can be trusted."""

import random

import pytest

from rlhfgym.envs.tasks.news import (
    ACTIONS,
    NewsTask,
    gold_components,
    gold_score,
    lead_summary,
    parse_article,
    world_words,
)


@pytest.fixture(scope="module")
def task():
    return NewsTask()


def test_same_index_same_article_and_seed_changes_world(task):
    assert task.prompt("train", 7) == task.prompt("train", 7)
    assert task.reference("train", 7) == task.reference("train", 7)
    assert NewsTask(seed=1).prompt("train", 7) != task.prompt("train", 7)
    assert len({task.prompt("test", i) for i in range(50)}) == 50


def test_splits_are_disjoint_by_key_facts(task):
    keys = {s: {tuple(f.slots() for f in task.example(s, i).key_facts) for i in range(400)}
            for s in ("train", "validation", "test")}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]


def test_unknown_split_and_out_of_range_index(task):
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task.prompt("dev", 0)
    with pytest.raises(IndexError, match="outside split 'test'"):
        task.example("test", task.split_size("test"))


def test_articles_parse_back_into_their_facts(task):
    for i in range(200):
        article = task.example("validation", i)
        assert parse_article(article.prompt) == article.facts
        assert 2 <= len(article.key_facts) <= 3
        assert 3 <= len(article.text.split(" . ")) <= 6  # 2-3 key facts, 1-2 background, 0-1 filler


def test_gold_scores_the_writers_in_order(task):
    def mean(writer):
        return sum(task.gold_one(task.prompt("test", i), task.reference("test", i, writer)) for i in range(200)) / 200

    expert, omitter = mean("expert"), mean("omitter")
    assert expert > 0.95
    assert omitter < expert - 0.25
    lead = sum(task.gold_one(a.prompt, lead_summary(a)) for a in (task.example("test", i) for i in range(200))) / 200
    assert lead < 0.5 < expert  # copying the first sentences is a weak strategy


def test_gold_penalises_inventions_distractors_and_length(task):
    article = task.example("test", 3)
    prompt = article.prompt
    perfect = " ".join(f.clause() for f in article.key_facts)
    assert gold_score(prompt, perfect) == pytest.approx(1.0)
    # a synonym of the verb and the passive voice are just as good
    f = article.key_facts[0]
    passive = f"{f.number} {f.obj} were {ACTIONS[f.action][1]} by {f.actor} in {f.place} ."
    assert gold_score(prompt, perfect.replace(f.clause(), passive)) == pytest.approx(1.0)
    # an invented number loses that component and is penalised
    unused = next(str(n) for n in range(2, 100) if str(n) not in prompt.split())
    wrong = perfect.replace(f" {f.number} ", f" {unused} ", 1)
    parts = gold_components(prompt, wrong)
    assert parts["faithfulness"] < 0 and parts["coverage"] < 1
    # retelling background is penalised
    background = [g for g in article.facts if not g.key]
    with_background = perfect + " " + background[0].clause()
    assert gold_components(prompt, with_background)["distractor"] < 0
    # rambling is penalised
    assert gold_components(prompt, perfect + " the market was busy ." * 5)["brevity"] < 0
    # a bag of every word cannot cover several facts at once
    bag = " ".join(sorted(set(prompt.split())))
    assert gold_score(prompt, bag) < 0.4


@pytest.mark.parametrize("garbage", ["", "   ", "\x00\n\t", "tl;dr : tl;dr :", "9" * 500, "mara " * 300, None, 12345])
def test_gold_is_robust_to_any_string(task, garbage):
    score = task.gold_one(task.prompt("test", 0), garbage)
    assert -1.0 <= score <= 0.1


def test_random_token_strings_score_low(task):
    rng = random.Random(0)
    words = world_words()
    prompt = task.prompt("test", 1)
    scores = [gold_score(prompt, " ".join(rng.choices(words, k=rng.randrange(1, 40)))) for _ in range(300)]
    assert max(scores) <= 1.0 and min(scores) >= -1.0
    assert sum(scores) / len(scores) < 0.1
