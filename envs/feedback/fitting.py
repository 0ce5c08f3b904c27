"""Bradley-Terry reward models fitted at runtime on preference records, cached on disk.

The shipped reward models are built once, by :mod:`rlhfgym.envs.build`. A study that asks how
over-optimisation depends on the reward model, or that compares RLHF with Nash learning on the
labels of an intransitive labeler population, needs reward models fitted on *other* data: less of
it, or other labelers. This module fits them with the shipped models' own trainer
(:func:`~.training.train_reward_model`, soft-label Bradley-Terry loss, linear decay) from the same
backbone (the micro SFT policy's first 3 decoder layers), and puts them in an env's reward slot::

    train, heldout, sft_t1 = sample_labelled_pairs(task, prompts, heldout_prompts=val)   # the build's recipe
    rm = fit_reward_model(train, heldout, cache_dir="rms/rm-1000", normalise_on=sft_t1, gold=task)
    env = gym.make("RLHF-Summarize-v0", reward_model="rms/rm-1000")           # a directory: FittedReward

``cache_dir``: the fitted model is saved there (atomically, with ``fit.json``: the fingerprint of
its records and settings, and its held-out metrics); the same call again loads it instead of
training, a call with other records or settings is refused (delete the directory to refit), and a
killed fit resumes from its loop snapshot in ``.<name>.loop`` next to it.

:func:`sample_labelled_pairs` makes preference records the way the asset build made the shipped
reward model's (:func:`rlhfgym.envs.build.feedback.build_preference_data`): ``samples_per_prompt``
SFT samples per prompt at cycling temperatures, every pair of two distinct samples of a prompt,
``annotators`` simulated labelers per pair, the soft label their mean probability.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..assets import atomic_save_dir
from ..hf import quiet_transformers
from .reward_model import CONFIG_NAME, RewardModel

__all__ = [
    "FIT_FILE",
    "RewardFitError",
    "FittedReward",
    "fit_reward_model",
    "as_preferences",
    "preferences_digest",
    "sample_labelled_pairs",
    "is_reward_model_dir",
]

#: the file in a fitted model's directory that says what it was fitted on, and how well it does
FIT_FILE = "fit.json"
FIT_FORMAT = 1
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "label_prob")


class RewardFitError(ValueError):
    """Bad input to a fit, or a cached fit made from other records or settings."""


# ----------------------------------------------------------------------------------------------
# Preference records in, a digest out


def as_preferences(prefs: Any, what: str = "train_prefs"):
    """``prefs`` as preference records: a ``datasets.Dataset`` (or anything with ``column_names``,
    ``len`` and column indexing, e.g. the build's ``PreferenceRecords``) is checked and returned; a
    list of record dicts or a file/``save_preferences`` directory path is read with
    :mod:`.preferences`. Raises :class:`RewardFitError` (or ``PreferenceDataError``) saying what is wrong."""
    from .preferences import load_preferences, records_to_dataset

    if prefs is None:
        raise RewardFitError(f"{what} is None; pass preference records (a datasets.Dataset from make_preferences, "
                             "a list of record dicts or a JSONL path).")
    if isinstance(prefs, (str, os.PathLike)):
        prefs = load_preferences(prefs)
    elif isinstance(prefs, list):
        prefs = records_to_dataset(prefs, source=what)
    elif not (hasattr(prefs, "column_names") and hasattr(prefs, "__getitem__") and hasattr(prefs, "__len__")):
        raise RewardFitError(f"{what} must be preference records (datasets.Dataset, list of dicts or a path), "
                             f"got {type(prefs).__name__}.")
    missing = [c for c in PREFERENCE_COLUMNS if c not in prefs.column_names]
    if missing:
        raise RewardFitError(f"{what} lacks the column(s) {missing} (has {list(prefs.column_names)}); preference "
                             "records are {prompt, chosen, rejected, label_prob}: see rlhfgym.envs.feedback.preferences.")
    if len(prefs) == 0:
        raise RewardFitError(f"{what} holds no records; a reward model needs at least one labelled pair.")
    bad = [i for i, p in enumerate(prefs["label_prob"]) if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0)]
    if bad:
        raise RewardFitError(f"{what}: label_prob of record {bad[0] + 1} is {prefs['label_prob'][bad[0]]!r}; it must "
                             "be P(chosen > rejected) in [0, 1].")
    return prefs


def preferences_digest(prefs) -> str:
    """SHA-256 of the records' prompt, chosen, rejected and label_prob, in order (what a fit learns from)."""
    h = hashlib.sha256()
    for row in zip(*(prefs[c] for c in PREFERENCE_COLUMNS)):
        h.update(json.dumps(row, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights: the backbone's identity in a fit's fingerprint."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _backbone_digest(backbone) -> str:
    """A path's files (it is loaded by the trainer, after seeding) or a model object's weights."""
    if isinstance(backbone, (str, os.PathLike)):
        path = Path(backbone)
        if not path.is_dir():
            raise RewardFitError(f"backbone={os.fspath(backbone)!r} is not a directory; pass a saved model's directory or "
                                 "a model object (or nothing: the micro SFT backbone).")
        h = hashlib.sha256()
        for f in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
        return h.hexdigest()
    if not isinstance(backbone, torch.nn.Module):
        raise RewardFitError(f"backbone must be a directory or a torch model, got {type(backbone).__name__}.")
    return _model_digest(backbone)


def _texts_digest(texts: tuple[Sequence[str], Sequence[str]] | None) -> str | None:
    if texts is None:
        return None
    return hashlib.sha256(json.dumps([list(texts[0]), list(texts[1])], ensure_ascii=False).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Fitting


def is_reward_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory saved by :meth:`RewardModel.save` (it holds ``reward_config.json``)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


@quiet_transformers()
def _micro_backbone(n_layers: int | None):
    """The micro world's SFT policy cut to its first ``n_layers`` layers, and the world's tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from ..assets import load_micro_assets
    from .training import truncated_backbone

    assets = load_micro_assets()
    return truncated_backbone(assets.sft_dir, n_layers), PreTrainedTokenizerFast.from_pretrained(assets.tokenizer_dir)


def fit_reward_model(
    train_prefs,
    eval_prefs=None,
    *,
    cache_dir: str | os.PathLike | None = None,
    backbone=None,
    tokenizer=None,
    n_layers: int | None = 3,
    epochs: int = 4,
    lr: float = 3e-4,
    batch_size: int = 128,
    max_length: int = 256,
    seed: int = 0,
    device: str = "cpu",
    normalise_on: tuple[Sequence[str], Sequence[str]] | None = None,
    gold=None,
    progress: bool = False,
) -> RewardModel:
    """Fit a Bradley-Terry reward model on preference records; returns the :class:`RewardModel`.

    ``train_prefs`` / ``eval_prefs``: preference records (see :func:`as_preferences`); ``eval_prefs``
    give held-out accuracy (and, with ``gold``, a task or gold scorer, the correlation with gold).
    ``backbone``: None -> the micro SFT policy's first ``n_layers`` layers with the world's tokenizer
    (the shipped reward models' start); else a path or model for
    :func:`~.training.train_reward_model`, with its ``tokenizer``. The defaults of ``epochs``, ``lr``,
    ``batch_size`` and ``max_length`` are the shipped reward model's. ``normalise_on = (prompts,
    completions)``: shift rewards to mean 0 on them (π_ref's samples, as Gao et al.); default: the
    training completions.

    ``cache_dir``: save the model there and load it on the next call with the same records and
    settings (``rm.fit`` holds ``fit.json``: settings, digests, metrics, seconds); a cached model of
    other records or settings raises :class:`RewardFitError`. Without it nothing is written.
    """
    train_prefs = as_preferences(train_prefs, "train_prefs")
    if eval_prefs is not None:
        eval_prefs = as_preferences(eval_prefs, "eval_prefs")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RewardFitError(f"{name} must be a positive integer, got {value!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise RewardFitError(f"lr must be a positive number, got {lr!r}.")
    if backbone is None:
        if tokenizer is not None:
            raise RewardFitError("a tokenizer without a backbone: pass backbone= too, or neither (the micro SFT backbone).")
        backbone, tokenizer = _micro_backbone(n_layers)
    elif tokenizer is None:
        raise RewardFitError("backbone= needs its tokenizer=.")
    settings = {"epochs": epochs, "lr": float(lr), "batch_size": batch_size, "max_length": max_length, "seed": seed,
                "n_layers": n_layers}
    fingerprint = {"format": FIT_FORMAT, "settings": settings, "train": preferences_digest(train_prefs),
                   "n_train": len(train_prefs), "eval": preferences_digest(eval_prefs) if eval_prefs is not None else None,
                   "backbone": _backbone_digest(backbone), "normalise_on": _texts_digest(normalise_on)}
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None and (cache / FIT_FILE).is_file():
        return _load_cached(cache, fingerprint, device)

    from .reward_model import evaluate_reward_model
    from .training import train_reward_model

    t0 = time.time()
    loop_dir = cache.parent / f".{cache.name}.loop" if cache is not None else None
    rm = train_reward_model(backbone, tokenizer, train_prefs, eval_prefs, epochs=epochs, lr=lr, batch_size=batch_size,
                            device=device, seed=seed, progress=progress, max_length=max_length,
                            normalise_on=normalise_on, checkpoint_dir=loop_dir)
    metrics: dict[str, Any] = {"n_train_pairs": len(train_prefs), "seconds_train": round(time.time() - t0, 1),
                               "offset": rm.offset, "history": rm.history}
    if eval_prefs is not None:
        ev = evaluate_reward_model(rm, eval_prefs, gold=gold)
        metrics.update({"n_eval_pairs": len(eval_prefs), **{f"eval_{k}": v for k, v in ev.items()}})
    rm.fit = {**fingerprint, "metrics": _finite(metrics)}
    if cache is not None:
        with atomic_save_dir(cache) as tmp, quiet_transformers():
            rm.save(tmp)
            (tmp / FIT_FILE).write_text(json.dumps(rm.fit, indent=2) + "\n")
    return rm


def _finite(x):
    """JSON-safe: NaN and infinities become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _load_cached(cache: Path, fingerprint: dict[str, Any], device) -> RewardModel:
    saved = json.loads((cache / FIT_FILE).read_text())
    changed = sorted(k for k in fingerprint if saved.get(k) != fingerprint[k])
    if changed:
        raise RewardFitError(f"{cache} holds a reward model fitted on other records or settings (differing: "
                             f"{', '.join(changed)}); delete {cache} to fit again, or pass another cache_dir.")
    rm = RewardModel.load(cache, device=device)
    rm.fit = saved
    return rm


# ----------------------------------------------------------------------------------------------
# In an env's reward slot


class FittedReward:
    """A fitted :class:`RewardModel` as an env reward: ``score`` is the model's reward and
    ``prefer(x, a, b)`` its Bradley-Terry probability σ(r(x, a) − r(x, b)) (the only preference
    a reward model can express; the pairwise oracle Nash-learning agents would query).

    ``gym.make(id, reward_model=DIR)`` builds one from a directory saved by :func:`fit_reward_model`
    (or :meth:`RewardModel.save`) with :meth:`load`.
    """

    def __init__(self, rm: RewardModel, name: str = "fitted"):
        self.rm = rm
        self.device = rm.device
        self.name = name
        self.fit = getattr(rm, "fit", None)

    @classmethod
    def load(cls, path: str | os.PathLike, device="cpu", batch_size: int = 64) -> "FittedReward":
        if not is_reward_model_dir(path):
            raise RewardFitError(f"{path} is not a saved reward model (no {CONFIG_NAME}); fit one with "
                                 "rlhfgym.envs.feedback.fitting.fit_reward_model(..., cache_dir=PATH).")
        rm = RewardModel.load(path, device=device, batch_size=batch_size)
        fit_file = Path(path) / FIT_FILE
        rm.fit = json.loads(fit_file.read_text()) if fit_file.is_file() else None
        return cls(rm, name=Path(path).name)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        return self.rm.score(prompts, completions)

    __call__ = score

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        return torch.sigmoid(self.score(prompts, a) - self.score(prompts, b))

    def __repr__(self) -> str:
        return f"FittedReward({self.name!r})"


# ----------------------------------------------------------------------------------------------
# The build's recipe of preference data, at runtime


def _sft_samples(model, tokenizer, prompts: Sequence[str], k: int, temperatures: Sequence[float], max_new_tokens: int,
                 batch_size: int) -> tuple[list[list[str]], list[float]]:
    """``k`` completions per prompt, slot j sampled at ``temperatures[j % len(temperatures)]``
    (as the build samples); returns the completions per prompt and the temperature of each slot."""
    from ..lm import generate_text

    slots = [float(temperatures[j % len(temperatures)]) for j in range(k)]
    out: list[list[str]] = [[""] * k for _ in prompts]
    for t in dict.fromkeys(slots):
        js = [j for j, s in enumerate(slots) if s == t]
        gen = generate_text(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, temperature=t,
                            num_return_sequences=len(js), batch_size=batch_size)
        for i in range(len(prompts)):
            for r, j in enumerate(js):
                out[i][j] = gen[i * len(js) + r].strip()
    return out, slots


def _label_all_pairs(population, prompts, samples, annotators: int, rng: np.random.Generator, soft: bool):
    """Every pair of two distinct samples of a prompt, answered by ``annotators`` labelers each: the
    majority click picks ``chosen`` (a tie: the first annotator's click), ``label_prob`` is the
    annotators' mean P(chosen > rejected) (``soft``) or 1."""
    from .preferences import make_preferences

    P, A, B = [], [], []
    for x, ys in zip(prompts, samples):
        for i, j in itertools.combinations(range(len(ys)), 2):
            if ys[i] != ys[j]:
                P.append(x)
                A.append(ys[i])
                B.append(ys[j])
    if not P:
        raise RewardFitError("every pair of samples was identical; nothing to label (sample more, or hotter).")
    answers = [population.label(P, A, B, rng=rng) for _ in range(annotators)]
    clicks = np.mean([x.label for x in answers], axis=0)
    picked_a = np.where(clicks == 0.5, answers[0].label, clicks > 0.5).astype(bool)
    prob_a = np.mean([x.prob for x in answers], axis=0)
    chosen = [a if k else b for a, b, k in zip(A, B, picked_a)]
    rejected = [b if k else a for a, b, k in zip(A, B, picked_a)]
    label_prob = np.where(picked_a, prob_a, 1.0 - prob_a) if soft else np.ones(len(P))
    names = ["+".join(x.labeler_names[x.labeler_id[n]] for x in answers) for n in range(len(P))]
    return make_preferences(P, chosen, rejected, label_prob.tolist(), names)


@quiet_transformers()
def sample_labelled_pairs(
    task,
    prompts: Sequence[str],
    *,
    heldout_prompts: Sequence[str] = (),
    labelers: str = "alpacafarm",
    flip_prob: float | None = None,
    samples_per_prompt: int = 4,
    temperatures: Sequence[float] = (0.7, 1.0, 1.3),
    annotators: int = 3,
    max_new_tokens: int = 32,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 256,
    policy=None,
    tokenizer=None,
):
    """Preference records made the way the shipped reward model's were: ``samples_per_prompt`` samples
    of the SFT policy (or ``policy``, with its ``tokenizer``) per prompt, slot j at
    ``temperatures[j % len]``; every pair of two distinct samples of a prompt; ``annotators`` labelers
    of the ``labelers`` preset per training pair (soft label: their mean probability), one per
    held-out pair (a hard click, comparable with the Bayes ceiling).

    Returns ``(train, heldout, sft_t1)``: two preference ``datasets.Dataset`` (``heldout`` is None
    without ``heldout_prompts``) and ``(prompts, completions)`` of the temperature-1 slot (π_ref's own
    samples: what a reward model is centred on). Deterministic given ``seed`` on one machine.
    """
    from .labelers import LabelerPopulation

    if not prompts:
        raise RewardFitError("no prompts to sample preference pairs on.")
    if samples_per_prompt < 2:
        raise RewardFitError(f"samples_per_prompt must be at least 2 to form a pair, got {samples_per_prompt}.")
    if annotators < 1:
        raise RewardFitError(f"annotators must be at least 1, got {annotators}.")
    if policy is None:
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        from ..assets import load_micro_assets

        assets = load_micro_assets()
        policy = AutoModelForCausalLM.from_pretrained(assets.sft_dir, dtype=torch.float32).to(device).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(assets.tokenizer_dir)
    elif tokenizer is None:
        raise RewardFitError("policy= needs its tokenizer=.")
    memo: dict[tuple[str, str], dict] = {}
    components = LabelerPopulation.components_of(task)

    def components_fn(x: str, y: str) -> dict:  # each completion is judged by every annotator: compute once
        key = (x, y)
        if key not in memo:
            memo[key] = components(x, y)
        return memo[key]

    population = LabelerPopulation.preset(labelers, components_fn=components_fn, flip_prob=flip_prob)
    torch.manual_seed(seed)
    train_samples, slots = _sft_samples(policy, tokenizer, list(prompts), samples_per_prompt, temperatures,
                                        max_new_tokens, batch_size)
    held_samples = (_sft_samples(policy, tokenizer, list(heldout_prompts), samples_per_prompt, temperatures,
                                 max_new_tokens, batch_size)[0] if heldout_prompts else None)
    rng = np.random.default_rng(seed)
    train = _label_all_pairs(population, prompts, train_samples, annotators, rng, soft=True)
    heldout = (_label_all_pairs(population, heldout_prompts, held_samples, 1, rng, soft=False)
               if held_samples is not None else None)
    t1 = slots.index(1.0) if 1.0 in slots else 0
    return train, heldout, (list(prompts), [ys[t1] for ys in train_samples])
