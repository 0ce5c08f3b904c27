"""``rlhf-zoo train ALGO ENV_ID``: one run of one agent, evaluated like every other.

Hyperparameters come from ``zoo/hyperparams/<algo>.yml`` (the env id's entry over ``default``;
``--hp key=value`` overrides for experiments). A run writes into ``runs/<algo>/<env_id>/seed<k>/``:
``run.json`` (the run's identity: algo, env id, seed, budget, hyperparameters, env kwargs; then its
status and result), ``agent/`` (checkpoints every ``checkpoint_seconds``, default 120 s of work, and at
the end, checked by sha256 before a resume), ``tb/`` (TensorBoard), ``results.json`` and ``results.md``.
Rerunning the same command resumes a killed run exactly, or returns a finished run's result; a
rerun with another identity, or a second ``train`` while one holds ``.lock``, is refused.

At the end a run is evaluated by :func:`rlhfgym.zoo.evaluate.evaluate_agent`, the code path of
``rlhf-zoo eval`` (one completion per test prompt at temperature 1, evaluation seed 0 for every
run, so seeds of one agent share a protocol): ``eval.json`` holds the mean gold score, the mean
reward-model score, the Monte-Carlo sequence KL to the reference ``E_y~pi[log pi(y|x) − log
pi_ref(y|x)]`` with its standard error, win rates against pi_ref and diversity, and
``completions.jsonl`` the completions. Any agent with a ``policy`` (a
:class:`~rlhfgym.agents.policy.CausalLMPolicy`) and a ``generate`` method is evaluated the same way,
custom agents included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from rlhfgym.agents.base import ADDED_HYPERPARAMETERS

HYPERPARAMS = Path(__file__).resolve().parent / "hyperparams"


class HyperparamLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-4`` as a number, as YAML 1.2 does (YAML 1.1, PyYAML's, reads
    scientific notation without a dot as a string); quoted ``"1e-4"`` stays a string."""


HyperparamLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(path: str | Path) -> Any:
    """A YAML file read with :class:`HyperparamLoader`; a syntax error names the file and the line."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=HyperparamLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"{path} is not valid YAML{where}: {problem}; fix the file.") from e


def rlhf_env_ids() -> list[str]:
    """The registered gymnasium ids whose entry point is rlhf-gym's (the envs the zoo can train on)."""
    import gymnasium as gym

    import rlhfgym.envs  # noqa: F401  (registers the ids)

    return sorted(k for k, spec in gym.registry.items() if str(spec.entry_point).startswith("rlhfgym"))


def check_rlhf_env_id(env_id: str) -> None:
    """Raise ``ValueError`` (naming the closest id) unless ``env_id`` is a registered rlhf-gym env."""
    import difflib

    import gymnasium as gym

    ours = rlhf_env_ids()
    if env_id in ours:
        return
    if env_id in gym.registry:
        raise ValueError(f"{env_id!r} is not an rlhf-gym environment: the zoo trains language-model agents on the RLHF "
                         f"token MDP; use one of {', '.join(ours)}.")
    close = difflib.get_close_matches(env_id, ours, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown environment id {env_id!r}{hint}; rlhf-gym environments: {', '.join(ours)}.")


def load_hyperparams(algo: str, env_id: str) -> dict[str, Any]:
    """``default`` updated by the env id's entry of ``hyperparams/<algo>.yml`` (empty when absent).

    Every top-level key must be ``default`` or a registered env id: a misspelled id would otherwise
    silently fall back to ``default``. Numbers in scientific notation (``1e-4``) are numbers.
    """
    import difflib

    import gymnasium as gym

    import rlhfgym.envs  # noqa: F401  (registers the ids the sections are checked against)

    path = HYPERPARAMS / f"{algo}.yml"
    if not path.exists():
        return {}
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must map env ids (and 'default') to hyperparameter dicts.")
    for key in data:
        if key != "default" and key not in gym.registry:
            close = difflib.get_close_matches(str(key), rlhf_env_ids(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; use 'default' or one of {', '.join(rlhf_env_ids())}."
            raise ValueError(f"{path}: section {key!r} is not a registered env id (nor 'default'){hint}")
    merged: dict[str, Any] = {}
    for key in ("default", env_id):
        entry = data.get(key) or {}
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {key!r} must be a mapping of hyperparameter names to values.")
        merged.update(entry)
    return merged


def train(algo: str, env_id: str, budget: int | None = None, seed: int = 0, device: str = "cpu",
          run_dir: str | None = None, eval_n: int = 200, overrides: dict[str, Any] | None = None, *,
          checkpoint_every: int | None = None, checkpoint_seconds: float | None = None) -> dict:
    """Train ``algo`` on ``env_id`` into ``run_dir`` (default ``runs/ALGO/ENV_ID/seedK``), evaluate it, return the result.

    The run checkpoints into ``run_dir/agent/`` every ``checkpoint_seconds`` of work (default
    :data:`~rlhfgym.agents.common.DEFAULT_CHECKPOINT_SECONDS`), every ``checkpoint_every`` completions
    when given, and at the end. ``run_dir/run.json`` records the run's identity (:func:`run_identity`);
    calling ``train`` again on the same run dir with the same identity resumes a killed run exactly, or
    returns the stored result of a finished one; another identity is refused, as is a second ``train``
    while one holds the run dir's lock. ``checkpoint_every``/``checkpoint_seconds`` are also taken from
    ``overrides`` (``--hp checkpoint_every=64``): they are how the run is kept, not hyperparameters.
    """
    import rlhfgym.envs  # noqa: F401
    from rlhfgym.agents import agent_class, make
    from rlhfgym.agents.common import checkpoint_interval

    # user errors (env id, agent, hyperparameters) fail here, before a run dir or an env is made
    check_rlhf_env_id(env_id)
    agent_class(algo)
    hp = load_hyperparams(algo, env_id)
    hp.update(overrides or {})
    env_kwargs = hp.pop("env_kwargs", {}) or {}
    budget = int(budget or hp.pop("budget", 2000))
    hp.pop("budget", None)
    every, seconds = run_options(hp, checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds)
    for key in ("device", "seed"):
        if key in hp:
            raise ValueError(f"{key} is set per run, not as a hyperparameter: remove {key!r} from {algo}.yml / the "
                             f"overrides and pass {key}= (rlhf-zoo train --{key}).")
    agent = make(algo, device=device, seed=seed, **hp)
    out = Path(run_dir or f"runs/{algo}/{env_id}/seed{seed}")
    identity = run_identity(algo, env_id, seed=seed, budget=budget, hyperparams=agent.config, env_kwargs=env_kwargs)
    learn_kwargs = _learn_kwargs(agent, out, every)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        stored = start_run(out, identity, eval_n=eval_n)
        if stored is not None:
            print(f"{out}: this run is finished; its stored result (use another --run-dir to train again):")
            print(results_markdown([stored]) if "policy" in stored and "sft" in stored else json.dumps(stored, indent=2))
            return stored
        _print_start(out, identity, learn_kwargs, seconds, every)
        with checkpoint_interval(seconds):
            result = _train_and_evaluate(agent, algo, env_id, budget=budget, seed=seed, device=device, out=out,
                                         eval_n=eval_n, hp=hp, env_kwargs=env_kwargs, learn_kwargs=learn_kwargs)
        finish_run(out, result)  # a rerun with the same identity returns this result
        return result


def _train_and_evaluate(agent, algo: str, env_id: str, *, budget: int, seed: int, device: str, out: Path, eval_n: int,
                        hp: dict, env_kwargs: dict, learn_kwargs: dict) -> dict:
    """The training and the evaluation of :func:`train`, which holds the run dir's lock."""
    import gymnasium as gym

    env = gym.make(env_id, device=device, **env_kwargs)
    t0 = time.time()
    with run_services(agent, out, learn_kwargs) as callback:
        agent.learn(env, budget, callback, **learn_kwargs)
    # the agent's own count covers the sessions before a resume; an agent without TrainingRun has none
    train_s = getattr(agent, "train_seconds", 0.0) or time.time() - t0
    # `rlhf-zoo eval`'s code path (writes eval.json + completions.jsonl), sampling with the run's own
    # seed, so the spread over seeds includes the evaluation's sampling noise.
    from rlhfgym.zoo.evaluate import evaluate_agent, results_row

    run_info = {"algo": algo, "env_id": env_id, "seed": seed, "budget": budget, "device": device, "hyperparams": hp,
                "env_kwargs": env_kwargs}
    evaluation = evaluate_agent(env, agent, run_info, prompts=eval_n, run_dir=out)
    result = {"algo": algo, "env_id": env_id, "seed": seed, "budget": budget, "device": device,
              "train_seconds": round(train_s, 1), "date": str(date.today()), "hyperparams": hp, "env_kwargs": env_kwargs,
              "policy": results_row(evaluation["metrics"], evaluation["protocol"]),
              "sft": results_row(evaluation["sft"], evaluation["protocol"])}
    from rlhfgym.envs.assets import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    atomic_write_text(out / "results.md", results_markdown([result]))
    print(results_markdown([result]))
    return result


def _learn_kwargs(agent, out: Path, checkpoint_every: int | None = None) -> dict:
    """Checkpointing and logging arguments, for agents whose ``learn`` accepts them."""
    import inspect

    params = inspect.signature(agent.learn).parameters
    kw = {}
    if "checkpoint_dir" in params:
        kw["checkpoint_dir"] = str(out / AGENT_DIR)
    if checkpoint_every is not None:
        if "checkpoint_every" not in params:
            raise ValueError(f"{agent.name}: its learn() takes no checkpoint_every; drop the option "
                             "(the zoo saves this agent when learn() returns).")
        kw["checkpoint_every"] = checkpoint_every
    if "log_dir" in params:
        kw["log_dir"] = str(out / "tb")
    return kw


@contextmanager
def run_services(agent, out: Path, learn_kwargs: dict, callback=None):
    """What every agent gets from the zoo, whatever its ``learn`` accepts; yields the callback to pass to ``learn``.

    An agent whose ``learn`` takes ``log_dir``/``checkpoint_dir`` (``learn_kwargs`` has them) does this
    itself. For one that does not, the zoo logs the numeric metrics of each ``callback(agent, metrics)``
    call to TensorBoard in ``out/tb`` (step: ``metrics["spent"]``, else ``agent.spent``, else the call
    count), and saves the agent to ``out/agent`` when ``learn`` returns (not after an exception: the
    state in memory may be half-updated). ``callback`` (optional) is called too, and its answer returned.
    """
    writer, calls = None, 0

    def log_metrics(agent_, metrics):
        nonlocal writer, calls
        calls += 1
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        spent = metrics.get("spent")
        step = int(spent) if isinstance(spent, (int, float)) else (getattr(agent_, "spent", 0) or calls)
        for key, value in metrics.items():
            if key != "spent" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{getattr(agent_, 'name', 'agent')}/{key}", float(value), step)
        return callback(agent_, metrics) if callback is not None else None

    try:
        yield callback if "log_dir" in learn_kwargs else log_metrics
    finally:
        if writer is not None:
            writer.close()
    if "checkpoint_dir" not in learn_kwargs:
        agent.save(out / AGENT_DIR)


# ---------------------------------------------------------------------------------------------- run directories

#: how the zoo keeps a run (checkpoints), not what it trains: taken out of the hyperparameters
RUN_OPTIONS = ("checkpoint_every", "checkpoint_seconds")
AGENT_DIR = "agent"  # a run directory's saved agent (its checkpoints and the final agent)


def saved_agent_dir(path: str | os.PathLike) -> Path | None:
    """Where the agent saved in ``path`` is: ``path/agent`` for a run directory, ``path`` itself for an
    agent directory; None when neither holds an ``agent.json``."""
    from rlhfgym.agents.base import CONFIG_FILE

    path = Path(path)
    return next((d for d in (path / AGENT_DIR, path) if (d / CONFIG_FILE).is_file()), None)


RUN_FILE = "run.json"
RUN_FORMAT = 1
LOCK_FILE = ".lock"
#: the keys of run.json that say which training a run dir holds
IDENTITY_KEYS = ("algo", "env_id", "seed", "budget", "hyperparams", "env_kwargs")


class RunDirError(ValueError):
    """A run directory holds another run, is in use by another ``train``, or is damaged."""


def run_options(hp: dict[str, Any], *, checkpoint_every: int | None = None,
                checkpoint_seconds: float | None = None) -> tuple[int | None, float]:
    """Take :data:`RUN_OPTIONS` out of ``hp`` (in place) and return ``(checkpoint_every, checkpoint_seconds)``,
    checked; an explicit argument and a different ``hp`` value for the same option are refused."""
    import math

    from rlhfgym.agents.common import DEFAULT_CHECKPOINT_SECONDS

    given = {"checkpoint_every": checkpoint_every, "checkpoint_seconds": checkpoint_seconds}
    for name in RUN_OPTIONS:
        if name in hp:
            value = hp.pop(name)
            if given[name] is not None and given[name] != value:
                raise ValueError(f"{name} is given twice ({given[name]!r} and {value!r} in the hyperparameters); give it once.")
            given[name] = value
    every, seconds = given["checkpoint_every"], given["checkpoint_seconds"]
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"checkpoint_every must be a positive number of completions, got {every!r}.")
    if seconds is None:
        seconds = DEFAULT_CHECKPOINT_SECONDS
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or math.isnan(seconds) or seconds < 0:
        raise ValueError(f"checkpoint_seconds must be a number of seconds >= 0 (.inf: only at the end), got {seconds!r}.")
    return every, float(seconds)


def run_identity(algo: str, env_id: str, *, seed: int, budget: int, hyperparams: dict[str, Any],
                 env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a run trains: algo, env id, seed, budget, the agent's hyperparameters (its validated config,
    less ``device`` and ``seed``, and less a hyperparameter added later (``ADDED_HYPERPARAMETERS``, e.g.
    ``precision``) at the value earlier runs had, so they keep their identity) and the env's keyword
    arguments, as JSON values."""
    hp = {k: v for k, v in hyperparams.items()
          if k not in ("device", "seed") and not (k in ADDED_HYPERPARAMETERS and v == ADDED_HYPERPARAMETERS[k])}
    identity = {"algo": algo, "env_id": env_id, "seed": int(seed), "budget": int(budget), "hyperparams": hp,
                "env_kwargs": dict(env_kwargs)}
    return json.loads(json.dumps(identity, sort_keys=True, default=repr))


@contextlib.contextmanager
def exclusive_lock(path: str | Path, owner: str, refuse: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the block, with ``owner``
    written into it. When another process holds it, raise ``refuse(text the holder wrote)`` at once.
    The kernel drops the lock when the process dies, so a killed run never leaves a stale lock.
    Without ``fcntl`` (not POSIX) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise refuse(os.pread(fd, 200, 0).decode(errors="replace").strip()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def run_lock(run_dir: str | Path) -> contextlib.AbstractContextManager[None]:
    """Hold ``run_dir/.lock`` for the block; a second ``train`` on the run dir gets :class:`RunDirError`."""
    path = Path(run_dir) / LOCK_FILE

    def refuse(holder: str) -> RunDirError:
        return RunDirError(f"{run_dir} is in use by another `rlhf-zoo train`{f' (pid {holder})' if holder else ''}, "
                           f"which holds {path}; wait for it to finish, or use another --run-dir.")

    return exclusive_lock(path, str(os.getpid()), refuse)


def read_run(run_dir: str | Path) -> dict[str, Any] | None:
    """``run_dir/run.json``, checked; None when the run dir has none."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        record = None
    if not isinstance(record, dict) or not all(k in record for k in IDENTITY_KEYS):
        raise RunDirError(f"{path} is damaged (not a run record with {', '.join(IDENTITY_KEYS)}); delete {run_dir} "
                          "to start the run over, or use another --run-dir.")
    if record.get("format") != RUN_FORMAT:
        raise RunDirError(f"{path} was written by run format {record.get('format')!r}; this rlhf-gym reads format "
                          f"{RUN_FORMAT}: use another --run-dir, or the rlhf-gym version that wrote it.")
    return record


def start_run(run_dir: str | Path, identity: dict[str, Any], *, eval_n: int) -> dict[str, Any] | None:
    """Check ``run_dir`` against ``identity`` and record it: the stored result when the run is finished
    (and was evaluated on ``eval_n`` prompts), else None (train: afresh, or resuming its checkpoint).

    Refused with :class:`RunDirError`: a run dir that holds another run (any identity key differs), or
    that holds files but no ``run.json`` (an older rlhf-gym's run, or not a run dir)."""
    from rlhfgym.envs.assets import atomic_write_text

    run_dir = Path(run_dir)
    record = read_run(run_dir)
    if record is None:
        other = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
        if other:
            raise RunDirError(f"{run_dir} holds {', '.join(other)} but no {RUN_FILE}, so what it trained cannot be "
                              "checked; use another --run-dir, or delete it to start over.")
        record = {"format": RUN_FORMAT, **identity, "status": "running", "created": _now()}
    else:
        changed = [k for k in IDENTITY_KEYS if record[k] != identity[k]]
        if changed:
            what = "; ".join(_difference(k, record[k], identity[k]) for k in changed)
            raise RunDirError(f"{run_dir} holds another run ({what}); use another --run-dir for this one "
                              "(or delete that directory to replace its run).")
        if record.get("status") == "finished" and record.get("eval_n") == eval_n and "result" in record:
            return record["result"]
        record.update(status="running", resumed=_now())
    record["eval_n"] = eval_n
    atomic_write_text(run_dir / RUN_FILE, json.dumps(record, indent=2))
    return None


def finish_run(run_dir: str | Path, result: dict[str, Any]) -> None:
    """Mark the run in ``run_dir`` finished, storing ``result`` (what a rerun of it returns)."""
    from rlhfgym.envs.assets import atomic_write_text

    record = read_run(run_dir)
    if record is None:
        raise RunDirError(f"{Path(run_dir) / RUN_FILE} disappeared while the run trained; rerun it.")
    record.update(status="finished", finished=_now(), result=result)
    atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(record, indent=2))


def _difference(key: str, old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        old, new = ({**ADDED_HYPERPARAMETERS, **d} if key == "hyperparams" else d for d in (old, new))
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"{key} " + ", ".join(f"{k}={old.get(k)!r}, not {new.get(k)!r}" for k in keys)
    return f"{key} {old!r}, not {new!r}"


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _print_start(out: Path, identity: dict, learn_kwargs: dict, seconds: float, every: int | None) -> None:
    """Say where the run goes, how it is kept, and whether it resumes."""
    from rlhfgym.agents.base import read_agent_config

    ckpt = learn_kwargs.get("checkpoint_dir")
    head = f"rlhf-zoo train: {identity['algo']} on {identity['env_id']}, seed {identity['seed']}, budget {identity['budget']}"
    print(f"{head}; run dir {out.resolve()}", flush=True)
    if ckpt is None:
        print("  (this agent's learn() takes no checkpoint_dir: a killed run starts over)", flush=True)
        return
    when = [f"every {seconds:g} s" if seconds != float("inf") else "", f"every {every} completions" if every else ""]
    print(f"  checkpoints in {ckpt} ({', '.join(w for w in when if w) or 'only'} and at the end); "
          "rerun the same command to resume a killed run", flush=True)
    if (Path(ckpt) / "agent.json").exists():
        spent = read_agent_config(Path(ckpt)).get("spent", 0)
        print(f"  resuming from its checkpoint: {spent} of {identity['budget']} completions done", flush=True)


def results_markdown(results: list[dict]) -> str:
    lines = ["| algo | env | budget | gold | RM | KL | SFT gold | SFT RM | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, s = r["policy"], r["sft"]
        lines.append(f"| {r['algo']} | {r['env_id']} | {r['budget']} | {p['gold']:.3f} | {p['rm']:.3f} | {p['kl']:.2f} | "
                     f"{s['gold']:.3f} | {s['rm']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"
