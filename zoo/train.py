"""``rlhf-zoo train ALGO ENV_ID``: one run of one agent, evaluated like every other.

Hyperparameters come from ``zoo/hyperparams/<algo>.yml`` (the env id's entry over ``default``;
``--hp key=value`` overrides for experiments). A run writes into ``runs/<algo>/<env_id>/seed<k>/``:
``agent/`` (checkpoints; a killed run resumes from the last one), ``tb/`` (TensorBoard),
``results.json`` and ``results.md``.

Evaluation (:func:`evaluate_policy`, by the protocol of :mod:`rlhfgym.envs.evaluation`) samples one
completion per test prompt at temperature 1 and reports the mean gold score, the mean reward-model
score and the mean sequence KL to the reference, ``KL = E_y~pi[ log pi(y|x) − log pi_ref(y|x) ]``
(a Monte-Carlo estimate, summed over tokens). Any agent with a ``policy`` (a :class:`~rlhfgym.agents.policy.CausalLMPolicy`) and a
``generate`` method is evaluated the same way; custom agents included.
"""

from __future__ import annotations

import json
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
import yaml

HYPERPARAMS = Path(__file__).resolve().parent / "hyperparams"


def load_hyperparams(algo: str, env_id: str) -> dict[str, Any]:
    """``default`` updated by the env id's entry of ``hyperparams/<algo>.yml`` (empty when absent)."""
    path = HYPERPARAMS / f"{algo}.yml"
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must map env ids (and 'default') to hyperparameter dicts.")
    merged: dict[str, Any] = {}
    for key in ("default", env_id):
        entry = data.get(key) or {}
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {key!r} must be a mapping of hyperparameter names to values.")
        merged.update(entry)
    return merged


@torch.no_grad()
def evaluate_policy(env, policy, n: int = 200, split: str = "test", batch_size: int = 100, seed: int = 0,
                    generate=None, kl: float | None = None) -> dict:
    """Mean gold, RM score and sequence KL(π‖π_ref) of ``policy``'s samples on the first ``n`` prompts of ``split``.

    The protocol is :func:`rlhfgym.envs.evaluation.evaluate_samples` (seeding, batches, scoring):
    ``policy.model`` is sampled at temperature 1 with the policy's window, so the SFT row equals the
    ``sft_sampled_t1`` of the asset build's report for the same ``n``, seed and batch size. The KL
    is ``log π(y|x) − log π_ref(y|x)`` of each sample, summed over its tokens, averaged.
    Agents whose outputs are not plain samples of their policy (best-of-n) pass their ``generate``
    and the KL they know analytically instead.
    """
    from rlhfgym.envs.evaluation import evaluate_samples, lm_sampler

    core = env.unwrapped
    prompts = core.prompts(split, n)
    if generate is not None:
        ev = evaluate_samples(lambda ps, t: generate(ps, temperature=t), prompts, core.gold, reward=core.score,
                              batch_size=batch_size, seed=seed)
    else:
        ref = core.reference_model

        def sequence_kl(ps, roll):
            ref_lp = policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask, model=ref)
            return (roll.logprobs - ref_lp).sum(-1).tolist()

        sample = lm_sampler(policy.model, policy.tokenizer, max_new_tokens=policy.max_new_tokens,
                            max_prompt_tokens=policy.max_prompt_tokens)
        ev = evaluate_samples(sample, prompts, core.gold, reward=core.score, batch_size=batch_size, seed=seed,
                              measures={"kl": sequence_kl})
        kl = ev["kl"]
    return {"gold": ev["gold"], "rm": ev["reward"], "kl": kl, "n": n, "split": split}


def train(algo: str, env_id: str, budget: int | None = None, seed: int = 0, device: str = "cpu",
          run_dir: str | None = None, eval_n: int = 200, overrides: dict[str, Any] | None = None) -> dict:
    import gymnasium as gym

    import rlhfgym.envs  # noqa: F401
    from rlhfgym.agents import make
    from rlhfgym.agents.policy import CausalLMPolicy

    hp = load_hyperparams(algo, env_id)
    hp.update(overrides or {})
    env_kwargs = hp.pop("env_kwargs", {}) or {}
    budget = int(budget or hp.pop("budget", 2000))
    hp.pop("budget", None)
    out = Path(run_dir or f"runs/{algo}/{env_id}/seed{seed}")
    out.mkdir(parents=True, exist_ok=True)
    env = gym.make(env_id, device=device, **env_kwargs)
    agent = make(algo, device=device, seed=seed, **hp)
    t0 = time.time()
    agent.learn(env, budget, **_learn_kwargs(agent, out))
    train_s = time.time() - t0
    policy = agent.policy if getattr(agent, "policy", None) is not None else CausalLMPolicy.from_env(env)
    sft = evaluate_policy(env, CausalLMPolicy.from_env(env), n=eval_n, seed=seed)
    result = {"algo": algo, "env_id": env_id, "seed": seed, "budget": budget, "device": device,
              "train_seconds": round(train_s, 1), "date": str(date.today()), "hyperparams": hp,
              "policy": _evaluate_agent(env, agent, policy, eval_n, seed), "sft": sft}
    from rlhfgym.envs.assets import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    atomic_write_text(out / "results.md", results_markdown([result]))
    print(results_markdown([result]))
    return result


def _evaluate_agent(env, agent, policy, n: int, seed: int) -> dict:
    if hasattr(agent, "kl_to_reference"):  # e.g. best-of-n: outputs are not samples of its policy
        return evaluate_policy(env, policy, n=n, seed=seed, generate=agent.generate, kl=agent.kl_to_reference())
    return evaluate_policy(env, policy, n=n, seed=seed)


def _learn_kwargs(agent, out: Path) -> dict:
    """Checkpointing and logging arguments, for agents whose ``learn`` accepts them."""
    import inspect

    params = inspect.signature(agent.learn).parameters
    kw = {}
    if "checkpoint_dir" in params:
        kw["checkpoint_dir"] = str(out / "agent")
    if "log_dir" in params:
        kw["log_dir"] = str(out / "tb")
    return kw


def results_markdown(results: list[dict]) -> str:
    lines = ["| algo | env | budget | gold | RM | KL | SFT gold | SFT RM | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, s = r["policy"], r["sft"]
        lines.append(f"| {r['algo']} | {r['env_id']} | {r['budget']} | {p['gold']:.3f} | {p['rm']:.3f} | {p['kl']:.2f} | "
                     f"{s['gold']:.3f} | {s['rm']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"
