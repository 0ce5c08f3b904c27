"""``rlhf-zoo study NAME``: registered studies that test the seeds' claims on the micro world.

A study is data: ``zoo/studies/<name>.yml`` (registered by its file name). It names *arms* (one
labelled configuration each: an agent, an env, a budget and hyperparameter overrides of
``zoo/hyperparams/<agent>.yml``), the seeds every arm runs with (the same seeds for every arm),
the evaluation protocol, the *checks* (the seed's claims as paired comparisons of two arms) and
the figure. Two presets size it: ``quick`` (a 2-core CPU, at most 45 minutes) and ``full`` (one GPU)::

    description: what the study reproduces
    claim: the seed's claim, in its words
    env: RLHF-Summarize-v0            # every arm's env unless it names its own
    arms:                             # label -> agent, budget, hyperparams (overrides), env
      ppo: {agent: ppo}
      dpo-beta0.5: {agent: dpo, hyperparams: {beta: 0.5}}
    reference: pi_ref                 # optional: the label of the π_ref row (its numbers come with every eval.json)
    checks:                           # optional: "a > b" on a metric, judged over seeds (see below)
      - {a: ppo, op: ">", b: best-of-n, metric: win_rate_labelers}
    plot: bars                        # bars (plot_metric per arm) | frontier (gold/proxy vs √KL, win rate vs
    plot_metric: win_rate_labelers    #   temperature) | overoptimisation (the fits) | matrix (the head to head)
    frontier_of: dpo                  # optional: is every other agent's arm below this agent's reward-KL frontier?
    fits:                             # optional: Gao et al.'s form fitted to gold and proxy along a series of arms
      - {label: best-of-n, form: best-of-n, arms: [bon-1, bon-4, bon-16]}     # form: best-of-n | rl
    head_to_head: intransitive        # optional: P(row > column) of every pair of arms under this labeler preset
    presets:
      quick: {seeds: 3, budget: 512, eval: {prompts: 200, temperature: 1.0}, arms: {ppo: {budget: 256}}}
      full:  {seeds: 5, budget: 4096, eval: {prompts: 2000, samples: 4}}

A preset's ``arms`` entries are merged over the top-level ones (``hyperparams`` merged key by key);
``only: [labels]`` in a preset runs a subset.

*Reward models fitted inside the study.* ``reward_models`` names Bradley-Terry reward models that the
study fits itself (a preset's entries are merged over them key by key), and an arm's
``reward_model: NAME`` makes its env pay that model's reward (``gym.make(env, reward_model=DIR)``:
the arm's ``env_kwargs``)::

    reward_models:
      rm-1of16: {data: sft-pairs, prompts: 1000, labelers: alpacafarm, heldout: 200}
      rm-bt: {data: dpo-pairs, pairs: 256, labelers: intransitive, heldout: 200, batch_size: 32}
    arms:
      bon-16-rm-1of16: {agent: best-of-n, budget: 1, hyperparams: {n: 16}, reward_model: rm-1of16}

``data: sft-pairs``: the asset build's recipe of the shipped reward model's data
(:func:`rlhfgym.envs.feedback.fitting.sample_labelled_pairs`: 4 SFT samples per train prompt at
temperatures 0.7/1.0/1.3/0.7, all 6 pairs, 3 annotators of ``labelers``, soft labels) on ``prompts``
random train prompts; models of one study with the same ``labelers``, ``seed`` and ``heldout`` share
one draw and each takes its first ``prompts`` prompts, so a smaller model's data is a subset of a
larger one's. The shipped reward model used 16,000 prompts (95,962 pairs). ``data: dpo-pairs``: DPO's
offline pairs (:func:`rlhfgym.agents.dpo.make_preference_pairs`: two π_ref samples per train prompt,
one click of ``labelers`` each) on the study's env with ``seed``: with ``pairs`` = a DPO arm's
budget / 2 they are the very pairs that arm's seed-``seed`` run trains on. ``heldout``: held-out
prompts of the validation split (accuracy, agreement with gold); ``epochs``, ``lr``, ``batch_size``:
the fit (default the shipped reward model's 4, 3e-4, 128). Data and models are cached under
``OUT/NAME/PRESET/reward-models/`` (atomic writes; a second run loads them, a killed fit resumes).

The evaluation seed defaults to ``null``: each run is evaluated with its own training seed.

Execution reuses the zoo: each arm is a :class:`rlhfgym.zoo.benchmark.Benchmark` (one agent, one
env, one budget) whose :meth:`~rlhfgym.zoo.benchmark.Benchmark.runs` puts its runs under
``OUT/NAME/PRESET/<arm>/<env>/<agent>/b<budget>/seed<k>/``; finished runs are skipped
(:func:`~rlhfgym.zoo.benchmark.run_finished`), the others go through
:func:`~rlhfgym.zoo.benchmark.execute_run` (which resumes a killed run from its checkpoint), locally
one after the other or as Ray tasks, under :func:`~rlhfgym.zoo.benchmark.benchmark_lock`.

The report (``study.md``, ``study.json``, ``study.png`` in ``OUT/NAME/PRESET/``, written atomically)
gives, per arm and metric, the mean over seeds and the 95% Student-t interval
(:func:`rlhfgym.zoo.leaderboard.mean_ci`: mean ± t_{0.975,n−1}·s/√n, n = seeds), Bradley-Terry
strengths of the arms (:func:`rlhfgym.envs.feedback.ratings.fit_bradley_terry` on
:func:`rlhfgym.zoo.leaderboard.pairwise_outcomes`), and each check. A check compares two arms on
the *same* seeds, so it is judged on the per-seed differences a − b: their mean and 95% t-interval.
Its verdict: ``holds`` (the interval lies on the claimed side of 0), ``direction only`` (the mean
does, the interval includes 0), ``not shown`` (the mean is on the other side, the interval includes
0) or ``reversed`` (the interval lies on the other side). With one seed there is no interval and the
verdict is the sign only, marked ``n=1``.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STUDIES_DIR = Path(__file__).resolve().parent / "studies"
PRESETS = ("quick", "full")
BACKENDS = ("local", "ray")
KEYS = ("description", "claim", "env", "arms", "reference", "checks", "plot", "plot_metric", "frontier_of", "fits",
        "head_to_head", "presets", "notes", "reward_models")
FIT_KEYS = ("label", "arms", "form")
LABELER_PRESETS = ("gold", "alpacafarm", "intransitive")  # = rlhfgym.envs.feedback.labelers.PRESETS
#: Gao et al. (2022)'s functional forms of gold reward (relative to π_ref) against d = √KL(π‖π_ref)
GAO_FORMS = ("best-of-n", "rl")
ARM_KEYS = ("agent", "budget", "hyperparams", "env", "reward_model")
PRESET_KEYS = ("seeds", "budget", "eval", "arms", "only", "time", "reward_models")
#: a fitted reward model's keys; ``data`` is one of RM_DATA, sized by ``prompts`` (sft-pairs) or ``pairs`` (dpo-pairs)
RM_KEYS = ("data", "prompts", "pairs", "heldout", "labelers", "seed", "epochs", "lr", "batch_size")
RM_DATA = {"sft-pairs": "prompts", "dpo-pairs": "pairs"}
#: where a study keeps its fitted reward models and their data, below its output dir
REWARD_MODELS_DIR = "reward-models"
EVAL_KEYS = ("split", "prompts", "samples", "temperature", "seed")
CHECK_KEYS = ("a", "op", "b", "metric", "temperature", "note")
PLOTS = ("bars", "frontier", "overoptimisation", "matrix")
#: metrics a check or a plot may name: the per-completion metrics of eval.json, and bt (Bradley-Terry)
CHECK_METRICS = ("gold", "proxy", "kl", "win_rate_labelers", "win_rate_judge", "length", "eos_rate", "distinct_1",
                 "distinct_2")
CI_METHOD = "95% Student-t interval over seeds: mean ± t(0.975, n−1)·s/√n (leaderboard.mean_ci); none for n=1"
REPORT_FILES = ("study.md", "study.json", "study.png")


class StudyError(ValueError):
    """A bad study definition or invocation (unknown name, key, arm, agent or env id; locked out dir)."""


def _closest(word: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(v) for v in valid], n=3, cutoff=0.5)
    return (" Did you mean " + " or ".join(repr(c) for c in close) + "?") if close else ""


def _unknown(what: str, word: Any, valid: Sequence[str], where: str) -> StudyError:
    return StudyError(f"{where}unknown {what} {word!r}.{_closest(str(word), valid)} Valid {what}s: "
                      f"{', '.join(sorted(map(str, valid))) or 'none'}.")


def _check_keys(data: Any, keys: Sequence[str], where: str, what: str = "key") -> dict:
    if not isinstance(data, Mapping):
        raise StudyError(f"{where}expected a mapping of {', '.join(keys)}, got {data!r}.")
    for key in data:
        if key not in keys:
            raise _unknown(what, key, keys, where)
    return dict(data)


# ---------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Arm:
    """One labelled configuration of a study: ``agent`` on ``env`` with ``budget`` completions and
    ``hyperparams`` (overrides of the zoo's YAML)."""

    label: str
    agent: str
    env: str
    budget: int
    hyperparams: dict[str, Any] = field(default_factory=dict)
    reward_model: str | None = None  # the name of one of the study's fitted reward models: the env's reward


@dataclass(frozen=True)
class RewardModelSpec:
    """A Bradley-Terry reward model the study fits: on ``size`` prompts (``data="sft-pairs"``) or pairs
    (``"dpo-pairs"``) labelled by ``labelers``, evaluated on ``heldout`` validation prompts, fitted with
    ``fit`` (epochs, lr, batch_size) from ``seed``."""

    name: str
    data: str
    size: int
    labelers: str
    heldout: int
    seed: int
    env: str
    fit: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "data": self.data, RM_DATA[self.data]: self.size, "labelers": self.labelers,
                "heldout": self.heldout, "seed": self.seed, "env": self.env, **self.fit}


@dataclass(frozen=True)
class Check:
    """The claim ``a op b`` on ``metric`` (at evaluation ``temperature``; None: the first), judged on per-seed differences."""

    a: str
    op: str
    b: str
    metric: str
    temperature: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Study:
    """A study resolved for one preset: its arms, seeds and evaluation protocol (validated)."""

    name: str
    preset: str
    description: str
    claim: str
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    eval: dict[str, Any]
    checks: tuple[Check, ...] = ()
    reference: str | None = None
    plot: str = "bars"
    plot_metric: str = "win_rate_labelers"
    frontier_of: str | None = None
    fits: tuple[dict[str, Any], ...] = ()
    head_to_head: str | None = None
    notes: str = ""
    time: str = ""
    source: str = ""
    reward_models: tuple[RewardModelSpec, ...] = ()  # those the arms use

    @property
    def temperatures(self) -> list[float]:
        t = self.eval["temperature"]
        return [float(x) for x in (t if isinstance(t, (list, tuple)) else [t])]

    def arm(self, label: str) -> Arm:
        for a in self.arms:
            if a.label == label:
                return a
        raise _unknown("arm", label, [a.label for a in self.arms], f"study {self.name!r}: ")

    def reward_model_spec(self, name: str) -> RewardModelSpec:
        for m in self.reward_models:
            if m.name == name:
                return m
        raise _unknown("reward model", name, [m.name for m in self.reward_models], f"study {self.name!r}: ")

    def benchmark(self, arm: Arm, root: str | os.PathLike | None = None):
        """The arm as a one-agent, one-env, one-budget :class:`~rlhfgym.zoo.benchmark.Benchmark` named by its label.

        An arm with a ``reward_model`` gets ``env_kwargs: {reward_model: ROOT/reward-models/NAME}`` in its
        hyperparameters (part of each run's identity); ``root`` None (validation only) leaves ROOT relative."""
        from rlhfgym.zoo.benchmark import Benchmark

        hp = dict(arm.hyperparams)
        if arm.reward_model is not None:
            where = reward_model_dir(root if root is not None else ".", arm.reward_model)
            hp["env_kwargs"] = {**hp.get("env_kwargs", {}), "reward_model": str(where)}
        data = {"envs": [arm.env], "agents": [arm.agent], "budgets": [arm.budget], "seeds": list(self.seeds),
                "eval": dict(self.eval), "hyperparams": {arm.agent: hp} if hp else {}}
        return Benchmark.from_dict(arm.label, data, source=f"{self.source} (arm {arm.label!r})")

    def runs(self, root: str | os.PathLike, device: str = "cpu") -> list[tuple[Arm, dict[str, Any]]]:
        """Every run (arm x seed) as ``(arm, benchmark run spec)``, under ``root/<arm>/<env>/<agent>/b<budget>/seed<k>``."""
        out = []
        for arm in self.arms:
            for run in self.benchmark(arm, root).runs(Path(root), device=device):
                out.append((arm, run.to_dict()))
        return out


def reward_model_dir(root: str | os.PathLike, name: str) -> Path:
    """Where a study whose output dir is ``root`` keeps its fitted reward model ``name``."""
    return Path(root) / REWARD_MODELS_DIR / name


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def resolve(name: str, data: Any, preset: str = "quick", *, seeds: int | None = None, source: str = "") -> Study:
    """The study ``data`` (the YAML's fields) resolved for ``preset``; ``seeds`` (a count N: seeds 0..N-1) replaces its own."""
    where = f"{source or 'study ' + repr(name)}: "
    data = _check_keys(data, KEYS, where)
    presets = _check_keys(data.get("presets") or {}, PRESETS, f"{where}presets: ", "preset")
    if preset not in PRESETS:
        raise _unknown("preset", preset, PRESETS, where)
    if preset not in presets:
        raise StudyError(f"{where}has no preset {preset!r}; it has {', '.join(presets) or 'none'}.")
    p = _check_keys(presets[preset] or {}, PRESET_KEYS, f"{where}presets: {preset}: ")
    top_arms = data.get("arms") or {}
    if not isinstance(top_arms, Mapping) or not top_arms:
        raise StudyError(f"{where}'arms' is empty; name at least one, e.g. arms: {{ppo: {{agent: ppo}}}}.")
    merged: dict[str, dict[str, Any]] = {}
    for label, arm in top_arms.items():
        merged[str(label)] = copy.deepcopy(_check_keys(arm or {}, ARM_KEYS, f"{where}arms: {label}: "))
    for label, arm in (p.get("arms") or {}).items():
        if label not in merged:
            raise _unknown("arm", label, list(merged), f"{where}presets: {preset}: arms: ")
        extra = _check_keys(arm or {}, ARM_KEYS, f"{where}presets: {preset}: arms: {label}: ")
        hp = {**merged[label].get("hyperparams", {}), **extra.pop("hyperparams", {})}
        merged[label].update(extra, hyperparams=hp)
    only = p.get("only")
    if only is not None:
        for label in only:
            if label not in merged:
                raise _unknown("arm", label, list(merged), f"{where}presets: {preset}: only: ")
        merged = {k: v for k, v in merged.items() if k in only}
    default_budget = p.get("budget")
    rm_specs = _reward_model_specs(data, p, where)
    arms = []
    for label, arm in merged.items():
        if "agent" not in arm:
            raise StudyError(f"{where}arm {label!r} names no agent; add agent: NAME (e.g. agent: ppo).")
        env = arm.get("env", data.get("env"))
        if env is None:
            raise StudyError(f"{where}arm {label!r} has no env; set the study's env: or the arm's.")
        budget = arm.get("budget", default_budget)
        if not (_is_int(budget) and budget > 0):
            raise StudyError(f"{where}arm {label!r} needs a positive budget (the arm's or the preset's), got {budget!r}.")
        rm = arm.get("reward_model")
        if rm is not None and rm not in rm_specs:
            raise _unknown("reward model", rm, list(rm_specs), f"{where}arm {label!r}: reward_model: ")
        if rm is not None and "env_kwargs" in (arm.get("hyperparams") or {}) and "reward_model" in arm["hyperparams"]["env_kwargs"]:
            raise StudyError(f"{where}arm {label!r} sets both reward_model and hyperparams: env_kwargs: reward_model; keep one.")
        arms.append(Arm(label=label, agent=arm["agent"], env=env, budget=budget, hyperparams=dict(arm.get("hyperparams") or {}),
                        reward_model=rm))
    n = seeds if seeds is not None else p.get("seeds", 1)
    if not (_is_int(n) and n >= 1):
        raise StudyError(f"{where}seeds must be a count N >= 1 (seeds 0..N-1), got {n!r}.")
    evaluation = {"split": "test", "prompts": 200, "samples": 1, "temperature": 1.0, "seed": None}
    evaluation.update(_check_keys(p.get("eval") or {}, EVAL_KEYS, f"{where}presets: {preset}: eval: "))
    labels = [a.label for a in arms]
    checks = []
    known = [*map(str, top_arms), *([data["reference"]] if data.get("reference") else [])]
    for i, c in enumerate(data.get("checks") or []):
        c = _check_keys(c, CHECK_KEYS, f"{where}checks[{i}]: ")
        for side in ("a", "b"):
            if c.get(side) not in known:
                raise _unknown("arm", c.get(side), known, f"{where}checks[{i}]: {side}: ")
        if c.get("op") not in (">", "<"):
            raise StudyError(f"{where}checks[{i}]: op must be '>' or '<', got {c.get('op')!r}.")
        metric = c.get("metric", "gold")
        if metric not in CHECK_METRICS:
            raise _unknown("metric", metric, CHECK_METRICS, f"{where}checks[{i}]: ")
        if any(c[side] not in labels and c[side] != data.get("reference") for side in ("a", "b")):
            continue  # the preset leaves one of its arms out (`only`)
        checks.append(Check(a=c["a"], op=c["op"], b=c["b"], metric=metric, temperature=c.get("temperature"),
                            note=str(c.get("note") or "")))
    fits = []
    for i, f in enumerate(data.get("fits") or []):
        f = _check_keys(f, FIT_KEYS, f"{where}fits[{i}]: ")
        if f.get("form") not in GAO_FORMS:
            raise _unknown("form", f.get("form"), GAO_FORMS, f"{where}fits[{i}]: ")
        for label in f.get("arms") or []:
            if label not in top_arms:
                raise _unknown("arm", label, list(top_arms), f"{where}fits[{i}]: ")
        kept = [a for a in f.get("arms") or [] if a in labels]
        if kept:
            fits.append({"label": str(f.get("label") or f"fit {i}"), "form": f["form"], "arms": kept})
    h2h = data.get("head_to_head")
    if h2h is not None and h2h not in LABELER_PRESETS:
        raise _unknown("labeler preset", h2h, LABELER_PRESETS, f"{where}head_to_head: ")
    plot = data.get("plot", "bars")
    if plot not in PLOTS:
        raise _unknown("plot", plot, PLOTS, where)
    study = Study(name=name, preset=preset, description=str(data.get("description") or "").strip(),
                  claim=str(data.get("claim") or "").strip(), arms=tuple(arms), seeds=tuple(range(n)), eval=evaluation,
                  checks=tuple(checks), reference=data.get("reference"), plot=plot,
                  plot_metric=data.get("plot_metric", "win_rate_labelers"), frontier_of=data.get("frontier_of"), fits=tuple(fits), head_to_head=h2h, notes=str(data.get("notes") or "").strip(),
                  time=str(p.get("time") or ""), source=source or name,
                  reward_models=tuple(rm_specs[r] for r in dict.fromkeys(a.reward_model for a in arms if a.reward_model)))
    for arm in study.arms:  # agents, env ids, budgets and the protocol, checked by the benchmark's own validation
        try:
            study.benchmark(arm)
        except ValueError as e:
            raise StudyError(str(e)) from None
    return study


def _reward_model_specs(data: Mapping[str, Any], preset: Mapping[str, Any], where: str) -> dict[str, RewardModelSpec]:
    """The study's ``reward_models`` with the preset's entries merged over them, validated."""
    from rlhfgym.envs.feedback.labelers import PRESETS as LABELERS

    top = data.get("reward_models") or {}
    over = preset.get("reward_models") or {}
    for what, block in (("reward_models", top), ("presets: reward_models", over)):
        if not isinstance(block, Mapping):
            raise StudyError(f"{where}{what} must map names to settings, got {block!r}.")
    for name in over:
        if name not in top:
            raise _unknown("reward model", name, list(top), f"{where}presets: reward_models: ")
    specs = {}
    for name, spec in top.items():
        w = f"{where}reward_models: {name}: "
        spec = {**_check_keys(spec or {}, RM_KEYS, w), **_check_keys(over.get(name) or {}, RM_KEYS, w)}
        if "/" in str(name) or str(name) in (".", ".."):
            raise StudyError(f"{w}a reward model's name is a directory name; it cannot contain '/' (e.g. rm-1of16).")
        kind = spec.get("data")
        if kind not in RM_DATA:
            raise _unknown("data", kind, list(RM_DATA), w)
        size_key = RM_DATA[kind]
        other = next((k for k in RM_DATA.values() if k != size_key and k in spec), None)
        if other:
            raise StudyError(f"{w}data: {kind} is sized by {size_key}, not {other}.")
        size = spec.get(size_key)
        if not (_is_int(size) and size >= 1):
            raise StudyError(f"{w}data: {kind} needs {size_key}: a positive count, got {size!r}.")
        labelers = spec.get("labelers", "alpacafarm")
        if labelers not in LABELERS:
            raise _unknown("labeler preset", labelers, list(LABELERS), w)
        heldout, seed = spec.get("heldout", 0), spec.get("seed", 0)
        for key, value in (("heldout", heldout), ("seed", seed)):
            if not (_is_int(value) and value >= 0):
                raise StudyError(f"{w}{key} must be a count >= 0, got {value!r}.")
        fit = {k: spec[k] for k in ("epochs", "lr", "batch_size") if k in spec}
        for key in ("epochs", "batch_size"):
            if key in fit and not (_is_int(fit[key]) and fit[key] >= 1):
                raise StudyError(f"{w}{key} must be a positive integer, got {fit[key]!r}.")
        if "lr" in fit and not (isinstance(fit["lr"], (int, float)) and not isinstance(fit["lr"], bool) and fit["lr"] > 0):
            raise StudyError(f"{w}lr must be a positive number, got {fit['lr']!r}.")
        specs[str(name)] = RewardModelSpec(name=str(name), data=kind, size=size, labelers=labelers, heldout=heldout,
                                           seed=seed, env=str(data.get("env") or ""), fit=fit)
    return specs


def registered() -> list[str]:
    """Names of the shipped studies (``zoo/studies/*.yml``)."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yml"))


def load_study(name: str | os.PathLike, preset: str = "quick", *, seeds: int | None = None) -> Study:
    """A registered study by name, or a study YAML file by path (its name is the file's stem), for ``preset``."""
    from rlhfgym.zoo.train import load_yaml

    text = os.fspath(name)
    if text.endswith((".yml", ".yaml")) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise StudyError(f"study file {path} does not exist; give a registered study ({', '.join(registered())}) "
                             "or the path of a YAML file.")
    else:
        path = STUDIES_DIR / f"{text}.yml"
        if not path.is_file():
            raise StudyError(f"unknown study {text!r}.{_closest(text, registered())} Registered studies: "
                             f"{', '.join(registered())}; or give the path of a YAML file.")
    try:
        data = load_yaml(path)
    except ValueError as e:
        raise StudyError(str(e)) from None
    return resolve(path.stem, data, preset, seeds=seeds, source=str(path))


# ---------------------------------------------------------------------------------------------- running


def eval_file(index: int, temperature: float) -> str:
    """The file of a run's ``index``-th evaluation protocol (the benchmark's naming): ``eval.json``, then ``eval-t<T>.json``."""
    return "eval.json" if index == 0 else f"eval-t{float(temperature):g}.json"


def run_study(name: str | os.PathLike, *, preset: str = "quick", seeds: int | None = None, backend: str = "local",
              device: str = "cpu", out: str | os.PathLike = "runs", progress: bool = True,
              report_only: bool = False) -> dict[str, Any]:
    """Run study ``name`` (registered, or a YAML path) for ``preset`` into ``OUT/NAME/PRESET/`` and write its report.

    Finished runs are skipped, killed ones resume; failed runs do not stop the others and are raised
    together at the end, after the report of the finished runs is written. ``report_only``: run nothing,
    write the report of the runs finished so far (it says how many). Returns ``{"dir", "report", "runs",
    "wall_seconds"}``.
    """
    if backend not in BACKENDS:
        raise _unknown("backend", backend, BACKENDS, "")
    study = load_study(name, preset, seeds=seeds)
    root = Path(out).absolute() / study.name / study.preset
    specs = study.runs(root, device=device)
    from tqdm.auto import tqdm

    from rlhfgym.envs.assets import atomic_write_text
    from rlhfgym.zoo.benchmark import ERROR_FILE, benchmark_lock, execute_runs, run_finished

    t0 = time.time()
    with benchmark_lock(root):
        atomic_write_text(root / "study-spec.json", json.dumps(
            {"name": study.name, "preset": study.preset, "seeds": list(study.seeds), "eval": study.eval,
             "arms": [a.__dict__ for a in study.arms], "reward_models": [m.to_dict() for m in study.reward_models],
             "device": device, "backend": backend,
             "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2) + "\n")
        todo = [] if report_only else [s for _, s in specs if not run_finished(s)]
        if todo and study.reward_models:  # fit (or load) the reward models the unfinished runs' envs pay
            prepare_reward_models(study, root, device=device, progress=progress)
        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc=f"study {study.name} ({preset})", unit="run",
                   disable=not progress)
        try:
            results = execute_runs(todo, backend=backend, device=device, bar=bar, progress=False) if todo else []
        finally:
            bar.close()
        report = write_report(study, root)
    wall = time.time() - t0
    failed = [r for r in results if r.get("status") == "failed"]
    if failed:
        listed = "; ".join(f"{r['run_dir']}: {r['error']}" for r in failed[:3])
        raise StudyError(f"{len(failed)} of {len(specs)} runs of study {study.name!r} failed: {listed}. Tracebacks are in "
                         f"each run's {ERROR_FILE}; fix the cause and run the same command again (finished runs are skipped).")
    if progress:
        print(f"study {study.name} ({preset}): {len(specs)} runs ({len(todo)} run now) in {wall:.0f} s; report {report['md']}")
    return {"dir": str(root), "report": {k: str(v) for k, v in report.items()}, "runs": len(specs), "wall_seconds": wall}


# ---------------------------------------------------------------------------------------------- fitted reward models


def _data_key(fields: Mapping[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def _data_fields(study: Study, spec: RewardModelSpec) -> dict[str, Any]:
    """What identifies a reward model's data draw. sft-pairs models of one study with the same labelers,
    seed and held-out size share one draw, of the largest one's number of prompts."""
    fields = {"data": spec.data, "labelers": spec.labelers, "seed": spec.seed, "heldout": spec.heldout}
    if spec.data == "sft-pairs":
        group = [m for m in study.reward_models if (m.data, m.labelers, m.seed, m.heldout) ==
                 (spec.data, spec.labelers, spec.seed, spec.heldout)]
        return {**fields, "prompts": max(m.size for m in group)}
    return {**fields, "pairs": spec.size, "env": spec.env}


def _data_dir(study: Study, spec: RewardModelSpec, root: str | os.PathLike) -> Path:
    return Path(root) / REWARD_MODELS_DIR / "data" / f"{spec.data}-{_data_key(_data_fields(study, spec))}"


def _cached_pairs(directory: Path, fields: Mapping[str, Any], make) -> tuple[Any, Any, dict]:
    """``(train, heldout, extra)`` from ``directory`` if it holds the data of ``fields``, else ``make()``'s,
    written there first (atomically: JSONL records, then ``data.json`` last, which marks the data complete)."""
    from rlhfgym.envs.assets import atomic_write_text
    from rlhfgym.envs.feedback.preferences import export_jsonl, load_preferences

    marker = directory / "data.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fields") == dict(fields):
        held = directory / "heldout.jsonl"
        extra = json.loads(marker.read_text())["extra"]
        return load_preferences(directory / "train.jsonl"), load_preferences(held) if held.is_file() else None, extra
    t0 = time.time()
    train, heldout, extra = make()
    export_jsonl(train, directory / "train.jsonl")
    if heldout is not None:
        export_jsonl(heldout, directory / "heldout.jsonl")
    atomic_write_text(marker, json.dumps({"fields": dict(fields), "extra": extra, "n_train": len(train),
                                          "n_heldout": len(heldout) if heldout is not None else 0,
                                          "seconds": round(time.time() - t0, 1)}) + "\n")
    return train, heldout, extra


def _sft_pairs(study: Study, spec: RewardModelSpec, root: Path, device: str):
    """The build's recipe on the first ``spec.size`` prompts of one draw shared by every sft-pairs model of
    the study with the same labelers, seed and held-out size (the largest one's size)."""
    import random

    from rlhfgym.envs.feedback.fitting import sample_labelled_pairs
    from rlhfgym.envs.tasks.news import NewsTask

    task = NewsTask()
    fields = _data_fields(study, spec)
    size = task.split_size("train")
    if fields["prompts"] > size:
        raise StudyError(f"reward model {spec.name!r}: {fields['prompts']} prompts, but the train split has {size}.")

    def make():
        prompts = [task.prompt("train", i) for i in random.Random(spec.seed).sample(range(size), fields["prompts"])]
        held = task.prompts("validation", spec.heldout) if spec.heldout else ()
        train, heldout, (_, ys) = sample_labelled_pairs(task, prompts, heldout_prompts=held, labelers=spec.labelers,
                                                         seed=spec.seed, device=device)
        return train, heldout, {"prompts": prompts, "sft_t1": ys}

    train, heldout, extra = _cached_pairs(_data_dir(study, spec, root), fields, make)
    keep = set(extra["prompts"][: spec.size])
    rows = [i for i, x in enumerate(train["prompt"]) if x in keep]
    norm = (extra["prompts"][: spec.size], extra["sft_t1"][: spec.size])  # π_ref's T=1 samples score 0 on average
    return train.select(rows), heldout, norm, task


def _dpo_pairs(study: Study, spec: RewardModelSpec, root: Path, device: str):
    """DPO's offline pairs on the study's env: ``spec.size`` train pairs (and ``spec.heldout`` validation pairs)."""
    import gymnasium as gym

    from rlhfgym.agents.dpo import make_preference_pairs

    fields = _data_fields(study, spec)
    env = gym.make(spec.env, device=device)
    task = env.unwrapped.task

    def make():
        train = make_preference_pairs(env, spec.size, "train", labelers=spec.labelers, seed=spec.seed)
        heldout = (make_preference_pairs(env, spec.heldout, "validation", labelers=spec.labelers, seed=spec.seed)
                   if spec.heldout else None)
        return train, heldout, {}

    train, heldout, _ = _cached_pairs(_data_dir(study, spec, root), fields, make)
    env.close()
    return train, heldout, None, task  # centred on the training completions: π_ref's own T=1 samples


def prepare_reward_models(study: Study, root: str | os.PathLike, *, device: str = "cpu",
                          progress: bool = True) -> dict[str, dict[str, Any]]:
    """Fit every reward model the study's arms use into ``root/reward-models/NAME`` (or load it from there);
    returns each one's ``fit.json`` (settings, digests of its data, held-out metrics)."""
    from rlhfgym.envs.feedback.fitting import fit_reward_model

    root = Path(root)
    out = {}
    for spec in study.reward_models:
        t0 = time.time()
        make = _sft_pairs if spec.data == "sft-pairs" else _dpo_pairs
        train, heldout, norm, task = make(study, spec, root, device)
        rm = fit_reward_model(train, heldout, cache_dir=reward_model_dir(root, spec.name), normalise_on=norm, gold=task,
                              seed=spec.seed, device=device, progress=progress, **spec.fit)
        out[spec.name] = rm.fit
        if progress:
            acc = rm.fit["metrics"].get("eval_accuracy")
            print(f"reward model {spec.name}: {len(train)} pairs, held-out accuracy "
                  f"{'–' if acc is None else f'{acc:.3f}'} ({time.time() - t0:.0f} s)")
    return out


def reward_model_report(study: Study, root: str | os.PathLike) -> dict[str, Any]:
    """Each fitted reward model's spec and, once fitted, its ``fit.json`` metrics (None before), with the
    Bayes ceiling of its held-out pairs: the accuracy of the best possible predictor of one labeler's click,
    mean max(p, 1 − p) over the pairs' population probabilities p (``LabelerPopulation.bayes_ceiling``)."""
    from rlhfgym.envs.feedback.fitting import FIT_FILE
    from rlhfgym.envs.feedback.labelers import LabelerPopulation
    from rlhfgym.envs.feedback.preferences import load_preferences
    from rlhfgym.envs.tasks.news import NewsTask

    out = {}
    for spec in study.reward_models:
        path = reward_model_dir(root, spec.name) / FIT_FILE
        fit = json.loads(path.read_text()) if path.is_file() else None
        held = _data_dir(study, spec, root) / "heldout.jsonl"
        ceiling = None
        if fit and held.is_file():  # both recipes are the micro news world's (sft-pairs samples its SFT policy)
            h = load_preferences(held)
            pop = LabelerPopulation.preset(spec.labelers, NewsTask())
            ceiling = pop.bayes_ceiling(h["prompt"], h["chosen"], h["rejected"], rng=spec.seed).exact
        out[spec.name] = {"spec": spec.to_dict(), "metrics": fit["metrics"] if fit else None,
                          "settings": fit["settings"] if fit else None, "heldout_bayes_ceiling": ceiling}
    return out


# ---------------------------------------------------------------------------------------------- analysis


def _value(record: dict | None, metric: str, block: str = "metrics") -> float | None:
    if record is None:
        return None
    v = (record.get(block) or {}).get(metric)
    if isinstance(v, dict):
        v = v.get("mean")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def collect(study: Study, root: str | os.PathLike) -> dict[str, dict[float, dict[int, dict]]]:
    """``{arm label: {temperature: {seed: eval record}}}`` of every finished evaluation below ``root``;
    the reference row (π_ref) is read from each record's ``sft`` block under the label ``study.reference``."""
    from rlhfgym.zoo.benchmark import protocol_matches, read_json_object

    found: dict[str, dict[float, dict[int, dict]]] = {}
    for arm, spec in study.runs(root):
        for i, protocol in enumerate(spec["protocols"]):
            record = read_json_object(Path(spec["run_dir"]) / eval_file(i, protocol["temperature"]))
            if record is not None and protocol_matches(record, protocol):
                record["run_dir"] = spec["run_dir"]
                found.setdefault(arm.label, {}).setdefault(float(protocol["temperature"]), {})[spec["seed"]] = record
    return found


def arm_metrics(records: Mapping[int, dict], block: str = "metrics") -> dict[str, dict[str, Any]]:
    """Per metric, ``{n, mean, ci}`` over the seeds' records (:func:`rlhfgym.zoo.leaderboard.mean_ci`)."""
    from rlhfgym.zoo.leaderboard import mean_ci

    out = {}
    for m in CHECK_METRICS:
        values = [v for s in sorted(records) if (v := _value(records[s], m, block)) is not None]
        out[m] = mean_ci(values)
    return out


def judge_check(check: Check, a: Mapping[int, dict], b: Mapping[int, dict], block_a: str = "metrics",
                block_b: str = "metrics") -> dict[str, Any]:
    """The check on the seeds both arms have: per-seed differences a − b, their mean and 95% t-interval, a verdict."""
    from rlhfgym.zoo.leaderboard import mean_ci

    seeds = sorted(set(a) & set(b))
    diffs = []
    for s in seeds:
        va, vb = _value(a[s], check.metric, block_a), _value(b[s], check.metric, block_b)
        if va is not None and vb is not None:
            diffs.append(va - vb)
    stat = mean_ci(diffs)
    sign = 1.0 if check.op == ">" else -1.0
    if stat["mean"] is None:
        verdict = "no data"
    elif stat["ci"] is None:
        verdict = ("direction only" if sign * stat["mean"] > 0 else "not shown") + " (n=1)"
    else:
        lo, hi = sign * stat["mean"] - stat["ci"], sign * stat["mean"] + stat["ci"]
        verdict = "holds" if lo > 0 else "reversed" if hi < 0 else "direction only" if sign * stat["mean"] > 0 else "not shown"
    return {"claim": f"{check.a} {check.op} {check.b} on {check.metric}", "a": check.a, "b": check.b, "op": check.op,
            "metric": check.metric, "seeds": seeds, "difference": stat, "verdict": verdict, "note": check.note}


def ratings(study: Study, by_arm: Mapping[str, Mapping[float, Mapping[int, dict]]]) -> dict[str, Any] | None:
    """Bradley-Terry strengths of the arms (first evaluation temperature) from every pairwise comparison of
    their completions on the same prompts (:func:`rlhfgym.zoo.leaderboard.pairwise_outcomes`: the labelers'
    majority; seeds of one arm do not play each other); None with fewer than two arms."""
    from rlhfgym.envs.feedback.ratings import fit_bradley_terry
    from rlhfgym.zoo.leaderboard import agent_label, pairwise_outcomes, read_completions

    runs, label_of = [], {}
    for arm in study.arms:
        for record in (by_arm.get(arm.label, {}).get(study.temperatures[0]) or {}).values():
            rows = read_completions(record["run_dir"])
            if rows is None:
                continue
            rec = dict(record, algo=arm.label)  # the leaderboard's player is algo@budget; here it is the arm
            label_of[agent_label(rec)] = arm.label
            runs.append((rec, rows))
    if len(label_of) < 2:
        return None
    outcomes = pairwise_outcomes(runs)
    if not outcomes:
        return None
    fit = fit_bradley_terry(outcomes, names=sorted(label_of))
    return {label_of[n]: {"strength": float(fit.strengths[k]), "se": float(fit.se[k])} for k, n in enumerate(fit.names)}


def frontier_dominance(study: Study, arms: Mapping[str, Any]) -> dict[str, Any]:
    """Is every other arm below ``study.frontier_of``'s frontier? For each arm of another agent and each of
    gold and proxy (first temperature, means over seeds): the arms of the frontier agent with no more KL and
    at least as much reward (``dominated_by``). "Highest reward for all KL values" holds where every other
    arm has one; the means decide, their intervals are in the table."""
    t0 = f"{study.temperatures[0]:g}"
    own = {k: a for k, a in arms.items() if a["agent"] == study.frontier_of}
    out: dict[str, Any] = {"agent": study.frontier_of, "temperature": float(t0), "arms": {}}
    for metric in ("proxy", "gold"):
        for label, a in arms.items():
            if a["agent"] == study.frontier_of:
                continue
            kl, r = a["by_temperature"][t0]["kl"]["mean"], a["by_temperature"][t0][metric]["mean"]
            if kl is None or r is None:
                continue
            by = [k for k, d in own.items() if d["by_temperature"][t0]["kl"]["mean"] is not None
                  and d["by_temperature"][t0][metric]["mean"] is not None
                  and d["by_temperature"][t0]["kl"]["mean"] <= kl and d["by_temperature"][t0][metric]["mean"] >= r]
            out["arms"].setdefault(label, {})[metric] = by
    for metric in ("proxy", "gold"):
        cells = [v[metric] for v in out["arms"].values() if metric in v]
        out[f"all_dominated_{metric}"] = bool(cells) and all(cells)
    return out


def gao_fit(d: Sequence[float], r: Sequence[float], form: str) -> dict[str, Any]:
    """Least-squares fit of Gao et al. (2022)'s form to rewards ``r`` (relative to π_ref) at ``d = √KL``:
    best-of-n ``R = d(α − β d)``, RL ``R = d(α − β log d)``. Both are linear in (α, β), so this is ordinary
    least squares on the columns (d, −d²) or (d, −d log d); standard errors from σ²(XᵀX)⁻¹ with
    σ² = RSS / (n − 2). Returns α, β, their s.e., R², n, and the d where the fitted R peaks
    (best-of-n α / 2β, RL exp(α/β − 1); None when β <= 0: no peak)."""
    import numpy as np

    d = np.asarray(d, dtype=float)
    r = np.asarray(r, dtype=float)
    n = len(d)
    if form not in GAO_FORMS:
        raise ValueError(f"form must be one of {GAO_FORMS}, got {form!r}.")
    if n < 2:
        return {"form": form, "n": n, "alpha": None, "beta": None, "alpha_se": None, "beta_se": None, "r2": None,
                "d_peak": None}
    # d log d -> 0 as d -> 0 (the π_ref point sits at the origin of both forms)
    dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    X = np.stack([d, -(d ** 2) if form == "best-of-n" else -dlogd], axis=1)
    coef, *_ = np.linalg.lstsq(X, r, rcond=None)
    resid = r - X @ coef
    rss = float(resid @ resid)
    se = [None, None]
    if n > 2:
        cov = rss / (n - 2) * np.linalg.pinv(X.T @ X)
        se = [float(math.sqrt(max(cov[0, 0], 0.0))), float(math.sqrt(max(cov[1, 1], 0.0)))]
    tss = float(((r - r.mean()) ** 2).sum())
    alpha, beta = float(coef[0]), float(coef[1])
    peak = None
    if beta > 0:
        peak = alpha / (2 * beta) if form == "best-of-n" else math.exp(alpha / beta - 1.0)
    return {"form": form, "n": n, "alpha": alpha, "beta": beta, "alpha_se": se[0], "beta_se": se[1],
            "r2": 1.0 - rss / tss if tss > 0 else None, "d_peak": peak}


def gao_curve(fit: Mapping[str, Any], d: Sequence[float]) -> list[float]:
    """The fitted R at each ``d``."""
    out = []
    for x in d:
        x = float(x)
        g = x * x if fit["form"] == "best-of-n" else (x * math.log(x) if x > 0 else 0.0)
        out.append(fit["alpha"] * x - fit["beta"] * g)
    return out


def overoptimisation(study: Study, by_arm: Mapping[str, Mapping[float, Mapping[int, dict]]]) -> list[dict[str, Any]]:
    """For each ``fits`` series: every (seed, arm) point (d = √KL, gold − π_ref's gold, proxy − π_ref's proxy,
    π_ref's of the same evaluation) and Gao's form fitted to gold and to proxy over all of them, plus the shape:
    where the mean gold peaks along the series (arms ordered by mean KL), and whether proxy rises to its end."""
    t0 = study.temperatures[0]
    out = []
    for f in study.fits:
        points = []
        for label in f["arms"]:
            for seed, rec in sorted((by_arm.get(label, {}).get(t0) or {}).items()):
                kl = _value(rec, "kl")
                g, p = _value(rec, "gold"), _value(rec, "proxy")
                g0, p0 = _value(rec, "gold", "sft"), _value(rec, "proxy", "sft")
                if None in (kl, g, p, g0, p0):
                    continue
                points.append({"arm": label, "seed": seed, "kl": kl, "d": math.sqrt(max(kl, 0.0)), "gold": g - g0,
                               "proxy": p - p0})
        fits = {m: gao_fit([q["d"] for q in points], [q[m] for q in points], f["form"]) for m in ("gold", "proxy")}
        means = []
        for label in f["arms"]:
            qs = [q for q in points if q["arm"] == label]
            if qs:
                means.append({"arm": label, "d": sum(q["d"] for q in qs) / len(qs), "n": len(qs),
                              "gold": sum(q["gold"] for q in qs) / len(qs), "proxy": sum(q["proxy"] for q in qs) / len(qs)})
        means.sort(key=lambda m: m["d"])
        shape = None
        if len(means) >= 3:
            k = max(range(len(means)), key=lambda i: means[i]["gold"])
            shape = {"gold_peak_arm": means[k]["arm"], "gold_peaks_inside": 0 < k < len(means) - 1,
                     "gold_drop_after_peak": means[k]["gold"] - means[-1]["gold"],
                     "proxy_rises_to_end": means[-1]["proxy"] == max(m["proxy"] for m in means)}
        out.append({"label": f["label"], "form": f["form"], "arms": f["arms"], "points": points, "means": means,
                    "fit": fits, "shape": shape})
    return out


def head_to_head(study: Study, by_arm: Mapping[str, Mapping[float, Mapping[int, dict]]]) -> dict[str, Any] | None:
    """P(row ≻ column) for every ordered pair of arms under the ``study.head_to_head`` labeler population:
    per seed, the mean over the prompts both runs answered of the population's preference probability
    (a random labeler's), from the completions and gold components in ``completions.jsonl``; then mean and
    95% t-interval over the seeds both arms have (paired: seed k meets seed k). Each arm's worst case
    (``min``: the max-min criterion) is the smallest row mean with its interval."""
    from rlhfgym.envs.feedback.labelers import LabelerPopulation
    from rlhfgym.zoo.leaderboard import keyed_completions, mean_ci, read_completions

    t0 = study.temperatures[0]
    answers: dict[str, dict[int, dict[tuple, str]]] = {}
    table: dict[tuple[str, str], dict[str, float]] = {}
    for arm in study.arms:
        for seed, record in (by_arm.get(arm.label, {}).get(t0) or {}).items():
            rows = read_completions(record["run_dir"])
            if rows is None:
                continue
            answers.setdefault(arm.label, {})[seed] = keyed_completions(record, rows, table)
    labels = [a.label for a in study.arms if a.label in answers]
    if len(labels) < 2:
        return None
    population = LabelerPopulation.preset(study.head_to_head, components_fn=lambda x, y: table[(x, y)])
    matrix: dict[str, dict[str, Any]] = {}
    for a in labels:
        matrix[a] = {}
        for b in labels:
            if a == b:
                continue
            per_seed = []
            for seed in sorted(set(answers[a]) & set(answers[b])):
                keys = sorted(set(answers[a][seed]) & set(answers[b][seed]))
                if keys:
                    p = population.population_prob([k[0] for k in keys], [answers[a][seed][k] for k in keys],
                                                   [answers[b][seed][k] for k in keys])
                    per_seed.append(float(p.mean()))
            matrix[a][b] = mean_ci(per_seed)
    worst = {}
    for a in labels:
        cells = [(b, c) for b, c in matrix[a].items() if c["mean"] is not None]
        if cells:
            b, c = min(cells, key=lambda bc: bc[1]["mean"])
            worst[a] = {"opponent": b, **c}
    return {"labelers": study.head_to_head, "temperature": t0, "arms": labels, "p_row_beats_column": matrix, "min": worst}


def analyse(study: Study, root: str | os.PathLike) -> dict[str, Any]:
    """Everything the report shows, as JSON values: per arm and temperature every metric with its CI,
    π_ref's, Bradley-Terry strengths, the checks, and the runs missing."""
    by_arm = collect(study, root)
    temps = study.temperatures
    arms = {}
    for arm in study.arms:
        per_t = by_arm.get(arm.label, {})
        arms[arm.label] = {
            "agent": arm.agent, "env": arm.env, "budget": arm.budget, "hyperparams": arm.hyperparams,
            "reward_model": arm.reward_model,
            "seeds": sorted(per_t.get(temps[0], {})),
            "by_temperature": {f"{t:g}": arm_metrics(per_t.get(t, {})) for t in temps},
        }
    reference, ref_by_t = None, {}
    if study.reference:
        # π_ref's numbers are recomputed in every eval.json (its `sft` block): pooled per seed from the first arm with them
        ref_by_t = {}
        for t in temps:
            seeds: dict[int, dict] = {}
            for arm in study.arms:
                for s, rec in (by_arm.get(arm.label, {}).get(t) or {}).items():
                    seeds.setdefault(s, rec)
            ref_by_t[t] = seeds
        reference = {"label": study.reference, "by_temperature": {f"{t:g}": arm_metrics(ref_by_t[t], "sft") for t in temps}}
    checks = []
    for c in study.checks:
        t = float(c.temperature) if c.temperature is not None else temps[0]
        side = {}
        for key, label in (("a", c.a), ("b", c.b)):
            if label == study.reference:
                side[key] = (ref_by_t.get(t, {}), "sft")
            else:
                side[key] = (by_arm.get(label, {}).get(t, {}), "metrics")
        result = judge_check(c, side["a"][0], side["b"][0], side["a"][1], side["b"][1])
        result["temperature"] = t
        checks.append(result)
    bt = ratings(study, by_arm)
    dominance = frontier_dominance(study, arms) if study.frontier_of else None
    gao = overoptimisation(study, by_arm) if study.fits else None
    h2h = head_to_head(study, by_arm) if study.head_to_head else None
    expected = len(study.arms) * len(study.seeds)
    done = sum(len(by_arm.get(a.label, {}).get(temps[0], {})) for a in study.arms)
    return {"name": study.name, "preset": study.preset, "description": study.description, "claim": study.claim,
            "seeds": list(study.seeds), "n_seeds": len(study.seeds), "ci_method": CI_METHOD, "eval": study.eval,
            "arms": arms, "reference": reference, "bradley_terry": bt, "checks": checks, "dominance": dominance, "overoptimisation": gao, "head_to_head": h2h,
            "reward_models": reward_model_report(study, root) if study.reward_models else None,
            "runs_expected": expected, "runs_finished": done,
            "generated": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------- the report

TITLES = {"gold": "gold", "proxy": "proxy reward", "kl": "KL (nats)", "win_rate_labelers": "win rate vs π_ref (labelers)",
          "win_rate_judge": "win rate vs π_ref (judge)", "length": "length", "eos_rate": "EOS rate",
          "distinct_1": "distinct-1", "distinct_2": "distinct-2"}
TABLE_METRICS = ("win_rate_labelers", "gold", "proxy", "kl", "distinct_2")


def cell(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``mean ± ci``; ``mean (n=1)`` with one seed; ``–`` without data."""
    if not stat or stat.get("mean") is None:
        return "–"
    if stat.get("ci") is None:
        return f"{stat['mean']:.{digits}f} (n={stat.get('n', 1)})"
    return f"{stat['mean']:.{digits}f} ± {stat['ci']:.{digits}f}"


def markdown(result: Mapping[str, Any]) -> str:
    """``study.md``: the per-arm table (first evaluation temperature), other temperatures, the checks."""
    ev = result["eval"]
    temps = list(next(iter(result["arms"].values()))["by_temperature"]) if result["arms"] else []
    t0 = temps[0] if temps else "1"
    metrics = [m for m in TABLE_METRICS if any(a["by_temperature"][t0][m]["mean"] is not None for a in result["arms"].values())]
    bt = result.get("bradley_terry") or {}
    lines = [f"# Study `{result['name']}` (preset `{result['preset']}`)", ""]
    if result["description"]:
        lines += [result["description"], ""]
    if result["claim"]:
        lines += [f"**Claim under test.** {result['claim']}", ""]
    seed_eval = "each run's own seed" if ev.get("seed") in (None, "run") else f"seed {ev['seed']}"
    lines += [f"Seeds {result['seeds']} (n = {result['n_seeds']}, the same for every arm); {result['runs_finished']} of "
              f"{result['runs_expected']} runs finished. Evaluation: the first {ev['prompts']} {ev['split']} prompts, "
              f"{ev['samples']} sample(s) each, evaluation sampling with {seed_eval}. Cells: {result['ci_method']}. "
              "Win rate: against π_ref's sample of the same prompt, by the `alpacafarm` labelers' majority (ties ½). "
              "BT: Bradley-Terry strength ± s.e. from every pairwise comparison of the arms' completions.", "",
              f"## Every arm at temperature {t0}", ""]
    head = ["arm", "agent", "budget", "n", *(TITLES[m] for m in metrics), "BT strength"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(result["arms"].items(), key=lambda kv: -(kv[1]["by_temperature"][t0][metrics[0]]["mean"]
                                                            if metrics and kv[1]["by_temperature"][t0][metrics[0]]["mean"] is not None
                                                            else -math.inf))
    ref = result.get("reference")
    rows = [(label, a["agent"], str(a["budget"]), a["by_temperature"][t0], bt.get(label)) for label, a in order]
    if ref:
        stats = ref["by_temperature"][t0]
        rows.append((ref["label"], "π_ref (SFT)", "0", stats, None))
    rows.sort(key=lambda r: -(r[3][metrics[0]]["mean"] if metrics and r[3][metrics[0]]["mean"] is not None else -math.inf))
    for label, agent, budget, stats, b in rows:
        n = max((s["n"] for s in stats.values()), default=0)
        lines.append("| " + " | ".join([label, agent, budget, str(n), *(cell(stats[m]) for m in metrics),
                                        f"{b['strength']:.2f} ± {b['se']:.2f}" if b else "–"]) + " |")
    if ref:
        lines += ["", f"`{ref['label']}`: π_ref's own samples, recomputed in every run's evaluation (one value per seed); "
                  "its win rate against itself is ½ by construction."]
    if len(temps) > 1:
        lines += ["", "## Win rate vs π_ref and gold at every evaluation temperature", ""]
        head = ["arm", *(f"win T={t}" for t in temps), *(f"gold T={t}" for t in temps)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, a in order:
            lines.append("| " + " | ".join([label, *(cell(a["by_temperature"][t]["win_rate_labelers"]) for t in temps),
                                            *(cell(a["by_temperature"][t]["gold"]) for t in temps)]) + " |")
    gao = result.get("overoptimisation")
    if gao:
        lines += ["", "## Over-optimisation: Gao et al.'s forms fitted to gold and proxy (relative to π_ref)", "",
                  "d = √KL(π‖π_ref); best-of-n R = d(α − βd), RL R = d(α − β log d); ordinary least squares over every "
                  "(seed, arm) point, ± standard errors; d_peak: where the fitted R peaks. Shape: the arm (ordered by "
                  "mean KL) where mean gold peaks, and whether mean proxy is highest at the series' end.", "",
                  "| series | form | points | gold α | gold β | gold R² | gold d_peak | proxy α | proxy β | gold peaks at | "
                  "gold drop after peak | proxy highest at the end |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def pm(v, e):
            return "–" if v is None else f"{v:.3f}" + (f" ± {e:.3f}" if e is not None else "")

        for g in gao:
            fg, fp, sh = g["fit"]["gold"], g["fit"]["proxy"], g["shape"] or {}
            lines.append("| " + " | ".join([
                g["label"], g["form"], str(fg["n"]), pm(fg["alpha"], fg["alpha_se"]), pm(fg["beta"], fg["beta_se"]),
                "–" if fg["r2"] is None else f"{fg['r2']:.2f}", "–" if fg["d_peak"] is None else f"{fg['d_peak']:.2f}",
                pm(fp["alpha"], fp["alpha_se"]), pm(fp["beta"], fp["beta_se"]),
                f"{sh['gold_peak_arm']}{' (inside)' if sh['gold_peaks_inside'] else ' (an end)'}" if sh else "–",
                f"{sh['gold_drop_after_peak']:.3f}" if sh else "–",
                ("yes" if sh["proxy_rises_to_end"] else "no") if sh else "–"]) + " |")
    h2h = result.get("head_to_head")
    if h2h:
        labels = h2h["arms"]
        lines += ["", f"## Head to head: P(row ≻ column) under the `{h2h['labelers']}` labelers (T={h2h['temperature']:g})", "",
                  "A random labeler of the population prefers the row's completion to the column's, averaged over "
                  "the prompts, per seed (seed k meets seed k), then mean ± 95% t-interval over seeds. `min`: the "
                  "row's worst opponent (the max-min criterion of Nash learning).", "",
                  "| row ≻ column | " + " | ".join(labels) + " | min (opponent) |", "|" + "---|" * (len(labels) + 2)]
        for a in sorted(labels, key=lambda x: -(h2h["min"].get(x, {}).get("mean") or -math.inf)):
            w = h2h["min"].get(a)
            lines.append("| " + " | ".join([a, *("—" if a == b else cell(h2h["p_row_beats_column"][a][b], 2) for b in labels),
                                            f"{cell(w, 3)} ({w['opponent']})" if w else "–"]) + " |")
    dom = result.get("dominance")
    if dom:
        lines += ["", f"## Is every other arm below `{dom['agent']}`'s frontier? (T={dom['temperature']:g}, means)", "",
                  f"For each arm of another agent: the `{dom['agent']}` arms with no more KL and at least as much reward.", "",
                  "| arm | dominated on proxy by | dominated on gold by |", "|---|---|---|"]
        for label, v in dom["arms"].items():
            lines.append(f"| {label} | {', '.join(v.get('proxy', [])) or '**none**'} | {', '.join(v.get('gold', [])) or '**none**'} |")
        lines += ["", f"Every other arm dominated: proxy **{'yes' if dom['all_dominated_proxy'] else 'no'}**, gold "
                  f"**{'yes' if dom['all_dominated_gold'] else 'no'}**."]
    rms = result.get("reward_models")
    if rms:
        lines += ["", "## Reward models fitted by the study", "",
                  "Bradley-Terry reward models fitted inside the study (`reward_models` in its YAML; cached in "
                  "`reward-models/NAME/`), each the reward of the arms that name it. Held-out: one labeler's click per "
                  "pair of validation prompts; its Bayes ceiling: the best any model can do on those clicks; gold pair accuracy: how often the model orders a held-out pair as gold does.", "",
                  "| reward model | data | labelers | train pairs | epochs | held-out pairs | held-out accuracy | "
                  "its Bayes ceiling | gold pair accuracy | Spearman with gold | fit seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]

        def num(v, digits=3):
            return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

        for name, r in rms.items():
            spec, m, st = r["spec"], r["metrics"] or {}, r["settings"] or {}
            size = f"{spec['prompts']} prompts" if "prompts" in spec else f"{spec['pairs']} pairs"
            lines.append("| " + " | ".join([name, f"{spec['data']} ({size})", spec["labelers"], num(m.get("n_train_pairs")),
                                            num(st.get("epochs")), num(m.get("n_eval_pairs")), num(m.get("eval_accuracy")),
                                            num(r.get("heldout_bayes_ceiling")), num(m.get("eval_gold_pair_accuracy")), num(m.get("eval_spearman")),
                                            num(m.get("seconds_train"), 0)]) + " |")
        used = {label: a["reward_model"] for label, a in result["arms"].items() if a.get("reward_model")}
        lines += ["", "Arms on a fitted reward model: " + ", ".join(f"`{k}` ({v})" for k, v in used.items()) + "."]
    if result["checks"]:
        lines += ["", "## The claims, checked", "",
                  "Each claim compares two arms on the same seeds: the per-seed difference a − b, its mean and 95% "
                  "t-interval. `holds`: the interval is on the claimed side of 0; `direction only`: the mean is, the "
                  "interval includes 0; `not shown`: the mean is on the other side; `reversed`: the interval is.", "",
                  "| claim | T | seeds | a − b | verdict | note |", "|---|---|---|---|---|---|"]
        for c in result["checks"]:
            lines.append(f"| {c['claim']} | {c['temperature']:g} | {len(c['seeds'])} | {cell(c['difference'])} | "
                         f"**{c['verdict']}** | {c['note']} |")
    lines.append("")
    return "\n".join(lines)


def plot(result: Mapping[str, Any], study: Study, path: str | os.PathLike) -> Path:
    """``study.png``: ``bars`` — the plot metric per arm with its 95% CI (π_ref as a line); ``frontier`` — gold and
    proxy against √KL per arm with CIs, and win rate against the evaluation temperature."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    temps = [f"{t:g}" for t in study.temperatures]
    t0 = temps[0]
    arms = result["arms"]
    ref = result.get("reference")
    if study.plot == "bars":
        m = study.plot_metric
        fig = Figure(figsize=(max(6.0, 0.9 * len(arms) + 2), 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        order = sorted(arms, key=lambda k: -(arms[k]["by_temperature"][t0][m]["mean"] or -math.inf))
        means = [arms[k]["by_temperature"][t0][m]["mean"] or 0.0 for k in order]
        cis = [arms[k]["by_temperature"][t0][m]["ci"] or 0.0 for k in order]
        ax.bar(range(len(order)), means, yerr=cis, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
        if ref and ref["by_temperature"][t0][m]["mean"] is not None:
            ax.axhline(ref["by_temperature"][t0][m]["mean"], color="black", linestyle="--", label="π_ref (SFT)")
            ax.legend(fontsize=8)
        ax.set_ylabel(TITLES.get(m, m))
        ax.set_title(f"{study.name} ({study.preset}): {TITLES.get(m, m)}, mean ± 95% CI over n={len(study.seeds)} seeds",
                     fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        return _save_png(fig, path)
    if study.plot == "overoptimisation":
        return _plot_overoptimisation(result, study, path)
    if study.plot == "matrix":
        return _plot_matrix(result, study, path)
    # frontier: gold | proxy vs sqrt(KL); win rate vs temperature
    fig = Figure(figsize=(16, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    from matplotlib import colormaps

    agents = sorted({a["agent"] for a in arms.values()})
    cmap = colormaps["tab10"]
    color = {a: cmap(i % 10) for i, a in enumerate(agents)}
    for ax, m in zip(axes[:2], ("gold", "proxy")):
        seen = set()
        for label, a in arms.items():
            s, k = a["by_temperature"][t0][m], a["by_temperature"][t0]["kl"]
            if s["mean"] is None or k["mean"] is None:
                continue
            x = math.sqrt(max(k["mean"], 0.0))
            # the interval of sqrt(KL) from KL's: monotone transform of the endpoints
            xerr = None
            if k["ci"] is not None:
                lo, hi = math.sqrt(max(k["mean"] - k["ci"], 0.0)), math.sqrt(max(k["mean"] + k["ci"], 0.0))
                xerr = [[x - lo], [hi - x]]
            ax.errorbar(x, s["mean"], yerr=s["ci"], xerr=xerr, fmt="o", color=color[a["agent"]], capsize=3,
                        label=None if a["agent"] in seen else a["agent"])
            ax.annotate(label, (x, s["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            seen.add(a["agent"])
        if ref and ref["by_temperature"][t0][m]["mean"] is not None:
            ax.scatter(0.0, ref["by_temperature"][t0][m]["mean"], color="black", marker="*", s=120, label="π_ref")
        ax.set_xlabel("√KL(π‖π_ref) (√nats)")
        ax.set_ylabel(TITLES[m])
        ax.set_title(f"{TITLES[m]} vs √KL (T={t0}; 95% CI, n={len(study.seeds)})", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax = axes[2]
    xs = [float(t) for t in temps]
    for label, a in arms.items():
        ys = [a["by_temperature"][t]["win_rate_labelers"]["mean"] for t in temps]
        es = [a["by_temperature"][t]["win_rate_labelers"]["ci"] or 0.0 for t in temps]
        pts = [(x, y, e) for x, y, e in zip(xs, ys, es) if y is not None]
        if pts:
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=2,
                        color=color[a["agent"]], alpha=0.8, linewidth=1, label=label)
    ax.axhline(0.5, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("evaluation temperature (π_ref sampled at the same temperature)")
    ax.set_ylabel("win rate vs π_ref (labelers)")
    ax.set_title("temperature robustness", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{study.name} ({study.preset})")
    return _save_png(fig, path)


def _plot_overoptimisation(result: Mapping[str, Any], study: Study, path: str | os.PathLike) -> Path:
    """Gold (left) and proxy (right) minus π_ref's against d = √KL: per-seed points, per-arm means, Gao's fitted curves."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    cmap = colormaps["tab10"]
    for ax, m in zip(axes, ("gold", "proxy")):
        for i, g in enumerate(result.get("overoptimisation") or []):
            c = cmap(i % 10)
            ax.scatter([q["d"] for q in g["points"]], [q[m] for q in g["points"]], color=c, s=12, alpha=0.4)
            ax.plot([q["d"] for q in g["means"]], [q[m] for q in g["means"]], "o", color=c, label=g["label"])
            fit = g["fit"][m]
            if fit["alpha"] is not None and g["points"]:
                top = max(q["d"] for q in g["points"])
                xs = [top * k / 60 for k in range(61)]
                ax.plot(xs, gao_curve(fit, xs), "-", color=c, alpha=0.8, linewidth=1)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("d = √KL(π‖π_ref) (√nats)")
        ax.set_ylabel(f"{TITLES[m]} − π_ref's")
        ax.set_title(f"{TITLES[m]}: points = seeds, dots = means, lines = Gao fits", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{study.name} ({study.preset}): reward over-optimisation, n={len(study.seeds)} seeds")
    return _save_png(fig, path)


def _plot_matrix(result: Mapping[str, Any], study: Study, path: str | os.PathLike) -> Path:
    """The head-to-head matrix P(row ≻ column) as a heat map (0.5 white), means over seeds in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h2h = result.get("head_to_head") or {"arms": [], "p_row_beats_column": {}}
    labels = h2h["arms"]
    k = max(len(labels), 1)
    fig = Figure(figsize=(1.0 * k + 3, 0.8 * k + 2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    grid = [[0.5 if a == b else (h2h["p_row_beats_column"][a][b]["mean"] or 0.5) for b in labels] for a in labels]
    im = ax.imshow(grid or [[0.5]], cmap="RdBu", vmin=0.2, vmax=0.8)
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            if a != b:
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    fig.colorbar(im, ax=ax, label="P(row ≻ column)")
    ax.set_title(f"{study.name} ({study.preset}): head to head under the {h2h.get('labelers')} labelers, "
                 f"mean of n={len(study.seeds)} seeds", fontsize=9)
    return _save_png(fig, path)


def _save_png(fig, path: str | os.PathLike) -> Path:
    """Render in memory, then write atomically (a reader never sees half a PNG)."""
    import io

    from rlhfgym.envs.assets import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(Path(path), buf.getvalue())


def write_report(study: Study, root: str | os.PathLike) -> dict[str, Path]:
    """Write ``study.md``, ``study.json`` and ``study.png`` into ``root`` (atomically); returns their paths."""
    from rlhfgym.envs.assets import atomic_write_text

    root = Path(root)
    result = analyse(study, root)
    paths = {"md": root / "study.md", "json": root / "study.json", "png": root / "study.png"}
    atomic_write_text(paths["json"], json.dumps(result, indent=2) + "\n")
    atomic_write_text(paths["md"], markdown(result))
    plot(result, study, paths["png"])
    return paths


__all__ = ["Study", "Arm", "Check", "RewardModelSpec", "StudyError", "load_study", "resolve", "registered", "run_study",
           "prepare_reward_models", "reward_model_dir", "reward_model_report", "analyse",
           "judge_check", "write_report", "markdown", "collect", "eval_file", "gao_fit", "gao_curve", "CI_METHOD"]
