"""``rlhf-zoo eval RUN_DIR``: one evaluation protocol for every run, written to ``eval.json``.

The protocol (:data:`PROTOCOL_KEYS`) is the first ``prompts`` prompts of ``split``, ``samples``
completions each at ``temperature`` (0 = greedy), sampled by
:func:`rlhfgym.envs.evaluation.evaluate_samples` with ``seed``, by default the run's own training
seed: two evaluations of a run are identical, and the leaderboard's interval over seeds covers the
evaluation's sampling noise as well as training's (with one fixed seed an untrained agent such as
best-of-n would show ± 0 however noisy its 200 samples are). It reports

* ``proxy``: the env's reward (what the agent optimised); ``gold``: the task's gold score;
* ``kl``: the sequence KL(π‖π_ref) = E_y~π[log π(y|x) − log π_ref(y|x)], a Monte-Carlo estimate over
  the evaluated samples (log π at the sampling temperature: the distribution actually evaluated);
  agents with ``kl_to_reference()`` (best-of-n) report that analytic value instead (``kl_method``);
* ``win_rate_labelers``: against π_ref's sample of the same prompt (same seed), judged by the
  majority of the ``alpacafarm`` labeler population (its population probability > 1/2 wins,
  exactly 1/2 is a tie worth 1/2); ``win_rate_judge`` the same by the env's judge, where it has one;
* ``distinct_1`` / ``distinct_2``: distinct word uni/bigrams over all completions / all of them;
* ``length`` (tokens, EOS not counted) and ``eos_rate``.

Per-completion metrics get a mean and a standard error; the standard error is over prompts (the
mean of a prompt's samples is one observation), since samples of one prompt are not independent.
π_ref's own numbers (the ``sft`` block) are recomputed with every evaluation: it costs one more
sampling pass but can never go stale.

``evaluate_agent`` is what ``rlhf-zoo train`` calls on the agent it just trained, and
``evaluate_run`` what ``rlhf-zoo eval`` calls on a saved run: one code path.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
EVAL_FILE = "eval.json"
COMPLETIONS_FILE = "completions.jsonl"
RESULTS_FILE = "results.json"
#: prompts per sampling call; = the asset build's report's default, so its SFT row is the zoo's
BATCH_SIZE = 100
#: the labeler population that judges win rates (and the leaderboard's pairwise comparisons)
LABELERS = "alpacafarm"
#: the protocol: which completions were scored; runs are only comparable under equal protocols
PROTOCOL_KEYS = ("split", "prompts", "samples", "temperature", "seed")
#: metrics with one value per completion: reported as {"mean", "se"}
PER_SAMPLE_METRICS = ("gold", "proxy", "kl", "win_rate_labelers", "win_rate_judge", "length", "eos_rate")
#: metrics over the whole set of completions: reported as plain numbers
SET_METRICS = ("distinct_1", "distinct_2")
METRICS = PER_SAMPLE_METRICS + SET_METRICS


class EvaluationError(ValueError):
    """A run directory that cannot be evaluated (missing files, unknown fields)."""


# ------------------------------------------------------------------------------------------ statistics


def mean_se(values: Sequence[float], groups: int = 1) -> dict[str, float | None]:
    """Mean and standard error of per-completion ``values`` laid out prompt-major, ``groups`` per prompt.

    The standard error is that of the mean of per-prompt means (samples of one prompt are correlated);
    ``None`` with fewer than two prompts.
    """
    if not values:
        return {"mean": None, "se": None}
    per_prompt = [sum(values[i:i + groups]) / len(values[i:i + groups]) for i in range(0, len(values), groups)]
    m = sum(values) / len(values)
    n = len(per_prompt)
    if n < 2:
        return {"mean": m, "se": None}
    pm = sum(per_prompt) / n
    var = sum((x - pm) ** 2 for x in per_prompt) / (n - 1)
    return {"mean": m, "se": math.sqrt(var / n)}


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct n-grams of words over all ``texts`` / all their n-grams (Li et al. 2016); None if there are none."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def majority_wins(probs: Sequence[float]) -> list[float]:
    """1 where P(a ≻ b) > 1/2, 0 where < 1/2, 1/2 for an exact tie (identical completions tie)."""
    return [1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5 for p in map(float, probs)]


# ------------------------------------------------------------------------------------------ sampling


def _sampled_lengths(out, eos_id: int, max_new_tokens: int, tokenizer) -> tuple[list[float], list[float]]:
    """(length without EOS, ended with EOS) of each completion of a sampler's output."""
    if hasattr(out, "mask") and hasattr(out, "tokens"):
        n = out.mask.sum(1).tolist()
        toks = out.tokens.tolist()
        eos = [float(k > 0 and toks[i][k - 1] == eos_id) for i, k in enumerate(n)]
        return [float(k) - e for k, e in zip(n, eos)], eos
    # text only (an agent's generate): re-encode; a completion shorter than the token budget stopped at EOS
    from rlhfgym.envs.lm import encode_completions

    ids = encode_completions(tokenizer, list(out.texts) if hasattr(out, "texts") else list(out))
    return [float(len(r)) for r in ids], [float(len(r) < max_new_tokens) for r in ids]


def _sample_and_score(core, sample, prompts, *, kl_fn, eos_id, max_new_tokens, protocol, bar) -> dict[str, Any]:
    """:func:`evaluate_samples` of ``sample`` with per-completion KL, length and EOS kept (its report keeps only means)."""
    from rlhfgym.envs.evaluation import evaluate_samples

    kept: dict[str, list[float]] = {"kl": [], "length": [], "eos_rate": []}

    def counted(ps, t):
        out = sample(ps, t)
        bar.update(1)
        return out

    def lengths(ps, out):
        length, eos = _sampled_lengths(out, eos_id, max_new_tokens, core.tokenizer)
        kept["length"].extend(length)
        kept["eos_rate"].extend(eos)
        return length

    measures = {"length": lengths}
    if kl_fn is not None:
        def kl(ps, out):
            values = kl_fn(ps, out)
            kept["kl"].extend(values)
            return values

        measures["kl"] = kl
    ev = evaluate_samples(counted, prompts, core.gold, reward=core.score, temperature=protocol["temperature"],
                          samples_per_prompt=protocol["samples"], batch_size=BATCH_SIZE, seed=protocol["seed"],
                          measures=measures)
    return {"texts": ev["texts"], "gold": ev["gold_scores"], "proxy": ev["reward_scores"], **kept}


def _policy_sampler(policy, ref_model) -> tuple[Callable, Callable]:
    """``sample(prompts, t)`` of a policy (the one protocol's sampler) and its per-sample sequence KL to ``ref_model``."""
    from rlhfgym.envs.evaluation import lm_sampler

    def sequence_kl(ps, roll):
        ref_lp = policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask, model=ref_model)
        return (roll.logprobs - ref_lp).sum(-1).tolist()

    sample = lm_sampler(policy.model, policy.tokenizer, max_new_tokens=policy.max_new_tokens,
                        max_prompt_tokens=policy.max_prompt_tokens)
    return sample, sequence_kl


def _metrics(scored: dict[str, Any], k: int, kl_method: str, kl_value: float | None) -> dict[str, Any]:
    m: dict[str, Any] = {name: mean_se(scored[name], k) for name in ("gold", "proxy", "length", "eos_rate")}
    if kl_method == "monte-carlo":
        m["kl"] = mean_se(scored["kl"], k)
    else:
        m["kl"] = {"mean": kl_value, "se": None}
    m["kl"]["method"] = kl_method
    m["distinct_1"] = distinct_n(scored["texts"], 1)
    m["distinct_2"] = distinct_n(scored["texts"], 2)
    m["completions"] = len(scored["texts"])
    return m


def _has_judge(core) -> bool:
    # the judge env's reward object carries the ConstitutionJudge (envs/feedback/factories.py: judge_reward)
    return getattr(core.reward_model, "judge", None) is not None


# ------------------------------------------------------------------------------------------ evaluation


def check_protocol(split: str, prompts: int, samples: int, temperature: float, seed: int) -> dict[str, Any]:
    """The protocol dict (the keys of :data:`PROTOCOL_KEYS`), or :class:`EvaluationError` naming the bad value."""
    if split not in ("train", "validation", "test"):
        raise EvaluationError(f"split must be train, validation or test, got {split!r}.")
    for name, value in (("prompts", prompts), ("samples", samples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EvaluationError(f"{name} must be a positive integer, got {value!r}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise EvaluationError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.")
    if not isinstance(seed, int) or seed < 0:
        raise EvaluationError(f"seed must be an integer >= 0, got {seed!r}.")
    return {"split": split, "prompts": prompts, "samples": samples, "temperature": float(temperature), "seed": seed}


def evaluate_agent(env, agent, run_info: dict[str, Any], *, split: str = "test", prompts: int = 200, samples: int = 1,
                   temperature: float = 1.0, seed: int | None = None, progress: bool = True,
                   run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate ``agent`` on ``env`` by the module's protocol; returns the ``eval.json`` record.

    ``run_info``: ``algo``, ``env_id``, ``seed``, ``budget``, ``hyperparams`` (as ``results.json``
    holds them), copied into the record. With ``run_dir``, writes ``eval.json`` and
    ``completions.jsonl`` there (atomically). An agent with ``kl_to_reference()`` (best-of-n) is
    evaluated by its ``generate`` and that analytic KL; one with a ``policy`` by sampling the policy;
    one with neither by its ``generate``, its KL unknown. ``seed`` None: the run's own seed.
    """
    import torch
    from tqdm.auto import tqdm

    from rlhfgym.agents.policy import CausalLMPolicy
    from rlhfgym.envs.feedback.labelers import LabelerPopulation

    missing = [k for k in ("algo", "env_id", "seed", "budget") if k not in run_info]
    if missing:
        raise EvaluationError(f"run_info lacks {missing}; pass the run's algo, env_id, seed and budget (results.json).")
    protocol = check_protocol(split, prompts, samples, temperature, run_info["seed"] if seed is None else seed)
    core = env.unwrapped
    available = core.task.split_size(split)
    if prompts > available:
        raise EvaluationError(f"split {split!r} has {available} prompts, asked for {prompts}; use --prompts <= {available}.")
    xs = core.prompts(split, prompts)
    k = protocol["samples"]
    ref = CausalLMPolicy.from_env(env)
    n_batches = math.ceil(prompts / BATCH_SIZE)
    policy = getattr(agent, "policy", None)
    kl_value = None
    if hasattr(agent, "kl_to_reference"):  # best-of-n: its outputs are not samples of its policy
        kl_method, kl_value, kl_fn = "analytic", float(agent.kl_to_reference()), None
    elif policy is not None:
        kl_method = "monte-carlo"
    else:
        kl_method, kl_fn = "unknown", None
    if kl_method == "monte-carlo":
        sample, kl_fn = _policy_sampler(policy, core.reference_model)
        max_new, eos_id = policy.max_new_tokens, policy.eos_id
    else:
        def sample(ps, t):
            return agent.generate(ps, temperature=t)

        max_new = policy.max_new_tokens if policy is not None else core.max_new_tokens
        eos_id = ref.eos_id
    ref_sample, ref_kl = _policy_sampler(ref, core.reference_model)
    name = run_info["algo"]
    with torch.no_grad(), tqdm(total=2 * n_batches, desc=f"eval {name}", unit="batch", disable=not progress) as bar:
        scored = _sample_and_score(core, sample, xs, kl_fn=kl_fn, eos_id=eos_id, max_new_tokens=max_new,
                                   protocol=protocol, bar=bar)
        sft = _sample_and_score(core, ref_sample, xs, kl_fn=ref_kl, eos_id=ref.eos_id, max_new_tokens=ref.max_new_tokens,
                                protocol=protocol, bar=bar)
        rep = [x for x in xs for _ in range(k)]
        labelers = LabelerPopulation.preset(LABELERS, core.task)
        scored["win_rate_labelers"] = majority_wins(labelers.population_prob(rep, scored["texts"], sft["texts"]))
        sft["win_rate_labelers"] = majority_wins(labelers.population_prob(rep, sft["texts"], sft["texts"]))
        judged = _has_judge(core)
        if judged:
            scored["win_rate_judge"] = majority_wins(core.prefer(rep, scored["texts"], sft["texts"]).tolist())
            sft["win_rate_judge"] = majority_wins(core.prefer(rep, sft["texts"], sft["texts"]).tolist())
    metrics = _metrics(scored, k, kl_method, kl_value)
    sft_metrics = _metrics(sft, k, "monte-carlo", None)
    for m, s in ((metrics, scored), (sft_metrics, sft)):
        m["win_rate_labelers"] = mean_se(s["win_rate_labelers"], k)
        m["win_rate_judge"] = mean_se(s["win_rate_judge"], k) if judged else None
    record = {
        "format": FORMAT_VERSION,
        "algo": run_info["algo"],
        "env_id": run_info["env_id"],
        "seed": run_info["seed"],
        "budget": run_info["budget"],
        "protocol": {**protocol, "batch_size": BATCH_SIZE, "labelers": LABELERS,
                     "judge": "the env's prefer" if judged else None},
        "metrics": metrics,
        "sft": sft_metrics,
        "hyperparams": run_info.get("hyperparams", {}),
        "env_kwargs": run_info.get("env_kwargs", {}),
        "versions": versions(),
        "machine": machine(str(core.device)),
        "completions_file": COMPLETIONS_FILE,
    }
    if run_dir is not None:
        write_evaluation(run_dir, record, completion_rows(core, xs, k, scored))
    return record


def completion_rows(core, prompts: Sequence[str], k: int, scored: dict[str, Any]) -> list[dict[str, Any]]:
    """``completions.jsonl`` rows: prompt and sample index, text, gold, and the gold components the
    labelers weigh (so the leaderboard can ask them without rebuilding the env)."""
    from rlhfgym.envs.feedback.labelers import LabelerPopulation

    components = LabelerPopulation.components_of(core.task)
    rows = []
    for n, text in enumerate(scored["texts"]):
        i, j = divmod(n, k)
        rows.append({"prompt": i, "sample": j, "text": text, "gold": scored["gold"][n],
                     "components": {c: float(v) for c, v in components(prompts[i], text).items()}})
    return rows


def write_evaluation(run_dir: str | os.PathLike, record: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    from rlhfgym.envs.assets import atomic_write_text

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # completions first: an eval.json on disk always has its completions beside it
    atomic_write_text(run_dir / COMPLETIONS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(run_dir / EVAL_FILE, json.dumps(record, indent=2) + "\n")
    return run_dir / EVAL_FILE


def results_row(metrics: dict[str, Any], protocol: dict[str, Any]) -> dict[str, Any]:
    """The ``policy`` / ``sft`` row of ``results.json`` (gold, rm, kl, n, split) from an evaluation's metrics."""
    return {"gold": metrics["gold"]["mean"], "rm": metrics["proxy"]["mean"], "kl": metrics["kl"]["mean"],
            "n": protocol["prompts"], "split": protocol["split"]}


def versions() -> dict[str, str]:
    from importlib import metadata

    import torch
    import transformers

    try:
        ours = metadata.version("rlhf-gym")
    except metadata.PackageNotFoundError:
        ours = "unknown (not installed)"
    return {"rlhf-gym": ours, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's ``results.json`` (written by ``rlhf-zoo train``), checked for what evaluation needs."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        raise EvaluationError(f"{run_dir} has no {RESULTS_FILE}; train the run first (rlhf-zoo train ALGO ENV_ID --run-dir {run_dir}).")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path} is not valid JSON ({e}); retrain the run to rewrite it.") from None
    missing = [k for k in ("algo", "env_id", "seed", "budget") if k not in info] if isinstance(info, dict) else ["all"]
    if missing:
        raise EvaluationError(f"{path} lacks {missing}; it was not written by rlhf-zoo train, retrain the run.")
    return info


def evaluate_run(run_dir: str | os.PathLike, *, split: str = "test", prompts: int = 200, samples: int = 1,
                 temperature: float = 1.0, seed: int | None = None, device: str | None = None, progress: bool = True) -> dict:
    """Evaluate the run in ``run_dir`` (``agent/`` and ``results.json``) and write its ``eval.json``.

    ``seed`` None: the run's own seed (the protocol of ``train``); ``device`` None: the run's. Returns the record written (see :func:`evaluate_agent`).
    """
    import gymnasium as gym

    import rlhfgym.envs  # noqa: F401  (registers the env ids)
    from rlhfgym.agents import load

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    protocol = check_protocol(split, prompts, samples, temperature, info["seed"] if seed is None else seed)
    if not (run_dir / "agent").is_dir():
        raise EvaluationError(f"{run_dir} has no agent/ checkpoint to evaluate; train the run (again) to write it.")
    device = device or info.get("device") or "cpu"
    env = gym.make(info["env_id"], device=device, **(info.get("env_kwargs") or {}))
    agent = load(run_dir / "agent", device=device)
    if hasattr(agent, "set_reward") and getattr(agent, "score_fn", None) is None:
        # best-of-n keeps its reward function only in memory: give it back the env's, which it was trained with
        agent.set_reward(env.unwrapped.score)
    record = evaluate_agent(env, agent, info, progress=progress, run_dir=run_dir, **protocol)
    if progress:
        print(summary_line(record), file=sys.stderr)
    return record


def summary_line(record: dict[str, Any]) -> str:
    m, s = record["metrics"], record["sft"]
    return (f"{record['algo']} on {record['env_id']} (seed {record['seed']}): gold {m['gold']['mean']:.3f} "
            f"(SFT {s['gold']['mean']:.3f}), proxy {m['proxy']['mean']:.3f}, KL {_fmt(m['kl']['mean'])}, "
            f"win rate vs SFT {m['win_rate_labelers']['mean']:.3f}")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


__all__ = ["evaluate_run", "evaluate_agent", "write_evaluation", "read_run_info", "results_row", "mean_se", "distinct_n",
           "majority_wins", "EvaluationError", "FORMAT_VERSION", "PROTOCOL_KEYS", "METRICS", "PER_SAMPLE_METRICS",
           "SET_METRICS"]
