"""Training the asset build's feedback models: the preference model and the judge.

Both go through the generic loop :func:`~rlhfgym.envs.feedback.training.train_loop`, which, like
:func:`~rlhfgym.envs.feedback.training.train_reward_model` and :func:`linear_schedule`, is runtime
code in :mod:`rlhfgym.envs.feedback.training` (the zoo's studies fit reward models with it too) and
is re-exported here, so ``rlhfgym.envs.build.training.train_reward_model`` still names the trainer of
the shipped reward models. See that module for the loop's contract (``batch_loss``/``end_epoch``,
shuffling, schedule, resumable snapshots).

The models themselves (:class:`~rlhfgym.envs.feedback.reward_model.RewardModel`,
:class:`~rlhfgym.envs.feedback.preference_model.PreferenceModel`, the judge's
:class:`~rlhfgym.envs.feedback.judge.ConstitutionJudge`) and their evaluators are runtime code in
:mod:`rlhfgym.envs.feedback`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..feedback.preference_model import PreferenceModel, evaluate_preference_model
from ..feedback.reward_model import load_scalar_model, seed_everything, soft_bt_loss
from ..feedback.training import BatchLoss, EndEpoch, linear_schedule, train_loop, train_reward_model  # noqa: F401
from ..hf import resolve_device

__all__ = ["train_loop", "linear_schedule", "train_reward_model", "train_preference_model", "train_judge_lm"]


# ----------------------------------------------------------------------------------------------
# The preference model


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

    Same arguments as :func:`train_reward_model` (``checkpoint_dir``: resumable snapshots of the
    loop); ``pm.history`` holds one dict of metrics per epoch.
    """
    seed_everything(seed)
    device = resolve_device(device)
    model = load_scalar_model(backbone_or_path, tokenizer).to(device)
    pm = PreferenceModel(model, tokenizer, device, batch_size, max_prompt_tokens, max_completion_tokens)
    n = len(train_prefs)
    if n == 0:
        raise ValueError("train_prefs is empty; label some comparisons first.")
    fwd, rev = pm.encode_pairs(train_prefs["prompt"], train_prefs["chosen"], train_prefs["rejected"])
    label_prob = torch.tensor(train_prefs["label_prob"], dtype=torch.float32, device=device)

    def batch_loss(idx: list[int]):
        logit = pm.logit([fwd[i] for i in idx], [rev[i] for i in idx])  # log-odds of chosen > rejected
        p = label_prob[idx]
        loss = soft_bt_loss(logit, p)  # = soft cross-entropy of sigmoid(logit) against p
        return loss, (loss.item() * len(idx), ((logit > 0) == (p > 0.5)).float().sum().item())

    def end_epoch(epoch: int, sums: tuple) -> dict[str, Any]:
        loss_sum, acc_sum = sums
        record: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / n, "train_accuracy": acc_sum / n}
        if eval_prefs is not None and len(eval_prefs):
            ev = evaluate_preference_model(pm, eval_prefs)
            record.update({"eval_loss": ev["loss"], "eval_accuracy": ev["accuracy"]})
        return record

    pm.history = train_loop(
        model, n, batch_loss, end_epoch, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, fresh_sums=(0.0, 0.0),
        fingerprint={"kind": "preference model", "n": n, "epochs": epochs, "lr": lr, "batch_size": batch_size,
                     "seed": seed, "weight_decay": weight_decay},
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, checkpoint_dir=checkpoint_dir,
        desc="preference model", progress=progress,
    )
    return pm


# ----------------------------------------------------------------------------------------------
# The judge


def train_judge_lm(model, tokenizer, texts, targets, answer_ids, *, epochs, lr, batch_size, device, seed,
                   group_size: int = 1, progress=False, checkpoint_dir=None) -> list[dict[str, Any]]:
    """Fine-tune a causal LM to answer judge questions: soft cross-entropy between the target
    P(answer A) and sigmoid(logit A - logit B) at the last token (right padding, as the judge reads
    it). AdamW, 5% warm-up, linear decay; returns one dict of metrics per epoch.

    ``group_size``: consecutive examples that are shuffled as one block and so share a batch (the
    same pair under every principle and order, :func:`~.feedback.judge_examples`): within a batch
    the only thing that tells the questions of a group apart is the principle text and the option
    order, so the gradient teaches the model to read exactly those. A batch holds
    ``batch_size // group_size`` whole groups. ``checkpoint_dir``: resumable snapshots of the loop
    (:class:`~rlhfgym.envs.feedback.checkpoint.LoopCheckpoint`), deleted at the end."""
    from ..feedback.judge import answer_logit_diff

    seqs = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    y = torch.tensor(targets, dtype=torch.float32, device=device)
    pad = tokenizer.pad_token_id
    n = len(seqs)
    group_size = max(1, int(group_size))
    if n % group_size:
        raise ValueError(f"{n} examples do not split into groups of {group_size}.")
    groups_per_batch = max(1, batch_size // group_size)

    def batch_loss(idx: list[int]):
        d = answer_logit_diff(model, [seqs[i] for i in idx], answer_ids, pad, device, group_size)
        p = y[idx]
        loss = soft_bt_loss(d, p)
        dec = p != 0.5
        return loss, (loss.item() * len(idx), ((d > 0) == (p > 0.5))[dec].float().sum().item(), dec.sum().item())

    def end_epoch(epoch: int, sums: tuple) -> dict[str, Any]:
        loss_sum, acc_sum, decided = sums
        return {"epoch": epoch, "train_loss": loss_sum / n, "train_checker_accuracy": acc_sum / max(decided, 1)}

    return train_loop(
        model, n, batch_loss, end_epoch, epochs=epochs, lr=lr, batch_size=groups_per_batch * group_size, seed=seed,
        fresh_sums=(0.0, 0.0, 0.0),
        fingerprint={"kind": "judge", "n": n, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                     "group_size": group_size},
        groups=[range(g * group_size, (g + 1) * group_size) for g in range(n // group_size)],
        warmup_steps=lambda total: max(1, total // 20), checkpoint_dir=checkpoint_dir, desc="judge", progress=progress,
    )
