"""A two-argument preference model P(y > y' | x), antisymmetric by construction.

Bradley-Terry squeezes preferences through one scalar per completion and so cannot represent
non-transitive preferences (e.g. the ``"intransitive"`` labeler population). Nash learning
(Munos et al. 2024) instead uses a model that reads *both* completions::

    f(x, y, y') = scalar head on  "x [SEP] y [SEP] y'"       (a causal LM + 1-output head)
    P(y > y')   = sigmoid( f(x, y, y') - f(x, y', y) )

Subtracting the swapped order makes ``P(y > y') = 1 - P(y' > y)`` (and ``P(y > y) = 1/2``) hold
exactly for any weights, so the model never has to learn it and cannot learn position bias.
Training is supervised on preference records with the soft-label cross-entropy::

    loss = -[ p log P(chosen > rejected) + (1 - p) log P(rejected > chosen) ]

``[SEP]`` is the tokenizer's ``sep_token`` if it has one, else its EOS token; the input is built
from token ids (``[bos] x [SEP] y [SEP] y' [eos]``) so no text-level separator can be confused
with content.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..assets import atomic_save_dir
from ..hf import quiet_transformers, resolve_device
from .reward_model import (
    ensure_pad_token,
    load_scalar_model,
    scalar_forward,
    seed_everything,
    soft_bt_loss,
)

CONFIG_NAME = "preference_config.json"


class PreferenceModel:
    """P(a > b | x) from a scalar-head LM over the pair; ``prefer(prompts, a, b) -> (B,)``.

    ``max_prompt_tokens`` / ``max_completion_tokens`` bound the pieces (the prompt is cut from the
    left, completions from the right) so both completions always fit.
    """

    def __init__(
        self,
        model,
        tokenizer,
        device: str | torch.device | None = "cpu",
        batch_size: int = 16,
        max_prompt_tokens: int = 384,
        max_completion_tokens: int = 128,
    ):
        ensure_pad_token(tokenizer)
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.model.config.pad_token_id = tokenizer.pad_token_id
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_completion_tokens = int(max_completion_tokens)
        sep = tokenizer.sep_token_id if getattr(tokenizer, "sep_token_id", None) is not None else tokenizer.eos_token_id
        if sep is None:
            raise ValueError("the tokenizer has neither a sep nor an EOS token to separate the pair; add one.")
        self.sep_id = sep
        self.history: list[dict[str, float]] = []

    # -- inputs ----------------------------------------------------------------------------------
    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def encode_pairs(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of "x [SEP] a [SEP] b" and of the swapped "x [SEP] b [SEP] a"."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"prompts, a and b must have one entry per pair; got {len(prompts)}, {len(a)}, {len(b)}.")
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        xs = [x[-self.max_prompt_tokens :] for x in self._ids(prompts)]
        ya = [y[: self.max_completion_tokens] for y in self._ids(a)]
        yb = [y[: self.max_completion_tokens] for y in self._ids(b)]
        s = [self.sep_id]
        fwd = [bos + x + s + p + s + q + eos for x, p, q in zip(xs, ya, yb)]
        rev = [bos + x + s + q + s + p + eos for x, p, q in zip(xs, ya, yb)]
        return fwd, rev

    def logit(self, fwd: Sequence[Sequence[int]], rev: Sequence[Sequence[int]]) -> torch.Tensor:
        """f(x, a, b) - f(x, b, a) for pre-encoded pairs (with gradients), (B,) float32."""
        f = scalar_forward(self.model, list(fwd) + list(rev), self.tokenizer.pad_token_id, self.device)
        return f[: len(fwd)] - f[len(fwd) :]

    # -- inference ---------------------------------------------------------------------------------
    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """P(a > b | prompt), (B,) float32 on ``device``; exactly ``1 - prefer(prompts, b, a)``."""
        fwd, rev = self.encode_pairs(prompts, a, b)
        was_training = self.model.training
        self.model.eval()
        out = []
        with torch.inference_mode():
            for s in range(0, len(fwd), self.batch_size):
                out.append(torch.sigmoid(self.logit(fwd[s : s + self.batch_size], rev[s : s + self.batch_size])))
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    __call__ = prefer

    def to(self, device: str | torch.device) -> "PreferenceModel":
        self.device = resolve_device(device)
        self.model.to(self.device)
        return self

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        cfg = {
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_completion_tokens": self.max_completion_tokens,
            "sep_id": self.sep_id,
            "history": self.history,
        }
        with atomic_save_dir(path) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        return Path(path)

    @classmethod
    @quiet_transformers()
    def load(cls, path: str | os.PathLike[str], device: str | torch.device | None = "cpu", batch_size: int = 16) -> "PreferenceModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
        cfg_path = Path(path) / CONFIG_NAME
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        pm = cls(model, tokenizer, device, batch_size, cfg.get("max_prompt_tokens", 384), cfg.get("max_completion_tokens", 128))
        pm.history = cfg.get("history", [])
        return pm


def evaluate_preference_model(pm: PreferenceModel, prefs) -> dict[str, float]:
    """Accuracy against hard labels (ties skipped) and the soft cross-entropy on preference records."""
    p_hat = pm.prefer(prefs["prompt"], prefs["chosen"], prefs["rejected"]).double().cpu()
    p = torch.tensor(prefs["label_prob"], dtype=torch.float64)
    decided = p != 0.5
    eps = 1e-12
    loss = -(p * torch.log(p_hat + eps) + (1 - p) * torch.log(1 - p_hat + eps)).mean()
    return {
        "n": int(decided.sum()),
        "accuracy": float(((p_hat > 0.5) == (p > 0.5))[decided].double().mean()) if decided.any() else float("nan"),
        "loss": float(loss),
    }


def train_preference_model(
    backbone_or_path,
    tokenizer,
    train_prefs,
    eval_prefs=None,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 16,
    device: str | torch.device | None = "cpu",
    seed: int = 0,
    progress: bool = True,
    *,
    max_prompt_tokens: int = 384,
    max_completion_tokens: int = 128,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    checkpoint_dir=None,
) -> PreferenceModel:
    """Supervised training of a :class:`PreferenceModel` on preference records (soft labels).

    Same arguments as :func:`~rlhfgym.envs.feedback.reward_model.train_reward_model` (``checkpoint_dir``:
    resumable snapshots of the loop); ``pm.history`` holds one dict of metrics per epoch.
    """
    from ..build.checkpoint import LoopCheckpoint

    seed_everything(seed)
    device = resolve_device(device)
    model = load_scalar_model(backbone_or_path, tokenizer).to(device)
    pm = PreferenceModel(model, tokenizer, device, batch_size, max_prompt_tokens, max_completion_tokens)
    n = len(train_prefs)
    if n == 0:
        raise ValueError("train_prefs is empty; label some comparisons first.")
    fwd, rev = pm.encode_pairs(train_prefs["prompt"], train_prefs["chosen"], train_prefs["rejected"])
    label_prob = torch.tensor(train_prefs["label_prob"], dtype=torch.float32, device=device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * math.ceil(n / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(total, 1))
    gen = torch.Generator().manual_seed(seed)
    ckpt = LoopCheckpoint(checkpoint_dir, {"kind": "preference model", "n": n, "epochs": epochs, "lr": lr,
                                           "batch_size": batch_size, "seed": seed, "weight_decay": weight_decay})
    done, state = ckpt.restore(model, optimizer, scheduler)
    pm.history = list(state.get("history", []))
    steps_per_epoch = math.ceil(n / batch_size)
    bar = tqdm(total=total, initial=done, desc="preference model", disable=not progress, leave=False)
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).tolist()
        sums = ckpt.epoch_start(epoch, steps_per_epoch, len(pm.history), fresh=(0.0, 0.0))
        if sums is None:
            step += steps_per_epoch  # the snapshot holds this whole epoch
            continue
        loss_sum, acc_sum = sums
        for s in range(0, n, batch_size):
            step += 1
            if step <= done:
                continue  # resuming: this batch is in the snapshot
            idx = perm[s : s + batch_size]
            logit = pm.logit([fwd[i] for i in idx], [rev[i] for i in idx])  # log-odds of chosen > rejected
            p = label_prob[idx]
            loss = soft_bt_loss(logit, p)  # = soft cross-entropy of sigmoid(logit) against p
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            acc_sum += ((logit > 0) == (p > 0.5)).float().sum().item()
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            ckpt.maybe_save(step, model, optimizer, scheduler, {"history": pm.history, "sums": (loss_sum, acc_sum)})
        record: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / n, "train_accuracy": acc_sum / n}
        if eval_prefs is not None and len(eval_prefs):
            ev = evaluate_preference_model(pm, eval_prefs)
            record.update({"eval_loss": ev["loss"], "eval_accuracy": ev["accuracy"]})
        pm.history.append(record)
    bar.close()
    ckpt.clear()
    model.eval()
    return pm


__all__ = ["PreferenceModel", "train_preference_model", "evaluate_preference_model"]
