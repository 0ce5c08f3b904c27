"""The micro news world: procedural news articles with a gold summary scorer we can trust.

Like MuJoCo for control or the gold reward model of Gao et al. (2022), this world gives RLHF a
ground truth that is cheap, exact and cannot be hacked by style alone.

An article is rendered from structured *facts*: who (a one-token name) did what (a verb with a
synonym) to what (a plural object), how many (a number below 100), where (a one-token place) and
when. Two or three facts are **key**: they happened recently ("today", "this morning", ...). One
or two are **distractors**: background that happened long ago ("last year", "years ago", ...),
often about the same people or places. Surface forms vary (templates, active/passive voice,
synonyms, roles, sentence order, filler sentences), so a model must read, not memorise, and the
first sentences of an article (lead-k) are a weak summary.

A good summary states every key fact once, with the right actor, action, number, object and
place, and nothing else::

    prompt:     summarize : in holt , 14 lamps were fixed by vera this morning . ... tl;dr :
    completion: vera repaired 14 lamps in holt . oskar sold 61 farms in brill .

The gold scorer (:meth:`NewsTask.gold_one`) parses the article back into facts, so it works on any
prompt of this world and any token string (garbage in, low score out, never an exception).

Splits are disjoint by construction: the split of an article is a hash of its key facts, and each
split only keeps articles whose hash falls in its range (train 80%, validation 10%, test 10%).
"""

from __future__ import annotations

import hashlib
import numbers
import random
from collections.abc import Sequence
from dataclasses import dataclass

from .base import SPLITS, Task

# ----------------------------------------------------------------------------------------------
# The world's lexicon. Every content word is one token of the word-level tokenizer.
NAMES = (
    "mara tomas ines oskar lena pavel rosa ivan nora felix alma hugo vera emil tara bruno greta "
    "omar lina kai sofia anton mila jonas yara leon ida samir elsa viktor nadia otto clara rami "
    "freya igor hana milo dora ben"
).split()
PLACES = (
    "halden brill norvik estor calma dunmore felby garrow holt ilvar jesk kelso lorn marden nessa "
    "orvik pella quinby rastow selby tarn ulmen varna wexby yarrow zell bram corra ebbing fenn"
).split()
OBJECTS = (
    "boats houses bridges schools trucks farms shops wells roads towers ships barns mills ovens "
    "lamps boxes crates bikes carts clocks"
).split()
# canonical action -> its surface forms (past tense == past participle, so passives read well)
ACTIONS = {
    "bought": ("bought", "purchased"),
    "sold": ("sold", "traded"),
    "built": ("built", "constructed"),
    "repaired": ("repaired", "fixed"),
    "painted": ("painted", "decorated"),
    "delivered": ("delivered", "shipped"),
    "cleaned": ("cleaned", "washed"),
    "found": ("found", "discovered"),
    "moved": ("moved", "relocated"),
    "ordered": ("ordered", "requested"),
    "inspected": ("inspected", "checked"),
    "donated": ("donated", "gifted"),
}
VERB_TO_ACTION = {form: action for action, forms in ACTIONS.items() for form in forms}
NUMBERS = [str(n) for n in range(2, 100)]
RECENT_TIMES = ("today", "yesterday", "tonight", "this morning", "this week", "on monday", "on friday")
PAST_TIMES = ("last year", "years ago", "long ago", "last month", "in the past")
PAST_MARKERS = frozenset({"last", "ago", "past"})  # a fact sentence with one of these is background
ROLES = ("a farmer", "a teacher", "the mayor", "a trader", "a builder", "a local official")
FILLERS = (
    "the weather was calm .",
    "people gathered in the square .",
    "the market was busy .",
    "officials did not comment .",
    "more details are expected soon .",
    "the town council will meet again .",
)
INSTRUCTION = "summarize :"
ANSWER_CUE = "tl;dr :"
FUNCTION_WORDS = "in , . were by and a the".split()

_NAME_SET, _PLACE_SET, _OBJECT_SET = frozenset(NAMES), frozenset(PLACES), frozenset(OBJECTS)
_NUMBER_SET = frozenset(NUMBERS)
_SPLIT_BUCKETS = {"train": range(0, 16), "validation": range(16, 18), "test": range(18, 20)}
_SPLIT_SIZES = {"train": 200_000, "validation": 2_000, "test": 2_000}


def world_words() -> list[str]:
    """Every word the world can write (the tokenizer's vocabulary, besides special tokens)."""
    words: list[str] = []
    for group in (NAMES, PLACES, OBJECTS, list(VERB_TO_ACTION), NUMBERS, FUNCTION_WORDS):
        words.extend(group)
    for phrase in (*RECENT_TIMES, *PAST_TIMES, *ROLES, *FILLERS, INSTRUCTION, ANSWER_CUE, "reports say"):
        words.extend(phrase.split())
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class Fact:
    """One event: ``actor action number object in place``; ``key`` marks the news of the day."""

    actor: str
    action: str  # canonical verb (a key of ACTIONS)
    number: str
    obj: str
    place: str
    key: bool

    def clause(self, verb: str | None = None) -> str:
        return f"{self.actor} {verb or self.action} {self.number} {self.obj} in {self.place} ."

    def slots(self) -> tuple[str, str, str, str, str]:
        return (self.actor, self.action, self.number, self.obj, self.place)


@dataclass(frozen=True)
class Article:
    facts: tuple[Fact, ...]  # in the order the article tells them
    text: str

    @property
    def key_facts(self) -> tuple[Fact, ...]:
        return tuple(f for f in self.facts if f.key)

    @property
    def prompt(self) -> str:
        return f"{INSTRUCTION} {self.text} {ANSWER_CUE}"


# ----------------------------------------------------------------------------------------------
# Rendering


def _render_fact(fact: Fact, rng: random.Random) -> str:
    verb = rng.choice(ACTIONS[fact.action])
    when = rng.choice(RECENT_TIMES if fact.key else PAST_TIMES)
    a, n, o, p = fact.actor, fact.number, fact.obj, fact.place
    if rng.random() < 0.3:
        a = f"{a} , {rng.choice(ROLES)} ,"
    templates = (
        f"{a} {verb} {n} {o} in {p} {when} .",
        f"{when} , {a} {verb} {n} {o} in {p} .",
        f"in {p} , {a} {verb} {n} {o} {when} .",
        f"{n} {o} were {verb} by {fact.actor} in {p} {when} .",
        f"{when} , {n} {o} in {p} were {verb} by {fact.actor} .",
        f"reports say {a} {verb} {n} {o} in {p} {when} .",
    )
    return rng.choice(templates).replace(" , ,", " ,")


def _sample_article(rng: random.Random) -> Article:
    n_key = rng.choice((2, 3))
    n_background = rng.choice((1, 2))
    actors = rng.sample(NAMES, n_key + n_background)
    numbers = rng.sample(NUMBERS, n_key + n_background)
    facts = []
    for i in range(n_key + n_background):
        key = i < n_key
        actor = actors[i]
        place = rng.choice(PLACES)
        if not key and rng.random() < 0.5:  # background about the same people or places confuses copying
            other = facts[rng.randrange(n_key)]
            actor, place = (other.actor, place) if rng.random() < 0.5 else (actor, other.place)
        facts.append(Fact(actor, rng.choice(list(ACTIONS)), numbers[i], rng.choice(OBJECTS), place, key))
    rng.shuffle(facts)
    sentences = [_render_fact(f, rng) for f in facts]
    if rng.random() < 0.4:
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(FILLERS))
    return Article(tuple(facts), " ".join(sentences))


def _split_of(article: Article) -> str:
    digest = hashlib.blake2b(repr([f.slots() for f in article.key_facts]).encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % 20
    return next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)


# ----------------------------------------------------------------------------------------------
# Parsing (the gold scorer reads articles back into facts; it never trusts a lookup table)


def _content(tokens: Sequence[str]) -> dict[str, list[str]]:
    slots: dict[str, list[str]] = {"actor": [], "action": [], "number": [], "obj": [], "place": []}
    for t in tokens:
        if t in _NAME_SET:
            slots["actor"].append(t)
        elif t in VERB_TO_ACTION:
            slots["action"].append(VERB_TO_ACTION[t])
        elif t in _NUMBER_SET:
            slots["number"].append(t)
        elif t in _OBJECT_SET:
            slots["obj"].append(t)
        elif t in _PLACE_SET:
            slots["place"].append(t)
    return slots


def parse_article(prompt: str) -> tuple[Fact, ...]:
    """The facts of an article (or of a whole prompt), in the order it tells them."""
    text = prompt.split(ANSWER_CUE)[0]
    if text.startswith(INSTRUCTION):
        text = text[len(INSTRUCTION):]
    facts = []
    for sentence in text.split(" . "):
        tokens = sentence.split()
        slots = _content(tokens)
        if all(len(v) == 1 for v in slots.values()):
            key = not PAST_MARKERS.intersection(tokens)
            facts.append(Fact(*(v[0] for v in slots.values()), key=key))
    return tuple(facts)


# ----------------------------------------------------------------------------------------------
# Gold scoring

INVENTED_PENALTY = 0.15  # per name, place, object or number that the article never mentions
DISTRACTOR_PENALTY = 0.25  # per clause that retells background instead of news
LENGTH_PENALTY = 0.02  # per token beyond the budget
BUDGET_PER_FACT, BUDGET_SLACK = 7, 3  # "vera repaired 14 lamps in holt ." is 7 tokens


def _clauses(tokens: list[str]) -> list[list[str]]:
    clauses, current = [], []
    for t in tokens:
        if t in (".", ";", "and"):
            if current:
                clauses.append(current)
            current = []
        else:
            current.append(t)
    if current:
        clauses.append(current)
    return clauses


def _match(fact: Fact, slots: dict[str, list[str]]) -> int:
    """Components of ``fact`` a clause states unambiguously (exactly one value of that kind, the right one)."""
    return sum(slots[k] == [v] for k, v in zip(slots, fact.slots()))


def gold_components(prompt: str, completion: str) -> dict[str, float]:
    """The parts of the gold score; their sum (clipped to [-1, 1]) is :func:`gold_score`.

    ``coverage``: mean over key facts of the fraction of its five components (actor, action,
    number, object, place) stated unambiguously in the clause assigned to it (one clause per fact).
    ``faithfulness``: −0.15 per content word the article never mentions (an invented fact or name).
    ``distractor``: −0.25 per clause that retells a background fact rather than news.
    ``brevity``: −0.02 per token beyond 7 per key fact + 3.
    """
    facts = parse_article(prompt)
    key = [f for f in facts if f.key]
    tokens = str(completion).split()
    clauses = [_content(c) for c in _clauses(tokens)]

    # One clause per key fact, best matches first (a clause listing everything cannot serve twice).
    pairs = sorted(((_match(f, c), i, j) for i, f in enumerate(key) for j, c in enumerate(clauses)), reverse=True)
    used_facts, used_clauses, covered = set(), set(), 0
    for m, i, j in pairs:
        if m and i not in used_facts and j not in used_clauses:
            used_facts.add(i)
            used_clauses.add(j)
            covered += m
    coverage = covered / (5 * len(key)) if key else 0.0

    background = [f for f in facts if not f.key]
    retold = sum(
        1 for j, c in enumerate(clauses)
        if j not in used_clauses and any(_match(f, c) >= 4 for f in background)
    )
    article_words = set(prompt.split())
    invented = sum(
        1 for t in tokens
        if t not in article_words and (t in _NAME_SET or t in _PLACE_SET or t in _OBJECT_SET or t in _NUMBER_SET)
    )
    budget = BUDGET_PER_FACT * len(key) + BUDGET_SLACK
    return {
        "coverage": coverage,
        "faithfulness": -min(INVENTED_PENALTY * invented, 1.0),
        "distractor": -min(DISTRACTOR_PENALTY * retold, 1.0),
        "brevity": -min(LENGTH_PENALTY * max(0, len(tokens) - budget), 1.0),
    }


def gold_score(prompt: str, completion: str) -> float:
    """Gold score in [-1, 1] of a summary for a prompt of this world (1.0 = every key fact, nothing else)."""
    return max(-1.0, min(1.0, sum(gold_components(prompt, completion).values())))


# ----------------------------------------------------------------------------------------------
# Reference writers of mixed quality (they write the SFT data)


def write_summary(article: Article, writer: str, rng: random.Random) -> str:
    """A reference summary by one of :data:`WRITERS`.

    ``expert``: every key fact, nothing else. ``omitter``: drops one key fact. ``wordy``: adds
    times, roles and sometimes a background fact. ``inventor``: gets one number, name or place
    wrong (sometimes copied from background, sometimes made up).
    """
    key = list(article.key_facts)
    background = [f for f in article.facts if not f.key]
    clauses = []
    for f in key:
        verb = rng.choice(ACTIONS[f.action])
        if rng.random() < 0.2:
            clauses.append(f"{f.number} {f.obj} were {verb} by {f.actor} in {f.place} .")
        else:
            clauses.append(f.clause(verb))
    if writer == "omitter" and len(clauses) > 1:
        clauses.pop(rng.randrange(len(clauses)))
    elif writer == "wordy":
        i = rng.randrange(len(clauses))
        clauses[i] = clauses[i][:-2] + " " + rng.choice(RECENT_TIMES) + " ."
        if rng.random() < 0.5:
            j = rng.randrange(len(clauses))
            f = key[j] if j < len(key) else key[0]
            clauses[j] = clauses[j].replace(f.actor, f"{f.actor} , {rng.choice(ROLES)} ,", 1)
        if background and rng.random() < 0.5:
            clauses.insert(rng.randrange(len(clauses) + 1), rng.choice(background).clause())
    elif writer == "inventor":
        i = rng.randrange(len(clauses))
        f = key[i]
        slot, pool = rng.choice((("number", NUMBERS), ("actor", NAMES), ("place", PLACES)))
        old = getattr(f, slot)
        seen = {getattr(g, slot) for g in article.facts}
        if background and rng.random() < 0.5 and {getattr(g, slot) for g in background} - {old}:
            new = rng.choice(sorted({getattr(g, slot) for g in background} - {old}))
        else:
            new = rng.choice([w for w in pool if w not in seen])
        clauses[i] = " ".join(new if t == old else t for t in clauses[i].split())
    return " ".join(clauses)


WRITERS = ("expert", "omitter", "wordy", "inventor")
#: the mix of writers behind the SFT data (few inventors: invention is what RL must unlearn hardest)
WRITER_MIX = {"expert": 0.35, "omitter": 0.25, "wordy": 0.25, "inventor": 0.15}


def lead_summary(article: Article, k: int = 2) -> str:
    """The lead-k baseline: the first k sentences of the article."""
    return " . ".join(article.text.split(" . ")[:k]).rstrip(" .") + " ."


# ----------------------------------------------------------------------------------------------


class NewsTask(Task):
    """The micro news summarization task (see the module docstring).

    ``seed`` selects the world instance; ``seed=0`` is the one the frozen assets were built for.
    """

    name = "news"
    answer_cue = ANSWER_CUE

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def split_size(self, split: str) -> int:
        self.check_split(split)
        return _SPLIT_SIZES[split]

    def example(self, split: str, index: int) -> Article:
        """The ``index``-th article of ``split`` (deterministic; splits never share key facts)."""
        self.check_split(split)
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise ValueError(f"article index must be an int in [0, {_SPLIT_SIZES[split]}) for split {split!r}, got {index!r}.")
        if not 0 <= index < _SPLIT_SIZES[split]:
            raise IndexError(f"article {index} is outside split {split!r} of size {_SPLIT_SIZES[split]}.")
        for attempt in range(10_000):
            article = _sample_article(random.Random(f"news-{self.seed}-{split}-{index}-{attempt}"))
            if _split_of(article) == split:
                return article
        raise RuntimeError("unreachable: no article fell into the split")  # pragma: no cover

    def prompt(self, split: str, index: int) -> str:
        return self.example(split, index).prompt

    def facts(self, prompt: str) -> tuple[Fact, ...]:
        """Structured facts of a prompt (for fact-augmented reward models and labelers)."""
        return parse_article(prompt)

    def gold_one(self, prompt: str, completion: str) -> float:
        return gold_score(prompt, completion)

    def gold_components(self, prompt: str, completion: str) -> dict[str, float]:
        return gold_components(prompt, completion)

    def reference(self, split: str, index: int, writer: str | None = None) -> str:
        """A reference summary of one article; ``writer=None`` draws the writer from :data:`WRITER_MIX`."""
        rng = random.Random(f"writer-{self.seed}-{split}-{index}")
        if writer is None:
            writer = rng.choices(list(WRITER_MIX), weights=list(WRITER_MIX.values()))[0]
        if writer not in WRITERS:
            raise ValueError(f"unknown writer {writer!r}; use one of {', '.join(WRITERS)}.")
        return write_summary(self.example(split, index), writer, rng)


# ----------------------------------------------------------------------------------------------
# Constructed completions whose majority preference cycles (RLHF-Intransitive-v0)

#: the three completion sets of :func:`cycle_completions`
CYCLE_SETS = ("A", "B", "C")


def _fresh(pool, seen, rng):
    return rng.choice([w for w in pool if w not in seen])


def cycle_completions(article: Article, rng: random.Random) -> dict[str, str]:
    """Three summaries of ``article`` whose majority preference cycles for the ``"intransitive"`` population.

    * ``A`` complete but inventive: every key fact, then one made-up event (a name, number, object
      and place the article never mentions). Coverage high, faithfulness low (-0.6), a little long.
    * ``B`` faithful but padded: "reports say", every key fact but one, each with a role and a
      time, plus a retold background fact. Coverage middling, faithfulness perfect, brevity and
      relevance poor.
    * ``C`` brief but sloppy: one key fact with a wrong place. Coverage low, faithfulness middling
      (-0.15), no extra words.

    The coverage-only labeler ranks A > B > C, the faithfulness-only labeler B > C > A and the
    brevity-only labeler (brevity + distractor) C > A > B, so each pairwise majority is 2 of 3 and
    A > B > C > A (Condorcet).
    """
    key = list(article.key_facts)
    background = [f for f in article.facts if not f.key]
    seen = set(article.text.split())
    invented = Fact(_fresh(NAMES, seen, rng), rng.choice(list(ACTIONS)), _fresh(NUMBERS, seen, rng),
                    _fresh(OBJECTS, seen, rng), _fresh(PLACES, seen, rng), True)
    a = " ".join([f.clause() for f in key] + [invented.clause()])

    # B drops the key fact that shares least with the retold background fact, so the gold scorer
    # cannot mistake the retold clause for the dropped fact
    def overlap(f: Fact, g: Fact) -> int:
        return sum(x == y for x, y in zip(f.slots(), g.slots()))

    if background:
        drop, bg = min(((f, g) for f in key for g in background), key=lambda fg: overlap(*fg))
    else:
        drop, bg = key[-1], None
    kept = [f for f in key if f is not drop] or key[:1]
    parts = ["reports say"]
    for f in kept:
        parts.append(f"{f.actor} , {rng.choice(ROLES)} , {f.action} {f.number} {f.obj} in {f.place} {rng.choice(RECENT_TIMES)} .")
    if bg is not None:
        parts.insert(1 + rng.randrange(len(parts)), bg.clause())
    b = " ".join(parts)

    first = key[0]
    c = f"{first.actor} {first.action} {first.number} {first.obj} in {_fresh(PLACES, seen, rng)} ."
    return {"A": a, "B": b, "C": c}


__all__ = [
    "CYCLE_SETS",
    "cycle_completions",
    "NewsTask", "Article", "Fact", "gold_score", "gold_components", "parse_article", "write_summary",
    "lead_summary", "world_words", "WRITERS", "WRITER_MIX", "SPLITS",
]
