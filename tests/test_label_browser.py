"""The labeling page in a real browser: Debian's chromium driven by Playwright for Python against a
live ``rlhf-zoo label`` server (a subprocess, so it can be killed with SIGKILL), with the database
checked row by row. Skipped, with the reason, where chromium or Playwright is missing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the labeling page needs the label extra: pip install 'rlhf-gym[label]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need Playwright: pip install playwright")

from rlhfgym.envs.feedback.store import PreferenceStore  # noqa: E402

CHROMIUM = os.environ.get("RLHFGYM_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
N_PAIRS = 6
PROMPTS = [f"summarize : today , ben built {i} boats in holt . tl;dr :" for i in range(1, N_PAIRS + 1)]
A = [f"ben built {i} boats in holt ." for i in range(1, N_PAIRS + 1)]
B = [f"nadia sold {i} ovens ." for i in range(1, N_PAIRS + 1)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``rlhf-zoo label --db URL --port P`` in a subprocess."""

    def __init__(self, db: str, tmp: Path):
        self.db, self.port, self.log = db, _free_port(), tmp / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "rlhfgym.zoo.cli", "label", "--db", self.db,
                                          "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/stats", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not answer within 60 s:\n{self.log.read_text()}")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: install Debian's (apt-get install -y chromium; .ci/run does) or set "
                    "RLHFGYM_TEST_CHROMIUM")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def server(tmp_path):
    db = f"sqlite:///{tmp_path / 'prefs.db'}"
    with PreferenceStore(db) as store:
        store.add_pairs(PROMPTS, A, B, rm_a=[1.0] * N_PAIRS, rm_b=[0.0] * N_PAIRS, overlap=1.0, labelers_per_overlap=2)
    srv = Server(db, tmp_path).start()
    yield srv
    srv.stop()


def rows(db: str) -> list[tuple[int, str, str, bool]]:
    """(pair id, labeler, choice, left_is_a) of every answered label, in answer order."""
    with PreferenceStore(db) as store:
        return [(p.id, lab.labeler, lab.choice, lab.left_is_a) for p, lab in store.answers()]


def shown(page) -> tuple[int, str, str]:
    """The pair id on screen and its two completions (left, right)."""
    return int(page.locator("#task").get_attribute("data-pair-id")), page.inner_text("#left"), page.inner_text("#right")


def expect_progress(page, done: int, mine: int) -> None:
    sync_api.expect(page.locator("#progress")).to_have_text(f"{done} of {2 * N_PAIRS} labelled · you: {mine}")


def side_of(pair_text: str, left: str) -> str:
    return "a" if pair_text == left else "b"


def test_keyboard_mouse_undo_and_the_database_rows(browser, server):
    page = browser.new_page()
    page.goto(f"{server.url}/")
    page.fill("#labeler", "alice")
    page.click("#start-btn")  # the mouse
    expect_progress(page, 0, 0)
    expected = []

    pid, left, right = shown(page)
    assert page.inner_text("#prompt") == PROMPTS[pid - 1] and {left, right} == {A[pid - 1], B[pid - 1]}
    page.keyboard.press("1")  # left is better
    expected.append((pid, "alice", side_of(A[pid - 1], left)))
    expect_progress(page, 1, 1)

    pid, left, right = shown(page)
    page.click("#btn-right")  # the mouse: B (right) is better
    expected.append((pid, "alice", side_of(A[pid - 1], right)))
    expect_progress(page, 2, 2)

    pid, left, right = shown(page)
    page.keyboard.press(" ")  # skip, right after a mouse click: one answer, not a second "click" of that button
    expected.append((pid, "alice", "skip"))
    expect_progress(page, 3, 3)

    pid4, left, right = shown(page)
    page.keyboard.press("3")  # tie
    expect_progress(page, 4, 4)
    page.keyboard.press("u")  # undo the tie: that pair comes back
    expect_progress(page, 3, 3)
    assert shown(page)[0] == pid4
    page.keyboard.press("2")
    expected.append((pid4, "alice", side_of(A[pid4 - 1], right)))
    expect_progress(page, 4, 4)

    got = rows(server.db)
    assert [(p, who, c) for p, who, c, _ in got] == expected
    assert len({p for p, *_ in got}) == 4  # four different pairs
    page.goto(f"{server.url}/admin")
    sync_api.expect(page.locator("[data-testid=admin-progress]")).to_have_text("4 of 12 planned labels answered")
    assert "alice" in page.inner_text("[data-testid=labelers]")
    page.close()


def test_kill_9_between_clicks_loses_nothing(browser, server):
    page = browser.new_page()
    page.goto(f"{server.url}/?labeler=bob")  # the id from the URL starts the session
    expect_progress(page, 0, 0)
    for k in (1, 2):
        page.keyboard.press("1")
        expect_progress(page, k, k)  # the page advanced: that answer is committed
    on_screen = shown(page)[0]
    server.kill9()  # between clicks: no shutdown, no flush
    before = rows(server.db)
    assert len(before) == 2 and all(who == "bob" for _, who, _, _ in before)

    page.keyboard.press("1")  # the server is gone: the page says so and stays on the pair
    sync_api.expect(page.locator("#error")).to_contain_text("cannot reach the labeling server")
    assert shown(page)[0] == on_screen

    server.start()
    page.reload()
    expect_progress(page, 2, 2)  # every committed label is there
    assert shown(page)[0] == on_screen  # and the next pair is served: the one bob had on screen
    page.keyboard.press("2")
    expect_progress(page, 3, 3)
    after = rows(server.db)
    assert after[:2] == before and after[2][:2] == (on_screen, "bob")
    page.close()


def test_two_labelers_at_once(browser, server):
    pages = {}
    for who in ("alice", "bob"):
        context = browser.new_context()  # separate storage: two people
        pages[who] = context.new_page()
        pages[who].goto(f"{server.url}/?labeler={who}")
        expect_progress(pages[who], 0, 0)
    for step in range(N_PAIRS):  # interleaved clicks until both have seen every pair
        for who, key in (("alice", "1"), ("bob", "2")):
            pages[who].keyboard.press(key)
            sync_api.expect(pages[who].locator("#progress")).to_contain_text(f"you: {step + 1}")
    for who in pages:
        sync_api.expect(pages[who].locator("#done")).to_be_visible()
    got = rows(server.db)
    assert len(got) == 2 * N_PAIRS
    for who in ("alice", "bob"):
        assert sorted(p for p, w, _, _ in got if w == who) == list(range(1, N_PAIRS + 1))  # each pair once per labeler
    for page in pages.values():
        page.context.close()


def test_bad_input_on_the_page(browser, server):
    page = browser.new_page()
    page.goto(f"{server.url}/")
    page.fill("#labeler", "not valid!")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#error")).to_contain_text("enter a labeler id")
    page.fill("#labeler", "carol")
    page.click("#start-btn")
    expect_progress(page, 0, 0)
    page.click("#btn-undo")  # nothing to undo yet
    sync_api.expect(page.locator("#error")).to_contain_text("has no answer to undo")
    # a stale tab: another request answered this pair meanwhile -> the page says so and moves on
    pid = shown(page)[0]
    answer = page.evaluate("""async (pid) => {
        const r = await fetch('/api/label', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                            body: JSON.stringify({labeler: 'carol', pair_id: pid, choice: 'tie'})});
        return r.status; }""", pid)
    assert answer == 200
    page.keyboard.press("1")
    sync_api.expect(page.locator("#error")).to_contain_text("already labelled")
    expect_progress(page, 1, 1)
    assert shown(page)[0] != pid
    assert [(p, c) for p, _, c, _ in rows(server.db)] == [(pid, "tie")]  # the double submit was not counted
    page.close()
