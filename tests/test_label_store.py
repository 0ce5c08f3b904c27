"""The labeling database (rlhfgym.envs.feedback.store) on SQLite, and on a real PostgreSQL server
when .ci/run started one (RLHFGYM_TEST_POSTGRES_URL): serving, answers, undo, double submits,
concurrent labelers, overlap, the admin numbers, schema versions and unreachable databases."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

pytest.importorskip("sqlalchemy", reason="the labeling database needs the label extra: pip install 'rlhf-gym[label]'")

from rlhfgym.envs.feedback.store import (  # noqa: E402
    AlreadyLabelled,
    OutOfOrder,
    PreferenceStore,
    StoreError,
    UnknownPair,
    read_preferences,
)

POSTGRES_ENV = "RLHFGYM_TEST_POSTGRES_URL"


def _pairs(n: int):
    return [f"summarize : article {i} . tl;dr :" for i in range(n)], [f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)]


@pytest.fixture
def store(tmp_path):
    s = PreferenceStore(f"sqlite:///{tmp_path / 'prefs.db'}")
    yield s
    s.close()


@pytest.fixture
def postgres_url():
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"no PostgreSQL server: {POSTGRES_ENV} is not set (.ci/run installs Debian's postgresql, starts it "
                    "and exports it; apt was unavailable or this is not a CI run)")
    import sqlalchemy as sa

    from rlhfgym.envs.feedback.store import Base

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    Base.metadata.drop_all(engine)  # a clean database for every test
    with engine.begin() as c:
        c.execute(sa.text("DROP TABLE IF EXISTS rlhfgym_meta"))
    engine.dispose()
    return url


def test_a_session_of_answers_undo_and_double_submit(store):
    prompts, a, b = _pairs(3)
    assert store.add_pairs(prompts, a, b, rm_a=[1.0, 0.0, 0.5], rm_b=[0.0, 1.0, 0.5]) == 3
    assert store.add_pairs(prompts, a, b) == 0  # idempotent: a restarted command adds nothing twice
    first = store.next_pair("alice", seed=0)
    assert store.next_pair("alice", seed=1) == first  # a reload shows the same pair and the same order
    assert {first.left, first.right} == {a[first.pair_id - 1], b[first.pair_id - 1]}
    progress = store.record("alice", first.pair_id, "left")
    assert (progress.done, progress.total, progress.mine) == (1, 3, 1)
    with pytest.raises(AlreadyLabelled, match="already labelled"):
        store.record("alice", first.pair_id, "right")
    # "left" is stored as the pair's own completion that was shown on the left
    (pair, label), = store.answers()
    assert label.choice == ("a" if first.left_is_a else "b") and label.left_is_a == first.left_is_a

    second = store.next_pair("alice")
    assert second.pair_id != first.pair_id
    assert store.undo("alice") == first.pair_id  # the last answer is taken back ...
    assert store.answers() == []
    assert store.next_pair("alice").pair_id == first.pair_id  # ... and that pair comes back first
    store.record("alice", first.pair_id, "tie")
    rows = store.preference_records()
    assert rows[0]["label_prob"] == 0.5 and rows[0]["labeler_id"] == "alice"


def test_bad_requests_name_the_problem(store):
    prompts, a, b = _pairs(2)
    store.add_pairs(prompts, a, b)
    with pytest.raises(UnknownPair, match="unknown pair id 99"):
        store.record("alice", 99, "left")
    with pytest.raises(OutOfOrder, match="was not served to labeler 'alice'"):
        store.record("alice", 1, "left")  # never served to alice
    served = store.next_pair("alice")
    with pytest.raises(StoreError, match="not one of"):
        store.record("alice", served.pair_id, "maybe")
    with pytest.raises(StoreError, match="labeler id"):
        store.next_pair("robert'); DROP TABLE labels;--")
    with pytest.raises(OutOfOrder, match="no answer to undo"):
        store.undo("bob")
    with pytest.raises(StoreError, match="mismatched lengths"):
        store.add_pairs(["x"], ["a", "b"], ["c"])


def test_everything_labelled_and_skips_are_not_preferences(store):
    prompts, a, b = _pairs(2)
    store.add_pairs(prompts, a, b)
    for choice in ("skip", "right"):
        store.record("alice", store.next_pair("alice").pair_id, choice)
    assert store.next_pair("alice") is None
    assert len(store.preference_records()) == 1  # the skip is not a preference
    alice = store.stats()["labelers"]["alice"]
    assert (alice["skip"], alice["a"] + alice["b"], alice["tie"], alice["total"]) == (1, 1, 0, 2)


def test_overlap_agreement_and_reward_model_agreement(store):
    prompts, a, b = _pairs(10)
    # every pair planned for two labelers; the env's reward model prefers a on every pair
    store.add_pairs(prompts, a, b, rm_a=[1.0] * 10, rm_b=[0.0] * 10, overlap=1.0, labelers_per_overlap=2)
    assert store.progress().total == 20
    seen = {"alice": set(), "bob": set(), "carol": set()}
    for who in ("alice", "bob"):
        while (pair := store.next_pair(who)) is not None:
            seen[who].add(pair.pair_id)
            # alice always picks a; bob picks a on the first five pairs and b on the rest
            want_a = who == "alice" or pair.pair_id <= 5
            store.record(who, pair.pair_id, "left" if pair.left_is_a == want_a else "right")
    assert seen["alice"] == seen["bob"] == set(range(1, 11))  # each saw every pair once
    assert store.next_pair("carol") is None  # both slots of every pair are taken
    stats = store.stats()
    assert stats["pairs_labelled_more_than_once"] == 10
    assert stats["inter_annotator_agreement"] == pytest.approx(0.5)
    assert stats["reward_model_agreement"] == pytest.approx(15 / 20)
    assert stats["labelers"]["bob"]["a"] == 5 and stats["labelers"]["bob"]["b"] == 5


def test_partial_overlap_plans_extra_labels_for_about_that_fraction(store):
    prompts, a, b = _pairs(400)
    store.add_pairs(prompts, a, b, overlap=0.25, labelers_per_overlap=3, seed=0)
    extra = store.progress().total - 400
    assert 2 * 60 <= extra <= 2 * 140  # 2 extra slots on ~100 of the 400 pairs


def _hammer(url: str, labelers: int = 4, pairs: int = 30):
    """``labelers`` threads, each with its own connection pool, label as fast as they can."""
    with PreferenceStore(url) as s:
        s.add_pairs(*_pairs(pairs))
    errors, answered = [], {}

    def work(name: str):
        try:
            with PreferenceStore(url) as s:
                n = 0
                while (pair := s.next_pair(name)) is not None:
                    s.record(name, pair.pair_id, "left")
                    n += 1
                answered[name] = n
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(f"lab{k}",)) for k in range(labelers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with PreferenceStore(url) as s:
        answers = s.answers()
    pair_ids = [p.id for p, _ in answers]
    assert len(pair_ids) == len(set(pair_ids)) == pairs  # every pair labelled exactly once: no double count
    assert sum(answered.values()) == pairs


def test_concurrent_labelers_never_double_count_on_sqlite(tmp_path):
    _hammer(f"sqlite:///{tmp_path / 'prefs.db'}")


def test_postgresql_server(postgres_url):
    _hammer(postgres_url)
    with PreferenceStore(postgres_url) as s:
        assert s.schema_version == 1
        assert len(s.preference_records()) == 30
    ds = read_preferences(postgres_url)
    assert len(ds) == 30 and set(ds["label_prob"]) == {1.0}


def test_schema_version_and_foreign_databases_are_refused(tmp_path):
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.db'}"
    PreferenceStore(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE rlhfgym_meta SET value = '7' WHERE key = 'schema_version'"))
    engine.dispose()
    with pytest.raises(StoreError, match="schema version 7, but this rlhf-gym reads version 1"):
        PreferenceStore(url)

    other = f"sqlite:///{tmp_path / 'other.db'}"
    engine = sa.create_engine(other)
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE pairs (x INTEGER)"))
    engine.dispose()
    with pytest.raises(StoreError, match="not an rlhf-gym labeling database"):
        PreferenceStore(other)


def test_unreachable_or_empty_databases_fail_in_one_line(tmp_path):
    with pytest.raises(StoreError, match="cannot open database postgresql://nobody@127.0.0.1:1/x: .*check that the server runs"):
        PreferenceStore("postgresql://nobody@127.0.0.1:1/x")
    with pytest.raises(StoreError, match="is not a database URL"):
        PreferenceStore("prefs.db")
    with pytest.raises(StoreError, match="cannot open database"):
        PreferenceStore(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(StoreError, match="holds no labeling data"):
        read_preferences(empty)
    PreferenceStore(empty).close()
    with pytest.raises(StoreError, match="no answered labels yet"):
        read_preferences(empty)


def test_a_random_labeler_name_cannot_collide(store):
    # ids are free-form within the allowed characters; unicode or spaces are refused, not mangled
    for bad in ("", "a b", "é", "x" * 65, None):
        with pytest.raises(StoreError):
            store.next_pair(bad)
    assert store.next_pair(uuid.uuid4().hex) is None  # a valid id on an empty store: nothing to label
