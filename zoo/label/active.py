"""Active query selection: ask people about the pairs a small reward-model ensemble disagrees on.

Christiano et al. (2017) train an ensemble of reward predictors on bootstrap resamples of the
labels collected so far and query the comparisons with the highest *variance* of the members'
predictions of P(a > b). Here each member is a Bradley-Terry model that is linear in frozen
features of the text, so refitting it after every few labels costs milliseconds on a CPU::

    phi(x, y)   = [mean over the completion's tokens of the env's reference model's last hidden state;
                   how y relates to x: its words, its words not in x, its numbers not in x, x's words it reuses]
    r_k(x, y)   = w_k . z(x, y)                     z = phi standardised over the pool of pairs
    P_k(a > b)  = sigmoid(r_k(x, a) - r_k(x, b))    member k, fitted to a bootstrap resample
    loss_k      = -[q log P_k + (1 - q) log(1 - P_k)] + l2 |w_k|^2     q = 1 (a), 0 (b), 1/2 (tie)
    disagreement(pair) = Var_k P_k(a > b)

:class:`ActiveSelector` plugs into the labeling app (``create_app(order=...)``): it refits the
ensemble on the database's answers every ``refit_every`` new answers and orders the free pairs by
disagreement (random order until ``warmup`` answers exist). The same linear model, fitted on all
labels, is the "small reward model" of the random-vs-active study (:mod:`.study`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def overlap_features(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """(N, 4) word statistics of each completion against its prompt: its words, its words not in the prompt
    (invented), its number words not in the prompt, and the distinct prompt words it reuses. Any text task
    where the answer draws on the prompt (summaries, answers to a passage) has them."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        seen, words = set(prompt.split()), completion.split()
        new = [w for w in words if w not in seen]
        rows.append([len(words), len(new), sum(w.isdigit() for w in new), len(seen.intersection(words))])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 4)


@torch.no_grad()
def text_features(core, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """``phi(x, y)`` (N, hidden + 4): the reference model's last hidden state averaged over the completion's
    tokens (EOS included, the env's tokenisation), then :func:`overlap_features`."""
    from rlhfgym.agents.common import reference_policy
    from rlhfgym.envs.hf import position_ids

    policy = reference_policy(core)
    model = policy.model
    out = []
    for s in range(0, len(prompts), batch_size):
        prompt_ids = policy.encode_prompts(list(prompts[s:s + batch_size]))
        tokens, mask = policy.encode_completions(list(completions[s:s + batch_size]))
        ids, att, p = policy.batch(prompt_ids, tokens, mask)
        hidden = model(input_ids=ids, attention_mask=att, position_ids=position_ids(att),
                       output_hidden_states=True).hidden_states[-1][:, p:].float()
        m = mask.to(hidden.device).float()[..., None]
        out.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).cpu().numpy())
    hidden_mean = np.concatenate(out).astype(np.float64) if out else np.zeros((0, model.config.hidden_size))
    return np.concatenate([hidden_mean, overlap_features(prompts, completions)], axis=1)


class PairFeatures:
    """Standardised feature differences ``z(x, a) - z(x, b)`` of pairs, by pair id."""

    def __init__(self, pair_ids: Sequence[int], phi_a: np.ndarray, phi_b: np.ndarray):
        both = np.concatenate([phi_a, phi_b])
        self.mean, self.std = both.mean(0), both.std(0) + 1e-6
        diff = ((phi_a - self.mean) - (phi_b - self.mean)) / self.std
        self.index = {int(p): i for i, p in enumerate(pair_ids)}
        self.diff = diff

    @classmethod
    def for_pairs(cls, core, pairs) -> "PairFeatures":
        """Features of store pairs (objects with ``id``, ``prompt``, ``completion_a``, ``completion_b``)."""
        prompts = [p.prompt for p in pairs]
        phi_a = text_features(core, prompts, [p.completion_a for p in pairs])
        phi_b = text_features(core, prompts, [p.completion_b for p in pairs])
        return cls([p.id for p in pairs], phi_a, phi_b)

    def transform(self, phi_a: np.ndarray, phi_b: np.ndarray) -> np.ndarray:
        """Differences for other pairs (held-out), standardised with this pool's statistics."""
        return (phi_a - phi_b) / self.std

    def rows(self, pair_ids: Sequence[int]) -> np.ndarray:
        return self.diff[[self.index[int(p)] for p in pair_ids]]


def fit_linear_bt(diff: np.ndarray, target: np.ndarray, l2: float = 1e-2, steps: int = 60) -> np.ndarray:
    """Weights ``w`` (D,) of the linear Bradley-Terry model ``P(a > b) = sigmoid(w . diff)`` fitted by
    L-BFGS to soft targets ``q`` with an L2 penalty ``l2 |w|^2``."""
    x = torch.as_tensor(diff, dtype=torch.float64)
    q = torch.as_tensor(target, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w
        # -[q log sigmoid(l) + (1 - q) log sigmoid(-l)], the Bradley-Terry loss with soft labels
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, q) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


class Ensemble:
    """``k`` linear Bradley-Terry members, each fitted to a bootstrap resample of the labels."""

    def __init__(self, k: int = 3, l2: float = 1e-2, seed: int = 0):
        self.k, self.l2 = k, l2
        self.rng = np.random.default_rng(seed)
        self.weights: np.ndarray | None = None  # (k, D)

    def fit(self, diff: np.ndarray, target: np.ndarray) -> "Ensemble":
        n = len(diff)
        members = []
        for _ in range(self.k):
            idx = self.rng.integers(0, n, size=n)  # bootstrap resample
            members.append(fit_linear_bt(diff[idx], target[idx], self.l2))
        self.weights = np.stack(members)
        return self

    def probs(self, diff: np.ndarray) -> np.ndarray:
        """(k, N) members' P(a > b)."""
        return 1.0 / (1.0 + np.exp(-(self.weights @ diff.T)))

    def disagreement(self, diff: np.ndarray) -> np.ndarray:
        """Var_k P_k(a > b) per pair (N,)."""
        return self.probs(diff).var(0)


def answer_targets(answers) -> tuple[list[int], np.ndarray]:
    """Pair ids and soft targets q = P(a > b) of a store's answers (a: 1, b: 0, tie: 1/2; skips dropped)."""
    ids, q = [], []
    for pair, lab in answers:
        if lab.choice in ("a", "b", "tie"):
            ids.append(pair.id)
            q.append({"a": 1.0, "b": 0.0, "tie": 0.5}[lab.choice])
    return ids, np.asarray(q, dtype=np.float64)


class ActiveSelector:
    """The labeling app's ``order``: free pairs sorted by ensemble disagreement, most first."""

    def __init__(self, store, features: PairFeatures, *, k: int = 3, warmup: int = 10, refit_every: int = 10,
                 l2: float = 1e-2, seed: int = 0):
        self.store, self.features = store, features
        self.warmup, self.refit_every = warmup, refit_every
        self.ensemble = Ensemble(k, l2, seed)
        self.fitted_on = -1  # number of answers the ensemble was last fitted on
        self.fits = 0

    def refit_if_due(self) -> None:
        ids, q = answer_targets(self.store.answers())
        known = [i for i, p in enumerate(ids) if p in self.features.index]
        if len(known) < self.warmup or (self.fitted_on >= 0 and len(known) - self.fitted_on < self.refit_every):
            return
        self.ensemble.fit(self.features.rows([ids[i] for i in known]), q[known])
        self.fitted_on = len(known)
        self.fits += 1

    def __call__(self, candidates: list[int]) -> list[int]:
        self.refit_if_due()
        if self.ensemble.weights is None:
            return candidates  # warm-up: the random rank order
        scored = [p for p in candidates if p in self.features.index]
        if not scored:
            return candidates
        var = self.ensemble.disagreement(self.features.rows(scored))
        ranked = [scored[i] for i in np.argsort(-var, kind="stable")]
        return ranked + [p for p in candidates if p not in self.features.index]
