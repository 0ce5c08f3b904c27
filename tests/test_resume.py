"""A killed training loop resumes from its snapshot and ends where an uninterrupted run ends.

The reward model, the preference model and the judge share one loop
(:func:`rlhfgym.envs.feedback.training.train_loop`), which saves a
:class:`~rlhfgym.envs.feedback.checkpoint.LoopCheckpoint`; here each is killed after its third optimizer step
(the snapshot is forced to be written at every step), run again with the same arguments, and
compared with a run that was never killed.
"""

from __future__ import annotations

import pytest
import torch

from feedback_fixtures import make_lm, marker_preferences
from rlhfgym.envs.feedback import checkpoint
from rlhfgym.envs.feedback.checkpoint import CheckpointMismatch, LoopCheckpoint


class Killed(Exception):
    pass


@pytest.fixture
def kill_after(monkeypatch):
    """Snapshot at every step; the first run raises Killed right after saving step ``k``."""
    monkeypatch.setattr(checkpoint, "EVERY_SECONDS", 0.0)
    original = LoopCheckpoint.maybe_save
    state = {"k": None}

    def maybe_save(self, steps_done, *args, **kwargs):
        saved = original(self, steps_done, *args, **kwargs)
        if state["k"] is not None and steps_done == state["k"]:
            state["k"] = None  # only once: the resumed run goes to the end
            raise Killed(f"killed after step {steps_done}")
        return saved

    monkeypatch.setattr(LoopCheckpoint, "maybe_save", maybe_save)

    def arm(k: int):
        state["k"] = k

    return arm


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.allclose(sa[k], sb[k], atol=1e-6, rtol=0) for k in sa)


def test_reward_model_resumes_to_the_uninterrupted_result(fb_tokenizer, tmp_path, kill_after):
    from rlhfgym.envs.build.training import train_reward_model

    train, heldout = marker_preferences(48, seed=1), marker_preferences(16, seed=2)
    kw = dict(epochs=2, lr=3e-3, batch_size=8, seed=0, progress=False)  # 6 steps per epoch, 12 in all
    straight = train_reward_model(make_lm(fb_tokenizer), fb_tokenizer, train, heldout, **kw)

    ckpt = tmp_path / "rm-loop"
    kill_after(8)  # in the second epoch: the first epoch's record must survive the kill
    with pytest.raises(Killed):
        train_reward_model(make_lm(fb_tokenizer), fb_tokenizer, train, heldout, checkpoint_dir=ckpt, **kw)
    assert (ckpt / checkpoint.SNAPSHOT).is_file()
    resumed = train_reward_model(make_lm(fb_tokenizer, seed=5), fb_tokenizer, train, heldout, checkpoint_dir=ckpt, **kw)

    assert _same_weights(resumed.model, straight.model)
    assert len(resumed.history) == 2
    for r, s in zip(resumed.history, straight.history):
        assert r == pytest.approx(s, abs=1e-6)
    assert not ckpt.exists()  # a finished training removes its snapshot


def test_preference_model_resumes_to_the_uninterrupted_result(fb_tokenizer, tmp_path, kill_after):
    from rlhfgym.envs.build.training import train_preference_model

    train = marker_preferences(32, seed=3)
    kw = dict(epochs=1, lr=3e-3, batch_size=8, seed=0, progress=False)
    straight = train_preference_model(make_lm(fb_tokenizer), fb_tokenizer, train, **kw)
    ckpt = tmp_path / "pm-loop"
    kill_after(3)
    with pytest.raises(Killed):
        train_preference_model(make_lm(fb_tokenizer), fb_tokenizer, train, checkpoint_dir=ckpt, **kw)
    resumed = train_preference_model(make_lm(fb_tokenizer), fb_tokenizer, train, checkpoint_dir=ckpt, **kw)
    assert _same_weights(resumed.model, straight.model)
    assert resumed.history[0] == pytest.approx(straight.history[0], abs=1e-6)


def test_judge_loop_resumes_to_the_uninterrupted_result(fb_tokenizer, tmp_path, kill_after):
    from rlhfgym.envs.build.training import train_judge_lm
    from rlhfgym.envs.feedback.judge import answer_token_ids

    texts = [f"summarize : w{i} w{i + 1} tl;dr : ( A ) good ( B ) bad The answer is : (" for i in range(16)]
    targets = [1.0 if i % 3 else 0.0 for i in range(16)]
    ids = answer_token_ids(fb_tokenizer, ("A", "B"))
    kw = dict(epochs=2, lr=1e-3, batch_size=4, device="cpu", seed=0, group_size=2)  # 4 steps per epoch

    straight = make_lm(fb_tokenizer)
    h_straight = train_judge_lm(straight, fb_tokenizer, texts, targets, ids, **kw)
    ckpt = tmp_path / "judge-loop"
    kill_after(4)  # exactly at the end of the first epoch, before its record is written
    with pytest.raises(Killed):
        train_judge_lm(make_lm(fb_tokenizer), fb_tokenizer, texts, targets, ids, checkpoint_dir=ckpt, **kw)
    resumed = make_lm(fb_tokenizer)
    h_resumed = train_judge_lm(resumed, fb_tokenizer, texts, targets, ids, checkpoint_dir=ckpt, **kw)
    assert _same_weights(resumed, straight)
    assert len(h_resumed) == 2
    for r, s in zip(h_resumed, h_straight):  # the second epoch's sums start fresh, not from the snapshot
        assert r == pytest.approx(s, abs=1e-6)


def test_a_snapshot_of_another_training_is_refused(fb_tokenizer, tmp_path, kill_after):
    from rlhfgym.envs.build.training import train_reward_model

    train = marker_preferences(16, seed=1)
    ckpt = tmp_path / "loop"
    kill_after(1)
    with pytest.raises(Killed):
        train_reward_model(make_lm(fb_tokenizer), fb_tokenizer, train, epochs=1, lr=3e-3, batch_size=8,
                           progress=False, checkpoint_dir=ckpt)
    with pytest.raises(CheckpointMismatch, match=r"lr: 0\.003 then, 0\.001 now.*delete"):
        train_reward_model(make_lm(fb_tokenizer), fb_tokenizer, train, epochs=1, lr=1e-3, batch_size=8,
                           progress=False, checkpoint_dir=ckpt)
    (ckpt / checkpoint.SNAPSHOT).write_bytes(b"not a snapshot")
    with pytest.raises(CheckpointMismatch, match="cannot read"):
        LoopCheckpoint(ckpt).restore(None, None, None)


def test_default_work_dir_follows_the_cache_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_GYM_CACHE", str(tmp_path))
    from rlhfgym.envs.build.checkpoint import default_work_dir

    a = default_work_dir(tmp_path / "out-a", "micro-v0")
    b = default_work_dir(tmp_path / "out-b", "micro-v0")
    assert a.parent == tmp_path / "build-assets" and a.name.startswith("micro-v0-") and a != b


@pytest.fixture
def world_root(tmp_path):
    """A micro-v0-shaped root with copies of the real frozen tokenizer and SFT policy."""
    import shutil

    from rlhfgym.envs.assets import asset_dir

    package = asset_dir("micro-v0")
    root = tmp_path / "micro-v0"
    for part in ("tokenizer", "sft"):
        shutil.copytree(package / part, root / part)
    return root


def test_a_killed_feedback_build_keeps_its_data_and_finished_parts(world_root, tmp_path, monkeypatch):
    from rlhfgym.envs.build import feedback as bf

    work = tmp_path / "work"
    kw = dict(n_train_prompts=8, n_heldout_prompts=4, samples_per_prompt=2, gen_batch_size=16, rm_epochs=1,
              batch_size=8, n_layers=1, cycle_prompts=8, steps=("reward", "reward_fact"), work_dir=work, progress=False)

    def killed(*args, **kwargs):
        raise Killed("killed while training the fact reward model")

    with monkeypatch.context() as m:
        m.setattr(bf, "build_fact_reward_model", killed)
        with pytest.raises(Killed):
            bf.build_all_feedback(world_root, "cpu", 0, **kw)
    assert {"build.json", "preference_data.pkl", "reward.metrics.json"} <= {p.name for p in work.iterdir()}

    trained, real = [], bf.build_reward_model

    def build_reward_model(*args, **kwargs):
        trained.append("reward_fact" if kwargs.get("facts") else "reward")
        return real(*args, **kwargs)

    def no_sampling(*args, **kwargs):
        raise AssertionError("the resumed build must reuse the sampled data")

    with monkeypatch.context() as m:
        m.setattr(bf, "build_reward_model", build_reward_model)
        m.setattr(bf, "build_preference_data", no_sampling)
        metrics = bf.build_all_feedback(world_root, "cpu", 0, **kw)
    assert trained == ["reward_fact"]  # the reward model finished before the kill is kept, not retrained
    assert metrics["reward"]["n_train_pairs"] == metrics["reward_fact"]["n_train_pairs"] > 0
    assert (world_root / "reward_fact" / "model.safetensors").is_file()

    # the same work dir under other arguments is emptied, not mixed in
    bf._BuildWork(work, {"seed": 1}, progress=False)
    assert [p.name for p in work.iterdir()] == ["build.json"]
