"""The plumbing every agent shares, so that each algorithm's file holds only its algorithm.

Read top to bottom:

* **Hyperparameters**: :class:`AgentConfig` (an agent declares its hyperparameters once, as a
  dataclass ``Config``), :func:`param` (a field's range or choices), :func:`parse_config` (the one
  validation: types, ranges, unknown keys with the closest valid one) and :func:`check_range`.
* **Env access**: :func:`env_core` (``env.unwrapped``, checked), :func:`reference_for` (the frozen
  ``pi_ref`` on the policy's device), :func:`reference_policy` (a policy view of it).
* **Seeding**: :func:`seed_everything`, :func:`sub_seed` (a seed per ``(seed, round, ...)``, so a
  resumed run redraws exactly what the uninterrupted run drew), :func:`rng_state` /
  :func:`set_rng_state` (the torch random streams, saved in checkpoints).
* **Prompts**: :func:`draw_prompt_indices` / :func:`draw_prompts` (``n`` prompts of a split, a pure
  function of a seed, without replacement when the split is large enough) and
  :func:`stream_prompts` (``n`` prompts with replacement, a pure function of ``(seed, position)``).
* **Rollouts through the token MDP**: :class:`EnvSampler` (an agent's vector view of its env, one
  episode per row) and :class:`EnvRollout` (what one batch of episodes gave: tokens, the env's
  per-step rewards and ``log pi_ref``, RM scores, gold, texts).
* **Reports**: :func:`mean_gold` (the task's gold score of completions, reported, never trained on;
  ``None`` without a gold scorer: :meth:`TrainingRun.update` leaves a ``None`` metric out).
* **Sequences as tensors**: :func:`pad_cat`, :func:`trim`, :func:`sequence_logps`, :func:`batched_logps`,
  :func:`batched_pair_logps`.
* **Preferences**: :func:`labeler_population`, :func:`env_prefer`, :func:`as_preference_fn`,
  :func:`preference_probs`.
* **Training runs**: :class:`TrainingRun` (budget, resume, checkpoints, TensorBoard, tqdm, the
  callback), :func:`save_train_state` / :func:`load_train_state` (``train_state.pt``) and
  :class:`TrainingAgent`, the base class of the agents that train a policy.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
import random
import time
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rlhfgym.envs.hf import PRECISIONS
from rlhfgym.envs.lm import IncrementalLMPool, TokenSampler

from .base import ADDED_HYPERPARAMETERS, CONFIG_FILE, Agent, AgentError, read_agent_config
from .policy import Rollout

__all__ = [
    "TRAIN_STATE_FILE", "TRAIN_STATE_FORMAT", "SPLITS",
    "AgentConfig", "param", "parse_config", "check_range",
    "env_core", "reference_for", "reference_policy",
    "seed_everything", "sub_seed", "rng_state", "set_rng_state",
    "draw_prompt_indices", "draw_prompts", "stream_prompt_indices", "stream_prompts",
    "EnvSampler", "EnvRollout",
    "mean_gold",
    "pad_cat", "trim", "sequence_logps", "batched_logps", "batched_pair_logps",
    "labeler_population", "env_prefer", "as_preference_fn", "preference_probs",
    "save_train_state", "load_train_state", "DEFAULT_CHECKPOINT_SECONDS", "checkpoint_interval", "TrainingRun",
    "TrainingAgent",
]

TRAIN_STATE_FILE = "train_state.pt"
TRAIN_STATE_FORMAT = 2  # {"format", "optimizer", "rng", "state"}; see TrainingAgent
SPLITS = ("train", "validation", "test")


# ============================================================================================
# Hyperparameters
# ============================================================================================


def param(default, *, low=None, high=None, low_open: bool = False, high_open: bool = False, choices=None,
          integer: bool = False):
    """A config field with its allowed range (``low (<|<=) value (<|<=) high``) or ``choices``."""
    return field(default=default, metadata={"low": low, "high": high, "low_open": low_open, "high_open": high_open,
                                            "choices": None if choices is None else tuple(choices), "integer": integer})


@dataclass
class AgentConfig:
    """Hyperparameters every agent has; an agent's ``Config`` subclasses it and declares its own
    fields once (type annotation, default, and :func:`param` for the allowed range or choices).

    Override :meth:`check` for rules between fields (e.g. ``mini_batch_size <= batch_size``).
    """

    device: str = "cpu"
    seed: int = 0
    #: how the policy's forward passes compute (:class:`~rlhfgym.agents.base.Agent`): float32, or bfloat16 autocast
    precision: str = param("float32", choices=tuple(PRECISIONS))

    def check(self, agent: str) -> None:
        """Rules between fields; raise :class:`AgentError` naming the parameters and the fix."""


def parse_config(config_cls: type[AgentConfig], agent: str, values: dict[str, Any]) -> dict[str, Any]:
    """Validate keyword hyperparameters against ``config_cls`` and return them as a JSON-serialisable
    dict (defaults filled in).

    Unknown keys are refused with the closest valid key; numbers are checked against each field's
    type (an ``int`` field takes only integers; a ``float`` field also takes integers and numeric
    strings such as ``"1e-4"``, which YAML 1.1 reads as text) and range; ``None`` only where the
    field's type allows it; lists stay lists.
    """
    names = [f.name for f in fields(config_cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise AgentError(f"{agent}: unknown hyperparameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                         f"{agent} takes {', '.join(names)}.")
    hints = typing.get_type_hints(config_cls)
    out = {}
    for f in fields(config_cls):
        value = values[f.name] if f.name in values else f.default
        out[f.name] = _check_value(agent, f.name, value, hints[f.name], f.metadata)
    cfg = config_cls(**out)
    cfg.check(agent)
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def _check_value(agent: str, name: str, value, tp, meta):
    """One field: type coercion (int/float/bool/str, optional, list of numbers), then range and choices."""
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else tp
    elif value is None:
        raise AgentError(f"{agent}: {name} must not be None; omit it for its default.")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise AgentError(f"{agent}: {name} must be a list, got {value!r}.")
        (item,) = typing.get_args(tp)[:1]
        return [_check_value(agent, name, v, item, meta) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise AgentError(f"{agent}: {name} must be true or false, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise AgentError(f"{agent}: {name} must be a string, got {value!r}.")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise AgentError(f"{agent}: {name} must be a number, got the string {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AgentError(f"{agent}: {name} must be a number, got {value!r}.")
        value = float(value)
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise AgentError(f"{agent}: {name} must be an integer, got {value!r}.")
    if meta.get("choices") is not None and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise AgentError(f"{agent}: unknown {name} {value!r}{hint}; use one of {', '.join(map(repr, meta['choices']))}.")
    if meta.get("low") is not None or meta.get("high") is not None:
        check_range(name, agent, value, low=meta["low"], high=meta["high"], low_open=meta["low_open"],
                    high_open=meta["high_open"], integer=meta["integer"] or tp is int)
    return value


def check_range(name: str, agent: str, value, *, low=None, high=None, low_open=False, high_open=False, integer=False):
    """Raise :class:`AgentError` unless ``low (<|<=) value (<|<=) high`` (and an integer when
    ``integer``), with a message such as ``"ppo: batch_size must be an int >= 1, got 0."``; returns the value."""
    if low is not None and high is not None:
        allowed = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f" {'>' if low_open else '>='} {low}"
    elif high is not None:
        allowed = f" {'<' if high_open else '<='} {high}"
    else:
        allowed = ""
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int))
    what = f"an int{allowed}" if integer else f"a finite number{allowed}" if bad_type or not allowed else allowed.lstrip()
    too_low = not bad_type and low is not None and (value <= low if low_open else value < low)
    too_high = not bad_type and high is not None and (value >= high if high_open else value > high)
    if bad_type or (isinstance(value, float) and not math.isfinite(value)) or too_low or too_high:
        raise AgentError(f"{agent}: {name} must be {what}, got {value!r}.")
    return value


# ============================================================================================
# Env access
# ============================================================================================


def env_core(env, agent: str):
    """``env.unwrapped`` after checking it offers the sequence-level access agents need."""
    core = getattr(env, "unwrapped", env)
    missing = [a for a in ("tokenizer", "reference_model", "prompts", "score", "task") if not hasattr(core, a)]
    if missing:
        raise AgentError(
            f"{agent}: env {env!r} lacks {missing}; pass an rlhf-gym env such as gym.make('RLHF-Summarize-Gold-v0')."
        )
    return core


def reference_for(policy, env, device: str | torch.device | None = None):
    """The env's frozen reference model ``pi_ref`` on the policy's device (or ``device``; copied only if
    the devices differ)."""
    import copy

    device = torch.device(device) if device is not None else policy.device
    ref = getattr(env, "unwrapped", env).reference_model
    if next(ref.parameters()).device != device:
        ref = copy.deepcopy(ref).to(device).eval().requires_grad_(False)
    # the env's own module is used as is (callers run it under no_grad): freezing it in place would
    # also freeze every later CausalLMPolicy.from_env copy of it
    return ref


def reference_policy(core, model=None):
    """A :class:`CausalLMPolicy` view of the frozen reference (``model``, default the env's own), with
    the env's window; it stays on its device (pass ``reference_for(policy, env)`` for the policy's)."""
    from .policy import CausalLMPolicy

    model = core.reference_model if model is None else model
    inner = getattr(core, "core", core)
    return CausalLMPolicy(model, core.tokenizer, max_prompt_tokens=getattr(inner, "max_prompt_tokens", 96),
                          max_new_tokens=core.max_new_tokens, device=next(model.parameters()).device)


# ============================================================================================
# Seeding
# ============================================================================================


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random streams."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sub_seed(seed: int, *keys: int) -> int:
    """A deterministic seed for (seed, round, ...): lets a resumed run redraw exactly the same data."""
    return int(np.random.SeedSequence([int(seed) % 2**32, *[int(k) % 2**32 for k in keys]]).generate_state(1)[0])


def rng_state() -> dict:
    """torch's global random state (and CUDA's, when in use), to be saved in a checkpoint."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (the random stream continues where it was saved)."""
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])


# ============================================================================================
# Prompts
# ============================================================================================


def draw_prompt_indices(core, n: int, seed: int, split: str = "train") -> np.ndarray:
    """Indices of ``n`` prompts of ``split``, drawn with ``seed`` (without replacement when the split is large enough)."""
    size = core.task.split_size(split)
    return np.random.default_rng(seed).choice(size, n, replace=size < n)


def draw_prompts(core, n: int, seed: int, split: str = "train") -> list[str]:
    """The ``n`` prompts of :func:`draw_prompt_indices` (use a :func:`sub_seed` per round)."""
    return [core.task.prompt(split, int(i)) for i in draw_prompt_indices(core, n, seed, split)]


def stream_prompt_indices(core, n: int, *, seed: int, position: int, split: str = "train") -> np.ndarray:
    """Indices of ``n`` prompts drawn with replacement from ``split``; a pure function of ``(seed,
    position)`` (``position``: completions spent so far), so a resumed run sees the prompts the
    uninterrupted run would have seen."""
    size = core.task.split_size(split)
    return np.random.default_rng([seed, position]).integers(size, size=n)


def stream_prompts(core, n: int, *, seed: int, position: int, split: str = "train") -> list[str]:
    """The prompts of :func:`stream_prompt_indices`."""
    return [core.task.prompt(split, int(i)) for i in stream_prompt_indices(core, n, seed=seed, position=position, split=split)]


# ============================================================================================
# Rollouts through the token MDP
# ============================================================================================


@dataclass
class EnvRollout(Rollout):
    """One episode per row, collected by acting in the token MDP (:meth:`EnvSampler.rollout`).

    The fields of :class:`~.policy.Rollout` (``prompts``, ``prompt_ids`` as the env encoded them,
    ``tokens`` (B, T): the actions, ``mask``, ``logprobs`` under the distribution sampled from,
    ``texts``: the env's decoded completions, ``ended``: terminated with EOS, not truncated), and
    from the env's ``step``: ``rewards`` (B, T), the per-step rewards
    ``r_t = env_kl_coef * log pi_ref(a_t|s_t)`` plus ``RM(x, y)`` on the last step; ``ref_logprobs``
    (B, T) ``log pi_ref(a_t|s_t)`` (``info["ref_logprob"]``; 0 where the env ran no reference);
    ``scores`` (B,) ``RM(x, y)`` (``info["rm_score"]``); ``gold`` (B,) float64 (NaN without a gold
    scorer); ``env_kl_coef``, the env's beta.
    """

    rewards: torch.Tensor
    ref_logprobs: torch.Tensor
    scores: torch.Tensor
    gold: np.ndarray
    env_kl_coef: float

    def kl_rewards(self, logp: torch.Tensor, beta: float) -> torch.Tensor:
        """The per-token RLHF reward (B, T) of an agent whose KL coefficient is ``beta``: the env's
        reward plus the agent's own ``-beta * log pi(a_t|s_t)`` (``logp``, (B, T)), the env's
        ``log pi_ref`` term re-weighted from the env's beta to ``beta`` (zero when they agree)::

            r_t = r_t^env + (beta - beta_env) log pi_ref(a_t|s_t) - beta log pi(a_t|s_t)
                = beta (log pi_ref(a_t|s_t) - log pi(a_t|s_t))        (+ RM(x, y) at the last token)

        Summed over ``t`` it is the episode's KL-regularised return ``RM - beta log(pi(y|x) / pi_ref(y|x))``.
        """
        return (self.rewards + (beta - self.env_kl_coef) * self.ref_logprobs - beta * logp) * self.mask

    def mean_gold(self) -> float | None:
        """Mean gold score of the completions (reported, never trained on); None without a gold scorer."""
        return None if np.isnan(self.gold).all() else float(self.gold.mean())


class EnvSampler:
    """How an agent collects experience: by acting in the token MDP, one episode per row.

    ``EnvSampler(env, kl_coef=beta, split="train", device=policy.device)`` makes, for each batch
    size it is asked for, a :class:`~rlhfgym.envs.vector_env.TokenMDPVectorEnv` over ``env``'s
    world: the same task, tokenizer, reward model and settings, with ``num_envs`` = the batch,
    ``autoreset_mode="Disabled"`` (a row that ended stays idle), the agent's ``kl_coef`` (so the
    env's per-step reward is the agent's, and ``kl_coef=0`` runs no reference), the agent's
    ``split``, on the policy's ``device`` (with a copy of the reference there if it lives elsewhere);
    ``compute_ref=True`` reports ``log pi_ref`` even when ``kl_coef`` is 0. ``score=False`` leaves
    the reward model out (:class:`~rlhfgym.envs.rewards.ZeroReward`: the reward is the KL term
    alone and ``scores`` are NaN), for agents that learn from preferences only. ``overlap`` (default: on
    CPUs) lets the policy read each token in a second thread while the env steps (the two forwards
    are independent; the results are the same either way; on a GPU, kernels already run
    asynchronously to the host).
    :meth:`rollout` resets it with the batch's prompts and steps it with the policy's sampled tokens
    until every row has ended; rewards, ``log pi_ref``, RM scores, gold and texts all come from the
    env's ``step``. The tokens are those :meth:`CausalLMPolicy.sample` draws for the same prompts and
    torch seed (one :class:`~rlhfgym.envs.lm.TokenSampler`), so the env adds no randomness.
    """

    def __init__(self, env, *, kl_coef: float, split: str = "train", device: str | torch.device = "cpu",
                 compute_ref: bool | None = None, overlap: bool | None = None, score: bool = True):
        from rlhfgym.envs.config import EnvConfig

        self.core = getattr(env, "unwrapped", env)
        config = getattr(self.core, "config", None)
        if not isinstance(config, EnvConfig):
            raise AgentError(f"the agents act through rlhf-gym's token MDP; {env!r} has no EnvConfig. Pass an env made "
                             "with gym.make('RLHF-Summarize-v0') (or gym.make_vec).")
        self.config = dataclasses_replace(config, kl_coef=float(kl_coef), split=split, device=str(device), seed=None,
                                          compute_ref=compute_ref, autoreset_mode="Disabled")
        self.kl_coef = float(kl_coef)
        self.score = bool(score)
        self._envs: dict[int, Any] = {}
        self._lms = IncrementalLMPool()  # the policy's KV caches (and CUDA graphs), one per batch size
        self.overlap = (torch.device(self.config.device).type == "cpu") if overlap is None else bool(overlap)
        self._pool = None

    def _worker(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="rlhfgym-policy")
        return self._pool

    def vector_env(self, num_envs: int):
        """The vector env of ``num_envs`` rows (made once per size, then reused)."""
        if num_envs not in self._envs:
            from rlhfgym.envs.rewards import ZeroReward
            from rlhfgym.envs.vector_env import TokenMDPVectorEnv

            core = self.core
            reference = reference_for(None, core, device=self.config.device)
            reward = core.reward_model if self.score else ZeroReward()
            self._envs[num_envs] = TokenMDPVectorEnv(core.task, core.tokenizer, reference, reward,
                                                     dataclasses_replace(self.config, num_envs=num_envs))
        return self._envs[num_envs]

    @torch.no_grad()
    def rollout(self, policy, prompt_index, *, temperature: float = 1.0, mixture=None) -> EnvRollout:
        """One episode for each prompt index of the split: ``policy`` (a :class:`CausalLMPolicy`; its
        model samples in eval mode, then gets its mode back) acts, the env pays. ``mixture``: as in
        :meth:`CausalLMPolicy.sample` (Nash-MD's opponent)."""
        idx = np.asarray(prompt_index, dtype=np.int64).reshape(-1)
        envs = self.vector_env(len(idx))
        prompts = [self.core.task.prompt(self.config.split, int(i)) for i in idx]
        model = policy.model
        was_training = model.training
        model.eval()
        try:
            return self._rollout(envs, policy, idx, prompts, temperature, mixture)
        finally:
            model.train(was_training)

    def _rollout(self, envs, policy, idx, prompts, temperature, mixture) -> EnvRollout:
        b, t_max, device, model = len(idx), envs.max_new_tokens, envs.device, policy.model

        def start_sampler(prompt_ids):
            return TokenSampler(model, prompt_ids, max_new_tokens=t_max, window=envs.core.window,
                                vocab_size=len(policy.tokenizer), temperature=temperature, mixture=mixture,
                                autocast_dtype=policy.autocast_dtype, pool=self._lms)

        # the policy reads the prompts (its prefill) while the env resets (the reference's prefill)
        mine = policy.encode_prompts(prompts)
        starting = self._worker().submit(start_sampler, mine) if self.overlap else None
        obs, _ = envs.reset(options={"prompt_index": idx})
        ids, att = obs["input_ids"].cpu(), obs["attention_mask"].cpu()
        prompt_ids = [row[row_mask.bool()].tolist() for row, row_mask in zip(ids, att)]
        sampler = starting.result() if starting is not None else None
        if sampler is None or prompt_ids != mine:  # the env's prompt tokens are the state: the policy acts on them
            sampler = start_sampler(prompt_ids)
        pad = torch.full((b,), policy.pad_id, dtype=torch.long, device=device)
        tokens = torch.full((b, t_max), policy.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros(b, t_max, device=device)
        mask = torch.zeros(b, t_max, dtype=torch.long, device=device)
        rewards = torch.zeros(b, t_max, device=device)
        ref_logps = torch.zeros(b, t_max, device=device)
        scores = torch.zeros(b, device=device)
        gold = np.full(b, np.nan)
        texts: list[str] = [""] * b
        done = torch.zeros(b, dtype=torch.bool, device=device)
        ended = torch.zeros(b, dtype=torch.bool, device=device)
        for t in range(t_max):
            tok, tok_logp = sampler.draw()
            tok = torch.where(done, pad, tok)  # rows that ended are idle in the env; record padding
            # the policy reads the token (its next logits) while the env steps: independent work
            advancing = self._worker().submit(sampler.advance, tok, ~done) if self.overlap else None
            _, reward, terminated, truncated, info = envs.step(tok)
            tokens[:, t], mask[:, t] = tok, (~done).long()
            logps[:, t] = torch.where(done, 0.0, tok_logp)
            rewards[:, t], ref_logps[:, t] = reward, info["ref_logprob"]
            if "rm_score" in info:  # episodes that ended in this step
                rows = np.flatnonzero(info["_rm_score"].cpu().numpy())
                scores = torch.where(info["_rm_score"], info["rm_score"], scores)
                gold[rows] = info["gold"].cpu().numpy()[rows]
                for r in rows:
                    texts[r] = info["completion"][r]
            active = ~done
            done = done | terminated | truncated
            ended = ended | terminated
            if advancing is not None:
                advancing.result()
            elif not bool(done.all()):
                sampler.advance(tok, active)
            if bool(done.all()):
                break
        if not self.score:
            scores = torch.full_like(scores, float("nan"))  # no reward model read these episodes
        return EnvRollout(prompts, prompt_ids, tokens, mask, logps, texts, ended, rewards, ref_logps, scores, gold,
                          self.kl_coef)


# ============================================================================================
# Reports
# ============================================================================================


def mean_gold(core, prompts, completions) -> float | None:
    """Mean gold score of completions (reported only, never trained on); None when the task has no
    gold scorer (:meth:`TrainingRun.update` leaves ``None`` metrics out of the logs)."""
    if not getattr(core.task, "has_gold", False):
        return None
    return float(np.mean(core.gold(list(prompts), list(completions))))


# ============================================================================================
# Sequences as tensors
# ============================================================================================


def pad_cat(a: torch.Tensor, b: torch.Tensor, value: int) -> torch.Tensor:
    """Stack two (B, T) tensors along the batch after right-padding to the same T."""
    t = max(a.shape[1], b.shape[1])
    a = F.pad(a, (0, t - a.shape[1]), value=value)
    b = F.pad(b, (0, t - b.shape[1]), value=value)
    return torch.cat([a, b], 0)


def trim(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row (less compute in teacher forcing)."""
    t = max(int(mask.sum(1).max()), 1) if mask.numel() else 1
    return tokens[:, :t], mask[:, :t]


def sequence_logps(policy, prompt_ids, tokens, mask, *, model=None) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) for each row, (B,) (gradients flow unless the caller disables them)."""
    tokens, mask = trim(tokens, mask)
    return policy.forward_logprobs(prompt_ids, tokens, mask, model=model).sum(-1)


@torch.no_grad()
def batched_logps(policy, prompt_ids, tokens, mask, *, model=None, batch_size: int = 64) -> torch.Tensor:
    """:func:`sequence_logps` without gradients, in chunks (reference log-probs, evaluation)."""
    out = []
    for s in range(0, len(prompt_ids), batch_size):
        out.append(sequence_logps(policy, prompt_ids[s:s + batch_size], tokens[s:s + batch_size],
                                  mask[s:s + batch_size], model=model).float())
    return torch.cat(out) if out else torch.zeros(0, device=policy.device)


@torch.no_grad()
def batched_pair_logps(policy, prompt_ids, chosen, chosen_mask, rejected, rejected_mask, *, model=None,
                       batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log pi(y_w|x), log pi(y_l|x))``, (N,) each, without gradients: both completions of ``batch_size``
    pairs in one batch, so each prompt runs through the network once (``forward_logprobs`` shares
    repeated prompts). Pairs are batched in order of prompt length (prompts of a batch are padded to
    its longest; a quarter less compute on the micro world's pairs) and returned in the given order."""
    if not len(prompt_ids):
        return torch.zeros(0, device=policy.device), torch.zeros(0, device=policy.device)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    w, l = [], []
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        take = torch.tensor(rows, device=chosen.device)
        logp = sequence_logps(policy, [prompt_ids[i] for i in rows] * 2, pad_cat(chosen[take], rejected[take], policy.pad_id),
                              pad_cat(chosen_mask[take], rejected_mask[take], 0), model=model).float()
        a, b = logp.split(len(rows))
        w.append(a)
        l.append(b)
    back = torch.tensor(order).argsort().to(w[0].device)
    return torch.cat(w)[back], torch.cat(l)[back]


# ============================================================================================
# Preferences
# ============================================================================================


def labeler_population(core, name: str, temperature: float | None, flip_prob: float | None):
    """The env task's simulated labeler population preset ``name`` (see envs/feedback/labelers.py)."""
    from rlhfgym.envs.feedback.labelers import LabelerPopulation

    return LabelerPopulation.preset(name, core.task, temperature=temperature, flip_prob=flip_prob)


def env_prefer(core) -> Callable | None:
    """The env's own pairwise oracle ``(prompts, a, b) -> P(a > b)``: ``env.unwrapped.prefer``, or
    its reward model's ``prefer`` (feedback envs); None when it has neither."""
    fn = getattr(core, "prefer", None) or getattr(getattr(core, "reward_model", None), "prefer", None)
    return fn if callable(fn) else None


def as_preference_fn(fn, agent: str) -> Callable | None:
    """A callable ``(prompts, a, b) -> P(a > b)``: a function or an object with ``prefer`` (None stays None)."""
    if fn is None:
        return None
    if hasattr(fn, "prefer") and callable(fn.prefer):
        return fn.prefer
    if callable(fn):
        return fn
    raise AgentError(f"{agent}: a judge/preference must be callable(prompts, a, b) -> P(a > b) or have .prefer(); got {fn!r}.")


def preference_probs(fn, prompts, a, b, agent: str) -> torch.Tensor:
    """``fn(prompts, a, b)`` as a (B,) float tensor on the CPU, checked to be probabilities."""
    p = torch.as_tensor(fn(list(prompts), list(a), list(b)), dtype=torch.float32).detach().cpu().reshape(-1)
    if p.shape[0] != len(prompts) or not bool(((p >= 0) & (p <= 1)).all()):
        raise AgentError(f"{agent}: the preference function must return {len(prompts)} probabilities in [0, 1], got {p}.")
    return p


# ============================================================================================
# Training runs
# ============================================================================================


def save_train_state(directory: Path, state: dict) -> None:
    """Write the optimizer and algorithm state of a run beside the policy (atomic, torch.save format)."""
    import io

    from rlhfgym.envs.assets import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(directory) / TRAIN_STATE_FILE, buf.getvalue())


def load_train_state(directory: Path, device: str = "cpu") -> dict | None:
    """What :func:`save_train_state` wrote in ``directory``; None when it holds none."""
    path = Path(directory) / TRAIN_STATE_FILE
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise AgentError(f"{path} could not be read ({type(e).__name__}: {e}): a truncated or damaged save; "
                         f"{_delete_hint(Path(directory))}") from e
    if not isinstance(blob, dict):
        raise AgentError(f"{path} holds a {type(blob).__name__}, not a train state; {_delete_hint(Path(directory))}")
    return blob


def _delete_hint(directory: Path) -> str:
    return (f"delete the checkpoint {directory} (or its whole run directory) to train again from the start, "
            "or restore it from a copy")


#: a run with a ``checkpoint_dir`` saves at least this often (seconds of work), besides ``checkpoint_every``
DEFAULT_CHECKPOINT_SECONDS = 120.0
_CHECKPOINT_SECONDS: contextvars.ContextVar[float] = contextvars.ContextVar("checkpoint_seconds",
                                                                            default=DEFAULT_CHECKPOINT_SECONDS)


def _check_seconds(agent: str, seconds) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or math.isnan(seconds) or seconds < 0:
        raise AgentError(f"{agent}: checkpoint_seconds must be a number of seconds >= 0 (inf: never), got {seconds!r}.")
    return float(seconds)


@contextlib.contextmanager
def checkpoint_interval(seconds: float) -> Iterator[None]:
    """Within the block, a :class:`TrainingRun` with a ``checkpoint_dir`` and no ``checkpoint_seconds``
    of its own checkpoints every ``seconds`` of work (``math.inf``: only by ``checkpoint_every`` and at
    the end); how ``rlhf-zoo train`` sets the interval for agents whose ``learn`` does not take it."""
    token = _CHECKPOINT_SECONDS.set(_check_seconds("checkpoint_interval", seconds))
    try:
        yield
    finally:
        _CHECKPOINT_SECONDS.reset(token)


class TrainingRun:
    """The bookkeeping of one ``learn()`` call, so an algorithm's file holds only its algorithm::

        with TrainingRun(self, budget, callback=..., checkpoint_dir=..., checkpoint_every=..., log_dir=...) as run:
            run.resume()                  # a checkpoint in checkpoint_dir -> policy, spent, load_extra()
            ...build the optimizer, restore the train state...
            while not run.done:
                ...one update on n completions...
                run.update(n, metrics)    # count, log, checkpoint, ask the callback (sets run.stopped)
        # on leaving: a final checkpoint (not after an exception: the last good one stays), logs flushed

    ``budget`` is the agent's *total*: a fresh agent spends ``budget`` completions, a resumed one the rest.
    ``checkpoint_dir`` is a whole saved agent (``rlhfgym.agents.load(checkpoint_dir)`` works), replaced
    atomically every ``checkpoint_every`` completions, after every ``checkpoint_seconds`` of work (default
    :data:`DEFAULT_CHECKPOINT_SECONDS`, or what :func:`checkpoint_interval` set; ``math.inf``: never) and
    at the end; give each run its own directory. Its files are checked (sha256) before a resume.
    """

    def __init__(self, agent: Agent, budget: int, *, callback=None, checkpoint_dir=None, checkpoint_every=None,
                 checkpoint_seconds: float | None = None, log_dir=None, progress_bar: bool = True):
        self.agent, self.budget, self.callback = agent, agent.check_budget(budget), callback
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool)
                                             or checkpoint_every <= 0):
            raise AgentError(f"{agent.name}: checkpoint_every must be a positive number of completions or None, got {checkpoint_every!r}.")
        if checkpoint_every is not None and checkpoint_dir is None:
            raise AgentError(f"{agent.name}: checkpoint_every={checkpoint_every} needs a checkpoint_dir to write to.")
        if checkpoint_seconds is not None and checkpoint_dir is None:
            raise AgentError(f"{agent.name}: checkpoint_seconds={checkpoint_seconds} needs a checkpoint_dir to write to.")
        if callback is not None and not callable(callback):
            raise AgentError(f"{agent.name}: callback must be callable as callback(agent, metrics) -> bool | None.")
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = (_CHECKPOINT_SECONDS.get() if checkpoint_seconds is None
                                   else _check_seconds(agent.name, checkpoint_seconds))
        self.log_dir, self.progress_bar = log_dir, progress_bar
        self._writer = self._bar = None
        self._last_saved = agent.spent
        self._last_save_time = self._clock = time.monotonic()
        self.stopped = False

    def resume(self) -> bool:
        """Continue from ``checkpoint_dir`` when it holds a saved agent of this kind: policy, ``spent``, train
        state, after checking its files (:meth:`Agent.restore`). A damaged checkpoint, or one of a learning
        agent without its ``train_state.pt`` (the optimizer and random state), is refused, not half-resumed."""
        agent, ckpt = self.agent, self.checkpoint_dir
        if ckpt is None or not ckpt.exists():
            return False
        if not (ckpt / CONFIG_FILE).exists():
            if ckpt.is_dir() and not any(ckpt.iterdir()):
                return False
            raise AgentError(f"{ckpt} is not a checkpoint (no {CONFIG_FILE}; a damaged one, or another directory): a "
                             f"run's first save would replace it; {_delete_hint(ckpt)}, or use another checkpoint_dir.")
        meta = read_agent_config(ckpt)
        if meta["agent"] != agent.name:
            raise AgentError(f"{ckpt} holds a {meta['agent']!r} checkpoint, not {agent.name!r}; use another checkpoint_dir.")
        saved = {**ADDED_HYPERPARAMETERS, **meta["config"]}  # what an older checkpoint had without the key
        changed = sorted(k for k in set(saved) | set(agent.config)
                         if k != "device" and saved.get(k) != agent.config.get(k))
        if changed:
            warnings.warn(f"{agent.name}: resuming {ckpt} with changed hyperparameters {changed}; the new values apply.",
                          stacklevel=3)
        spent = int(meta.get("spent", 0))
        if (meta.get("format") == 1 and isinstance(agent, TrainingAgent) and spent > 0
                and not (ckpt / TRAIN_STATE_FILE).exists()):  # format 2 lists it: restore() checks
            raise AgentError(f"{ckpt} has trained {spent} completions but holds no {TRAIN_STATE_FILE} (the optimizer and "
                             f"random state), so the run cannot continue exactly; {_delete_hint(ckpt)}.")
        agent.restore(ckpt, meta)  # agent.train_seconds: the earlier sessions' time
        self._last_saved = agent.spent
        self._clock = time.monotonic()
        return True

    @property
    def done(self) -> bool:
        return self.stopped or self.agent.spent >= self.budget

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.agent.spent)

    def update(self, n: int, metrics: dict) -> bool:
        """Count ``n`` completions, log ``metrics`` (those that are None are left out), checkpoint
        when due; False when the callback says stop."""
        agent = self.agent
        agent.spent += int(n)
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if self._bar is None and self.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.budget, initial=agent.spent - int(n), desc=agent.name, unit="completion")
        if self._bar is not None:
            self._bar.update(int(n))
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:4]}, refresh=False)
        if self.log_dir is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.log_dir))
            for k, v in metrics.items():
                self._writer.add_scalar(f"{agent.name}/{k}", float(v), agent.spent)
        if self.checkpoint_dir is not None and (
                (self.checkpoint_every is not None and agent.spent - self._last_saved >= self.checkpoint_every)
                or time.monotonic() - self._last_save_time >= self.checkpoint_seconds):
            self.save()
        if self.callback is not None and self.callback(agent, dict(metrics, spent=agent.spent)) is False:
            self.stopped = True
        return not self.stopped

    def _count_time(self) -> None:
        """Add the wall time since the last count to ``agent.train_seconds`` (saved with the agent, so
        a resumed run's total includes the sessions before it)."""
        now = time.monotonic()
        self.agent.train_seconds += now - self._clock
        self._clock = now

    def save(self) -> None:
        if self.checkpoint_dir is not None:
            self._count_time()
            self.agent.save(self.checkpoint_dir)
            self._last_saved = self.agent.spent
            self._last_save_time = time.monotonic()

    def close(self, save: bool = True) -> None:
        """Final checkpoint (also after a callback stop, so an early stop is kept), flush logs."""
        self._count_time()
        if save and self._last_saved != self.agent.spent:
            self.save()
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # after a crash keep the last good checkpoint: the state in memory may be half-updated
        self.close(save=exc_type is None)


class TrainingAgent(Agent):
    """The base class of every agent that trains a policy: one way to start a run, one optimizer,
    one train-state format, one resume path.

    A ``learn()`` reads::

        with TrainingRun(self, budget, ...) as run:
            core, ref, resumed = self.start(run, env)      # resume, policy, checks, seeding
            self.make_optimizer("adamw", self.config["learning_rate"])
            while not run.done:
                ...                                         # the algorithm
                self.step(loss)                             # zero_grad, backward, clip, step
                run.update(n, metrics)

    ``train_state.pt`` (:data:`TRAIN_STATE_FILE`, beside the saved policy) holds, for every agent::

        {"format": 2, "optimizer": optimizer.state_dict() | None, "rng": rng_state(), "state": self.train_state()}

    ``self.trainer_state`` is the algorithm's run state (counters, and data a resumed run needs, e.g.
    ReST's Grow set); only :meth:`TrainingRun.resume` continues it (a fresh ``learn()`` starts it empty).
    Algorithms that keep state in attributes (PPO's KL coefficient, REINFORCE's baseline) override
    :meth:`train_state` / :meth:`restore_train_state`. The optimizer state and the random streams read
    by :meth:`~Agent.load` or a resume are continued by the next ``learn()``; without them the run is
    seeded from ``seed`` (:func:`seed_everything`). Data drawn from seeds derived from ``(seed, round)``
    (:func:`sub_seed`) or ``(seed, spent)`` (:func:`stream_prompts`) make a resumed run see what the
    uninterrupted one would have seen.

    Hyperparameters: a subclass declares them once as a dataclass ``Config`` (a subclass of
    :class:`AgentConfig`); the constructor takes them as keyword arguments, validated by
    :func:`parse_config`, and ``self.config`` is their JSON-serialisable dict.
    """

    Config: type[AgentConfig] | None = None

    def __init__(self, policy=None, **hyperparameters: Any):
        if self.Config is not None:
            hyperparameters = parse_config(self.Config, self.name, hyperparameters)
        super().__init__(policy, **hyperparameters)
        self.optimizer: torch.optim.Optimizer | None = None
        self.trainer_state: dict[str, Any] = {}
        self._pending_optimizer: dict | None = None
        self._pending_rng: dict | None = None

    # ------------------------------------------------------------------ algorithm state hooks
    def train_state(self) -> dict[str, Any]:
        """The algorithm's state saved in ``train_state.pt`` (default: :attr:`trainer_state`)."""
        return self.trainer_state

    def restore_train_state(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`train_state` returned (called by :meth:`~Agent.load` and on resume)."""
        self.trainer_state = dict(state)

    # ------------------------------------------------------------------ the run
    def start(self, run: TrainingRun, env, *, value_head: bool = False) -> tuple[Any, Any, bool]:
        """Resume (when ``run`` finds a checkpoint), make the policy (with a value head if asked) and
        check it against the env, then seed: the saved random streams continue, else ``seed``.
        Returns ``(env.unwrapped, the reference model on the policy's device, resumed)``."""
        core = env_core(env, self.name)
        resumed = run.resume()
        if not resumed:
            self.trainer_state = {}
        policy = self.policy_for(env, value_head=True) if value_head else self.policy_for(env)
        if value_head and policy.value_head is None:  # a policy given without one: V(s) on its last hidden state
            policy.value_head = torch.nn.Linear(policy.model.config.hidden_size, 1).to(policy.device)
            torch.nn.init.zeros_(policy.value_head.weight), torch.nn.init.zeros_(policy.value_head.bias)
        if not any(p.requires_grad for p in policy.parameters()):
            # e.g. a copy of the env's pi_ref made after something froze it in place
            warnings.warn(f"{self.name}: every parameter of the policy was frozen; training all of them.", stacklevel=3)
            policy.requires_grad_(True)
        if self._pending_rng is not None:  # resumed or loaded: the random streams continue where they were saved
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        else:
            seed_everything(self.seed)
        return core, reference_for(policy, core), resumed

    def make_optimizer(self, kind: str, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
        """``torch.optim.Adam`` (``kind="adam"``) or ``AdamW`` (``"adamw"``) over the policy's trainable
        parameters; a saved optimizer state is restored, with this config's ``lr``."""
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
        opt = cls([p for p in self.policy.parameters() if p.requires_grad], lr=lr, **kwargs)
        if self._pending_optimizer is not None:
            opt.load_state_dict(self._pending_optimizer)
            self._pending_optimizer = None
            for group in opt.param_groups:
                group["lr"] = lr
        self.optimizer = opt
        return opt

    def step(self, loss: torch.Tensor) -> float:
        """One optimizer step with gradient clipping at ``config["max_grad_norm"]``; returns the gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config["max_grad_norm"])
        self.optimizer.step()
        return float(norm)

    # ------------------------------------------------------------------ persistence (train_state.pt)
    def save_extra(self, directory: Path) -> None:
        state = self.train_state()
        if self.optimizer is None and not state:
            return
        save_train_state(directory, {"format": TRAIN_STATE_FORMAT,
                                     "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                                     "rng": rng_state(), "state": state})

    def load_extra(self, directory: Path) -> None:
        blob = load_train_state(directory, device=self.device)
        if blob is None:
            return
        if blob.get("format") != TRAIN_STATE_FORMAT:  # rlhf-gym 0.1: PPO/REINFORCE/SFT kept their keys at the top
            rng = {k: blob.pop(k) for k in ("torch_rng", "cuda_rng") if k in blob}
            blob = {"optimizer": blob.pop("optimizer", None), "rng": rng or None,
                    "state": blob.pop("state", None) or blob}
        self._pending_optimizer = blob.get("optimizer")
        self._pending_rng = blob.get("rng")
        self.restore_train_state(dict(blob.get("state") or {}))
