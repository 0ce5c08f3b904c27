"""What the docs tell a user to run still runs: every ``rlhf-zoo`` command quoted in the README, the
contributor and design docs and the results' notes parses with today's CLI, and the README's "Ten
lines" run as printed."""

from __future__ import annotations

import contextlib
import io
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfgym.zoo.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
# a synopsis, not a command: placeholders (NAME, N, PAIR), alternatives (a|b), optional parts ([...]), <...>
SYNOPSIS = re.compile(r"[\[\]|<>]|\.\.\.|(?<![\w/.-])[A-Z][A-Z_]*(?![\w/.-])")


def quoted_commands(text: str) -> list[str]:
    """``rlhf-zoo ...`` in inline code (which may wrap over lines) and in fenced bash blocks (with
    backslash continuations), comments dropped, whitespace collapsed."""
    found = [m.group(1) for m in re.finditer(r"`(rlhf-zoo [^`]+)`", text)]
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            found += re.findall(r"(?:^|&&\s*)(rlhf-zoo [^#&;]+)", line.strip())
    return [re.sub(r"\s+", " ", c.split("#")[0]).strip() for c in found]


def runnable(command: str) -> bool:
    return not SYNOPSIS.search(command) and len(shlex.split(command)) > 2


COMMANDS = sorted({(path.relative_to(ROOT).as_posix(), c) for path in DOCS for c in quoted_commands(path.read_text())
                   if runnable(c)})


def test_the_docs_quote_many_commands():
    assert len(COMMANDS) >= 50  # the extraction works (README alone names the command behind each number)
    assert ("README.md", "rlhf-zoo benchmark summarize-quick") in COMMANDS


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{d}: {c[:60]}" for d, c in COMMANDS])
def test_a_quoted_command_parses(doc, command):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit:
        pytest.fail(f"{doc} tells users to run `{command}`, which today's CLI refuses: {err.getvalue().strip().splitlines()[-1]}")


def test_the_synopsis_filter_keeps_real_commands_and_drops_placeholders():
    assert runnable("rlhf-zoo bench trl --pair rloo,ppo --repeats 3 --out docs/results/bench-trl/pooled-rollouts")
    assert runnable("rlhf-zoo train rloo RLHF-Summarize-v0 --budget 256 --hp precision=bfloat16")
    for synopsis in ("rlhf-zoo train", "rlhf-zoo study NAME --preset quick|full", "rlhf-zoo bench trl --seed N",
                     "rlhf-zoo build-assets --version micro-v0 [--only tokenizer,sft]"):
        assert not runnable(synopsis)


def test_the_readmes_ten_lines_run_as_printed(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Ten lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "gym.make(" in code and "make_vec(" in code
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    *_, rm_score, gold = done.stdout.strip().splitlines()[-1].rsplit(" ", 2)  # print(completion, rm_score, gold)
    assert math.isfinite(float(rm_score)) and math.isfinite(float(gold))
