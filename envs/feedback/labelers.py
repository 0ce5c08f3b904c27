"""Simulated labelers: people (or AI judges) who compare two completions and pick one.

A labeler reads the *gold components* of a completion (for the micro news world:
``coverage``, ``faithfulness``, ``distractor``, ``brevity``; their plain sum is the gold score),
weighs them by its own taste and answers with the Bradley-Terry choice rule (Christiano et al.
2017; the seeds' BTL lecture)::

    u(y)        = sum_k w_k * component_k(x, y)                         # the labeler's utility
    P(a > b)    = sigmoid((u(a) - u(b)) / temperature)                   # clean choice probability
    P_noisy     = (1 - flip_prob) * P(a > b) + flip_prob * 0.5           # AlpacaFarm label noise

The last line is AlpacaFarm's label flipping: with probability ``flip_prob`` (0.25 there) the
label is replaced by a fair coin, so even a perfect model of the labeler cannot predict more than
``mean(max(P_noisy, 1 - P_noisy))`` of the labels (:meth:`LabelerPopulation.bayes_ceiling`).

A :class:`LabelerPopulation` is a mixture of labeler types; each comparison is answered by one
labeler drawn from the mixture. Presets:

* ``"gold"``: one labeler whose utility is the gold score (the plain sum of the components).
* ``"alpacafarm"``: several types that care about different things (coverage, brevity,
  faithfulness) plus a balanced one; each flips 25% of its labels.
* ``"intransitive"``: three single-minded types (coverage-only, faithfulness-only, brevity-only)
  in equal proportion. For completions that trade the three criteria off cyclically the majority
  preference cycles (Condorcet): X > Y > Z > X. No scalar reward (Bradley-Terry) can represent
  this population; a two-argument preference model can (Munos et al. 2024).

A task without ``gold_components`` still works with the ``"gold"`` preset: its gold score is used
as the single component ``"gold"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: The micro world's gold components, in a fixed order (their plain sum is the gold score).
COMPONENTS = ("coverage", "faithfulness", "distractor", "brevity")

ComponentsFn = Callable[[str, str], Mapping[str, float]]


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # numerically safe for large |x| (np.exp overflows to inf, 1/(1+inf) = 0 is fine, but warns)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


@dataclass(frozen=True)
class Labeler:
    """One simulated labeler.

    ``weights`` maps component names to weights; ``None`` means "the plain sum of all components"
    (= the gold score). ``temperature`` sets how decisive the labeler is (utility differences are in
    gold-score units, so 0.05 means a 0.05 gold difference gives P = sigmoid(1) = 0.73);
    ``temperature=0`` answers deterministically (ties: a fair coin). ``flip_prob`` is the
    AlpacaFarm noise: the chance the label is replaced by a fair coin.
    """

    name: str
    weights: Mapping[str, float] | None = None
    temperature: float = 0.05
    flip_prob: float = 0.25

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"labeler {self.name!r}: temperature must be >= 0, got {self.temperature}.")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"labeler {self.name!r}: flip_prob must be in [0, 1], got {self.flip_prob}.")

    def utility(self, components: Mapping[str, float]) -> float:
        """u(y) = sum_k w_k * component_k (or the plain sum when ``weights`` is None)."""
        if self.weights is None:
            return float(sum(components.values()))
        missing = [k for k in self.weights if k not in components]
        if missing:
            raise KeyError(
                f"labeler {self.name!r} weighs component(s) {missing} but the task only gives "
                f"{sorted(components)}; use weights over those names (or weights=None for the gold sum)."
            )
        return float(sum(w * components[k] for k, w in self.weights.items()))

    def clean_prob(self, u_a: np.ndarray, u_b: np.ndarray) -> np.ndarray:
        """P(a > b) before label noise: sigmoid((u_a - u_b) / temperature)."""
        diff = np.asarray(u_a, dtype=np.float64) - np.asarray(u_b, dtype=np.float64)
        if self.temperature == 0:
            return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
        return _sigmoid(diff / self.temperature)

    def prob(self, u_a: np.ndarray, u_b: np.ndarray) -> np.ndarray:
        """P(label says a > b) with AlpacaFarm noise: (1 - f) * P_clean + f * 1/2."""
        return (1.0 - self.flip_prob) * self.clean_prob(u_a, u_b) + self.flip_prob * 0.5


@dataclass
class Labels:
    """The answers of a population to a batch of comparisons (a, b); arrays of length B.

    ``prob``: P(label = "a") for the labeler that answered, noise included (what the label was
    drawn from). ``prob_clean``: the same before label flips. ``prob_population``: P(label = "a")
    for a labeler drawn from the mixture, i.e. what a model that does not know who answered can
    at best predict. ``label``: 1 if a was preferred, else 0. ``labeler_id``: index into
    ``labeler_names``.
    """

    prob: np.ndarray
    prob_clean: np.ndarray
    prob_population: np.ndarray
    label: np.ndarray
    labeler_id: np.ndarray
    labeler_names: list[str]

    def __len__(self) -> int:
        return len(self.label)

    def to_preferences(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], soft: bool = False):
        """Preference records (a ``datasets.Dataset``, see :mod:`.preferences`).

        ``chosen`` is the completion the sampled label picked. ``soft=False`` stores
        ``label_prob = 1`` (what a person's click says); ``soft=True`` stores the labeler's own
        probability P(chosen > rejected) (what an AI labeler's normalised answer probability says,
        as in Constitutional AI).
        """
        from .preferences import make_preferences

        picked_a = self.label.astype(bool)
        chosen = [x if pa else y for x, y, pa in zip(a, b, picked_a)]
        rejected = [y if pa else x for x, y, pa in zip(a, b, picked_a)]
        if soft:
            label_prob = np.where(picked_a, self.prob, 1.0 - self.prob)
        else:
            label_prob = np.ones(len(picked_a))
        names = [self.labeler_names[i] for i in self.labeler_id]
        return make_preferences(list(prompts), chosen, rejected, label_prob.tolist(), names)


@dataclass
class BayesCeiling:
    """How well the true label probabilities themselves predict sampled labels.

    ``exact``: E[max(p, 1 - p)] with p the population probability (the labeler is unknown, as for
    a reward model): the best accuracy any model can reach on these pairs. ``exact_known_labeler``:
    the same when the predictor knows who answered (p = that labeler's probability).
    ``empirical``: the accuracy of "predict a iff p > 1/2" against freshly sampled labels (a
    held-out draw), which should agree with ``exact`` up to sampling error ``stderr``.
    """

    exact: float
    exact_known_labeler: float
    empirical: float
    stderr: float
    n: int


@dataclass
class LabelerPopulation:
    """A mixture of :class:`Labeler` types over one task's gold components.

    ``components_fn(prompt, completion) -> {name: value}`` is usually ``task.gold_components``
    (see :meth:`for_task`). ``mixture`` are the probabilities of each labeler answering a
    comparison (uniform when None).
    """

    labelers: list[Labeler]
    components_fn: ComponentsFn
    mixture: Sequence[float] | None = None
    _mix: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.labelers:
            raise ValueError("a LabelerPopulation needs at least one labeler.")
        mix = np.ones(len(self.labelers)) if self.mixture is None else np.asarray(self.mixture, dtype=np.float64)
        if mix.shape != (len(self.labelers),) or (mix < 0).any() or mix.sum() <= 0:
            raise ValueError(
                f"mixture must be {len(self.labelers)} non-negative weights with a positive sum, got {self.mixture!r}."
            )
        self._mix = mix / mix.sum()

    # -- construction ----------------------------------------------------------------------
    @staticmethod
    def components_of(task) -> ComponentsFn:
        """``task.gold_components`` if the task has it, else ``{"gold": task.gold_one(x, y)}``."""
        if hasattr(task, "gold_components"):
            return task.gold_components
        if getattr(task, "has_gold", False) or hasattr(task, "gold_one"):
            return lambda prompt, completion: {"gold": float(task.gold_one(prompt, completion))}
        raise TypeError(f"{task!r} has neither gold_components nor gold_one; labelers need a gold standard.")

    @classmethod
    def preset(
        cls,
        name: str,
        task=None,
        *,
        components_fn: ComponentsFn | None = None,
        temperature: float | None = None,
        flip_prob: float | None = None,
    ) -> "LabelerPopulation":
        """A named population (``"gold"``, ``"alpacafarm"``, ``"intransitive"``) for ``task``.

        ``temperature`` / ``flip_prob`` override every labeler's value (e.g. ``flip_prob=0`` for
        noiseless labels).
        """
        if components_fn is None:
            if task is None:
                raise ValueError("pass a task (with gold_components) or components_fn.")
            components_fn = cls.components_of(task)
        if name not in PRESETS:
            raise ValueError(f"unknown labeler preset {name!r}; use one of {', '.join(PRESETS)}.")
        labelers, mixture = PRESETS[name]()
        overrides = {}
        if temperature is not None:
            overrides["temperature"] = temperature
        if flip_prob is not None:
            overrides["flip_prob"] = flip_prob
        if overrides:
            labelers = [Labeler(**{**lab.__dict__, **overrides}) for lab in labelers]
        return cls(labelers, components_fn, mixture)

    @property
    def names(self) -> list[str]:
        return [lab.name for lab in self.labelers]

    # -- utilities and probabilities ---------------------------------------------------------
    def utilities(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """(n_labelers, B) utilities: every labeler's u for every (prompt, completion)."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions.")
        comps = [self.components_fn(p, c) for p, c in zip(prompts, completions)]
        return np.array([[lab.utility(c) for c in comps] for lab in self.labelers], dtype=np.float64).reshape(
            len(self.labelers), len(comps)
        )

    def probabilities(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n_labelers, B) arrays: P_noisy(a > b) and P_clean(a > b) for every labeler."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"prompts, a and b must have one entry per pair; got {len(prompts)}, {len(a)}, {len(b)}.")
        u_a, u_b = self.utilities(prompts, a), self.utilities(prompts, b)
        noisy = np.stack([lab.prob(u_a[k], u_b[k]) for k, lab in enumerate(self.labelers)]).reshape(u_a.shape)
        clean = np.stack([lab.clean_prob(u_a[k], u_b[k]) for k, lab in enumerate(self.labelers)]).reshape(u_a.shape)
        return noisy, clean

    def population_prob(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """P(a > b) for a labeler drawn from the mixture: sum_k mix_k * P_k(a > b) (noise included)."""
        noisy, _ = self.probabilities(prompts, a, b)
        return self._mix @ noisy

    # -- sampling ------------------------------------------------------------------------------
    def label(
        self,
        prompts: Sequence[str],
        a: Sequence[str],
        b: Sequence[str],
        rng: np.random.Generator | int | None = None,
    ) -> Labels:
        """Ask one labeler (drawn from the mixture) per pair whether ``a`` beats ``b``."""
        return self._sample(*self.probabilities(prompts, a, b), _as_rng(rng))

    def _sample(self, noisy: np.ndarray, clean: np.ndarray, rng: np.random.Generator) -> Labels:
        n = noisy.shape[1]
        who = rng.choice(len(self.labelers), size=n, p=self._mix)
        p = noisy[who, np.arange(n)]
        label = (rng.random(n) < p).astype(np.int64)  # P(label = a) = p
        return Labels(
            prob=p,
            prob_clean=clean[who, np.arange(n)],
            prob_population=self._mix @ noisy,
            label=label,
            labeler_id=who,
            labeler_names=self.names,
        )

    def bayes_ceiling(
        self,
        prompts: Sequence[str],
        a: Sequence[str],
        b: Sequence[str],
        rng: np.random.Generator | int | None = None,
    ) -> BayesCeiling:
        """The best achievable label accuracy on these pairs, exactly and on a fresh draw of labels.

        Predicting "a" iff p > 1/2 is right with probability max(p, 1 - p) for a label drawn with
        probability p, so the exact ceiling is the mean of max(p, 1 - p). The empirical check draws
        new labels (held out from any training draw) and scores that rule on them.
        """
        noisy, clean = self.probabilities(prompts, a, b)
        labels = self._sample(noisy, clean, _as_rng(rng))
        p_pop = labels.prob_population
        exact = float(np.mean(np.maximum(p_pop, 1.0 - p_pop)))
        # the known-labeler ceiling averages over who may answer: sum_k mix_k max(p_k, 1 - p_k)
        exact_known = float(np.mean(self._mix @ np.maximum(noisy, 1.0 - noisy)))
        correct = ((p_pop > 0.5).astype(np.int64) == labels.label).astype(np.float64)
        n = len(correct)
        return BayesCeiling(
            exact=exact,
            exact_known_labeler=exact_known,
            empirical=float(correct.mean()),
            stderr=float(correct.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            n=n,
        )


# ----------------------------------------------------------------------------------------------
# Presets. Weights are over COMPONENTS; each type's weights sum to 4 (the gold labeler's sum of
# four unit weights) so every type lives on the same utility scale and one temperature fits all.


def _gold() -> tuple[list[Labeler], list[float]]:
    return [Labeler("gold", weights=None)], [1.0]


def _alpacafarm() -> tuple[list[Labeler], list[float]]:
    return [
        Labeler("balanced", {"coverage": 1.0, "faithfulness": 1.0, "distractor": 1.0, "brevity": 1.0}),
        Labeler("coverage-focused", {"coverage": 2.5, "faithfulness": 0.5, "distractor": 0.5, "brevity": 0.5}),
        Labeler("brevity-focused", {"coverage": 0.75, "faithfulness": 0.5, "distractor": 1.25, "brevity": 1.5}),
        Labeler("faithfulness-focused", {"coverage": 0.75, "faithfulness": 2.5, "distractor": 0.5, "brevity": 0.25}),
    ], [0.25, 0.25, 0.25, 0.25]


def _intransitive() -> tuple[list[Labeler], list[float]]:
    # Condorcet: X = (coverage high, faithfulness low, brevity mid), Y = (mid, high, low),
    # Z = (low, mid, high). The coverage type ranks X>Y>Z, the faithfulness type Y>Z>X, the brevity
    # type Z>X>Y; each pairwise majority is 2 of 3 and the majority relation cycles X>Y>Z>X.
    # Distractors count as wasted words, so the brevity type also minds them.
    return [
        Labeler("coverage-only", {"coverage": 4.0}),
        Labeler("faithfulness-only", {"faithfulness": 4.0}),
        Labeler("brevity-only", {"brevity": 2.0, "distractor": 2.0}),
    ], [1 / 3, 1 / 3, 1 / 3]


PRESETS: dict[str, Callable[[], tuple[list[Labeler], list[float]]]] = {
    "gold": _gold,
    "alpacafarm": _alpacafarm,
    "intransitive": _intransitive,
}

__all__ = ["COMPONENTS", "Labeler", "Labels", "LabelerPopulation", "BayesCeiling", "PRESETS"]
