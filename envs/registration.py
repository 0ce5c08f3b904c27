"""Factories behind the registered env ids, and :func:`register_envs`.

``gym.make("RLHF-Summarize-v0", **kwargs)`` calls :func:`make_summarize_env`;
``gym.make_vec("RLHF-Summarize-v0", num_envs=N, **kwargs)`` calls :func:`make_summarize_vector_env`
(a torch-native :class:`~.vector_env.TokenMDPVectorEnv`, not a SyncVectorEnv of N models).

This module imports nothing heavy at import time (torch/transformers are imported by the
factories), so ``register_envs()`` is cheap to call from ``rlhfgym.envs``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import gymnasium as gym

from .feedback.factories import REWARD_FACTORIES
from .hf import quiet_transformers

__all__ = [
    "ENV_IDS",
    "REWARD_MODELS",
    "make_summarize_env",
    "make_summarize_vector_env",
    "register_envs",
    "build_components",
]

#: registered env id -> kwargs baked into its spec
ENV_IDS: dict[str, dict[str, Any]] = {
    # The learned Bradley-Terry RM (assets reward/): 92.1% of the labelers' Bayes ceiling, over the
    # 90% target (docs/feedback.md). Until it met the target this id paid gold, as the foundation
    # issue allowed; it switched once, on 2026-11-22, and keeps this meaning from now on.
    "RLHF-Summarize-v0": {"reward_model": "learned"},
    "RLHF-Summarize-Gold-v0": {"reward_model": "gold"},  # the gold scorer itself
    "RLHF-Summarize-Fact-v0": {"reward_model": "fact"},  # Fact-RLHF: the RM also reads the article's key facts
    "RLHF-Intransitive-v0": {"reward_model": "intransitive"},  # a labeler population whose preferences cycle
    # RLAIF: the constitution judge (assets judge/, envs/constitutions/micro.yaml) compares each
    # completion with the SFT policy's greedy summary; reward P_judge(y > ref) - 1/2
    "RLHF-Summarize-AIF-v0": {"reward_model": "judge"},
}


def _gold_reward(task, tokenizer, device):
    from .rewards import GoldReward

    return GoldReward(task)


#: named reward models: name -> factory(task, tokenizer, device) -> reward. "gold" is the task's
#: gold scorer; the feedback models ("learned", "fact", "judge", "intransitive") load when an env
#: is made. Extend this to give an env id another reward by name.
REWARD_MODELS: dict[str, Callable[..., Any]] = {"gold": _gold_reward, **REWARD_FACTORIES}


# Default prompt budget for the micro news world: its prompts have at most ~80 word tokens.
DEFAULT_MAX_PROMPT_TOKENS = 96


def _micro_assets():
    from .assets import load_micro_assets

    return load_micro_assets()


@quiet_transformers()  # gym.make prints nothing the user did not ask for (no load bars or reports)
def build_components(
    *,
    reference=None,
    tokenizer=None,
    reward_model=None,
    task=None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Resolve the env's ingredients (shared by the single and the vector factory).

    * ``task``: None -> the micro world's ``NewsTask()``.
    * ``reference``: None -> the micro world's frozen SFT model; a path or hub name -> loaded with
      ``AutoModelForCausalLM.from_pretrained``; an ``nn.Module`` -> used as is.
    * ``tokenizer``: None -> the micro tokenizer if ``reference`` is None or a model object, else
      the tokenizer saved with ``reference`` (path or hub name); a path/name -> ``AutoTokenizer``;
      a tokenizer object -> used as is.
    * ``reward_model``: None or a name in :data:`REWARD_MODELS` ("gold") -> that factory; an object
      with ``score(prompts, completions)`` -> used as is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf import resolve_device
    from .rewards import RewardModel

    resolve_device(device)  # fail before loading anything if the device does not exist
    if task is None:
        from .tasks.news import NewsTask

        task = NewsTask()

    if tokenizer is None:
        if reference is None or isinstance(reference, torch.nn.Module):
            tokenizer = AutoTokenizer.from_pretrained(_micro_assets().tokenizer_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(reference)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    if reference is None:
        reference = AutoModelForCausalLM.from_pretrained(_micro_assets().sft_dir)
    elif isinstance(reference, (str, os.PathLike)):
        reference = AutoModelForCausalLM.from_pretrained(reference)
    elif not isinstance(reference, torch.nn.Module):
        raise ValueError(f"reference must be None, a path, a hub name or a causal LM, got {type(reference).__name__}.")

    if reward_model is None:
        reward_model = "gold"
    if isinstance(reward_model, str):
        if reward_model not in REWARD_MODELS:
            raise ValueError(f"unknown reward model {reward_model!r}; use one of {sorted(REWARD_MODELS)} or pass an object.")
        reward_model = REWARD_MODELS[reward_model](task, tokenizer, device)
    elif not isinstance(reward_model, RewardModel):
        raise ValueError(
            f"reward_model must be a name ({sorted(REWARD_MODELS)}) or have score(prompts, completions); "
            f"got {type(reward_model).__name__}."
        )
    return {"task": task, "tokenizer": tokenizer, "reference": reference, "reward_model": reward_model}


def make_summarize_env(
    split: str = "train",
    kl_coef: float = 0.05,
    max_new_tokens: int = 32,
    device: str = "cpu",
    reference=None,
    tokenizer=None,
    reward_model=None,
    seed: int | None = None,
    *,
    task=None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    compute_ref: bool | None = None,
):
    """A :class:`~.token_env.TokenMDPEnv` on the summarization task (see :func:`build_components`).

    ``seed`` seeds the env's generator now, so the first ``reset()`` without a seed is reproducible.
    """
    from .token_env import TokenMDPEnv

    parts = build_components(reference=reference, tokenizer=tokenizer, reward_model=reward_model, task=task, device=device)
    return TokenMDPEnv(
        **parts,
        split=split,
        kl_coef=kl_coef,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_new_tokens,
        device=device,
        compute_ref=compute_ref,
        seed=seed,
    )


def make_summarize_vector_env(
    num_envs: int = 1,
    split: str = "train",
    kl_coef: float = 0.05,
    max_new_tokens: int = 32,
    device: str = "cpu",
    reference=None,
    tokenizer=None,
    reward_model=None,
    seed: int | None = None,
    *,
    task=None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    autoreset_mode="NextStep",
    compute_ref: bool | None = None,
):
    """A torch-native :class:`~.vector_env.TokenMDPVectorEnv` with ``num_envs`` rows.

    ``seed`` seeds row ``i`` with ``seed + i`` now (as ``reset(seed=seed)`` would).
    """
    from .vector_env import TokenMDPVectorEnv

    parts = build_components(reference=reference, tokenizer=tokenizer, reward_model=reward_model, task=task, device=device)
    return TokenMDPVectorEnv(
        **parts,
        num_envs=num_envs,
        split=split,
        kl_coef=kl_coef,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_new_tokens,
        device=device,
        autoreset_mode=autoreset_mode,
        compute_ref=compute_ref,
        seed=seed,
    )


def register_envs() -> None:
    """Register the rlhf-gym env ids with gymnasium (idempotent)."""
    for env_id, kwargs in ENV_IDS.items():
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point="rlhfgym.envs.registration:make_summarize_env",
            vector_entry_point="rlhfgym.envs.registration:make_summarize_vector_env",
            kwargs=dict(kwargs),
        )
