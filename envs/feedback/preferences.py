"""Preference records: who preferred which completion of which prompt, and how surely.

One record is ``{prompt, chosen, rejected, label_prob, labeler_id}`` where ``label_prob`` is
P(chosen > rejected) in [0, 1] (1.0 for a hard human click; a soft value for AI labels or for
a labeler's known choice probability; values below 1/2 are allowed and mean the labeler leaned
the other way). Records live in a Hugging Face :class:`datasets.Dataset` with the fixed
:data:`FEATURES`, saved with ``save_to_disk`` (atomically) or exported to JSONL.

:func:`load_preferences` reads a ``datasets`` directory or a local JSONL (or JSON list) file in
our schema or in OpenAI's TL;DR comparisons schema (``summarize_from_feedback``)::

    {"info": {"post": "...", "title": "...", "subreddit": "..."},
     "summaries": [{"text": "..."}, {"text": "..."}], "choice": 0, "worker": "w1"}

and a flat variant ``{"prompt" | "post", "summary_0", "summary_1" | "summaries", "choice"}``.
Anything else raises :class:`PreferenceDataError` naming the record, the problem and the fix.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from ..assets import atomic_save_dir, atomic_write_text

COLUMNS = ("prompt", "chosen", "rejected", "label_prob", "labeler_id")
FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "label_prob": datasets.Value("float64"),
        "labeler_id": datasets.Value("string"),
    }
)
OUR_SCHEMA_HELP = (
    'our schema is {"prompt": str, "chosen": str, "rejected": str, "label_prob": float in [0, 1] '
    '(optional, default 1.0), "labeler_id": str (optional)}'
)
TLDR_SCHEMA_HELP = (
    'the TL;DR schema is {"info": {"post": str}, "summaries": [{"text": str}, {"text": str}], "choice": 0 or 1} '
    '(flat variant: {"prompt" or "post": str, "summary_0": str, "summary_1": str, "choice": 0 or 1})'
)


class PreferenceDataError(ValueError):
    """A preference file or record is malformed; the message says where, what and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Building and validating


def _check_prob(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PreferenceDataError(f"{where}: label_prob must be a number in [0, 1], got {value!r}.")
    p = float(value)
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise PreferenceDataError(
            f"{where}: label_prob {value!r} is outside [0, 1]; it is P(chosen > rejected), "
            "so use 1.0 for a hard choice (or swap chosen and rejected if the value is a logit or a margin)."
        )
    return p


def _check_text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise PreferenceDataError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r}.")
    return value


def make_preferences(
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    label_prob: Sequence[float] | None = None,
    labeler_id: Sequence[str] | str | None = None,
) -> datasets.Dataset:
    """Validated preference records as a :class:`datasets.Dataset` with :data:`FEATURES`.

    ``label_prob`` defaults to 1.0 (hard choices); ``labeler_id`` may be one string for all rows.
    """
    n = len(prompts)
    if label_prob is None:
        label_prob = [1.0] * n
    if labeler_id is None or isinstance(labeler_id, str):
        labeler_id = [labeler_id or "unknown"] * n
    lengths = {"prompts": n, "chosen": len(chosen), "rejected": len(rejected),
               "label_prob": len(label_prob), "labeler_id": len(labeler_id)}
    if len(set(lengths.values())) != 1:
        raise PreferenceDataError(
            f"mismatched lengths {lengths}; pass one chosen, rejected, label_prob and labeler_id per prompt."
        )
    rows = {
        "prompt": [_check_text(x, "prompt", f"record {i + 1}") for i, x in enumerate(prompts)],
        "chosen": [_check_text(x, "chosen", f"record {i + 1}") for i, x in enumerate(chosen)],
        "rejected": [_check_text(x, "rejected", f"record {i + 1}") for i, x in enumerate(rejected)],
        "label_prob": [_check_prob(p, f"record {i + 1}") for i, p in enumerate(label_prob)],
        "labeler_id": [str(x) for x in labeler_id],
    }
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def validate_preferences(ds: datasets.Dataset, source: str = "dataset") -> datasets.Dataset:
    """Check that ``ds`` has our columns and sane values; returns it cast to :data:`FEATURES`."""
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise PreferenceDataError(
            f"{source}: missing column(s) {missing} (has {ds.column_names}); {OUR_SCHEMA_HELP}."
        )
    if len(ds) == 0:
        raise PreferenceDataError(f"{source}: no preference records; add at least one record.")
    if "label_prob" not in ds.column_names:
        ds = ds.add_column("label_prob", [1.0] * len(ds))
    if "labeler_id" not in ds.column_names:
        ds = ds.add_column("labeler_id", ["unknown"] * len(ds))
    for i, p in enumerate(ds["label_prob"]):
        _check_prob(p, f"{source}: record {i + 1}")
    for col in ("prompt", "chosen", "rejected"):
        for i, x in enumerate(ds[col]):
            _check_text(x, col, f"{source}: record {i + 1}")
    ds = ds.select_columns(list(COLUMNS))
    return ds.cast(FEATURES) if ds.features != FEATURES else ds


def hard_labels(ds: datasets.Dataset) -> list[int]:
    """1 where the record says chosen beat rejected (label_prob > 1/2), 0 where it leans the other
    way, -1 for a tie (label_prob == 1/2, which no hard prediction can get right or wrong)."""
    return [1 if p > 0.5 else 0 if p < 0.5 else -1 for p in ds["label_prob"]]


# ----------------------------------------------------------------------------------------------
# Record schemas


def _tldr_prompt(info: Mapping[str, Any]) -> str:
    """OpenAI's TL;DR prompt layout (SUBREDDIT / TITLE / POST / TL;DR:) when the parts are present."""
    post = info["post"]
    if "title" in info or "subreddit" in info:
        return (
            f"SUBREDDIT: r/{info.get('subreddit', '')}\nTITLE: {info.get('title', '')}\n"
            f"POST: {post}\n\nTL;DR:"
        )
    return f"{post}\n\nTL;DR:"


def _summary_text(s: Any, where: str) -> str:
    if isinstance(s, Mapping):
        if "text" not in s:
            raise PreferenceDataError(f'{where}: a summary object has no "text" field; give {{"text": "..."}}.')
        s = s["text"]
    return _check_text(s, "summary", where)


def _choice_record(prompt: Any, summaries: Any, choice: Any, labeler: Any, where: str) -> dict[str, Any]:
    prompt = _check_text(prompt, "post/prompt", where)
    if not isinstance(summaries, (list, tuple)):
        raise PreferenceDataError(f"{where}: \"summaries\" must be a list of two summaries, got {type(summaries).__name__}.")
    if len(summaries) != 2:
        raise PreferenceDataError(
            f"{where}: mismatched lengths: {len(summaries)} summaries but a choice is between exactly 2; "
            "keep the two compared summaries."
        )
    if isinstance(choice, bool) or choice not in (0, 1):
        raise PreferenceDataError(
            f"{where}: choice {choice!r} is outside {{0, 1}}; it is the index of the preferred summary."
        )
    texts = [_summary_text(s, where) for s in summaries]
    return {"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice],
            "label_prob": 1.0, "labeler_id": str(labeler if labeler is not None else "tldr")}


def parse_record(
    rec: Any, where: str = "record", tldr_prompt: Callable[[Mapping[str, Any]], str] = _tldr_prompt
) -> dict[str, Any]:
    """One record in any supported schema -> our schema (a dict with :data:`COLUMNS`)."""
    if not isinstance(rec, Mapping):
        raise PreferenceDataError(f"{where}: expected a JSON object, got {type(rec).__name__}; {OUR_SCHEMA_HELP}.")
    keys = set(rec)
    # our schema
    if keys & {"chosen", "rejected"}:
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
        if missing:
            raise PreferenceDataError(f"{where}: missing field(s) {missing}; {OUR_SCHEMA_HELP}.")
        return {
            "prompt": _check_text(rec["prompt"], "prompt", where),
            "chosen": _check_text(rec["chosen"], "chosen", where),
            "rejected": _check_text(rec["rejected"], "rejected", where),
            "label_prob": _check_prob(rec.get("label_prob", 1.0), where),
            "labeler_id": str(rec.get("labeler_id", "unknown")),
        }
    # TL;DR comparisons (nested) and the flat variant
    if keys & {"summaries", "summary_0", "summary_1", "choice"}:
        labeler = rec.get("worker", rec.get("labeler_id"))
        if "info" in rec:
            info = rec["info"]
            if not isinstance(info, Mapping) or "post" not in info:
                raise PreferenceDataError(f'{where}: missing field "info.post"; {TLDR_SCHEMA_HELP}.')
            prompt = tldr_prompt(info)
        elif "prompt" in rec or "post" in rec:
            prompt = rec.get("prompt", rec.get("post"))
        else:
            raise PreferenceDataError(f'{where}: missing field "info.post" (or "prompt"/"post"); {TLDR_SCHEMA_HELP}.')
        if "summaries" in rec:
            summaries = rec["summaries"]
        else:
            missing = [k for k in ("summary_0", "summary_1") if k not in rec]
            if missing:
                raise PreferenceDataError(f"{where}: missing field(s) {missing}; {TLDR_SCHEMA_HELP}.")
            summaries = [rec["summary_0"], rec["summary_1"]]
        if "choice" not in rec:
            raise PreferenceDataError(f'{where}: missing field "choice" (0 or 1); {TLDR_SCHEMA_HELP}.')
        return _choice_record(prompt, summaries, rec["choice"], labeler, where)
    raise PreferenceDataError(
        f"{where}: unknown schema with fields {sorted(keys)}; {OUR_SCHEMA_HELP}, or {TLDR_SCHEMA_HELP}."
    )


def records_to_dataset(records: Iterable[Mapping[str, Any]], source: str = "records") -> datasets.Dataset:
    """Parse records of any supported schema into a validated Dataset."""
    rows = [parse_record(r, f"{source}: record {i + 1}") for i, r in enumerate(records)]
    if not rows:
        raise PreferenceDataError(f"{source}: no preference records; add at least one record.")
    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=FEATURES)


# ----------------------------------------------------------------------------------------------
# Files


def _read_json_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise PreferenceDataError(f"{path}: the file is empty; it must hold one JSON preference record per line.")
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON list of records
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PreferenceDataError(f"{path}: not valid JSON ({e}); write a JSON list or one record per line.") from None
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise PreferenceDataError(
                f"{path}: record {len(records) + 1} (line {lineno}) is not valid JSON ({e.msg}); "
                "JSONL needs one complete JSON object per line."
            ) from None
    return records


def load_preferences(path: str | os.PathLike[str]) -> datasets.Dataset:
    """Read preferences from a ``datasets`` directory (``save_to_disk``) or a JSONL/JSON file.

    Files may be in our schema, the TL;DR comparisons schema or its flat variant (per record).
    Raises :class:`PreferenceDataError` for anything malformed.
    """
    path = Path(path)
    if not path.exists():
        raise PreferenceDataError(f"{path}: no such file or directory; pass a JSONL file or a save_preferences() directory.")
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises FileNotFoundError for non-dataset dirs
            raise PreferenceDataError(
                f"{path}: not a datasets directory ({e}); save one with save_preferences(ds, dir) or pass a JSONL file."
            ) from None
        if isinstance(ds, datasets.DatasetDict):
            raise PreferenceDataError(f"{path}: holds a DatasetDict {list(ds)}; load one split and pass that directory.")
        if not {"chosen", "rejected"} & set(ds.column_names) and {"summaries", "summary_0", "choice"} & set(ds.column_names):
            return records_to_dataset(ds.to_list(), str(path))  # a saved copy of the TL;DR comparisons
        return validate_preferences(ds, str(path))
    return records_to_dataset(_read_json_records(path), str(path))


def save_preferences(ds: datasets.Dataset, path: str | os.PathLike[str]) -> Path:
    """Save atomically: ``*.jsonl``/``*.json`` paths get JSONL, anything else a ``save_to_disk`` directory."""
    ds = validate_preferences(ds, "save_preferences")
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return export_jsonl(ds, path)
    with atomic_save_dir(path) as tmp:
        ds.save_to_disk(str(tmp))
    return path


def export_jsonl(ds: datasets.Dataset, path: str | os.PathLike[str]) -> Path:
    """Write one JSON record per line in our schema (atomic)."""
    lines = [json.dumps({c: row[c] for c in COLUMNS}, ensure_ascii=False) for row in ds]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def import_jsonl(path: str | os.PathLike[str]) -> datasets.Dataset:
    """Read a JSONL file in any supported schema (same as :func:`load_preferences` on a file)."""
    return load_preferences(path)


__all__ = [
    "COLUMNS", "FEATURES", "PreferenceDataError", "make_preferences", "validate_preferences", "hard_labels",
    "parse_record", "records_to_dataset", "load_preferences", "save_preferences", "export_jsonl", "import_jsonl",
]
