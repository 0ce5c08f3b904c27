"""Factories behind the registered env ids, and :func:`register_envs`.

``gym.make("RLHF-Summarize-v0", **kwargs)`` calls :func:`make_summarize_env`;
``gym.make_vec("RLHF-Summarize-v0", num_envs=N, **kwargs)`` calls :func:`make_summarize_vector_env`
(a torch-native :class:`~.vector_env.TokenMDPVectorEnv`, not a SyncVectorEnv of N models).

This module imports nothing heavy at import time (torch/transformers are imported by the
factories), so ``register_envs()`` is cheap to call from ``rlhfgym.envs``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym

from .config import DEFAULT_MAX_PROMPT_TOKENS  # noqa: F401  (its old home; EnvConfig's default)
from .feedback.factories import REWARD_FACTORIES
from .hf import quiet_transformers

__all__ = [
    "ENV_IDS",
    "REWARD_MODELS",
    "make_summarize_env",
    "make_summarize_vector_env",
    "register_envs",
    "build_components",
    "COMPONENTS",
]

#: registered env id -> kwargs baked into its spec
ENV_IDS: dict[str, dict[str, Any]] = {
    # The learned Bradley-Terry RM (assets reward/): 92.1% of the labelers' Bayes ceiling
    # (docs/feedback.md). Before 2026-11-22 this id paid gold; it switched once, when the RM was
    # shipped, and keeps this meaning from now on: another reward is a new version (-v1).
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


#: the env's components: objects (or names/paths) the factories resolve, not settings
COMPONENTS = ("reference", "tokenizer", "reward_model", "task")


def _micro_assets():
    from .assets import load_micro_assets

    return load_micro_assets()


def _offline() -> bool:
    """Whether the Hugging Face hub is off limits (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    import huggingface_hub.constants as hf_constants

    # huggingface_hub reads the variables once, at import; a later os.environ change counts too
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(hf_constants.HF_HUB_OFFLINE) or any(
        str(f).strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags if f is not None
    )


def _looks_local(name: str) -> bool:
    """A path rather than a hub repo id ("org/name" or "name")."""
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith(("./", "../", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    if os.path.exists(name) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return True
    parent = path.parent
    return str(parent) not in ("", ".") and parent.is_dir()


def _from_pretrained(loader, name, what: str):
    """``loader.from_pretrained(name)`` that fails fast, with the fix, for a missing directory or an
    uncached hub repo when offline (instead of a hub error or minutes of retries)."""
    text = os.fspath(name)
    if _looks_local(text):
        path = Path(text).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"{what}={text!r}: no such directory: {path.resolve()}. Pass a directory saved with "
                "save_pretrained (or a hub repo id such as 'org/name')."
            )
        return loader.from_pretrained(path)
    try:  # the local cache first: no network, no retries
        return loader.from_pretrained(text, local_files_only=True)
    except OSError:
        if _offline():
            raise ValueError(
                f"{what}={text!r} is not in the local Hugging Face cache and the hub is offline "
                "(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set); download it once while online, or pass a local "
                "directory saved with save_pretrained."
            ) from None
    try:
        return loader.from_pretrained(text)
    except OSError as e:
        raise ValueError(
            f"could not load {what}={text!r} from the Hugging Face hub ({e}). Check the repo id and your "
            "connection (or login for a gated repo), or pass a local directory saved with save_pretrained."
        ) from e


@quiet_transformers()  # gym.make prints nothing the user did not ask for (no load bars or reports)
def build_components(
    *,
    reference=None,
    tokenizer=None,
    reward_model=None,
    task=None,
    device: str = "cpu",
    split: str | None = None,
) -> dict[str, Any]:
    """Resolve the env's ingredients (shared by the single and the vector factory).

    * ``task``: None -> the micro world's ``NewsTask()``; ``split`` (if given) is checked on it
      before anything is loaded.
    * ``reference``: None -> the micro world's frozen SFT model; a path or hub name -> loaded with
      ``AutoModelForCausalLM.from_pretrained`` (a missing directory, or a hub name that is not cached
      while offline, fails at once); an ``nn.Module`` -> used as is.
    * ``tokenizer``: None -> the micro tokenizer if ``reference`` is None or a model object, else
      the tokenizer saved with ``reference`` (path or hub name); a path/name -> ``AutoTokenizer``;
      a tokenizer object -> used as is.
    * ``reward_model``: None or a name in :data:`REWARD_MODELS` ("gold") -> that factory; the path of a
      directory saved by :meth:`~.feedback.reward_model.RewardModel.save` (e.g. a reward model fitted
      with :func:`~.feedback.fitting.fit_reward_model`) -> :class:`~.feedback.fitting.FittedReward`;
      an object with ``score(prompts, completions)`` (a :class:`~.rewards.RewardFunction`) -> used as is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf import choose_cpu_threads, resolve_device
    from .rewards import RewardFunction
    from .tasks.base import Task

    resolve_device(device)  # fail before loading anything if the device does not exist
    if task is None:
        from .tasks.news import NewsTask

        task = NewsTask()
    elif not isinstance(task, Task):
        raise ValueError(f"task must be None or a rlhfgym.envs.tasks.base.Task, got {type(task).__name__}.")
    if split is not None:
        task.check_split(split)
    if reference is not None and not isinstance(reference, (str, os.PathLike, torch.nn.Module)):
        raise ValueError(f"reference must be None, a path, a hub name or a causal LM, got {type(reference).__name__}.")

    if tokenizer is None:
        if reference is None or isinstance(reference, torch.nn.Module):
            tokenizer = AutoTokenizer.from_pretrained(_micro_assets().tokenizer_dir)
        else:
            tokenizer = _from_pretrained(AutoTokenizer, reference, "reference")
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _from_pretrained(AutoTokenizer, tokenizer, "tokenizer")

    if reference is None:
        reference = AutoModelForCausalLM.from_pretrained(_micro_assets().sft_dir)
    elif isinstance(reference, (str, os.PathLike)):
        reference = _from_pretrained(AutoModelForCausalLM, reference, "reference")

    choose_cpu_threads(reference, device)  # one thread for a small model on the CPU, unless the user chose
    if reward_model is None:
        reward_model = "gold"
    if isinstance(reward_model, str) and reward_model in REWARD_MODELS:
        reward_model = REWARD_MODELS[reward_model](task, tokenizer, device)
    elif isinstance(reward_model, (str, os.PathLike)):
        # a directory saved by RewardModel.save / fit_reward_model (a JSON-able way to name a fitted
        # reward model, so a zoo run's env_kwargs can carry it)
        from .feedback.fitting import FittedReward, is_reward_model_dir

        if not is_reward_model_dir(reward_model):
            text = os.fspath(reward_model)
            hint = (f"{Path(text).resolve()} is not a saved reward model (no reward_config.json)" if _looks_local(text)
                    else f"unknown reward model {text!r}")
            raise ValueError(f"{hint}; use one of {sorted(REWARD_MODELS)}, a directory saved by "
                             "rlhfgym.envs.feedback.fitting.fit_reward_model(cache_dir=...), or pass an object.")
        reward_model = FittedReward.load(reward_model, device=device)
    elif not isinstance(reward_model, RewardFunction):
        raise ValueError(
            f"reward_model must be a name ({sorted(REWARD_MODELS)}), a saved reward model's directory or have "
            f"score(prompts, completions); got {type(reward_model).__name__}."
        )
    return {"task": task, "tokenizer": tokenizer, "reference": reference, "reward_model": reward_model}


def _refuse_async_vectorization() -> None:
    """Fail at once when gymnasium's AsyncVectorEnv is building copies of the single env.

    ``gym.make_vec(id, vectorization_mode="async")`` builds ``N`` single envs (``N`` models) in
    worker processes and checks their spaces, which takes minutes and can orphan the workers.
    The env is natively batched, so there is nothing to gain: refuse, with the fix. The builder is
    recognised on the call stack (the first copy is always made in the calling process).
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__") == "gymnasium.vector.async_vector_env":
            raise gym.error.Error(
                "rlhf-gym envs are natively batched and do not support vectorization_mode='async' (it would "
                "load one model per sub-env in worker processes); use gym.make_vec(id, num_envs=N) with the "
                "default vectorization mode (the env's own torch-batched vector env)."
            )
        frame = frame.f_back


def _split_kwargs(kwargs: dict[str, Any], where: str, vector: bool):
    """``(config, components)`` from a factory's keyword arguments: the settings go into one
    validated :class:`~.config.EnvConfig` (``config=`` is a base they override), the rest are the
    :data:`COMPONENTS`; an unknown name raises a ``ValueError`` naming the closest valid one."""
    from .config import EnvConfig, unknown_keywords_error

    kwargs = dict(kwargs)
    base = kwargs.pop("config", None)
    components = {k: kwargs.pop(k) for k in COMPONENTS if k in kwargs}
    fields = set(EnvConfig.field_names())
    if not vector:
        fields -= {"num_envs", "autoreset_mode"}
    unknown = set(kwargs) - fields
    if unknown:
        vector_only = unknown & {"num_envs", "autoreset_mode"}
        if vector_only and not vector:
            raise ValueError(
                f"{sorted(vector_only)} configure vector envs; use gym.make_vec(id, num_envs=N, ...) "
                "instead of gym.make."
            )
        raise unknown_keywords_error(unknown, fields | set(COMPONENTS) | {"config"}, where)
    return EnvConfig.merged(base, kwargs, where=where), components


def make_summarize_env(**kwargs: Any):
    """A :class:`~.token_env.TokenMDPEnv` on the summarization task: ``gym.make(id, **kwargs)``.

    Keywords: the :class:`~.config.EnvConfig` settings ``split``, ``kl_coef``, ``max_new_tokens``,
    ``max_prompt_tokens``, ``device``, ``seed``, ``compute_ref`` (or ``config=EnvConfig(...)``, which
    the others override), and the components ``reference``, ``tokenizer``, ``reward_model``,
    ``task`` (see :func:`build_components`). ``seed`` seeds the env's generator now, so the first
    ``reset()`` without a seed is reproducible.

    Raises:
        ValueError: an unknown keyword (the closest valid one is named) or an invalid setting.
        gymnasium.error.Error: called to build copies for an ``AsyncVectorEnv``.
    """
    from .token_env import TokenMDPEnv

    _refuse_async_vectorization()
    config, components = _split_kwargs(kwargs, "gym.make (make_summarize_env)", vector=False)
    parts = build_components(**components, device=config.device, split=config.split)
    return TokenMDPEnv(**parts, config=config)


def make_summarize_vector_env(**kwargs: Any):
    """A torch-native :class:`~.vector_env.TokenMDPVectorEnv`: ``gym.make_vec(id, num_envs, **kwargs)``.

    Keywords: those of :func:`make_summarize_env` plus ``num_envs`` and ``autoreset_mode``
    ("NextStep", the default, or "SameStep"). ``seed`` seeds row ``i`` with ``seed + i`` now (as
    ``reset(seed=seed)`` would).
    """
    from .vector_env import TokenMDPVectorEnv

    config, components = _split_kwargs(kwargs, "gym.make_vec (make_summarize_vector_env)", vector=True)
    parts = build_components(**components, device=config.device, split=config.split)
    return TokenMDPVectorEnv(**parts, config=config)


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
