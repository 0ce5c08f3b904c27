"""Asset builds: a tiny end-to-end build verifies and loads; the shipped assets verify."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfgym.envs.assets import AssetError, load_micro_assets, verify_manifest
from rlhfgym.envs.build.sft import SFTConfig, build_assets, build_tokenizer, make_sft_data
from rlhfgym.envs.build.checkpoint import default_work_dir
from rlhfgym.envs.tasks.news import NewsTask, world_words


def test_shipped_assets_verify_and_fit_the_size_budget():
    assets = load_micro_assets()
    manifest = verify_manifest(assets.root)  # every listed file is there, with its checksum
    on_disk = sum((assets.root / rel).stat().st_size for rel in manifest["files"])
    assert on_disk <= 25 * 2**20


@pytest.mark.slow
def test_shipped_sft_policy_meets_its_targets():
    """The build's SFT report, measured again on the shipped policy (32 test articles, ~10 s)."""
    from transformers import PreTrainedTokenizerFast

    from rlhfgym.envs.build.sft import evaluate_policy

    root = load_micro_assets().root
    model = AutoModelForCausalLM.from_pretrained(root / "sft")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    m = evaluate_policy(model, tokenizer, NewsTask(seed=0), n=32, best_of=8)
    assert m["n_test_articles"] == 32
    assert m["sft_greedy"] > m["lead_2"] + 0.2  # it summarises: greedy beats the first two sentences
    assert 0.2 <= m["sft_sampled_t1"] <= 0.6  # and leaves room for RL: a sample at temperature 1 is mediocre
    assert m["sft_best_of_8_gold"] >= m["sft_sampled_t1"] + 0.25  # best-of-n has much to gain
    assert m["writer_expert"] > m["sft_best_of_8_gold"] + 0.15  # and the gold scale is far from saturated


def test_tokenizer_covers_the_world_without_unknowns():
    tok = build_tokenizer(NewsTask(), n_texts=50)
    ids = tok(" ".join(world_words()))["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(tok("mara bought 12 boats in halden .")["input_ids"]) == "mara bought 12 boats in halden ."


def test_sft_data_weights_only_summaries():
    task = NewsTask()
    tok = build_tokenizer(task, n_texts=50)
    ids, is_summary = make_sft_data(task, tok, 8, workers=1)
    for row, flags in zip(ids, is_summary):
        summary = row[flags == 1]
        assert summary[-1] == tok.eos_token_id
        assert tok.decode(row[flags == 0]).endswith("tl;dr :")


@pytest.mark.slow
def test_tiny_build_end_to_end(tmp_path):
    cfg = SFTConfig(hidden_size=32, num_layers=1, num_heads=2, pretrain_steps=3, sft_steps=3, batch_size=4,
                    n_examples=64, warmup_steps=1)
    root = build_assets(out=str(tmp_path / "micro-v0"), sft_config=cfg, progress=False, eval_articles=4)
    manifest = verify_manifest(root)
    assert {"tokenizer/tokenizer.json", "sft/model.safetensors"} <= set(manifest["files"])
    assert manifest["seed"] == 0 and "build-assets" in manifest["command"]
    assert set(manifest["parts"]) == {"tokenizer", "sft"} and manifest["metrics"]["n_test_articles"] == 4
    # a feedback part is built on top: the manifest lists it and keeps the other parts' records
    with pytest.warns(UserWarning, match="previous SFT policy"):  # rebuilt SFT, stale reward model
        build_assets(out=str(root), only="reward", progress=False,
                     feedback={"n_train_prompts": 12, "n_heldout_prompts": 6, "gen_batch_size": 64})
        build_assets(out=str(root), only="sft", sft_config=cfg, progress=False, eval_articles=4)
    manifest = verify_manifest(root)
    assert "reward/model.safetensors" in manifest["files"]
    assert not default_work_dir(root, "micro-v0").exists()  # the resumable state is gone after success
    assert manifest["parts"]["reward"]["command"].endswith("--only reward --gen-batch-size 64 --heldout-prompts 6 --prompts 12")
    assert manifest["parts"]["tokenizer"]["command"] != manifest["parts"]["reward"]["command"]
    # the reward part's headline numbers: 12 train prompts as asked, the held-out accuracy a count
    # of correctly ordered pairs out of the held-out pairs (4 samples of each of 6 prompts: at most 36)
    reward = manifest["feedback_metrics"]["reward"]
    data = reward["preference_data"]
    assert data["n_train_prompts"] == 12 and 0 < data["n_heldout_pairs"] <= 6 * 6
    correct = reward["heldout_accuracy"] * data["n_heldout_pairs"]
    assert correct == pytest.approx(round(correct), abs=1e-9)
    assert reward["accuracy_over_ceiling"] == pytest.approx(reward["heldout_accuracy"] / data["bayes_ceiling"])
    with pytest.raises(ValueError, match="unknown asset parts.*feedback"):
        build_assets(out=str(root), only="rewards")
    model = AutoModelForCausalLM.from_pretrained(root / "sft")
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    assert model.config.vocab_size == len(tok)
    # a corrupted weight file is caught by name
    weights = root / "sft" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AssetError, match="model.safetensors"):
        verify_manifest(root)
