"""One evaluation protocol for summarization policies: sample, then score by gold (and a reward).

Every number rlhf-gym reports about a policy's samples (the SFT report that the asset build writes
into the manifest, the ``policy`` and ``sft`` rows of ``rlhf-zoo train``) comes from
:func:`evaluate_samples`:

1. ``torch.manual_seed(seed)``, once, before anything is sampled;
2. the prompts (the first ``n`` of a split) in order, ``batch_size`` prompts per call of the
   sampler, each prompt repeated ``samples_per_prompt`` times in a row;
3. every completion scored by the gold scorer (and by ``reward``, e.g. the env's reward model,
   where given, and by any extra per-sample ``measures``); the report holds their means.

A model is sampled with :func:`sample_completions` (:func:`lm_sampler` binds one): token by token
with :func:`~.lm.sample_tokens` (the loop agents' policies sample with too), prompts keeping their last ``max_prompt_tokens`` tokens as the
env's observations do, at most ``max_new_tokens`` new tokens, stopping at EOS. So the same policy
gives the same number whichever path evaluates it, as long as prompts, seed, batch size and window
agree. Nothing here imports the agents, the zoo or the asset build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .lm import decode_completions, encode_prompts, sample_tokens

__all__ = ["Samples", "sample_completions", "lm_sampler", "evaluate_samples"]


@dataclass
class Samples:
    """One completion per prompt of a batch. ``tokens`` / ``mask`` / ``logprobs``: ``(B, T)`` sampled
    ids (pad after EOS), 1 on the sampled tokens (EOS included), and their log-probabilities at the
    sampling temperature; ``prompt_ids``: the (cut) prompts the model read."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    texts: list[str]


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str], *, temperature: float = 1.0, max_new_tokens: int = 32,
                       max_prompt_tokens: int | None = None) -> Samples:
    """Sample one completion per prompt (greedy at ``temperature == 0``), all rows in one batch.

    Next-token log-probabilities are ``log_softmax(logits / temperature)`` over the tokenizer's
    vocabulary and a token is drawn with ``torch.multinomial`` (global torch RNG). A prompt longer
    than ``max_prompt_tokens`` keeps its last tokens (``None``: whole prompts). The model is put in
    eval mode while sampling and given back in the mode it was in.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token first.")
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    prompt_ids = encode_prompts(tokenizer, prompts)
    if max_prompt_tokens is not None:
        prompt_ids = [row[-max_prompt_tokens:] for row in prompt_ids]
    window = (max_prompt_tokens if max_prompt_tokens is not None else max(map(len, prompt_ids), default=1)) + max_new_tokens
    tokens, mask, logps, _ = sample_tokens(model, prompt_ids, max_new_tokens=max_new_tokens, window=window, eos_id=eos,
                                           pad_id=pad, vocab_size=len(tokenizer), temperature=temperature)
    texts = decode_completions(tokenizer, tokens.masked_fill(mask == 0, pad).tolist())
    return Samples(list(prompts), prompt_ids, tokens, mask, logps, texts)


def lm_sampler(model, tokenizer, *, max_new_tokens: int = 32, max_prompt_tokens: int | None = None
               ) -> Callable[[list[str], float], Samples]:
    """``sample(prompts, temperature) -> Samples``: :func:`sample_completions` of this model."""

    def sample(prompts: list[str], temperature: float) -> Samples:
        return sample_completions(model, tokenizer, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                                  max_prompt_tokens=max_prompt_tokens)

    return sample


def _floats(x) -> list[float]:
    return x.tolist() if hasattr(x, "tolist") else [float(v) for v in x]


@torch.no_grad()
def evaluate_samples(
    sample: Callable[[list[str], float], Any],
    prompts: Sequence[str],
    gold: Callable[[Sequence[str], Sequence[str]], Sequence[float]],
    *,
    reward: Callable[[Sequence[str], Sequence[str]], Any] | None = None,
    temperature: float = 1.0,
    samples_per_prompt: int = 1,
    batch_size: int = 100,
    seed: int = 0,
    measures: dict[str, Callable[[list[str], Any], Sequence[float]]] | None = None,
) -> dict[str, Any]:
    """Sample completions of ``prompts`` and score them, by the protocol of the module docstring.

    ``sample(prompts, temperature)`` returns one completion per prompt: a list of texts or an object
    with ``texts`` (e.g. :class:`Samples`, from :func:`lm_sampler`). ``gold(prompts, completions)``
    and ``reward(prompts, completions)`` (optional) score a batch; ``measures`` maps names to
    ``fn(prompts, samples) -> one value per completion`` (e.g. a KL to a reference model).

    Returns ``gold`` and ``reward`` (``None`` without one) and one entry per measure: means over all
    completions; ``n`` (prompts), ``samples_per_prompt``, ``temperature``; and per completion, in
    prompt-major order, ``texts``, ``gold_scores`` and ``reward_scores``.
    """
    k = int(samples_per_prompt)
    if k < 1 or batch_size < 1:
        raise ValueError(f"samples_per_prompt and batch_size must be >= 1, got {samples_per_prompt} and {batch_size}.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate on.")
    measures = dict(measures or {})
    torch.manual_seed(seed)
    texts: list[str] = []
    gold_scores: list[float] = []
    reward_scores: list[float] = []
    measured: dict[str, list[float]] = {name: [] for name in measures}
    for s in range(0, len(prompts), batch_size):
        ps = [p for p in prompts[s : s + batch_size] for _ in range(k)]
        out = sample(ps, temperature)
        for name, fn in measures.items():
            measured[name].extend(_floats(fn(ps, out)))
        ys = list(out.texts) if hasattr(out, "texts") else list(out)
        if len(ys) != len(ps):
            raise ValueError(f"the sampler returned {len(ys)} completions for {len(ps)} prompts; return one per prompt.")
        if reward is not None:
            reward_scores.extend(_floats(reward(ps, ys)))
        gold_scores.extend(_floats(gold(ps, ys)))
        texts.extend(ys)
    mean = lambda xs: float(sum(xs) / len(xs))  # noqa: E731
    return {
        "gold": mean(gold_scores),
        "reward": mean(reward_scores) if reward is not None else None,
        **{name: mean(v) for name, v in measured.items()},
        "n": len(prompts),
        "samples_per_prompt": k,
        "temperature": float(temperature),
        "texts": texts,
        "gold_scores": gold_scores,
        "reward_scores": reward_scores,
    }
