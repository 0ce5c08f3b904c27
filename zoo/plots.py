"""The leaderboard's figures: the reward–KL frontier of many runs and their training curves.

Figures are drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot, no
display, no global backend switch), one row per env id, so every panel compares like with like.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: what a training curve panel shows -> the tag suffixes agents log it under (``TrainingRun.update``
#: writes ``f"{agent.name}/{key}"`` against completions spent), first found wins
CURVE_TAGS: dict[str, tuple[str, ...]] = {
    "gold": ("gold",),
    "proxy reward": ("reward", "grow_reward", "validation_reward"),
    "KL to π_ref (nats)": ("kl",),
}


def _figure(rows: int, cols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * cols, 4.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(sorted(set(names)))}


def _save(fig, path: Path) -> Path:
    """PNG bytes rendered in memory, then written atomically (a reader never sees half a file)."""
    from rlhfgym.envs.assets import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _empty(path: Path, title: str, message: str) -> Path:
    fig, axes = _figure(1, 1)
    ax = axes[0][0]
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return _save(fig, path)


def plot_frontier(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """``frontier.png``: gold (left) and proxy reward (right) against √KL(π‖π_ref), one point per run.

    ``records``: ``eval.json`` records. Color = agent, marker size grows with the budget; the black
    star is π_ref (√KL = 0). Runs whose KL is unknown are left out (the title counts them).
    """
    path = Path(path)
    title = "Reward–KL frontier"
    envs = sorted({r["env_id"] for r in records})
    if not envs:
        return _empty(path, title, "no evaluated runs (eval.json) found")
    colors = _colors([r["algo"] for r in records])
    budgets = sorted({r["budget"] for r in records})
    size = {b: 30 + 60 * i / max(1, len(budgets) - 1) for i, b in enumerate(budgets)}
    fig, axes = _figure(len(envs), 2)
    for row, env_id in enumerate(envs):
        runs = [r for r in records if r["env_id"] == env_id]
        unknown = sum(r["metrics"]["kl"]["mean"] is None for r in runs)
        for col, (metric, label) in enumerate((("gold", "gold score"), ("proxy", "proxy reward (the env's reward)"))):
            ax = axes[row][col]
            seen = set()
            for r in runs:
                kl = r["metrics"]["kl"]["mean"]
                y = r["metrics"][metric]["mean"]
                if kl is None or y is None:
                    continue
                analytic = r["metrics"]["kl"].get("method") == "analytic"
                ax.scatter(math.sqrt(max(kl, 0.0)), y, color=colors[r["algo"]], s=size[r["budget"]],
                           marker="D" if analytic else "o", alpha=0.8, edgecolors="black", linewidths=0.5,
                           label=None if r["algo"] in seen else r["algo"])
                seen.add(r["algo"])
            sft = [r["sft"][metric]["mean"] for r in runs if r.get("sft") and r["sft"][metric]["mean"] is not None]
            if sft:
                ax.scatter(0.0, sum(sft) / len(sft), color="black", marker="*", s=160, label="π_ref (SFT)", zorder=3)
            ax.set_xlabel("√KL(π‖π_ref)  (√nats; ◆ = analytic bound)")
            ax.set_ylabel(label)
            note = f"; {unknown} run(s) with unknown KL left out" if unknown else ""
            ax.set_title(f"{env_id}: {label} vs √KL{note}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, title="agent (size = budget)", title_fontsize=8)
    fig.suptitle(f"{title}: one point per run (seeds and budgets)")
    return _save(fig, path)


def read_curves(tb_dir: str | os.PathLike) -> dict[str, tuple[list[float], list[float]]]:
    """The run's training curves from its TensorBoard logs: panel name (:data:`CURVE_TAGS`) -> (spent, values).

    Empty when the directory holds no event files (agents that log nothing, e.g. best-of-n).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = Path(tb_dir)
    if not tb_dir.is_dir():
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    out: dict[str, tuple[list[float], list[float]]] = {}
    for panel, suffixes in CURVE_TAGS.items():
        for suffix in suffixes:
            found = [t for t in tags if t.rsplit("/", 1)[-1] == suffix]
            if found:
                events = sorted(acc.Scalars(found[0]), key=lambda e: e.step)
                out[panel] = ([float(e.step) for e in events], [float(e.value) for e in events])
                break
    return out


def plot_curves(runs: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """``curves.png``: gold, proxy reward and KL against completions spent, one line per run.

    ``runs``: dicts with ``env_id``, ``algo``, ``budget``, ``seed`` and ``curves`` (:func:`read_curves`).
    """
    path = Path(path)
    title = "Training curves"
    runs = [r for r in runs if r["curves"]]
    if not runs:
        return _empty(path, title, "no TensorBoard training logs (run_dir/tb) with gold, reward or KL found")
    envs = sorted({r["env_id"] for r in runs})
    colors = _colors([r["algo"] for r in runs])
    panels = list(CURVE_TAGS)
    fig, axes = _figure(len(envs), len(panels))
    for row, env_id in enumerate(envs):
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            seen = set()
            for r in (r for r in runs if r["env_id"] == env_id and panel in r["curves"]):
                x, y = r["curves"][panel]
                ax.plot(x, y, color=colors[r["algo"]], alpha=0.8, linewidth=1.2, marker="." if len(x) < 20 else None,
                        label=None if r["algo"] in seen else r["algo"])
                seen.add(r["algo"])
            ax.set_xlabel("completions spent")
            ax.set_ylabel(panel)
            ax.set_title(f"{env_id}: {panel}", fontsize=10)
            ax.grid(alpha=0.3)
            if seen:
                ax.legend(fontsize=8, title="agent (one line per run)", title_fontsize=8)
            else:
                ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center")
    fig.suptitle(f"{title} (batch means during training, from TensorBoard)")
    return _save(fig, path)


__all__ = ["plot_frontier", "plot_curves", "read_curves", "CURVE_TAGS"]
