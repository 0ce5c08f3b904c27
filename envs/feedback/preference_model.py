"""A two-argument preference model P(y > y' | x), antisymmetric by construction.

Bradley-Terry squeezes preferences through one scalar per completion and so cannot represent
non-transitive preferences (e.g. the ``"intransitive"`` labeler population). Nash learning
(Munos et al. 2024) instead uses a model that reads *both* completions::

    f(x, y, y') = scalar head on  "x [SEP] y [SEP] y'"       (a causal LM + 1-output head)
    P(y > y')   = sigmoid( f(x, y, y') - f(x, y', y) )

Subtracting the swapped order makes ``P(y > y') = 1 - P(y' > y)`` (and ``P(y > y) = 1/2``) hold
exactly for any weights, so the model never has to learn it and cannot learn position bias.
Training (:func:`rlhfgym.envs.build.training.train_preference_model`, part of the asset build) is
supervised on preference records with the soft-label cross-entropy::

    loss = -[ p log P(chosen > rejected) + (1 - p) log P(rejected > chosen) ]

``[SEP]`` is the tokenizer's ``sep_token`` if it has one, else its EOS token; the input is built
from token ids (``[bos] x [SEP] y [SEP] y' [eos]``) so no text-level separator can be confused
with content.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..moved import moved_attributes
from ..hf import quiet_transformers, resolve_device
from .reward_model import ensure_pad_token, save_scalar_model, scalar_forward

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
        """f(x, a, b) - f(x, b, a) for pre-encoded pairs (with gradients), (B,) float32. The two orders
        of a pair share "x [SEP]", which is read once (``scalar_forward``'s ``share_prefixes``)."""
        f = scalar_forward(self.model, list(fwd) + list(rev), self.tokenizer.pad_token_id, self.device, share_prefixes=True)
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
        return save_scalar_model(path, self.model, self.tokenizer, CONFIG_NAME, cfg)

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


__all__ = ["PreferenceModel", "evaluate_preference_model"]

# moved to the asset-building package; resolved lazily (runtime code never imports the build)
__getattr__ = moved_attributes(__name__, {"train_preference_model": "rlhfgym.envs.build.training"})
