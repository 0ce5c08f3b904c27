"""Bradley-Terry ratings: rank many systems (policies, checkpoints, teams) from pairwise outcomes.

The model (seeds' lecture 001, the NBA example)::

    P(i beats j) = sigmoid(theta_i - theta_j)          theta = log-strengths

is fitted by maximum a-posteriori Newton steps with a weak Gaussian prior theta ~ N(0, 1/prior)
(it makes the problem strictly concave: identifiable even for an undefeated item, and it is how
ties and sparse data stay finite). With ``W[i, j]`` = wins of i over j, ``N = W + W^T`` and
``p_ij = sigmoid(theta_i - theta_j)``::

    log L(theta) = sum_ij W_ij log p_ij  -  prior/2 * |theta|^2
    grad_i       = sum_j W_ij - sum_j N_ij p_ij  -  prior * theta_i
    Fisher I     = L + prior * Id,      L_ij = -N_ij p_ij p_ji (i != j),  L_ii = sum_j N_ij p_ij p_ji

Standard errors come from the inverse Fisher information, projected onto mean-zero strengths
(only differences of theta are identified by the data). Win counts ignore who was beaten: with
uneven schedules (strong teams mostly meet strong teams) they mis-rank, BT does not
(:func:`simulate_league` builds that situation).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


# ----------------------------------------------------------------------------------------------
# Rank correlations (numpy only)


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"pearson: lengths differ ({len(x)} vs {len(y)}).")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks)."""
    return pearson(rankdata(x), rankdata(y))


# ----------------------------------------------------------------------------------------------
# Outcomes


def win_matrix(
    outcomes: Iterable[Sequence], n_items: int | None = None, names: Sequence[Hashable] | None = None
) -> tuple[np.ndarray, list]:
    """``W[i, j]`` = (possibly fractional) wins of i over j, and the item names.

    ``outcomes``: ``(winner, loser)`` pairs, or ``(i, j, wins_i, wins_j)`` counts (a tie is 0.5
    each). Items are integer indices (``n_items`` or ``names`` fix how many) or names; unknown names
    are appended in order of appearance unless ``names`` is given.
    """
    rows = [tuple(o) for o in outcomes]
    if not rows:
        raise ValueError("no outcomes: pass (winner, loser) pairs or (i, j, wins_i, wins_j) counts.")
    index: dict = {}
    if names is not None:
        index = {name: k for k, name in enumerate(names)}
        if len(index) != len(names):
            raise ValueError("names must be unique.")

    def idx(item) -> int:
        if names is None and isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            return int(item)
        if item in index:
            return index[item]
        if names is not None:
            if isinstance(item, (int, np.integer)) and 0 <= int(item) < len(names):
                return int(item)
            raise ValueError(f"outcome names item {item!r} which is not in names.")
        index[item] = len(index)
        return index[item]

    triples = []
    for k, row in enumerate(rows):
        if len(row) == 2:
            i, j, wi, wj = idx(row[0]), idx(row[1]), 1.0, 0.0
        elif len(row) == 4:
            i, j, wi, wj = idx(row[0]), idx(row[1]), float(row[2]), float(row[3])
        else:
            raise ValueError(f"outcome {k}: {row!r} is neither (winner, loser) nor (i, j, wins_i, wins_j).")
        if i == j or wi < 0 or wj < 0:
            raise ValueError(f"outcome {k}: {row!r} must compare two different items with non-negative wins.")
        triples.append((i, j, wi, wj))
    int_items = names is None and not index
    n = (len(names) if names is not None else n_items if n_items is not None
         else (max(max(i, j) for i, j, _, _ in triples) + 1 if int_items else len(index)))
    if any(max(i, j) >= n for i, j, _, _ in triples):
        raise ValueError(f"an outcome refers to item >= n_items={n}.")
    W = np.zeros((n, n), dtype=np.float64)
    for i, j, wi, wj in triples:
        W[i, j] += wi
        W[j, i] += wj
    if names is not None:
        out_names = list(names)
    elif int_items:
        out_names = [str(k) for k in range(n)]
    else:
        out_names = list(index) + [str(k) for k in range(len(index), n)]
    return W, out_names


# ----------------------------------------------------------------------------------------------
# The fit


@dataclass
class BTResult:
    """A Bradley-Terry fit. ``strengths`` are log-scale with mean 0; ``ranking`` lists item indices
    from strongest to weakest; ``se`` are standard errors of the (mean-zero) strengths."""

    names: list
    strengths: np.ndarray
    se: np.ndarray
    covariance: np.ndarray
    wins: np.ndarray
    games: np.ndarray
    log_likelihood: float
    iterations: int
    converged: bool
    prior: float
    ranking: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.ranking = [int(i) for i in np.argsort(-self.strengths, kind="stable")]

    def prob(self, i: int, j: int) -> float:
        """Fitted P(i beats j)."""
        return float(1.0 / (1.0 + math.exp(-(self.strengths[i] - self.strengths[j]))))

    def ranked_names(self) -> list:
        return [self.names[i] for i in self.ranking]

    def to_markdown(self, digits: int = 2) -> str:
        """A table: rank | name | strength | ± se | wins | games, strongest first."""
        lines = ["| rank | name | strength | ± se | wins | games |", "|---:|:---|---:|---:|---:|---:|"]
        for r, i in enumerate(self.ranking, start=1):
            lines.append(
                f"| {r} | {self.names[i]} | {self.strengths[i]:.{digits}f} | {self.se[i]:.{digits}f} "
                f"| {self.wins[i]:g} | {self.games[i]:g} |"
            )
        return "\n".join(lines)


def _log_posterior(theta: np.ndarray, W: np.ndarray, prior: float) -> float:
    d = theta[:, None] - theta[None, :]
    # log sigmoid(d) = -log(1 + exp(-d)), computed stably
    return float((W * -np.logaddexp(0.0, -d)).sum() - 0.5 * prior * (theta @ theta))


def fit_bradley_terry(
    outcomes: Iterable[Sequence],
    n_items: int | None = None,
    names: Sequence[Hashable] | None = None,
    prior: float = 0.1,
    max_iter: int = 100,
    tol: float = 1e-9,
) -> BTResult:
    """Fit Bradley-Terry strengths to pairwise outcomes by Newton's method (MAP, Gaussian prior).

    ``prior`` is the precision of the N(0, 1/prior) prior on each log-strength (0.1: a weak one,
    worth a fraction of a game per item); ``prior=0`` gives the plain MLE, which exists only when
    the comparison graph is strongly connected (no item unbeaten / winless against the rest).
    """
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}.")
    W, out_names = win_matrix(outcomes, n_items, names)
    n = len(W)
    N = W + W.T
    theta = np.zeros(n)
    center = np.eye(n) - 1.0 / n  # projector onto mean-zero vectors (only differences are identified)
    lp = _log_posterior(theta, W, prior)
    converged, it = False, 0
    for it in range(1, max_iter + 1):  # noqa: B007  (it is reported after the loop)
        P = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))  # P[i, j] = P(i beats j)
        grad = W.sum(1) - (N * P).sum(1) - prior * theta
        V = N * P * P.T  # Var of each game's outcome, weighted by games played
        fisher = np.diag(V.sum(1)) - V + prior * np.eye(n)
        # prior = 0 leaves the all-ones direction free: solve in the mean-zero subspace
        step = np.linalg.lstsq(fisher, grad, rcond=None)[0] if prior == 0 else np.linalg.solve(fisher, grad)
        # backtracking keeps the (concave) log-posterior increasing even far from the optimum
        t = 1.0
        while True:
            cand = theta + t * step
            if prior == 0:
                cand = center @ cand
            lp_new = _log_posterior(cand, W, prior)
            if lp_new >= lp - 1e-12 or t < 1e-6:
                break
            t *= 0.5
        theta, lp_old, lp = cand, lp, lp_new
        if np.max(np.abs(t * step)) < tol or abs(lp - lp_old) < tol * max(1.0, abs(lp)):
            converged = True
            break
    P = 1.0 / (1.0 + np.exp(-(theta[:, None] - theta[None, :])))
    V = N * P * P.T
    fisher = np.diag(V.sum(1)) - V + prior * np.eye(n)
    cov = center @ np.linalg.pinv(fisher) @ center
    theta = theta - theta.mean()  # already ~0 with a prior (the gradient sums to -prior*sum(theta))
    return BTResult(
        names=out_names,
        strengths=theta,
        se=np.sqrt(np.clip(np.diag(cov), 0.0, None)),
        covariance=cov,
        wins=W.sum(1),
        games=N.sum(1),
        log_likelihood=float((W * -np.logaddexp(0.0, -(theta[:, None] - theta[None, :]))).sum()),
        iterations=it,
        converged=converged,
        prior=prior,
    )


def win_count_ranking(outcomes: Iterable[Sequence], n_items: int | None = None, names=None) -> np.ndarray:
    """Win fraction per item (the naive ranking BT improves on)."""
    W, _ = win_matrix(outcomes, n_items, names)
    games = (W + W.T).sum(1)
    return np.divide(W.sum(1), games, out=np.full(len(W), 0.5), where=games > 0)


# ----------------------------------------------------------------------------------------------
# A league with an uneven schedule (the seeds' NBA example, synthetic)


def simulate_league(
    n_teams: int = 30,
    n_games: int = 1230,
    locality: float = 3.0,
    spread: float = 1.0,
    seed: int = 0,
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Simulate ``n_games`` games between ``n_teams`` with true log-strengths ~ N(0, spread^2).

    Schedules are uneven: a game's opponent is drawn with weight exp(-|rank_i - rank_j| / locality),
    so strong teams mostly play strong teams and weak teams weak ones, and every team wins about
    half its games whatever its strength. Returns ((winner, loser) list, true strengths).
    """
    rng = np.random.default_rng(seed)
    strength = np.sort(rng.normal(0.0, spread, n_teams))[::-1].copy()
    rank = np.arange(n_teams)
    outcomes = []
    for _ in range(n_games):
        i = int(rng.integers(n_teams))
        w = np.exp(-np.abs(rank - i) / locality)
        w[i] = 0.0
        j = int(rng.choice(n_teams, p=w / w.sum()))
        p_i = 1.0 / (1.0 + math.exp(-(strength[i] - strength[j])))
        outcomes.append((i, j) if rng.random() < p_i else (j, i))
    return outcomes, strength


__all__ = [
    "BTResult", "fit_bradley_terry", "win_matrix", "win_count_ranking", "simulate_league",
    "rankdata", "pearson", "spearman",
]
