"""``rlhf-zoo bench trl`` without TRL: equal settings on both sides, the report writer, argument errors
and the subprocess protocol (with fake sides). The one test that runs TRL skips when it is absent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfgym.zoo import bench_trl as bt


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("pair", bt.PAIRS)
def test_both_sides_get_the_same_settings(pair):
    for overrides in ({}, {"updates": 3, "seed": 5}, {"dtype": "bfloat16"}):
        view = bt.shared_view(bt.default_settings(pair, **overrides))
        assert view["ours"] == view["trl"], pair
        assert view["ours"]["precision"] == overrides.get("dtype", "float32")


def test_shared_view_catches_a_side_that_drifts(monkeypatch):
    real = bt.side_settings

    def drifted(s):
        sides = real(s)
        sides["trl"]["learning_rate"] *= 2
        return sides

    monkeypatch.setattr(bt, "side_settings", drifted)
    view = bt.shared_view(bt.default_settings("rloo"))
    assert view["ours"]["lr"] != view["trl"]["lr"]


def test_cpu_float32_and_no_checkpointing_on_the_trl_side():
    for pair in bt.PAIRS:
        trl = bt.side_settings(bt.default_settings(pair))["trl"]
        assert trl["bf16"] is False and trl["fp16"] is False
        assert trl["gradient_checkpointing"] is False and trl["use_cpu"] is True


def test_the_trl_side_turns_checkpointing_off_under_the_installed_transformers_name():
    """transformers renamed gradient_checkpointing (TRL's configs default it to True, and the old name
    warns): the TRL side passes our False under the name its TrainingArguments reads."""
    import dataclasses

    from transformers import TrainingArguments

    renamed = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    trl = bt.side_settings(bt.default_settings("rloo"))["trl"]
    passed = bt.installed_trl_names(trl)
    name = "activation_checkpointing" if renamed else "gradient_checkpointing"
    assert passed[name] is False and ("gradient_checkpointing" in passed) is not renamed
    assert {k: v for k, v in passed.items() if k != name} == {k: v for k, v in trl.items() if k != "gradient_checkpointing"}
    assert trl["gradient_checkpointing"] is False  # the shared settings keep TRL's documented name


def test_bfloat16_is_autocast_on_both_sides():
    for pair in bt.PAIRS:
        sides = bt.side_settings(bt.default_settings(pair, dtype="bfloat16"))
        assert sides["trl"]["bf16"] is True and sides["trl"]["fp16"] is False
        assert sides["ours"]["precision"] == "bfloat16"
    from rlhfgym.agents import make  # our side's arguments are valid agent settings

    assert make("rloo", **bt.side_settings(bt.default_settings("rloo", dtype="bfloat16"))["ours"]).config["precision"] == "bfloat16"


def test_on_a_gpu_trl_is_not_told_to_use_the_cpu():
    for pair in bt.PAIRS:
        assert bt.side_settings(bt.default_settings(pair, device="cuda"))["trl"]["use_cpu"] is False


def test_trl_rloo_batch_counts_completions():
    s = bt.default_settings("rloo", updates=5)
    sides = bt.side_settings(s)
    assert sides["trl"]["per_device_train_batch_size"] == sides["ours"]["batch_size"] == s.batch_size
    assert s.budget == 5 * s.batch_size  # completions rlhf-gym's RLOO samples in 5 updates


def test_ppo_minibatches_are_one_optimizer_step_each():
    s = bt.default_settings("ppo", updates=2)
    trl = bt.side_settings(s)["trl"]
    assert trl["gradient_accumulation_steps"] == 1  # >1 would skip optimizer steps in trl 1.12's loop
    assert trl["per_device_train_batch_size"] // trl["num_mini_batches"] == s.mini_batch_size
    assert s.optimizer_steps == 2 * s.ppo_epochs * s.batch_size // s.mini_batch_size


@pytest.mark.parametrize("bad, match", [
    ({"pair": "grpo"}, "unknown pair"),
    ({"pair": "rloo", "batch_size": 30}, "multiple of rloo_k"),
    ({"pair": "ppo", "batch_size": 40}, "multiple of mini_batch_size"),
    ({"pair": "dpo", "updates": 0}, "updates must be a positive integer"),
    ({"pair": "dpo", "dtype": "float16"}, "unknown dtype 'float16'; use float32 or bfloat16"),
    ({"pair": "dpo", "device": "tpu"}, "unknown device"),
    ({"pair": "dpo", "policy": "/no/such/model"}, "rlhf-zoo bench policy"),
])
def test_bad_settings_are_refused(bad, match):
    kw = {"updates": 2, "batch_size": 16, "learning_rate": 1e-4, **bad}
    with pytest.raises(bt.BenchError, match=match):
        bt.Settings(**kw)


def test_unknown_pair_and_bad_repeats():
    with pytest.raises(bt.BenchError, match="unknown pair"):
        bt.resolve_pairs("grpo")
    with pytest.raises(bt.BenchError, match="unknown pair 'grpo'"):
        bt.resolve_pairs("rloo,grpo")
    assert bt.resolve_pairs("all") == [*bt.PAIRS, "env"]
    assert bt.resolve_pairs("dpo, rloo") == ["dpo", "rloo"]
    with pytest.raises(bt.BenchError, match="repeats"):
        bt.bench_trl(pair="rloo", repeats=0)
    with pytest.raises(bt.BenchError, match="unknown dtype 'float16'"):  # before anything is built or run
        bt.bench_trl(pair="rloo", dtype="float16", trl_python="/no/such/python")


def test_cli_argument_errors():
    for args in (["--pair", "grpo", "--trl-python", sys.executable], ["--repeats", "0"], ["--updates", "-1"]):
        proc = subprocess.run([sys.executable, "-m", "rlhfgym.zoo.cli", "bench", "trl", *args], capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)


def test_cli_passes_its_arguments(monkeypatch):
    from rlhfgym.zoo import cli

    calls = []
    monkeypatch.setattr(bt, "bench_trl", lambda **kw: calls.append(kw))
    assert cli.main(["bench", "trl", "--pair", "dpo,ppo", "--repeats", "2", "--out", "o", "--trl-python", "/t/py",
                     "--trl-ppo-python", "/t112/py", "--updates", "3", "--env-rounds", "1"]) == 0
    kw = calls[0]
    assert (kw["pair"], kw["repeats"], kw["out"], kw["trl_python"], kw["trl_ppo_python"], kw["updates"],
            kw["env_rounds"]) == ("dpo,ppo", 2, "o", "/t/py", "/t112/py", 3, 1)


def test_cli_passes_device_and_policy_and_builds_a_policy(monkeypatch, tmp_path):
    from rlhfgym.zoo import cli

    calls = []
    monkeypatch.setattr(bt, "bench_trl", lambda **kw: calls.append(kw))
    assert cli.main(["bench", "trl", "--device", "cuda:1", "--policy", "llama-113m", "--dtype", "bfloat16"]) == 0
    assert (calls[0]["device"], calls[0]["policy"], calls[0]["dtype"]) == ("cuda:1", "llama-113m", "bfloat16")
    assert cli.main(["bench", "trl"]) == 0 and calls[1]["dtype"] == "float32"
    built = []
    monkeypatch.setattr(bt, "build_policy", lambda *a, **kw: built.append((a, kw)))
    assert cli.main(["bench", "policy", "llama-tiny", "--out", str(tmp_path), "--seed", "2"]) == 0
    assert built == [(("llama-tiny", str(tmp_path)), {"seed": 2})]


def test_trl_python_without_trl_is_a_clear_error(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.exit(\"No module named trl\")'\n")
    fake.chmod(0o755)
    with pytest.raises(bt.BenchError, match="cannot import trl"):
        bt.python_versions(str(fake))


# ---------------------------------------------------------------------------------------------- a policy of another size


def test_build_policy_saves_the_preset_with_the_env_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = bt.build_policy("llama-tiny", tmp_path / "tiny", seed=1)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == bt.POLICY_PRESETS["llama-tiny"]["hidden_size"]
    assert model.config.num_hidden_layers == bt.POLICY_PRESETS["llama-tiny"]["num_hidden_layers"]
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    again = AutoModelForCausalLM.from_pretrained(bt.build_policy("llama-tiny", tmp_path / "again", seed=1))
    assert all((a == b).all() for a, b in zip(model.parameters(), again.parameters()))  # the seed decides the weights
    with pytest.raises(bt.BenchError, match="unknown policy preset"):
        bt.build_policy("llama-7b", tmp_path / "x")


def test_both_sides_start_from_the_settings_policy(tmp_path):
    """Our side trains the given policy (not the micro SFT model): the saved final model has its shape."""
    from transformers import AutoConfig

    policy = bt.build_policy("llama-tiny", tmp_path / "tiny")
    s = bt.default_settings("rloo", updates=1, batch_size=8, rloo_k=2, policy=str(policy), eval_prompts=4)
    _, core = bt._load_env(s)
    assert core.reference_model.config.hidden_size == bt.POLICY_PRESETS["llama-tiny"]["hidden_size"]
    settings = bt.prepare_data(s, tmp_path / "data")
    bt.run_child("ours", "rloo", str(settings), str(tmp_path / "ours"))
    record = json.loads((tmp_path / "ours" / bt.RESULT_FILE).read_text())
    assert record["updates"] == 1
    assert AutoConfig.from_pretrained(record["model_dir"]).hidden_size == bt.POLICY_PRESETS["llama-tiny"]["hidden_size"]
    assert set(bt.evaluate_model(s, record["model_dir"], tmp_path / "data")) == {"gold", "rm"}


# ---------------------------------------------------------------------------------------------- the subprocess protocol


def _fake_side(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "side.py"
    script.write_text("import json, sys, pathlib\nout = pathlib.Path(sys.argv[1])\n" + body)
    return [sys.executable, str(script), str(tmp_path / "out")]


def _record(**kw):
    rec = {"side": "ours", "pair": "rloo", "updates": 4, "train_s": 2.0, "step_ends": [0.8, 1.2, 1.6, 2.0],
           "steps_per_tick": 1.0, "peak_rss_mb": 100.0, "versions": {"torch": "x"}, "model_dir": "m"}
    rec.update(kw)
    return rec


def test_run_side_reads_the_result_of_a_fake_side(tmp_path):
    cmd = _fake_side(tmp_path, f"(out / 'result.json').write_text(json.dumps({_record()!r}))\n")
    rec = bt.run_side(cmd, tmp_path / "out")
    assert rec["train_s"] == 2.0 and rec["updates"] == 4


def test_run_side_does_not_read_a_stale_result(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / bt.RESULT_FILE).write_text(json.dumps(_record()))  # left by an earlier run
    with pytest.raises(bt.BenchError, match="no readable"):
        bt.run_side(_fake_side(tmp_path, "pass\n"), out)


@pytest.mark.parametrize("body, match", [
    ("sys.exit(3)\n", "exit status 3"),
    ("(out / 'result.json').write_text('{\"side\": \"ours\"}')\n", "lacks"),
    ("(out / 'result.json').write_text('{not json')\n", "no readable"),
    ("import time; time.sleep(30)\n", "timed out"),
])
def test_run_side_failures(tmp_path, body, match):
    with pytest.raises(bt.BenchError, match=match):
        bt.run_side(_fake_side(tmp_path, body), tmp_path / "out", timeout=5)


def test_child_command_runs_this_module():
    cmd = bt.child_command("/py", "trl", "dpo", Path("/d/settings.json"), Path("/d/out"))
    assert cmd == ["/py", "-m", "rlhfgym.zoo.bench_trl", "--child", "trl", "dpo", "/d/settings.json", "/d/out"]


def test_child_refuses_an_unknown_side_and_a_mismatched_pair(tmp_path):
    f = tmp_path / "settings.json"
    f.write_text(json.dumps({"pair": "rloo", "updates": 1, "batch_size": 4, "learning_rate": 1e-4}))
    with pytest.raises(bt.BenchError, match="unknown side"):
        bt.run_child("theirs", "rloo", str(f), str(tmp_path / "o"))
    with pytest.raises(bt.BenchError, match="settings are for pair"):
        bt.run_child("ours", "dpo", str(f), str(tmp_path / "o"))


def test_write_result_needs_every_key(tmp_path):
    with pytest.raises(bt.BenchError, match="lacks"):
        bt.write_result(tmp_path, {"side": "ours"})
    path = bt.write_result(tmp_path, _record())
    assert json.loads(path.read_text())["train_s"] == 2.0


# ---------------------------------------------------------------------------------------------- summary and report


def test_summarise_medians_ratio_and_steady_step():
    runs = [_record(side="ours", train_s=4.0, eval={"gold": 0.5, "rm": 0.1}),
            _record(side="trl", train_s=8.0, eval={"gold": 0.4, "rm": 0.2}),
            _record(side="ours", train_s=2.0, eval={"gold": 0.7, "rm": 0.3}),
            _record(side="trl", train_s=12.0, eval={"gold": 0.6, "rm": 0.0}),
            _record(side="ours", train_s=3.0, eval={"gold": 0.6, "rm": 0.2})]
    sm = bt.summarise(runs)
    assert sm["ours"]["s_per_update"] == [1.0, 0.5, 0.75]
    assert sm["ours"]["median_s_per_update"] == 0.75
    assert sm["trl"]["median_s_per_update"] == 2.5
    assert sm["ratio"] == pytest.approx(2.5 / 0.75)
    assert sm["ours"]["steady_s_per_update"] == pytest.approx(0.4)
    assert sm["ours"]["eval"]["gold"] == pytest.approx(0.6)


def test_reward_centring_is_timed_apart_and_reported_with_its_own_ratio(tmp_path):
    """Our reward model's centring pass (TRL's RewardTrainer has none) is not in the table's ratio,
    and the report gives the time and ratio with it."""
    runs = [_record(side="ours", train_s=4.0, centring_s=2.0), _record(side="trl", train_s=12.0),
            _record(side="ours", train_s=6.0, centring_s=2.0), _record(side="trl", train_s=12.0)]
    sm = bt.summarise(runs)
    assert sm["ratio"] == pytest.approx(12.0 / 5.0)
    assert sm["ours"]["median_s_per_update_with_centring"] == pytest.approx((5.0 + 2.0) / 4)
    assert sm["ratio_with_centring"] == pytest.approx(12.0 / 7.0)
    assert "ratio_with_centring" not in bt.summarise([_record(side="ours"), _record(side="trl")])
    report = _report()
    report["pairs"] = {"reward": {"settings_line": "x", "runs": runs, "summary": sm}}
    md = bt.markdown(report)
    assert "centres the reward" in md and "1.750 s/update, ratio 1.71" in md


def test_steady_step_of_ppo_divides_by_the_steps_of_a_rollout():
    sm = bt.summarise([_record(updates=32, step_ends=[10.0, 18.0, 26.0], steps_per_tick=16.0)])
    assert sm["ours"]["steady_s_per_update"] == pytest.approx(0.5)
    assert bt.steady_step_s([3.0]) is None


def _report():
    s = bt.default_settings("rloo")
    runs = [_record(side="ours", train_s=4.0, eval={"gold": 0.5, "rm": 0.1}),
            _record(side="trl", train_s=8.0, eval={"gold": 0.45, "rm": 0.2})]
    return {"date": "2026-01-01 00:00 UTC", "machine": {"processor": "CPU", "cpu_count": 2},
            "load_average_before": [1.0, 1.0, 1.0], "load_average_after": [2.0, 1.0, 1.0], "threads": 1, "repeats": 1,
            "versions": {"ours": {"torch": "t"}, "trl": {"trl": "1.16.0"}}, "command": "rlhf-zoo bench trl --pair rloo",
            "eval_prompts": 200, "sft": {"gold": 0.4, "rm": 0.0},
            "pairs": {"rloo": {"settings": {}, "settings_line": bt.settings_line(s), "runs": runs,
                               "summary": bt.summarise(runs)},
                      "dpo": {"settings_line": "x", "error": "exit status 1: ...", "runs": [], "summary": {}},
                      "env": {"batch": 64, "max_new_tokens": 32, "rounds": 5,
                              "rows": [{"kl_coef": 0.05, "env_tokens_per_s": 900.0, "usual_tokens_per_s": 1000.0,
                                        "bare_tokens_per_s": 1200.0, "ratio": 0.9, "env_over_bare": 0.75}]}}}


def test_write_report_writes_json_and_markdown(tmp_path):
    j, m = bt.write_report(_report(), tmp_path / "res")
    data = json.loads(j.read_text())
    assert data["pairs"]["rloo"]["summary"]["ratio"] == pytest.approx(2.0)
    md = m.read_text()
    assert "rlhf-zoo bench trl --pair rloo" in md and "load average" in md and "trl 1.16.0" in md
    row = next(line for line in md.splitlines() if line.startswith("| RLOO"))
    assert "| 1.000 (1.000) | 2.000 (2.000) | 2.00 |" in row
    assert "gold 0.500" in row and "gold 0.450" in row
    assert "failed: exit status 1" in md  # a failed pair stays in the table
    assert "env/bare 0.75" in md
    assert not list((tmp_path / "res").glob(".*"))  # no temporary files left behind


def test_report_is_replaced_atomically(tmp_path, monkeypatch):
    bt.write_report(_report(), tmp_path)
    before = (tmp_path / "bench-trl.json").read_text()

    def fail(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(bt.os, "replace", fail)
    with pytest.raises(OSError):
        bt.write_report({**_report(), "date": "later"}, tmp_path)
    assert (tmp_path / "bench-trl.json").read_text() == before


# ---------------------------------------------------------------------------------------------- with TRL


@pytest.mark.slow
def test_one_trl_rloo_update_runs_and_reports(tmp_path):
    pytest.importorskip("trl")
    s = bt.default_settings("rloo", updates=1, batch_size=8, rloo_k=2)
    settings = bt.prepare_data(s, tmp_path)
    rec = bt.run_side(bt.child_command(sys.executable, "trl", "rloo", settings, tmp_path / "trl"), tmp_path / "trl", 600)
    assert rec["updates"] == 1 and len(rec["step_ends"]) == 1 and Path(rec["model_dir"]).is_dir()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork + exec inheritance is Linux's")
def test_peak_rss_of_a_side_is_its_own_not_its_parents():
    ballast = bytearray(300 * 1024 * 1024)  # this process's peak RSS grows by 300 MiB...
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = "from rlhfgym.zoo.bench_trl import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert bt.peak_rss_mb() >= 300
    assert child < 200  # ...a fresh side started from it does not report it (getrusage's ru_maxrss would)
    del ballast
