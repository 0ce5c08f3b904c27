"""The wheel ships every module, the frozen assets and the YAML files (pyproject.toml's package lists).

The repository maps envs/, agents/ and zoo/ onto rlhfgym.* with an explicit ``packages`` list and
``package-data`` globs; a new subpackage or an asset nested one level too deep would silently be
left out of the wheel while every test of the editable install still passed. This test builds the
wheel from a clean copy of the sources (so stale build/ output cannot hide a problem) and compares.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"envs": "rlhfgym/envs", "agents": "rlhfgym/agents", "zoo": "rlhfgym/zoo"}
SKIP_PARTS = {"__pycache__", ".pytest_cache"}


def _source_files(src_dir: Path) -> list[Path]:
    return [
        p
        for p in src_dir.rglob("*")
        if p.is_file() and not SKIP_PARTS & set(p.parts) and not any(part.startswith(".") for part in p.relative_to(src_dir).parts)
    ]


@pytest.mark.slow
def test_wheel_contains_modules_and_assets(tmp_path: Path) -> None:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("the build backend is not installed here; run `pip install 'setuptools>=68' wheel`")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for name in PACKAGE_DIRS:
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    # A fake asset version exercises both package-data depths (version/file, version/component/file)
    # even before the real assets are built.
    fake = src / "envs" / "assets" / "pkgtest-v0"
    (fake / "tokenizer").mkdir(parents=True)
    (fake / "manifest.json").write_text("{}\n")
    (fake / "tokenizer" / "tokenizer.json").write_text("{}\n")

    out = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    wheels = list(out.glob("rlhf_gym-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        names = set(zf.namelist())
        entry_points = next((zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), "")

    for required in (
        "rlhfgym/envs/__init__.py",
        "rlhfgym/agents/__init__.py",
        "rlhfgym/zoo/__init__.py",
        "rlhfgym/zoo/cli.py",
        "rlhfgym/envs/assets.py",
        "rlhfgym/envs/assets/pkgtest-v0/manifest.json",
        "rlhfgym/envs/assets/pkgtest-v0/tokenizer/tokenizer.json",
    ):
        assert required in names, f"{required} is missing from the wheel"
    assert "rlhf-zoo = rlhfgym.zoo.cli:main" in entry_points

    # Everything that must ship: every module, every asset file, every YAML (hyperparameters,
    # benchmarks, constitutions). A failure here means pyproject.toml's `packages` or
    # `package-data` needs the path added.
    missing = []
    for src_name, pkg_name in PACKAGE_DIRS.items():
        for p in _source_files(src / src_name):
            rel = p.relative_to(src / src_name).as_posix()
            in_assets = rel.startswith("assets/")
            if p.suffix in (".py", ".yml", ".yaml") or (src_name == "envs" and in_assets):
                if f"{pkg_name}/{rel}" not in names:
                    missing.append(f"{src_name}/{rel}")
    assert not missing, f"files missing from the wheel (fix pyproject.toml): {missing}"

    # Nothing unexpected under the asset tree (stale build output, temp dirs of an interrupted build).
    shipped_assets = {n for n in names if n.startswith("rlhfgym/envs/assets/")}
    expected_assets = {
        "rlhfgym/envs/" + p.relative_to(src / "envs").as_posix() for p in _source_files(src / "envs" / "assets")
    }
    assert shipped_assets == expected_assets
