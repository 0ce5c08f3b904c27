"""The ``rlhf-zoo`` command line (zoo/cli.py): help, argument wiring and one-line user errors.

The wiring tests swap the implementations (play, build_assets, bench_env) for fakes in
``sys.modules``, so they run in milliseconds and do not depend on trained assets.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from rlhfgym.zoo import cli

SUBCOMMANDS = ("play", "build-assets", "bench")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhfgym.zoo.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def fake_impl(monkeypatch, module: str, attr: str, behaviour=None) -> list[tuple[tuple, dict]]:
    """Install ``module.attr`` as a recorder (or ``behaviour``) and return the list of its calls."""
    calls: list[tuple[tuple, dict]] = []

    def impl(*args, **kwargs):
        calls.append((args, kwargs))
        if behaviour is not None:
            behaviour()

    mod = types.ModuleType(module)
    setattr(mod, attr, impl)
    monkeypatch.setitem(sys.modules, module, mod)
    return calls


def test_help_lists_subcommands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert name in result.stdout


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "rlhf-zoo"
    if not script.exists():
        pytest.skip(f"no rlhf-zoo console script next to {sys.executable}; install with `pip install -e .`")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "build-assets" in result.stdout


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "from rlhfgym.zoo.cli import main\n"
        "for argv in (['--help'], ['play', '--help'], ['bench', 'env', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted({'torch', 'transformers', 'gymnasium', 'rlhfgym.envs'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_play_unknown_env_exits_2_with_one_line() -> None:
    result = run_cli("play", "RLHF-NoSuchEnv-v0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "RLHF-NoSuchEnv-v0" in lines[0] and "Traceback" not in result.stderr


def test_play_passes_arguments(monkeypatch) -> None:
    monkeypatch.setattr(cli, "check_env_id", lambda env_id: None)
    calls = fake_impl(monkeypatch, "rlhfgym.zoo.play", "play")
    argv = ["play", "RLHF-Summarize-Gold-v0", "--n", "3", "--split", "validation", "--seed", "7", "--temperature", "0.5"]
    assert cli.main(argv) == 0
    assert calls == [
        (("RLHF-Summarize-Gold-v0",), dict(n=3, split="validation", seed=7, device="cpu", temperature=0.5))
    ]


def test_build_assets_passes_arguments(monkeypatch) -> None:
    calls = fake_impl(monkeypatch, "rlhfgym.envs.build.sft", "build_assets")
    assert cli.main(["build-assets", "--only", "tokenizer, sft", "--seed", "3", "--out", "/tmp/x"]) == 0
    assert calls == [((), dict(version="micro-v0", out="/tmp/x", seed=3, device="cpu", only="tokenizer,sft", feedback=None))]
    calls.clear()
    assert cli.main(["build-assets", "--only", "reward", "--prompts", "8000", "--gen-batch-size", "512"]) == 0
    assert calls == [((), dict(version="micro-v0", out=None, seed=0, device="cpu", only="reward",
                               feedback={"n_train_prompts": 8000, "gen_batch_size": 512}))]


def test_bench_env_passes_arguments(monkeypatch) -> None:
    calls = fake_impl(monkeypatch, "rlhfgym.zoo.bench", "bench_env")
    assert cli.main(["bench", "env", "--batch", "8", "--max-new-tokens", "4", "--device", "cuda:1"]) == 0
    assert calls == [((), dict(batch=8, max_new_tokens=4, device="cuda:1", repeats=3))]


def test_user_error_is_one_line_and_debug_shows_traceback(monkeypatch, capsys) -> None:
    def fail():
        raise ValueError("batch too large\nfor this device; use --batch 8")

    fake_impl(monkeypatch, "rlhfgym.zoo.bench", "bench_env", fail)
    assert cli.main(["bench", "env"]) == 2
    err = capsys.readouterr().err
    assert err == "rlhf-zoo: error: batch too large for this device; use --batch 8\n"
    with pytest.raises(ValueError):
        cli.main(["bench", "env", "--debug"])
    with pytest.raises(ValueError):
        cli.main(["--debug", "bench", "env"])


def test_bugs_keep_their_traceback(monkeypatch) -> None:
    def fail():
        raise RuntimeError("internal bug")

    fake_impl(monkeypatch, "rlhfgym.zoo.bench", "bench_env", fail)
    with pytest.raises(RuntimeError, match="internal bug"):
        cli.main(["bench", "env"])


def test_rlhfgym_exceptions_are_user_errors(monkeypatch, capsys) -> None:
    from rlhfgym.envs.assets import AssetError

    def fail():
        raise AssetError("assets 'micro-v0' failed verification; reinstall rlhf-gym")

    fake_impl(monkeypatch, "rlhfgym.envs.build.sft", "build_assets", fail)
    assert cli.main(["build-assets"]) == 2
    assert "failed verification" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["play", "X", "--n", "0"],
        ["play", "X", "--split", "dev"],
        ["play", "X", "--temperature", "-1"],
        ["bench", "env", "--device", "gpu"],
        ["bench"],
        ["build-assets", "--only", ","],
        [],
    ],
)
def test_bad_arguments_exit_2(argv, capsys) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    assert excinfo.value.code == 2
    capsys.readouterr()
