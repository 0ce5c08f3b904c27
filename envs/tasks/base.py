"""The task interface: where prompts come from and how a completion is judged by the gold standard.

A task knows nothing about tokens, models or rewards learned from data. It answers three questions:

* which prompts exist in each split (``prompts``),
* what a *gold* score a completion deserves for its prompt (``gold``), and
* how many prompts each split has (``split_size``).

Environments, reward models and agents build on top of this; a user adds a task by subclassing
:class:`Task` (see CONTRIBUTING.md).
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence

SPLITS = ("train", "validation", "test")


def check_texts(name: str, texts, where: str) -> list[str]:
    """``texts`` as a list of str, or a ``ValueError`` saying what is wrong with it.

    A batch of texts is a sequence (list, tuple, 1-D array) of ``str``; a single ``str`` is
    refused (it is a sequence of characters, which would be scored one character at a time), and
    so are iterators and generators (their length is unknown and reading them consumes them).
    """
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"{where}: {name} must be a list of str, got a single {type(texts).__name__}; wrap it: [{name}].")
    if not isinstance(texts, Sequence) and not (hasattr(texts, "ndim") and getattr(texts, "ndim", 0) == 1):
        raise ValueError(f"{where}: {name} must be a list of str, got {type(texts).__name__}; pass list({name}).")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ValueError(f"{where}: {name}[{i}] is {type(t).__name__} {t!r:.40}, not str; pass one text per item.")
    return out


def check_text_pairs(prompts, completions, where: str, completions_name: str = "completions") -> tuple[list[str], list[str]]:
    """Validated ``(prompts, completions)`` lists of equal length (see :func:`check_texts`)."""
    prompts = check_texts("prompts", prompts, where)
    completions = check_texts(completions_name, completions, where)
    if len(prompts) != len(completions):
        raise ValueError(
            f"{where} got {len(prompts)} prompts but {len(completions)} {completions_name}; pass one per prompt."
        )
    return prompts, completions


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
        """``n`` consecutive prompts of ``split`` from ``start`` (all of the split when ``n`` is None).

        Raises:
            ValueError: ``n`` is not None or an int ``>= 0``, ``start`` is not an int in
                ``[0, split_size)``, or ``start + n`` runs past the end of the split.
        """
        self.check_split(split)
        size = self.split_size(split)
        where = f"{self.name}.prompts"
        if n is not None and (not _is_int(n) or n < 0):
            raise ValueError(f"{where}: n must be an int >= 0 (or None for the whole split), got {n!r}.")
        if not _is_int(start) or not 0 <= start < size:
            raise ValueError(f"{where}: start must be in [0, split_size) = [0, {size}) for split {split!r}, got {start!r}.")
        start = int(start)
        stop = size if n is None else start + int(n)
        if stop > size:
            raise ValueError(
                f"{where}: prompts [{start}, {stop}) run past the end of split {split!r} of size {size}; "
                f"ask for at most {size - start} prompts from index {start} (or n=None for all of them)."
            )
        return [self.prompt(split, i) for i in range(start, stop)]

    def gold_one(self, prompt: str, completion: str) -> float:
        """Gold score of one completion; override in tasks that have a gold standard."""
        raise NotImplementedError(f"task {self.name!r} has no gold scorer")

    def gold(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Gold scores of a batch of completions: two equally long lists of str (see :func:`check_texts`)."""
        prompts, completions = check_text_pairs(prompts, completions, f"{self.name}.gold")
        return [self.gold_one(p, c) for p, c in zip(prompts, completions)]

    @property
    def has_gold(self) -> bool:
        return type(self).gold_one is not Task.gold_one or type(self).gold is not Task.gold

    def check_split(self, split: str) -> None:
        """Raise a ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
