"""Bradley-Terry ratings (envs/ratings.py): the seeds' NBA example on a simulated league."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhfgym.envs.feedback.ratings import (
    fit_bradley_terry,
    rankdata,
    simulate_league,
    spearman,
    win_count_ranking,
    win_matrix,
)


def test_bt_recovers_the_true_order_where_win_counts_fail():
    # 30 teams, 1230 games, strong teams mostly play strong teams: every team wins about half
    outcomes, true_strength = simulate_league(n_teams=30, n_games=1230, seed=0)
    fit = fit_bradley_terry(outcomes, n_items=30)
    assert fit.converged
    rho_bt = spearman(fit.strengths, true_strength)
    rho_wins = spearman(win_count_ranking(outcomes, n_items=30), true_strength)
    assert rho_bt >= 0.9, rho_bt
    assert rho_bt > rho_wins + 0.3, (rho_bt, rho_wins)
    # win counts get the order wrong at the top: the true best team is not the one with most wins
    wins = fit.wins / fit.games
    assert int(np.argmax(wins)) != 0 and fit.ranking[0] in (0, 1)
    # the true strengths lie within a few standard errors of the fit (up to the common shift)
    z = (fit.strengths - (true_strength - true_strength.mean())) / fit.se
    assert np.mean(np.abs(z) < 3) >= 0.9


def test_two_items_match_the_closed_form():
    # MLE: sigmoid(d) = 3/4 -> d = log 3; Var(d) = 1 / (n p (1 - p)) = 1 / (4 * 3/16)
    fit = fit_bradley_terry([(0, 1, 3, 1)], prior=0.0)
    assert fit.strengths[0] - fit.strengths[1] == pytest.approx(math.log(3), abs=1e-8)
    assert fit.strengths.sum() == pytest.approx(0.0, abs=1e-12)
    assert fit.se[0] == pytest.approx(math.sqrt(1 / 0.75) / 2, rel=1e-6)
    assert fit.prob(0, 1) == pytest.approx(0.75)


def test_prior_keeps_an_unbeaten_item_finite():
    fit = fit_bradley_terry([("a", "b"), ("a", "b"), ("b", "c")], prior=0.1)
    assert fit.converged and np.isfinite(fit.strengths).all()
    assert fit.ranked_names() == ["a", "b", "c"]


def test_named_outcomes_counts_and_markdown():
    outcomes = [("ppo", "sft", 7, 3), ("dpo", "sft", 6, 4), ("ppo", "dpo", 5.5, 4.5)]  # halves = ties
    fit = fit_bradley_terry(outcomes)
    assert fit.names == ["ppo", "sft", "dpo"]
    assert fit.ranked_names() == ["ppo", "dpo", "sft"]
    table = fit.to_markdown()
    assert table.splitlines()[0] == "| rank | name | strength | ± se | wins | games |"
    assert table.splitlines()[2].startswith("| 1 | ppo | ")
    assert "| 3 | sft |" in table
    W, _ = win_matrix(outcomes, names=["sft", "dpo", "ppo"])
    assert W[2, 0] == 7 and W[0, 2] == 3 and W[2, 1] == 5.5


def test_bad_outcomes_raise():
    with pytest.raises(ValueError, match="no outcomes"):
        fit_bradley_terry([])
    with pytest.raises(ValueError, match="neither"):
        fit_bradley_terry([(0, 1, 2)])
    with pytest.raises(ValueError, match="two different items"):
        fit_bradley_terry([(1, 1)])


def test_rank_helpers():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
