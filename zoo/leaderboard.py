"""``rlhf-zoo leaderboard RUNS_DIR``: tables and plots of every evaluated run below a directory.

Runs (``eval.json``, written by ``rlhf-zoo eval`` / ``train``, and a benchmark's evaluations at its
other temperatures, ``eval-t<T>.json``) are grouped by (env id, agent, budget, evaluation protocol);
a group's seeds give, per metric, the mean and a 95% confidence interval, mean ± t_{0.975, n−1} · s / √n
(Student t; one seed prints its mean and "n=1"). Each run is evaluated with its own seed (the
protocol's seed "run"), so the interval covers the evaluation's sampling noise as well as training's.
The Bradley-Terry ratings, the frontier and the curves use each run's ``eval.json`` only.

Agents are also rated against each other per env id with Bradley-Terry (:func:`fit_bradley_terry`):
for every pair of runs of two different agents and every prompt (and sample index) both answered,
the ``alpacafarm`` labelers' majority says which completion is better (population probability
> 1/2; exactly 1/2 is a tie, half a win each). Agents with more seeds or prompts play more
comparisons; BT's strengths do not depend on how many games a pair played, only on who won them.
The labelers read the gold components stored with each completion in ``completions.jsonl``, so no
model is loaded here.

A missing or broken ``eval.json`` / ``completions.jsonl`` is reported with a
:class:`LeaderboardWarning` naming the file and left out; it never stops the leaderboard.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .evaluate import COMPLETIONS_FILE, EVAL_FILE, FORMAT_VERSION, LABELERS, METRICS, PER_SAMPLE_METRICS, PROTOCOL_KEYS

#: metric -> column title (order of the tables)
TITLES = {
    "gold": "gold", "proxy": "proxy reward", "kl": "KL", "win_rate_labelers": "win rate vs SFT (labelers)",
    "win_rate_judge": "win rate vs SFT (judge)", "distinct_1": "distinct-1", "distinct_2": "distinct-2",
    "length": "length (tokens)", "eos_rate": "EOS rate",
}


class LeaderboardWarning(UserWarning):
    """A run left out of the leaderboard (its file is missing, unreadable or of another format)."""


# ------------------------------------------------------------------------------------------ statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if t * t < df:  # near 0 df / (df + t²) rounds to 1: use the complementary form, accurate there
        half = 0.5 * _betainc(0.5, df / 2.0, t * t / (df + t * t))
        return 0.5 + half if t >= 0 else 0.5 - half
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on the CDF; scipy is not a dependency)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}.")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """``n``, ``mean`` and the half-width ``ci`` of the Student-t interval (None with one value)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "ci": None}
    m = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": m, "ci": None}
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": m, "ci": student_t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)}


# ------------------------------------------------------------------------------------------ reading runs


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_eval(record: Any) -> str | None:
    """What is wrong with an ``eval.json`` record for the leaderboard; None when it is usable."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("format") != FORMAT_VERSION:
        return f"format {record.get('format')!r}, this rlhf-gym reads format {FORMAT_VERSION} (re-run rlhf-zoo eval)"
    missing = [k for k in ("algo", "env_id", "seed", "budget", "protocol", "metrics") if k not in record]
    if missing:
        return f"missing {missing}"
    protocol, metrics = record["protocol"], record["metrics"]
    if not isinstance(protocol, dict) or any(k not in protocol for k in PROTOCOL_KEYS):
        return f"protocol must hold {list(PROTOCOL_KEYS)}"
    if not isinstance(metrics, dict):
        return "metrics is not an object"
    for name in METRICS:
        value = metrics.get(name)
        if name in PER_SAMPLE_METRICS and value is not None:
            value = value.get("mean") if isinstance(value, dict) else "bad"
        if value is not None and not _number(value):
            return f"metric {name!r} is {metrics.get(name)!r}, not a number (or {{'mean': number}})"
    if not isinstance(metrics.get("gold"), dict) or not _number(metrics["gold"].get("mean")):
        return "metric 'gold' has no mean"
    return None


#: the evaluation files of a run: its protocol's (``eval.json``) and a benchmark's other temperatures
EVAL_FILES = (EVAL_FILE, "eval-t*.json")


def find_runs(runs_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every usable evaluation below ``runs_dir``, sorted by path: records with ``run_dir`` added and
    ``primary`` (True for ``eval.json``, False for the other temperatures' ``eval-t<T>.json``)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ValueError(f"{runs_dir} is not a directory; pass the directory your runs were written to (e.g. runs/).")
    out = []
    for path in sorted(p for pattern in EVAL_FILES for p in runs_dir.rglob(pattern)):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            warnings.warn(f"skipping {path}: unreadable ({e}); re-run rlhf-zoo eval on its run.", LeaderboardWarning,
                          stacklevel=2)
            continue
        problem = check_eval(record)
        if problem:
            warnings.warn(f"skipping {path}: {problem}.", LeaderboardWarning, stacklevel=2)
            continue
        record["run_dir"] = str(path.parent)
        record["primary"] = path.name == EVAL_FILE
        out.append(record)
    return out


def read_completions(run_dir: str | os.PathLike) -> list[dict[str, Any]] | None:
    """The run's ``completions.jsonl`` rows; None (with a warning) when missing or broken."""
    path = Path(run_dir) / COMPLETIONS_FILE
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"{path}: unreadable ({e}); the run is left out of the Bradley-Terry ratings.", LeaderboardWarning,
                      stacklevel=2)
        return None
    for n, row in enumerate(rows):
        ok = (isinstance(row, dict) and isinstance(row.get("prompt"), int) and isinstance(row.get("sample"), int)
              and isinstance(row.get("text"), str) and isinstance(row.get("components"), dict)
              and all(_number(v) for v in row["components"].values()))
        if not ok:
            warnings.warn(f"{path}: line {n + 1} lacks prompt/sample/text/components; the run is left out of the "
                          "Bradley-Terry ratings (re-run rlhf-zoo eval on it).", LeaderboardWarning, stacklevel=2)
            return None
    return rows


def agent_label(record: dict[str, Any]) -> str:
    """A leaderboard player: one algorithm at one budget."""
    return f"{record['algo']}@{record['budget']}"


def _protocol(record: dict[str, Any]) -> tuple:
    """The protocol as a group key; a seed equal to the run's own seed is ``"run"``, so the seeds of
    one agent evaluated each with its own seed fall in one group."""
    p = record["protocol"]
    return tuple("run" if k == "seed" and p[k] == record["seed"] else p[k] for k in PROTOCOL_KEYS)


def primary_runs(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of ``eval.json`` files (each run once), for ratings and plots."""
    return [r for r in records if r.get("primary", True)]


def _metric_value(record: dict[str, Any], name: str, block: str = "metrics") -> float | None:
    value = (record.get(block) or {}).get(name)
    if isinstance(value, dict):
        value = value.get("mean")
    return float(value) if _number(value) else None


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (env id, algo, budget, protocol): seeds and mean ± 95% CI of every metric over them."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["env_id"], r["algo"], r["budget"], _protocol(r))].append(r)
    rows = []
    for (env_id, algo, budget, protocol), runs in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        row: dict[str, Any] = {"env_id": env_id, "algo": algo, "budget": budget,
                               "protocol": dict(zip(PROTOCOL_KEYS, protocol)),
                               "primary": any(r.get("primary", True) for r in runs),
                               "seeds": sorted(r["seed"] for r in runs), "runs": [r["run_dir"] for r in runs]}
        row["metrics"] = {m: mean_ci([v for r in runs if (v := _metric_value(r, m)) is not None]) for m in METRICS}
        row["sft"] = {m: mean_ci([v for r in runs if (v := _metric_value(r, m, "sft")) is not None])
                      for m in ("gold", "proxy")}
        row["kl_methods"] = sorted({(r["metrics"].get("kl") or {}).get("method") or "unknown" for r in runs})
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ Bradley-Terry


def keyed_completions(record: dict[str, Any], rows: Sequence[dict[str, Any]],
                      components: dict[tuple[str, str], dict[str, float]]) -> dict[tuple[str, int], str]:
    """A run's completions (``completions.jsonl`` rows) keyed by ``("<split>:<prompt index>", sample)``, so
    two runs' answers to the same prompt meet; each ``(prompt key, text)``'s gold components are added to
    ``components``, which the labelers read (``LabelerPopulation.preset(..., components_fn=...)``)."""
    split = record["protocol"]["split"]
    keyed = {}
    for row in rows:
        prompt = f"{split}:{row['prompt']}"
        components[(prompt, row["text"])] = row["components"]
        keyed[(prompt, row["sample"])] = row["text"]
    return keyed


def pairwise_outcomes(runs: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]]) -> list[tuple[str, str, float, float]]:
    """``(agent_a, agent_b, wins_a, wins_b)`` for every pair of runs of different agents and every
    (split, prompt, sample) both answered, judged by the labelers' majority (ties: half each)."""
    from rlhfgym.envs.feedback.labelers import LabelerPopulation

    table: dict[tuple[str, str], dict[str, float]] = {}
    answers = []
    for record, rows in runs:
        answers.append((agent_label(record), keyed_completions(record, rows, table)))

    def components(prompt: str, text: str) -> dict[str, float]:
        return table[(prompt, text)]

    population = LabelerPopulation.preset(LABELERS, components_fn=components)
    outcomes = []
    for i in range(len(answers)):
        for j in range(i + 1, len(answers)):
            (a, ya), (b, yb) = answers[i], answers[j]
            if a == b:
                continue  # seeds of one agent do not play each other
            keys = sorted(set(ya) & set(yb))
            if not keys:
                continue
            probs = population.population_prob([k[0] for k in keys], [ya[k] for k in keys], [yb[k] for k in keys])
            for p in probs:
                outcomes.append((a, b, 1.0, 0.0) if p > 0.5 else (a, b, 0.0, 1.0) if p < 0.5 else (a, b, 0.5, 0.5))
    return outcomes


def bradley_terry(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per env id, the Bradley-Terry fit over its agents (``None`` where fewer than two agents have completions)."""
    from rlhfgym.envs.feedback.ratings import fit_bradley_terry

    by_env: dict[str, list] = defaultdict(list)
    records = primary_runs(records)
    for r in records:
        rows = read_completions(r["run_dir"])
        if rows is not None:
            by_env[r["env_id"]].append((r, rows))
    fits: dict[str, Any] = {}
    for env_id in sorted({r["env_id"] for r in records}):
        runs = by_env.get(env_id, [])
        names = sorted({agent_label(r) for r, _ in runs})
        outcomes = pairwise_outcomes(runs) if len(names) >= 2 else []
        fits[env_id] = fit_bradley_terry(outcomes, names=names) if outcomes else None
    return fits


# ------------------------------------------------------------------------------------------ writing


def _cell(stat: dict[str, Any], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "–"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f} (n=1)"
    return f"{stat['mean']:.{digits}f} ± {stat['ci']:.{digits}f}"


def _protocol_text(p: dict[str, Any]) -> str:
    seed = "the run's seed" if p["seed"] == "run" else f"seed {p['seed']}"
    return f"{p['split']}, {p['prompts']} prompts × {p['samples']}, T={p['temperature']:g}, {seed}"


#: the columns of each env's first, compact table
SUMMARY_METRICS = ("gold", "proxy", "kl", "win_rate_labelers", "win_rate_judge")  # each where the env has it


def markdown(rows: Sequence[dict[str, Any]], fits: dict[str, Any]) -> str:
    lines = ["# rlhf-gym leaderboard", "",
             "Mean ± 95% confidence interval over seeds (Student t); `(n=1)`: one seed, no interval. "
             "KL: sequence KL(π‖π_ref) in nats (Monte-Carlo; best-of-n: its analytic bound). Win rates: against "
             f"π_ref's sample of the same prompt, by the `{LABELERS}` labelers' majority (ties count 1/2) or the "
             "env's judge. Bradley-Terry: strengths (log-odds, mean 0) ± standard error, from every pairwise "
             "comparison of two agents' completions on the same prompts, judged by the same labelers.", ""]
    metrics = [m for m in METRICS if any(r["metrics"][m]["mean"] is not None for r in rows)]
    for env_id in sorted({r["env_id"] for r in rows}):
        env_rows = [r for r in rows if r["env_id"] == env_id]
        fit = fits.get(env_id)
        strength = {}
        if fit is not None:
            strength = {name: (fit.strengths[k], fit.se[k]) for k, name in enumerate(fit.names)}
        lines += [f"## {env_id}", ""]
        # eval.json's protocol first (the ratings are from it), then the benchmark's other temperatures
        order = sorted(env_rows, key=lambda r: (not r["primary"], -r["protocol"]["temperature"],
                                                -(r["metrics"]["gold"]["mean"] or -math.inf)))
        # the columns people compare first (the README quotes these tables), one table a protocol;
        # every metric follows
        summary = [m for m in SUMMARY_METRICS if any(r["metrics"][m]["mean"] is not None for r in env_rows)]
        head = ["agent", "budget", "seeds", *(TITLES[m] for m in summary), "BT strength"]
        protocols = list(dict.fromkeys(_protocol_text(r["protocol"]) for r in order))
        for text in protocols:
            if len(protocols) > 1:
                lines += [f"**{text}**", ""]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for r in (r for r in order if _protocol_text(r["protocol"]) == text):
                bt = strength.get(agent_label(r)) if r["primary"] else None
                lines.append("| " + " | ".join([
                    r["algo"], str(r["budget"]), str(len(r["seeds"])), *(_cell(r["metrics"][m]) for m in summary),
                    f"{bt[0]:.2f} ± {bt[1]:.2f}" if bt else "–"]) + " |")
            lines.append("")
        if len(protocols) == 1:
            lines += [f"Protocol: {protocols[0]}.", ""]
        lines += [f"### All metrics, {env_id}", ""]
        head = ["agent", "budget", "protocol", "seeds", *(TITLES[m] for m in metrics), "BT strength"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in order:
            bt = strength.get(agent_label(r)) if r["primary"] else None
            lines.append("| " + " | ".join([
                r["algo"], str(r["budget"]), _protocol_text(r["protocol"]), str(len(r["seeds"])),
                *(_cell(r["metrics"][m]) for m in metrics),
                f"{bt[0]:.2f} ± {bt[1]:.2f}" if bt else "–"]) + " |")
        for protocol in {_protocol_text(r["protocol"]): r for r in env_rows}.values():
            sft = protocol["sft"]
            if sft["gold"]["mean"] is not None:
                lines.append(f"\nπ_ref (SFT) under {_protocol_text(protocol['protocol'])}: gold {_cell(sft['gold'])}, "
                             f"proxy {_cell(sft['proxy'])}; win rate 0.5 against itself by construction.")
        lines.append("")
        if fit is not None:
            lines += [f"### Bradley-Terry ratings, {env_id}", "", fit.to_markdown(), ""]
        else:
            lines += ["Bradley-Terry: needs completions of at least two agents on the same prompts.", ""]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict[str, Any]], fits: dict[str, Any], root: str | os.PathLike | None = None) -> str:
    """The leaderboard as CSV; run dirs are written relative to ``root`` (the runs dir) when given,
    so a committed table names no machine's paths."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    head = ["env_id", "algo", "budget", *(f"eval_{k}" for k in PROTOCOL_KEYS), "n_seeds", "seeds"]
    for m in METRICS:
        head += [f"{m}_mean", f"{m}_ci95"]
    head += ["sft_gold", "sft_proxy", "bt_strength", "bt_se", "run_dirs"]
    writer.writerow(head)
    for r in rows:
        fit = fits.get(r["env_id"])
        bt = ["", ""]
        if fit is not None and r["primary"] and agent_label(r) in fit.names:
            k = fit.names.index(agent_label(r))
            bt = [repr(float(fit.strengths[k])), repr(float(fit.se[k]))]
        cells = [r["env_id"], r["algo"], r["budget"], *(r["protocol"][k] for k in PROTOCOL_KEYS), len(r["seeds"]),
                 " ".join(map(str, r["seeds"]))]
        for m in METRICS:
            stat = r["metrics"][m]
            cells += ["" if stat["mean"] is None else repr(stat["mean"]), "" if stat["ci"] is None else repr(stat["ci"])]
        cells += ["" if r["sft"][m]["mean"] is None else repr(r["sft"][m]["mean"]) for m in ("gold", "proxy")]
        runs = [os.path.relpath(d, root) if root is not None else d for d in r["runs"]]
        cells += [*bt, " ".join(runs)]
        writer.writerow(cells)
    return buf.getvalue()


def write_leaderboard(runs_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                      progress: bool = True) -> dict[str, Path]:
    """Write ``leaderboard.md``, ``leaderboard.csv``, ``frontier.png`` and ``curves.png`` for the runs below
    ``runs_dir`` into ``out_dir`` (default ``runs_dir``); returns their paths by name (md, csv, frontier, curves)."""
    from tqdm.auto import tqdm

    from rlhfgym.envs.assets import atomic_write_text

    from .plots import plot_curves, plot_frontier, read_curves

    records = find_runs(runs_dir)
    out = Path(out_dir) if out_dir is not None else Path(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    fits = bradley_terry(records)
    paths = {"md": out / "leaderboard.md", "csv": out / "leaderboard.csv"}
    atomic_write_text(paths["md"], markdown(rows, fits))
    atomic_write_text(paths["csv"], csv_text(rows, fits, root=runs_dir))
    paths["frontier"] = plot_frontier(primary_runs(records), out / "frontier.png")
    curves = []
    for r in tqdm(primary_runs(records), desc="training curves", unit="run", disable=not progress):
        curves.append({**r, "curves": read_curves(Path(r["run_dir"]) / "tb")})
    paths["curves"] = plot_curves(curves, out / "curves.png")
    if progress:
        print(f"leaderboard of {len(primary_runs(records))} run(s) in {len(rows)} group(s): {paths['md']}")
    return paths


__all__ = ["write_leaderboard", "find_runs", "check_eval", "summarize", "bradley_terry", "pairwise_outcomes",
           "read_completions", "keyed_completions", "primary_runs", "mean_ci", "student_t_quantile", "student_t_cdf", "agent_label", "LeaderboardWarning"]
