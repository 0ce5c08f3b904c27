"""Reward and preference factories for the feedback envs, over the assets that
:mod:`rlhfgym.envs.build.feedback` builds.

Reward factories have the env's signature ``factory(task, tokenizer, device) -> reward`` where
``reward.score(prompts, completions) -> Tensor (B,)``; every reward object here also has
``prefer(prompts, a, b) -> Tensor (B,)`` = P(a > b | prompt), the pairwise oracle that Nash-learning
agents query. ``rlhfgym.envs.registration.REWARD_MODELS`` names them:

==============  ===============================================  ============================================
name            score(x, y)                                      prefer(x, a, b)
==============  ===============================================  ============================================
``learned``     Bradley-Terry RM ``reward/`` (SFT samples ~ 0)    preference model ``preference/``
``fact``        Fact-RLHF RM ``reward_fact/`` (facts prepended)   preference model ``preference/``
``judge``       judge ``judge/``: P(y > ref | x) - 1/2            the judge (mean over principles)
``intransitive`` "intransitive" labelers: P(y > ref | x) - 1/2    the "intransitive" labeler population
==============  ===============================================  ============================================

``ref`` is a fixed reference completion per prompt: by default the frozen SFT policy's *greedy*
completion (32 new tokens at most, computed once per prompt and cached), so the reward says "how
likely is this completion to beat what pi_ref would answer" (AlpacaFarm's win rate against the
reference model, minus 1/2; it is 0 for pi_ref's own greedy answer). ``reference="expert"`` etc.
use one of the world's writers instead (model-free), and ``"A"``/``"B"``/``"C"`` the
:func:`~rlhfgym.envs.tasks.news.cycle_completions` sets.

For ``intransitive`` the env's scalar reward is transitive by construction (one reference), but
``prefer`` is not: on the cycle sets P(A > B), P(B > C) and P(C > A) all exceed 1/2
(:func:`rlhfgym.envs.build.feedback.measure_preference_cycle` measures it), which no reward model can represent.

Factories find the assets through :func:`~rlhfgym.envs.assets.load_micro_assets` (checksums verified) unless
given ``root=`` (a directory with the same layout, e.g. a test build). This module imports nothing
heavy at import time and never imports gymnasium.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..hf import quiet_transformers

__all__ = [
    "REWARD_FACTORIES",
    "PREFERENCE_FACTORIES",
    "learned_reward",
    "fact_reward",
    "judge_reward",
    "intransitive_reward",
    "make_prefer",
    "ReferenceCompletions",
    "PreferenceReward",
    "BTReward",
]

# ----------------------------------------------------------------------------------------------
# finding the assets


def _component(name: str, root=None) -> Path:
    """Directory of asset component ``name`` (``reward``, ``reward_fact``, ``judge``, ``preference``, ``sft``)."""
    from ..assets import AssetError, load_micro_assets

    if root is not None:
        path = Path(root) / name
        if not path.is_dir():
            raise AssetError(
                f"{path} does not exist; build it with rlhfgym.envs.build.feedback.build_all_feedback(root={str(root)!r}) "
                "(or the single step for this component)."
            )
        return path
    return load_micro_assets().require(name)


def _tokenizer_dir(root=None) -> Path:
    return _component("tokenizer", root)


# ----------------------------------------------------------------------------------------------
# references


class ReferenceCompletions:
    """A fixed reference completion per prompt, computed in batches and cached (LRU, ``cache_size``).

    ``kind="sft"``: the frozen SFT policy's greedy completion (``max_new_tokens``); a writer name
    (``expert``, ``omitter``, ``wordy``, ``inventor``): that writer's summary of the parsed article;
    ``"A"``, ``"B"``, ``"C"``: the intransitive cycle sets. Callable on one prompt or ``batch(prompts)``.
    """

    def __init__(self, kind: str = "sft", *, task=None, device="cpu", root=None, max_new_tokens: int = 32,
                 batch_size: int = 256, cache_size: int = 100_000):
        from ..tasks.news import CYCLE_SETS, WRITERS

        if kind not in ("sft", *WRITERS, *CYCLE_SETS):
            raise ValueError(f"unknown reference {kind!r}; use 'sft', a writer ({', '.join(WRITERS)}) or a cycle set (A, B, C).")
        self.kind = kind
        self.task = task
        self.device = device
        self.root = root
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._model = self._tokenizer = None

    @quiet_transformers()
    def _sft(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

            self._tokenizer = PreTrainedTokenizerFast.from_pretrained(_tokenizer_dir(self.root))
            self._model = AutoModelForCausalLM.from_pretrained(_component("sft", self.root), dtype=torch.float32).to(self.device).eval()
        return self._model, self._tokenizer

    def _compute(self, prompts: list[str]) -> list[str]:
        if self.kind == "sft":
            from ..lm import generate_text

            model, tok = self._sft()
            return [c.strip() for c in generate_text(model, tok, prompts, max_new_tokens=self.max_new_tokens, temperature=0,
                                                batch_size=self.batch_size)]
        from ..tasks.news import Article, cycle_completions, parse_article, write_summary

        out = []
        for p in prompts:
            facts = parse_article(p)
            if not any(f.key for f in facts):
                out.append("")  # not an article of the micro world: an empty reference
                continue
            text = p.split(" tl;dr :")[0].removeprefix("summarize : ")
            article, rng = Article(facts, text), random.Random(f"reference-{self.kind}-{p}")
            out.append(cycle_completions(article, rng)[self.kind] if len(self.kind) == 1 else write_summary(article, self.kind, rng))
        return out

    def batch(self, prompts: Sequence[str]) -> list[str]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            for p, c in zip(missing, self._compute(missing)):
                self._cache[p] = c
        for p in prompts:
            self._cache.move_to_end(p)
        out = [self._cache[p] for p in prompts]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def __call__(self, prompt: str) -> str:
        return self.batch([prompt])[0]


# ----------------------------------------------------------------------------------------------
# reward objects


class PreferenceReward:
    """``score = prefer(x, y, reference(x)) - 1/2`` for a pairwise oracle ``prefer``; also exposes ``prefer``."""

    def __init__(self, prefer: Callable, reference: ReferenceCompletions, device="cpu", name: str = "preference"):
        self._prefer = prefer
        self.reference = reference
        self.device = device
        self.name = name

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]):
        import torch

        return torch.as_tensor(self._prefer(list(prompts), list(a), list(b)), dtype=torch.float32).to(self.device)

    def score(self, prompts: Sequence[str], completions: Sequence[str]):
        return self.prefer(prompts, completions, self.reference.batch(list(prompts))) - 0.5

    __call__ = score

    def __repr__(self) -> str:
        return f"PreferenceReward({self.name!r}, reference={self.reference.kind!r})"


class BTReward:
    """A learned Bradley-Terry reward model with ``prefer`` from the preference model asset (loaded on first use)."""

    def __init__(self, rm, *, root=None, device="cpu", name: str = "learned"):
        self.rm = rm
        self.root = root
        self.device = device
        self.name = name
        self._pm = None

    def score(self, prompts: Sequence[str], completions: Sequence[str]):
        return self.rm.score(prompts, completions)

    __call__ = score

    @property
    def preference_model(self):
        if self._pm is None:
            self._pm = _load_preference_model(self.root, self.device)
        return self._pm

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]):
        """The preference model's P(a > b); Bradley-Terry over this RM, σ(r(a) − r(b)), while that asset is not built."""
        import torch

        from ..assets import AssetError

        try:
            pm = self.preference_model
        except AssetError:
            return torch.sigmoid(self.score(prompts, a) - self.score(prompts, b))
        return pm.prefer(prompts, a, b)

    def __repr__(self) -> str:
        return f"BTReward({self.name!r})"


def _load_preference_model(root, device):
    from .preference_model import PreferenceModel

    pm = PreferenceModel.load(_component("preference", root), device=device, batch_size=64)
    pm.model.float()
    return pm


# ----------------------------------------------------------------------------------------------
# factories: factory(task, tokenizer, device) -> reward


def _task(task):
    if task is None:
        from ..tasks.news import NewsTask

        return NewsTask()
    return task


def learned_reward(task=None, tokenizer=None, device="cpu", *, root=None, batch_size: int = 64) -> BTReward:
    """``RewardModel.load(reward/)``: the Bradley-Terry RM of RLHF-Summarize-v0."""
    from .reward_model import RewardModel

    rm = RewardModel.load(_component("reward", root), device=device, batch_size=batch_size)
    rm.model.float()
    return BTReward(rm, root=root, device=device, name="learned")


def fact_reward(task=None, tokenizer=None, device="cpu", *, root=None, batch_size: int = 64) -> BTReward:
    """``RewardModel.load(reward_fact/)`` reading ``prepend_facts(task.facts)`` inputs (Fact-RLHF)."""
    from .reward_model import RewardModel, prepend_facts

    task = _task(task)
    if not hasattr(task, "facts"):
        raise TypeError(f"the fact reward model needs a task with facts(prompt) (the micro news world), got {type(task).__name__}.")
    rm = RewardModel.load(_component("reward_fact", root), device=device, format_input=prepend_facts(task.facts), batch_size=batch_size)
    rm.model.float()
    return BTReward(rm, root=root, device=device, name="fact")


def judge_reward(task=None, tokenizer=None, device="cpu", *, root=None, reference: str = "sft", clamp=None,
                 constitution=None, batch_size: int = 64) -> PreferenceReward:
    """The constitution judge (``judge/``, envs/constitutions/micro.yaml): P(y > ref) - 1/2, ``prefer`` = the judge."""
    from .judge import load_judge

    judge = load_judge(_component("judge", root), device, constitution=constitution, clamp=clamp, batch_size=batch_size)
    ref = ReferenceCompletions(reference, task=_task(task), device=device, root=root)
    judge.reference = ref
    out = PreferenceReward(judge.prefer, ref, device=device, name="judge")
    out.judge = judge
    return out


def intransitive_reward(task=None, tokenizer=None, device="cpu", *, root=None, reference: str = "sft",
                        temperature: float | None = None, flip_prob: float | None = None) -> PreferenceReward:
    """The ``"intransitive"`` labeler population: reward P(y > ref) - 1/2 (expected over labelers and
    label noise), ``prefer`` = the population's P(a > b), whose majority cycles."""
    from .labelers import LabelerPopulation

    task = _task(task)
    pop = LabelerPopulation.preset("intransitive", task, temperature=temperature, flip_prob=flip_prob)
    ref = ReferenceCompletions(reference, task=task, device=device, root=root)
    out = PreferenceReward(pop.population_prob, ref, device=device, name="intransitive")
    out.population = pop
    return out


REWARD_FACTORIES: dict[str, Callable[..., Any]] = {
    "learned": learned_reward,
    "fact": fact_reward,
    "judge": judge_reward,
    "intransitive": intransitive_reward,
}


# ----------------------------------------------------------------------------------------------
# pairwise oracles for Nash learning: factory(task, tokenizer, device) -> prefer(prompts, a, b)


def _learned_prefer(task=None, tokenizer=None, device="cpu", *, root=None):
    return _load_preference_model(root, device).prefer


def _judge_prefer(task=None, tokenizer=None, device="cpu", *, root=None):
    from .judge import load_judge

    return load_judge(_component("judge", root), device).prefer


def _population_prefer(preset: str):
    def factory(task=None, tokenizer=None, device="cpu", *, root=None):
        import torch

        from .labelers import LabelerPopulation

        pop = LabelerPopulation.preset(preset, _task(task))

        def prefer(prompts, a, b):
            return torch.as_tensor(pop.population_prob(list(prompts), list(a), list(b)), dtype=torch.float32).to(device)

        return prefer

    factory.__name__ = f"{preset}_prefer"
    return factory


PREFERENCE_FACTORIES: dict[str, Callable[..., Any]] = {
    "learned": _learned_prefer,
    "fact": _learned_prefer,  # the preference model reads the pair; there is no fact variant
    "judge": _judge_prefer,
    "intransitive": _population_prefer("intransitive"),
    "alpacafarm": _population_prefer("alpacafarm"),
    "gold": _population_prefer("gold"),
}


def make_prefer(name: str, task=None, tokenizer=None, device="cpu", *, root=None):
    """The pairwise oracle ``prefer(prompts, a, b) -> Tensor (B,)`` named ``name`` (see :data:`PREFERENCE_FACTORIES`)."""
    if name not in PREFERENCE_FACTORIES:
        raise ValueError(f"unknown preference oracle {name!r}; use one of {sorted(PREFERENCE_FACTORIES)}.")
    return PREFERENCE_FACTORIES[name](task, tokenizer, device, root=root)
