"""Human preference labels in a real database (SQLite by default, PostgreSQL by URL).

The labeling page (``rlhf-zoo label``, :mod:`rlhfgym.zoo.label`) writes here and the trainers read
from here: :func:`read_preferences` turns a database URL into a preference ``datasets.Dataset`` in
our schema (:mod:`.preferences`), which the reward-model build (``rlhf-zoo build-assets --only
reward --preferences URL``) and DPO (``dataset="sqlite:///prefs.db"``) train on.

Tables (SQLAlchemy 2 ORM, no SQL strings)::

    rlhfgym_meta   key/value; "schema_version" = SCHEMA_VERSION
    pairs          one comparison: prompt, completion_a, completion_b, where each came from
                   (source_a/source_b), the env reward model's scores (rm_a/rm_b, may be NULL),
                   a random rank (the serving order) and a unique content key
    labels         one planned label of a pair (a "slot"): the pair gets as many slots as labelers
                   should see it (1, or more for the overlap fraction); a slot is *reserved* by a
                   labeler (labeler, left_is_a = the randomised display order, reserved_at) and
                   *answered* when ``choice`` is set ("a", "b", "tie", "skip", in terms of the
                   pair's own a/b, not of the screen)

Concurrency without locks held across requests: a labeler takes a slot with a compare-and-set
``UPDATE labels SET labeler=... WHERE id=... AND labeler IS NULL`` (one row or none changes), and
``UNIQUE(pair_id, labeler)`` forbids one labeler two slots of one pair, so two labelers never get
the same slot and nobody's label is counted twice. Answers are committed before the request returns.
On SQLite every transaction starts with ``BEGIN IMMEDIATE`` (writers queue on the busy timeout
instead of failing on a stale read snapshot) in WAL mode.

The schema is versioned: a database written by another schema version is refused with a message
naming both versions (no silent migration). SQLAlchemy is an optional dependency
(``pip install 'rlhf-gym[label]'``); importing this module without it raises :class:`StoreError`
saying so.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import combinations
from typing import Any

SCHEMA_VERSION = 1
#: what a label may say about a pair (in the pair's own terms: completion_a or completion_b)
CHOICES = ("a", "b", "tie", "skip")
#: the two completions as the labeler saw them (the display order is random per labeler and recorded)
SIDES = ("left", "right")
#: a reservation nobody answered for this long goes back to the pool (a labeler closed the tab)
RESERVATION_TIMEOUT = timedelta(minutes=30)
INSTALL_HINT = "pip install 'rlhf-gym[label]'"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StoreError(ValueError):
    """A problem with the labeling database or a request to it; the message says what and how to fix it."""


class UnknownPair(StoreError):
    """A pair id that is not in the database."""


class OutOfOrder(StoreError):
    """A label for a pair that was not served to this labeler (or nothing to undo)."""


class AlreadyLabelled(StoreError):
    """A second answer to a slot that already has one (a double submit)."""


try:
    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc
    from sqlalchemy import orm
except ModuleNotFoundError as e:  # the optional extra is not installed
    raise StoreError(f"the labeling database needs SQLAlchemy 2 ({e.name} is not installed); {INSTALL_HINT}.") from e


def is_database_url(text: Any) -> bool:
    """True for ``scheme://...`` strings such as ``sqlite:///prefs.db`` or ``postgresql://u@host/db``."""
    return isinstance(text, str) and bool(_URL.match(text)) and not text.startswith("file://")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # naive UTC: the same on SQLite and PostgreSQL


def pair_key(prompt: str, a: str, b: str) -> str:
    """The content key of a pair (sha256 of its three texts): importing the same pair twice adds it once."""
    return hashlib.sha256("\x00".join((prompt, a, b)).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Schema


class Base(orm.DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "rlhfgym_meta"

    key: orm.Mapped[str] = orm.mapped_column(sa.String(64), primary_key=True)
    value: orm.Mapped[str] = orm.mapped_column(sa.String(256))


class Pair(Base):
    __tablename__ = "pairs"

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    key: orm.Mapped[str] = orm.mapped_column(sa.String(64), unique=True)
    prompt: orm.Mapped[str] = orm.mapped_column(sa.Text)
    completion_a: orm.Mapped[str] = orm.mapped_column(sa.Text)
    completion_b: orm.Mapped[str] = orm.mapped_column(sa.Text)
    source_a: orm.Mapped[str] = orm.mapped_column(sa.String(256), default="")
    source_b: orm.Mapped[str] = orm.mapped_column(sa.String(256), default="")
    rm_a: orm.Mapped[float | None] = orm.mapped_column(sa.Float, nullable=True)
    rm_b: orm.Mapped[float | None] = orm.mapped_column(sa.Float, nullable=True)
    rank: orm.Mapped[float] = orm.mapped_column(sa.Float, index=True)
    created_at: orm.Mapped[datetime] = orm.mapped_column(sa.DateTime, default=_utcnow)


class Label(Base):
    __tablename__ = "labels"
    __table_args__ = (sa.UniqueConstraint("pair_id", "labeler", name="one_label_per_labeler_and_pair"),)

    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    pair_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("pairs.id"), index=True)
    labeler: orm.Mapped[str | None] = orm.mapped_column(sa.String(64), nullable=True, index=True)
    left_is_a: orm.Mapped[bool | None] = orm.mapped_column(sa.Boolean, nullable=True)
    choice: orm.Mapped[str | None] = orm.mapped_column(sa.String(8), nullable=True)
    reserved_at: orm.Mapped[datetime | None] = orm.mapped_column(sa.DateTime, nullable=True)
    labelled_at: orm.Mapped[datetime | None] = orm.mapped_column(sa.DateTime, nullable=True)


# ----------------------------------------------------------------------------------------------
# What the page gets


@dataclass(frozen=True)
class ServedPair:
    """A pair as one labeler sees it: ``left``/``right`` are the completions in the recorded display order."""

    pair_id: int
    prompt: str
    left: str
    right: str
    left_is_a: bool


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` planned labels are answered (all labelers); ``mine`` by this labeler."""

    done: int
    total: int
    mine: int


LABELER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def check_labeler(labeler: Any) -> str:
    if not isinstance(labeler, str) or not LABELER_RE.match(labeler):
        raise StoreError(f"labeler id {labeler!r} is not valid; use 1-64 letters, digits or . _ @ - (e.g. alice).")
    return labeler


def describe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _engine(url: str):
    """An engine for ``url`` (``postgresql://`` uses psycopg 3, the driver the ``label`` extra installs)."""
    if not is_database_url(url):
        raise StoreError(f"{url!r} is not a database URL; use e.g. sqlite:///prefs.db or postgresql://user@host/db.")
    try:
        parsed = sa.engine.make_url(url)
    except sa_exc.ArgumentError as e:
        raise StoreError(f"cannot parse database URL {url!r} ({e}); use e.g. sqlite:///prefs.db.") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ModuleNotFoundError, sa_exc.NoSuchModuleError) as e:
        raise StoreError(f"no driver for {parsed.drivername} ({e}); {INSTALL_HINT} installs SQLite and PostgreSQL support.") from None
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock up front: no stale-snapshot upgrade errors
    return engine


class PreferenceStore:
    """The labeling database at ``url``: pairs to compare and the labels people gave them.

    Opening checks the connection and the schema version (creating the tables in an empty
    database unless ``create=False``). Every method runs in its own committed transaction.
    """

    def __init__(self, url: str, *, create: bool = True):
        self.url = url
        self.engine = _engine(url)
        self.Session = orm.sessionmaker(self.engine, expire_on_commit=False)
        try:
            self._check_schema(create)
        except sa_exc.OperationalError as e:
            self.engine.dispose()
            raise StoreError(f"cannot open database {describe_url(url)}: {_first_line(e)}; "
                             "check that the server runs and the URL (user, host, port, database name) is right.") from None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "PreferenceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- schema ------------------------------------------------------------------------------
    def _check_schema(self, create: bool) -> None:
        tables = set(sa.inspect(self.engine).get_table_names())
        where = describe_url(self.url)
        if Meta.__tablename__ not in tables:
            ours = {Pair.__tablename__, Label.__tablename__} & tables
            if ours:
                raise StoreError(f"{where} has table(s) {sorted(ours)} but no {Meta.__tablename__}: it is not an rlhf-gym "
                                 "labeling database; use another database (e.g. a new sqlite:///FILE).")
            if not create:
                raise StoreError(f"{where} holds no labeling data; label some with `rlhf-zoo label --db {where}` first.")
            Base.metadata.create_all(self.engine)
            with self.Session.begin() as s:
                if s.get(Meta, "schema_version") is None:
                    s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            return
        with self.Session() as s:
            row = s.get(Meta, "schema_version")
        found = row.value if row is not None else "none"
        if found != str(SCHEMA_VERSION):
            raise StoreError(f"{where} has labeling schema version {found}, but this rlhf-gym reads version {SCHEMA_VERSION}; "
                             "open it with the rlhf-gym release that wrote it, or use a new database.")

    @property
    def schema_version(self) -> int:
        with self.Session() as s:
            return int(s.get(Meta, "schema_version").value)

    # -- pairs -------------------------------------------------------------------------------
    def add_pairs(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], *,
                  source_a: Sequence[str] | str = "", source_b: Sequence[str] | str = "",
                  rm_a: Sequence[float] | None = None, rm_b: Sequence[float] | None = None,
                  overlap: float = 0.0, labelers_per_overlap: int = 2, seed: int = 0) -> int:
        """Add comparisons (skipping ones already present and pairs of identical completions);
        returns how many were added. A random ``overlap`` fraction of the new pairs is planned for
        ``labelers_per_overlap`` different labelers (for inter-annotator agreement), the rest for one."""
        n = len(prompts)
        if not (len(a) == len(b) == n):
            raise StoreError(f"mismatched lengths: {n} prompts, {len(a)} a, {len(b)} b; give one of each per pair.")
        if not 0.0 <= overlap <= 1.0:
            raise StoreError(f"overlap must be a fraction in [0, 1], got {overlap}.")
        if labelers_per_overlap < 1:
            raise StoreError(f"labelers_per_overlap must be >= 1, got {labelers_per_overlap}.")
        src_a = [source_a] * n if isinstance(source_a, str) else list(source_a)
        src_b = [source_b] * n if isinstance(source_b, str) else list(source_b)
        rng = random.Random(seed)
        added = 0
        with self.Session.begin() as s:
            known = set(s.scalars(sa.select(Pair.key)))
            for i in range(n):
                for field, text in (("prompt", prompts[i]), ("completion a", a[i]), ("completion b", b[i])):
                    if not isinstance(text, str):
                        raise StoreError(f"pair {i + 1}: {field} must be a string, got {type(text).__name__}.")
                key = pair_key(prompts[i], a[i], b[i])
                if a[i] == b[i] or key in known:
                    continue
                known.add(key)
                pair = Pair(key=key, prompt=prompts[i], completion_a=a[i], completion_b=b[i], source_a=src_a[i],
                            source_b=src_b[i], rm_a=_opt_float(rm_a, i), rm_b=_opt_float(rm_b, i), rank=rng.random())
                s.add(pair)
                s.flush()  # assigns pair.id
                slots = labelers_per_overlap if rng.random() < overlap else 1
                s.add_all([Label(pair_id=pair.id) for _ in range(slots)])
                added += 1
        return added

    def pair(self, pair_id: int) -> Pair:
        with self.Session() as s:
            pair = s.get(Pair, pair_id)
        if pair is None:
            raise UnknownPair(f"unknown pair id {pair_id}; reload the page to get the next pair.")
        return pair

    def pairs(self) -> list[Pair]:
        with self.Session() as s:
            return list(s.scalars(sa.select(Pair).order_by(Pair.id)))

    # -- serving -----------------------------------------------------------------------------
    def next_pair(self, labeler: str, order: Callable[[list[int]], list[int]] | None = None,
                  seed: int | None = None) -> ServedPair | None:
        """The pair ``labeler`` should label now, or None when nothing is left for them.

        A pair already reserved by ``labeler`` and not yet answered comes first (a reload, a
        restarted server or an undo shows the same pair again); otherwise the first free slot in
        ``order`` (a function that reorders candidate pair ids, e.g. by reward-model disagreement;
        default: the pairs' random rank) is reserved for them and its display order drawn.
        """
        check_labeler(labeler)
        rng = random.Random(seed)
        for _attempt in range(20):  # a lost race (another labeler took the slot) just tries the next one
            stale = _utcnow() - RESERVATION_TIMEOUT
            free = sa.or_(Label.labeler.is_(None), sa.and_(Label.choice.is_(None), Label.reserved_at < stale))
            with self.Session.begin() as s:
                open_slot = s.scalars(sa.select(Label).where(Label.labeler == labeler, Label.choice.is_(None))
                                      .order_by(Label.reserved_at.desc(), Label.id.desc()).limit(1)).first()
                if open_slot is not None:
                    return self._served(s, open_slot)
                mine = sa.select(Label.pair_id).where(Label.labeler == labeler)
                rows = s.execute(sa.select(Label.id, Label.pair_id).join(Pair, Pair.id == Label.pair_id)
                                 .where(free, Label.pair_id.not_in(mine)).order_by(Pair.rank, Label.id)).all()
            if not rows:
                return None
            slot_of: dict[int, int] = {}
            for slot_id, pair_id in rows:
                slot_of.setdefault(pair_id, slot_id)
            candidates = list(slot_of)
            if order is not None:  # outside the transaction: it may read the database itself
                candidates = [p for p in order(candidates) if p in slot_of] or candidates
            slot_id = slot_of[candidates[0]]
            try:
                with self.Session.begin() as s:
                    took = s.execute(sa.update(Label).where(Label.id == slot_id, free)
                                     .values(labeler=labeler, left_is_a=rng.random() < 0.5, reserved_at=_utcnow(),
                                             choice=None, labelled_at=None))
                    if took.rowcount == 1:
                        return self._served(s, s.get(Label, slot_id, populate_existing=True))
            except sa_exc.IntegrityError:
                continue  # the same labeler reserved this pair meanwhile (two tabs): look again
        raise StoreError("could not reserve a pair after 20 tries (many labelers at once?); reload the page.")

    @staticmethod
    def _served(s, slot: Label) -> ServedPair:
        pair = s.get(Pair, slot.pair_id)
        left, right = (pair.completion_a, pair.completion_b) if slot.left_is_a else (pair.completion_b, pair.completion_a)
        return ServedPair(pair.id, pair.prompt, left, right, bool(slot.left_is_a))

    def record(self, labeler: str, pair_id: int, choice: str) -> Progress:
        """Store ``labeler``'s answer for ``pair_id`` and commit it. ``choice`` is one of
        :data:`CHOICES` (the pair's own a/b) or of :data:`SIDES` (what the labeler saw: ``left`` /
        ``right``, mapped through the recorded display order). Raises :class:`UnknownPair`,
        :class:`OutOfOrder` (the pair was not served to this labeler) or :class:`AlreadyLabelled`
        (a double submit)."""
        check_labeler(labeler)
        if choice not in CHOICES and choice not in SIDES:
            raise StoreError(f"choice {choice!r} is not one of {', '.join((*SIDES, *CHOICES))}.")
        if isinstance(pair_id, bool) or not isinstance(pair_id, int):
            raise StoreError(f"pair id must be an integer, got {pair_id!r}.")
        self.pair(pair_id)
        with self.Session.begin() as s:
            slot = s.scalars(sa.select(Label).where(Label.pair_id == pair_id, Label.labeler == labeler)).first()
            if slot is None:
                raise OutOfOrder(f"pair {pair_id} was not served to labeler {labeler!r}; reload the page to get your next pair.")
            if choice in SIDES:
                choice = "a" if (choice == "left") == bool(slot.left_is_a) else "b"
            done = s.execute(sa.update(Label).where(Label.id == slot.id, Label.choice.is_(None))
                             .values(choice=choice, labelled_at=_utcnow()))
            if done.rowcount != 1:
                raise AlreadyLabelled(f"labeler {labeler!r} already labelled pair {pair_id}; the page moves on to the next pair.")
        return self.progress(labeler)

    def undo(self, labeler: str) -> int:
        """Take back ``labeler``'s most recent answer; that pair is served to them again next.
        Returns its id. Raises :class:`OutOfOrder` when they have answered nothing."""
        check_labeler(labeler)
        with self.Session.begin() as s:
            last = s.scalars(sa.select(Label).where(Label.labeler == labeler, Label.choice.is_not(None))
                             .order_by(Label.labelled_at.desc(), Label.id.desc()).limit(1)).first()
            if last is None:
                raise OutOfOrder(f"labeler {labeler!r} has no answer to undo.")
            # the pair on screen goes back to the pool so the undone one is shown next
            s.execute(sa.update(Label).where(Label.labeler == labeler, Label.choice.is_(None))
                      .values(labeler=None, left_is_a=None, reserved_at=None))
            s.execute(sa.update(Label).where(Label.id == last.id)
                      .values(choice=None, labelled_at=None, reserved_at=_utcnow()))
            return last.pair_id

    # -- reading -----------------------------------------------------------------------------
    def progress(self, labeler: str | None = None) -> Progress:
        with self.Session() as s:
            total = s.scalar(sa.select(sa.func.count(Label.id)))
            done = s.scalar(sa.select(sa.func.count(Label.id)).where(Label.choice.is_not(None)))
            mine = 0 if labeler is None else s.scalar(
                sa.select(sa.func.count(Label.id)).where(Label.labeler == labeler, Label.choice.is_not(None)))
        return Progress(int(done), int(total), int(mine))

    def answers(self) -> list[tuple[Pair, Label]]:
        """Every answered label with its pair, in answer order."""
        with self.Session() as s:
            rows = s.execute(sa.select(Pair, Label).join(Label, Label.pair_id == Pair.id)
                             .where(Label.choice.is_not(None)).order_by(Label.labelled_at, Label.id)).all()
        return [(p, lab) for p, lab in rows]

    def stats(self) -> dict[str, Any]:
        """The admin view: answers per labeler, agreement between labelers on pairs labelled more
        than once, and agreement of the labels with the env reward model's scores (``rm_a``/``rm_b``)."""
        per: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys((*CHOICES, "total"), 0))
        by_pair: dict[int, list[str]] = defaultdict(list)
        rm_hits = rm_n = 0
        for pair, lab in self.answers():
            row = per[lab.labeler]
            row[lab.choice] += 1
            row["total"] += 1
            if lab.choice == "skip":
                continue
            by_pair[pair.id].append(lab.choice)
            if lab.choice in ("a", "b") and pair.rm_a is not None and pair.rm_b is not None and pair.rm_a != pair.rm_b:
                rm_n += 1
                rm_hits += (pair.rm_a > pair.rm_b) == (lab.choice == "a")
        agree = n_pairs_of_labels = 0
        multi = [c for c in by_pair.values() if len(c) >= 2]
        for choices in multi:
            for x, y in combinations(choices, 2):
                n_pairs_of_labels += 1
                agree += x == y
        return {
            "progress": self.progress().__dict__,
            "labelers": {k: per[k] for k in sorted(per)},
            "pairs_labelled_more_than_once": len(multi),
            "inter_annotator_agreement": agree / n_pairs_of_labels if n_pairs_of_labels else None,
            "inter_annotator_comparisons": n_pairs_of_labels,
            "reward_model_agreement": rm_hits / rm_n if rm_n else None,
            "reward_model_comparisons": rm_n,
        }

    def preference_records(self) -> list[dict[str, Any]]:
        """Answered labels in our preference schema (:data:`.preferences.COLUMNS`): a choice gives
        ``label_prob`` 1 (chosen = the picked completion), a tie 1/2; skips are left out."""
        out = []
        for pair, lab in self.answers():
            if lab.choice == "skip":
                continue
            chosen, rejected = ((pair.completion_b, pair.completion_a) if lab.choice == "b"
                                else (pair.completion_a, pair.completion_b))
            out.append({"prompt": pair.prompt, "chosen": chosen, "rejected": rejected,
                        "label_prob": 0.5 if lab.choice == "tie" else 1.0, "labeler_id": lab.labeler})
        return out

    def to_dataset(self):
        """:meth:`preference_records` as a validated ``datasets.Dataset`` (see :mod:`.preferences`)."""
        from .preferences import make_preferences

        recs = self.preference_records()
        if not recs:
            raise StoreError(f"{describe_url(self.url)} has no answered labels yet (skips do not count); "
                             f"label some with `rlhf-zoo label --db {describe_url(self.url)}`.")
        return make_preferences([r["prompt"] for r in recs], [r["chosen"] for r in recs], [r["rejected"] for r in recs],
                                [r["label_prob"] for r in recs], [r["labeler_id"] for r in recs])


def _opt_float(values: Sequence[float] | None, i: int) -> float | None:
    if values is None:
        return None
    v = float(values[i])
    return v if math.isfinite(v) else None


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e)
    return " ".join(text.strip().splitlines()[:1]) or type(e).__name__


def read_preferences(url: str):
    """The answered labels of the labeling database at ``url`` as a preference ``datasets.Dataset``."""
    with PreferenceStore(url, create=False) as store:
        return store.to_dataset()


def export_preferences(url: str, path) -> Any:
    """Write the labels of ``url`` to ``path`` with :func:`.preferences.save_preferences` (``*.jsonl``: JSONL in
    our schema, anything else a ``datasets`` directory); atomic. Returns the path."""
    from .preferences import save_preferences

    return save_preferences(read_preferences(url), path)


__all__ = [
    "SCHEMA_VERSION", "CHOICES", "SIDES", "StoreError", "UnknownPair", "OutOfOrder", "AlreadyLabelled", "PreferenceStore",
    "ServedPair", "Progress", "is_database_url", "describe_url", "pair_key", "check_labeler", "read_preferences", "export_preferences",
]
