"""The batched state machine behind every token-level RLHF environment.

:class:`TokenMDPCore` holds ``N`` independent episodes on one device. Each episode is: sample a
prompt from a task split, then let the agent append one token per step until it emits EOS
(*terminated*) or has generated ``max_new_tokens`` tokens (*truncated*).

Per-step reward for action ``a`` in state ``s`` (the prompt plus the tokens generated so far)::

    r_t = kl_coef * log pi_ref(a_t | s_t)                 every step
        + RM(prompt, completion)                          additionally on the last step

An agent that adds ``-kl_coef * log pi(a_t | s_t)`` to each reward gets the usual RLHF return
``RM - kl_coef * sum_t log(pi / pi_ref)``. With ``kl_coef == 0`` the reference model is not run at
all (unless ``compute_ref=True``) and ``ref_logprob`` is reported as ``0.0``.

The single env (:mod:`.token_env`), the torch vector env (:mod:`.vector_env`) and the SB3 adaptor
(:mod:`.sb3`) are thin views of this class; they share one set of sequence-level accessors
(:class:`SequenceAccess`) and take their settings as one validated :class:`~.config.EnvConfig`.
Prompts are encoded and completions decoded with the one text<->token convention of
:mod:`.lm` (:func:`~.lm.encode_prompts`, :func:`~.lm.decode_completions`).

Everything per step stays batched on the device; the only device-to-host transfer per step is one
small ``(2, N)`` bool tensor (invalid actions, EOS), plus, in steps where episodes end, their
completions (decoded once, in one batch, and scored by the reward model in one call) and a check
that the scores are finite. The reference model is stepped with :class:`~.lm.IncrementalLM`
(one forward per step for all rows; a replayed CUDA graph on GPUs), and its forward is launched
before the finished episodes are decoded and scored, so the GPU works while the host scores.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from gymnasium.error import ResetNeeded
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode

from .config import EnvConfig, resolve_autoreset_mode
from .hf import resolve_device
from .lm import IncrementalLM, decode_completions, encode_prompts, model_vocab_size
from .rewards import GoldReward, RewardFunction, check_scores
from .tasks.base import Task, check_text_pairs

__all__ = ["TokenMDPCore", "StepResult", "SequenceAccess", "resolve_device", "resolve_autoreset_mode"]

RESET_OPTIONS = ("prompt_index", "split", "reset_mask")


@dataclass
class StepResult:
    """Everything one batched step produced. Tensors live on the core's device; row sets are host arrays.

    Per row (length ``N``): ``input_ids``/``attention_mask`` (the observation, after any autoreset),
    ``reward``, ``ref_logprob`` (0 for rows that did not act), ``terminated``/``truncated``.
    Per *finished* row (length ``k``, in the order of ``finished``): ``rm_score``, ``gold`` (NaN when
    the task has no gold scorer), ``completions``, ``prompts``, ``prompt_index``, ``ref_logprob_sum``,
    ``length`` (generated tokens, EOS included). ``final_input_ids``/``final_attention_mask`` hold the
    last observation of every row before the SAME_STEP autoreset (None otherwise). ``reset_rows``
    lists the rows that started a new episode in this step.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    reward: torch.Tensor
    ref_logprob: torch.Tensor
    terminated: np.ndarray
    truncated: np.ndarray
    finished: np.ndarray
    rm_score: torch.Tensor
    gold: np.ndarray
    completions: list[str]
    prompts: list[str]
    prompt_index: np.ndarray
    ref_logprob_sum: torch.Tensor
    length: np.ndarray
    reset_rows: np.ndarray
    final_input_ids: torch.Tensor | None = None
    final_attention_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class TokenMDPCore:
    """``N`` token-level RLHF episodes, stepped together on one device.

    Args:
        task: where prompts come from (and the gold scorer, reported in infos when it exists).
        tokenizer: a ``transformers`` tokenizer; its length ``V`` is the action space size, its
            ``eos_token_id`` ends episodes. Prompts are encoded with
            :func:`~.lm.encode_prompts` (with the tokenizer's special tokens, e.g. a BOS, as the
            model saw text in training) and completions decoded with :func:`~.lm.decode_completions`.
        reference: the frozen reference policy ``pi_ref`` (a causal LM with at least ``V`` logits
            that can attend to ``config.window`` positions); the core puts it on the device in eval mode.
        reward_model: scores finished episodes (a :class:`~.rewards.RewardFunction`).
        config: the settings (:class:`~.config.EnvConfig`; default: all defaults). ``N`` is
            ``config.num_envs``.
        autoreset_default: the autoreset mode when ``config.autoreset_mode`` is None (the view's
            default: NEXT_STEP for the vector env, DISABLED for the single env).
        **settings: :class:`~.config.EnvConfig` fields that override ``config`` (validated the same way).

    Autoreset modes: NEXT_STEP (gymnasium's default: the step after an episode ended resets that
    row, ignores its action and returns reward 0), SAME_STEP (the step that ends an episode already
    returns the next episode's first observation; the last one is in ``final_input_ids``), or
    DISABLED (a row whose episode ended stays idle until ``reset``: later steps ignore its action and
    return reward 0 and ``terminated = truncated = False`` for it, and its reference model is not
    run; stepping when *every* row has ended raises ``ResetNeeded``). DISABLED is how an agent
    collects one episode per row, a batch at a time (``reset(options={"prompt_index": ...})``, step
    until every row ended); ``reset(options={"reset_mask": mask})`` restarts only some rows, as in
    gymnasium.

    Observations are right-aligned ``(N, W)`` int64 ``input_ids``/``attention_mask`` tensors with
    ``W = max_prompt_tokens + max_new_tokens``; masked columns hold the pad id. The core never
    modifies a tensor it has returned (every step builds new ones), so callers may keep them.
    """

    def __init__(
        self,
        task: Task,
        tokenizer,
        reference: torch.nn.Module,
        reward_model: RewardFunction,
        config: EnvConfig | None = None,
        *,
        autoreset_default: AutoresetMode = AutoresetMode.NEXT_STEP,
        **settings,
    ):
        config = EnvConfig.merged(config, settings, where=type(self).__name__)
        if not isinstance(task, Task):
            raise ValueError(f"task must be a rlhfgym.envs.tasks.base.Task, got {type(task).__name__}.")
        task.check_split(config.split)
        if not isinstance(reward_model, RewardFunction):
            raise ValueError(
                f"reward_model must have a score(prompts, completions) -> Tensor method, got {type(reward_model).__name__}."
            )
        if not isinstance(reference, torch.nn.Module):
            raise ValueError(f"reference must be a causal LM (a torch.nn.Module), got {type(reference).__name__}.")
        config.check_reference(reference)
        self.config = config
        self.device = resolve_device(config.device)
        self.autoreset_mode = autoreset_default if config.autoreset_mode is None else config.autoreset_mode

        self.task = task
        self.tokenizer = tokenizer
        self.reward_model = reward_model
        self.num_envs = config.num_envs
        self.kl_coef = config.kl_coef
        self.max_prompt_tokens = config.max_prompt_tokens
        self.max_new_tokens = config.max_new_tokens
        self.window = config.window
        self.split = config.split
        self._check_split_nonempty(self.split)

        self.vocab_size = len(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; episodes end at EOS, so set tokenizer.eos_token first.")
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.pad_token_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_token_id
        ref_vocab = model_vocab_size(reference)
        if ref_vocab < self.vocab_size:
            raise ValueError(
                f"tokenizer/model vocab mismatch: the tokenizer has {self.vocab_size} tokens but the reference model "
                f"only {ref_vocab} logits; use the tokenizer the reference model was trained with."
            )

        self.reference = reference.to(self.device).eval()
        self.compute_ref = (self.kl_coef != 0.0) if config.compute_ref is None else config.compute_ref
        self.ref_lm = IncrementalLM(self.reference, self.num_envs, self.window) if self.compute_ref else None
        self._gold_is_rm = isinstance(reward_model, GoldReward) and reward_model.task is task

        n, w = self.num_envs, self.window
        self.input_ids = torch.full((n, w), self.pad_token_id, dtype=torch.long, device=self.device)
        self.attention_mask = torch.zeros(n, w, dtype=torch.long, device=self.device)
        self.ref_next_logprobs: torch.Tensor | None = None  # (N, V_ref) log pi_ref(. | s) of the current state
        self.ref_logprob_sum = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.steps = np.zeros(n, dtype=np.int64)  # tokens generated in the current episode
        self.done = np.zeros(n, dtype=bool)  # episode over, waiting for a reset
        self.prompt_index = np.zeros(n, dtype=np.int64)
        self.prompt_text: list[str] = [""] * n
        self.rngs: list[np.random.Generator] = [seeding.np_random()[0] for _ in range(n)]
        self.started = False
        self._prompt_cache: dict[tuple[str, int], tuple[str, list[int]]] = {}
        self._warned_truncation = False

    # ------------------------------------------------------------ sequence-level access
    def prompts(self, split: str = "train", n: int | None = None, start: int = 0) -> list[str]:
        """``n`` consecutive prompts of a task split from ``start`` (all of it when ``n`` is None)."""
        return self.task.prompts(split, n, start)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """The env's reward-model scores of (prompt, completion) pairs: a float32 tensor ``(B,)``
        (empty for ``B == 0``). ``prompts`` and ``completions`` are equally long lists of str."""
        prompts, completions = check_text_pairs(prompts, completions, "score")
        if not prompts:
            return torch.zeros(0, dtype=torch.float32)
        return check_scores(self.reward_model, self.reward_model.score(prompts, completions), len(prompts))

    def gold(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The task's gold scores of (prompt, completion) pairs (equally long lists of str)."""
        prompts, completions = check_text_pairs(prompts, completions, "gold")
        return self.task.gold(prompts, completions)

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """P(a ≻ b | prompt), shape ``(B,)``: the reward model's own pairwise oracle when it has one
        (a preference model, a judge, a labeler population), else Bradley-Terry over its scores,
        ``σ(score(a) − score(b))``. Nash-learning agents query this."""
        prompts, a = check_text_pairs(prompts, a, "prefer", "a")
        prompts, b = check_text_pairs(prompts, b, "prefer", "b")
        if not prompts:
            return torch.zeros(0, dtype=torch.float32)
        if hasattr(self.reward_model, "prefer"):
            return self.reward_model.prefer(prompts, a, b)
        return torch.sigmoid(self.score(prompts, a) - self.score(prompts, b))

    # ------------------------------------------------------------ reset
    def reset(
        self, seed: int | Sequence[int | None] | None = None, options: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a new episode in every row and return the observation ``(input_ids, attention_mask)``.

        ``seed``: an int seeds row ``i`` with ``seed + i`` (like gymnasium's vector envs, so row ``i``
        samples the same prompts as a single env seeded ``seed + i``); a sequence gives one seed per
        row (None keeps that row's generator); None keeps all generators.
        ``options``: ``{"prompt_index": int or one int per row}`` picks the prompts instead of
        sampling them; ``{"split": name}`` switches the split for this and later episodes;
        ``{"reset_mask": (N,) bool}`` resets only the rows where it is True (gymnasium's partial
        reset; seeds and per-row prompt indices apply to those rows; the other rows keep their
        episodes). The returned observation covers every row.
        """
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"reset options must be a dict such as {{'prompt_index': 0}}, got {type(options).__name__}.")
        options = dict(options or {})
        unknown = set(options) - set(RESET_OPTIONS)
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; valid options are {list(RESET_OPTIONS)}.")
        # Validate everything before changing any state, so a bad call leaves the env as it was.
        seeds = self._check_seeds(seed)
        split = options.get("split", self.split)
        if "split" in options:
            self.task.check_split(split)
            self._check_split_nonempty(split)
        indices = options.get("prompt_index")
        if indices is not None:
            indices = self._check_prompt_index(indices, split)
        rows = np.arange(self.num_envs)
        if options.get("reset_mask") is not None:
            rows = self._check_reset_mask(options["reset_mask"])
        for i in rows:
            if seeds[i] is not None:
                self.rngs[i] = seeding.np_random(seeds[i])[0]
        self.split = split
        if self.ref_lm is not None and len(rows) == self.num_envs:
            self.ref_lm.clear()
            self.ref_next_logprobs = None
        self._reset_rows(rows, None if indices is None else indices[rows])
        self.started = True
        return self.input_ids, self.attention_mask

    def _check_reset_mask(self, mask) -> np.ndarray:
        """The rows the ``reset_mask`` option selects (a (N,) bool array or tensor with a True)."""
        arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if arr.dtype != np.bool_ or arr.shape != (self.num_envs,):
            raise ValueError(
                f"reset option reset_mask must be a bool array of shape ({self.num_envs},), one flag per env; "
                f"got {arr.dtype} of shape {arr.shape}."
            )
        if not arr.any():
            raise ValueError("reset option reset_mask selects no env; set at least one flag, or do not reset.")
        if not self.started and not arr.all():
            raise ValueError("reset option reset_mask needs a full reset() first: the other rows have no episode yet.")
        return np.flatnonzero(arr)

    def _check_seeds(self, seed) -> list[int | None]:
        """One seed (or None) per row: ``seed + i`` for an int, the entries of a sequence as given."""
        def is_seed(s) -> bool:
            return isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0

        if seed is None:
            return [None] * self.num_envs
        if is_seed(seed):
            return [int(seed) + i for i in range(self.num_envs)]
        if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
            raise ValueError(f"reset seed must be an int >= 0, None, or one per env, got {seed!r:.60}.")
        seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset got {len(seeds)} seeds for {self.num_envs} envs; pass one seed per env or one int.")
        for s in seeds:
            if s is not None and not is_seed(s):
                raise ValueError(f"reset seeds must be ints >= 0 or None, got {s!r:.40}.")
        return [None if s is None else int(s) for s in seeds]

    def _check_prompt_index(self, value, split: str) -> np.ndarray:
        """The ``prompt_index`` reset option as one index per row, each in ``[0, split_size)``."""
        size = self.task.split_size(split)
        valid = f"an int in [0, {size}) for split {split!r}, or a sequence of {self.num_envs} such ints (one per env)"
        arr = np.asarray(value) if not isinstance(value, (str, bytes)) else np.asarray([value])
        if arr.dtype.kind not in "iu" or arr.ndim > 1 or (arr.ndim == 1 and len(arr) != self.num_envs):
            raise ValueError(f"reset option prompt_index must be {valid}; got {value!r:.60}.")
        arr = np.broadcast_to(arr.astype(np.int64), (self.num_envs,))
        bad = arr[(arr < 0) | (arr >= size)]
        if bad.size:
            raise ValueError(
                f"reset option prompt_index {int(bad[0])} is outside split {split!r} of size {size}; use 0..{size - 1}."
            )
        return arr

    def _check_split_nonempty(self, split: str) -> None:
        if self.task.split_size(split) < 1:
            raise ValueError(f"split {split!r} of task {self.task.name!r} has no prompts; choose another split.")

    def _prompts_and_tokens(self, indices: Sequence[int]) -> list[tuple[str, list[int]]]:
        """(text, token ids) of the given prompts of the current split (cached; tokenized in one batch)."""
        split = self.split
        missing = sorted({int(i) for i in indices if (split, int(i)) not in self._prompt_cache})
        if missing:
            texts = [self.task.prompt(split, i) for i in missing]
            encoded = encode_prompts(self.tokenizer, texts)
            for i, text, ids in zip(missing, texts, encoded):
                if len(ids) > self.max_prompt_tokens:
                    if not self._warned_truncation:
                        warnings.warn(
                            f"prompt {i} of split {split!r} has {len(ids)} tokens; keeping its last "
                            f"{self.max_prompt_tokens} (raise max_prompt_tokens to keep whole prompts).",
                            stacklevel=3,
                        )
                        self._warned_truncation = True
                    ids = ids[-self.max_prompt_tokens :]
                if not ids:
                    raise ValueError(f"prompt {i} of split {split!r} encodes to zero tokens; the env needs non-empty prompts.")
                self._prompt_cache[(split, i)] = (text, list(ids))
        return [self._prompt_cache[(split, int(i))] for i in indices]

    def _reset_rows(self, rows: np.ndarray, indices: np.ndarray | None = None) -> None:
        """Sample (or take) a prompt for each row in ``rows`` and make it that row's state."""
        size = self.task.split_size(self.split)
        if indices is None:
            indices = np.array([self.rngs[r].integers(size) for r in rows], dtype=np.int64)
        else:
            indices = np.asarray(indices, dtype=np.int64)  # checked by reset()
        cached = self._prompts_and_tokens(indices)
        tokens = [t for _, t in cached]

        k, w = len(rows), self.window
        ids = np.full((k, w), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((k, w), dtype=np.int64)
        for j, t in enumerate(tokens):
            ids[j, w - len(t) :] = t
            mask[j, w - len(t) :] = 1
        rows_t = torch.as_tensor(rows, device=self.device)
        # out-of-place index_put: tensors handed out earlier must never change
        self.input_ids = self.input_ids.index_put((rows_t,), torch.from_numpy(ids).to(self.device))
        self.attention_mask = self.attention_mask.index_put((rows_t,), torch.from_numpy(mask).to(self.device))
        self.ref_logprob_sum = self.ref_logprob_sum.index_fill(0, rows_t, 0.0)
        if self.ref_lm is not None:
            logits = self.ref_lm.reset_rows(rows, tokens)
            lp = torch.log_softmax(logits.float(), dim=-1)
            if self.ref_next_logprobs is None:
                self.ref_next_logprobs = lp.new_zeros(self.num_envs, lp.shape[-1])
            self.ref_next_logprobs[rows_t] = lp
        self.steps[rows] = 0
        self.done[rows] = False
        self.prompt_index[rows] = indices
        for r, (text, _) in zip(rows, cached):
            self.prompt_text[r] = text

    # ------------------------------------------------------------ step
    def _as_actions(self, actions) -> torch.Tensor:
        if isinstance(actions, torch.Tensor):
            if actions.dtype.is_floating_point or actions.dtype == torch.bool or actions.is_complex():
                raise ValueError(f"actions must be integer token ids, got a {actions.dtype} tensor.")
            a = actions.to(self.device, torch.long)
        else:
            arr = np.asarray(actions)
            if arr.dtype.kind not in "iu":
                raise ValueError(f"actions must be integer token ids, got {arr.dtype} ({actions!r:.60}).")
            a = torch.from_numpy(arr.astype(np.int64, copy=False)).to(self.device)
        if a.numel() != self.num_envs or (a.ndim > 1):
            raise ValueError(f"expected {self.num_envs} action(s) (one token id per env), got shape {tuple(a.shape)}.")
        return a.reshape(self.num_envs)

    def step(self, actions) -> StepResult:
        """Append one token per row; see the module docstring for rewards and :class:`StepResult`."""
        if not self.started:
            raise ResetNeeded("step() called before reset(); call reset() first.")
        if self.autoreset_mode == AutoresetMode.DISABLED and self.done.all():
            raise ResetNeeded(
                "step() called after the episode ended (terminated or truncated); call reset() to start a new one."
                if self.num_envs == 1 else
                f"step() called after all {self.num_envs} episodes ended (autoreset_mode=Disabled); call reset() "
                "(or reset(options={'reset_mask': mask}) for some rows)."
            )
        n, device = self.num_envs, self.device
        a = self._as_actions(actions)
        # Rows whose episode ended earlier do not act: NEXT_STEP restarts them now (ignoring their
        # action), DISABLED leaves them idle until reset.
        idle = self.done.copy()
        stepping = ~idle

        # Single device->host transfer per step: which actions are out of range, which are EOS.
        flags = torch.stack([(a < 0) | (a >= self.vocab_size), a == self.eos_token_id]).cpu().numpy()
        bad = np.flatnonzero(flags[0] & stepping)
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"action {int(a[i])} (env {i}) is out of range: actions are token ids in [0, {self.vocab_size - 1}] "
                f"(Discrete({self.vocab_size}))."
            )
        if flags[0].any():  # ignored actions of idle rows must still be valid embedding indices
            a = a.clamp(0, self.vocab_size - 1)

        terminated = flags[1] & stepping
        self.steps[stepping] += 1
        truncated = stepping & ~terminated & (self.steps >= self.max_new_tokens)
        finished = np.flatnonzero(terminated | truncated)

        if self.ref_next_logprobs is not None:
            ref_lp = self.ref_next_logprobs.gather(1, a.view(n, 1)).view(n)
            if idle.any():  # idle rows (restarting or finished) did not act
                ref_lp = torch.where(torch.from_numpy(stepping).to(device), ref_lp, ref_lp.new_zeros(()))
            self.ref_logprob_sum = self.ref_logprob_sum + ref_lp
        else:
            ref_lp = torch.zeros(n, dtype=torch.float32, device=device)
        reward = self.kl_coef * ref_lp if self.kl_coef != 0.0 else torch.zeros(n, dtype=torch.float32, device=device)

        # New observation: shift left by one column and append the action (rows that reset are
        # overwritten below). New tensors, so observations handed out earlier stay valid.
        self.input_ids = torch.cat([self.input_ids[:, 1:], a.view(n, 1)], dim=1)
        self.attention_mask = torch.cat([self.attention_mask[:, 1:], self.attention_mask.new_ones(n, 1)], dim=1)

        # Advance the reference model for the rows whose episode goes on (one batched forward).
        # Launched before scoring, so on a GPU it runs while the host decodes and scores.
        if self.ref_lm is not None:
            going_on = stepping.copy()
            going_on[finished] = False
            if going_on.any():
                active = None if going_on.all() else torch.from_numpy(going_on).to(device)
                logits = self.ref_lm.step(a, active=active)
                self.ref_next_logprobs = torch.log_softmax(logits.float(), dim=-1)

        result = StepResult(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            reward=reward,
            ref_logprob=ref_lp,
            terminated=terminated,
            truncated=truncated,
            finished=finished,
            rm_score=torch.zeros(0, device=device),
            gold=np.zeros(0),
            completions=[],
            prompts=[],
            prompt_index=self.prompt_index[finished].copy(),
            ref_logprob_sum=torch.zeros(0, device=device),
            length=self.steps[finished].copy(),
            reset_rows=np.zeros(0, dtype=np.int64),
        )
        if finished.size:
            self._score_finished(result)

        self.done[finished] = True
        if self.autoreset_mode == AutoresetMode.SAME_STEP and finished.size:
            result.final_input_ids, result.final_attention_mask = self.input_ids, self.attention_mask
            self._reset_rows(finished)
            result.reset_rows = finished
        elif self.autoreset_mode == AutoresetMode.NEXT_STEP and idle.any():
            result.reset_rows = np.flatnonzero(idle)
            self._reset_rows(result.reset_rows)
        result.input_ids, result.attention_mask = self.input_ids, self.attention_mask
        return result

    def _score_finished(self, result: StepResult) -> None:
        """Decode the finished completions once, score them in one batch, add the scores to the reward."""
        rows = result.finished
        m = self.max_new_tokens
        tail = self.input_ids[torch.as_tensor(rows, device=self.device), -m:].tolist()  # one transfer
        token_lists = [t[m - int(self.steps[r]) :] for t, r in zip(tail, rows)]
        completions = decode_completions(self.tokenizer, token_lists)
        prompts = [self.prompt_text[r] for r in rows]
        rm = self.score(prompts, completions).to(self.device)
        if self._gold_is_rm:
            gold = rm.cpu().numpy().astype(np.float64)
        elif self.task.has_gold:
            gold = np.asarray(self.task.gold(prompts, completions), dtype=np.float64)
        else:
            gold = np.full(len(rows), np.nan)
        rows_t = torch.as_tensor(rows, device=self.device)
        result.reward = result.reward.index_add(0, rows_t, rm)
        result.ref_logprob_sum = self.ref_logprob_sum[rows_t]
        result.rm_score, result.gold = rm, gold
        result.completions, result.prompts = completions, prompts


class SequenceAccess:
    """The sequence-level access shared by every view of a :class:`TokenMDPCore` (the single env,
    the vector env and the SB3 adaptor), written once so the three cannot drift apart.

    A subclass sets ``self.core``. Everything here reads through to it: :meth:`prompts`,
    :meth:`score`, :meth:`gold`, :meth:`prefer`, and the attributes :attr:`config`, :attr:`task`,
    :attr:`tokenizer`, :attr:`reference_model`, :attr:`reward_model`, :attr:`kl_coef`,
    :attr:`max_new_tokens`, :attr:`max_prompt_tokens`, :attr:`device`.
    """

    #: the public names this mixin provides (the same on every view)
    SEQUENCE_ACCESS = (
        "prompts", "score", "gold", "prefer", "config", "task", "tokenizer", "reference_model",
        "reward_model", "kl_coef", "max_new_tokens", "max_prompt_tokens", "device",
    )

    core: TokenMDPCore

    @property
    def config(self) -> EnvConfig:
        """The validated settings this env was built with (:class:`~.config.EnvConfig`)."""
        return self.core.config

    @property
    def task(self) -> Task:
        """Where prompts come from, with the gold scorer."""
        return self.core.task

    @property
    def tokenizer(self):
        """The tokenizer: ``len(tokenizer)`` is the action space size, its EOS ends episodes."""
        return self.core.tokenizer

    @property
    def reference_model(self) -> torch.nn.Module:
        """The frozen reference policy ``pi_ref`` (a causal LM on the env's device)."""
        return self.core.reference

    @property
    def reward_model(self) -> RewardFunction:
        """What scores finished episodes (a :class:`~.rewards.RewardFunction`)."""
        return self.core.reward_model

    @property
    def kl_coef(self) -> float:
        """``beta`` of the per-step reward ``beta * log pi_ref(a_t|s_t)``."""
        return self.core.kl_coef

    @property
    def max_new_tokens(self) -> int:
        """Episodes are truncated after this many generated tokens."""
        return self.core.max_new_tokens

    @property
    def max_prompt_tokens(self) -> int:
        """Prompts longer than this keep their last tokens."""
        return self.core.max_prompt_tokens

    @property
    def device(self) -> torch.device:
        """The device of the observations, rewards and reference model."""
        return self.core.device

    def prompts(self, split: str = "train", n: int | None = None, start: int = 0) -> list[str]:
        """``n`` consecutive prompts of a task split from ``start`` (all of it when ``n`` is None)."""
        return self.core.prompts(split, n, start)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Reward-model scores ``(B,)`` of (prompt, completion) pairs, as the env would reward them."""
        return self.core.score(prompts, completions)

    def gold(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Gold scores of (prompt, completion) pairs from the task."""
        return self.core.gold(prompts, completions)

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """P(a ≻ b | prompt) from the env's feedback (see :meth:`TokenMDPCore.prefer`)."""
        return self.core.prefer(prompts, a, b)
