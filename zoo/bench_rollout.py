"""``rlhf-zoo bench rollout``: what one batch of completions costs an agent, collected through the
token MDP (the agents' way, :meth:`~rlhfgym.agents.common.EnvSampler.rollout`) against the
sequence path the agents used before (:meth:`~rlhfgym.agents.policy.CausalLMPolicy.sample`, then
one teacher-forced pass of the reference model, one reward-model call and the gold scorer).

Both sides get the same prompts and the same torch seed, so they draw the same tokens (checked
every repeat); they differ only in how ``log pi_ref`` is computed (the env steps the reference with
a KV cache, one token per ``step``; the sequence path runs one teacher-forced pass over the finished
batch) and in when the reward model runs (as episodes end, or once). The two are interleaved
``repeats`` times in one process after a warm-up; reported are the median seconds per batch of
each, their ratio, and whether the tokens matched. ``samples_per_prompt`` > 1 repeats each prompt
side by side, as RLOO does (both sides then prefill each distinct prompt once).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import date

import torch


def bench_rollout(env_id: str = "RLHF-Summarize-v0", batch: int = 32, samples_per_prompt: int = 1, repeats: int = 7,
                  kl_coef: float = 0.05, device: str = "cpu", seed: int = 0) -> dict:
    """Time both ways of collecting ``batch`` completions; returns the figures and prints a table row."""
    import gymnasium as gym

    from rlhfgym.agents.common import EnvSampler, mean_gold, stream_prompt_indices
    from rlhfgym.agents.policy import CausalLMPolicy

    if batch < 1 or samples_per_prompt < 1 or batch % samples_per_prompt or repeats < 1:
        raise ValueError(f"bench rollout: batch ({batch}) must be a positive multiple of samples_per_prompt "
                         f"({samples_per_prompt}), and repeats ({repeats}) >= 1.")
    env = gym.make(env_id, kl_coef=kl_coef, device=device)
    core = env.unwrapped
    policy = CausalLMPolicy.from_env(env)
    sampler = EnvSampler(env, kl_coef=kl_coef, device=device)
    idx = stream_prompt_indices(core, batch // samples_per_prompt, seed=seed, position=0).repeat(samples_per_prompt)
    prompts = [core.task.prompt("train", int(i)) for i in idx]

    def through_env():
        return sampler.rollout(policy, idx).tokens

    @torch.no_grad()
    def sequence_path():
        roll = policy.sample(prompts)
        if kl_coef:
            policy.forward_logprobs(roll.prompt_ids, roll.tokens, roll.mask, model=core.reference_model)
        core.score(prompts, roll.texts)
        mean_gold(core, prompts, roll.texts)
        return roll.tokens

    def timed(fn, rep: int):
        torch.manual_seed(seed + rep)
        t0 = time.perf_counter()
        tokens = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, tokens

    timed(through_env, -1), timed(sequence_path, -1)  # warm-up
    env_s, seq_s, same = [], [], True
    for rep in range(repeats):
        a, tokens_env = timed(through_env, rep)
        b, tokens_seq = timed(sequence_path, rep)
        env_s.append(a)
        seq_s.append(b)
        t = tokens_seq.shape[1]
        same &= bool(torch.equal(tokens_env[:, :t], tokens_seq)) and not bool(tokens_env[:, t:].ne(policy.pad_id).any())
    result = {
        "env_id": env_id, "batch": batch, "samples_per_prompt": samples_per_prompt, "kl_coef": kl_coef,
        "repeats": repeats, "device": device, "threads": torch.get_num_threads(), "overlap": sampler.overlap,
        "env_seconds": env_s, "sequence_seconds": seq_s,
        "env_median": statistics.median(env_s), "sequence_median": statistics.median(seq_s),
        "same_tokens": same, "load_average": os.getloadavg()[0], "machine": platform.processor() or platform.machine(),
        "date": str(date.today()),
    }
    result["ratio"] = result["sequence_median"] / result["env_median"]  # > 1: the env is faster
    print(f"| {batch} | {samples_per_prompt} | {kl_coef:g} | {result['env_median']:.3f} s | {result['sequence_median']:.3f} s "
          f"| {result['ratio']:.2f} | {'yes' if same else 'NO'} | {result['load_average']:.1f} |")
    return result


def bench_rollouts(batch: int = 32, repeats: int = 7, device: str = "cpu") -> list[dict]:
    """The table of ``rlhf-zoo bench rollout``: one sample per prompt (PPO, REINFORCE) and four (RLOO),
    with the KL term and without it."""
    print("| batch | samples/prompt | kl_coef | through the env | sequence path | ratio (seq / env) | same tokens | load |")
    print("|---|---|---|---|---|---|---|---|")
    return [bench_rollout(batch=batch, samples_per_prompt=k, kl_coef=kl, repeats=repeats, device=device)
            for k in (1, 4) for kl in (0.05, 0.0)]
