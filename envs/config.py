"""The one validated set of scalar settings of a token-level RLHF environment.

:class:`EnvConfig` is what ``gym.make(id, **kwargs)``, ``gym.make_vec(id, num_envs, **kwargs)``,
:class:`~.token_env.TokenMDPEnv`, :class:`~.vector_env.TokenMDPVectorEnv` and
:class:`~.core.TokenMDPCore` all take: every setting is declared, defaulted and checked here once,
so a bad value fails with one clear ``ValueError`` before any model is loaded. The env's
*components* (task, tokenizer, reference model, reward model) are objects, not settings; the
factories in :mod:`.registration` resolve them.

This module imports nothing heavy (torch only inside the device check).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gymnasium.vector import AutoresetMode

__all__ = ["EnvConfig", "DEFAULT_MAX_PROMPT_TOKENS", "resolve_autoreset_mode", "unknown_keywords_error"]

# The micro news world's prompts have at most ~80 word tokens; the registered ids use this budget.
DEFAULT_MAX_PROMPT_TOKENS = 96


def resolve_autoreset_mode(mode: AutoresetMode | str) -> AutoresetMode:
    """Accept an :class:`AutoresetMode` or its value/name ("NextStep", "same_step", ...)."""
    if isinstance(mode, AutoresetMode):
        return mode
    if isinstance(mode, str):
        for m in AutoresetMode:
            if mode.lower().replace("_", "") in (m.value.lower(), m.name.lower().replace("_", "")):
                return m
    raise ValueError(f"unknown autoreset_mode {mode!r}; use one of {[m.value for m in AutoresetMode]}.")


def unknown_keywords_error(unknown: Iterable[str], valid: Iterable[str], where: str) -> ValueError:
    """A ``ValueError`` naming each unknown keyword, its closest valid spelling, and all valid ones."""
    valid = sorted(valid)
    parts = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, valid, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"{where} got unknown keyword argument(s) {', '.join(parts)}; valid keywords are {', '.join(valid)}.")


def _is_int(value: Any) -> bool:
    # bool is an Integral, but True as a token budget is a bug, not a 1
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int, fix: str) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__}); {fix}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}; {fix}")
    return int(value)


@dataclass(frozen=True)
class EnvConfig:
    """Scalar settings of a token-level RLHF env, validated on construction (immutable afterwards).

    Build a changed copy with ``dataclasses.replace(config, kl_coef=0.1)`` (validated again) or
    :meth:`merged`. Defaults are those of the registered ids.

    Args:
        split: task split prompts are sampled from ("train", "validation", "test"); the task checks
            the name.
        kl_coef: ``beta`` in the per-step reward ``beta * log pi_ref(a_t|s_t)``: a finite number
            ``>= 0`` (a negative value would turn the KL penalty into a bonus); 0 disables the
            reference model.
        max_new_tokens: episodes are truncated after this many generated tokens (int ``>= 1``).
        max_prompt_tokens: prompts longer than this keep their last tokens (int ``>= 1``). The
            observation window is ``max_prompt_tokens + max_new_tokens`` and must fit the reference
            model's ``max_position_embeddings`` (checked when the env is built).
        device: "cpu", "cuda", "cuda:1", ... (a ``torch.device`` works too); checked against this
            machine.
        seed: seeds the env's generator at construction (row ``i`` of a vector env gets
            ``seed + i``), so a first ``reset()`` without a seed is reproducible; None: unseeded.
        compute_ref: run the reference model even when ``kl_coef == 0`` (to monitor
            ``ref_logprob``); None: only when ``kl_coef != 0``.
        num_envs: rows of a vector env (int ``>= 1``); 1 for the single env.
        autoreset_mode: a vector env's :class:`~gymnasium.vector.AutoresetMode` (or its name);
            None: the view's default (NEXT_STEP for the vector env; the single env never autoresets).
    """

    split: str = "train"
    kl_coef: float = 0.05
    max_new_tokens: int = 32
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    device: Any = "cpu"
    seed: int | None = None
    compute_ref: bool | None = None
    num_envs: int = 1
    autoreset_mode: AutoresetMode | None = None

    def __post_init__(self):
        def set_(name: str, value: Any) -> None:  # frozen: normalise the fields in place, once
            object.__setattr__(self, name, value)

        if not isinstance(self.split, str):
            raise ValueError(f"split must be a str such as 'train', 'validation' or 'test', got {self.split!r}.")
        kl = self.kl_coef
        if isinstance(kl, bool) or not isinstance(kl, numbers.Real):
            raise ValueError(f"kl_coef must be a finite number >= 0 (e.g. 0.05), got {kl!r} ({type(kl).__name__}).")
        if not math.isfinite(float(kl)) or float(kl) < 0:
            raise ValueError(
                f"kl_coef must be a finite number >= 0, got {kl}; a negative kl_coef would pay the policy for "
                "drifting from the reference. Use 0 to switch the KL penalty off."
            )
        set_("kl_coef", float(kl))
        set_("max_new_tokens", _check_int("max_new_tokens", self.max_new_tokens, 1, "pass e.g. max_new_tokens=32."))
        set_("max_prompt_tokens", _check_int("max_prompt_tokens", self.max_prompt_tokens, 1, "pass e.g. max_prompt_tokens=96."))
        set_("num_envs", _check_int("num_envs", self.num_envs, 1, "pass the number of parallel episodes, e.g. num_envs=8."))
        if self.seed is not None:
            set_("seed", _check_int("seed", self.seed, 0, "pass a non-negative int or None."))
        if self.compute_ref is not None and not isinstance(self.compute_ref, bool):
            raise ValueError(f"compute_ref must be True, False or None (run the reference only when kl_coef != 0), got {self.compute_ref!r}.")
        if self.autoreset_mode is not None:
            set_("autoreset_mode", resolve_autoreset_mode(self.autoreset_mode))
        from .hf import resolve_device  # torch only now: registration stays cheap to import

        resolve_device(self.device)  # a device this machine lacks fails here, before any model loads

    @property
    def window(self) -> int:
        """Observation width ``W = max_prompt_tokens + max_new_tokens``."""
        return self.max_prompt_tokens + self.max_new_tokens

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def merged(cls, config: EnvConfig | None = None, settings: Mapping[str, Any] | None = None, *, where: str = "EnvConfig") -> EnvConfig:
        """``config`` (default: all defaults) with ``settings`` (field name -> value) applied, validated.

        An unknown name raises a ``ValueError`` that suggests the closest field (``where`` names the caller).
        """
        if config is not None and not isinstance(config, EnvConfig):
            raise ValueError(f"{where}: config must be an rlhfgym.envs.config.EnvConfig, got {type(config).__name__}.")
        settings = dict(settings or {})
        unknown = set(settings) - set(cls.field_names())
        if unknown:
            raise unknown_keywords_error(unknown, cls.field_names(), where)
        if config is None:
            return cls(**settings)
        return dataclasses.replace(config, **settings) if settings else config

    def check_reference(self, reference) -> None:
        """Raise if the reference model cannot attend to the observation window (when its config
        declares ``max_position_embeddings``)."""
        config = getattr(reference, "config", None)
        if config is None:
            return
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text, "max_position_embeddings", None)
        if not _is_int(limit) or self.window <= limit:
            return
        room = limit - self.max_prompt_tokens
        fix = (
            f"lower max_new_tokens to at most {room}" if room >= 1
            else f"lower max_prompt_tokens below {limit}"
        )
        raise ValueError(
            f"the observation window max_prompt_tokens + max_new_tokens = {self.max_prompt_tokens} + "
            f"{self.max_new_tokens} = {self.window} exceeds the reference model's max_position_embeddings "
            f"({limit}): it cannot attend to that many tokens; {fix} (or use a model with longer context)."
        )
