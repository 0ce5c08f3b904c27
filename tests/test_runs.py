"""Runs you can trust: checkpoints that are checked, run dirs that know what they hold, resumes that
are exact (also after ``kill -9`` through the command line), and files with ordinary permissions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import pytest
import torch

import rlhfgym.agents as agents
from rlhfgym.agents import AgentError
from rlhfgym.agents.common import TRAIN_STATE_FILE, TrainingRun, checkpoint_interval
from rlhfgym.envs.assets import atomic_save_dir, atomic_write_bytes
from rlhfgym.envs.registration import register_envs
from rlhfgym.zoo.train import RUN_FILE, RunDirError, run_lock, train

register_envs()
ENV_ID = "RLHF-Summarize-Gold-v0"
TINY = {"batch_size": 4}  # sft: 4 pairs a step


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def env():
    return gym.make(ENV_ID)


@pytest.fixture(scope="module")
def saved(env, tmp_path_factory):
    """A checkpoint of an SFT agent after 4 completions (policy, train_state.pt, agent.json)."""
    ckpt = tmp_path_factory.mktemp("saved") / "ckpt"
    agents.make("sft", seed=3, **TINY).learn(env, 4, checkpoint_dir=ckpt, progress_bar=False)
    return ckpt


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of ``saved`` to damage."""
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def resume(env, ckpt, budget=8):
    return agents.make("sft", seed=3, **TINY).learn(env, budget, checkpoint_dir=ckpt, progress_bar=False)


def to_format_1(ckpt: Path) -> None:
    """Rewrite agent.json as rlhf-gym 0.1 wrote it: format 1, no file list."""
    meta = json.loads((ckpt / "agent.json").read_text())
    meta.pop("files")
    meta["format"] = 1
    (ckpt / "agent.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_lists_every_file_with_its_sha256(saved):
    from rlhfgym.envs.assets import sha256_file

    meta = json.loads((saved / "agent.json").read_text())
    assert meta["format"] == 2
    on_disk = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file() and p.name != "agent.json")
    assert sorted(meta["files"]) == on_disk and "policy/model.safetensors" in on_disk and TRAIN_STATE_FILE in on_disk
    for rel, entry in meta["files"].items():
        assert entry == {"sha256": sha256_file(saved / rel), "size": (saved / rel).stat().st_size}
    assert agents.load(saved).spent == 4


def test_a_flipped_byte_is_refused_on_load_and_resume(env, ckpt):
    weights = ckpt / "policy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    for attempt in (lambda: agents.load(ckpt), lambda: resume(env, ckpt)):
        with pytest.raises(AgentError, match=r"model\.safetensors is corrupted.*sha256.*delete the checkpoint"):
            attempt()


def test_a_deleted_policy_is_refused_not_replaced_by_fresh_weights(env, ckpt):
    shutil.rmtree(ckpt / "policy")
    with pytest.raises(AgentError, match=r"policy/config\.json is missing .*delete the checkpoint"):
        resume(env, ckpt)
    to_format_1(ckpt)  # an old checkpoint has no file list: its spent count says a policy was trained
    with pytest.raises(AgentError, match=r"trained 4 completions but its policy/ is missing"):
        resume(env, ckpt)


def test_a_missing_train_state_is_refused(env, ckpt):
    (ckpt / TRAIN_STATE_FILE).unlink()
    with pytest.raises(AgentError, match=r"train_state\.pt is missing"):
        resume(env, ckpt)
    to_format_1(ckpt)
    with pytest.raises(AgentError, match=r"holds no train_state\.pt \(the optimizer and random state\)"):
        resume(env, ckpt)


@pytest.mark.parametrize("name", ["policy/model.safetensors", TRAIN_STATE_FILE])
def test_truncated_files_name_their_path(env, ckpt, name):
    path = ckpt / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AgentError, match=rf"{path}.*corrupted"):
        resume(env, ckpt)
    to_format_1(ckpt)  # without checksums, the reader's error still names the path
    with pytest.raises(AgentError, match=rf"{path}.* could not be (loaded|read)"):
        resume(env, ckpt)


def test_an_empty_or_foreign_agent_json_names_its_path(env, ckpt):
    (ckpt / "agent.json").write_text("")
    with pytest.raises(AgentError, match=rf"{ckpt / 'agent.json'} is empty"):
        resume(env, ckpt)
    (ckpt / "agent.json").write_text("[1, 2]")
    with pytest.raises(AgentError, match="not an agent's agent.json"):
        agents.load(ckpt)
    (ckpt / "agent.json").unlink()  # a directory with files but no agent.json is not overwritten silently
    with pytest.raises(AgentError, match="is not a checkpoint"):
        resume(env, ckpt)


def test_format_1_checkpoints_still_load_and_resume_exactly(env, saved, tmp_path):
    old = Path(shutil.copytree(saved, tmp_path / "old"))
    new = Path(shutil.copytree(saved, tmp_path / "new"))
    to_format_1(old)
    assert agents.load(old).spent == 4
    a, b = resume(env, old), resume(env, new)
    for (k, x), (_, y) in zip(a.policy.state_dict().items(), b.policy.state_dict().items()):
        assert torch.equal(x, y), k


def test_time_based_checkpoints(env, tmp_path, monkeypatch):
    saves = []
    original = agents.Agent.save

    def save(self, directory):
        saves.append(self.spent)
        return original(self, directory)

    monkeypatch.setattr(agents.Agent, "save", save)
    agents.make("sft", **TINY).learn(env, 12, checkpoint_dir=tmp_path / "a", progress_bar=False)
    assert saves == [12]  # the default interval (120 s) is not reached: only the final save
    saves.clear()
    with checkpoint_interval(0):  # every update is 0 s after the last save
        agents.make("sft", **TINY).learn(env, 12, checkpoint_dir=tmp_path / "b", progress_bar=False)
    assert saves == [4, 8, 12]
    with pytest.raises(AgentError, match="checkpoint_seconds must be a number of seconds >= 0"):
        with checkpoint_interval(-1):
            pass
    with pytest.raises(AgentError, match="checkpoint_seconds=5 needs a checkpoint_dir"):
        TrainingRun(agents.make("sft"), 4, checkpoint_seconds=5)


# ---------------------------------------------------------------------------------------------- file modes


def test_atomic_saves_give_files_the_umask_mode(tmp_path):
    expected = 0o666 & ~umask()
    with atomic_save_dir(tmp_path / "d") as tmp:
        private = tmp / "weights"
        private.write_bytes(b"x")
        private.chmod(0o600)  # as safetensors writes its files
        (tmp / "sub").mkdir(mode=0o700)
    assert (tmp_path / "d" / "weights").stat().st_mode & 0o777 == expected
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask()
    assert (tmp_path / "d" / "sub").stat().st_mode & 0o777 == 0o777 & ~umask()
    assert atomic_write_bytes(tmp_path / "f", b"y").stat().st_mode & 0o777 == expected


def test_a_saved_agent_has_no_private_files(saved):
    modes = {p.relative_to(saved).as_posix(): p.stat().st_mode & 0o777 for p in saved.rglob("*") if p.is_file()}
    assert modes["policy/model.safetensors"] == 0o666 & ~umask()
    assert set(modes.values()) == {0o666 & ~umask()}


# ---------------------------------------------------------------------------------------------- run dirs


def zoo_train(run_dir, **kw):
    kw = {"budget": 8, "eval_n": 2, "overrides": dict(TINY), **kw}
    return train("sft", ENV_ID, run_dir=str(run_dir), **kw)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    result = zoo_train(run, overrides={**TINY, "checkpoint_every": 4})
    return run, result


def test_a_run_records_its_identity_and_a_rerun_returns_its_result(finished_run, capsys):
    run, result = finished_run
    record = json.loads((run / RUN_FILE).read_text())
    assert record["status"] == "finished" and record["budget"] == 8 and record["seed"] == 0
    assert record["hyperparams"]["batch_size"] == 4 and "checkpoint_every" not in record["hyperparams"]
    assert "checkpoint_every" not in result["hyperparams"]  # a run option, not a hyperparameter
    assert (run / "agent" / "policy" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask()
    weights = run / "agent" / "policy" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = zoo_train(run, overrides={**TINY, "checkpoint_every": 4})
    assert again == result and weights.stat().st_mtime_ns == before  # nothing was trained again
    assert "this run is finished" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"budget": 16}, "budget 8, not 16"),
    ({"seed": 1}, "seed 0, not 1"),
    ({"overrides": {**TINY, "learning_rate": 1e-3}}, "hyperparams learning_rate=0.0001, not 0.001"),
])
def test_a_rerun_with_another_identity_is_refused(finished_run, change, message):
    run, _ = finished_run
    with pytest.raises(RunDirError, match=rf"holds another run \({message}.*use another --run-dir"):
        zoo_train(run, **change)


def test_a_killed_run_with_a_deleted_policy_is_refused(finished_run, tmp_path):
    run = Path(shutil.copytree(finished_run[0], tmp_path / "run"))
    record = json.loads((run / RUN_FILE).read_text())
    record["status"] = "running"  # as if killed after its last checkpoint
    (run / RUN_FILE).write_text(json.dumps(record))
    shutil.rmtree(run / "agent" / "policy")
    with pytest.raises(AgentError, match=r"policy/.* is missing from the saved agent .*delete the checkpoint"):
        zoo_train(run)


def test_run_options_are_not_hyperparameters(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every must be a positive number of completions"):
        zoo_train(tmp_path / "a", overrides={**TINY, "checkpoint_every": 0})
    with pytest.raises(ValueError, match="checkpoint_seconds is given twice"):
        zoo_train(tmp_path / "b", overrides={**TINY, "checkpoint_seconds": 5}, checkpoint_seconds=6)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before the run dir is made


def test_a_locked_or_foreign_run_dir_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run):  # another train holds the run dir
        with pytest.raises(RunDirError, match=r"in use by another `rlhf-zoo train`.*use another --run-dir"):
            zoo_train(run)
    assert not (run / RUN_FILE).exists()
    (run / "agent").mkdir()  # a run dir of an older rlhf-gym: no run.json
    with pytest.raises(RunDirError, match="holds agent but no run.json"):
        zoo_train(run)


def test_two_processes_cannot_hold_one_run_dir(tmp_path):
    code = ("import sys, time; from rlhfgym.zoo.train import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"in use by another `rlhf-zoo train` \(pid {holder.pid}\)"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):  # the kernel dropped the dead process's lock
        pass


# ---------------------------------------------------------------------------------------------- kill -9


def cli(run_dir, budget=64):
    return [sys.executable, "-m", "rlhfgym.zoo.cli", "train", "sft", ENV_ID, "--budget", str(budget), "--run-dir",
            str(run_dir), "--eval-n", "2", "--hp", "batch_size=4", "--hp", "checkpoint_every=4"]


def cli_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same arithmetic in every process


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "agent" / "policy" / "model.safetensors")


@pytest.mark.slow
def test_kill_9_through_the_cli_resumes_to_the_uninterrupted_weights(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(cli(straight), env=cli_env(), check=True, capture_output=True, timeout=120)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(killed), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = killed / "agent" / "agent.json"
    deadline = time.monotonic() + 90
    while not meta.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    spent, first_seconds = (json.loads(meta.read_text())[k] for k in ("spent", "train_seconds"))
    assert 0 < spent < 64, "the run must be killed mid-way"
    assert json.loads((killed / RUN_FILE).read_text())["status"] == "running"

    done = subprocess.run(cli(killed), env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"resuming from its checkpoint: {spent} of 64 completions done" in done.stdout
    assert "run dir" in done.stdout and str(killed.resolve()) in done.stdout
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((killed / RUN_FILE).read_text())["status"] == "finished"
    # the reported training time includes the killed session's, up to its checkpoint
    assert json.loads((killed / "results.json").read_text())["train_seconds"] >= round(first_seconds, 1) > 0

    other = subprocess.run(cli(killed, budget=32), env=cli_env(), capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "holds another run (budget 64, not 32)" in other.stderr
