"""Old import paths kept for one release (0.2): each one warns and then *is* the new module."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias_module(old: str, new: str) -> None:
    """Make module ``old`` an alias of ``new`` (the same module object), with a DeprecationWarning."""
    warnings.warn(f"{old} moved to {new}; import it from there ({old} goes in rlhf-gym 0.3).",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
