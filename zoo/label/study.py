"""Study: held-out reward-model accuracy against the number of labels, random vs active selection.

Simulated labelers (the ``alpacafarm`` population of :mod:`rlhfgym.envs.feedback.labelers`: four
labeler types, 25% of labels replaced by a coin) label pairs **through the labeling app's HTTP API**
(FastAPI's ``TestClient``; ``GET /api/next``, then ``POST /api/label`` with the side they prefer, as
the page does), stored in a fresh SQLite database per run. The app serves pairs either in random
order or by active selection (:class:`~.active.ActiveSelector`: the variance of P(a > b) over a
3-member bootstrap ensemble, refitted every 10 labels; Christiano et al. 2017).

* pool: two temperature-1 samples of the SFT policy on each of ``pool`` train prompts of
  ``RLHF-Summarize-Gold-v0`` (identical pairs dropped);
* held out: the same on the first ``heldout`` validation prompts;
* reward model: the linear Bradley-Terry model of :mod:`.active` (frozen SFT hidden states plus four
  word-overlap statistics of the completion against its prompt), fitted on all labels in the database
  at each budget;
* accuracy: against one fresh simulated click per held-out pair (its Bayes ceiling is reported),
  and against the population's majority (ties dropped).

Run (a few minutes on a 2-core CPU)::

    OMP_NUM_THREADS=1 python -m rlhfgym.zoo.label.study --out docs/results/labeling

which writes ``study.json``, ``study.md`` and ``study.png`` there.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ENV_ID = "RLHF-Summarize-Gold-v0"
POPULATION = "alpacafarm"
BUDGETS = (10, 20, 40, 80, 160, 320)
STRATEGIES = ("random", "active")


def _t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (NaN with one value)."""
    from rlhfgym.zoo.leaderboard import student_t_quantile

    m = float(np.mean(values))
    if len(values) < 2:
        return m, float("nan")
    return m, float(student_t_quantile(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))


def label_through_api(client, population, labeler: str, n: int, rng: np.random.Generator) -> int:
    """A simulated labeler answers ``n`` pairs through the HTTP API; returns how many it answered."""
    answered = 0
    for _ in range(n):
        pair = client.get("/api/next", params={"labeler": labeler})
        pair.raise_for_status()
        pair = pair.json()
        if pair["done"]:
            break
        click = population.label([pair["prompt"]], [pair["left"]], [pair["right"]], rng=rng)
        choice = "left" if click.label[0] == 1 else "right"
        r = client.post("/api/label", json={"labeler": labeler, "pair_id": pair["pair_id"], "choice": choice})
        r.raise_for_status()
        answered += 1
    return answered


def run_study(out: str | Path = "docs/results/labeling", *, pool: int = 1000, heldout: int = 500,
              budgets: tuple[int, ...] = BUDGETS, seeds: int = 5, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    import gymnasium as gym
    import torch
    from fastapi.testclient import TestClient

    import rlhfgym.envs  # noqa: F401
    from rlhfgym.agents.common import reference_policy
    from rlhfgym.envs.feedback.labelers import LabelerPopulation
    from rlhfgym.envs.feedback.store import PreferenceStore

    from .active import ActiveSelector, PairFeatures, answer_targets, fit_linear_bt, text_features
    from .app import create_app

    t0 = time.time()
    torch.set_num_threads(1)
    env = gym.make(ENV_ID, device=device)
    core = env.unwrapped
    policy = reference_policy(core)
    population = LabelerPopulation.preset(POPULATION, core.task)

    def sample_pairs(split: str, n: int, seed: int):
        prompts = core.prompts(split, n)
        torch.manual_seed(seed)
        a = policy.generate_text(prompts, temperature=1.0)
        b = policy.generate_text(prompts, temperature=1.0)
        keep = [i for i in range(n) if a[i] != b[i]]
        return [prompts[i] for i in keep], [a[i] for i in keep], [b[i] for i in keep]

    pool_p, pool_a, pool_b = sample_pairs("train", pool, 1)
    held_p, held_a, held_b = sample_pairs("validation", heldout, 2)
    held_phi_a, held_phi_b = text_features(core, held_p, held_a), text_features(core, held_p, held_b)
    p_pop = population.population_prob(held_p, held_a, held_b)
    clicks = population.label(held_p, held_a, held_b, rng=np.random.default_rng(12345)).label
    ceiling = population.bayes_ceiling(held_p, held_a, held_b, rng=np.random.default_rng(54321))
    decided = np.abs(p_pop - 0.5) > 1e-12
    t_data = time.time() - t0
    if progress:
        print(f"pool {len(pool_p)} pairs, held out {len(held_p)} pairs ({t_data:.0f}s)", flush=True)

    results: dict[str, dict[int, list[dict[str, float]]]] = {s: {b: [] for b in budgets} for s in STRATEGIES}
    features = None
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in STRATEGIES:
            for seed in range(seeds):
                db = Path(tmp) / f"{strategy}-{seed}.db"
                store = PreferenceStore(f"sqlite:///{db}")
                store.add_pairs(pool_p, pool_a, pool_b, source_a="sft", source_b="sft", seed=seed)
                if features is None:  # the same pool (same pair ids) in every database
                    features = PairFeatures.for_pairs(core, store.pairs())
                order = ActiveSelector(store, features, seed=seed) if strategy == "active" else None
                client = TestClient(create_app(store, order=order, seed=seed))
                rng = np.random.default_rng(1000 + seed)
                held = features.transform(held_phi_a, held_phi_b)
                done = 0
                for budget in budgets:
                    done += label_through_api(client, population, f"sim-{seed}", budget - done, rng)
                    ids, q = answer_targets(store.answers())
                    w = fit_linear_bt(features.rows(ids), q)
                    a_wins = (held @ w) > 0
                    results[strategy][budget].append({
                        "labels": len(ids),
                        "accuracy_clicks": float((a_wins == clicks.astype(bool)).mean()),
                        "accuracy_majority": float((a_wins == (p_pop > 0.5))[decided].mean()),
                    })
                store.close()
                if progress:
                    last = results[strategy][budgets[-1]][-1]
                    print(f"{strategy} seed {seed}: accuracy at {budgets[-1]} labels {last['accuracy_clicks']:.3f} "
                          f"({time.time() - t0:.0f}s)", flush=True)

    rows = []
    for budget in budgets:
        row = {"labels": budget}
        for strategy in STRATEGIES:
            for metric in ("accuracy_clicks", "accuracy_majority"):
                m, h = _t_interval([r[metric] for r in results[strategy][budget]])
                row[f"{strategy}_{metric}"] = {"mean": m, "ci95": h}
        rows.append(row)
    report = {
        "env": ENV_ID, "labelers": POPULATION, "pool_pairs": len(pool_p), "heldout_pairs": len(held_p),
        "heldout_decided_pairs": int(decided.sum()), "seeds": seeds, "budgets": list(budgets),
        "bayes_ceiling_clicks": ceiling.exact, "rows": rows, "runs": results,
        "command": "OMP_NUM_THREADS=1 python -m rlhfgym.zoo.label.study --out docs/results/labeling",
        "seconds": round(time.time() - t0, 1), "seconds_data": round(t_data, 1),
    }
    write_report(report, Path(out))
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    """``study.json``, ``study.md`` (the table) and ``study.png`` (accuracy against labels), atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhfgym.envs.assets import atomic_write_bytes, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(report, indent=2) + "\n")

    def cell(x):
        return f"{x['mean']:.3f} ± {x['ci95']:.3f}"

    lines = [
        f"Held-out reward-model accuracy against the number of labels, random vs active selection "
        f"({report['env']} prompts, SFT sample pairs, `{report['labelers']}` simulated labelers answering through the "
        f"labeling app's HTTP API; {report['pool_pairs']} pool pairs, {report['heldout_pairs']} held-out pairs; mean ± 95% "
        f"t-interval over {report['seeds']} seeds). Click accuracy is bounded by the labelers' Bayes ceiling "
        f"{report['bayes_ceiling_clicks']:.3f}.",
        "",
        "| labels | random: accuracy (clicks) | active: accuracy (clicks) | random: agreement with majority | active: agreement with majority |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['labels']} | {cell(row['random_accuracy_clicks'])} | {cell(row['active_accuracy_clicks'])} | "
                     f"{cell(row['random_accuracy_majority'])} | {cell(row['active_accuracy_majority'])} |")
    lines += ["", f"Made by `{report['command']}` ({report['seconds']:.0f} s)."]
    atomic_write_text(out / "study.md", "\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["labels"] for r in report["rows"]]
    for strategy, color in (("random", "tab:gray"), ("active", "tab:blue")):
        m = np.array([r[f"{strategy}_accuracy_majority"]["mean"] for r in report["rows"]])
        h = np.array([r[f"{strategy}_accuracy_majority"]["ci95"] for r in report["rows"]])
        ax.plot(x, m, marker="o", color=color, label=f"{strategy} selection")
        ax.fill_between(x, m - h, m + h, color=color, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in x])
    ax.set_xlabel("labels collected")
    ax.set_ylabel("held-out agreement with labelers' majority")
    ax.set_title("Reward-model accuracy vs labels: random vs active")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(out / "study.png", buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhfgym.zoo.label.study", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results/labeling", help="where study.json/.md/.png go")
    p.add_argument("--pool", type=int, default=1000, help="train prompts whose SFT sample pairs can be labelled")
    p.add_argument("--heldout", type=int, default=500, help="validation prompts of the held-out pairs")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated label counts")
    args = p.parse_args(argv)
    budgets = tuple(int(x) for x in args.budgets.split(","))
    run_study(args.out, pool=args.pool, heldout=args.heldout, budgets=budgets, seeds=args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
