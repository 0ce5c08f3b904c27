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
        (("RLHF-Summarize-Gold-v0",), dict(n=3, split="validation", seed=7, device="cpu", temperature=0.5, agent_dir=None))
    ]


def test_play_takes_a_run_dir_or_an_agent_dir(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(cli, "check_env_id", lambda env_id: None)
    calls = fake_impl(monkeypatch, "rlhfgym.zoo.play", "play")
    run = tmp_path / "run"
    (run / "agent").mkdir(parents=True)
    (run / "agent" / "agent.json").write_text("{}")
    for given in (run, run / "agent"):
        assert cli.main(["play", "RLHF-Summarize-Gold-v0", "--agent", str(given)]) == 0
    assert [c[1]["agent_dir"] for c in calls] == [str(run / "agent")] * 2
    assert cli.main(["play", "RLHF-Summarize-Gold-v0", "--agent", str(tmp_path)]) == 2
    assert "no agent.json there or in its agent/" in capsys.readouterr().err


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
    assert calls == [((), dict(batch=8, max_new_tokens=4, device="cuda:1", repeats=3, rounds=1, isolate=False))]
    calls.clear()  # one table per batch size; a policy directory in a dtype; fresh processes
    assert cli.main(["bench", "env", "--batch", "64,256", "--reference", "/m", "--dtype", "bfloat16", "--rounds", "5",
                     "--isolate"]) == 0
    assert calls == [((), dict(batch=b, max_new_tokens=32, device="cpu", repeats=3, rounds=5, isolate=True, reference="/m",
                               dtype="bfloat16")) for b in (64, 256)]
    for bad in (["--batch", "64,0"], ["--batch", "64,x"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", "env", *bad])


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
        ["train", "ppo", "X", "--hp", "seed=3"],
        ["train", "ppo", "X", "--hp", "learning_rate"],
        ["train", "ppo", "X", "--hp", "thresholds=[0,"],
        [],
    ],
)
def test_bad_arguments_exit_2(argv, capsys) -> None:
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    assert excinfo.value.code == 2
    capsys.readouterr()


# ---------------------------------------------------------------------------------------- user errors of `train`
def user_error(capsys, argv: list[str]) -> str:
    """Run ``argv``; assert it is a user error (exit 2) printed as one line without a traceback; return the line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf-zoo: error: "), err
    return lines[0]


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Fail the test if an env is made (user errors are found before the 4-second env build)."""
    import gymnasium as gym

    made = []
    monkeypatch.setattr(gym, "make", lambda *a, **k: made.append(a) or pytest.fail(f"gym.make{a} was called"))
    return made


def test_train_unknown_agent_fails_before_anything_is_built(capsys, tmp_path, nothing_is_built):
    line = user_error(capsys, ["train", "rlo", "RLHF-Summarize-Gold-v0", "--run-dir", str(tmp_path / "run")])
    assert "unknown agent 'rlo'" in line and "Did you mean 'rloo'?" in line and "--import MODULE" in line
    assert not (tmp_path / "run").exists()


def test_train_and_play_refuse_an_env_that_is_not_rlhf_gym(capsys, tmp_path, nothing_is_built):
    line = user_error(capsys, ["train", "rloo", "CartPole-v1", "--run-dir", str(tmp_path / "run")])
    assert "'CartPole-v1' is not an rlhf-gym environment" in line and "RLHF-Summarize-Gold-v0" in line
    assert not (tmp_path / "run").exists()
    assert "'CartPole-v1' is not an rlhf-gym environment" in user_error(capsys, ["play", "CartPole-v1"])


def test_train_misspelled_hyperparameter_names_the_closest_key(capsys, tmp_path, nothing_is_built):
    line = user_error(capsys, ["train", "ppo", "RLHF-Summarize-Gold-v0", "--hp", "learning_rte=1e-4",
                               "--run-dir", str(tmp_path / "run")])
    assert "unknown hyperparameter 'learning_rte' (did you mean 'learning_rate'?)" in line
    assert not (tmp_path / "run").exists()
    line = user_error(capsys, ["train", "ppo", "RLHF-Summarize-Gold-v0", "--hp", "learning_rate=fast",
                               "--run-dir", str(tmp_path / "run")])
    assert "learning_rate must be a number, got the string 'fast'" in line


def test_hp_values_are_yaml_and_scientific_notation_is_a_number(monkeypatch) -> None:
    monkeypatch.setattr(cli, "check_agent", lambda name, imports=(): None)
    monkeypatch.setattr(cli, "check_env_id", lambda env_id: None)
    calls = fake_impl(monkeypatch, "rlhfgym.zoo.train", "train")
    argv = ["train", "ppo", "RLHF-Summarize-Gold-v0", "--hp", "learning_rate=1e-4", "--hp", "kl_coef=null",
            "--hp", "thresholds=[0, 0.5]", "--hp", "objective=clip", "--hp", "temperature=-2E0", "--hp", "name='1e-4'"]
    assert cli.main(argv) == 0
    overrides = calls[0][1]["overrides"]
    assert overrides == {"learning_rate": 1e-4, "kl_coef": None, "thresholds": [0, 0.5], "objective": "clip",
                         "temperature": -2.0, "name": "1e-4"}
    assert type(overrides["learning_rate"]) is float


@pytest.fixture
def hyperparams_dir(tmp_path, monkeypatch):
    import rlhfgym.zoo.train as zoo_train

    monkeypatch.setattr(zoo_train, "HYPERPARAMS", tmp_path / "hp")
    (tmp_path / "hp").mkdir()
    return tmp_path / "hp"


def test_a_misspelled_env_section_of_a_hyperparameter_file_is_refused(capsys, tmp_path, hyperparams_dir,
                                                                      nothing_is_built):
    (hyperparams_dir / "ppo.yml").write_text("default:\n  batch_size: 8\nRLHF-Sumarize-v0:\n  learning_rate: 1e-4\n")
    line = user_error(capsys, ["train", "ppo", "RLHF-Summarize-v0", "--run-dir", str(tmp_path / "run")])
    assert str(hyperparams_dir / "ppo.yml") in line
    assert "section 'RLHF-Sumarize-v0' is not a registered env id" in line and "did you mean 'RLHF-Summarize-v0'?" in line
    assert not (tmp_path / "run").exists()


def test_a_yaml_syntax_error_names_the_file(capsys, tmp_path, hyperparams_dir, nothing_is_built):
    (hyperparams_dir / "ppo.yml").write_text("default:\n  learning_rate: [1e-4\n  batch_size: 8\n")
    line = user_error(capsys, ["train", "ppo", "RLHF-Summarize-v0", "--run-dir", str(tmp_path / "run")])
    assert f"{hyperparams_dir / 'ppo.yml'} is not valid YAML (line" in line


def test_hyperparameter_files_read_scientific_notation_as_numbers(hyperparams_dir):
    from rlhfgym.zoo.train import load_hyperparams

    (hyperparams_dir / "ppo.yml").write_text(
        "default:\n  learning_rate: 1e-4\n  kl_coef: 5E-2\n  objective: '1e-3'\n"
        "RLHF-Summarize-v0:\n  learning_rate: 3e-5\n  batch_size: 8\n")
    hp = load_hyperparams("ppo", "RLHF-Summarize-v0")
    assert hp == {"learning_rate": 3e-5, "kl_coef": 0.05, "objective": "1e-3", "batch_size": 8}
    assert type(hp["learning_rate"]) is float and type(hp["batch_size"]) is int
    assert load_hyperparams("ppo", "RLHF-Summarize-Gold-v0")["learning_rate"] == 1e-4


def test_device_and_seed_are_not_hyperparameters(capsys, tmp_path, hyperparams_dir, nothing_is_built):
    (hyperparams_dir / "ppo.yml").write_text("default:\n  seed: 3\n")
    line = user_error(capsys, ["train", "ppo", "RLHF-Summarize-v0", "--run-dir", str(tmp_path / "run")])
    assert "seed is set per run" in line and "--seed" in line


# ---------------------------------------------------------------------------------------- --import
AGENT_MODULE = '''
from rlhfgym.agents import Agent, register


class Mine(Agent):
    name = "mine"

    def learn(self, env, budget, callback=None):
        return self


register("mine", Mine)
'''


@pytest.fixture
def isolated_imports(monkeypatch):
    """Registry, sys.path and sys.modules as they were after the test."""
    from rlhfgym.agents import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name in ("mine_agents", "broken_agents", "raising_agents"):
            del sys.modules[name]


@pytest.mark.parametrize("where", ["before", "after"])
def test_import_a_file_that_registers_an_agent(tmp_path, monkeypatch, isolated_imports, where) -> None:
    (tmp_path / "mine_agents.py").write_text(AGENT_MODULE)
    monkeypatch.setattr(cli, "check_env_id", lambda env_id: None)
    calls = fake_impl(monkeypatch, "rlhfgym.zoo.train", "train")
    train = ["train", "mine", "RLHF-Summarize-Gold-v0"]
    argv = ["--import", str(tmp_path / "mine_agents.py"), *train] if where == "before" else \
        [*train, "--import", str(tmp_path / "mine_agents.py")]
    assert cli.main(argv) == 0 and calls[0][0][0] == "mine"
    assert cli.main(argv) == 0  # importing it again (same file) is fine
    import rlhfgym.agents as agents

    assert agents.agent_class("mine").__module__ == "mine_agents"


def test_import_a_module_by_name_from_the_current_directory(tmp_path, monkeypatch, isolated_imports) -> None:
    (tmp_path / "mine_agents.py").write_text(AGENT_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.setattr(cli, "check_env_id", lambda env_id: None)
    calls = fake_impl(monkeypatch, "rlhfgym.zoo.train", "train")
    assert cli.main(["--import", "mine_agents", "train", "mine", "RLHF-Summarize-Gold-v0"]) == 0 and calls


def test_import_errors_are_one_line(capsys, tmp_path, isolated_imports) -> None:
    (tmp_path / "broken_agents.py").write_text("def oops(:\n    pass\n")
    (tmp_path / "raising_agents.py").write_text("raise RuntimeError('needs an API key')\n")
    (tmp_path / "empty_agents.py").write_text("")
    cases = {
        ("--import", "no_such_module_xyz"): "--import no_such_module_xyz: no module named 'no_such_module_xyz'",
        ("--import", str(tmp_path / "missing.py")): "no such .py file",
        ("--import", str(tmp_path / "broken_agents.py")): f"syntax error in {tmp_path / 'broken_agents.py'}, line 1",
        ("--import", str(tmp_path / "raising_agents.py")): "importing it raised RuntimeError: needs an API key",
        ("--import", str(tmp_path / "empty_agents.py")): "none of --import",
    }
    for opts, fragment in cases.items():
        line = user_error(capsys, [*opts, "train", "mine", "RLHF-Summarize-Gold-v0"])
        assert fragment in line, line
    with pytest.raises(cli.CLIError) as excinfo:  # --debug keeps the user module's own traceback as the cause
        cli.main(["--debug", "--import", str(tmp_path / "raising_agents.py"), "train", "mine", "X"])
    assert isinstance(excinfo.value.__cause__, RuntimeError)


# ---------------------------------------------------------------------------------------- play
def test_play_accepts_temperature_0_as_greedy(monkeypatch) -> None:
    monkeypatch.setattr(cli, "check_env_id", lambda env_id: None)
    calls = fake_impl(monkeypatch, "rlhfgym.zoo.play", "play")
    assert cli.main(["play", "RLHF-Summarize-Gold-v0", "--temperature", "0"]) == 0
    assert calls[0][1]["temperature"] == 0.0


def test_play_many_prompts_shows_a_few_then_a_progress_bar(capsys) -> None:
    from rlhfgym.zoo.play import SHOW_ALL, SHOW_FIRST, play

    n = SHOW_ALL + 1
    rows = play("RLHF-Summarize-Gold-v0", n=n, temperature=0)
    out, err = capsys.readouterr()
    assert len(rows) == n
    assert out.count("SFT policy (= reference):") == SHOW_FIRST
    assert f"{n}/{n}" in err  # tqdm's bar
    assert f"mean over {n} test prompts" in out
    # greedy: the same prompt gives the same completion every time
    assert play("RLHF-Summarize-Gold-v0", n=1, temperature=0)[0]["completion"] == rows[0]["completion"]
