"""`rlhf-zoo train` end to end on built-in agents whose evaluation differs from plain sampling."""

import json
import math

import pytest

from rlhfgym.zoo.train import train


def test_best_of_n_is_evaluated_by_its_own_outputs_and_analytic_kl(tmp_path):
    result = train("best-of-n", "RLHF-Summarize-Gold-v0", budget=1, run_dir=str(tmp_path / "run"), eval_n=8,
                   overrides={"n": 2, "batch_size": 8})
    assert result["policy"]["kl"] == pytest.approx(math.log(2) - 1 / 2)  # Gao et al.'s bound, not a sampled KL
    assert result["sft"]["kl"] == pytest.approx(0.0, abs=1e-4)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["algo"] == "best-of-n" and saved["hyperparams"]["n"] == 2
