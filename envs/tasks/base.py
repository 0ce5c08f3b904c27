"""The task interface: where prompts come from and how a completion is judged by the gold standard.

A task knows nothing about tokens, models or rewards learned from data. It answers three questions:

* which prompts exist in each split (``prompts``),
* what a *gold* score a completion deserves for its prompt (``gold``), and
* how many prompts each split has (``split_size``).

Environments, reward models and agents build on top of this; a user adds a task by subclassing
:class:`Task` (see CONTRIBUTING.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

SPLITS = ("train", "validation", "test")


class Task(ABC):
    """A source of prompts with an optional gold scorer.

    Subclasses set :attr:`name` and implement :meth:`prompt` and :meth:`split_size`; a task that
    has a trustworthy gold standard also implements :meth:`gold_one` (or the batched :meth:`gold`).
    """

    name: str = "task"
    #: the instruction-free text that ends every prompt and cues the model to answer
    answer_cue: str = ""

    @abstractmethod
    def split_size(self, split: str) -> int:
        """Number of prompts in ``split`` (one of :data:`SPLITS`)."""

    @abstractmethod
    def prompt(self, split: str, index: int) -> str:
        """The ``index``-th prompt of ``split``; the same arguments always give the same prompt."""

    def prompts(self, split: str, n: int | None = None, start: int = 0) -> list[str]:
        """``n`` consecutive prompts of ``split`` from ``start`` (all of the split when ``n`` is None)."""
        self.check_split(split)
        size = self.split_size(split)
        stop = size if n is None else start + n
        if start < 0 or stop > size:
            raise IndexError(
                f"{self.name}: prompts [{start}, {stop}) are outside split {split!r} of size {size}; "
                f"ask for at most {size - start} prompts from index {start}."
            )
        return [self.prompt(split, i) for i in range(start, stop)]

    def gold_one(self, prompt: str, completion: str) -> float:
        """Gold score of one completion; override in tasks that have a gold standard."""
        raise NotImplementedError(f"task {self.name!r} has no gold scorer")

    def gold(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Gold scores of a batch of completions (same length as ``prompts``)."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"gold() got {len(prompts)} prompts but {len(completions)} completions; pass one completion per prompt."
            )
        return [self.gold_one(p, c) for p, c in zip(prompts, completions)]

    @property
    def has_gold(self) -> bool:
        return type(self).gold_one is not Task.gold_one or type(self).gold is not Task.gold

    def check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
