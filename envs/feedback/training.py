"""Training loops of the feedback models, as runtime code: the generic loop and the reward model's.

The asset build (:mod:`rlhfgym.envs.build.training`: the shipped reward models, the preference
model, the judge) and the zoo's studies (reward models fitted inside a study:
:mod:`rlhfgym.envs.feedback.fitting`) train with the same code, so it lives here, where runtime code
may import it; the build imports it from here.

Every model is trained by :func:`train_loop`; what differs is a pair of functions handed to it:

* ``batch_loss(idx) -> (loss, sums)``: the loss of the records ``idx`` (with gradients) and what
  the batch adds to the epoch's running sums (plain floats, e.g. ``loss * len(idx)`` and the
  number of correct pairs);
* ``end_epoch(epoch, sums) -> record``: the epoch's entry of the history (train metrics from the
  sums, eval metrics if the model has held-out data).

The loop itself: every epoch draws one permutation of the record *groups* (records that must stay
together, e.g. the questions about one pair; a group per record by default) from a generator
seeded with ``seed``, cuts the resulting order into batches of ``batch_size`` records, and takes one
AdamW step per batch (gradients clipped to ``max_grad_norm``) under a linear-decay schedule with an
optional linear warm-up. The loop is snapshotted to ``checkpoint_dir`` with
:class:`~.checkpoint.LoopCheckpoint` and resumed from there when the same training runs again; a
resumed run ends with the weights and history of an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..hf import mixed_precision, precision_dtype, resolve_device
from .checkpoint import LoopCheckpoint
from .reward_model import (
    FormatFn,
    RewardModel,
    distinct_pairs,
    evaluate_reward_model,
    load_scalar_model,
    scalar_forward,
    seed_everything,
    soft_bt_loss,
)

__all__ = ["train_loop", "linear_schedule", "train_reward_model", "truncated_backbone", "BatchLoss", "EndEpoch"]

BatchLoss = Callable[[list[int]], tuple[torch.Tensor, tuple[float, ...]]]
EndEpoch = Callable[[int, tuple], dict[str, Any]]


def linear_schedule(total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The learning-rate factor of step ``s``: ``1 - s / total_steps`` (linear decay to 0, the usual
    reward-model schedule), times ``min(1, (s + 1) / warmup_steps)`` with a warm-up."""

    def factor(step: int) -> float:
        decay = 1.0 - step / max(total_steps, 1)
        if warmup_steps:
            return min(1.0, (step + 1) / warmup_steps) * max(0.0, decay)
        return decay

    return factor


def train_loop(
    model: torch.nn.Module,
    n: int,
    batch_loss: BatchLoss,
    end_epoch: EndEpoch,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    fresh_sums: tuple,
    fingerprint: dict[str, Any],
    groups: Sequence[Sequence[int]] | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    warmup_steps: int | Callable[[int], int] = 0,
    checkpoint_dir=None,
    desc: str = "train",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``model`` for ``epochs`` passes over ``n`` records; returns one history record per epoch.

    ``groups``: the records shuffled as one block each (default: every record alone); the groups'
    order is drawn with ``torch.randperm`` from a generator seeded with ``seed``, once per epoch, and
    the records, in that order, are cut into batches of ``batch_size``. ``batch_loss`` and
    ``end_epoch``: see the module docstring; ``fresh_sums``: the running sums at the start of an
    epoch, e.g. ``(0.0, 0.0)``. ``warmup_steps``: a number of steps, or a function of the total
    number of steps. ``fingerprint``: what identifies this training in its snapshots
    (:class:`~.checkpoint.LoopCheckpoint`; a snapshot of another training is refused).
    The model is left in eval mode.
    """
    if groups is None:
        groups = [[i] for i in range(n)]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = warmup_steps(total) if callable(warmup_steps) else int(warmup_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total, warmup))
    gen = torch.Generator().manual_seed(seed)
    ckpt = LoopCheckpoint(checkpoint_dir, fingerprint)
    done, state = ckpt.restore(model, optimizer, scheduler)
    history = list(state.get("history", []))
    bar = tqdm(total=total, initial=done, desc=desc, disable=not progress, leave=False)
    step = 0
    for epoch in range(epochs):
        model.train()
        # always drawn, also for epochs the snapshot holds, so the generator replays
        order = [i for g in torch.randperm(len(groups), generator=gen).tolist() for i in groups[g]]
        sums = ckpt.epoch_start(epoch, steps_per_epoch, len(history), fresh=fresh_sums)
        if sums is None:
            step += steps_per_epoch  # the snapshot holds this whole epoch
            continue
        for s in range(0, n, batch_size):
            step += 1
            if step <= done:
                continue  # resuming: this batch is in the snapshot
            loss, add = batch_loss(order[s : s + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            sums = tuple(a + b for a, b in zip(sums, add))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            ckpt.maybe_save(step, model, optimizer, scheduler, {"history": history, "sums": sums})
        history.append(end_epoch(epoch, sums))
    bar.close()
    ckpt.clear()
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------
# The reward model


def train_reward_model(
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
    format_input: FormatFn | None = None,
    max_length: int = 512,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    normalise: bool = True,
    normalise_on: tuple[Sequence[str], Sequence[str]] | None = None,
    unit_std: bool = False,
    checkpoint_dir=None,
    precision: str = "float32",
) -> RewardModel:
    """Train a Bradley-Terry reward model with the soft-label loss; returns a :class:`RewardModel`.

    ``backbone_or_path``: a local dir / hub name or a ``PreTrainedModel`` (a causal LM gets a new
    scalar head; a 1-label sequence classifier is trained in place). ``train_prefs`` /
    ``eval_prefs``: preference datasets (:mod:`rlhfgym.envs.feedback.preferences`). After training,
    rewards are shifted so that ``normalise_on = (prompts, sft_completions)`` score mean 0 (Gao et
    al.); without it the completions of ``train_prefs`` are used; ``normalise=False`` keeps the raw
    head (offset 0, scale 1). ``rm.history`` holds one dict of
    metrics per epoch. ``checkpoint_dir``: snapshot the loop there every few minutes and resume from
    it when the same training runs again (:class:`~.checkpoint.LoopCheckpoint`); deleted when
    training ends. ``precision="bfloat16"``: the training forward passes run under bfloat16 autocast
    (:func:`~rlhfgym.envs.hf.mixed_precision`; weights and optimizer state stay float32).
    """
    autocast_dtype = precision_dtype(precision)
    seed_everything(seed)
    device = resolve_device(device)
    model = load_scalar_model(backbone_or_path, tokenizer).to(device)
    rm = RewardModel(model, tokenizer, format_input, device, max_length, batch_size)
    n = len(train_prefs)
    if n == 0:
        raise ValueError("train_prefs is empty; label some comparisons first.")
    # tokenise once: every epoch reuses the same ids. Each distinct (prompt, completion) is one
    # sequence, and comparisons are batched prompt by prompt, so k samples of a prompt compared in
    # all k(k-1)/2 pairs cost k forward passes per step, not k(k-1); the prompt they share is read
    # once per step (scalar_forward's share_prefixes).
    pairs, chosen, rejected, groups = distinct_pairs(train_prefs)
    seqs = rm.encode([x for x, _ in pairs], [y for _, y in pairs])
    label_prob = torch.tensor(train_prefs["label_prob"], dtype=torch.float32, device=device)
    pad = tokenizer.pad_token_id

    def batch_loss(idx: list[int]):
        # one forward over the batch's distinct sequences, so chosen and rejected see the same weights
        distinct = list(dict.fromkeys([chosen[i] for i in idx] + [rejected[i] for i in idx]))
        row = {q: j for j, q in enumerate(distinct)}
        with mixed_precision(device, autocast_dtype):
            r = scalar_forward(model, [seqs[q] for q in distinct], pad, device, share_prefixes=True)  # float32 out
        r_w = r[torch.tensor([row[chosen[i]] for i in idx], device=r.device)]
        r_l = r[torch.tensor([row[rejected[i]] for i in idx], device=r.device)]
        p = label_prob[idx]
        loss = soft_bt_loss(r_w - r_l, p)
        return loss, (loss.item() * len(idx), ((r_w > r_l) == (p > 0.5)).float().sum().item())

    def end_epoch(epoch: int, sums: tuple) -> dict[str, Any]:
        loss_sum, acc_sum = sums
        record = {"epoch": epoch, "train_loss": loss_sum / n, "train_accuracy": acc_sum / n}
        if eval_prefs is not None and len(eval_prefs):
            ev = evaluate_reward_model(rm, eval_prefs)
            record.update({"eval_loss": ev["loss"], "eval_accuracy": ev["accuracy"]})
        return record

    # linear decay to 0: the usual RM schedule (InstructGPT / summarize-from-feedback replications)
    rm.history = train_loop(
        model, n, batch_loss, end_epoch, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, fresh_sums=(0.0, 0.0),
        fingerprint={"kind": "reward model", "n": n, "epochs": epochs, "lr": lr, "batch_size": batch_size,
                     "seed": seed, "weight_decay": weight_decay, "max_length": max_length,
                     **({"precision": precision} if precision != "float32" else {})},
        groups=groups, weight_decay=weight_decay, max_grad_norm=max_grad_norm, checkpoint_dir=checkpoint_dir,
        desc="reward model", progress=progress,
    )
    if not normalise:
        return rm
    if normalise_on is None:
        normalise_on = (list(train_prefs["prompt"]) * 2, list(train_prefs["chosen"]) + list(train_prefs["rejected"]))
    rm.normalise(*normalise_on, unit_std=unit_std)
    return rm


# ----------------------------------------------------------------------------------------------
# The backbone the feedback models start from


def truncated_backbone(sft_dir, n_layers: int | None):
    """The SFT causal LM with only its first ``n_layers`` decoder layers (all when None or more).

    The reward, preference and judge models (shipped, or fitted in a study) start from it: it keeps
    the SFT's embeddings and lower layers (what it learned about reading articles) at 3/4 of the size.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    total = full.config.num_hidden_layers
    if n_layers is None or n_layers >= total:
        return full
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1 (the SFT model has {total}), got {n_layers}.")
    config = AutoConfig.from_pretrained(sft_dir)
    config.num_hidden_layers = n_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n_layers]
    model = AutoModelForCausalLM.from_config(config).float()

    def keep(name: str) -> bool:
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
            return int(parts[2]) < n_layers
        return True

    state = {k: v for k, v in full.state_dict().items() if keep(k)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"could not truncate {sft_dir} to {n_layers} layers: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.tie_weights()
    return model.eval()
