"""The shape of the tree (README "Architecture"), checked on the source: one arrow zoo -> agents ->
envs, no import cycles, no ``_private`` name imported from another file, and runtime code never
imports the asset build."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"envs": "rlhfgym.envs", "agents": "rlhfgym.agents", "zoo": "rlhfgym.zoo"}
LAYER = {"rlhfgym.envs": 0, "rlhfgym.agents": 1, "rlhfgym.zoo": 2}
BUILD = "rlhfgym.envs.build"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for d in PACKAGES for p in (ROOT / d).rglob("*.py")}


MODULES = _modules()
# old import paths kept for one release: each only re-exports its new home (envs/moved.py)
ALIASES = {name for name, path in MODULES.items() if "alias_module(" in path.read_text()}


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """Every import in the file, anywhere (module level or inside functions): (module, names, line)."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [a.name for a in node.names]
            out.append((module, names, node.lineno))
            # `from . import x` imports the submodule x
            out += [(f"{module}.{n}", [], node.lineno) for n in names if f"{module}.{n}" in MODULES]
    return out


def _owner(module: str) -> str | None:
    """The project module that ``module`` (or its longest known prefix) names."""
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


def _layer(module: str) -> int | None:
    for top, layer in LAYER.items():
        if module == top or module.startswith(top + "."):
            return layer
    return None


def test_dependencies_point_one_way_and_runtime_never_imports_the_build():
    wrong = []
    for name, path in MODULES.items():
        if name in ALIASES:
            continue
        for module, _, line in _imports(name, path):
            target = _owner(module)
            if target is None:
                continue
            if _layer(target) > _layer(name):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (against zoo -> agents -> envs)")
            in_build = name == BUILD or name.startswith(BUILD + ".")
            if (target == BUILD or target.startswith(BUILD + ".")) and not in_build:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports the asset build {target} from runtime code")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {name: set() for name in MODULES if name not in ALIASES}
    for name in graph:
        for module, _, _ in _imports(name, MODULES[name]):
            target = _owner(module)
            # a package's __init__ re-exports its children; importing a child runs the parent first,
            # which is not a dependency of the child on its parent's contents
            if target in graph and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_is_imported_from_another_file():
    wrong = []
    for name, path in MODULES.items():
        if name in ALIASES:
            continue
        for module, names, line in _imports(name, path):
            if _owner(module) is None:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {module}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("old, new", [
    ("rlhfgym.envs.labelers", "rlhfgym.envs.feedback.labelers"),
    ("rlhfgym.envs.reward_model", "rlhfgym.envs.feedback.reward_model"),
    ("rlhfgym.envs.build_feedback", "rlhfgym.envs.build.feedback"),
])
def test_old_import_paths_warn_and_are_the_new_modules(old, new):
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"assert old is importlib.import_module({new!r}), old\n"
        "assert any(issubclass(w.category, DeprecationWarning) and "
        f"{new!r} in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_making_every_env_imports_nothing_from_the_build():
    code = (
        "import sys, gymnasium as gym, rlhfgym.envs\n"
        "for env_id in rlhfgym.envs.ENV_IDS:\n"
        "    gym.make(env_id).reset(seed=0)\n"
        f"loaded = [m for m in sys.modules if m == {BUILD!r} or m.startswith({BUILD + '.'!r})]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
