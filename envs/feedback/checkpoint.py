"""Snapshots of a training loop, so that a killed training resumes where it stopped.

The feedback models of the micro world take up to hours to train on a CPU. Their training loop
(:func:`~.training.train_loop`, used by the asset build and by the zoo's studies) saves a
:class:`LoopCheckpoint` every few minutes (model, optimizer, scheduler, the number of optimizer steps
done and the loop's running sums), atomically. Run the same training again and the loop loads the snapshot, replays its shuffling generator up to that step and
goes on; the result is the model an uninterrupted run would have produced (same batches, same
order, same optimizer state). The protocol, as that loop follows it::

    ckpt = LoopCheckpoint(directory, fingerprint={"lr": lr, "n": n, ...})   # directory=None: off
    done, state = ckpt.restore(model, optimizer, scheduler)               # (0, {}) when fresh
    history, step = state.get("history", []), 0
    for epoch in range(epochs):
        order = ...shuffle...           # always drawn, so the generator replays
        sums = ckpt.epoch_start(epoch, steps_per_epoch, len(history), fresh=(0.0, 0.0))
        if sums is None:                # the snapshot holds this whole epoch and its record
            step += steps_per_epoch
            continue
        for batch in ...:
            step += 1
            if step <= done: continue   # the snapshot already holds this batch
            ...one optimizer step, update sums...
            ckpt.maybe_save(step, model, optimizer, scheduler, {"history": history, "sums": sums})
        history.append(...record of the epoch...)
    ckpt.clear()                        # finished: the snapshot is no longer needed

A snapshot made with other arguments (its ``fingerprint`` differs) is refused with an error that
says which arguments changed, rather than silently mixing two trainings.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path
from typing import Any

import torch

SNAPSHOT = "loop.pt"
FORMAT = 1
#: the least time between two snapshots of a loop, in seconds (saving costs about as much as a few
#: optimizer steps of the micro models)
EVERY_SECONDS = 300.0


class CheckpointMismatch(ValueError):
    """A snapshot on disk was made by a different training (other data or hyperparameters)."""


class LoopCheckpoint:
    """Periodic atomic snapshots of one training loop in ``directory`` (``None``: disabled).

    ``fingerprint``: JSON-able values that identify the training (sizes, hyperparameters, seed);
    a snapshot whose fingerprint differs is refused. ``every_seconds``: the least time between two
    snapshots (default :data:`EVERY_SECONDS`).
    """

    def __init__(self, directory, fingerprint: dict[str, Any] | None = None, every_seconds: float | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = dict(fingerprint or {})
        self.every_seconds = float(EVERY_SECONDS if every_seconds is None else every_seconds)
        self.steps_done, self.state = 0, {}
        self._last = time.monotonic()

    @property
    def path(self) -> Path | None:
        return self.directory / SNAPSHOT if self.directory is not None else None

    def restore(self, model, optimizer, scheduler) -> tuple[int, dict[str, Any]]:
        """Load the snapshot into ``model``, ``optimizer`` and ``scheduler`` if there is one.

        Returns ``(steps_done, state)``: the optimizer steps it holds and the loop state saved with
        it; ``(0, {})`` when there is none (or checkpoints are off)."""
        if self.path is None or not self.path.is_file():
            return 0, {}
        try:
            snap = torch.load(self.path, map_location="cpu", weights_only=True)  # plain tensors and numbers: no code runs on load
        except Exception as e:  # a truncated file cannot happen (atomic writes); anything else is foreign
            raise CheckpointMismatch(f"cannot read the training snapshot {self.path} ({e}); delete it to start over.") from e
        if not isinstance(snap, dict) or snap.get("format") != FORMAT:
            raise CheckpointMismatch(f"{self.path} is not a training snapshot of this version of rlhf-gym; delete it "
                                     f"to start over.")
        old = snap.get("fingerprint", {})
        changed = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} then, {self.fingerprint.get(k)!r} now" for k in changed)
            raise CheckpointMismatch(f"the training snapshot {self.path} was made by another training ({diff}); "
                                     f"run with the same arguments to resume it, or delete {self.directory} to start over.")
        model.load_state_dict(snap["model"])
        optimizer.load_state_dict(snap["optimizer"])
        scheduler.load_state_dict(snap["scheduler"])
        self._last = time.monotonic()
        self.steps_done, self.state = int(snap["steps_done"]), dict(snap.get("state", {}))
        return self.steps_done, self.state

    def epoch_start(self, epoch: int, steps_per_epoch: int, records: int, fresh: tuple) -> tuple | None:
        """Where the restored loop stands at the start of ``epoch`` (``records``: epochs already in
        its history). ``None``: the snapshot holds the whole epoch and its record, skip it.
        Otherwise the running sums to start the epoch from: the snapshot's when it stopped inside
        this epoch (or right at its end, before the record), else ``fresh``."""
        if self.steps_done >= (epoch + 1) * steps_per_epoch and records > epoch:
            return None
        if self.steps_done > epoch * steps_per_epoch:
            return tuple(self.state.get("sums", fresh))
        return fresh

    def maybe_save(self, steps_done: int, model, optimizer, scheduler, state: dict[str, Any] | None = None) -> bool:
        """Save a snapshot after ``steps_done`` optimizer steps if ``every_seconds`` have passed
        since the last one. Returns whether it saved."""
        if self.path is None or time.monotonic() - self._last < self.every_seconds:
            return False
        from ..assets import atomic_write_bytes

        buf = io.BytesIO()
        torch.save({"format": FORMAT, "fingerprint": self.fingerprint, "steps_done": int(steps_done),
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "state": dict(state or {})}, buf)
        atomic_write_bytes(self.path, buf.getvalue())
        self._last = time.monotonic()
        return True

    def clear(self) -> None:
        """Delete the snapshot directory (the training finished)."""
        if self.directory is not None and self.directory.is_dir():
            shutil.rmtree(self.directory, ignore_errors=True)


__all__ = ["LoopCheckpoint", "CheckpointMismatch", "EVERY_SECONDS", "SNAPSHOT"]
