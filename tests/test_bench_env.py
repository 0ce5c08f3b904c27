"""``rlhf-zoo bench env`` with a policy other than the micro world's SFT model (what the GPU runs use)."""

from __future__ import annotations

import pytest
import torch

from rlhfgym.zoo import bench
from rlhfgym.zoo.bench_trl import POLICY_PRESETS, build_policy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_policy("llama-tiny", tmp_path_factory.mktemp("policy") / "tiny")


def test_load_reference_reads_a_directory_in_a_dtype(tiny):
    assert bench.load_reference() is None  # the env's own SFT model
    model = bench.load_reference(str(tiny), "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.hidden_size == POLICY_PRESETS["llama-tiny"]["hidden_size"]
    assert next(bench.load_reference(dtype="float32").parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        bench.load_reference(str(tiny), "int8")


def test_bench_env_runs_the_given_policy(tiny, capsys):
    rows = bench.bench_env(batch=4, max_new_tokens=4, repeats=1, reference=str(tiny), dtype="bfloat16")
    assert [r["kl_coef"] for r in rows] == [0.05, 0.0]
    for r in rows:
        assert r["env_tokens_per_s"] > 0 and r["usual_tokens_per_s"] > 0 and r["bare_tokens_per_s"] > 0
    header = capsys.readouterr().out.splitlines()[0]
    assert f"policy = reference {tiny} (0.1M parameters, bfloat16)" in header


def test_isolated_measurements_run_in_fresh_processes(tiny, monkeypatch, capsys):
    seen = []
    real = bench.measure_in_fresh_process

    def spy(spec, timeout=1800.0):
        seen.append(spec)
        return real(spec, timeout)

    monkeypatch.setattr(bench, "measure_in_fresh_process", spy)
    rows = bench.bench_env(batch=4, max_new_tokens=4, repeats=1, reference=str(tiny), isolate=True)
    assert len(seen) == 6 and {s["kind"] for s in seen} == {"env", "usual", "bare"}
    assert all(s["reference"] == str(tiny) for s in seen) and rows[0]["isolated"]
    assert all(r["env_tokens_per_s"] > 0 for r in rows)
    assert f"policy = reference {tiny} (0.1M parameters, float32)" in capsys.readouterr().out  # as the processes loaded it
    with pytest.raises(RuntimeError, match="unknown measurement 'warp'"):
        real({"kind": "warp", "env_id": "RLHF-Summarize-v0", "batch": 4, "max_new_tokens": 4, "kl_coef": 0.0,
              "device": "cpu", "repeats": 1})
