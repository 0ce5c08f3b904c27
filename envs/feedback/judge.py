"""A constitution judge: an LM asked multiple-choice questions produces AI preference labels (RLAIF).

Constitutional AI's feedback step: for a prompt and two completions, and for each principle of a
*constitution*, the judge reads::

    <principle>
    <prompt>
    (A) <completion a>
    (B) <completion b>
    The answer is: (

and compares the next-token probabilities of the two answer tokens ("A" and "B"). Normalised
over the two, that is a soft label for this principle::

    p_k(a > b | order AB) = P("A") / (P("A") + P("B")) = sigmoid(logit_A - logit_B)

LMs prefer one position regardless of content, so each principle is asked in both orders and
the two answers averaged (which also makes ``prefer(a, b) = 1 - prefer(b, a)`` hold exactly)::

    p_k(a > b) = 1/2 * [ p(A | a first) + p(B | b first) ]
    P(a > b)   = mean_k p_k(a > b),   optionally clamped to e.g. [0.4, 0.6]

(Constitutional AI found soft labels better than hard ones, clamping to 40-60% helped, and
ensembling over principles made the preference model more robust.)

The template and the answer tokens are parameters, so any instruction-tuned causal LM plugs in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..hf import cached_forward, quiet_transformers, resolve_device
from .reward_model import pad_right

DEFAULT_TEMPLATE = (
    "Consider the following request and two possible responses.\n\n"
    "Request: {prompt}\n\n"
    "{principle}\n"
    "Options:\n(A) {a}\n(B) {b}\n"
    "The answer is: ("
)
DEFAULT_ANSWER_TOKENS = ("A", "B")
_TEMPLATE_FIELDS = ("{principle}", "{prompt}", "{a}", "{b}")


class ConstitutionError(ValueError):
    """A constitution file is missing, empty or malformed."""


class JudgeTokenError(ValueError):
    """The judge's tokenizer cannot represent an answer token as a single token."""


@dataclass(frozen=True)
class Principle:
    name: str
    text: str


@dataclass
class Constitution:
    """A list of principles (iterable, indexable) plus optional template and answer tokens from
    the same YAML file (used by :class:`ConstitutionJudge` unless it is given its own)."""

    principles: list[Principle]
    name: str = "constitution"
    template: str | None = None
    answer_tokens: tuple[str, str] | None = None
    source: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.principles)

    def __iter__(self):
        return iter(self.principles)

    def __getitem__(self, i: int) -> Principle:
        return self.principles[i]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.principles]


BUILTIN_DIR = Path(__file__).parent.parent / "constitutions"


def _builtin(name: str) -> Path | None:
    path = BUILTIN_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def _parse_constitution(data: Any, source: str) -> Constitution:
    fix = "write a YAML list of principles, each `- name: <short name>` with `text: <the question to the judge>`"
    meta: Mapping[str, Any] = {}
    if isinstance(data, Mapping):
        meta = data
        data = data.get("principles")
    if data is None or (isinstance(data, (list, tuple)) and len(data) == 0):
        raise ConstitutionError(f"{source}: the constitution has no principles; {fix}.")
    if not isinstance(data, (list, tuple)):
        raise ConstitutionError(f"{source}: principles must be a list, got {type(data).__name__}; {fix}.")
    principles, seen = [], set()
    for k, entry in enumerate(data, start=1):
        if not isinstance(entry, Mapping):
            raise ConstitutionError(f"{source}: principle {k} is a {type(entry).__name__}, not a mapping; {fix}.")
        missing = [f for f in ("name", "text") if not isinstance(entry.get(f), str) or not entry.get(f).strip()]
        if missing:
            raise ConstitutionError(f"{source}: principle {k} lacks a non-empty {' and '.join(missing)}; {fix}.")
        if entry["name"] in seen:
            raise ConstitutionError(f"{source}: principle {k} repeats the name {entry['name']!r}; names must be unique.")
        seen.add(entry["name"])
        principles.append(Principle(entry["name"].strip(), entry["text"].strip()))
    answer_tokens = meta.get("answer_tokens")
    if answer_tokens is not None:
        if not (isinstance(answer_tokens, (list, tuple)) and len(answer_tokens) == 2 and all(isinstance(t, str) for t in answer_tokens)):
            raise ConstitutionError(f"{source}: answer_tokens must be a list of two strings, got {answer_tokens!r}.")
        answer_tokens = tuple(answer_tokens)
    template = meta.get("template")
    if template is not None:
        _check_template(template, source)
    return Constitution(principles, str(meta.get("name", Path(source).stem)), template, answer_tokens, source)


def _check_template(template: Any, source: str = "template") -> None:
    if not isinstance(template, str):
        raise ConstitutionError(f"{source}: template must be a string, got {type(template).__name__}.")
    missing = [f for f in _TEMPLATE_FIELDS if f not in template]
    if missing:
        raise ConstitutionError(
            f"{source}: the template lacks the field(s) {missing}; it must contain {', '.join(_TEMPLATE_FIELDS)}."
        )


def load_constitution(path: str | os.PathLike[str]) -> Constitution:
    """Load principles from YAML: a list of ``{name, text}`` entries, or a mapping with
    ``principles:`` (and optional ``name``, ``template``, ``answer_tokens``). A bare name such as
    ``"micro"`` loads the built-in ``envs/constitutions/micro.yaml``.
    """
    import yaml

    p = Path(path)
    if not p.exists() and isinstance(path, str) and _builtin(path) is not None:
        p = _builtin(path)
    if not p.is_file():
        builtins = sorted(f.stem for f in BUILTIN_DIR.glob("*.yaml"))
        raise ConstitutionError(f"{path}: no such constitution file; pass a YAML path or a built-in name ({', '.join(builtins)}).")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConstitutionError(f"{p}: not valid YAML ({e}).") from None
    return _parse_constitution(data, str(p))


def as_constitution(constitution) -> Constitution:
    """Accept a :class:`Constitution`, a path / built-in name, or a list of Principles / dicts."""
    if isinstance(constitution, Constitution):
        if len(constitution) == 0:
            raise ConstitutionError("the constitution has no principles; add at least one.")
        return constitution
    if isinstance(constitution, (str, os.PathLike)):
        return load_constitution(constitution)
    items = [{"name": c.name, "text": c.text} if isinstance(c, Principle) else c for c in constitution]
    return _parse_constitution(items, "constitution")


def answer_token_ids(tokenizer, answer_tokens: Sequence[str]) -> list[int]:
    """The single vocabulary id of each answer token; a clear error when one has none."""
    vocab = tokenizer.get_vocab()
    ids, missing = [], []
    for tok in answer_tokens:
        if tok in vocab:
            ids.append(vocab[tok])
            continue
        enc = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(enc) == 1 and enc[0] != tokenizer.unk_token_id:
            ids.append(enc[0])
        else:
            missing.append(tok)
    if missing:
        raise JudgeTokenError(
            f"the judge's tokenizer has no single token for answer token(s) {missing} "
            f"(answer_tokens={tuple(answer_tokens)}); pass answer_tokens=(...) that are single tokens of its "
            "vocabulary, or add them with tokenizer.add_tokens and resize the model's embeddings."
        )
    if ids[0] == ids[1]:
        raise JudgeTokenError(f"answer tokens {tuple(answer_tokens)} map to the same id {ids[0]}; use two distinct tokens.")
    return ids


Reference = Callable[[str], str] | Mapping[str, str] | Sequence[str]


def answer_logit_diff(model, seqs: Sequence[Sequence[int]], answer_ids: Sequence[int], pad_id: int,
                      device, group_size: int = 1) -> torch.Tensor:
    """(N,) logit(A) − logit(B) for the next token after each pre-tokenised question (the log-odds
    of answering A); differentiable, so training uses it too.

    ``group_size`` > 1: consecutive groups of that many questions share their opening (the 2K
    questions about one pair repeat the same request and article under K principles and two
    orders). The longest common prefix of each group is run once and its KV cache repeated for
    the group, then only the rest of each question is run on top, with positions continuing after
    the prefix. Same numbers as one full pass per question; about half the work for judge
    questions, whose article is most of their length."""
    n = len(seqs)
    if group_size <= 1 or n % group_size:
        ids, mask = pad_right(seqs, pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = logits[torch.arange(n, device=ids.device), mask.sum(1) - 1].float()
        return last[:, answer_ids[0]] - last[:, answer_ids[1]]
    groups = [seqs[g : g + group_size] for g in range(0, n, group_size)]
    shared = []
    for grp in groups:  # the common prefix, leaving at least one token of each question to run
        k, limit = 0, min(len(q) for q in grp) - 1
        while k < limit and all(q[k] == grp[0][k] for q in grp[1:]):
            k += 1
        shared.append(k)
    if min(shared) == 0:  # nothing to share in some group: one plain pass
        return answer_logit_diff(model, seqs, answer_ids, pad_id, device, group_size=1)
    p_ids, p_mask = pad_right([grp[0][:k] for grp, k in zip(groups, shared)], pad_id, device)
    _, cache = cached_forward(model, None, input_ids=p_ids, attention_mask=p_mask)
    cache.batch_repeat_interleave(group_size)
    rest = [q[k:] for grp, k in zip(groups, shared) for q in grp]
    r_ids, r_mask = pad_right(rest, pad_id, device)
    start = torch.tensor(shared, device=r_ids.device).repeat_interleave(group_size)
    positions = start[:, None] + torch.arange(r_ids.shape[1], device=r_ids.device)[None, :]
    mask = torch.cat([p_mask.repeat_interleave(group_size, dim=0), r_mask], dim=1)  # prefix pads are holes
    logits = cached_forward(model, cache, input_ids=r_ids, attention_mask=mask, position_ids=positions)[0].logits
    last = logits[torch.arange(n, device=r_ids.device), r_mask.sum(1) - 1].float()
    return last[:, answer_ids[0]] - last[:, answer_ids[1]]


class ConstitutionJudge:
    """AI preference labels from a causal LM and a constitution.

    ``model``/``tokenizer``: any causal LM (``logits`` of shape (B, T, V)). ``constitution``: a
    :class:`Constitution`, a YAML path, a built-in name or a list of principles. ``clamp``: e.g.
    ``(0.4, 0.6)`` to bound the final probabilities. ``reference``: the fixed completion that
    :meth:`score` compares against, as ``callable(prompt) -> str``, a ``{prompt: completion}``
    mapping, or a list aligned with the prompts of each :meth:`score` call. ``debias=False`` asks
    each principle in one order only (cheaper, position-biased).
    """

    def __init__(
        self,
        model,
        tokenizer,
        constitution,
        clamp: tuple[float, float] | None = None,
        device: str | torch.device | None = "cpu",
        *,
        template: str | None = None,
        answer_tokens: Sequence[str] | None = None,
        reference: Reference | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        debias: bool = True,
    ):
        self.constitution = as_constitution(constitution)
        self.template = template or self.constitution.template or DEFAULT_TEMPLATE
        _check_template(self.template)
        self.answer_tokens = tuple(answer_tokens or self.constitution.answer_tokens or DEFAULT_ANSWER_TOKENS)
        if len(self.answer_tokens) != 2:
            raise JudgeTokenError(f"answer_tokens must be two tokens (for A and B), got {self.answer_tokens!r}.")
        self.tokenizer = tokenizer
        self.answer_ids = answer_token_ids(tokenizer, self.answer_tokens)
        if clamp is not None:
            lo, hi = clamp
            if not 0.0 <= lo <= 0.5 <= hi <= 1.0:
                raise ValueError(f"clamp must be (lo, hi) with 0 <= lo <= 0.5 <= hi <= 1, got {clamp!r}.")
        self.clamp = clamp
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.reference = reference
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.debias = bool(debias)

    # -- the multiple-choice question ----------------------------------------------------------
    def build_prompt(self, principle: Principle | str, prompt: str, a: str, b: str) -> str:
        text = principle.text if isinstance(principle, Principle) else principle
        # str.replace, not str.format: prompts and completions may contain braces
        out = self.template
        for key, value in (("{principle}", text), ("{prompt}", prompt), ("{a}", a), ("{b}", b)):
            out = out.replace(key, value)
        return out

    def _answer_logit_diff(self, texts: Sequence[str], group_size: int = 1) -> torch.Tensor:
        """logit("A") - logit("B") at the next position after each text: log-odds of answering A.
        Groups of ``group_size`` consecutive texts about one pair share their common opening."""
        out = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        step = max(1, self.batch_size // group_size) * group_size  # whole groups per batch
        for s in range(0, len(texts), step):
            chunk = texts[s : s + step]
            seqs = self.tokenizer(list(chunk), add_special_tokens=True)["input_ids"]
            if self.max_length is not None:
                seqs = [q[-self.max_length :] for q in seqs]  # keep the answer cue at the end
            with torch.inference_mode():
                out.append(answer_logit_diff(self.model, seqs, self.answer_ids, pad, self.device, group_size))
        return torch.cat(out).cpu()

    def per_principle(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """(n_principles, B) unclamped P_k(a > b), each averaged over both orders (if ``debias``)."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"prompts, a and b must have one entry per pair; got {len(prompts)}, {len(a)}, {len(b)}.")
        n, K = len(prompts), len(self.constitution)
        orders = 2 if self.debias else 1
        # pair-major: the K x orders questions about one pair are consecutive and share the request
        texts = [self.build_prompt(pr, x, *((ya, yb), (yb, ya))[o])
                 for x, ya, yb in zip(prompts, a, b) for pr in self.constitution for o in range(orders)]
        d = self._answer_logit_diff(texts, group_size=K * orders).view(n, K, orders)
        # sigmoid(logit_A - logit_B) = P(A) / (P(A) + P(B))
        p_ab = torch.sigmoid(d[:, :, 0]).T  # a shown as (A): P(answer A)
        if not self.debias:
            return p_ab
        p_ba = torch.sigmoid(-d[:, :, 1]).T  # a shown as (B): P(answer B)
        return 0.5 * (p_ab + p_ba)

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """(B,) float32 P(a > b): the mean over principles, clamped if ``clamp`` is set."""
        p = self.per_principle(prompts, a, b).mean(0)
        if self.clamp is not None:
            p = p.clamp(*self.clamp)
        return p.float()

    # -- the env reward interface ------------------------------------------------------------------
    def references(self, prompts: Sequence[str]) -> list[str]:
        ref = self.reference
        if ref is None:
            raise ValueError("score() compares against a reference completion; pass reference= (callable, mapping or list).")
        if callable(ref):
            return [ref(p) for p in prompts]
        if isinstance(ref, Mapping):
            missing = [p for p in prompts if p not in ref]
            if missing:
                raise KeyError(f"no reference completion for {len(missing)} prompt(s), e.g. {missing[0][:80]!r}.")
            return [ref[p] for p in prompts]
        if len(ref) != len(prompts):
            raise ValueError(
                f"reference is a list of {len(ref)} completions but score() got {len(prompts)} prompts; "
                "a list must align with the prompts of each call (use a mapping or a callable otherwise)."
            )
        return list(ref)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Reward P(completion > reference) - 1/2, (B,) float32 (the env's reward interface)."""
        return self.prefer(prompts, completions, self.references(prompts)) - 0.5

    __call__ = score


def judge_agreement(judge: ConstitutionJudge, prefs) -> dict[str, float]:
    """How often the judge (and each principle) agrees with the hard labels of preference records."""
    from .preferences import hard_labels

    prompts, chosen, rejected = list(prefs["prompt"]), list(prefs["chosen"]), list(prefs["rejected"])
    labels = torch.tensor(hard_labels(prefs))
    decided = labels >= 0
    per = judge.per_principle(prompts, chosen, rejected)
    out = {"n": int(decided.sum())}
    p = per.mean(0)
    out["all"] = float(((p > 0.5).long() == labels)[decided].float().mean())
    for name, row in zip(judge.constitution.names, per):
        out[name] = float(((row > 0.5).long() == labels)[decided].float().mean())
    return out


__all__ = [
    "JUDGE_CONFIG",
    "load_judge",
    "ConstitutionJudge", "Constitution", "Principle", "ConstitutionError", "JudgeTokenError",
    "load_constitution", "answer_token_ids", "judge_agreement", "DEFAULT_TEMPLATE", "DEFAULT_ANSWER_TOKENS",
]


#: the judge asset's own config (template, answer tokens, principles it was trained with)
JUDGE_CONFIG = "judge_config.json"


@quiet_transformers()
def load_judge(path, device="cpu", *, constitution=None, reference=None, clamp=None, batch_size: int = 64, debias: bool = True):
    """A :class:`ConstitutionJudge` over a judge asset built by :func:`rlhfgym.envs.build.feedback.build_judge`.

    ``constitution`` defaults to the one it was trained with (``judge_config.json``); another one
    works as long as its words are in the judge's vocabulary (others read as ``<unk>``).
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    cfg_path = path / JUDGE_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: {path} is not a judge asset; build it with rlhfgym.envs.build.feedback.build_judge.")
    cfg = json.loads(cfg_path.read_text())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).float().eval()
    if constitution is None:
        constitution = [{"name": p["name"], "text": p["text"]} for p in cfg["principles"]]
    return ConstitutionJudge(model, tokenizer, constitution, clamp=clamp, device=device, template=cfg["template"],
                             answer_tokens=tuple(cfg["answer_tokens"]), reference=reference, batch_size=batch_size, debias=debias)
