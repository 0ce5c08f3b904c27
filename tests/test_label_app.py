"""The labeling app's HTTP API (FastAPI TestClient), the ``rlhf-zoo label`` command, active selection,
and training from the database: export, the reward-model build and DPO's ``dataset=`` URL."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the labeling page needs the label extra: pip install 'rlhf-gym[label]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the label extra)")

from fastapi.testclient import TestClient  # noqa: E402

from rlhfgym.envs.feedback.store import PreferenceStore  # noqa: E402
from rlhfgym.zoo.cli import main  # noqa: E402
from rlhfgym.zoo.label.app import create_app  # noqa: E402

PROMPTS = [f"summarize : ben built {i} boats in holt . tl;dr :" for i in range(1, 7)]
GOOD = [f"ben built {i} boats in holt ." for i in range(1, 7)]
BAD = ["nadia sold ovens ." for _ in range(6)]


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    with PreferenceStore(url) as s:
        s.add_pairs(PROMPTS, GOOD, BAD, rm_a=[1.0] * 6, rm_b=[0.0] * 6)
    return url


@pytest.fixture
def client(db):
    store = PreferenceStore(db)
    with TestClient(create_app(store, seed=0), raise_server_exceptions=False) as c:
        yield c
    store.close()


def label_all(client, labeler: str, pick_good: bool = True) -> int:
    n = 0
    while not (pair := client.get("/api/next", params={"labeler": labeler}).json())["done"]:
        good_left = pair["left"] in GOOD
        choice = "left" if good_left == pick_good else "right"
        r = client.post("/api/label", json={"labeler": labeler, "pair_id": pair["pair_id"], "choice": choice})
        assert r.status_code == 200, r.text
        n += 1
    return n


def test_api_session_and_admin_numbers(client):
    assert label_all(client, "alice") == 6
    stats = client.get("/api/stats").json()
    assert stats["labelers"]["alice"]["a"] == 6  # "left"/"right" were mapped back to the pair's own a
    assert stats["reward_model_agreement"] == 1.0
    page = client.get("/admin")
    assert page.status_code == 200 and "alice" in page.text and "6 of 6 planned labels answered" in page.text
    assert client.get("/", params={"labeler": "alice"}).status_code == 200


@pytest.mark.parametrize("method, path, body, status, message", [
    ("post", "/api/label", {"labeler": "alice", "pair_id": 999, "choice": "left"}, 404, "unknown pair id 999"),
    ("post", "/api/label", {"labeler": "alice", "pair_id": 1, "choice": "left"}, 409, "was not served to labeler"),
    ("post", "/api/label", {"labeler": "alice", "pair_id": "one", "choice": "left"}, 400, "pair_id: Input should be a valid integer"),
    ("post", "/api/label", {"labeler": "alice", "pair_id": 1}, 400, "choice: Field required"),
    ("post", "/api/label", {"labeler": "alice", "pair_id": 1, "choice": "left", "x": 1}, 400, "x: Extra inputs"),
    ("post", "/api/label", b"{not json", 400, "bad request"),
    ("post", "/api/label", {"labeler": "a b", "pair_id": 1, "choice": "left"}, 400, "labeler id 'a b' is not valid"),
    ("post", "/api/undo", {"labeler": "alice"}, 409, "no answer to undo"),
    ("get", "/api/next", None, 400, "add ?labeler=YOUR_ID"),
    ("get", "/api/label", None, 405, "method not allowed"),
    ("get", "/nowhere", None, 404, "no such page"),
])
def test_bad_requests_get_one_line_errors_never_a_traceback(client, method, path, body, status, message):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error and "\n" not in error and "Traceback" not in error


def test_double_submit_and_an_out_of_order_label(client):
    pair = client.get("/api/next", params={"labeler": "alice"}).json()
    body = {"labeler": "alice", "pair_id": pair["pair_id"], "choice": "right"}
    assert client.post("/api/label", json=body).status_code == 200
    again = client.post("/api/label", json=body)
    assert again.status_code == 409 and "already labelled" in again.json()["error"]
    assert client.get("/api/stats").json()["progress"]["done"] == 1  # counted once


def test_an_unreachable_database_mid_session_is_a_503_not_a_traceback(db):
    store = PreferenceStore(db)
    client = TestClient(create_app(store), raise_server_exceptions=False)
    store.engine.dispose()
    store.engine.url = store.engine.url.set(database="/nonexistent/dir/prefs.db")  # the file system went away
    from sqlalchemy import create_engine

    store.Session.configure(bind=create_engine(store.engine.url))
    r = client.get("/api/next", params={"labeler": "alice"})
    assert r.status_code == 503 and "database is unreachable" in r.json()["error"]


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["label", "--db", "postgresql://nobody@127.0.0.1:1/prefs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-zoo: error: cannot open database postgresql://nobody@127.0.0.1:1/prefs") and err.count("\n") == 1
    assert main(["label", "--db", "prefs.db"]) == 2
    assert "is not a database URL" in capsys.readouterr().err
    assert main(["label", "--db", f"sqlite:///{tmp_path / 'new.db'}", "--port", "8123"]) == 2
    assert "has no pairs to label; add some with --pairs FILE" in capsys.readouterr().err
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "x", "completion_a": "y"}\n')
    assert main(["label", "--db", f"sqlite:///{tmp_path / 'new.db'}", "--pairs", str(bad)]) == 2
    assert "line 1: missing field(s) ['completion_b']" in capsys.readouterr().err
    assert main(["label", "--db", "sqlite:///x.db", "--from-policies", "sft,sft"]) == 2
    assert "add --env ID" in capsys.readouterr().err


def test_pairs_file_import_then_export(tmp_path, capsys):
    from rlhfgym.envs.feedback.preferences import load_preferences
    from rlhfgym.zoo.label.serve import label_command

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": p, "completion_a": g, "completion_b": b})
                               for p, g, b in zip(PROMPTS, GOOD, BAD)) + "\n")
    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    summary = label_command(url, pairs=str(pairs), overlap=0.5, serve=False)
    assert summary["added"] == 6 and summary["progress"]["total"] > 6  # some pairs planned for two labelers
    assert label_command(url, pairs=str(pairs), serve=False)["added"] == 0  # restart: nothing added twice
    with PreferenceStore(url) as store:
        client = TestClient(create_app(store))
        label_all(client, "alice")
        label_all(client, "bob", pick_good=False)
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "--db", url, "--export", str(out)]) == 0
    ds = load_preferences(out)  # the project's preference format
    assert len(ds) == 6 + (summary["progress"]["total"] - 6)
    by = {lab: [c for c, who in zip(ds["chosen"], ds["labeler_id"]) if who == lab] for lab in ("alice", "bob")}
    assert set(by["alice"]) <= set(GOOD) and set(by["bob"]) <= set(BAD) and len(by["alice"]) == 6


def test_active_selector_serves_the_most_disputed_pairs_first(tmp_path):
    from rlhfgym.zoo.label.active import ActiveSelector, PairFeatures

    rng = np.random.default_rng(0)
    n, d = 60, 4
    with PreferenceStore(f"sqlite:///{tmp_path / 'a.db'}") as store:
        store.add_pairs([f"p{i}" for i in range(n)], [f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)])
        ids = [p.id for p in store.pairs()]
        phi_a, phi_b = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        phi_a[:, 0] += 3.0  # a is clearly better on feature 0 ...
        phi_a[-10:, 0] = phi_b[-10:, 0]  # ... except on the last ten pairs, which the data never decides
        features = PairFeatures(ids, phi_a, phi_b)
        selector = ActiveSelector(store, features, warmup=10, refit_every=5, seed=0)
        client = TestClient(create_app(store, order=selector, seed=0))
        for _ in range(20):
            pair = client.get("/api/next", params={"labeler": "sim"}).json()
            i = ids.index(pair["pair_id"])
            a_wins = phi_a[i, 0] > phi_b[i, 0]
            choice = "left" if (pair["left"] == f"a{i}") == a_wins else "right"
            client.post("/api/label", json={"labeler": "sim", "pair_id": pair["pair_id"], "choice": choice})
        assert selector.fits >= 2
        candidates = [p for p in ids if p not in {x.id for x, _ in store.answers()}]
        ranked = selector(candidates)  # (refits on all 20 answers first)
        var = selector.ensemble.disagreement(features.rows(candidates))
        assert ranked[0] == candidates[int(np.argmax(var))]  # the most disputed pair is served first
        assert list(np.sort(var)[::-1]) == list(var[[candidates.index(p) for p in ranked]])
        assert ranked != candidates  # not the random serving order
