"""``rlhf-zoo bench env``: rollout throughput of the token MDP against the usual way.

*Env*: ``gym.make_vec(env_id, num_envs=B)`` rolled out with the SFT policy acting through its own
KV cache (:class:`~rlhfgym.envs.lm.IncrementalLM`), one token per ``step`` for every row, the env
computing ``log pi_ref`` with the reference's KV cache and scoring finished episodes in a batch.

*Usual way*: ``model.generate`` on the same ``B`` prompts, then one teacher-forced pass of the
reference model over the finished batch and one reward-model call (what RLHF trainers such as
TRL do). With ``kl_coef=0`` the env skips the reference, so the baseline is ``generate`` plus the
reward model.

Both count generated tokens (EOS included, padding after it excluded) per second of wall time,
after a warm-up; the env is measured in steady state (rows restart as soon as they finish).
"""

from __future__ import annotations

import platform
import time
from datetime import date

import torch


def _sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1).squeeze(-1)


@torch.no_grad()
def env_rollout_tokens_per_s(env_id: str, batch: int, max_new_tokens: int, kl_coef: float, device: str,
                             steps: int, temperature: float = 1.0, seed: int = 0) -> float:
    import gymnasium as gym

    from rlhfgym.envs.lm import IncrementalLM

    env = gym.make_vec(env_id, num_envs=batch, kl_coef=kl_coef, max_new_tokens=max_new_tokens, device=device)
    core = env.unwrapped
    policy = core.reference_model  # the SFT policy acts (a frozen copy is not needed for a benchmark)
    window = core.core.window
    lm = IncrementalLM(policy, batch, window)
    obs, _ = env.reset(seed=seed)
    logits = lm.reset_rows(range(batch), obs["input_ids"], obs["attention_mask"])
    restarting = torch.zeros(batch, dtype=torch.bool, device=core.device)
    generated = 0

    def one_step():
        nonlocal logits, restarting, obs
        actions = _sample(logits, temperature)
        obs, _, terminated, truncated, _ = env.step(actions)
        logits = lm.step(actions, active=~restarting)  # restarting rows ignored their action
        rows = restarting.nonzero().squeeze(-1)
        if rows.numel():
            logits[rows] = lm.reset_rows(rows, obs["input_ids"][rows], obs["attention_mask"][rows])
        n = int((~restarting).sum())
        restarting = terminated | truncated
        return n

    for _ in range(max_new_tokens):  # warm-up: one full episode length
        one_step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        generated += one_step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    env.close()
    return generated / (time.perf_counter() - t0)


@torch.no_grad()
def generate_tokens_per_s(env_id: str, batch: int, max_new_tokens: int, kl_coef: float, device: str,
                          repeats: int, temperature: float = 1.0) -> float:
    import gymnasium as gym

    from rlhfgym.envs.lm import sequence_logprobs

    env = gym.make(env_id, kl_coef=kl_coef, max_new_tokens=max_new_tokens, device=device)
    core = env.unwrapped
    model, ref, tok = core.reference_model, core.reference_model, core.tokenizer
    tok.padding_side = "left"
    prompts = core.prompts("train", batch * (repeats + 1))

    def one_batch(ps):
        enc = tok(ps, return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        completion = out[:, enc["input_ids"].shape[1]:]
        # tokens up to and including the first EOS are real; generate pads the rest
        after_eos = (completion == tok.eos_token_id).long().cumsum(-1) - (completion == tok.eos_token_id).long()
        comp_mask = (after_eos == 0).long()
        if kl_coef != 0:  # one teacher-forced pass of the reference over the finished batch
            att = torch.cat([enc["attention_mask"], comp_mask], 1)
            cmask = torch.cat([torch.zeros_like(enc["attention_mask"]), comp_mask], 1)
            sequence_logprobs(ref, out, att, cmask)
        texts = tok.batch_decode(completion.masked_fill(comp_mask == 0, tok.pad_token_id), skip_special_tokens=True)
        core.score(ps, texts)  # the reward model over the finished batch
        return int(comp_mask.sum())

    one_batch(prompts[:batch])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for r in range(1, repeats + 1):
        n += one_batch(prompts[r * batch:(r + 1) * batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    env.close()
    return n / (time.perf_counter() - t0)


def bench_env(env_id: str = "RLHF-Summarize-v0", batch: int = 64, max_new_tokens: int = 32, device: str = "cpu",
              repeats: int = 3) -> list[dict]:
    """Print (and return) tokens/s of env rollouts vs generate (+ reference pass + RM), for kl_coef 0.05 and 0."""
    import rlhfgym.envs  # noqa: F401  (registers the ids)

    rows = []
    for kl_coef in (0.05, 0.0):
        usual = generate_tokens_per_s(env_id, batch, max_new_tokens, kl_coef, device, repeats)
        env = env_rollout_tokens_per_s(env_id, batch, max_new_tokens, kl_coef, device, steps=repeats * max_new_tokens)
        rows.append({"kl_coef": kl_coef, "env_tokens_per_s": env, "usual_tokens_per_s": usual, "ratio": env / usual})
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads" if device == "cpu" else torch.cuda.get_device_name()
    print(f"rlhf-zoo bench env — {env_id}, batch {batch}, max_new_tokens {max_new_tokens}, device {device} ({machine}), {date.today()}")
    print("| kl_coef | env rollout (tokens/s) | usual way (tokens/s) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        usual = "generate + ref pass + RM" if r["kl_coef"] else "generate + RM"
        print(f"| {r['kl_coef']} | {r['env_tokens_per_s']:.0f} | {r['usual_tokens_per_s']:.0f} ({usual}) | {r['ratio']:.2f} |")
    return rows
