"""`rlhf-zoo leaderboard` on hand-made eval.json / completions.jsonl files (no training, no model)."""

import csv
import json
import math

import pytest

from rlhfgym.zoo.evaluate import FORMAT_VERSION
from rlhfgym.zoo.leaderboard import LeaderboardWarning, mean_ci, student_t_quantile, write_leaderboard

ENV = "RLHF-Summarize-Gold-v0"
PROMPTS = 8
T_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)

# gold components per agent quality: every labeler type prefers "good" to "mid" to "bad"
QUALITY = {
    "good": {"coverage": 0.9, "faithfulness": 0.0, "distractor": 0.0, "brevity": 0.0},
    "mid": {"coverage": 0.5, "faithfulness": -0.1, "distractor": 0.0, "brevity": 0.0},
    "bad": {"coverage": 0.1, "faithfulness": -0.4, "distractor": -0.2, "brevity": -0.1},
}


def write_run(root, algo, seed, *, gold, kl=1.0, budget=64, quality=None, prompts=PROMPTS, temperature=1.0, env=ENV,
              judge=None):
    """A run's eval.json (or, at another temperature, its eval-t<T>.json) evaluated with the run's seed."""
    run = root / algo / env / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    stat = lambda v: {"mean": v, "se": 0.01}  # noqa: E731
    record = {
        "format": FORMAT_VERSION, "algo": algo, "env_id": env, "seed": seed, "budget": budget,
        "protocol": {"split": "test", "prompts": prompts, "samples": 1, "temperature": temperature, "seed": seed},
        "metrics": {"gold": stat(gold), "proxy": stat(gold + 0.1), "kl": {**stat(kl), "method": "monte-carlo"},
                    "win_rate_labelers": stat(0.6), "win_rate_judge": None if judge is None else stat(judge), "length": stat(12.0), "eos_rate": stat(1.0),
                    "distinct_1": 0.5, "distinct_2": 0.8, "completions": prompts},
        "sft": {"gold": stat(0.4), "proxy": stat(0.4), "kl": {**stat(0.0), "method": "monte-carlo"}},
        "hyperparams": {}, "versions": {}, "machine": {},
    }
    if temperature != 1.0:
        (run / f"eval-t{temperature:g}.json").write_text(json.dumps(record))
        return run
    (run / "eval.json").write_text(json.dumps(record))
    components = QUALITY[quality or algo]
    rows = [{"prompt": i, "sample": 0, "text": f"{quality or algo} summary {i} from seed {seed}", "gold": gold,
             "components": components} for i in range(prompts)]
    (run / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_student_t_quantiles_match_the_tables():
    assert student_t_quantile(0.975, 2) == pytest.approx(T_975_2, abs=1e-9)
    assert student_t_quantile(0.975, 1) == pytest.approx(12.706204736, abs=1e-6)
    assert student_t_quantile(0.975, 30) == pytest.approx(2.042272456, abs=1e-6)
    assert student_t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    stat = mean_ci([0.1, 0.2, 0.6])
    assert stat["mean"] == pytest.approx(0.3)
    assert stat["ci"] == pytest.approx(T_975_2 * math.sqrt(0.07) / math.sqrt(3))
    assert mean_ci([0.5]) == {"n": 1, "mean": 0.5, "ci": None}


def test_leaderboard_tables_ratings_and_plots(tmp_path):
    runs = tmp_path / "runs"
    # uneven: three seeds of "bad", two of "mid", one of "good"; "mid"'s second seed answers fewer prompts
    for seed, gold in enumerate((0.1, 0.2, 0.6)):
        write_run(runs, "bad", seed, gold=gold, kl=0.5 + seed)
    write_run(runs, "mid", 0, gold=0.5, kl=2.0)
    write_run(runs, "mid", 1, gold=0.5, kl=2.5)
    write_run(runs, "mid", 2, gold=0.4, kl=2.5, prompts=4)  # another protocol: its own row, but it plays in BT
    write_run(runs, "good", 0, gold=0.8, kl=3.0)
    # greedy evaluations (a benchmark's second temperature): their own rows and table, not in the ratings
    for seed in range(3):
        write_run(runs, "bad", seed, gold=0.2, kl=0.1, temperature=0.0)
    write_run(runs, "good", 0, gold=0.9, kl=0.2, temperature=0.0)
    # a TensorBoard log like TrainingRun.update writes, for the curves
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(runs / "good" / ENV / "seed0" / "tb"))
    for spent in (16, 32, 48, 64):
        for key, value in (("gold", spent / 100), ("reward", spent / 80), ("kl", spent / 30)):
            writer.add_scalar(f"good/{key}", value, spent)
    writer.close()

    paths = write_leaderboard(runs, tmp_path / "out", progress=False)
    assert set(paths) == {"md", "csv", "frontier", "curves"}
    table = list(csv.DictReader(paths["csv"].open()))
    assert sorted((r["algo"], r["eval_prompts"], r["eval_temperature"]) for r in table) == [
        ("bad", "8", "0.0"), ("bad", "8", "1.0"), ("good", "8", "0.0"), ("good", "8", "1.0"), ("mid", "4", "1.0"),
        ("mid", "8", "1.0")]
    # every run evaluated with its own seed: one group over seeds, the protocol's seed reads "run"
    assert {r["eval_seed"] for r in table} == {"run"}
    greedy = {r["algo"]: r for r in table if r["eval_temperature"] == "0.0"}
    assert float(greedy["bad"]["gold_mean"]) == pytest.approx(0.2) and greedy["bad"]["n_seeds"] == "3"
    assert greedy["bad"]["bt_strength"] == "" and greedy["good"]["bt_strength"] == ""
    rows = {r["algo"]: r for r in table if r["eval_prompts"] == "8" and r["eval_temperature"] == "1.0"}
    bad = rows["bad"]
    assert bad["n_seeds"] == "3" and bad["seeds"] == "0 1 2"
    assert float(bad["gold_mean"]) == pytest.approx(0.3)
    assert float(bad["gold_ci95"]) == pytest.approx(T_975_2 * math.sqrt(0.07) / math.sqrt(3))
    assert float(bad["kl_mean"]) == pytest.approx(1.5) and float(bad["kl_ci95"]) == pytest.approx(T_975_2 * 1 / math.sqrt(3))
    assert float(rows["mid"]["gold_ci95"]) == 0.0  # two seeds, same gold
    assert rows["good"]["n_seeds"] == "1" and rows["good"]["gold_ci95"] == ""
    assert rows["good"]["win_rate_judge_mean"] == ""
    # Bradley-Terry orders the agents by the labelers' verdicts, whatever the number of games each played
    strength = {a: float(r["bt_strength"]) for a, r in rows.items()}
    assert strength["good"] > strength["mid"] > strength["bad"]
    assert all(float(r["bt_se"]) > 0 for r in rows.values())
    md = paths["md"].read_text()
    assert "0.300 ± 0.657" in md and "0.800 (n=1)" in md
    assert "Bradley-Terry ratings, RLHF-Summarize-Gold-v0" in md and "good@64" in md
    # each env opens with the compact table (agents by gold), then every metric
    summary = md[md.index("## RLHF-Summarize-Gold-v0"):md.index("### All metrics, RLHF-Summarize-Gold-v0")]
    assert "| agent | budget | seeds | gold | proxy reward | KL | win rate vs SFT (labelers) | BT strength |" in summary
    # one compact table a protocol, eval.json's first (T=1), then the greedy one
    first = summary.index("**test, 8 prompts × 1, T=1, the run's seed**")
    second = summary.index("**test, 8 prompts × 1, T=0, the run's seed**")
    assert first < second
    end = summary.index("\n**", first)  # the next protocol's table (mid's 4-prompt run, then greedy)
    agents_in_order = [line.split(" | ")[0].strip("| ") for line in summary[first:end].splitlines()
                       if line.startswith("| ") and "---" not in line][1:]
    assert agents_in_order[0] == "good" and agents_in_order[-1] == "bad" and "mid" in agents_in_order, agents_in_order
    assert "| good | 64 | 1 | 0.900 (n=1) |" in summary[second:]
    for name in ("frontier", "curves"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert paths[name].stat().st_size > 20_000  # axes, labels, points: not an empty canvas


def test_broken_eval_files_are_reported_and_left_out(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "good", 0, gold=0.8)
    write_run(runs, "bad", 0, gold=0.1)
    broken = runs / "broken" / "eval.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{truncated")
    old = write_run(runs, "mid", 0, gold=0.5) / "eval.json"
    old.write_text(json.dumps({**json.loads(old.read_text()), "format": 999}))
    keyless = write_run(runs, "mid", 1, gold=0.5) / "eval.json"
    keyless.write_text(json.dumps({k: v for k, v in json.loads(keyless.read_text()).items() if k != "metrics"}))
    bad_completions = runs / "bad" / ENV / "seed0" / "completions.jsonl"
    bad_completions.write_text('{"prompt": 0}\n')
    with pytest.warns(LeaderboardWarning) as caught:
        paths = write_leaderboard(runs, progress=False)
    messages = "\n".join(str(w.message) for w in caught)
    for path in (broken, old, keyless, bad_completions):
        assert str(path) in messages
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["algo"] for r in rows] == ["bad", "good"]  # the broken ones are left out, the rest kept
    # "bad" has no usable completions: one agent left, so no ratings, and the table says why
    assert all(r["bt_strength"] == "" for r in rows)
    assert "needs completions of at least two agents" in paths["md"].read_text()
    assert paths["md"].parent == runs


def test_the_judge_win_rate_is_a_compact_column_only_where_the_env_has_a_judge(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "good", 0, gold=0.8)
    write_run(runs, "good", 0, gold=0.7, env="RLHF-Summarize-AIF-v0", judge=0.62)
    md = write_leaderboard(runs, progress=False)["md"].read_text()
    aif = md[md.index("## RLHF-Summarize-AIF-v0"):md.index("### All metrics, RLHF-Summarize-AIF-v0")]
    gold = md[md.index(f"## {ENV}"):md.index(f"### All metrics, {ENV}")]
    assert "win rate vs SFT (judge)" in aif and "| 0.620 (n=1) |" in aif
    assert "win rate vs SFT (judge)" not in gold


def test_a_fixed_evaluation_seed_is_its_own_protocol_group(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "good", 0, gold=0.8)
    write_run(runs, "good", 1, gold=0.7)
    fixed = write_run(runs, "good", 2, gold=0.6) / "eval.json"
    fixed.write_text(json.dumps({**json.loads(fixed.read_text()), "protocol": {
        "split": "test", "prompts": PROMPTS, "samples": 1, "temperature": 1.0, "seed": 0}}))
    rows = list(csv.DictReader(write_leaderboard(runs, progress=False)["csv"].open()))
    assert sorted((r["eval_seed"], r["seeds"]) for r in rows) == [("0", "2"), ("run", "0 1")]


def test_a_missing_runs_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        write_leaderboard(tmp_path / "nope", progress=False)
