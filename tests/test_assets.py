"""Frozen assets: manifests, checksum verification and atomic writes (envs/assets.py).

Every test builds a small fake asset version in tmp_path; nothing here needs the real assets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rlhfgym.envs import assets
from rlhfgym.envs.assets import (
    AssetError,
    atomic_save_dir,
    atomic_write_bytes,
    atomic_write_text,
    load_micro_assets,
    sha256_file,
    verify_manifest,
    write_manifest,
)


@pytest.fixture
def fake_assets(tmp_path: Path) -> Path:
    """A micro-v0-shaped directory with a tokenizer and an SFT model but no reward model."""
    root = tmp_path / "micro-v0"
    (root / "tokenizer").mkdir(parents=True)
    (root / "sft").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text('{"model": "word-level"}\n')
    (root / "sft" / "config.json").write_text('{"n_layer": 2}\n')
    (root / "sft" / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    (root / ".sft.k3j2.tmp").mkdir()  # debris of a killed build: not part of the asset
    (root / ".sft.k3j2.tmp" / "half.bin").write_bytes(b"x")
    write_manifest(root, ["rlhf-zoo", "build-assets", "--version", "micro-v0"], seed=0, extra={"note": "test"})
    assets.clear_cache()
    yield root
    assets.clear_cache()


def test_manifest_lists_every_file_with_checksums(fake_assets: Path) -> None:
    manifest = json.loads((fake_assets / "manifest.json").read_text())
    assert manifest["format"] == 1
    assert set(manifest["files"]) == {"tokenizer/tokenizer.json", "sft/config.json", "sft/model.safetensors"}
    entry = manifest["files"]["sft/model.safetensors"]
    assert entry == {"sha256": sha256_file(fake_assets / "sft" / "model.safetensors"), "size": 2048}
    assert manifest["asset_version"] == "micro-v0"
    assert manifest["command"] == "rlhf-zoo build-assets --version micro-v0"
    assert manifest["seed"] == 0 and manifest["note"] == "test"
    for key in ("package_version", "created", "built_on"):
        assert key in manifest


def test_verification_passes(fake_assets: Path) -> None:
    manifest = verify_manifest(fake_assets)
    assert len(manifest["files"]) == 3
    loaded = load_micro_assets(root=fake_assets)
    assert loaded.tokenizer_dir == fake_assets.resolve() / "tokenizer"
    assert loaded.require("sft") == fake_assets.resolve() / "sft"
    assert loaded.has("tokenizer") and not loaded.has("reward")


def test_flipped_byte_names_the_file(fake_assets: Path) -> None:
    weights = fake_assets / "sft" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01  # same size, different content: only the checksum can catch it
    weights.write_bytes(bytes(data))
    with pytest.raises(AssetError, match=r"corrupted.*sft/model\.safetensors.*build-assets --version micro-v0"):
        verify_manifest(fake_assets)


def test_missing_file_is_reported(fake_assets: Path) -> None:
    (fake_assets / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(AssetError, match=r"missing: tokenizer/tokenizer\.json.*reinstall rlhf-gym"):
        load_micro_assets(root=fake_assets)


def test_missing_manifest_and_other_format(fake_assets: Path) -> None:
    manifest_path = fake_assets / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format"] = 2
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(AssetError, match=r"format 2 .*reads format 1"):
        verify_manifest(fake_assets)
    manifest_path.unlink()
    with pytest.raises(AssetError, match="manifest.json is missing"):
        verify_manifest(fake_assets)


def test_missing_component_raises_on_require(fake_assets: Path) -> None:
    loaded = load_micro_assets(root=fake_assets)
    assert loaded.reward_dir == loaded.root / "reward"  # the path is known even before it is built
    with pytest.raises(AssetError, match=r"'reward' is not built.*--only reward"):
        loaded.require("reward")


def test_verification_is_cached_until_the_manifest_changes(fake_assets: Path, monkeypatch) -> None:
    calls = []
    real = assets.verify_manifest
    monkeypatch.setattr(assets, "verify_manifest", lambda d: calls.append(d) or real(d))
    first = load_micro_assets(root=fake_assets)
    assert load_micro_assets(root=fake_assets) is first
    assert len(calls) == 1
    (fake_assets / "reward").mkdir()
    (fake_assets / "reward" / "config.json").write_text("{}")
    write_manifest(fake_assets, "rebuild", seed=1, extra={})  # a new manifest: re-verify
    again = load_micro_assets(root=fake_assets)
    assert len(calls) == 2 and again.has("reward")


def test_unknown_version_lists_available_ones() -> None:
    with pytest.raises(AssetError, match=r"unknown asset version 'micro-v99'; available: .*micro-v0"):
        assets.asset_dir("micro-v99")
    assert assets.asset_dir("micro-v0", must_exist=False) == assets.ASSETS_ROOT / "micro-v0"


def test_known_but_unbuilt_version(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(assets, "ASSETS_ROOT", tmp_path)
    assert assets.asset_dir("micro-v0", must_exist=False) == tmp_path / "micro-v0"
    with pytest.raises(AssetError, match=r"'micro-v0' are not built.*build-assets --version micro-v0"):
        assets.asset_dir("micro-v0")
    with pytest.raises(AssetError, match="directory does not exist"):
        load_micro_assets("micro-v0")


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["f.txt"]  # no temp files left behind


def test_atomic_save_dir_keeps_old_dir_when_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "sft"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_save_dir(target) as tmp:
            (tmp / "weights").write_text("half-written")
            raise RuntimeError("boom")
    assert (target / "weights").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["sft"]


def test_atomic_save_dir_replaces_old_dir_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sft"
    target.mkdir()
    (target / "stale").write_text("old")
    with atomic_save_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "weights").write_text("new")
    assert sorted(os.listdir(target)) == ["weights"]
    assert sorted(os.listdir(tmp_path)) == ["sft"]  # the old copy was deleted
    assert target.stat().st_mode & 0o755 == 0o755
