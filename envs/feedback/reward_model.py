"""Bradley-Terry reward models: a causal LM backbone with a scalar head, trained on preferences.

The model is ``AutoModelForSequenceClassification`` with ``num_labels=1``: for Llama-style models
the head reads the hidden state of the last non-pad token, so ``from_pretrained`` works on a local
directory (our SFT policy, a saved reward model) or a hub name alike. Inputs are
``format_input(prompt, completion)`` followed by EOS (the SFT data ends completions with EOS, so
the head reads the state "the summary is finished").

Training (:func:`rlhfgym.envs.feedback.training.train_reward_model`, used by the asset build and the studies) minimises
the soft-label Bradley-Terry loss (InstructGPT; soft labels as in Constitutional AI)::

    r_w, r_l = r(x, chosen), r(x, rejected)
    loss     = -[ p * log sigmoid(r_w - r_l) + (1 - p) * log sigmoid(r_l - r_w) ]     p = label_prob

then shifts the reward so that the SFT policy's completions score 0 on average (Gao et al. 2022),
which keeps the RL reward centred at the reference policy. Llama's head has no bias, so the shift
is stored as ``offset`` in ``reward_config.json`` and subtracted in :meth:`RewardModel.score`
(equivalent to shifting a head bias).

Fact-augmented reward models (Fact-RLHF, LLaVA-RLHF) only need a different ``format_input``: see
:func:`prepend_facts`.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..assets import atomic_save_dir
from ..moved import moved_attributes
from ..hf import quiet_transformers, resolve_device
from ..lm import length_chunks, pad_left

FormatFn = Callable[[str, str], str]
CONFIG_NAME = "reward_config.json"


# ----------------------------------------------------------------------------------------------
# Input formatting


def join_prompt_completion(prompt: str, completion: str) -> str:
    """``prompt`` and ``completion`` joined by one space unless one side already has whitespace there."""
    if not prompt or not completion or prompt[-1].isspace() or completion[0].isspace():
        return prompt + completion
    return f"{prompt} {completion}"


def prepend_facts(
    facts_fn: Callable[[str], Any],
    render: Callable[[Any], str] | None = None,
    prefix: str = "",
    format_input: FormatFn = join_prompt_completion,
) -> FormatFn:
    """A ``format_input`` that prepends structured facts about the prompt (Fact-RLHF).

    ``facts_fn(prompt)`` returns the facts (for the micro world ``NewsTask().facts``); ``render``
    turns them into text. The default renderer keeps only items whose ``key`` attribute is true
    (when items have one: the news, not the background) and writes each with its ``clause()``
    method (or ``str``), so the micro world gives e.g. ``"vera repaired 14 lamps in holt . <prompt> <summary>"``.
    """

    def default_render(facts: Any) -> str:
        if isinstance(facts, str):
            return facts
        items = [f for f in facts if getattr(f, "key", True)]
        return " ".join(f.clause() if hasattr(f, "clause") else str(f) for f in items)

    render = render or default_render

    def fmt(prompt: str, completion: str) -> str:
        facts = render(facts_fn(prompt))
        head = " ".join(s for s in (prefix, facts) if s)
        return format_input(join_prompt_completion(head, prompt) if head else prompt, completion)

    fmt.__qualname__ = f"prepend_facts({getattr(facts_fn, '__qualname__', repr(facts_fn))})"
    return fmt


def _format_name(fn: FormatFn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# Where this module lived when the shipped micro-v0 assets recorded their format functions' names.
_FORMAT_MODULE_MOVES = {"rlhfgym.envs.reward_model.": "rlhfgym.envs.feedback.reward_model."}


def _saved_format_name(name: str | None) -> str | None:
    """A recorded format-function name, spelled with today's module path."""
    for old, new in _FORMAT_MODULE_MOVES.items():
        if name and name.startswith(old):
            return new + name[len(old):]
    return name


# ----------------------------------------------------------------------------------------------
# Shared machinery for scalar-head models (reward model, preference model)


def save_scalar_model(path, model, tokenizer, config_name: str, config: dict) -> Path:
    """``save_pretrained`` model and tokenizer plus ``config_name`` (JSON of ``config``), written as one
    atomic directory (a half-written save never replaces a good one)."""
    with atomic_save_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / config_name).write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def ensure_pad_token(tokenizer) -> None:
    """Scalar heads find the last real token through ``pad_token_id``; give the tokenizer one."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; add one with tokenizer.add_special_tokens.")
        warnings.warn("tokenizer has no pad token; using its EOS token as pad.", stacklevel=3)
        tokenizer.pad_token = tokenizer.eos_token


def load_scalar_model(backbone_or_path, tokenizer, torch_dtype: torch.dtype | None = None):
    """An ``AutoModelForSequenceClassification`` with one output, from a path/hub name or a model.

    A causal LM (e.g. the SFT policy) is converted: its backbone weights are copied into a fresh
    sequence-classification model of the same config and a new scalar head is initialised with
    std 1/sqrt(hidden + 1) (as in the summarize-from-feedback replications), so initial rewards are
    O(1) and comparable across backbones.
    """
    from transformers import AutoModelForSequenceClassification, PreTrainedModel

    ensure_pad_token(tokenizer)
    if isinstance(backbone_or_path, (str, os.PathLike)):
        # transformers prints a load report for the (expected) new head and the unused LM head;
        # we check the report ourselves and only speak up about missing backbone weights
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(backbone_or_path), num_labels=1, output_loading_info=True,
                **({"dtype": torch_dtype} if torch_dtype is not None else {}),
            )
        missing = list(info.get("missing_keys", ()))
        new_head = [k for k in missing if k.startswith(("score.", "classifier."))]
        if len(missing) > len(new_head):
            warnings.warn(
                f"{backbone_or_path}: backbone weights missing from the checkpoint and initialised at random: "
                f"{[k for k in missing if k not in new_head][:5]}; is this the right model?",
                stacklevel=2,
            )
    elif isinstance(backbone_or_path, PreTrainedModel):
        src = backbone_or_path
        if type(src).__name__.endswith("ForSequenceClassification") and src.config.num_labels == 1:
            model, new_head = src, []
        else:
            config = src.config.__class__.from_dict(src.config.to_dict())
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
            missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
            new_head = [k for k in missing if not any(k.endswith(s) for s in ("rotary_emb.inv_freq",))]
            backbone_missing = [k for k in new_head if "score" not in k and "classifier" not in k]
            if backbone_missing:
                raise ValueError(
                    f"could not copy the backbone of {type(src).__name__} into {type(model).__name__}: "
                    f"missing {backbone_missing[:5]}...; pass a path so from_pretrained can map the weights."
                )
            model.to(next(src.parameters()).device)
    else:
        raise TypeError(
            f"backbone_or_path must be a path, a hub name or a transformers PreTrainedModel, got {type(backbone_or_path).__name__}."
        )
    if new_head:
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
        if isinstance(head, torch.nn.Linear):
            torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
            if head.bias is not None:
                torch.nn.init.zeros_(head.bias)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def encode(tokenizer, texts: Sequence[str], max_length: int, append_eos: bool = True) -> list[list[int]]:
    """Token ids per text (tokenizer's own special tokens, then EOS), keeping the *last*
    ``max_length`` tokens: the end of the completion is what a scalar head reads."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for seq in ids:
        seq = list(seq)
        if append_eos and eos is not None and (not seq or seq[-1] != eos):
            seq.append(eos)
        out.append(seq[-max_length:])
    return out


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and attention mask. Right padding keeps position ids 0..len-1 for
    every row, so a sequence scores the same whatever it is batched with."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


#: rows that start with at least this many equal tokens read those tokens once (:func:`prefix_groups`)
MIN_SHARED_PREFIX = 8


def prefix_groups(seqs: Sequence[Sequence[int]], min_shared: int = MIN_SHARED_PREFIX) -> tuple[list[int], list[int], list[int]]:
    """Rows that begin alike, grouped: ``(group, first, prefix_len)``.

    ``group[i]`` is row ``i``'s group, ``first[g]`` a row of group ``g`` and ``prefix_len[g]`` the
    tokens all its rows start with (their longest common prefix, at most the shortest row's length
    minus one, so every row keeps a token of its own for the head to read). Rows sorted by their
    ids are grouped while neighbours share ``min_shared`` tokens or more; a row that shares less
    with every other row is a group of its own (prefix: all its tokens but the last).
    """
    def common(a: Sequence[int], b: Sequence[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    order = sorted(range(len(seqs)), key=lambda i: list(seqs[i]))
    group, first, prefix_len = [0] * len(seqs), [], []
    prev = None
    for i in order:
        shared = common(seqs[prev], seqs[i]) if prev is not None else 0
        if prev is None or shared < min_shared:
            first.append(i)
            prefix_len.append(len(seqs[i]) - 1)
        else:
            prefix_len[-1] = min(prefix_len[-1], shared, len(seqs[i]) - 1)
        group[i] = len(first) - 1
        prev = i
    return group, first, prefix_len


def reads_left_to_right(model) -> bool:
    """Whether a token's state depends only on the tokens before it (a decoder-only model), so a
    shared prefix can be read once; encoders that read both ways (BERT, RoBERTa, DeBERTa) cannot."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(getattr(model, "config", None), "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def scalar_forward(model, seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device,
                   share_prefixes: bool = False) -> torch.Tensor:
    """(B,) float32 head outputs for pre-tokenised sequences.

    ``share_prefixes``: rows that start alike (a prompt with its chosen and its rejected completion)
    read their common prefix once: passes over the distinct prefixes fill a KV cache, then every
    row's rest runs on its prefix's keys and values (a gather, so gradients from all rows add up).
    Both passes batch rows of similar length together (:func:`length_chunks`). Same numbers as the
    plain pass up to float rounding, for about half its compute on preference pairs. Only for
    decoder-only models (:func:`reads_left_to_right`; others take the plain pass). The reward
    model's ``score`` (the env's rewards) keeps the plain pass, so rewards stay bit for bit what they
    were; training, centring and the preference model's ``logit`` share.
    """
    share_prefixes = share_prefixes and reads_left_to_right(model)
    group, first, prefix_len = prefix_groups(seqs) if share_prefixes else ([], [], [])
    if not share_prefixes or len(first) == len(seqs) or min(prefix_len) < 1:
        ids, mask = pad_right(seqs, pad_id, device)
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1).float()
    from ..hf import cached_forward
    from ..lm import SharedPrefixes

    # 1. the distinct prefixes, read once (left-padded to a common width so every row's rest continues them)
    p_ids, p_mask = pad_left([seqs[f][:n] for f, n in zip(first, prefix_len)], pad_id, device)
    prefixes = SharedPrefixes(model.base_model, p_ids, p_mask)
    # 2. every row's rest on its prefix's keys and values; ties broken by the ids, so the same rows in
    # another order meet the same batches (a preference model's prefer(a, b) and prefer(b, a) stay
    # each other's complement)
    starts = [prefix_len[g] for g in group]
    rest = [list(s[n:]) for s, n in zip(seqs, starts)]
    scores, rows = [], []
    for chunk in length_chunks([len(r) for r in rest], tiebreak=rest):
        take = torch.tensor([group[i] for i in chunk], device=p_ids.device)
        ids, mask = pad_right([rest[i] for i in chunk], pad_id, device)
        first_position = torch.tensor([starts[i] for i in chunk], device=ids.device)
        out, _ = cached_forward(model, prefixes.cache(take), input_ids=ids, attention_mask=torch.cat([p_mask[take], mask], 1),
                                position_ids=first_position[:, None] + torch.arange(ids.shape[1], device=ids.device))
        scores.append(out.logits.squeeze(-1).float())
        rows += chunk
    return torch.cat(scores)[torch.tensor(rows).argsort().to(scores[0].device)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def soft_bt_loss(margin: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """-[p log sigmoid(m) + (1 - p) log sigmoid(-m)], the soft-label Bradley-Terry loss (mean)."""
    return -(p * F.logsigmoid(margin) + (1.0 - p) * F.logsigmoid(-margin)).mean()


# ----------------------------------------------------------------------------------------------
# The reward model


class RewardModel:
    """A learned reward r(x, y) with the env's interface ``score(prompts, completions) -> (B,)``.

    ``score`` returns ``(raw - offset) * scale`` as float32 on ``device``, computed without
    gradients in batches of ``batch_size``. ``format_input(prompt, completion) -> str`` builds the
    text the model reads (default: the two joined by a space; see :func:`prepend_facts`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        format_input: FormatFn | None = None,
        device: str | torch.device | None = "cpu",
        max_length: int = 512,
        batch_size: int = 32,
        append_eos: bool = True,
        offset: float = 0.0,
        scale: float = 1.0,
    ):
        ensure_pad_token(tokenizer)
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.model.config.pad_token_id = tokenizer.pad_token_id
        self.tokenizer = tokenizer
        self.format_input = format_input or join_prompt_completion
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.append_eos = bool(append_eos)
        self.offset = float(offset)
        self.scale = float(scale)
        self.norm_stats: dict[str, Any] = {}
        self.history: list[dict[str, float]] = []

    # -- scoring ----------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions; pass one completion per prompt.")
        texts = [self.format_input(p, c) for p, c in zip(prompts, completions)]
        return encode(self.tokenizer, texts, self.max_length, self.append_eos)

    def raw_scores(self, prompts: Sequence[str], completions: Sequence[str], share_prefixes: bool = False) -> torch.Tensor:
        """Head outputs before normalisation, (B,) float32 on ``device``.

        ``share_prefixes``: batch sequences that start alike together, groups of similar length side
        by side (less padding), and read a prompt shared by several of them once
        (:func:`scalar_forward`); equal to the default up to float rounding.
        """
        seqs = self.encode(prompts, completions)
        order = list(range(len(seqs)))
        if share_prefixes and seqs:
            group, _, prefix_len = prefix_groups(seqs)
            order.sort(key=lambda i: (prefix_len[group[i]], group[i], len(seqs[i])))
        was_training = self.model.training
        self.model.eval()
        out = []
        with torch.inference_mode():
            for s in range(0, len(seqs), self.batch_size):
                batch = [seqs[i] for i in order[s : s + self.batch_size]]
                out.append(scalar_forward(self.model, batch, self.tokenizer.pad_token_id, self.device, share_prefixes))
        self.model.train(was_training)
        if not out:
            return torch.zeros(0, device=self.device)
        scores = torch.cat(out)
        return scores[torch.as_tensor(order, device=scores.device).argsort()] if share_prefixes else scores

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Normalised rewards (B,) float32 on ``device``: ``(raw - offset) * scale``."""
        return (self.raw_scores(prompts, completions) - self.offset) * self.scale

    __call__ = score

    def normalise(self, prompts: Sequence[str], completions: Sequence[str], unit_std: bool = False) -> dict[str, float]:
        """Shift (and optionally scale) rewards so these (prompt, SFT completion) pairs score mean 0
        (std 1 with ``unit_std``, as Christiano et al. normalise). Returns the stats it stored."""
        raw = self.raw_scores(prompts, completions, share_prefixes=True).double().cpu()
        mean, std = float(raw.mean()), float(raw.std()) if len(raw) > 1 else 1.0
        self.offset = mean
        self.scale = 1.0 / std if unit_std and std > 0 else 1.0
        self.norm_stats = {"n": len(raw), "raw_mean": mean, "raw_std": std}
        return {"offset": self.offset, "scale": self.scale, **self.norm_stats}

    def to(self, device: str | torch.device) -> "RewardModel":
        self.device = resolve_device(device)
        self.model.to(self.device)
        return self

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """``save_pretrained`` model + tokenizer + ``reward_config.json`` (atomic directory write)."""
        cfg = {
            "offset": self.offset,
            "scale": self.scale,
            "norm_stats": self.norm_stats,
            "max_length": self.max_length,
            "append_eos": self.append_eos,
            "format_input": _format_name(self.format_input),
            "history": self.history,
        }
        return save_scalar_model(path, self.model, self.tokenizer, CONFIG_NAME, cfg)

    @classmethod
    @quiet_transformers()
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device | None = "cpu",
        format_input: FormatFn | None = None,
        batch_size: int = 32,
    ) -> "RewardModel":
        """Load a saved reward model (or any hub/local sequence-classification model with 1 label;
        without ``reward_config.json`` the offset is 0). A model trained with a custom
        ``format_input`` must be given the same one again (it is code, not data)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
        cfg_path = Path(path) / CONFIG_NAME
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        saved_fmt = _saved_format_name(cfg.get("format_input"))
        if format_input is None and saved_fmt and saved_fmt != _format_name(join_prompt_completion):
            warnings.warn(
                f"{path} was trained with format_input={saved_fmt}; pass the same callable to RewardModel.load "
                "or scores will be computed on differently formatted inputs.",
                stacklevel=2,
            )
        rm = cls(model, tokenizer, format_input, device, cfg.get("max_length", 512), batch_size,
                 cfg.get("append_eos", True), cfg.get("offset", 0.0), cfg.get("scale", 1.0))
        rm.norm_stats = cfg.get("norm_stats", {})
        rm.history = cfg.get("history", [])
        return rm


# ----------------------------------------------------------------------------------------------
# Evaluation (training: rlhfgym.envs.feedback.training)


def distinct_pairs(prefs) -> tuple[list[tuple[str, str]], list[int], list[int], list[list[int]]]:
    """The distinct (prompt, completion) sequences of ``prefs``, the index of every record's chosen
    and rejected sequence into them, and the record indices grouped by prompt (the reward model's
    trainer scores each distinct sequence once per step and batches comparisons prompt by prompt)."""
    index: dict[tuple[str, str], int] = {}
    chosen, rejected, groups = [], [], {}
    for i, (x, yw, yl) in enumerate(zip(prefs["prompt"], prefs["chosen"], prefs["rejected"])):
        chosen.append(index.setdefault((x, yw), len(index)))
        rejected.append(index.setdefault((x, yl), len(index)))
        groups.setdefault(x, []).append(i)
    return list(index), chosen, rejected, list(groups.values())


def pair_scores(rm: RewardModel, prefs) -> tuple[torch.Tensor, torch.Tensor]:
    """r(chosen), r(rejected) per record (float64, CPU); each distinct sequence is scored once."""
    pairs, chosen, rejected, _ = distinct_pairs(prefs)
    r = rm.score([x for x, _ in pairs], [y for _, y in pairs]).double().cpu()
    return r[torch.tensor(chosen, dtype=torch.long)], r[torch.tensor(rejected, dtype=torch.long)]


def evaluate_reward_model(rm: RewardModel, prefs, gold=None) -> dict[str, float]:
    """Accuracy of the reward model on preference records, and agreement with gold scores.

    ``accuracy``: fraction of records where r(chosen) > r(rejected) agrees with the hard label
    (label_prob > 1/2 means chosen won; records with label_prob = 1/2 are skipped). ``loss``: the
    soft BT loss. With ``gold`` (a Task, a reward object with ``score(prompts, completions)`` such as
    ``GoldReward``, or a callable ``(prompts, completions) -> scores``) also the Pearson and Spearman correlation between rewards and gold scores over all
    chosen and rejected completions, and ``gold_pair_accuracy`` (RM and gold order each pair alike).
    """
    from .ratings import pearson, spearman as _spearman

    r_w, r_l = pair_scores(rm, prefs)
    p = torch.tensor(prefs["label_prob"], dtype=torch.float64)
    decided = p != 0.5
    agree = ((r_w > r_l) == (p > 0.5))[decided].double()
    out = {
        "n": int(decided.sum()),
        "accuracy": float(agree.mean()) if len(agree) else float("nan"),
        "loss": float(soft_bt_loss(r_w - r_l, p)),
        "margin_mean": float((r_w - r_l).mean()),
    }
    if gold is not None:
        # a Task (gold), a reward object such as GoldReward (score), or a plain callable
        gold_fn = gold.gold if hasattr(gold, "gold") else gold.score if hasattr(gold, "score") else gold

        def gold_of(completions: list[str]) -> np.ndarray:
            vals = gold_fn(list(prefs["prompt"]), completions)
            return torch.as_tensor(vals, dtype=torch.float64).cpu().numpy()

        g_w, g_l = gold_of(list(prefs["chosen"])), gold_of(list(prefs["rejected"]))
        r = np.concatenate([r_w.numpy(), r_l.numpy()])
        g = np.concatenate([g_w, g_l])
        out["pearson"] = pearson(r, g)
        out["spearman"] = _spearman(r, g)
        differs = g_w != g_l
        out["gold_pair_accuracy"] = (
            float(((r_w.numpy() > r_l.numpy()) == (g_w > g_l))[differs].mean()) if differs.any() else float("nan")
        )
    return out


__all__ = [
    "RewardModel", "evaluate_reward_model", "prepend_facts", "join_prompt_completion", "load_scalar_model",
    "soft_bt_loss", "distinct_pairs", "pair_scores", "save_scalar_model",
]

# moved to the training module; resolved lazily (training imports this module)
__getattr__ = moved_attributes(__name__, {"train_reward_model": "rlhfgym.envs.feedback.training"})
