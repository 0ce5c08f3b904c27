"""Benchmarks (zoo/benchmarks/*.yml, rlhfgym.zoo.benchmark): the spec and its errors, the expansion of
runs, skipping finished runs, the lock on an out dir, the local and Ray backends, third-party benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from importlib import metadata
from pathlib import Path

import pytest

import rlhfgym.agents
from rlhfgym.zoo import benchmark as bm
from rlhfgym.zoo.benchmark import Benchmark, BenchmarkError, load_benchmark, registered, run_benchmark

SHIPPED = ("summarize-quick", "summarize", "summarize-fact", "summarize-aif", "summarize-sb3", "intransitive", "full")


def write_yaml(tmp_path: Path, text: str, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(textwrap.dedent(text))
    return path


TINY = """
    envs: [RLHF-Summarize-Gold-v0]
    agents: [sft, rloo]
    budgets: {default: [16]}
    seeds: 1
    eval: {prompts: 4, temperature: [1.0, 0]}
    hyperparams:
      sft: {batch_size: 8}
      rloo: {batch_size: 8, rloo_k: 4}
"""


# ---------------------------------------------------------------------------------------------- the shipped ones


def test_every_shipped_benchmark_is_registered_and_valid():
    names = registered()
    assert set(SHIPPED) <= set(names)
    for name in SHIPPED:
        bench = load_benchmark(name)
        assert bench.name == name and bench.description and bench.runs("out")
    quick = load_benchmark("summarize-quick")
    assert quick.envs == ("RLHF-Summarize-v0",) and quick.seeds == (0,)
    # every built-in agent but SB3's PPO, which has its own benchmark next to the built-in PPO
    assert set(rlhfgym.agents.BUILTIN_AGENTS) - {"sb3-ppo"} <= {r.agent for r in quick.runs("out")}
    assert {r.agent for r in load_benchmark("summarize-sb3").runs("out")} == {"ppo", "sb3-ppo"}
    # a shipped benchmark keeps the agents it was defined with when new ones are registered
    assert "sb3-ppo" not in {r.agent for r in load_benchmark("summarize").runs("out")}
    # benchmark.json (committed under docs/results/) names a shipped file by its place in the repo, not this machine's path
    assert quick.to_dict()["source"] == "zoo/benchmarks/summarize-quick.yml"
    big = load_benchmark("summarize")
    assert set(big.envs) == {"RLHF-Summarize-v0", "RLHF-Summarize-Gold-v0"} and len(big.seeds) == 3
    assert len(big.budgets["default"]) == 2


# ---------------------------------------------------------------------------------------------- validation


def test_unknown_benchmark_names_the_closest_ones():
    with pytest.raises(BenchmarkError, match=r"unknown benchmark 'sumarize-quik'.*'summarize-quick'.*Registered"):
        load_benchmark("sumarize-quik")


def test_unknown_agent_names_the_closest_and_the_file(tmp_path):
    path = write_yaml(tmp_path, "envs: [RLHF-Summarize-v0]\nagents: [ppo, rlo]\n")
    with pytest.raises(BenchmarkError) as e:
        load_benchmark(path)
    assert str(path) in str(e.value) and "unknown agent 'rlo'" in str(e.value) and "'rloo'" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, expected", [
    ("envs: [RLHF-Summarize-v0]\nbudget: [256]\n", r"unknown key 'budget'.*'budgets'"),
    ("envs: [RLHF-Summarize-v0]\neval: {promts: 10}\n", r"eval: unknown key 'promts'.*'prompts'"),
    ("envs: [RLHF-Sumarize-v0]\n", r"unknown environment id 'RLHF-Sumarize-v0'.*'RLHF-Summarize-v0'"),
    ("agents: [ppo]\n", r"missing 'envs'"),
    ("envs: [RLHF-Summarize-v0]\nbudgets: [0]\n", r"budgets of 'default' must be positive whole numbers"),
    ("envs: [RLHF-Summarize-v0]\nbudgets: [1.5]\n", r"budgets of 'default' must be positive whole numbers"),
    ("envs: [RLHF-Summarize-v0]\nbudgets: {ppo: [64]}\n", r"needs a 'default' entry"),
    ("envs: [RLHF-Summarize-v0]\nbudgets: {default: [64], pppo: [64]}\n", r"budgets: unknown agent 'pppo'.*'ppo'"),
    ("envs: [RLHF-Summarize-v0]\nseeds: 0\n", r"seeds must be a count"),
    ("envs: [RLHF-Summarize-v0]\nseeds: [0, 0]\n", r"seeds must be a count"),
    ("envs: [RLHF-Summarize-v0]\neval: {prompts: many}\n", r"eval: prompts must be a positive whole number, got 'many'"),
    ("envs: [RLHF-Summarize-v0]\neval: {temperature: -1}\n", r"eval: temperature must be a number >= 0"),
    ("envs: [RLHF-Summarize-v0]\neval: {split: tests}\n", r"eval: unknown split 'tests'.*'test'"),
    ("envs: [RLHF-Summarize-v0]\nhyperparams: {dppo: {beta: 1}}\n", r"hyperparams: unknown agent 'dppo'.*'dpo'"),
    ("- RLHF-Summarize-v0\n", r"must be a mapping"),
])
def test_bad_fields_fail_in_one_line_naming_the_file_and_the_fix(tmp_path, text, expected):
    path = write_yaml(tmp_path, text)
    with pytest.raises(BenchmarkError, match=expected) as e:
        load_benchmark(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_broken_yaml_names_the_file_and_the_line(tmp_path):
    path = write_yaml(tmp_path, "envs: [RLHF-Summarize-v0\nagents: [ppo]\n")
    with pytest.raises(BenchmarkError, match=r"not valid YAML \(line \d+, column \d+\)") as e:
        load_benchmark(path)
    assert str(path) in str(e.value)


def test_a_broken_registered_file_names_the_file(tmp_path, monkeypatch):
    path = write_yaml(tmp_path, "envs: [RLHF-Summarize-v0]\nseeds: -2\n", name="broken")
    monkeypatch.setitem(bm._REGISTERED, "broken", path)
    with pytest.raises(BenchmarkError, match=rf"^{path}: seeds must be a count"):
        load_benchmark("broken")


def test_the_dataclass_validates_too():
    with pytest.raises(BenchmarkError, match=r"unknown environment id 'RLHF-Sumarize-v0' \(did you mean 'RLHF-Summarize-v0'"):
        Benchmark(name="x", envs=("RLHF-Sumarize-v0",))
    # a gymnasium id that is not an RLHF env is refused before any run starts, not per run
    with pytest.raises(BenchmarkError, match=r"'CartPole-v1' is not an rlhf-gym environment.*RLHF-Summarize-v0"):
        Benchmark(name="x", envs=("CartPole-v1",))
    with pytest.raises(BenchmarkError, match=r"unknown agent 'best-of'.*'best-of-n'"):
        Benchmark(name="x", envs=("RLHF-Summarize-v0",), agents=("best-of",))


# ---------------------------------------------------------------------------------------------- expansion


def test_runs_expand_env_agent_budget_seed_in_that_order(tmp_path):
    path = write_yaml(tmp_path, """
        envs: [RLHF-Summarize-v0, RLHF-Summarize-Gold-v0]
        agents: [ppo, best-of-n]
        budgets: {default: [64, 256], best-of-n: [1]}
        seeds: 2
        eval: {prompts: 50, temperature: [1.0, 0]}
        hyperparams: {best-of-n: {n: 4}}
    """)
    bench = load_benchmark(path)
    runs = bench.runs(tmp_path / "out")
    cells = [(r.env_id, r.agent, r.budget, r.seed) for r in runs]
    assert cells == [(e, "ppo", b, s) for e in ("RLHF-Summarize-v0",) for b in (64, 256) for s in (0, 1)] + \
        [("RLHF-Summarize-v0", "best-of-n", 1, s) for s in (0, 1)] + \
        [("RLHF-Summarize-Gold-v0", "ppo", b, s) for b in (64, 256) for s in (0, 1)] + \
        [("RLHF-Summarize-Gold-v0", "best-of-n", 1, s) for s in (0, 1)]
    r = runs[5]
    assert Path(r.run_dir) == tmp_path / "out" / "tiny" / "RLHF-Summarize-v0" / "best-of-n" / "b1" / "seed1"
    assert r.overrides == {"n": 4} and runs[0].overrides == {}
    assert [p["temperature"] for p in r.protocols] == [1.0, 0.0]
    # the evaluation seed is each run's own (train's protocol), unless the YAML names one for every run
    assert r.protocols[0] == {"split": "test", "prompts": 50, "samples": 1, "temperature": 1.0, "seed": 1}
    assert bm.EvalProtocol(seed=7).for_run(5)[0]["seed"] == 7
    fixed = load_benchmark(write_yaml(tmp_path, "envs: [RLHF-Summarize-v0]\neval: {seed: 7}\n", name="fixed"))
    assert {r.protocols[0]["seed"] for r in fixed.runs(tmp_path / "out", seeds=3)} == {7}
    assert fixed.to_dict()["eval"]["seed"] == 7 and bench.to_dict()["eval"]["seed"] == "run"
    with pytest.raises(BenchmarkError, match=r"seed must be 'run' \(each run's own seed\) or an integer >= 0; got 'own'"):
        load_benchmark(write_yaml(tmp_path, "envs: [RLHF-Summarize-v0]\neval: {seed: own}\n", name="bad"))
    # the command line's --agents, --seeds and --budget replace the benchmark's
    few = bench.runs(tmp_path / "out", agents=["rloo"], seeds=3, budget=32)
    assert [(r.env_id, r.agent, r.budget, r.seed) for r in few] == \
        [(e, "rloo", 32, s) for e in ("RLHF-Summarize-v0", "RLHF-Summarize-Gold-v0") for s in range(3)]
    with pytest.raises(BenchmarkError, match=r"unknown agent 'rlooo'.*'rloo'"):
        bench.runs(tmp_path / "out", agents=["rlooo"])


def test_default_agents_are_every_registered_one_custom_included(tmp_path, monkeypatch):
    from rlhfgym.agents import base

    path = write_yaml(tmp_path, "envs: [RLHF-Summarize-v0]\n")
    bench = load_benchmark(path)
    assert bench.agents is None
    monkeypatch.setitem(base._REGISTRY, "my-agent", "my_package.agent:MyAgent")
    agents = [r.agent for r in bench.runs(tmp_path)]
    assert agents == rlhfgym.agents.registered() and "my-agent" in agents and "ppo" in agents


# ---------------------------------------------------------------------------------------------- fakes


def protocol(p: dict) -> dict:
    return {k: p[k] for k in ("split", "prompts", "samples", "temperature", "seed")}


class Fakes:
    """Fake train / evaluate_run / write_leaderboard that write what the real ones write (results.json,
    eval.json with its protocol, completions.jsonl, leaderboard.md) and record their calls."""

    def __init__(self, monkeypatch, fail_once: set[str] = frozenset()):
        self.trained: list[tuple] = []
        self.evaluated: list[tuple] = []
        self.leaderboards: list[str] = []
        self.fail_once = set(fail_once)

        def train(algo, env_id, budget=None, seed=0, device="cpu", run_dir=None, eval_n=200, overrides=None):
            self.trained.append((algo, env_id, budget, seed, run_dir, dict(overrides or {})))
            out = Path(run_dir)
            stored = out / "results.json"
            if stored.exists():  # a finished run: train returns its stored result, touching nothing
                return json.loads(stored.read_text())
            out.mkdir(parents=True, exist_ok=True)
            if algo in self.fail_once:  # killed half-way: a checkpoint, no results
                self.fail_once.discard(algo)
                (out / "agent").mkdir(parents=True, exist_ok=True)
                raise RuntimeError(f"{algo} was killed")
            (out / "results.json").write_text(json.dumps({"algo": algo, "env_id": env_id, "budget": budget, "seed": seed}))
            # train's own evaluation: eval_n test prompts, one sample each at temperature 1, the run's seed
            p = {"split": "test", "prompts": eval_n, "samples": 1, "temperature": 1.0, "seed": seed}
            (out / "eval.json").write_text(json.dumps({"protocol": p, "gold": 0.5 + seed}))
            (out / "completions.jsonl").write_text("train\n")
            return {"algo": algo}

        def evaluate_run(run_dir, *, split, prompts, samples, temperature, seed, device=None, progress=True):
            self.evaluated.append((run_dir, temperature))
            p = {"split": split, "prompts": prompts, "samples": samples, "temperature": temperature, "seed": seed}
            result = {"protocol": p, "gold": 0.25 + temperature}
            (Path(run_dir) / "eval.json").write_text(json.dumps(result))
            (Path(run_dir) / "completions.jsonl").write_text(f"t={temperature}\n")
            return result

        def write_leaderboard(runs_dir, out_dir=None, *, progress=True):
            self.leaderboards.append(str(runs_dir))
            path = Path(runs_dir) / "leaderboard.md"
            path.write_text("| agent |\n")
            return {"md": path}

        monkeypatch.setattr("rlhfgym.zoo.train.train", train)
        monkeypatch.setitem(sys.modules, "rlhfgym.zoo.evaluate", types.SimpleNamespace(evaluate_run=evaluate_run))
        monkeypatch.setitem(sys.modules, "rlhfgym.zoo.leaderboard", types.SimpleNamespace(write_leaderboard=write_leaderboard))


TWO_RUNS = """
    envs: [RLHF-Summarize-Gold-v0]
    agents: [sft, rloo]
    budgets: {default: [16]}
    seeds: [3]
    eval: {prompts: 4, temperature: [1.0, 0]}
    hyperparams: {rloo: {rloo_k: 2}}
"""


def test_two_run_benchmark_end_to_end_with_fakes(tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)
    path = write_yaml(tmp_path, TWO_RUNS, name="two")
    out = tmp_path / "runs"
    result = run_benchmark(str(path), out=str(out), progress=False)
    root = out / "two"
    sft, rloo = (root / "RLHF-Summarize-Gold-v0" / a / "b16" / "seed3" for a in ("sft", "rloo"))
    assert [t[:5] for t in fakes.trained] == [("sft", "RLHF-Summarize-Gold-v0", 16, 3, str(sft)),
                                             ("rloo", "RLHF-Summarize-Gold-v0", 16, 3, str(rloo))]
    assert fakes.trained[1][5] == {"rloo_k": 2} and fakes.trained[0][5] == {}
    # train's eval.json already follows the protocol at temperature 1: only temperature 0 is evaluated
    assert fakes.evaluated == [(str(sft), 0.0), (str(rloo), 0.0)]
    for d in (sft, rloo):
        primary = json.loads((d / "eval.json").read_text())
        assert primary["protocol"]["temperature"] == 1.0 and primary["gold"] == 3.5  # train's, put back
        assert json.loads((d / "eval-t0.json").read_text())["protocol"]["temperature"] == 0.0
        assert (d / "completions.jsonl").read_text() == "train\n" and (d / "completions-t0.jsonl").read_text() == "t=0.0\n"
    assert fakes.leaderboards == [str(root)] and result["leaderboard"] == {"md": str(root / "leaderboard.md")}
    assert [r["status"] for r in result["runs"]] == ["trained", "trained"]
    assert result["runs"][0]["eval"]["gold"] == 3.5
    spec = json.loads((root / "benchmark.json").read_text())
    assert spec["name"] == "two" and spec["runs"] == 2 and spec["backend"] == "local"
    # again: everything is finished, nothing runs, the leaderboard is rewritten
    again = run_benchmark(str(path), out=str(out), progress=False)
    assert len(fakes.trained) == 2 and len(fakes.evaluated) == 2 and len(fakes.leaderboards) == 2
    assert [r["status"] for r in again["runs"]] == ["finished", "finished"]


def test_finished_runs_are_skipped_stale_ones_reevaluated_killed_ones_resumed(tmp_path, monkeypatch):
    path = write_yaml(tmp_path, TWO_RUNS.replace("[1.0, 0]", "1.0").replace("[sft, rloo]", "[sft, rloo, ppo, dpo]"),
                      name="two")
    out = tmp_path / "runs"
    root = out / "two" / "RLHF-Summarize-Gold-v0"
    want = {"split": "test", "prompts": 4, "samples": 1, "temperature": 1.0, "seed": 3}
    # sft: finished (a valid eval.json whose protocol matches); rloo: trained, evaluated on other prompts;
    # ppo: its eval.json is corrupt and it has no results; dpo: nothing yet
    for agent in ("sft", "rloo", "ppo"):
        (root / agent / "b16" / "seed3").mkdir(parents=True)
    (root / "sft" / "b16" / "seed3" / "eval.json").write_text(json.dumps({"protocol": want, "gold": 9.0}))
    rloo = root / "rloo" / "b16" / "seed3"
    (rloo / "eval.json").write_text(json.dumps({"protocol": dict(want, prompts=50), "gold": 1.0}))
    (rloo / "results.json").write_text(json.dumps({"algo": "rloo", "env_id": "RLHF-Summarize-Gold-v0", "budget": 16, "seed": 3}))
    (root / "ppo" / "b16" / "seed3" / "eval.json").write_text("{not json")
    fakes = Fakes(monkeypatch, fail_once={"dpo"})
    with pytest.raises(BenchmarkError, match=r"1 of 4 runs of benchmark 'two' failed: .*dpo/b16/seed3: RuntimeError: dpo was killed"):
        run_benchmark(str(path), out=str(out), progress=False)
    assert [t[0] for t in fakes.trained] == ["rloo", "ppo", "dpo"]  # not sft: it is finished
    assert fakes.evaluated == [(str(rloo), 1.0)]  # train returned rloo's stored result; evaluated by the protocol
    assert json.loads((root / "sft" / "b16" / "seed3" / "eval.json").read_text())["gold"] == 9.0
    assert "dpo was killed" in (root / "dpo" / "b16" / "seed3" / bm.ERROR_FILE).read_text()
    assert len(fakes.leaderboards) == 1  # written for the finished runs despite the failure
    # the same command again: only the killed run is trained again (train resumes its checkpoint)
    result = run_benchmark(str(path), out=str(out), progress=False)
    assert [t[0] for t in fakes.trained] == ["rloo", "ppo", "dpo", "dpo"]
    assert [r["status"] for r in result["runs"]] == ["finished", "finished", "finished", "trained"]
    assert not (root / "dpo" / "b16" / "seed3" / bm.ERROR_FILE).exists()


def test_protocol_matching():
    p = {"split": "test", "prompts": 4, "samples": 1, "temperature": 0.0, "seed": 0}
    assert bm.protocol_matches({"protocol": dict(p, temperature=0)}, p)
    assert bm.protocol_matches(dict(p, gold=1.0), p)  # top-level keys work too
    assert not bm.protocol_matches({"protocol": dict(p, samples=2)}, p)
    assert not bm.protocol_matches({"protocol": {k: v for k, v in p.items() if k != "seed"}}, p)
    assert not bm.protocol_matches(None, p) and not bm.protocol_matches({"protocol": [1]}, p)


# ---------------------------------------------------------------------------------------------- lock, arguments


def test_a_second_process_on_the_same_out_dir_gets_a_clear_lock_error(tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)
    path = write_yaml(tmp_path, TWO_RUNS, name="two")
    root = tmp_path / "runs" / "two"
    root.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open({str(root / bm.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, b"pid %d on a host" % os.getpid())
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(BenchmarkError, match=rf"another benchmark process \(pid {holder.pid} on a host\) is working on "
                                                 rf"{root}.*another --out"):
            run_benchmark(str(path), out=str(tmp_path / "runs"), progress=False)
        assert fakes.trained == []
    finally:
        holder.communicate("")
    run_benchmark(str(path), out=str(tmp_path / "runs"), progress=False)  # released when the holder exits
    assert len(fakes.trained) == 2
    # and this process released its own lock on the way out: the lock can be taken again
    with bm.benchmark_lock(root):
        pass


def test_bad_arguments_fail_before_any_work(tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)
    path = write_yaml(tmp_path, TWO_RUNS, name="two")
    with pytest.raises(BenchmarkError, match=r"unknown backend 'rayy'.*'ray'"):
        run_benchmark(str(path), backend="rayy", out=str(tmp_path))
    with pytest.raises(BenchmarkError, match=r"pass backend='ray'"):
        run_benchmark(str(path), address="ray://head:10001", out=str(tmp_path))
    with pytest.raises(BenchmarkError, match=r"unknown device 'gpu'"):
        run_benchmark(str(path), device="gpu", out=str(tmp_path))
    with pytest.raises(BenchmarkError, match=r"seeds must be a count"):
        run_benchmark(str(path), seeds=0, out=str(tmp_path))
    assert fakes.trained == [] and not (tmp_path / "two").exists()


def test_cli_runs_the_benchmark_and_reports_user_errors_in_one_line(tmp_path, monkeypatch, capsys):
    from rlhfgym.zoo.cli import main

    fakes = Fakes(monkeypatch)
    path = write_yaml(tmp_path, TWO_RUNS, name="two")
    assert main(["benchmark", str(path), "--out", str(tmp_path / "runs"), "--agents", "sft", "--seeds", "2",
                 "--budget", "8"]) == 0
    assert [(t[0], t[2], t[3]) for t in fakes.trained] == [("sft", 8, 0), ("sft", 8, 1)]
    assert main(["benchmark", "sumarize-quick"]) == 2
    assert "did you mean 'summarize-quick'" in capsys.readouterr().err.lower()


# ---------------------------------------------------------------------------------------------- entry points


@pytest.mark.parametrize("kind", ["dict", "path"])
def test_a_third_party_benchmark_through_an_entry_point(tmp_path, monkeypatch, kind):
    yaml_path = write_yaml(tmp_path, "envs: [RLHF-Summarize-Gold-v0]\nagents: [sft]\nbudgets: [8]\n", name="theirs")
    value = repr(str(yaml_path)) if kind == "path" else \
        "{'envs': ['RLHF-Summarize-Gold-v0'], 'agents': ['sft'], 'budgets': [8]}"
    (tmp_path / "their_package.py").write_text(f"BENCH = {value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "their_package", raising=False)
    real = metadata.entry_points
    ours = metadata.EntryPoint(name="their-bench", value="their_package:BENCH", group=bm.ENTRY_POINT_GROUP)

    def entry_points(**kw):
        return [ours] if kw.get("group") == bm.ENTRY_POINT_GROUP else real(**kw)

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    assert "their-bench" in registered()
    bench = load_benchmark("their-bench")
    assert bench.name == "their-bench" and bench.agents == ("sft",) and bench.budgets == {"default": (8,)}
    fakes = Fakes(monkeypatch)
    run_benchmark("their-bench", out=str(tmp_path / "runs"), progress=False)
    assert [t[4] for t in fakes.trained] == [str(tmp_path / "runs" / "their-bench" / "RLHF-Summarize-Gold-v0" / "sft" / "b8" / "seed0")]


def test_a_broken_entry_point_names_itself(tmp_path, monkeypatch):
    real = metadata.entry_points
    broken = metadata.EntryPoint(name="broken-bench", value="no_such_package_xyz:BENCH", group=bm.ENTRY_POINT_GROUP)
    wrong = metadata.EntryPoint(name="wrong-bench", value="os:sep", group=bm.ENTRY_POINT_GROUP)
    monkeypatch.setattr(metadata, "entry_points",
                        lambda **kw: [broken, wrong] if kw.get("group") == bm.ENTRY_POINT_GROUP else real(**kw))
    with pytest.raises(BenchmarkError, match=r"entry point 'broken-bench' \(no_such_package_xyz:BENCH\).*failed to load"):
        load_benchmark("broken-bench")
    with pytest.raises(BenchmarkError, match=r"entry point 'wrong-bench' \(os:sep\).*does not exist"):
        load_benchmark("wrong-bench")


def test_register_a_dict_and_built_ins_are_not_shadowed(monkeypatch):
    monkeypatch.setattr(bm, "_REGISTERED", {})
    bm.register("mine", {"envs": ["RLHF-Summarize-v0"], "seeds": [4]})
    assert "mine" in registered() and load_benchmark("mine").seeds == (4,)
    with pytest.raises(BenchmarkError, match="already registered"):
        bm.register("summarize", {"envs": ["RLHF-Summarize-v0"]})


# ---------------------------------------------------------------------------------------------- real runs (slow)


def _real_zoo():
    for module in ("rlhfgym.zoo.evaluate", "rlhfgym.zoo.leaderboard"):
        pytest.importorskip(module, reason=f"{module} (the zoo's evaluation and leaderboard) is not in this checkout yet")


def _numbers(obj, prefix=""):
    """The numeric leaves of a JSON document, timings and paths left out."""
    skip = ("time", "second", "date", "dir", "path", "device", "host")
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not any(s in str(k).lower() for s in skip):
                out.update(_numbers(v, f"{prefix}/{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{prefix}/{i}"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj
    return out


def _run_numbers(root: Path) -> dict:
    found = {}
    for f in sorted(root.rglob("*.json")):
        if f.name in ("eval.json", "eval-t0.json", "results.json"):
            found[str(f.relative_to(root))] = _numbers(json.loads(f.read_text()))
    return found


@pytest.fixture(scope="module")
def tiny_local(tmp_path_factory):
    _real_zoo()
    tmp = tmp_path_factory.mktemp("bench")
    path = write_yaml(tmp, TINY)
    result = run_benchmark(str(path), out=str(tmp / "local"), progress=False)
    return path, tmp, result


@pytest.mark.slow
def test_a_real_tiny_benchmark_trains_evaluates_and_writes_its_leaderboard(tiny_local):
    path, tmp, result = tiny_local
    root = tmp / "local" / "tiny"
    for agent in ("sft", "rloo"):
        run = root / "RLHF-Summarize-Gold-v0" / agent / "b16" / "seed0"
        primary, greedy = load_benchmark(path).eval.for_run(0)
        assert bm.protocol_matches(json.loads((run / "eval.json").read_text()), primary)  # train's own evaluation
        assert bm.protocol_matches(json.loads((run / "eval-t0.json").read_text()), greedy)  # evaluate_run's
        assert (run / "completions.jsonl").exists() and (run / "completions-t0.jsonl").exists()
        assert json.loads((run / "results.json").read_text())["budget"] == 16
    assert [r["status"] for r in result["runs"]] == ["trained", "trained"]
    assert result["leaderboard"] and all(Path(p).exists() for p in result["leaderboard"].values())
    before = _run_numbers(root)
    again = run_benchmark(str(path), out=str(tmp / "local"), progress=False)
    assert [r["status"] for r in again["runs"]] == ["finished", "finished"] and _run_numbers(root) == before


@pytest.mark.slow
def test_the_ray_backend_gives_the_same_run_dirs_and_numbers(tiny_local):
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("Ray is not installed: pip install 'rlhf-gym[ray]' to run the Ray backend's test")
    path, tmp, _ = tiny_local
    result = run_benchmark(str(path), out=str(tmp / "ray"), backend="ray", progress=False)
    assert [r["status"] for r in result["runs"]] == ["trained", "trained"]
    local, remote = _run_numbers(tmp / "local" / "tiny"), _run_numbers(tmp / "ray" / "tiny")
    assert set(local) == set(remote) == {f"RLHF-Summarize-Gold-v0/{a}/b16/seed0/{f}"
                                         for a in ("sft", "rloo") for f in ("eval.json", "eval-t0.json", "results.json")}
    assert local == remote and all(local.values())
    assert os.path.exists(tmp / "ray" / "tiny" / "benchmark.json")
