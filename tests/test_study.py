"""rlhf-zoo study: registered studies (zoo/studies/*.yml) expand into arms x seeds on the zoo's
benchmark machinery, skip finished runs, resume unfinished ones, and report every number with its
interval; claims are judged on per-seed differences."""

from __future__ import annotations

import json
import re

import pytest

from rlhfgym.zoo import study as st

TINY = {
    "description": "tiny",
    "claim": "sft beats best-of-2",
    "env": "RLHF-Summarize-v0",
    "reference": "pi_ref",
    "arms": {
        "bon2": {"agent": "best-of-n", "hyperparams": {"n": 2, "batch_size": 8}},
        "sft": {"agent": "sft", "hyperparams": {"batch_size": 4}},
    },
    "checks": [{"a": "sft", "op": ">", "b": "bon2", "metric": "gold"},
               {"a": "sft", "op": ">", "b": "pi_ref", "metric": "win_rate_labelers"}],
    "plot": "frontier",
    "frontier_of": "best-of-n",
    "presets": {"quick": {"seeds": 2, "budget": 8, "eval": {"prompts": 4, "temperature": [1.0, 0.0]}},
                "full": {"seeds": 5, "budget": 64, "arms": {"sft": {"budget": 32, "hyperparams": {"learning_rate": 1e-5}}},
                         "only": ["sft"]}},
}


def test_every_shipped_study_resolves_for_both_presets_with_the_same_seeds_for_every_arm(tmp_path):
    assert {"method-ranking", "rest-table", "reward-kl-frontier"} <= set(st.registered())
    for name in st.registered():
        for preset in st.PRESETS:
            study = st.load_study(name, preset)
            runs = study.runs(tmp_path)
            assert len(runs) == len(study.arms) * len(study.seeds)
            for arm in study.arms:
                assert sorted(spec["seed"] for a, spec in runs if a.label == arm.label) == list(study.seeds)
            assert len({spec["run_dir"] for _, spec in runs}) == len(runs)


def test_expansion_merges_presets_over_arms_and_seeds_override(tmp_path):
    quick = st.resolve("tiny", TINY, "quick")
    assert [a.label for a in quick.arms] == ["bon2", "sft"] and all(a.budget == 8 for a in quick.arms)
    assert quick.seeds == (0, 1) and quick.temperatures == [1.0, 0.0]
    runs = quick.runs(tmp_path)
    arm, spec = runs[0]
    assert spec["run_dir"] == str(tmp_path / "bon2" / "RLHF-Summarize-v0" / "best-of-n" / "b8" / "seed0")
    assert spec["overrides"] == {"n": 2, "batch_size": 8}
    # evaluation seed null: each run is evaluated with its own seed, one protocol per temperature
    assert [p["seed"] for p in runs[1][1]["protocols"]] == [1, 1]
    assert [p["temperature"] for p in spec["protocols"]] == [1.0, 0.0]
    full = st.resolve("tiny", TINY, "full", seeds=3)
    assert [(a.label, a.budget, a.hyperparams) for a in full.arms] == [("sft", 32, {"batch_size": 4, "learning_rate": 1e-5})]
    assert full.seeds == (0, 1, 2)
    assert [c.b for c in full.checks] == ["pi_ref"]  # the check on the left-out arm is dropped


@pytest.mark.parametrize("change, message", [
    (lambda d: d["arms"]["sft"].update(agnet="sft"), "unknown key 'agnet'. Did you mean 'agent'"),
    (lambda d: d["arms"]["sft"].update(agent="sfft"), "unknown agent 'sfft'"),
    (lambda d: d["checks"].append({"a": "sftt", "op": ">", "b": "bon2"}), "unknown arm 'sftt'. Did you mean 'sft'"),
    (lambda d: d["checks"].append({"a": "sft", "op": ">=", "b": "bon2"}), "op must be '>' or '<'"),
    (lambda d: d["presets"]["quick"].update(sedes=2), "unknown key 'sedes'. Did you mean 'seeds'"),
    (lambda d: d.update(env="RLHF-Sumarize-v0"), "'RLHF-Sumarize-v0'"),
])
def test_bad_definitions_fail_naming_the_closest_valid_value(change, message):
    data = json.loads(json.dumps(TINY))
    change(data)
    with pytest.raises(st.StudyError, match=re.escape(message)):
        st.resolve("tiny", data, "quick")


def test_unknown_study_name_is_one_line_naming_the_closest(capsys):
    from rlhfgym.zoo.cli import main

    assert main(["study", "method-rankin"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown study 'method-rankin'. Did you mean 'method-ranking'?" in err
    with pytest.raises(SystemExit):
        main(["study", "method-ranking", "--preset", "slow"])


def _records(values):
    return {seed: {"metrics": {"gold": {"mean": v}}} for seed, v in enumerate(values)}


@pytest.mark.parametrize("a, b, op, verdict", [
    ([0.6, 0.7, 0.65], [0.4, 0.5, 0.45], ">", "holds"),
    ([0.6, 0.4, 0.55], [0.5, 0.5, 0.5], ">", "direction only"),
    ([0.45, 0.6, 0.4], [0.5, 0.5, 0.5], ">", "not shown"),
    ([0.4, 0.5, 0.45], [0.6, 0.7, 0.65], ">", "reversed"),
    ([0.4, 0.5, 0.45], [0.6, 0.7, 0.65], "<", "holds"),
    ([0.6], [0.5], ">", "direction only (n=1)"),
])
def test_claims_are_judged_on_per_seed_differences(a, b, op, verdict):
    check = st.Check(a="a", op=op, b="b", metric="gold")
    result = st.judge_check(check, _records(a), _records(b))
    assert result["verdict"] == verdict
    assert result["difference"]["n"] == len(a)
    assert result["difference"]["mean"] == pytest.approx(sum(a) / len(a) - sum(b) / len(b))


def test_paired_differences_see_what_unpaired_intervals_miss():
    # seed effects shared by both arms: each arm's own interval is wide, the paired difference is not
    a, b = [0.2, 0.5, 0.8], [0.1, 0.4, 0.7]
    assert st.judge_check(st.Check("a", ">", "b", "gold"), _records(a), _records(b))["verdict"] == "holds"


def test_a_study_runs_skips_finished_runs_resumes_missing_ones_and_reports_every_number(tmp_path, monkeypatch):
    path = tmp_path / "tiny.yml"
    import yaml

    path.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "runs"
    first = st.run_study(str(path), out=out, progress=False)
    root = out / "tiny" / "quick"
    assert first["runs"] == 4 and root == type(root)(first["dir"])
    result = json.loads((root / "study.json").read_text())
    assert result["n_seeds"] == 2 and result["runs_finished"] == 4 and "Student-t" in result["ci_method"]
    for label in ("bon2", "sft"):
        stats = result["arms"][label]["by_temperature"]
        assert set(stats) == {"1", "0"}
        assert stats["1"]["gold"]["n"] == 2 and stats["1"]["gold"]["ci"] is not None
    assert result["reference"]["by_temperature"]["1"]["win_rate_labelers"]["mean"] == 0.5
    assert set(result["bradley_terry"]) == {"bon2", "sft"}
    assert [c["claim"] for c in result["checks"]] == ["sft > bon2 on gold", "sft > pi_ref on win_rate_labelers"]
    assert "sft" in result["dominance"]["arms"]
    md = (root / "study.md").read_text()
    assert "| bon2 | best-of-n | 8 | 2 |" in md and "win T=0" in md
    assert (root / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second call runs nothing; a run whose evaluation is gone (killed before it finished) is redone alone
    import rlhfgym.zoo.benchmark as bench

    executed = []
    real = bench.execute_run
    monkeypatch.setattr(bench, "execute_run", lambda spec, progress=True: executed.append(spec["run_dir"]) or real(spec, progress))
    st.run_study(str(path), out=out, progress=False)
    assert executed == []
    victim = root / "sft" / "RLHF-Summarize-v0" / "sft" / "b8" / "seed1"
    (victim / "eval-t0.json").unlink()
    partial = st.run_study(str(path), out=out, progress=False, report_only=True)  # reports what is finished, runs nothing
    assert executed == [] and json.loads((root / "study.json").read_text())["runs_finished"] == 4
    assert json.loads(open(partial["report"]["json"]).read())["arms"]["sft"]["by_temperature"]["0"]["gold"]["n"] == 1
    st.run_study(str(path), out=out, progress=False)
    assert executed == [str(victim)]
    assert (victim / "eval-t0.json").exists()


def test_the_report_is_written_atomically(tmp_path, monkeypatch):
    import rlhfgym.envs.assets as assets

    written = []
    for name in ("atomic_write_text", "atomic_write_bytes"):
        real = getattr(assets, name)
        monkeypatch.setattr(assets, name, lambda p, data, *a, _real=real, **k: written.append(p.name) or _real(p, data, *a, **k))
    study = st.resolve("tiny", TINY, "quick")
    paths = st.write_report(study, tmp_path)  # no runs yet: an empty report, not an error
    assert set(written) == set(st.REPORT_FILES)
    assert json.loads(paths["json"].read_text())["runs_finished"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name not in st.REPORT_FILES]


@pytest.mark.parametrize("form, alpha, beta", [("best-of-n", 0.8, 0.3), ("rl", 0.5, 0.2)])
def test_gao_fit_recovers_known_coefficients_and_the_peak(form, alpha, beta):
    import numpy as np

    rng = np.random.default_rng(0)
    d = np.repeat(np.linspace(0.0, 3.0, 13), 3)
    g = d ** 2 if form == "best-of-n" else np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    r = alpha * d - beta * g + rng.normal(0.0, 0.01, d.shape)
    fit = st.gao_fit(d, r, form)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.02) and fit["beta"] == pytest.approx(beta, abs=0.02)
    assert fit["alpha_se"] < 0.02 and fit["r2"] > 0.99 and fit["n"] == len(d)
    peak = alpha / (2 * beta) if form == "best-of-n" else np.exp(alpha / beta - 1)
    assert fit["d_peak"] == pytest.approx(peak, rel=0.1)
    assert st.gao_curve(fit, [0.0])[0] == 0.0
    # a reward that only rises has no peak
    assert st.gao_fit(d, 0.5 * d, form)["d_peak"] is None or st.gao_fit(d, 0.5 * d, form)["beta"] <= 1e-9


def test_head_to_head_matrix_shows_the_intransitive_population_cycle(tmp_path):
    # Condorcet's three summaries (envs/feedback/labelers.py, _intransitive): X > Y > Z > X by majority
    comps = {"x": {"coverage": 1.0, "faithfulness": 0.0, "distractor": 0.0, "brevity": 0.5},
             "y": {"coverage": 0.5, "faithfulness": 1.0, "distractor": 0.0, "brevity": 0.0},
             "z": {"coverage": 0.0, "faithfulness": 0.5, "distractor": 0.0, "brevity": 1.0}}
    data = {"env": "RLHF-Intransitive-v0", "head_to_head": "intransitive", "plot": "matrix",
            "arms": {k.upper(): {"agent": "best-of-n"} for k in comps},
            "presets": {"quick": {"seeds": 2, "budget": 1}}}
    study = st.resolve("cycle", data, "quick")
    by_arm = {}
    for text, c in comps.items():
        for seed in (0, 1):
            run_dir = tmp_path / text / str(seed)
            run_dir.mkdir(parents=True)
            rows = [{"prompt": i, "sample": 0, "text": text, "gold": 0.0, "components": c} for i in range(3)]
            (run_dir / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            by_arm.setdefault(text.upper(), {}).setdefault(1.0, {})[seed] = {"run_dir": str(run_dir),
                                                                               "protocol": {"split": "test"}}
    h2h = st.head_to_head(study, by_arm)
    p = h2h["p_row_beats_column"]
    assert p["X"]["Y"]["mean"] > 0.5 and p["Y"]["Z"]["mean"] > 0.5 and p["Z"]["X"]["mean"] > 0.5
    assert p["X"]["Y"]["mean"] + p["Y"]["X"]["mean"] == pytest.approx(1.0)
    assert p["X"]["Y"]["n"] == 2
    # in a cycle every player has an opponent it loses to: no one's worst case is above 1/2
    assert all(w["mean"] < 0.5 for w in h2h["min"].values())
    md = st.markdown({**st.analyse(study, tmp_path / "none"), "head_to_head": h2h})
    assert "| row ≻ column | X | Y | Z | min (opponent) |" in md


# ---------------------------------------------------------------------------------------------- fitted reward models

RM_STUDY = {
    "env": "RLHF-Intransitive-v0",
    "reference": "pi_ref",
    "reward_models": {"rm": {"data": "dpo-pairs", "pairs": 8, "labelers": "intransitive", "heldout": 4, "epochs": 1,
                             "batch_size": 4}},
    "arms": {"bon2-rm": {"agent": "best-of-n", "hyperparams": {"n": 2, "batch_size": 8}, "reward_model": "rm"},
             "bon2-env": {"agent": "best-of-n", "hyperparams": {"n": 2, "batch_size": 8}}},
    "presets": {"quick": {"seeds": 1, "budget": 1, "eval": {"prompts": 4}},
                "full": {"seeds": 1, "budget": 1, "reward_models": {"rm": {"pairs": 16}}}},
}


@pytest.mark.parametrize("change, message", [
    (lambda d: d["arms"]["bon2-rm"].update(reward_model="rn"), "arm 'bon2-rm': reward_model: unknown reward model 'rn'. Did you mean 'rm'"),
    (lambda d: d["reward_models"]["rm"].update(data="dpo-pair"), "unknown data 'dpo-pair'. Did you mean 'dpo-pairs'"),
    (lambda d: d["reward_models"]["rm"].update(prompts=8), "data: dpo-pairs is sized by pairs, not prompts"),
    (lambda d: d["reward_models"]["rm"].update(pairs=0), "needs pairs: a positive count"),
    (lambda d: d["reward_models"]["rm"].update(labelers="alpacafram"), "unknown labeler preset 'alpacafram'"),
    (lambda d: d["reward_models"]["rm"].update(epoch=2), "unknown key 'epoch'. Did you mean 'epochs'"),
    (lambda d: d["reward_models"].update({"a/b": {"data": "sft-pairs", "prompts": 4}}), "cannot contain '/'"),
    (lambda d: d["presets"]["quick"].update(reward_models={"rn": {"pairs": 4}}), "presets: reward_models: unknown reward model 'rn'"),
])
def test_bad_reward_model_definitions_fail_naming_the_fix(change, message):
    data = json.loads(json.dumps(RM_STUDY))
    change(data)
    with pytest.raises(st.StudyError, match=re.escape(message)):
        st.resolve("rm", data, "quick")


def test_an_arm_on_a_fitted_reward_model_names_its_directory_in_the_runs_env_kwargs(tmp_path):
    quick = st.resolve("rm", RM_STUDY, "quick")
    assert [m.name for m in quick.reward_models] == ["rm"] and quick.reward_model_spec("rm").size == 8
    assert st.resolve("rm", RM_STUDY, "full").reward_model_spec("rm").size == 16  # the preset's entry merged over
    runs = dict((a.label, spec) for a, spec in quick.runs(tmp_path))
    assert runs["bon2-rm"]["overrides"]["env_kwargs"] == {"reward_model": str(tmp_path / "reward-models" / "rm")}
    assert "env_kwargs" not in runs["bon2-env"]["overrides"]
    unused = json.loads(json.dumps(RM_STUDY))
    del unused["arms"]["bon2-rm"]
    assert st.resolve("rm", unused, "quick").reward_models == ()  # only the models an arm uses are fitted


def test_a_study_fits_its_reward_model_once_and_its_arm_is_paid_by_it(tmp_path, monkeypatch):
    import yaml

    from rlhfgym.envs.feedback import training

    path = tmp_path / "rm.yml"
    path.write_text(yaml.safe_dump(RM_STUDY))
    out = tmp_path / "runs"
    st.run_study(str(path), out=out, progress=False)
    root = out / "rm" / "quick"
    fit = json.loads((root / "reward-models" / "rm" / "fit.json").read_text())
    assert fit["metrics"]["n_train_pairs"] == 8 and fit["metrics"]["n_eval_pairs"] == 4
    run = root / "bon2-rm" / "RLHF-Intransitive-v0" / "best-of-n" / "b1" / "seed0"
    results = json.loads((run / "results.json").read_text())
    assert results["env_kwargs"] == {"reward_model": str(root / "reward-models" / "rm")}
    result = json.loads((root / "study.json").read_text())
    assert result["reward_models"]["rm"]["metrics"]["n_train_pairs"] == 8
    assert 0.5 <= result["reward_models"]["rm"]["heldout_bayes_ceiling"] <= 1.0
    assert result["arms"]["bon2-rm"]["reward_model"] == "rm"
    # the proxy is the fitted model's, not the env's own reward: pi_ref's proxy differs between the arms
    rm_ref, env_ref = (json.loads(next((root / a).rglob("eval.json")).read_text())["sft"]["proxy"] for a in ("bon2-rm", "bon2-env"))
    assert rm_ref != env_ref
    assert "## Reward models fitted by the study" in (root / "study.md").read_text()
    # a run redone later loads the cached model and data instead of fitting again
    monkeypatch.setattr(training, "train_reward_model", lambda *a, **k: pytest.fail("refitted despite the cache"))
    (run / "eval.json").unlink()
    st.run_study(str(path), out=out, progress=False)
    assert (run / "eval.json").is_file()
