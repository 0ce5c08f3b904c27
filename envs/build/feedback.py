"""Build the micro world's feedback assets: preference data, reward models, preference model, judge.

The steps run after :func:`~.sft.build_assets` (which wrote ``tokenizer/`` and ``sft/``) and
write next to them in the same asset root (default: the package's ``envs/assets/micro-v0``)::

    reward/        Bradley-Terry reward model (RLHF-Summarize-v0)                 build_reward_model
    reward_fact/   the same, reading the article's key facts first (Fact-RLHF)    build_fact_reward_model
    preference/    two-argument preference model P(y > y' | x) (Nash learning)    build_preference_model
    judge/         constitution judge LM (RLAIF, RLHF-Summarize-AIF-v0)            build_judge
    feedback_metrics.json                                                          build_all_feedback

1. :func:`build_preference_data`: the frozen SFT policy samples ``samples_per_prompt`` completions
   per training prompt (temperatures cycling through ``temperatures``, e.g. 0.7/1.0/1.3, for a
   spread of quality); every two distinct samples of a prompt form a pair (``pairing="all"``: 6
   pairs from 4 samples, and the reward model's trainer scores each sample once per step), and
   ``annotators_per_pair`` (default 3) labelers of the ``"alpacafarm"``
   :class:`~rlhfgym.envs.feedback.labelers.LabelerPopulation` (four labeler types, 25% label flips) answer each
   comparison from the task's gold components. Held-out pairs come the same way from validation
   prompts, with one click each; their Bayes ceiling (exact and on a fresh label draw) bounds any
   model's accuracy. The records stay in memory (:class:`PreferenceData`); ``data_dir=`` also writes them
   as JSONL in our preference schema (readable by
   :func:`~rlhfgym.envs.feedback.preferences.load_preferences`), never
   into the asset root (40k records would break the size budget).
2. Reward models start from the SFT backbone (its first ``n_layers`` layers, see below), train on
   the soft labels (the annotators' mean probability, Constitutional-AI style) with the
   Bradley-Terry loss, and are shifted so SFT samples (temperature 1) score 0 on average. Held-out
   accuracy is measured against the sampled (hard) clicks and compared with the Bayes ceiling.
3. The preference model reads both completions (antisymmetric by construction).
4. The judge is a causal LM trained to answer the constitution judge's multiple-choice question
   (:data:`~rlhfgym.envs.feedback.judge.DEFAULT_TEMPLATE`, answers "A"/"B") for every principle of
   ``envs/constitutions/micro.yaml``. Its targets come from *principle checkers*: principle
   ``coverage`` compares the gold component ``coverage``, ``faithfulness`` -> ``faithfulness``,
   ``relevance`` -> ``distractor``, ``brevity`` -> ``brevity`` (1 if A's component is higher, 0 if
   lower, 1/2 on a tie). Every pair is asked under every principle in both orders, so the only way
   to fit the targets is to read the principle text and to read the options, not their position.
   The world tokenizer has no "(", "A", "B" or the constitution's words, so the judge asset
   carries its own tokenizer: the world's word-level vocabulary with the same ids plus every word of
   the template, the constitution and the answer tokens appended (new embedding rows start at the
   mean of the old ones). Words outside that vocabulary (a new principle in other words) read as
   ``<unk>``.

Size: the four extra models must fit beside the 9.7 MB SFT model in 25 MB. Each keeps the first
``n_layers`` (default 3 of 4) layers of the SFT backbone and is stored as float16 safetensors with
``"dtype": "float32"`` in its ``config.json``, so ``from_pretrained`` loads it back as float32
(about 3.7 MB each). Metrics are computed on the float16-rounded weights, i.e. on exactly the model
that loads back.

Nothing here imports ``datasets`` or ``gymnasium`` (the build machine has neither).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..assets import FEEDBACK_COMPONENTS, asset_dir, atomic_save_dir, atomic_write_text
from ..feedback.judge import JUDGE_CONFIG, load_judge
from ..feedback.labelers import COMPONENTS, LabelerPopulation
from ..tasks.news import CYCLE_SETS, WRITERS, NewsTask, cycle_completions, gold_score
from ..feedback.training import truncated_backbone
from .training import train_judge_lm

__all__ = [
    "PRINCIPLE_COMPONENT",
    "CYCLE_SETS",
    "JUDGE_CONFIG",
    "PreferenceRecords",
    "PairSet",
    "PreferenceData",
    "build_preference_data",
    "build_reward_model",
    "build_fact_reward_model",
    "build_reward_from_preferences",
    "build_preference_model",
    "build_judge",
    "build_all_feedback",
    "cycle_completions",
    "measure_preference_cycle",
    "constructed_pairs",
    "CONSTRUCTED_PAIRS",
    "truncated_backbone",
    "extend_tokenizer",
    "judge_words",
    "checker_verdicts",
    "judge_examples",
    "train_judge_lm",
    "load_judge",
    "default_root",
    "asset_bytes",
    "SIZE_LIMIT_BYTES",
    "FEEDBACK_STEPS",
    "headline_metrics",
]

#: which gold component each principle of envs/constitutions/micro.yaml checks
PRINCIPLE_COMPONENT = {"coverage": "coverage", "faithfulness": "faithfulness", "relevance": "distractor", "brevity": "brevity"}
REWARD_FACT_DIR = "reward_fact"
METRICS_NAME = "feedback_metrics.json"
#: the model-building steps of :func:`build_all_feedback`, in build order: one per feedback asset component
FEEDBACK_STEPS = FEEDBACK_COMPONENTS
#: all assets of a version together (tokenizer, sft and the feedback models)
SIZE_LIMIT_BYTES = 25_000_000
_EPS = 1e-9


def default_root() -> Path:
    """The package's ``envs/assets/micro-v0`` (where build_assets wrote tokenizer/ and sft/)."""
    return asset_dir("micro-v0", must_exist=False)


def _root(root) -> Path:
    root = Path(root) if root is not None else default_root()
    for part in ("tokenizer", "sft"):
        if not (root / part).is_dir():
            raise FileNotFoundError(
                f"{root / part} is missing: the feedback assets start from the SFT policy; "
                f"build it first with `rlhf-zoo build-assets --out {root}` (or pass the right root=)."
            )
    return root


def _log(progress: bool, msg: str) -> None:
    if progress:
        tqdm.write(msg)


# ----------------------------------------------------------------------------------------------
# Preference records without `datasets`


class PreferenceRecords:
    """Preference records in our schema (:mod:`rlhfgym.envs.feedback.preferences`), held as plain lists.

    Indexing by a column name returns that column (``records["prompt"]``) and ``len()`` is the
    number of records, which is all that :func:`~.training.train_reward_model`,
    :func:`~.training.train_preference_model` and their evaluators read, so the build never
    needs ``datasets``. :meth:`to_dataset` converts (importing ``datasets`` only then).
    """

    COLUMNS = ("prompt", "chosen", "rejected", "label_prob", "labeler_id")

    def __init__(self, prompt, chosen, rejected, label_prob, labeler_id):
        cols = [list(prompt), list(chosen), list(rejected), [float(p) for p in label_prob], [str(x) for x in labeler_id]]
        if len({len(c) for c in cols}) != 1:
            raise ValueError(f"mismatched column lengths {[len(c) for c in cols]}; give one value per record in each column.")
        self._cols = dict(zip(self.COLUMNS, cols))

    def __len__(self) -> int:
        return len(self._cols["prompt"])

    def __getitem__(self, column: str) -> list:
        if column not in self._cols:
            raise KeyError(f"no column {column!r}; columns are {', '.join(self.COLUMNS)}.")
        return self._cols[column]

    @property
    def column_names(self) -> list[str]:
        return list(self.COLUMNS)

    def select(self, indices: Sequence[int]) -> "PreferenceRecords":
        return PreferenceRecords(*([col[i] for i in indices] for col in self._cols.values()))

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(zip(self.COLUMNS, row)) for row in zip(*self._cols.values())]

    def to_jsonl(self, path) -> Path:
        """One JSON record per line in our schema (atomic); :func:`~rlhfgym.envs.feedback.preferences.load_preferences` reads it."""
        lines = [json.dumps(r, ensure_ascii=False) for r in self.to_list()]
        return atomic_write_text(path, "\n".join(lines) + "\n")

    def to_dataset(self):
        """A ``datasets.Dataset`` with :data:`~rlhfgym.envs.feedback.preferences.FEATURES` (imports ``datasets``)."""
        from ..feedback.preferences import make_preferences

        c = self._cols
        return make_preferences(c["prompt"], c["chosen"], c["rejected"], c["label_prob"], c["labeler_id"])

    def __repr__(self) -> str:
        return f"PreferenceRecords(n={len(self)})"


@dataclass
class PairSet:
    """Compared pairs (prompt, a, b) with their gold components and one sampled label each.

    ``comp_a``/``comp_b``: (N, 4) gold components in :data:`~rlhfgym.envs.feedback.labelers.COMPONENTS` order.
    ``p_pop``: P(a > b) for a labeler drawn from the population (label noise included).
    ``prob``: P(a > b) for the labeler that answered; ``label``: 1 if that labeler picked a.
    """

    prompts: list[str]
    a: list[str]
    b: list[str]
    comp_a: np.ndarray
    comp_b: np.ndarray
    p_pop: np.ndarray
    prob: np.ndarray
    label: np.ndarray
    labeler: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def gold_a(self) -> np.ndarray:
        return np.clip(self.comp_a.sum(1), -1.0, 1.0)

    @property
    def gold_b(self) -> np.ndarray:
        return np.clip(self.comp_b.sum(1), -1.0, 1.0)

    def records(self, soft: bool) -> PreferenceRecords:
        """``chosen`` = the completion the sampled label picked. ``soft=True``: ``label_prob`` is the
        answering labeler's P(chosen > rejected) (training); ``soft=False``: 1.0, the click itself
        (held-out evaluation, comparable with the Bayes ceiling)."""
        picked_a = self.label.astype(bool)
        chosen = [x if pa else y for x, y, pa in zip(self.a, self.b, picked_a)]
        rejected = [y if pa else x for x, y, pa in zip(self.a, self.b, picked_a)]
        label_prob = np.where(picked_a, self.prob, 1.0 - self.prob) if soft else np.ones(len(self))
        return PreferenceRecords(self.prompts, chosen, rejected, label_prob.tolist(), self.labeler)


class PreferenceData(dict):
    """The result of :func:`build_preference_data`: a metrics dict that also carries the data.

    The dict holds the JSON-able metrics; the attributes hold the in-memory records the later
    steps train on: ``train`` / ``heldout`` (:class:`PairSet`), ``sft_train`` / ``sft_heldout``
    (prompts and temperature-1 SFT samples, for normalising rewards and correlating with gold),
    ``train_indices`` (indices of the train prompts in the task's train split) and ``components``
    (a memo of gold components).
    """

    train: PairSet
    heldout: PairSet
    sft_train: tuple[list[str], list[str]]
    sft_heldout: tuple[list[str], list[str]]
    train_indices: list[int]
    components: "_Memo"
    task: NewsTask

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self)


class _Memo:
    """Memoised ``task.gold_components`` (each completion is labelled, checked and scored again)."""

    def __init__(self, fn: Callable[[str, str], dict]):
        self.fn = fn
        self.cache: dict[tuple[str, str], dict] = {}

    def __call__(self, prompt: str, completion: str) -> dict:
        key = (prompt, completion)
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = self.fn(prompt, completion)
        return hit

    def array(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.array([[self(p, c)[k] for k in COMPONENTS] for p, c in zip(prompts, completions)], dtype=np.float64).reshape(
            len(prompts), len(COMPONENTS)
        )


# ----------------------------------------------------------------------------------------------
# The world: tokenizer, SFT policy (truncated backbones: rlhfgym.envs.feedback.training)


def _load_tokenizer(root: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    tok.padding_side = "left"
    return tok


def _load_sft(root: Path, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "sft", dtype=torch.float32).to(device).eval()


def _round_fp16_(model) -> None:
    """Round every float parameter to float16 values (kept in float32): the model that loads back."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def _store_fp16(model_dir: Path, model, save=None) -> None:
    """Save ``model`` into ``model_dir`` as float16 safetensors whose config says float32.

    ``save(model_dir)`` writes the files (default ``model.save_pretrained``; a reward or preference
    model passes its own ``save``, which adds the tokenizer and its config)."""
    model.half()
    try:
        (save or model.save_pretrained)(model_dir)
    finally:
        model.float()
    cfg_path = Path(model_dir) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"  # from_pretrained upcasts the float16 weights on load
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _json(obj: Any) -> str:
    """Strict JSON (NaN and infinities become null), indented, with a final newline."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        return x

    return json.dumps(clean(obj), indent=2, allow_nan=False) + "\n"


def _make_readable(directory: Path) -> None:
    """Shipped assets must be world-readable; some writers (safetensors) create files 0600."""
    for p in Path(directory).rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def asset_bytes(root) -> int:
    """Total size of the files an asset manifest would list (hidden names and caches skipped)."""
    total = 0
    for p in Path(root).rglob("*"):
        rel = p.relative_to(root).parts
        if p.is_file() and not any(s.startswith(".") or s == "__pycache__" for s in rel) and rel != ("manifest.json",):
            total += p.stat().st_size
    return total


# ----------------------------------------------------------------------------------------------
# Sampling from the SFT policy


def _sample(model, tokenizer, prompts, k, temperatures, max_new_tokens, batch_size, progress, desc):
    """``k`` completions per prompt; slot j is sampled at ``temperatures[j % len(temperatures)]``.
    Returns (completions per prompt, temperature per slot)."""
    from ..lm import generate_text as generate

    slots = [float(temperatures[j % len(temperatures)]) for j in range(k)]
    out: list[list[str | None]] = [[None] * k for _ in prompts]
    chunk = max(1, batch_size)
    bar = tqdm(total=len(prompts) * k, desc=desc, disable=not progress, leave=False)
    for t in dict.fromkeys(slots):
        js = [j for j, s in enumerate(slots) if s == t]
        for s in range(0, len(prompts), chunk):
            part = prompts[s : s + chunk]
            gen = generate(model, tokenizer, part, max_new_tokens=max_new_tokens, temperature=t,
                           num_return_sequences=len(js), batch_size=chunk)
            for i in range(len(part)):
                for r, j in enumerate(js):
                    out[s + i][j] = gen[i * len(js) + r].strip()
            bar.update(len(part) * len(js))
    bar.close()
    return out, slots


def _pairs(prompts, samples, pairing: str = "all"):
    """Pairs of samples of one prompt: ``"all"`` k(k-1)/2 of them, ``"consecutive"`` (0,1), (2,3), ...
    Identical pairs are dropped (and counted)."""
    if pairing not in ("all", "consecutive"):
        raise ValueError(f"pairing must be 'all' or 'consecutive', got {pairing!r}.")
    P, A, B, dropped = [], [], [], 0
    for x, ys in zip(prompts, samples):
        if pairing == "all":
            idx = itertools.combinations(range(len(ys)), 2)
        else:
            idx = ((j, j + 1) for j in range(0, len(ys) - 1, 2))
        for i, j in idx:
            if ys[i] == ys[j]:
                dropped += 1
                continue
            P.append(x)
            A.append(ys[i])
            B.append(ys[j])
    return P, A, B, dropped


def _label(pop: LabelerPopulation, memo: _Memo, P, A, B, rng, annotators: int = 1) -> PairSet:
    """Each pair answered by ``annotators`` labelers drawn from ``pop``. With several, ``prob`` is
    their mean probability (the soft label; the Bradley-Terry loss is linear in it, so this equals
    training on each answer), ``label`` their majority click (ties: the first annotator's)."""
    answers = [pop.label(P, A, B, rng=rng) for _ in range(annotators)]
    first = answers[0]
    clicks = np.mean([x.label for x in answers], axis=0)
    label = np.where(clicks == 0.5, first.label, clicks > 0.5).astype(np.int64)
    names = ["+".join(first.labeler_names[x.labeler_id[j]] for x in answers) for j in range(len(P))]
    return PairSet(
        prompts=list(P), a=list(A), b=list(B), comp_a=memo.array(P, A), comp_b=memo.array(P, B),
        p_pop=first.prob_population, prob=np.mean([x.prob for x in answers], axis=0), label=label, labeler=names,
    )


def build_preference_data(
    root=None,
    device: str = "cpu",
    seed: int = 0,
    *,
    n_train_prompts: int = 20_000,
    n_heldout_prompts: int = 2_000,
    samples_per_prompt: int = 4,
    pairing: str = "all",
    annotators_per_pair: int = 3,
    temperatures: Sequence[float] = (0.7, 1.0, 1.3),
    max_new_tokens: int = 32,
    gen_batch_size: int = 2048,
    population: str = "alpacafarm",
    flip_prob: float = 0.25,
    data_dir=None,
    progress: bool = True,
) -> PreferenceData:
    """Sample, pair and label SFT completions; returns a :class:`PreferenceData` (metrics + records).

    Train prompts are ``n_train_prompts`` random prompts of the train split (seeded); held-out
    prompts are the first ``n_heldout_prompts`` of the validation split. ``data_dir``: also write
    ``train.jsonl`` (soft labels) and ``heldout.jsonl`` (hard labels) there (atomic). Nothing is
    written into the asset root.
    """
    t0 = time.time()
    root = _root(root)
    if annotators_per_pair < 1:
        raise ValueError(f"annotators_per_pair must be >= 1, got {annotators_per_pair}.")
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2 to form pairs, got {samples_per_prompt}.")
    task = NewsTask(seed=0)
    n_val = min(n_heldout_prompts, task.split_size("validation"))
    rng = random.Random(seed)
    train_idx = sorted(rng.sample(range(task.split_size("train")), n_train_prompts))
    train_prompts = [task.prompt("train", i) for i in train_idx]
    val_prompts = task.prompts("validation", n_val)

    tokenizer = _load_tokenizer(root)
    model = _load_sft(root, device)
    torch.manual_seed(seed)
    tr_samples, slots = _sample(model, tokenizer, train_prompts, samples_per_prompt, temperatures, max_new_tokens,
                                gen_batch_size, progress, "sample train")
    va_samples, _ = _sample(model, tokenizer, val_prompts, samples_per_prompt, temperatures, max_new_tokens,
                            gen_batch_size, progress, "sample held-out")
    del model
    t_gen = time.time() - t0

    memo = _Memo(task.gold_components)
    pop = LabelerPopulation.preset(population, components_fn=memo, flip_prob=flip_prob)
    label_rng = np.random.default_rng(seed)
    P, A, B, drop_tr = _pairs(train_prompts, tr_samples, pairing)
    train = _label(pop, memo, P, A, B, label_rng, annotators_per_pair)
    P, A, B, drop_va = _pairs(val_prompts, va_samples, pairing)
    heldout = _label(pop, memo, P, A, B, label_rng)  # one click each: comparable with the Bayes ceiling
    ceiling = pop.bayes_ceiling(heldout.prompts, heldout.a, heldout.b, rng=np.random.default_rng(seed + 10_007))

    t1_slot = slots.index(1.0) if 1.0 in slots else 0

    def at_t1(prompts, samples):
        return list(prompts), [ys[t1_slot] for ys in samples]

    data = PreferenceData()
    data.task = task
    data.train, data.heldout, data.components = train, heldout, memo
    data.sft_train, data.sft_heldout = at_t1(train_prompts, tr_samples), at_t1(val_prompts, va_samples)
    data.train_indices = train_idx

    gold_by_t = {}
    for j, t in enumerate(slots):
        if f"{t:g}" not in gold_by_t:
            gold_by_t[f"{t:g}"] = float(np.mean([gold_score(x, ys[j]) for x, ys in zip(val_prompts, va_samples)]))
    data.update({
        "population": population,
        "flip_prob": flip_prob,
        "n_train_prompts": len(train_prompts),
        "n_heldout_prompts": len(val_prompts),
        "samples_per_prompt": samples_per_prompt,
        "pairing": pairing,
        "annotators_per_pair": annotators_per_pair,
        "temperatures": [float(t) for t in slots],
        "n_train_pairs": len(train),
        "n_heldout_pairs": len(heldout),
        "identical_pairs_dropped": drop_tr + drop_va,
        "heldout_gold_by_temperature": gold_by_t,
        "sft_sample_temperature": slots[t1_slot],  # the samples that set the reward offset and the correlations
        "train_label_a_rate": float(train.label.mean()) if len(train) else float("nan"),
        "heldout_tie_rate": float(np.mean(np.abs(heldout.p_pop - 0.5) < 1e-12)) if len(heldout) else float("nan"),
        "bayes_ceiling": {"exact": ceiling.exact, "exact_known_labeler": ceiling.exact_known_labeler,
                          "empirical": ceiling.empirical, "stderr": ceiling.stderr, "n": ceiling.n},
        "seconds_sampling": round(t_gen, 1),
        "seconds": round(time.time() - t0, 1),
    })
    if data_dir is not None:
        d = Path(data_dir)
        train.records(soft=True).to_jsonl(d / "train.jsonl")
        heldout.records(soft=False).to_jsonl(d / "heldout.jsonl")
        data["data_dir"] = str(d)
    _log(progress, f"preference data: {len(train)} train / {len(heldout)} held-out pairs, "
                   f"Bayes ceiling {ceiling.exact:.3f} (empirical {ceiling.empirical:.3f}) in {data['seconds']}s")
    return data


def _data(data, root, device, seed, progress) -> PreferenceData:
    if data is None:
        _log(progress, "no preference data given: building it at full scale (pass data=build_preference_data(...) to reuse)")
        return build_preference_data(root, device, seed, progress=progress)
    if not isinstance(data, PreferenceData):
        raise TypeError(f"data must be what build_preference_data returned, got {type(data).__name__}.")
    return data


# ----------------------------------------------------------------------------------------------
# Reward models


def _ceiling_ratio(acc: float, data: PreferenceData) -> float:
    c = data["bayes_ceiling"]["exact"]
    return float(acc / c) if c > 0 else float("nan")


def build_reward_model(
    root=None,
    device: str = "cpu",
    seed: int = 0,
    *,
    data: PreferenceData | None = None,
    facts: bool = False,
    epochs: int = 4,
    lr: float = 3e-4,
    batch_size: int = 128,
    n_layers: int | None = 3,
    soft_labels: bool = True,
    n_normalise: int = 4096,
    checkpoint_dir=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the Bradley-Terry reward model into ``root/"reward"`` (``facts=True``: ``root/"reward_fact"``,
    the input starts with the article's key facts, :func:`~rlhfgym.envs.feedback.reward_model.prepend_facts`).
    Returns metrics. ``checkpoint_dir``: resumable snapshots of the training loop
    (:class:`~.checkpoint.LoopCheckpoint`)."""
    from transformers import PreTrainedTokenizerFast

    from ..feedback.ratings import pearson, spearman
    from ..feedback.reward_model import evaluate_reward_model, prepend_facts
    from .training import train_reward_model

    t0 = time.time()
    root = _root(root)
    data = _data(data, root, device, seed, progress)
    task = data.task
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    fmt = prepend_facts(task.facts) if facts else None
    backbone = truncated_backbone(root / "sft", n_layers)
    train = data.train.records(soft=soft_labels)
    heldout = data.heldout.records(soft=False)
    norm_p, norm_c = data.sft_train
    norm = (norm_p[:n_normalise], norm_c[:n_normalise])
    rm = train_reward_model(
        backbone, tokenizer, train, heldout, epochs=epochs, lr=lr, batch_size=batch_size, device=device,
        seed=seed, progress=progress, format_input=fmt, max_length=256, normalise_on=norm, checkpoint_dir=checkpoint_dir,
    )
    t_train = time.time() - t0
    _round_fp16_(rm.model)
    rm.normalise(*norm)
    ev = evaluate_reward_model(rm, heldout, gold=task)
    vp, vc = data.sft_heldout
    r = rm.score(vp, vc).double().cpu().numpy()
    g = np.array(task.gold(vp, vc))
    metrics = {
        "facts": facts,
        "n_layers": rm.model.config.num_hidden_layers,
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "soft_labels": soft_labels,
        "n_train_pairs": len(train),
        "heldout_accuracy": ev["accuracy"],
        "bayes_ceiling": data["bayes_ceiling"]["exact"],
        "accuracy_over_ceiling": _ceiling_ratio(ev["accuracy"], data),
        "heldout_majority_agreement": _majority_agreement(_rm_prefers_a(rm, data.heldout), data.heldout),
        "heldout_gold_pair_accuracy": ev["gold_pair_accuracy"],
        "heldout_loss": ev["loss"],
        "sft_t1_pearson": pearson(r, g),
        "sft_t1_spearman": spearman(r, g),
        "sft_t1_reward_mean": float(r.mean()),
        "sft_t1_reward_std": float(r.std()),
        "offset": rm.offset,
        "history": rm.history,
        "train_steps": epochs * math.ceil(len(train) / batch_size),
        "seconds_train": round(t_train, 1),
    }
    name = REWARD_FACT_DIR if facts else "reward"
    with atomic_save_dir(root / name) as tmp:
        _store_fp16(tmp, rm.model, save=rm.save)
        metrics["seconds"] = round(time.time() - t0, 1)
        (tmp / "build_metrics.json").write_text(_json(metrics))
        _make_readable(tmp)
    _log(progress, f"{name}: held-out accuracy {ev['accuracy']:.3f} = {metrics['accuracy_over_ceiling']:.1%} of the "
                   f"ceiling, Spearman with gold {metrics['sft_t1_spearman']:.3f} ({metrics['seconds']}s)")
    return metrics


def _majority_agreement(a_wins: np.ndarray, pairs: PairSet) -> float:
    """How often a model's verdict ``a_wins`` (a > b) agrees with the population's majority (p_pop > 1/2), ties skipped."""
    decided = np.abs(pairs.p_pop - 0.5) > 1e-12
    if not decided.any():
        return float("nan")
    return float((a_wins == (pairs.p_pop > 0.5))[decided].mean())


def _rm_prefers_a(rm, pairs: PairSet) -> np.ndarray:
    from ..feedback.reward_model import pair_scores

    ra, rb = pair_scores(rm, {"prompt": pairs.prompts, "chosen": pairs.a, "rejected": pairs.b})
    return (ra > rb).numpy()


def build_reward_from_preferences(
    root,
    url: str,
    device: str = "cpu",
    seed: int = 0,
    *,
    heldout_fraction: float = 0.1,
    epochs: int = 4,
    lr: float = 3e-4,
    batch_size: int = 32,
    n_layers: int | None = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the Bradley-Terry reward model on the labels of a labeling database (``rlhf-zoo label``)
    into ``root/"reward"``, as :func:`build_reward_model` does on simulated labels: same backbone (the
    SFT policy's first ``n_layers`` layers), loss and fp16 storage. A seeded ``heldout_fraction`` of
    the records (at least one when there are ten or more) is held out for accuracy; rewards are
    shifted to mean 0 on the labelled completions. Returns metrics (also in ``reward/build_metrics.json``)."""
    from transformers import PreTrainedTokenizerFast

    from ..feedback.reward_model import evaluate_reward_model
    from ..feedback.store import PreferenceStore, StoreError, describe_url
    from .training import train_reward_model

    t0 = time.time()
    root = _root(root)
    with PreferenceStore(url, create=False) as store:
        rows = store.preference_records()
    if not rows:
        where = describe_url(url)
        raise StoreError(f"{where} has no answered labels yet (skips do not count); label some with `rlhf-zoo label --db {where}`.")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(len(rows) * heldout_fraction)) if len(rows) >= 10 else 0
    cols = PreferenceRecords.COLUMNS

    def records(idx):
        return PreferenceRecords(*([rows[i][c] for i in idx] for c in cols))

    train, heldout = records(order[n_held:]), records(order[:n_held])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    norm = (train["prompt"] * 2, train["chosen"] + train["rejected"])
    rm = train_reward_model(truncated_backbone(root / "sft", n_layers), tokenizer, train, heldout if len(heldout) else None,
                            epochs=epochs, lr=lr, batch_size=batch_size, device=device, seed=seed, progress=progress,
                            max_length=256, normalise_on=norm)
    _round_fp16_(rm.model)
    rm.normalise(*norm)
    ev = evaluate_reward_model(rm, heldout) if len(heldout) else {}
    metrics = {
        "source": "labeling database", "n_records": len(rows), "n_train_pairs": len(train), "n_heldout_pairs": len(heldout),
        "heldout_accuracy": ev.get("accuracy"), "heldout_loss": ev.get("loss"),
        "n_layers": rm.model.config.num_hidden_layers, "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "offset": rm.offset, "history": rm.history, "seconds_train": round(time.time() - t0, 1),
    }
    with atomic_save_dir(root / "reward") as tmp:
        _store_fp16(tmp, rm.model, save=rm.save)
        metrics["seconds"] = round(time.time() - t0, 1)
        (tmp / "build_metrics.json").write_text(_json(metrics))
        _make_readable(tmp)
    acc = "n/a (fewer than 10 labels)" if ev.get("accuracy") is None else f"{ev['accuracy']:.3f}"
    _log(progress, f"reward (from {len(rows)} labels of the database): held-out accuracy {acc} ({metrics['seconds']}s)")
    return metrics


def build_fact_reward_model(root=None, device: str = "cpu", seed: int = 0, **kwargs) -> dict[str, Any]:
    """:func:`build_reward_model` with the key facts prepended (Fact-RLHF) into ``root/"reward_fact"``."""
    return build_reward_model(root, device, seed, facts=True, **kwargs)


# ----------------------------------------------------------------------------------------------
# Preference model


def build_preference_model(
    root=None,
    device: str = "cpu",
    seed: int = 0,
    *,
    data: PreferenceData | None = None,
    epochs: int = 2,
    lr: float = 3e-4,
    batch_size: int = 128,
    n_layers: int | None = 3,
    soft_labels: bool = True,
    max_pairs: int | None = None,
    checkpoint_dir=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the two-argument preference model into ``root/"preference"``; returns metrics.

    ``max_pairs``: train on a seeded random subset of that many train pairs. The model reads both
    completions at once, so unlike the reward model it cannot share a sequence between the pairs
    of a prompt: each pair costs two full passes."""
    from transformers import PreTrainedTokenizerFast

    from ..feedback.preference_model import evaluate_preference_model
    from .training import train_preference_model

    t0 = time.time()
    root = _root(root)
    data = _data(data, root, device, seed, progress)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    backbone = truncated_backbone(root / "sft", n_layers)
    train = data.train.records(soft=soft_labels)
    if max_pairs is not None and max_pairs < len(train):
        train = train.select(sorted(random.Random(seed).sample(range(len(train)), max_pairs)))
    heldout = data.heldout.records(soft=False)
    pm = train_preference_model(backbone, tokenizer, train, heldout, epochs=epochs, lr=lr, batch_size=batch_size,
                                device=device, seed=seed, progress=progress, max_prompt_tokens=128, max_completion_tokens=48,
                                checkpoint_dir=checkpoint_dir)
    t_train = time.time() - t0
    _round_fp16_(pm.model)
    ev = evaluate_preference_model(pm, heldout)
    h = data.heldout
    p = pm.prefer(h.prompts, h.a, h.b).double().cpu().numpy()
    metrics = {
        "n_layers": pm.model.config.num_hidden_layers,
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "soft_labels": soft_labels,
        "n_train_pairs": len(train),
        "heldout_accuracy": ev["accuracy"],
        "bayes_ceiling": data["bayes_ceiling"]["exact"],
        "accuracy_over_ceiling": _ceiling_ratio(ev["accuracy"], data),
        "heldout_majority_agreement": _majority_agreement(p > 0.5, h),
        "heldout_prob_mae": float(np.mean(np.abs(p - h.p_pop))) if len(h) else float("nan"),
        "heldout_loss": ev["loss"],
        "history": pm.history,
        "train_steps": epochs * math.ceil(len(train) / batch_size),
        "seconds_train": round(t_train, 1),
    }
    with atomic_save_dir(root / "preference") as tmp:
        _store_fp16(tmp, pm.model, save=pm.save)
        metrics["seconds"] = round(time.time() - t0, 1)
        (tmp / "build_metrics.json").write_text(_json(metrics))
        _make_readable(tmp)
    _log(progress, f"preference: held-out accuracy {ev['accuracy']:.3f} = {metrics['accuracy_over_ceiling']:.1%} of the ceiling "
                   f"({metrics['seconds']}s)")
    return metrics


# ----------------------------------------------------------------------------------------------
# Constructed completions: writers and the intransitive cycle




def _constructed(task: NewsTask, split: str, index: int, rng: random.Random) -> dict[str, str]:
    """Writer summaries and the cycle sets of one article (for judge training and tests)."""
    article = task.example(split, index)
    out = {w: task.reference(split, index, w) for w in WRITERS}
    out.update({f"cycle_{k}": v for k, v in cycle_completions(article, rng).items()})
    return out


#: pairs of constructed summaries on which the principles disagree (see :func:`constructed_pairs`)
CONSTRUCTED_PAIRS = (("cycle_A", "cycle_B"), ("cycle_B", "cycle_C"), ("cycle_C", "cycle_A"),
                     ("expert", "omitter"), ("expert", "wordy"), ("expert", "inventor"))


def constructed_pairs(task: NewsTask, split: str, n: int, seed: int = 0, population: str = "alpacafarm") -> "PairSet":
    """:data:`CONSTRUCTED_PAIRS` on the first ``n`` prompts of ``split``, labelled by ``population``.

    The cycle sets trade the criteria off against each other and each writer fails one criterion,
    so these pairs show whether a judge reads the principle (its verdict must change with it).
    """
    rng = random.Random(f"constructed-{seed}-{split}")
    P, A, B = [], [], []
    for i in range(n):
        pool = _constructed(task, split, i, rng)
        prompt = task.prompt(split, i)
        for x, y in CONSTRUCTED_PAIRS:
            if pool[x] != pool[y]:
                P.append(prompt)
                A.append(pool[x])
                B.append(pool[y])
    memo = _Memo(task.gold_components)
    pop = LabelerPopulation.preset(population, components_fn=memo)
    return _label(pop, memo, P, A, B, np.random.default_rng(seed))


def measure_preference_cycle(
    n: int = 200,
    *,
    split: str = "test",
    task: NewsTask | None = None,
    population: str = "intransitive",
    seed: int = 0,
) -> dict[str, float]:
    """P(A > B), P(B > C), P(C > A) for the :func:`cycle_completions` sets of ``n`` prompts of ``split``.

    The probabilities are exact expectations under the population (mixture and label noise
    included), averaged over prompts; all three above 1/2 is a measured preference cycle.
    Also returns the win rates of one sampled label per comparison (``sampled_*``), the fraction of
    prompts whose own three probabilities cycle (``prompt_cycle_rate``) and the gold mean of each set.
    """
    task = task or NewsTask(seed=0)
    pop = LabelerPopulation.preset(population, task)
    prompts, sets = [], {k: [] for k in CYCLE_SETS}
    for i in range(n):
        article = task.example(split, i)
        prompts.append(article.prompt)
        for k, v in cycle_completions(article, random.Random(f"cycle-{seed}-{split}-{i}")).items():
            sets[k].append(v)
    out: dict[str, float] = {"n": n}
    rng = np.random.default_rng(seed)
    per_prompt = []
    for x, y in (("A", "B"), ("B", "C"), ("C", "A")):
        p = pop.population_prob(prompts, sets[x], sets[y])
        per_prompt.append(p)
        out[f"P({x}>{y})"] = float(p.mean())
        out[f"sampled_{x}>{y}"] = float(pop.label(prompts, sets[x], sets[y], rng=rng).label.mean())
    out["prompt_cycle_rate"] = float(np.mean(np.all(np.stack(per_prompt) > 0.5, axis=0)))
    for k in CYCLE_SETS:
        out[f"gold_{k}"] = float(np.mean(task.gold(prompts, sets[k])))
    return out


# ----------------------------------------------------------------------------------------------
# Judge


def judge_words(constitution, template: str, answer_tokens: Sequence[str]) -> list[str]:
    """Every whitespace token the judge reads besides the world's own text: template, principles, answers."""
    from ..feedback.judge import as_constitution

    text = template
    for field in ("{principle}", "{prompt}", "{a}", "{b}"):
        text = text.replace(field, " ")
    words = text.split() + list(answer_tokens)
    for p in as_constitution(constitution):
        words += p.text.split()
    return list(dict.fromkeys(words))


def extend_tokenizer(tokenizer, words: Sequence[str]):
    """A copy of a word-level ``PreTrainedTokenizerFast`` with ``words`` appended to its vocabulary.

    Existing ids do not move (the SFT embeddings stay valid); new words get the next ids. Words are
    added to the WordLevel model itself, not as "added tokens", so they only match whole words
    ("more" never splits "dunmore").
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec.get("model", {}).get("type") != "WordLevel":
        raise ValueError(f"extend_tokenizer expects a WordLevel tokenizer (the micro world's), got {spec.get('model', {}).get('type')!r}.")
    vocab = spec["model"]["vocab"]
    nxt = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    added = []
    for w in words:
        if w not in vocab:
            vocab[w] = nxt
            nxt += 1
            added.append(w)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        pad_token=tokenizer.pad_token, eos_token=tokenizer.eos_token, unk_token=tokenizer.unk_token,
    )
    fast.padding_side = tokenizer.padding_side
    return fast, added


def checker_verdicts(comp_a: np.ndarray, comp_b: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """(K, N) principle-checker verdicts P_k(a > b): 1 if a's matching gold component is higher, 0 if
    lower, 1/2 on a tie. ``names`` are principle names (keys of :data:`PRINCIPLE_COMPONENT`)."""
    unknown = [n for n in names if n not in PRINCIPLE_COMPONENT]
    if unknown:
        raise ValueError(f"no checker for principle(s) {unknown}; checkers exist for {sorted(PRINCIPLE_COMPONENT)}.")
    rows = []
    for name in names:
        k = COMPONENTS.index(PRINCIPLE_COMPONENT[name])
        d = comp_a[:, k] - comp_b[:, k]
        rows.append(np.where(d > _EPS, 1.0, np.where(d < -_EPS, 0.0, 0.5)))
    return np.stack(rows) if rows else np.zeros((0, len(comp_a)))


def _judge_pairs(data: PreferenceData, n_pairs: int, constructed_frac: float, rng: random.Random):
    """Judge training pairs: SFT-vs-SFT pairs of the train prompts, plus pairs drawn from the
    writers' summaries, the cycle sets and an SFT sample of the same prompts (every principle
    then sees clear wins, losses and ties)."""
    tr = data.train
    n_constructed = int(round(n_pairs * constructed_frac))
    n_sft = min(n_pairs - n_constructed, len(tr))
    pick = rng.sample(range(len(tr)), n_sft)
    P = [tr.prompts[i] for i in pick]
    A = [tr.a[i] for i in pick]
    B = [tr.b[i] for i in pick]
    sft_of = dict(zip(*data.sft_train))
    idx = data.train_indices
    task = data.task
    for _ in range(n_constructed):
        i = idx[rng.randrange(len(idx))]
        prompt = task.prompt("train", i)
        pool = _constructed(task, "train", i, rng)
        if prompt in sft_of:
            pool["sft"] = sft_of[prompt]
        x, y = rng.sample(sorted(pool), 2)
        if pool[x] == pool[y]:
            continue
        P.append(prompt)
        A.append(pool[x])
        B.append(pool[y])
    memo = data.components
    return P, A, B, memo.array(P, A), memo.array(P, B)


def judge_examples(build_prompt, constitution, prompts, a, b, verdicts):
    """Training texts and targets for a judge LM: every pair under every principle, in both orders.

    ``build_prompt(principle, prompt, a, b)`` formats the question (e.g. ``ConstitutionJudge.build_prompt``);
    ``verdicts`` is (K, N): the target P_k(a > b) per principle; the swapped order gets 1 - P.
    The texts are pair-major: the 2K questions about one pair are consecutive (train with
    ``group_size=2 * K`` to keep them in one batch).
    """
    principles = list(constitution)
    verdicts = np.asarray(verdicts, dtype=np.float64).reshape(len(principles), len(prompts))
    texts, targets = [], []
    for j, (x, ya, yb) in enumerate(zip(prompts, a, b)):
        for k, pr in enumerate(principles):
            texts.append(build_prompt(pr, x, ya, yb))
            targets.append(verdicts[k, j])
            texts.append(build_prompt(pr, x, yb, ya))
            targets.append(1.0 - verdicts[k, j])
    return texts, np.array(targets, dtype=np.float32)


def _judge_metrics(judge, pairs: PairSet, names: Sequence[str]) -> dict[str, Any]:
    """Agreement of a judge with the principle checkers, with the sampled labels of the held-out
    pairs (as :func:`~rlhfgym.envs.feedback.judge.judge_agreement`, without ``datasets``) and with the gold score."""
    per = judge.per_principle(pairs.prompts, pairs.a, pairs.b).double().numpy()  # (K, N) P_k(a > b)
    checks = checker_verdicts(pairs.comp_a, pairs.comp_b, names)
    label = pairs.label.astype(bool)  # the sampled click: 1 = a
    ens = per.mean(0)
    out: dict[str, Any] = {"n": len(pairs)}
    for k, name in enumerate(names):
        dec = checks[k] != 0.5
        out[f"checker_agreement/{name}"] = float(((per[k] > 0.5) == (checks[k] > 0.5))[dec].mean()) if dec.any() else float("nan")
        out[f"checker_tie_mae/{name}"] = float(np.abs(per[k] - 0.5)[~dec].mean()) if (~dec).any() else float("nan")
        out[f"checker_decided_rate/{name}"] = float(dec.mean())
        out[f"labeler_agreement/{name}"] = float(((per[k] > 0.5) == label).mean())
    out["labeler_agreement/all"] = float(((ens > 0.5) == label).mean())
    gd = pairs.gold_a - pairs.gold_b
    dec = np.abs(gd) > _EPS
    out["gold_agreement/all"] = float(((ens > 0.5) == (gd > 0))[dec].mean()) if dec.any() else float("nan")
    dec = np.abs(pairs.p_pop - 0.5) > 1e-12
    out["majority_agreement/all"] = float(((ens > 0.5) == (pairs.p_pop > 0.5))[dec].mean()) if dec.any() else float("nan")
    return out


def _swap_metrics(judge_path, device, pairs: PairSet, constitution, batch_size) -> dict[str, float]:
    """Give every principle the text of another (rotated by one): do the verdicts follow the text?

    On pairs where the name's checker and the text's checker disagree (both decided), the fraction
    of verdicts that agree with the checker of the text (``follows_text``) and with the checker of
    the name (``follows_name``).
    """
    names = constitution.names
    texts = [p.text for p in constitution]
    rotated = [{"name": n, "text": texts[(k + 1) % len(texts)]} for k, n in enumerate(names)]
    judge = load_judge(judge_path, device, constitution=rotated, batch_size=batch_size)
    per = judge.per_principle(pairs.prompts, pairs.a, pairs.b).double().numpy()
    by_name = checker_verdicts(pairs.comp_a, pairs.comp_b, names)
    by_text = checker_verdicts(pairs.comp_a, pairs.comp_b, [names[(k + 1) % len(names)] for k in range(len(names))])
    follows_text = follows_name = count = 0
    for k in range(len(names)):
        sel = (by_name[k] != 0.5) & (by_text[k] != 0.5) & (by_name[k] != by_text[k])
        v = per[k][sel] > 0.5
        follows_text += int((v == (by_text[k][sel] > 0.5)).sum())
        follows_name += int((v == (by_name[k][sel] > 0.5)).sum())
        count += int(sel.sum())
    return {"n": count, "follows_text": follows_text / count if count else float("nan"),
            "follows_name": follows_name / count if count else float("nan")}


def build_judge(
    root=None,
    device: str = "cpu",
    seed: int = 0,
    *,
    data: PreferenceData | None = None,
    constitution="micro",
    n_pairs: int = 24_000,
    constructed_frac: float = 0.5,
    n_eval_pairs: int = 2_000,
    n_constructed_eval_prompts: int = 200,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 256,
    n_layers: int | None = 3,
    checkpoint_dir=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the constitution judge LM into ``root/"judge"``; returns metrics.

    ``n_pairs`` pairs (a fraction ``constructed_frac`` drawn from writer summaries / cycle sets /
    SFT samples, the rest SFT-vs-SFT) x every principle x both orders are the training examples.
    Evaluated on up to ``n_eval_pairs`` held-out SFT pairs (``heldout``: agreement with the
    checkers, the sampled labels, the gold score) and on :func:`constructed_pairs` of
    ``n_constructed_eval_prompts`` validation prompts (``constructed``); ``swapped_principles*``:
    every principle given the next one's text, do the verdicts follow the text?
    """
    from ..feedback.judge import DEFAULT_ANSWER_TOKENS, DEFAULT_TEMPLATE, ConstitutionJudge, answer_token_ids, as_constitution

    t0 = time.time()
    root = _root(root)
    data = _data(data, root, device, seed, progress)
    constitution = as_constitution(constitution)
    checker_verdicts(np.zeros((0, 4)), np.zeros((0, 4)), constitution.names)  # fail early on unknown principles
    template = constitution.template or DEFAULT_TEMPLATE
    answer_tokens = tuple(constitution.answer_tokens or DEFAULT_ANSWER_TOKENS)
    from transformers import PreTrainedTokenizerFast

    world_tok = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    tokenizer, added = extend_tokenizer(world_tok, judge_words(constitution, template, answer_tokens))
    model = truncated_backbone(root / "sft", n_layers)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    answer_ids = answer_token_ids(tokenizer, answer_tokens)
    # the judge's own prompt builder, so training and use format the question alike
    build_prompt = functools.partial(ConstitutionJudge.build_prompt, SimpleNamespace(template=template))

    rng = random.Random(seed)
    P, A, B, ca, cb = _judge_pairs(data, n_pairs, constructed_frac, rng)
    texts, targets = judge_examples(build_prompt, constitution, P, A, B, checker_verdicts(ca, cb, constitution.names))
    history = train_judge_lm(model, tokenizer, texts, targets, answer_ids, epochs=epochs, lr=lr, batch_size=batch_size,
                             device=device, seed=seed, group_size=2 * len(constitution), progress=progress,
                             checkpoint_dir=checkpoint_dir)
    t_train = time.time() - t0
    _round_fp16_(model)
    model.to("cpu")
    cfg = {
        "template": template,
        "answer_tokens": list(answer_tokens),
        "constitution": constitution.name,
        "principles": [{"name": p.name, "text": p.text, "checks": PRINCIPLE_COMPONENT[p.name]} for p in constitution],
        "added_words": added,
        "n_layers": model.config.num_hidden_layers,
        "history": history,
    }
    # evaluate the stored model: save first (into the temp dir), load it back as the judge would be loaded
    with atomic_save_dir(root / "judge") as tmp:
        _store_fp16(tmp, model)
        tokenizer.save_pretrained(tmp)
        (tmp / JUDGE_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        h = data.heldout
        n_eval = min(n_eval_pairs, len(h))
        ev_pairs = PairSet(h.prompts[:n_eval], h.a[:n_eval], h.b[:n_eval], h.comp_a[:n_eval], h.comp_b[:n_eval],
                           h.p_pop[:n_eval], h.prob[:n_eval], h.label[:n_eval], h.labeler[:n_eval])
        judge = load_judge(tmp, device, batch_size=max(batch_size, 64))
        metrics: dict[str, Any] = {
            "n_layers": cfg["n_layers"], "epochs": epochs, "lr": lr, "batch_size": batch_size,
            "n_pairs": len(P), "n_examples": len(texts), "constructed_frac": constructed_frac,
            "added_words": len(added), "history": history,
        }
        metrics["heldout"] = _judge_metrics(judge, ev_pairs, constitution.names)
        metrics["heldout"]["bayes_ceiling"] = data["bayes_ceiling"]["exact"]
        metrics["swapped_principles"] = _swap_metrics(tmp, device, ev_pairs, constitution, max(batch_size, 64))
        if n_constructed_eval_prompts > 0:
            cp = constructed_pairs(data.task, "validation", n_constructed_eval_prompts, seed)
            metrics["constructed"] = _judge_metrics(judge, cp, constitution.names)
            metrics["swapped_principles_constructed"] = _swap_metrics(tmp, device, cp, constitution, max(batch_size, 64))
        metrics["train_steps"] = epochs * math.ceil(len(P) / max(1, batch_size // (2 * len(constitution))))
        metrics["seconds_train"] = round(t_train, 1)
        metrics["seconds"] = round(time.time() - t0, 1)
        (tmp / "build_metrics.json").write_text(_json(metrics))
        _make_readable(tmp)
    hm = metrics["heldout"]
    _log(progress, "judge: checker agreement " + ", ".join(f"{n} {hm[f'checker_agreement/{n}']:.3f}" for n in constitution.names)
         + f"; labeler agreement {hm['labeler_agreement/all']:.3f}; swapped texts followed "
           f"{metrics.get('swapped_principles_constructed', metrics['swapped_principles'])['follows_text']:.3f} ({metrics['seconds']}s)")
    return metrics


# ----------------------------------------------------------------------------------------------
# Everything


def headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a :func:`build_all_feedback` result that the manifest and README quote."""
    keys = ("heldout_accuracy", "accuracy_over_ceiling", "heldout_majority_agreement", "sft_t1_spearman", "seconds")

    def data_summary(d):
        return {"n_train_prompts": d["n_train_prompts"], "n_train_pairs": d["n_train_pairs"],
                "n_heldout_pairs": d["n_heldout_pairs"], "bayes_ceiling": d["bayes_ceiling"]["exact"],
                "seconds": d["seconds"]}

    out: dict[str, Any] = {}
    if "preference_data" in metrics:
        out["preference_data"] = data_summary(metrics["preference_data"])
    for step in FEEDBACK_STEPS:
        if step in metrics:
            out[step] = {k: metrics[step][k] for k in keys if k in metrics[step]}
            if "preference_data" in metrics[step]:
                out[step]["preference_data"] = data_summary(metrics[step]["preference_data"])
    return out


def _sft_checksum(root: Path) -> str | None:
    """sha256 of the SFT weights the feedback data is sampled from (None when not built)."""
    from ..assets import sha256_file

    path = root / "sft" / "model.safetensors"
    return sha256_file(path) if path.is_file() else None


class _BuildWork:
    """The resumable state of one :func:`build_all_feedback` call in ``work_dir`` (None: off):
    ``build.json`` (the call's arguments), ``preference_data.pkl``, ``<step>.metrics.json`` for
    finished steps and ``<step>/`` snapshots of the step in progress."""

    def __init__(self, work_dir, fingerprint: dict[str, Any], progress: bool):
        self.dir = Path(work_dir) if work_dir is not None else None
        self.progress = progress
        if self.dir is None:
            return
        meta = self.dir / "build.json"
        if meta.is_file() and json.loads(meta.read_text()) != fingerprint:
            _log(progress, f"{self.dir} holds a build with other arguments (or another SFT model): starting afresh")
            import shutil

            shutil.rmtree(self.dir)
        elif meta.is_file():
            _log(progress, f"resuming the build kept in {self.dir}")
        else:
            _log(progress, f"resumable state in {self.dir}: if this build is killed, the same call goes on from there")
        atomic_write_text(meta, json.dumps(fingerprint, indent=1, sort_keys=True))

    def loop_dir(self, step: str) -> Path | None:
        return self.dir / step if self.dir is not None else None

    def load_data(self) -> PreferenceData | None:
        path = self.dir / "preference_data.pkl" if self.dir is not None else None
        if path is None or not path.is_file():
            return None
        import pickle

        _log(self.progress, f"preference data from {path} (sampled by the interrupted build)")
        return pickle.loads(path.read_bytes())  # our own file, written by save_data below

    def save_data(self, data: PreferenceData) -> None:
        if self.dir is not None:
            import pickle

            from ..assets import atomic_write_bytes

            atomic_write_bytes(self.dir / "preference_data.pkl", pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))

    def finished(self, step: str, root: Path) -> dict[str, Any] | None:
        """The metrics of ``step`` if an earlier run of this build finished it (and its part is in ``root``)."""
        path = self.dir / f"{step}.metrics.json" if self.dir is not None else None
        if path is None or not path.is_file() or not (root / step).is_dir():
            return None
        _log(self.progress, f"{step}: finished by the interrupted build, kept")
        return json.loads(path.read_text())

    def finish(self, step: str, metrics: dict[str, Any]) -> None:
        if self.dir is not None:
            atomic_write_text(self.dir / f"{step}.metrics.json", _json(metrics))


def build_all_feedback(
    root=None,
    device: str = "cpu",
    seed: int = 0,
    *,
    n_train_prompts: int = 20_000,
    n_heldout_prompts: int = 2_000,
    samples_per_prompt: int = 4,
    gen_batch_size: int = 2048,
    rm_epochs: int = 4,
    pm_epochs: int = 2,
    pm_max_pairs: int | None = None,
    judge_pairs: int = 24_000,
    judge_epochs: int = 3,
    batch_size: int = 128,
    judge_batch_size: int = 256,
    n_layers: int | None = 3,
    cycle_prompts: int = 200,
    data_dir=None,
    data: PreferenceData | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    steps: Sequence[str] = FEEDBACK_STEPS,
    work_dir=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the preference-data step, then ``steps`` (default all: reward, reward_fact, preference,
    judge) and the cycle measurement into ``root``, and write ``root/"feedback_metrics.json"``
    (atomic; the entries of steps not run this time are kept from the file). Returns the metrics.

    ``overrides`` passes extra keyword arguments to single steps, keyed ``"preference_data"``,
    ``"reward"``, ``"reward_fact"``, ``"preference"``, ``"judge"`` (e.g. ``{"judge": {"lr": 1e-3}}``).
    ``data``: preference data from an earlier :func:`build_preference_data` (skips that step).
    ``work_dir``: make the build resumable. The sampled preference data, the metrics of each
    finished step and snapshots of the step in progress are kept there, so running the same call
    again after a kill goes on where it stopped; a work dir left by a call with other arguments is
    emptied first. The caller deletes it after success. The caller then rewrites the manifest
    (``assets.write_manifest``) so the new files are listed.
    """
    t0 = time.time()
    root = _root(root)
    overrides = dict(overrides or {})
    unknown = set(overrides) - {"preference_data", *FEEDBACK_STEPS}
    if unknown:
        raise ValueError(f"unknown override keys {sorted(unknown)}; use preference_data, {', '.join(FEEDBACK_STEPS)}.")
    unknown = set(steps) - set(FEEDBACK_STEPS)
    if unknown or not steps:
        raise ValueError(f"steps must be a non-empty subset of {list(FEEDBACK_STEPS)}, got {list(steps)}.")

    def kw(step: str, **defaults):
        return {**defaults, "progress": progress, **overrides.get(step, {})}

    work = _BuildWork(work_dir, {
        "seed": seed, "steps": sorted(steps), "sft": _sft_checksum(root), "n_train_prompts": n_train_prompts,
        "n_heldout_prompts": n_heldout_prompts, "samples_per_prompt": samples_per_prompt, "rm_epochs": rm_epochs,
        "pm_epochs": pm_epochs, "pm_max_pairs": pm_max_pairs, "judge_pairs": judge_pairs, "judge_epochs": judge_epochs,
        "batch_size": batch_size, "judge_batch_size": judge_batch_size, "n_layers": n_layers,
        "overrides": json.loads(_json(overrides)), "given_data": data is not None}, progress)
    if data is None:
        data = work.load_data()
    if data is None:
        data = build_preference_data(root, device, seed, **kw(
            "preference_data", n_train_prompts=n_train_prompts, n_heldout_prompts=n_heldout_prompts,
            samples_per_prompt=samples_per_prompt, gen_batch_size=gen_batch_size, data_dir=data_dir))
        work.save_data(data)
    elif not isinstance(data, PreferenceData):
        raise TypeError(f"data must be what build_preference_data returned, got {type(data).__name__}.")
    metrics: dict[str, Any] = {}
    if (root / METRICS_NAME).is_file():
        metrics = json.loads((root / METRICS_NAME).read_text())  # a partial rebuild keeps the other steps' numbers
    metrics.update({"seed": seed, "device": str(device), "preference_data": data.metrics})
    model_kw = dict(data=data, batch_size=batch_size, n_layers=n_layers)
    builders = {
        "reward": lambda: build_reward_model(root, device, seed, **kw(
            "reward", epochs=rm_epochs, checkpoint_dir=work.loop_dir("reward"), **model_kw)),
        "reward_fact": lambda: build_fact_reward_model(root, device, seed, **kw(
            "reward_fact", epochs=rm_epochs, checkpoint_dir=work.loop_dir("reward_fact"), **model_kw)),
        "preference": lambda: build_preference_model(root, device, seed, **kw(
            "preference", epochs=pm_epochs, max_pairs=pm_max_pairs, checkpoint_dir=work.loop_dir("preference"), **model_kw)),
        "judge": lambda: build_judge(root, device, seed, **kw(
            "judge", data=data, n_pairs=judge_pairs, epochs=judge_epochs, batch_size=judge_batch_size, n_layers=n_layers,
            checkpoint_dir=work.loop_dir("judge"))),
    }
    for step in FEEDBACK_STEPS:
        if step in steps:
            metrics[step] = work.finished(step, root)
            if metrics[step] is None:
                metrics[step] = builders[step]()
                work.finish(step, metrics[step])
    for step in steps:  # the shared entry is the latest data; each model keeps the data it learned from
        metrics[step]["preference_data"] = data.metrics
    metrics["preference_cycle"] = measure_preference_cycle(cycle_prompts, seed=seed)
    size = asset_bytes(root)
    metrics["asset_bytes"] = size
    metrics["size_limit_bytes"] = SIZE_LIMIT_BYTES
    metrics["seconds"] = round(time.time() - t0, 1)
    atomic_write_text(root / METRICS_NAME, _json(metrics))
    if size > SIZE_LIMIT_BYTES:
        import warnings

        warnings.warn(f"the assets in {root} total {size / 1e6:.1f} MB, over the {SIZE_LIMIT_BYTES / 1e6:.0f} MB budget; "
                      "build with fewer n_layers.", stacklevel=2)
    _log(progress, f"feedback assets built in {metrics['seconds']}s; assets total {size / 1e6:.2f} MB")
    return metrics
