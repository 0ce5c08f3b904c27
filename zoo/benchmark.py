"""``rlhf-zoo benchmark NAME``: every agent x env x budget x seed of a benchmark, then its leaderboard.

A benchmark is data: ``zoo/benchmarks/<name>.yml`` (one file a benchmark, registered by its file
name), a dict or YAML file registered with :func:`register`, or one an installed package adds
through the entry-point group ``rlhfgym.benchmarks`` (value ``"module:attr"``, where ``attr`` is a
path to a YAML file or a dict of the same fields)::

    [project.entry-points."rlhfgym.benchmarks"]
    my-bench = "my_package.benchmarks:MY_BENCH"

Fields (only ``envs`` is required)::

    description: what it measures, and how long it takes where
    envs: [RLHF-Summarize-v0]          # env ids (gymnasium.registry)
    agents: [ppo, rloo]                # default: every registered agent, custom ones included
    budgets: [256, 1024]               # completions per run; or {default: [256], best-of-n: [1]}
    seeds: 3                           # seeds 0, 1, 2; or a list such as [0, 7]
    eval:                              # the evaluation protocol of every run
      split: test                      # train | validation | test
      prompts: 200                     # the split's first N prompts
      samples: 1                       # completions per prompt
      temperature: 1.0                 # or a list: the first is eval.json, others eval-t<T>.json
      seed: run                        # the evaluation's seed: run (default, train's) = each run's own seed, or N
    hyperparams:                       # overrides of zoo/hyperparams/<agent>.yml, per agent
      best-of-n: {n: 4}

:func:`run_benchmark` expands the runs (env x agent x budget x seed) into
``OUT/NAME/<env_id>/<agent>/b<budget>/seed<k>/``, skips the finished ones (an ``eval.json`` whose
protocol is the benchmark's), calls ``train`` for the others (on the same directory it resumes a
killed run from its checkpoint, returns a finished one's result, and refuses a directory that holds
another run), evaluates them by the benchmark's protocol where ``train``'s own evaluation (test split,
one sample at temperature 1 with the run's seed, on ``eval.prompts`` prompts) differs, and writes the leaderboard
of ``OUT/NAME``. One process at a time works on ``OUT/NAME`` (a lock file there).

With ``backend="ray"`` each run is a Ray task (``pip install 'rlhf-gym[ray]'``); the run directories
and the numbers are the same as the local backend's for the same seeds (each run is deterministic
given its seed). Bit for bit only at the same number of torch threads: a Ray task gets one CPU and
Ray sets its torch threads to one, while the local backend uses torch's default; float reductions
then differ in the last digits (measured, rloo on summarize-quick, local with 2 threads vs Ray: the
same completions and gold, KL 0.6331518 vs 0.6331514). On a cluster (``address=``) ``OUT`` must be a
file system every node sees.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import socket
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


BENCHMARKS_DIR = Path(__file__).resolve().parent / "benchmarks"
ENTRY_POINT_GROUP = "rlhfgym.benchmarks"
SPLITS = ("train", "validation", "test")  # = rlhfgym.envs.tasks.base.SPLITS
BACKENDS = ("local", "ray")
LOCK_FILE = ".benchmark.lock"
SPEC_FILE = "benchmark.json"
ERROR_FILE = ".benchmark-error.txt"  # hidden: train() refuses a run dir holding unknown visible files
PROTOCOL_KEYS = ("split", "prompts", "samples", "temperature", "seed")

KEYS = ("description", "envs", "agents", "budgets", "seeds", "eval", "hyperparams")
EVAL_KEYS = ("split", "prompts", "samples", "temperature", "seed")


class BenchmarkError(ValueError):
    """A bad benchmark definition or invocation (unknown name, key, agent or env id; bad number; locked out dir)."""


# ---------------------------------------------------------------------------------------------- helpers


def _closest(word: str, valid: Sequence[str], n: int = 3) -> str:
    """' Did you mean 'a' or 'b'?' (empty when nothing is close)."""
    close = difflib.get_close_matches(str(word), [str(v) for v in valid], n=n, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def _unknown(what: str, word: str, valid: Sequence[str], where: str) -> BenchmarkError:
    listed = ", ".join(sorted(valid)) or "none"
    return BenchmarkError(f"{where}unknown {what} {word!r}.{_closest(word, valid)} Valid {what}s: {listed}.")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _as_list(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


# ---------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class EvalProtocol:
    """How every run of a benchmark is evaluated (``rlhfgym.zoo.evaluate.evaluate_run``'s arguments)."""

    split: str = "test"
    prompts: int = 200
    samples: int = 1
    temperatures: tuple[float, ...] = (1.0,)
    seed: int | None = None  # None: each run's own seed (train's protocol); an int: that seed for every run

    def for_run(self, run_seed: int) -> list[dict[str, Any]]:
        """One protocol dict (the keys of :data:`PROTOCOL_KEYS`) per temperature; the first is ``eval.json``'s."""
        seed = run_seed if self.seed is None else self.seed
        return [{"split": self.split, "prompts": self.prompts, "samples": self.samples, "temperature": float(t),
                 "seed": seed} for t in self.temperatures]

    def to_dict(self) -> dict[str, Any]:
        temperature: Any = self.temperatures[0] if len(self.temperatures) == 1 else list(self.temperatures)
        return {"split": self.split, "prompts": self.prompts, "samples": self.samples, "temperature": temperature,
                "seed": "run" if self.seed is None else self.seed}


@dataclass(frozen=True)
class Run:
    """One cell of a benchmark: an agent trained on an env with a budget and a seed, in ``run_dir``."""

    env_id: str
    agent: str
    budget: int
    seed: int
    run_dir: str
    device: str = "cpu"
    overrides: dict[str, Any] = field(default_factory=dict)
    protocols: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"env_id": self.env_id, "agent": self.agent, "budget": self.budget, "seed": self.seed,
                "run_dir": self.run_dir, "device": self.device, "overrides": dict(self.overrides),
                "protocols": [dict(p) for p in self.protocols]}


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: env ids x agents x budgets x seeds, evaluated by one protocol.

    ``agents=None`` means every agent registered when the runs are expanded (custom ones included).
    ``budgets`` maps ``"default"`` (and optionally agent names) to budgets in completions.
    Every field is validated on construction; an error names the benchmark's ``source`` and the
    closest valid value.
    """

    name: str
    envs: tuple[str, ...]
    agents: tuple[str, ...] | None = None
    budgets: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: {"default": (1024,)})
    seeds: tuple[int, ...] = (0,)
    eval: EvalProtocol = field(default_factory=EvalProtocol)
    hyperparams: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        where = f"{self.source or 'benchmark ' + repr(self.name)}: "
        if not isinstance(self.name, str) or not self.name:
            raise BenchmarkError(f"{where}a benchmark needs a non-empty name, got {self.name!r}.")
        envs = tuple(_as_list(self.envs))
        if not envs:
            raise BenchmarkError(f"{where}'envs' is empty; name at least one env id, e.g. envs: [RLHF-Summarize-v0].")
        _check_env_ids(envs, where)
        known = _known_agents()
        agents = None if self.agents is None else tuple(_as_list(self.agents))
        if agents is not None:
            if not agents:
                raise BenchmarkError(f"{where}'agents' is empty; leave it out for every registered agent, or name some.")
            for a in agents:
                if a not in known:
                    raise _unknown("agent", a, known, where)
        budgets = {str(k): tuple(_as_list(v)) for k, v in dict(self.budgets).items()}
        if "default" not in budgets:
            raise BenchmarkError(f"{where}'budgets' needs a 'default' entry (budgets of agents without their own), "
                                 "e.g. budgets: {default: [1024], best-of-n: [1]}.")
        for key, values in budgets.items():
            if key != "default" and key not in known:
                raise _unknown("agent", key, ["default", *known], f"{where}budgets: ")
            if not values or not all(_is_int(b) and b > 0 for b in values):
                raise BenchmarkError(f"{where}budgets of {key!r} must be positive whole numbers of completions, "
                                     f"got {list(values)!r}.")
            if len(set(values)) != len(values):
                raise BenchmarkError(f"{where}budgets of {key!r} repeat a value: {list(values)!r}.")
        seeds = tuple(_as_list(self.seeds))
        if not seeds or not all(_is_int(s) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise BenchmarkError(f"{where}seeds must be a count N >= 1 (seeds 0..N-1) or a list of distinct "
                                 f"integers >= 0, got {list(seeds)!r}.")
        hyperparams = {str(k): dict(v) for k, v in dict(self.hyperparams).items()} if self.hyperparams else {}
        for key, value in dict(self.hyperparams or {}).items():
            if key not in known:
                raise _unknown("agent", key, known, f"{where}hyperparams: ")
            if not isinstance(value, Mapping):
                raise BenchmarkError(f"{where}hyperparams of {key!r} must map hyperparameter names to values, got {value!r}.")
        if not isinstance(self.eval, EvalProtocol):
            raise BenchmarkError(f"{where}eval must be an EvalProtocol, got {self.eval!r}.")
        _check_protocol(self.eval, where)
        object.__setattr__(self, "envs", envs)
        object.__setattr__(self, "agents", agents)
        object.__setattr__(self, "budgets", budgets)
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "hyperparams", hyperparams)

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, name: str, data: Any, source: str = "") -> Benchmark:
        """Build from the YAML's fields; unknown keys and wrong shapes fail with the closest valid key."""
        where = f"{source or 'benchmark ' + repr(name)}: "
        if not isinstance(data, Mapping):
            raise BenchmarkError(f"{where}a benchmark must be a mapping of {', '.join(KEYS)}; got {type(data).__name__}.")
        for key in data:
            if key not in KEYS:
                raise _unknown("key", key, KEYS, where)
        if "envs" not in data:
            raise BenchmarkError(f"{where}missing 'envs': the env ids to run, e.g. envs: [RLHF-Summarize-v0].")
        budgets = data.get("budgets", [1024])
        if isinstance(budgets, Mapping):
            budgets = dict(budgets)
        else:
            budgets = {"default": budgets}
        seeds = data.get("seeds", 1)
        if _is_int(seeds):
            if seeds < 1:
                raise BenchmarkError(f"{where}seeds must be a count N >= 1 (seeds 0..N-1) or a list, got {seeds!r}.")
            seeds = list(range(seeds))
        evaluation = data.get("eval") or {}
        if not isinstance(evaluation, Mapping):
            raise BenchmarkError(f"{where}eval must be a mapping of {', '.join(EVAL_KEYS)}, got {evaluation!r}.")
        for key in evaluation:
            if key not in EVAL_KEYS:
                raise _unknown("key", key, EVAL_KEYS, f"{where}eval: ")
        defaults = EvalProtocol()
        protocol = EvalProtocol(
            split=evaluation.get("split", defaults.split),
            prompts=evaluation.get("prompts", defaults.prompts),
            samples=evaluation.get("samples", defaults.samples),
            temperatures=tuple(_as_list(evaluation.get("temperature", 1.0))),
            seed=None if evaluation.get("seed", "run") in ("run", None) else evaluation["seed"],
        )
        hyperparams = data.get("hyperparams") or {}
        if not isinstance(hyperparams, Mapping):
            raise BenchmarkError(f"{where}hyperparams must map agent names to {{hyperparameter: value}}, got {hyperparams!r}.")
        description = data.get("description") or ""
        return cls(name=name, envs=data["envs"], agents=data.get("agents"), budgets=budgets, seeds=seeds,
                   eval=protocol, hyperparams=hyperparams, description=str(description).strip(), source=source)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "envs": list(self.envs),
                "agents": None if self.agents is None else list(self.agents),
                "budgets": {k: list(v) for k, v in self.budgets.items()}, "seeds": list(self.seeds),
                "eval": self.eval.to_dict(), "hyperparams": {k: dict(v) for k, v in self.hyperparams.items()},
                "source": shipped_source(self.source)}

    # ---------------------------------------------------------------- expansion
    def agent_names(self) -> list[str]:
        """The benchmark's agents, or every registered agent (custom ones included) when it names none."""
        return list(self.agents) if self.agents is not None else _known_agents()

    def budgets_for(self, agent: str) -> tuple[int, ...]:
        return tuple(self.budgets.get(agent, self.budgets["default"]))

    def runs(self, out: str | os.PathLike = "runs", *, agents: Sequence[str] | None = None,
             seeds: int | Sequence[int] | None = None, budget: int | None = None, device: str = "cpu") -> list[Run]:
        """Every run, env x agent x budget x seed, in that order, under ``OUT/NAME/<env>/<agent>/b<budget>/seed<k>``.

        ``agents``, ``seeds`` (a count N for 0..N-1, or a list) and ``budget`` (one for every agent)
        replace the benchmark's own.
        """
        where = f"benchmark {self.name!r}: "
        if agents is not None:
            agents = list(_as_list(agents))
            known = _known_agents()
            if not agents:
                raise BenchmarkError(f"{where}no agents given; leave agents out for the benchmark's own.")
            for a in agents:
                if a not in known:
                    raise _unknown("agent", a, known, where)
        else:
            agents = self.agent_names()
        if seeds is None:
            seed_list = list(self.seeds)
        elif _is_int(seeds):
            if seeds < 1:
                raise BenchmarkError(f"{where}seeds must be a count >= 1, got {seeds!r}.")
            seed_list = list(range(seeds))
        else:
            seed_list = list(seeds)
            if not seed_list or not all(_is_int(s) and s >= 0 for s in seed_list) or len(set(seed_list)) != len(seed_list):
                raise BenchmarkError(f"{where}seeds must be a count >= 1 or distinct integers >= 0, got {seeds!r}.")
        if budget is not None and not (_is_int(budget) and budget > 0):
            raise BenchmarkError(f"{where}budget must be a positive whole number of completions, got {budget!r}.")
        root = Path(out) / self.name
        runs = []
        for env_id in self.envs:
            for agent in agents:
                for b in ((budget,) if budget is not None else self.budgets_for(agent)):
                    for seed in seed_list:
                        run_dir = root / env_id / agent / f"b{b}" / f"seed{seed}"
                        runs.append(Run(env_id=env_id, agent=agent, budget=int(b), seed=int(seed), run_dir=str(run_dir),
                                        device=device, overrides=dict(self.hyperparams.get(agent, {})),
                                        protocols=tuple(self.eval.for_run(int(seed)))))
        return runs


def shipped_source(source: str) -> str:
    """A shipped benchmark's file as ``zoo/benchmarks/<file>`` (no machine's path in a committed
    ``benchmark.json``); any other source as given."""
    try:
        return (Path("zoo/benchmarks") / Path(source).resolve().relative_to(BENCHMARKS_DIR)).as_posix()
    except (ValueError, OSError):
        return source


def _check_protocol(p: EvalProtocol, where: str) -> None:
    if p.split not in SPLITS:
        raise _unknown("split", p.split, SPLITS, f"{where}eval: ")
    for key in ("prompts", "samples"):
        value = getattr(p, key)
        if not (_is_int(value) and value > 0):
            raise BenchmarkError(f"{where}eval: {key} must be a positive whole number, got {value!r}.")
    temps = tuple(p.temperatures)
    if not temps or not all(_is_number(t) and t >= 0 for t in temps) or len(set(temps)) != len(temps):
        raise BenchmarkError(f"{where}eval: temperature must be a number >= 0 (0 is greedy) or a list of distinct ones, "
                             f"got {list(temps)!r}.")
    if p.seed is not None and not (_is_int(p.seed) and p.seed >= 0):
        raise BenchmarkError(f"{where}eval: seed must be 'run' (each run's own seed) or an integer >= 0; got {p.seed!r}.")


def _known_agents() -> list[str]:
    from rlhfgym.agents import registered as registered_agents

    return registered_agents()


def _check_env_ids(envs: Sequence[str], where: str) -> None:
    from rlhfgym.zoo.train import check_rlhf_env_id

    for env_id in envs:
        try:
            check_rlhf_env_id(str(env_id))
        except ValueError as e:
            raise BenchmarkError(f"{where}{e}") from None


# ---------------------------------------------------------------------------------------------- registry

_REGISTERED: dict[str, Any] = {}


def register(name: str, benchmark: str | os.PathLike | Mapping[str, Any], *, override: bool = False) -> None:
    """Register a benchmark by name: a path to its YAML file, or a dict of its fields."""
    if not isinstance(name, str) or not name:
        raise BenchmarkError(f"a benchmark name must be a non-empty string, got {name!r}.")
    if name in _sources() and not override:
        raise BenchmarkError(f"a benchmark named {name!r} is already registered; pass override=True to replace it.")
    _REGISTERED[name] = benchmark


def _sources() -> dict[str, Any]:
    """name -> Path | dict | EntryPoint. Built-in files first; entry points and register() never shadow them
    unless registered with override=True."""
    from importlib import metadata

    found: dict[str, Any] = {p.stem: p for p in sorted(BENCHMARKS_DIR.glob("*.yml"))}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    found.update(_REGISTERED)
    return found


def registered() -> list[str]:
    """Names of every benchmark: ``zoo/benchmarks/*.yml``, :func:`register`, and the entry points of installed packages."""
    return sorted(_sources())


def _read_yaml(path: Path, name: str) -> Benchmark:
    from rlhfgym.zoo.train import load_yaml  # the zoo's one YAML reader (1e-4 is a number; errors name file and line)

    try:
        data = load_yaml(path)
    except OSError as e:
        raise BenchmarkError(f"cannot read benchmark file {path}: {e.strerror or e}.") from None
    except ValueError as e:
        raise BenchmarkError(str(e)) from None
    return Benchmark.from_dict(name, data, source=str(path))


def _resolve(name: str, value: Any, source: str) -> Benchmark:
    if isinstance(value, Benchmark):
        return value
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise BenchmarkError(f"{source}: benchmark file {path} does not exist; point it at a YAML file.")
        return _read_yaml(path, name)
    if isinstance(value, Mapping):
        return Benchmark.from_dict(name, value, source=source)
    raise BenchmarkError(f"{source} gives {type(value).__name__} {value!r}; a benchmark is a path to a YAML file or a dict.")


def load_benchmark(name: str | os.PathLike) -> Benchmark:
    """A registered benchmark by name, or a benchmark YAML file by path (its name is the file's stem)."""
    text = os.fspath(name)
    sources = _sources()
    if text not in sources and (text.endswith((".yml", ".yaml")) or os.sep in text):
        path = Path(text)
        if not path.is_file():
            raise BenchmarkError(f"benchmark file {path} does not exist; give a registered name ({', '.join(sorted(sources))}) "
                                 "or the path of a YAML file.")
        return _read_yaml(path, path.stem)
    if text not in sources:
        raise BenchmarkError(f"unknown benchmark {text!r}.{_closest(text, list(sources))} Registered benchmarks: "
                             f"{', '.join(sorted(sources))}; or give the path of a YAML file.")
    value = sources[text]
    if isinstance(value, Path):
        return _read_yaml(value, text)
    if hasattr(value, "load") and hasattr(value, "group"):  # an importlib.metadata.EntryPoint
        source = f"entry point {text!r} ({value.value}) of group {ENTRY_POINT_GROUP!r}"
        try:
            loaded = value.load()
        except Exception as e:  # noqa: BLE001 - a broken third-party package: say which one
            raise BenchmarkError(f"{source} failed to load: {type(e).__name__}: {e}; fix or uninstall that package.") from e
        return _resolve(text, loaded, source)
    return _resolve(text, value, f"benchmark {text!r} (rlhfgym.zoo.benchmark.register)")


# ---------------------------------------------------------------------------------------------- one run


def read_json_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def protocol_matches(eval_json: dict | None, protocol: Mapping[str, Any]) -> bool:
    """Whether an ``eval.json`` was evaluated by ``protocol`` (its ``protocol`` entry, or its top level, holds
    split, prompts, samples, temperature and seed)."""
    if not isinstance(eval_json, dict):
        return False
    found = eval_json.get("protocol", eval_json)
    if not isinstance(found, dict):
        return False
    for key in PROTOCOL_KEYS:
        if key not in found:
            return False
        a, b = found[key], protocol[key]
        if key == "temperature":
            if not (_is_number(a) and math.isclose(float(a), float(b), abs_tol=1e-9)):
                return False
        elif a != b:
            return False
    return True


def _eval_name(index: int, protocol: Mapping[str, Any]) -> str:
    """``eval.json`` for the first protocol; ``eval-t<T>.json`` for the other temperatures."""
    return "eval.json" if index == 0 else f"eval-t{float(protocol['temperature']):g}.json"


def run_finished(run: Run | Mapping[str, Any]) -> bool:
    """Every evaluation file of the run exists, is valid JSON, and matches the benchmark's protocol."""
    spec = run.to_dict() if isinstance(run, Run) else run
    run_dir = Path(spec["run_dir"])
    return all(protocol_matches(read_json_object(run_dir / _eval_name(i, p)), p) for i, p in enumerate(spec["protocols"]))


def execute_run(spec: Mapping[str, Any], progress: bool = True) -> dict[str, Any]:
    """Train one run (``train`` resumes a killed run and returns a finished one's stored result), then
    evaluate it by each protocol its files lack.

    ``spec`` is :meth:`Run.to_dict`. Returns ``{"run_dir", "status": "trained" | "finished", "eval": <eval.json>}``.
    The same function runs in-process (local backend) and as a Ray task.
    """
    run_dir = Path(spec["run_dir"])
    protocols = list(spec["protocols"])
    status = "finished"
    if not run_finished(spec):
        from rlhfgym.zoo.train import train

        train(spec["agent"], spec["env_id"], budget=spec["budget"], seed=spec["seed"], device=spec["device"],
              run_dir=str(run_dir), eval_n=protocols[0]["prompts"], overrides=dict(spec["overrides"]))
        _evaluate_missing(run_dir, protocols, spec["device"], progress)
        status = "trained"
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    return {"run_dir": str(run_dir), "status": status, "eval": read_json_object(run_dir / "eval.json")}


def _evaluate_missing(run_dir: Path, protocols: list[Mapping[str, Any]], device: str, progress: bool) -> None:
    """Call ``evaluate_run`` for each protocol whose file is missing or stale. It writes ``eval.json`` and
    ``completions.jsonl``; the other temperatures' results are moved to ``eval-t<T>.json`` /
    ``completions-t<T>.jsonl`` and the first protocol's files are put back."""
    from rlhfgym.zoo.evaluate import evaluate_run

    def evaluate(p: Mapping[str, Any]) -> None:
        evaluate_run(str(run_dir), split=p["split"], prompts=p["prompts"], samples=p["samples"],
                     temperature=p["temperature"], seed=p["seed"], device=device, progress=progress)
        if not protocol_matches(read_json_object(run_dir / "eval.json"), p):
            raise RuntimeError(f"evaluate_run wrote {run_dir / 'eval.json'} without the protocol it was asked for ({dict(p)}).")

    primary = protocols[0]
    if not protocol_matches(read_json_object(run_dir / "eval.json"), primary):
        evaluate(primary)
    for i, p in enumerate(protocols[1:], start=1):
        target = run_dir / _eval_name(i, p)
        if protocol_matches(read_json_object(target), p):
            continue
        kept = [(run_dir / n, run_dir / f".{n}.primary") for n in ("eval.json", "completions.jsonl")]
        for src, bak in kept:
            if src.exists():
                os.replace(src, bak)
        try:
            evaluate(p)
            if (run_dir / "completions.jsonl").exists():
                os.replace(run_dir / "completions.jsonl", run_dir / target.name.replace("eval", "completions").replace(".json", ".jsonl"))
            os.replace(run_dir / "eval.json", target)
        finally:
            for src, bak in kept:
                if bak.exists():
                    os.replace(bak, src)


# ---------------------------------------------------------------------------------------------- the lock


@contextlib.contextmanager
def benchmark_lock(root: Path) -> Iterator[Path]:
    """Hold ``root/.benchmark.lock`` while a benchmark works on ``root`` (:func:`rlhfgym.zoo.train.exclusive_lock`).

    A second process fails at once with the holder's pid; the lock goes with the process (also when killed).
    """
    from rlhfgym.zoo.train import exclusive_lock

    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE

    def refuse(holder: str) -> BenchmarkError:
        return BenchmarkError(f"another benchmark process ({holder or 'unknown pid'}) is working on {root} (it holds "
                              f"{path}); wait for it to finish or stop it, or pass another --out.")

    with exclusive_lock(path, f"pid {os.getpid()} on {socket.gethostname()}\n", refuse):
        yield path


# ---------------------------------------------------------------------------------------------- backends


def _record_failure(spec: Mapping[str, Any], exc: BaseException, tb: str) -> dict[str, Any]:
    run_dir = Path(spec["run_dir"])
    with contextlib.suppress(OSError):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ERROR_FILE).write_text(tb)
    message = " ".join(str(exc).split()) or type(exc).__name__
    return {"run_dir": str(run_dir), "status": "failed", "error": f"{type(exc).__name__}: {message}", "eval": None}


def _label(spec: Mapping[str, Any]) -> str:
    return f"{spec['env_id']} {spec['agent']} b{spec['budget']} seed{spec['seed']}"


def execute_runs(specs: list[dict], *, backend: str = "local", device: str = "cpu", address: str | None = None,
                 bar=None, progress: bool = True) -> list[dict]:
    """:func:`execute_run` on every spec (``Run.to_dict()``), in order or as Ray tasks; returns one result a
    spec, in order. A failed run does not stop the others: its traceback goes to the run dir's
    :data:`ERROR_FILE` and its result has ``status`` "failed" and a one-line ``error``. ``bar``: a tqdm
    bar to advance (default: none)."""
    if bar is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(specs), disable=True)
    return _run_local(specs, bar, progress) if backend == "local" else _run_ray(specs, bar, device, address)


def _run_local(specs: list[dict], bar, progress: bool) -> list[dict]:
    results = []
    for spec in specs:
        bar.set_postfix_str(_label(spec), refresh=True)
        try:
            result = execute_run(spec, progress=progress)
        except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others; reported at the end
            result = _record_failure(spec, exc, traceback.format_exc())
            bar.write(f"failed: {_label(spec)}: {result['error']}")
        results.append(result)
        bar.update(1)
    return results


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BenchmarkError("backend 'ray' needs Ray: pip install 'rlhf-gym[ray]' (or pip install 'ray>=2.30'), "
                             "or use backend 'local'.") from None
    return ray


def _run_ray(specs: list[dict], bar, device: str, address: str | None) -> list[dict]:
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        task = ray.remote(num_cpus=1, num_gpus=1 if device.startswith("cuda") else 0)(execute_run)
        # Ray hands each task its own GPU through CUDA_VISIBLE_DEVICES: inside, it is always "cuda"
        task_device = "cuda" if device.startswith("cuda") else device
        pending = {task.remote(dict(spec, device=task_device), False): spec for spec in specs}
        results = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                spec = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - RayTaskError wraps the run's own exception
                    cause = getattr(exc, "cause", None) or exc
                    result = _record_failure(spec, cause, str(exc))
                    bar.write(f"failed: {_label(spec)}: {result['error']}")
                results[spec["run_dir"]] = result
                bar.update(1)
        return [results[spec["run_dir"]] for spec in specs]
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- the benchmark


def run_benchmark(name: str | os.PathLike, *, agents: Sequence[str] | None = None, seeds: int | Sequence[int] | None = None,
                  budget: int | None = None, device: str = "cpu", backend: str = "local", address: str | None = None,
                  out: str | os.PathLike = "runs", progress: bool = True) -> dict[str, Any]:
    """Run benchmark ``name`` (a registered name or a YAML path) into ``OUT/NAME/`` and write its leaderboard.

    ``agents``, ``seeds`` (a count N: seeds 0..N-1, or a list) and ``budget`` (one for every agent)
    replace the benchmark's own. Finished runs are skipped, killed ones resume; a run that fails does
    not stop the others: the failures are raised together at the end (the tracebacks are in each
    run's ``benchmark-error.txt``), after the leaderboard of the finished runs is written. Run the same
    command again to retry them.

    Returns ``{"name", "dir", "runs": [{run fields, "status", "eval"}], "leaderboard": {...paths}}``.
    """
    if backend not in BACKENDS:
        raise _unknown("backend", backend, BACKENDS, "")
    if address is not None and backend != "ray":
        raise BenchmarkError(f"address={address!r} is a Ray cluster address; pass backend='ray' (--backend ray) with it.")
    if not isinstance(device, str) or not (device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise BenchmarkError(f"unknown device {device!r}; use cpu, cuda or cuda:N.")
    if backend == "ray":
        _import_ray()  # fail before any work when Ray is missing
    bench = load_benchmark(name)
    root = Path(out).absolute() / bench.name
    runs = [r.to_dict() for r in bench.runs(Path(out).absolute(), agents=agents, seeds=seeds, budget=budget, device=device)]
    from tqdm.auto import tqdm

    from rlhfgym.envs.assets import atomic_write_text

    with benchmark_lock(root):
        record = dict(bench.to_dict(), runs=len(runs), device=device, backend=backend,
                      started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      invoked_with={"agents": None if agents is None else list(agents),
                                 "seeds": seeds if seeds is None or _is_int(seeds) else list(seeds), "budget": budget})
        atomic_write_text(root / SPEC_FILE, json.dumps(record, indent=2) + "\n")
        finished = [r for r in runs if run_finished(r)]
        todo = [r for r in runs if not run_finished(r)]
        results = {r["run_dir"]: {"run_dir": r["run_dir"], "status": "finished", "eval": read_json_object(Path(r["run_dir"]) / "eval.json")}
                   for r in finished}
        bar = tqdm(total=len(runs), initial=len(finished), desc=f"benchmark {bench.name}", unit="run", disable=not progress)
        try:
            if todo:
                done = execute_runs(todo, backend=backend, device=device, address=address, bar=bar, progress=progress)
                results.update({r["run_dir"]: r for r in done})
        finally:
            bar.close()
        from rlhfgym.zoo.leaderboard import write_leaderboard

        leaderboard = write_leaderboard(str(root), progress=progress)
    out_runs = [dict(spec, **results[spec["run_dir"]]) for spec in runs]
    failed = [r for r in out_runs if r["status"] == "failed"]
    if failed:
        listed = "; ".join(f"{r['run_dir']}: {r['error']}" for r in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        raise BenchmarkError(f"{len(failed)} of {len(runs)} runs of benchmark {bench.name!r} failed: {listed}{more}. "
                             f"The tracebacks are in each run's {ERROR_FILE}; fix the cause and run the same command again "
                             "(finished runs are skipped).")
    return {"name": bench.name, "dir": str(root), "runs": out_runs,
            "leaderboard": {k: str(v) for k, v in (leaderboard or {}).items()}}
