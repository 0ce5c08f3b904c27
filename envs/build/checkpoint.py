"""Where a killed asset build keeps its resumable state (:func:`default_work_dir`).

The snapshots of the training loop themselves (:class:`LoopCheckpoint`) are runtime code, shared
with the zoo's studies: :mod:`rlhfgym.envs.feedback.checkpoint`; they are re-exported here.
"""

from __future__ import annotations

import os
from pathlib import Path

# not EVERY_SECONDS: it is read where LoopCheckpoint lives, so patch it there (a copy here would be a silent no-op)
from ..feedback.checkpoint import CheckpointMismatch, LoopCheckpoint


def default_work_dir(target, version: str) -> Path:
    """Where ``rlhf-zoo build-assets`` keeps its resumable state for the build into ``target``:
    ``$RLHF_GYM_CACHE`` or ``$XDG_CACHE_HOME/rlhf-gym`` (``~/.cache/rlhf-gym``), then
    ``build-assets/<version>-<hash of the target path>``."""
    import hashlib

    base = os.environ.get("RLHF_GYM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rlhf-gym")
    key = hashlib.sha256(str(Path(target).resolve()).encode()).hexdigest()[:12]
    return Path(base) / "build-assets" / f"{version}-{key}"


__all__ = ["LoopCheckpoint", "CheckpointMismatch", "default_work_dir"]
