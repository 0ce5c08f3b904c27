"""Direct preference optimisation: DPO / IPO / hinge (Rafailov et al. 2023; Azar et al. 2023) and KTO
(Ethayarajh et al. 2024), offline on a preference dataset or online on pairs of the current policy.

DPO turns the KL-regularised RLHF objective ``max E[r(x, y)] - beta KL(pi || pi_ref)`` into a
classification loss on preference pairs: its optimum is ``pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta)``,
so ``r(x, y) = beta log pi*(y|x)/pi_ref(y|x) + const`` and the Bradley-Terry likelihood of a pair
(y_w preferred over y_l) only needs log-probabilities::

    h(x, y_w, y_l) = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

    sigmoid  (DPO):    l(h) = -log sigmoid(beta h)
    ipo      (IPO):    l(h) = (h - 1/(2 tau))^2             tau = beta
    hinge    (SLiC):   l(h) = max(0, 1 - beta h)

A label is P(y_w > y_l) = p (``label_prob``: 1 for a hard click, soft for an AI or a noisy labeler),
mixed with ``label_smoothing`` eps (conservative DPO) into ``q = (1 - eps) p + eps (1 - p)``::

    loss = q l(h) + (1 - q) l(-h)

(for IPO this is ``(h - (2q - 1)/(2 tau))^2`` up to a constant: the target margin shrinks with the
label's confidence).

KTO needs no pairs: each completion is only *desirable* or *undesirable* (a preference pair gives
one of each). With ``r = log pi(y|x)/pi_ref(y|x)`` and ``z0`` a detached estimate of
KL(pi || pi_ref) from mismatched (prompt, completion) pairs of the batch, clipped at 0::

    desirable:    lambda_D (1 - sigmoid(beta (r - z0)))
    undesirable:  lambda_U (1 - sigmoid(beta (z0 - r)))

Data (``online=False``): a preference ``datasets.Dataset`` (or a path read with
:func:`rlhfgym.envs.feedback.preferences.load_preferences`) passed to :meth:`learn` or as ``dataset=``;
without one, pairs are built from the env: two completions per training prompt sampled from the
reference policy, labelled by a :class:`~rlhfgym.envs.feedback.labelers.LabelerPopulation` preset over the
task's gold components. ``online=True``: every round samples two completions per prompt from the
*current* policy and labels them (with the labelers, or with ``judge(prompts, a, b) -> P(a > b)``
passed to :meth:`learn`, e.g. a preference model or a constitution judge).

Budget: completions consumed; a pair costs 2 the first time it is trained on (further epochs over
the same pairs are free, as PPO's epochs over one batch of samples are).

The plumbing (training runs, resume, seeding, prompt sampling, log-prob helpers) is in ``common.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import AgentError, check_policy_env
from .common import (  # noqa: F401  (reference_policy and TrainingAgent: re-exported for one release)
    TrainingAgent,
    TrainingRun,
    as_preference_fn,
    batched_logps,
    batched_pair_logps,
    AgentConfig,
    draw_prompts,
    env_core,
    env_prefer,
    labeler_population,
    mean_gold,
    pad_cat,
    param,
    preference_probs,
    reference_for,
    reference_policy,
    sequence_logps,
    sub_seed,
)

__all__ = ["DPO", "KTO", "TrainingAgent", "make_preference_pairs", "LOSS_TYPES", "dpo_losses", "kto_z0", "kto_losses"]

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
#: ``labelers=ENV_LABELS``: pairs are labelled by the env's own pairwise oracle, ``env.unwrapped.prefer``
ENV_LABELS = "env"


# ============================================================================================
# The losses: pure functions of tensors (the agents' loss() calls them; tests/test_agent_math.py
# checks them by hand)
# ============================================================================================


def dpo_losses(h: torch.Tensor, label_prob: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO-family losses (B,) of the log-ratio margins
    ``h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]``::

        sigmoid (DPO):  l(h) = -log sigmoid(beta h)
        ipo     (IPO):  l(h) = (h - 1/(2 beta))^2
        hinge   (SLiC): l(h) = max(0, 1 - beta h)

        q    = (1 - eps) p + eps (1 - p)        p = label_prob = P(y_w > y_l), eps = label_smoothing
        loss = q l(h) + (1 - q) l(-h)           (eps > 0 with sigmoid: conservative DPO)
    """
    if loss_type == "sigmoid":      # -log sigmoid(beta h)
        ell = lambda z: -F.logsigmoid(beta * z)  # noqa: E731
    elif loss_type == "ipo":        # (h - 1/(2 tau))^2, tau = beta
        ell = lambda z: (z - 1.0 / (2.0 * beta)) ** 2  # noqa: E731
    elif loss_type == "hinge":      # max(0, 1 - beta h)
        ell = lambda z: F.relu(1.0 - beta * z)  # noqa: E731
    else:
        raise AgentError(f"unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}.")
    q = (1.0 - label_smoothing) * label_prob + label_smoothing * (1.0 - label_prob)
    return q * ell(h) + (1.0 - q) * ell(-h)


def kto_z0(logp_mismatched: torch.Tensor, ref_logp_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: a detached estimate of KL(pi || pi_ref) from the sequence log-probs of
    mismatched (prompt, completion) pairs of the batch (x_i, y_{i+1}), clipped at 0::

        z0 = sg( max(0, mean_i[log pi(y_{i+1}|x_i) - log pi_ref(y_{i+1}|x_i)]) )
    """
    return (logp_mismatched - ref_logp_mismatched).mean().clamp(min=0).detach()


def kto_losses(r: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, *, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-example KTO losses (B,) of the implicit rewards ``r = log pi(y|x) - log pi_ref(y|x)``::

        desirable:    lambda_D (1 - sigmoid(beta (r - z0)))
        undesirable:  lambda_U (1 - sigmoid(beta (z0 - r)))
    """
    return torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))


# ============================================================================================
# Preference data from the env
# ============================================================================================


def make_preference_pairs(env, n_pairs: int, split: str = "train", *, policy=None, labelers: str = "gold",
                          labeler_temperature: float | None = None, labeler_flip_prob: float | None = None,
                          soft_labels: bool = False, temperature: float = 1.0, seed: int = 0, start: int | None = None,
                          judge=None):
    """``n_pairs`` labelled pairs on prompts of ``split``: two completions per prompt sampled from
    ``policy`` (default: the env's reference policy), labelled by the labeler preset (or ``judge``;
    ``labelers="env"``: the env's own ``prefer``).

    Prompts are ``n_pairs`` consecutive prompts from ``start`` (default: a seeded random offset).
    Returns a preference ``datasets.Dataset`` (see :mod:`rlhfgym.envs.feedback.preferences`).
    """
    core = env_core(env, "make_preference_pairs")
    policy = policy if policy is not None else reference_policy(core)
    size = core.task.split_size(split)
    if start is None:
        start = int(np.random.default_rng(sub_seed(seed, 7)).integers(0, max(size - n_pairs, 0) + 1))
    prompts = core.prompts(split, n_pairs, start)
    torch.manual_seed(sub_seed(seed, 8))
    a = policy.generate_text(prompts, temperature=temperature)
    b = policy.generate_text(prompts, temperature=temperature)
    ds, _ = label_pairs(core, prompts, a, b, labelers=labelers, labeler_temperature=labeler_temperature,
                        labeler_flip_prob=labeler_flip_prob, soft_labels=soft_labels, seed=seed,
                        judge=as_preference_fn(judge, "make_preference_pairs"))
    return ds


def label_pairs(core, prompts, a, b, *, labelers, labeler_temperature, labeler_flip_prob, soft_labels, seed, judge=None):
    """Preference records for pairs (a, b): one simulated labeler per pair, or the judge's P(a > b)
    (the judge's choice is its argmax; ``labelers="env"`` without a judge: the env's ``prefer``).
    Returns ``(dataset, picked_a)``."""
    from rlhfgym.envs.feedback.preferences import make_preferences

    if judge is None and labelers == ENV_LABELS:
        judge = env_prefer(core)  # e.g. the constitution judge of RLHF-Summarize-AIF-v0: RLAIF labels
        if judge is None:
            raise AgentError(f"labelers={ENV_LABELS!r} but {core!r} has no prefer(prompts, a, b); "
                             "use a labeler preset or pass judge=.")
    if judge is None:
        pop = labeler_population(core, labelers, labeler_temperature, labeler_flip_prob)
        labels = pop.label(prompts, a, b, rng=np.random.default_rng(sub_seed(seed, 9)))
        return labels.to_preferences(prompts, a, b, soft=soft_labels), labels.label.astype(bool)
    p = preference_probs(judge, prompts, a, b, "judge").numpy()
    pick_a = p >= 0.5
    chosen = [x if k else y for x, y, k in zip(a, b, pick_a)]
    rejected = [y if k else x for x, y, k in zip(a, b, pick_a)]
    label_prob = np.where(pick_a, p, 1 - p) if soft_labels else np.ones(len(p))
    return make_preferences(list(prompts), chosen, rejected, label_prob.tolist(), "judge"), pick_a


# ============================================================================================
# Preference data as tensors
# ============================================================================================


@dataclass
class Pairs:
    """Labelled pairs, tokenised: ``chosen``/``rejected`` (N, T) with masks, ``label_prob`` (N,)
    = P(chosen > rejected), and the reference's sequence log-probs of both (computed once)."""

    prompt_ids: list[list[int]]
    chosen: torch.Tensor
    chosen_mask: torch.Tensor
    rejected: torch.Tensor
    rejected_mask: torch.Tensor
    label_prob: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, idx) -> "Pairs":
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = (lambda t: None if t is None else t[idx.to(t.device)])
        return Pairs([self.prompt_ids[i] for i in idx.tolist()], pick(self.chosen), pick(self.chosen_mask),
                     pick(self.rejected), pick(self.rejected_mask), pick(self.label_prob),
                     pick(self.ref_chosen), pick(self.ref_rejected))

    @classmethod
    def from_dataset(cls, policy, ds) -> "Pairs":
        """Tokenise a preference dataset (prompts as the env encodes them, completions + EOS)."""
        chosen, chosen_mask = policy.encode_completions(ds["chosen"])
        rejected, rejected_mask = policy.encode_completions(ds["rejected"])
        return cls(policy.encode_prompts(list(ds["prompt"])), chosen, chosen_mask, rejected, rejected_mask,
                   torch.tensor(ds["label_prob"], dtype=torch.float32))

    def with_reference(self, policy, ref_model) -> "Pairs":
        """Fill in the reference log-probs log pi_ref(y|x) of both completions (no gradients; each
        prompt runs through the reference once for its two completions)."""
        self.ref_chosen, self.ref_rejected = batched_pair_logps(policy, self.prompt_ids, self.chosen, self.chosen_mask,
                                                                self.rejected, self.rejected_mask, model=ref_model)
        return self


def resolve_dataset(dataset, agent: str):
    """A preference dataset from a ``datasets.Dataset``, a path, or a labeling database URL
    (``sqlite:///prefs.db``, ``postgresql://...``: the human labels of ``rlhf-zoo label``); validated either way."""
    from rlhfgym.envs.feedback.preferences import load_preferences, validate_preferences

    if dataset is None:
        return None
    if isinstance(dataset, str) and "://" in dataset:
        from rlhfgym.envs.feedback.store import is_database_url, read_preferences  # needs the [label] extra

        if is_database_url(dataset):
            return read_preferences(dataset)
    if isinstance(dataset, (str, Path)):
        return load_preferences(dataset)
    if hasattr(dataset, "column_names"):
        return validate_preferences(dataset, f"{agent} dataset")
    raise AgentError(f"{agent}: dataset must be a datasets.Dataset or a path, got {type(dataset).__name__}.")


# ============================================================================================
# DPO
# ============================================================================================


@dataclass
class PreferenceConfig(AgentConfig):
    """The data and optimiser hyperparameters DPO and KTO share (see :class:`DPO`)."""

    learning_rate: float = param(5e-5, low=0, low_open=True)
    batch_size: int = param(16, low=1)
    epochs: int = param(1, low=1)
    max_grad_norm: float = param(1.0, low=0, low_open=True)
    online: bool = False
    pairs_per_round: int = param(64, low=1)
    temperature: float = param(1.0, low=0, low_open=True)
    labelers: str = "gold"
    labeler_temperature: float | None = param(None, low=0)
    labeler_flip_prob: float | None = param(None, low=0, high=1)
    soft_labels: bool = False
    dataset: str | None = None

    def check(self, agent: str) -> None:
        from rlhfgym.envs.feedback.labelers import PRESETS

        if self.labelers not in PRESETS and self.labelers != ENV_LABELS:
            raise AgentError(f"{agent}: unknown labelers preset {self.labelers!r}; use one of {', '.join(PRESETS)} "
                             f"or {ENV_LABELS!r} (the env's prefer()).")


class DPO(TrainingAgent):
    """Direct preference optimisation (sigmoid / IPO / hinge losses), offline or online.

    Args:
        beta: the KL strength of the implicit RLHF objective (DPO's beta; IPO's tau). > 0.
        loss_type: "sigmoid" (DPO), "ipo", "hinge".
        label_smoothing: eps in [0, 0.5): the assumed chance a label is flipped (conservative DPO).
        learning_rate, batch_size (pairs per update), epochs (passes over each batch of data),
        max_grad_norm: the optimiser.
        online: sample fresh pairs from the current policy every round (Online DPO) instead of
            training on a fixed dataset.
        pairs_per_round: prompts (= pairs) sampled per online round.
        temperature: sampling temperature for pairs built from the env.
        labelers: who labels pairs built from the env: a :class:`~rlhfgym.envs.feedback.labelers.LabelerPopulation`
            preset ("gold", "alpacafarm", "intransitive"), or "env": the env's own pairwise oracle
            ``env.unwrapped.prefer`` (the constitution judge on RLHF-Summarize-AIF-v0, i.e. RLAIF
            labels; the preference model on RLHF-Summarize-v0); labeler_temperature /
            labeler_flip_prob override the preset's; soft_labels keeps the labeler's probability
            as ``label_prob`` instead of a hard click.
        dataset: a path to a preference dataset (JSON-serialisable form of ``learn(dataset=...)``), or the URL
            of a labeling database (``sqlite:///prefs.db``: the human labels of ``rlhf-zoo label``).
    """

    @dataclass
    class Config(PreferenceConfig):
        """Hyperparameters of :class:`DPO` (see the class docstring)."""

        beta: float = param(0.1, low=0, low_open=True)
        loss_type: str = param("sigmoid", choices=LOSS_TYPES)
        label_smoothing: float = param(0.0, low=0, high=0.5, high_open=True)

    name = "dpo"

    def __init__(self, policy=None, **hyperparameters: Any):
        dataset = hyperparameters.get("dataset")
        if dataset is not None and not isinstance(dataset, (str, Path)):
            raise AgentError(f"{self.name}: dataset= in the constructor must be a path; "
                             "pass a Dataset object to learn(dataset=...).")
        if isinstance(dataset, Path):
            hyperparameters["dataset"] = str(dataset)
        super().__init__(policy, **hyperparameters)

    # ------------------------------------------------------------------ the loss
    def loss(self, batch: Pairs) -> tuple[torch.Tensor, dict[str, float]]:
        """The DPO-family loss of a batch of pairs (gradients flow into the policy)."""
        cfg, policy = self.config, self.policy
        beta = cfg["beta"]
        # one forward over [chosen; rejected] (forward_logprobs runs each prompt through the network once)
        logp = sequence_logps(policy, batch.prompt_ids * 2, pad_cat(batch.chosen, batch.rejected, policy.pad_id),
                              pad_cat(batch.chosen_mask, batch.rejected_mask, 0))
        logp_w, logp_l = logp.split(len(batch))
        # h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
        ratio_w = logp_w - batch.ref_chosen
        ratio_l = logp_l - batch.ref_rejected
        h = ratio_w - ratio_l
        # l(h) = -log sigmoid(beta h) | (h - 1/(2 beta))^2 | max(0, 1 - beta h); soft labels and label
        # smoothing: q = (1 - eps) p + eps (1 - p);  loss = q l(h) + (1 - q) l(-h)
        p = batch.label_prob.to(h.device)
        loss = dpo_losses(h, p, beta=beta, loss_type=cfg["loss_type"], label_smoothing=cfg["label_smoothing"]).mean()
        with torch.no_grad():
            decided = p != 0.5
            agree = ((h > 0) == (p > 0.5)).float()[decided]
            metrics = {
                "loss": float(loss),
                "accuracy": float(agree.mean()) if len(agree) else float("nan"),
                "margin": float((beta * h).mean()),
                "reward_chosen": float((beta * ratio_w).mean()),
                "reward_rejected": float((beta * ratio_l).mean()),
            }
        return loss, metrics

    # ------------------------------------------------------------------ learning
    def learn(self, env, budget: int, callback=None, *, dataset=None, judge=None, checkpoint_dir=None,
              checkpoint_every: int | None = None, log_dir=None, progress_bar: bool = True) -> "DPO":
        """Train until the agent has consumed ``budget`` completions in total (a pair costs 2),
        or the callback returns False.

        ``dataset``: preference records (``datasets.Dataset`` or a path) for offline training;
        without it (and without ``dataset=`` in the config) pairs are built from ``env``.
        ``judge``: ``(prompts, a, b) -> P(a > b)`` (or an object with ``prefer``) labelling pairs
        built from the env instead of the simulated labelers.
        ``checkpoint_dir`` / ``checkpoint_every`` (completions) / ``log_dir`` / ``progress_bar``:
        see :class:`~rlhfgym.agents.base.TrainingRun`; an interrupted run resumes from its checkpoint.
        """
        with TrainingRun(self, budget, callback=callback, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                         log_dir=log_dir, progress_bar=progress_bar) as run:
            core, ref, resumed = self.start(run, env)  # resume, policy, checks, seeding
            self._ref = ref
            judge = as_preference_fn(judge, self.name)
            st = self.trainer_state
            if not resumed:
                st.update(run_start=self.spent, step=0, round=0)
            self.make_optimizer("adamw", self.config["learning_rate"], weight_decay=0.0)
            if self.config["online"]:
                self._learn_online(run, core, ref, judge)
            else:
                self._learn_offline(run, core, ref, budget, dataset, judge, checkpoint_every)
            run.save()  # also after epochs that consumed no budget (run.update never found a save due)
        return self

    def _update(self, batch) -> dict[str, float]:
        """One gradient step on a batch; returns its metrics."""
        self.policy.train()
        loss, metrics = self.loss(batch)
        metrics["grad_norm"] = self.step(loss)
        self.trainer_state["step"] += 1
        return metrics

    def _cost_per_item(self) -> int:
        return 2  # a pair is two completions

    # -- offline: a fixed dataset, `epochs` passes, each pair paid for the first time it is used
    def _offline_data(self, core, ref, n_budget: int, dataset, judge):
        """Pairs for offline training: the given dataset, or pairs built from the env (kept in the
        train state, so that a resumed run trains on the same pairs)."""
        import datasets

        from rlhfgym.envs.feedback.preferences import FEATURES

        ds = resolve_dataset(dataset if dataset is not None else self.config["dataset"], self.name)
        if ds is None and self.trainer_state.get("pairs") is not None:
            ds = datasets.Dataset.from_dict(self.trainer_state["pairs"], features=FEATURES)
        if n_budget < 2:
            raise AgentError(f"{self.name}: a budget of {n_budget} more completions cannot buy one pair (2 completions); raise it.")
        if ds is None:  # two samples of pi_ref per prompt, labelled by the env's labelers (or the judge)
            cfg = self.config
            n = n_budget // 2
            ds = make_preference_pairs(core, n, "train", policy=reference_policy(core, ref),
                                       labelers=cfg["labelers"], labeler_temperature=cfg["labeler_temperature"],
                                       labeler_flip_prob=cfg["labeler_flip_prob"], soft_labels=cfg["soft_labels"],
                                       temperature=cfg["temperature"], seed=self.seed, judge=judge)
            self.trainer_state["pairs"] = ds.to_dict()
        n = min(len(ds), n_budget // 2)
        pairs = Pairs.from_dataset(self.policy, ds.select(range(n))).with_reference(self.policy, ref)
        return self._to_examples(pairs)

    def _to_examples(self, pairs: "Pairs"):
        return pairs  # DPO trains on pairs; KTO splits them

    def _learn_offline(self, run, core, ref, budget, dataset, judge, checkpoint_every):
        st, cfg = self.trainer_state, self.config
        data = self._offline_data(core, ref, budget - st["run_start"], dataset, judge)
        n, bs, cost = len(data), cfg["batch_size"], self._cost_per_item()
        k, unsaved = 0, 0  # k: position in the fixed schedule of (epoch, batch)
        for epoch in range(cfg["epochs"]):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(sub_seed(self.seed, 1, epoch)))
            for s in range(0, n, bs):
                k += 1
                if k <= st["step"]:
                    continue  # done before the interruption
                idx = order[s:s + bs]
                metrics = self._update(data.select(idx))
                paid = cost * len(idx) if epoch == 0 else 0  # data is paid for once
                if not run.update(paid, metrics):
                    return
                unsaved += cost * len(idx)
                if epoch > 0 and checkpoint_every and unsaved >= checkpoint_every:
                    run.save()  # later epochs consume no budget, so run.update never finds a checkpoint due
                    unsaved = 0

    # -- online: fresh pairs from the current policy each round (one run.update per round)
    def _learn_online(self, run, core, ref, judge):
        cfg, st = self.config, self.trainer_state
        while run.remaining >= 2 and not run.stopped:
            n = min(cfg["pairs_per_round"], run.remaining // 2)
            prompts = draw_prompts(core, n, sub_seed(self.seed, 2, st["round"]))
            torch.manual_seed(sub_seed(self.seed, 3, st["round"]))
            # two completions per prompt from the current policy, labelled by the labelers / judge
            a = self.policy.sample(prompts, temperature=cfg["temperature"])
            b = self.policy.sample(prompts, temperature=cfg["temperature"])
            ds, picked_a = label_pairs(core, prompts, a.texts, b.texts, labelers=cfg["labelers"],
                                       labeler_temperature=cfg["labeler_temperature"],
                                       labeler_flip_prob=cfg["labeler_flip_prob"], soft_labels=cfg["soft_labels"],
                                       seed=sub_seed(self.seed, 4, st["round"]), judge=judge)
            data = self._to_examples(self._pairs_from_rollouts(a, b, picked_a, ds["label_prob"], ref))
            history = []
            for epoch in range(cfg["epochs"]):
                order = torch.randperm(len(data), generator=torch.Generator().manual_seed(sub_seed(self.seed, 5, st["round"], epoch)))
                for s in range(0, len(data), cfg["batch_size"]):
                    history.append(self._update(data.select(order[s:s + cfg["batch_size"]])))
            st["round"] += 1
            metrics = {k: float(np.nanmean([m[k] for m in history])) for k in history[0]}
            metrics["gold"] = mean_gold(core, prompts * 2, a.texts + b.texts)
            run.update(2 * n, metrics)

    def _pairs_from_rollouts(self, a, b, picked_a, label_prob, ref) -> "Pairs":
        """Pairs from two rollouts, keeping the sampled tokens (no re-tokenisation of the text)."""
        pad = self.policy.pad_id
        t = max(a.tokens.shape[1], b.tokens.shape[1])
        ta, tb = F.pad(a.tokens, (0, t - a.tokens.shape[1]), value=pad), F.pad(b.tokens, (0, t - b.tokens.shape[1]), value=pad)
        ma, mb = F.pad(a.mask, (0, t - a.mask.shape[1])), F.pad(b.mask, (0, t - b.mask.shape[1]))
        sel = torch.as_tensor(np.asarray(picked_a), dtype=torch.bool, device=ta.device)[:, None]
        data = Pairs(a.prompt_ids, torch.where(sel, ta, tb), torch.where(sel, ma, mb), torch.where(sel, tb, ta),
                     torch.where(sel, mb, ma), torch.tensor(list(label_prob), dtype=torch.float32))
        return data.with_reference(self.policy, ref)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, env, dataset) -> dict[str, float]:
        """Implicit-reward metrics on held-out preference records: ``accuracy`` (sign of
        beta h agrees with the label; ties skipped), ``margin`` (mean beta h, h oriented to the
        chosen completion) and the DPO ``loss`` (sigmoid, beta of this agent)."""
        if self.policy is None:
            raise AgentError(f"{self.name}: no policy yet; call learn(env, budget) or load(dir) first.")
        core = env_core(env, self.name)
        check_policy_env(self, self.policy, core)
        ds = resolve_dataset(dataset, self.name)
        data = Pairs.from_dataset(self.policy, ds).with_reference(self.policy, reference_for(self.policy, core))
        was = self.policy.training
        self.policy.eval()
        pw, pl = batched_pair_logps(self.policy, data.prompt_ids, data.chosen, data.chosen_mask, data.rejected,
                                    data.rejected_mask)
        self.policy.train(was)
        beta = self.config["beta"]
        h = (pw - data.ref_chosen) - (pl - data.ref_rejected)
        p = data.label_prob.to(h.device)
        decided = p != 0.5
        return {
            "accuracy": float(((h > 0) == (p > 0.5)).float()[decided].mean()),
            "margin": float((beta * h).mean()),
            "loss": float((-(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h))).mean()),
            "n": int(decided.sum()),
        }


# ============================================================================================
# KTO
# ============================================================================================


@dataclass
class Unpaired:
    """Unpaired completions: ``tokens``/``mask`` (N, T), ``desirable`` (N,) bool, ``ref`` (N,)."""

    prompt_ids: list[list[int]]
    tokens: torch.Tensor
    mask: torch.Tensor
    desirable: torch.Tensor
    ref: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, idx) -> "Unpaired":
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = (lambda t: None if t is None else t[idx.to(t.device)])
        return Unpaired([self.prompt_ids[i] for i in idx.tolist()], pick(self.tokens), pick(self.mask),
                        pick(self.desirable), pick(self.ref))

    @classmethod
    def from_pairs(cls, pairs: Pairs, pad_id: int) -> "Unpaired":
        """chosen -> desirable, rejected -> undesirable (pairs whose label is a tie are dropped; a
        label_prob below 1/2 means the record leans to "rejected", which is then the desirable one)."""
        pairs = pairs.select((pairs.label_prob != 0.5).nonzero().flatten())
        chosen_wins = pairs.label_prob > 0.5
        ref = None if pairs.ref_chosen is None else torch.cat([pairs.ref_chosen, pairs.ref_rejected])
        return cls(pairs.prompt_ids * 2, pad_cat(pairs.chosen, pairs.rejected, pad_id),
                   pad_cat(pairs.chosen_mask, pairs.rejected_mask, 0), torch.cat([chosen_wins, ~chosen_wins]), ref)


class KTO(DPO):
    """Kahneman-Tversky optimisation on unpaired desirable / undesirable completions.

    Data as for :class:`DPO` (a pair gives one desirable and one undesirable completion, each costs 1),
    or an unpaired dataset with columns ``prompt``, ``completion``, ``label`` (bool: desirable).

    Args:
        beta: > 0. desirable_weight / undesirable_weight: lambda_D, lambda_U > 0 (the KTO paper
            suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3]).
        the rest: as :class:`DPO`.
    """

    @dataclass
    class Config(PreferenceConfig):
        """Hyperparameters of :class:`KTO` (see the class docstring)."""

        learning_rate: float = param(1e-4, low=0, low_open=True)
        beta: float = param(0.1, low=0, low_open=True)
        desirable_weight: float = param(1.0, low=0, low_open=True)
        undesirable_weight: float = param(1.0, low=0, low_open=True)

    name = "kto"

    def loss(self, batch: Unpaired) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, policy = self.config, self.policy
        beta = cfg["beta"]
        # r = log pi(y|x) - log pi_ref(y|x)
        logp = sequence_logps(policy, batch.prompt_ids, batch.tokens, batch.mask)
        r = logp - batch.ref
        # z0: detached KL(pi || pi_ref) estimate from mismatched pairs (x_i, y_{i+1}), clipped at 0
        with torch.no_grad():
            if len(batch) > 1:
                shift = torch.roll(torch.arange(len(batch)), -1)
                mm_tok, mm_mask = batch.tokens[shift], batch.mask[shift]
                kl_pi = sequence_logps(policy, batch.prompt_ids, mm_tok, mm_mask)
                kl_ref = sequence_logps(policy, batch.prompt_ids, mm_tok, mm_mask, model=self._ref)
                z0 = kto_z0(kl_pi, kl_ref)  # sg(max(0, mean(log pi - log pi_ref)))
            else:
                z0 = torch.zeros((), device=r.device)
        d = batch.desirable.to(r.device)
        # desirable: lambda_D (1 - sigmoid(beta (r - z0)));  undesirable: lambda_U (1 - sigmoid(beta (z0 - r)))
        loss = kto_losses(r, d, z0, beta=beta, desirable_weight=cfg["desirable_weight"],
                          undesirable_weight=cfg["undesirable_weight"]).mean()
        with torch.no_grad():
            metrics = {
                "loss": float(loss),
                "kl": float(z0),
                "reward_desirable": float((beta * r[d]).mean()) if bool(d.any()) else float("nan"),
                "reward_undesirable": float((beta * r[~d]).mean()) if bool((~d).any()) else float("nan"),
            }
        return loss, metrics

    def _cost_per_item(self) -> int:
        return 1  # one unpaired completion

    def _to_examples(self, pairs: Pairs) -> Unpaired:
        return Unpaired.from_pairs(pairs, self.policy.pad_id)

    def _offline_data(self, core, ref, n_budget, dataset, judge):
        ds = dataset if dataset is not None else self.config["dataset"]
        if hasattr(ds, "column_names") and {"completion", "label"} <= set(ds.column_names):
            n = min(len(ds), n_budget)  # an unpaired dataset: one completion per record
            if n < 1:
                raise AgentError(f"{self.name}: a budget of {n_budget} more completions cannot buy one example; raise it.")
            ds = ds.select(range(n))
            tokens, mask = self.policy.encode_completions(ds["completion"])
            data = Unpaired(self.policy.encode_prompts(list(ds["prompt"])), tokens, mask,
                            torch.tensor([bool(x) for x in ds["label"]]))
            data.ref = batched_logps(self.policy, data.prompt_ids, data.tokens, data.mask, model=ref)
            return data
        return super()._offline_data(core, ref, n_budget, dataset, judge)

    @torch.no_grad()
    def evaluate(self, env, dataset) -> dict[str, float]:
        """As :meth:`DPO.evaluate`: the implicit reward beta log pi/pi_ref ranks held-out pairs."""
        return super().evaluate(env, dataset)
