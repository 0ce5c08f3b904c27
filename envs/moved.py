"""Old import paths kept for one release (0.2): each one warns and then resolves to the new home."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias_module(old: str, new: str) -> None:
    """Make module ``old`` an alias of ``new`` (the same module object), with a DeprecationWarning."""
    warnings.warn(f"{old} moved to {new}; import it from there ({old} goes in rlhf-gym 0.3).",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)


def moved_attributes(module: str, moves: dict[str, str]):
    """A module-level ``__getattr__`` for names that left ``module``: ``moves`` maps each old name to
    ``"new.module"`` (same name there) or ``"new.module:new_name"``. The new home is imported only
    when an old name is used, with a DeprecationWarning."""

    def __getattr__(name: str):
        if name not in moves:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target, _, new_name = moves[name].partition(":")
        new_name = new_name or name
        warnings.warn(f"{module}.{name} moved to {target}.{new_name}; use that ({module}.{name} goes in rlhf-gym 0.3).",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target), new_name)

    return __getattr__
