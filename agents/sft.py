"""Supervised fine-tuning (behaviour cloning) on (prompt, completion) pairs.

The first stage of the RLHF pipeline in the seed lectures ("collect demonstration data, and train a
supervised policy"; Ouyang et al. 2022) and the Improve step of ReST: maximise the likelihood of
reference completions, i.e. minimise the token-level negative log-likelihood::

    L(theta) = - (1 / sum_i |y_i|) * sum_i sum_t log pi_theta(y_i,t | x_i, y_i,<t)

over completions ``y_i`` followed by EOS (the policy must learn to stop), prompts encoded exactly as
the env encodes them (its tokenizer, the last ``max_prompt_tokens`` tokens kept), completions cut at
the env's ``max_new_tokens`` (as the env truncates episodes).

Where the pairs come from (the budget counts pairs consumed, one unit each):

* ``data=None``: the env's task references, ``env.unwrapped.task.reference(split, i)`` for a stream of
  prompt indices ``i`` (the micro news world writes them with a mixture of writers; ``writer="expert"``
  keeps the best one only).
* ``data=[(prompt, completion), ...]`` or a ``datasets.Dataset`` with ``prompt`` and ``completion``
  columns: those pairs, reshuffled every epoch.

The order of the stream is a pure function of ``seed`` and the position in it, so a resumed run sees
the pairs the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import Agent, AgentError
from .common import SPLITS, AgentConfig, TrainingAgent, TrainingRun, param
from .policy import CausalLMPolicy


class SFT(TrainingAgent):
    """Fine-tune the policy on (prompt, completion) pairs by next-token NLL.

    Args:
        policy: a :class:`CausalLMPolicy`; None = a copy of the env's reference model.
        data: pairs to learn from instead of the task's references (list of ``(prompt, completion)``
            or a ``datasets.Dataset``). Not saved with the agent: pass it again to resume.
        hyperparameters: the fields of :class:`SFT.Config`.
    """

    @dataclass
    class Config(AgentConfig):
        """Hyperparameters of :class:`SFT`.

        learning_rate: AdamW step size.
        batch_size: pairs per gradient step.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (global norm).
        writer: which reference writer of the task to learn from (micro world: "expert", "omitter",
            "wordy", "inventor"); None = the task's own mixture. Ignored when ``data`` is given.
        split: the task split the references come from.
        """

        learning_rate: float = param(1e-4, low=0, low_open=True)
        batch_size: int = param(32, low=1)
        weight_decay: float = param(0.0, low=0)
        max_grad_norm: float = param(1.0, low=0, low_open=True)
        writer: str | None = None
        split: str = param("train", choices=SPLITS)

    name = "sft"

    def __init__(self, policy: CausalLMPolicy | None = None, *, data=None, **hyperparameters):
        super().__init__(policy, **hyperparameters)
        self.data = _as_pairs(data) if data is not None else None

    # ------------------------------------------------------------------------------------------ data
    def _pairs(self, core, start: int, n: int) -> list[tuple[str, str]]:
        """Pairs ``start .. start + n - 1`` of the training stream (epoch ``e`` = a seeded permutation)."""
        size = len(self.data) if self.data is not None else core.task.split_size(self.config["split"])
        out, perms = [], {}
        for pos in range(start, start + n):
            epoch, j = divmod(pos, size)
            if epoch not in perms:
                perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(size)
            i = int(perms[epoch][j])
            if self.data is not None:
                out.append(self.data[i])
            else:
                split = self.config["split"]
                out.append((core.prompts(split, 1, i)[0], core.task.reference(split, i, writer=self.config["writer"])))
        return out

    def encode(self, pairs: Sequence[tuple[str, str]]):
        """``(prompt_ids, tokens, mask)`` of pairs: completion ids + EOS, cut at ``max_new_tokens``, right-padded."""
        prompt_ids = self.policy.encode_prompts([p for p, _ in pairs])
        tokens, mask = self.policy.encode_completions([c for _, c in pairs])
        return prompt_ids, tokens, mask

    @torch.no_grad()
    def nll(self, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> float:
        """Mean per-token negative log-likelihood (nats) of the completions (+EOS) under the current policy."""
        if self.policy is None:
            raise AgentError("sft: no policy yet; call learn(env, budget) or load(dir) first.")
        total, count = 0.0, 0
        self.policy.eval()
        for s in range(0, len(pairs), batch_size):
            prompt_ids, tokens, mask = self.encode(list(pairs[s:s + batch_size]))
            logp = self.policy.forward_logprobs(prompt_ids, tokens, mask)
            total -= logp.sum().item()
            count += int(mask.sum())
        return total / max(count, 1)

    # ------------------------------------------------------------------------------------------ learning
    def learn(self, env, budget: int, callback: Callable[[Agent, dict], bool | None] | None = None, *,
              checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
              log_dir: str | Path | None = None, progress_bar: bool = True) -> "SFT":
        """Fine-tune until ``budget`` pairs (in total, over resumes) have been consumed.

        ``checkpoint_dir``: resume from it when it holds a checkpoint, save to it every
        ``checkpoint_every`` pairs and at the end. ``log_dir``: TensorBoard scalars.
        """
        c = self.config
        core = env.unwrapped
        if self.data is None:
            if not hasattr(core.task, "reference"):
                raise AgentError(
                    f"sft: task {core.task.name!r} has no reference completions (no task.reference(split, i)); "
                    "pass data=[(prompt, completion), ...] or a datasets.Dataset with prompt/completion columns."
                )
            if c["writer"] is not None:
                core.task.reference(c["split"], 0, writer=c["writer"])  # an unknown writer fails here, clearly
        with TrainingRun(self, budget, callback=callback, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         log_dir=log_dir, progress_bar=progress_bar) as run:
            self.start(run, env)  # resume, policy, seeding
            policy = self.policy
            self.make_optimizer("adamw", c["learning_rate"], weight_decay=c["weight_decay"])

            while not run.done:
                n = min(c["batch_size"], run.remaining)
                prompt_ids, tokens, mask = self.encode(self._pairs(core, self.spent, n))
                policy.train()
                # L = -(1 / #tokens) * sum log pi_theta(y_t | x, y_<t)   (EOS included)
                logp = policy.forward_logprobs(prompt_ids, tokens, mask)
                loss = -logp.sum() / mask.sum()
                grad_norm = self.step(loss)
                policy.eval()
                run.update(n, {"nll": loss.item(), "grad_norm": grad_norm, "length": mask.float().sum(1).mean().item()})
        return self


def _as_pairs(data) -> list[tuple[str, str]]:
    """A list of ``(prompt, completion)`` string pairs from a list of pairs/dicts or a ``datasets.Dataset``."""
    try:
        import datasets

        if isinstance(data, datasets.Dataset):
            missing = {"prompt", "completion"} - set(data.column_names)
            if missing:
                raise AgentError(f"sft: the dataset needs 'prompt' and 'completion' columns; it lacks {sorted(missing)} "
                                 f"(it has {data.column_names}).")
            return list(zip(data["prompt"], data["completion"]))
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    pairs = []
    for k, row in enumerate(data):
        if isinstance(row, dict):
            row = (row.get("prompt"), row.get("completion"))
        if not (isinstance(row, (tuple, list)) and len(row) == 2 and all(isinstance(x, str) for x in row)):
            raise AgentError(f"sft: data item {k} is {row!r:.80}; expected a (prompt, completion) pair of strings.")
        pairs.append((row[0], row[1]))
    if not pairs:
        raise AgentError("sft: data is empty; pass at least one (prompt, completion) pair.")
    return pairs
