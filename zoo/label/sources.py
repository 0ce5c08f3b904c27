"""Where the pairs to label come from: a file of pairs, or two policies' samples on an env's prompts.

* :func:`pairs_from_file`: JSONL (or a JSON list), one pair per record, either
  ``{"prompt", "completion_a", "completion_b"}`` (also ``"a"``/``"b"``, optional ``"source_a"``/``"source_b"``),
  a preference record of our schema (``chosen``/``rejected`` become a/b; the page shuffles them anyway),
  or a TL;DR comparison (``info.post``/``summaries``).
* :func:`pairs_from_policies`: ``n`` prompts of an env's split, one sample per prompt from each of two
  policies: ``sft`` (the env's reference policy) or a saved agent (a run directory of ``rlhf-zoo
  train`` / ``benchmark``, or its ``agent/`` directory), loaded as ``rlhf-zoo eval`` loads them.
  ``--from-policies sft,sft`` compares two samples of one policy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFERENCE_NAMES = ("sft", "reference", "ref")


class PairSourceError(ValueError):
    """A pair file or policy spec that cannot be read; the message says where and how to fix it."""


@dataclass
class PairBatch:
    """Pairs to add to a store (parallel lists); ``rm_a``/``rm_b`` are the env reward model's scores or None."""

    prompts: list[str] = field(default_factory=list)
    a: list[str] = field(default_factory=list)
    b: list[str] = field(default_factory=list)
    source_a: list[str] = field(default_factory=list)
    source_b: list[str] = field(default_factory=list)
    rm_a: list[float] | None = None
    rm_b: list[float] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def _pair_record(rec: Any, where: str) -> tuple[str, str, str, str, str]:
    if not isinstance(rec, dict):
        raise PairSourceError(f"{where}: expected a JSON object, got {type(rec).__name__}; "
                              'write {"prompt": ..., "completion_a": ..., "completion_b": ...}.')
    for a_key, b_key in (("completion_a", "completion_b"), ("a", "b")):
        if a_key in rec or b_key in rec:
            missing = [k for k in ("prompt", a_key, b_key) if k not in rec]
            if missing:
                raise PairSourceError(f"{where}: missing field(s) {missing}; "
                                      'write {"prompt": ..., "completion_a": ..., "completion_b": ...}.')
            values = (rec["prompt"], rec[a_key], rec[b_key])
            if not all(isinstance(v, str) for v in values):
                raise PairSourceError(f"{where}: prompt and completions must be strings.")
            return (*values, str(rec.get("source_a", "")), str(rec.get("source_b", "")))
    from rlhfgym.envs.feedback.preferences import PreferenceDataError, parse_record

    try:
        parsed = parse_record(rec, where)  # our preference schema or a TL;DR comparison
    except PreferenceDataError as e:
        raise PairSourceError(f"{e} A pair record is {{\"prompt\", \"completion_a\", \"completion_b\"}}.") from None
    return parsed["prompt"], parsed["chosen"], parsed["rejected"], "", ""


def pairs_from_file(path: str | Path) -> PairBatch:
    """Read pairs from a JSONL file (or a JSON list)."""
    path = Path(path)
    if not path.is_file():
        raise PairSourceError(f"--pairs {path}: no such file; give a JSONL file with one pair per line.")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise PairSourceError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); write a JSON list or JSONL.") from None
        lines = [(i + 1, r) for i, r in enumerate(records)]
    else:
        lines = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    lines.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise PairSourceError(f"{path}: line {lineno} is not valid JSON ({e.msg}); JSONL needs one object per line.") from None
    if not lines:
        raise PairSourceError(f"{path}: no pairs in the file; write one JSON pair per line.")
    batch = PairBatch()
    for lineno, rec in lines:
        prompt, a, b, sa, sb = _pair_record(rec, f"{path}: record at line {lineno}")
        batch.prompts.append(prompt)
        batch.a.append(a)
        batch.b.append(b)
        batch.source_a.append(sa or path.name)
        batch.source_b.append(sb or path.name)
    return batch


def policy_sampler(spec: str, core, device: str = "cpu"):
    """``(name, generate(prompts) -> completions)`` for ``sft`` or a saved agent's directory."""
    if spec in REFERENCE_NAMES:
        from rlhfgym.agents.common import reference_policy

        policy = reference_policy(core)
        return "sft", lambda prompts: policy.generate_text(prompts, temperature=1.0)
    from rlhfgym.zoo.train import saved_agent_dir

    agent_dir = saved_agent_dir(spec)
    if agent_dir is None:
        raise PairSourceError(f"--from-policies: {spec!r} is neither 'sft' nor a saved agent (no agent.json in it or in its "
                              "agent/); give sft or a run directory written by `rlhf-zoo train`.")
    from rlhfgym.agents import load

    agent = load(agent_dir, device=device)
    return str(spec), lambda prompts: agent.generate(prompts, temperature=1.0)


def pairs_from_policies(specs: Sequence[str], env_id: str, n: int, *, split: str = "train", start: int = 0,
                        seed: int = 0, device: str = "cpu", env=None) -> PairBatch:
    """One completion per prompt from each of two policies on the first ``n`` prompts of ``split``
    (from ``start``), scored by the env's reward model (``rm_a``/``rm_b``, for the admin view)."""
    import gymnasium as gym
    import torch

    import rlhfgym.envs  # noqa: F401  (registers the ids)

    specs = list(specs)
    if len(specs) == 1:
        specs = specs * 2
    if len(specs) != 2:
        raise PairSourceError(f"--from-policies takes two policies (a,b), got {len(specs)}: {','.join(specs)}.")
    env = env if env is not None else gym.make(env_id, device=device)
    core = env.unwrapped
    prompts = core.prompts(split, n, start)
    names, texts = [], []
    for k, spec in enumerate(specs):
        name, generate = policy_sampler(spec, core, device)
        torch.manual_seed(seed * 1000 + k)  # two samples of one policy differ
        names.append(name)
        texts.append([t.strip() for t in generate(prompts)])
    rm_a = core.score(prompts, texts[0]).double().cpu().tolist()
    rm_b = core.score(prompts, texts[1]).double().cpu().tolist()
    return PairBatch(list(prompts), texts[0], texts[1], [names[0]] * len(prompts), [names[1]] * len(prompts), rm_a, rm_b)


def score_pairs(batch: PairBatch, env_id: str, device: str = "cpu") -> PairBatch:
    """Fill in ``rm_a``/``rm_b`` with the env's reward model (a file's pairs, when ``--env`` is given)."""
    import gymnasium as gym

    import rlhfgym.envs  # noqa: F401

    core = gym.make(env_id, device=device).unwrapped
    batch.rm_a = core.score(batch.prompts, batch.a).double().cpu().tolist()
    batch.rm_b = core.score(batch.prompts, batch.b).double().cpu().tolist()
    return batch
