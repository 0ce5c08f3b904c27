"""``rlhf-zoo play ENV_ID``: watch the world work.

Samples articles, lets a policy (the env's SFT reference policy by default, or a saved agent)
write a summary token by token *through the environment's* ``step``, and prints the article, the
summary, the summed reward, the reward model's score, the gold score and the KL to the reference.
``temperature=0`` plays greedily (the most likely token each step). With more than :data:`SHOW_ALL`
prompts, the first :data:`SHOW_FIRST` are shown, the rest run under a progress bar, and the means
over all of them are printed at the end.
"""

from __future__ import annotations

import math

import torch

SHOW_ALL = 10  # up to this many prompts, every one is printed
SHOW_FIRST = 3  # above it, only the first few are, then a progress bar


def play(env_id: str, n: int = 1, split: str = "test", seed: int = 0, device: str = "cpu", temperature: float = 1.0,
         agent_dir: str | None = None) -> list[dict]:
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}.")
    import gymnasium as gym
    from rich.console import Console
    from rich.panel import Panel

    import rlhfgym.envs  # noqa: F401  (registers the ids)
    from rlhfgym.envs.lm import IncrementalLM

    console = Console()
    env = gym.make(env_id, split=split, device=device)
    core = env.unwrapped
    if agent_dir:
        from rlhfgym.agents import load

        policy, name = load(agent_dir, device=device).policy.model, f"agent from {agent_dir}"
    else:
        policy, name = core.reference_model, "SFT policy (= reference)"
    policy.eval()
    lm = IncrementalLM(policy, 1, env.observation_space["input_ids"].shape[0])
    show = n if n <= SHOW_ALL else SHOW_FIRST
    bar = None
    results = []
    for episode in range(n):
        if episode == show:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, initial=show, desc=f"play {env_id}", unit="prompt")
        obs, start = env.reset(seed=seed + episode)
        logits = lm.reset_rows([0], torch.as_tensor(obs["input_ids"])[None], torch.as_tensor(obs["attention_mask"])[None])
        total, log_ratio, done = 0.0, 0.0, False
        while not done:
            scores = logits[0].float()[: env.action_space.n]
            if temperature == 0:  # greedy: a deterministic policy, log pi(action) = 0
                action, logp_action = int(scores.argmax()), 0.0
            else:
                logp = torch.log_softmax(scores / temperature, -1)
                action = int(torch.multinomial(logp.exp(), 1))
                logp_action = float(logp[action])
            obs, reward, terminated, truncated, info = env.step(action)
            total += reward
            log_ratio += logp_action - info["ref_logprob"] if core.kl_coef else 0.0
            done = terminated or truncated
            if not done:
                logits = lm.step(torch.tensor([action]))
        article = start["prompt"]
        row = {"completion": info["completion"], "return": total, "rm_score": info["rm_score"], "gold": info.get("gold"),
               "kl": log_ratio}
        results.append(row)
        if bar is not None:
            bar.update(1)
            continue
        gold = "n/a" if row["gold"] is None else f"{row['gold']:+.3f}"
        console.print(Panel(article, title=f"{env_id} · {split} article {episode + 1}/{n}", expand=False))
        console.print(f"[bold]{name}:[/bold] {row['completion']}")
        console.print(
            f"return {total:+.3f} = RM {row['rm_score']:+.3f} + {core.kl_coef} x sum log pi_ref  |  gold {gold}  |  "
            f"KL(pi || pi_ref) on this sample {log_ratio:+.3f}\n"
        )
    if bar is not None:
        bar.close()
    if n > 1:
        golds = [r["gold"] for r in results if r["gold"] is not None]
        gold = f"{sum(golds) / len(golds):+.3f}" if golds else "n/a"
        console.print(
            f"[bold]mean over {n} {split} prompts:[/bold] return {sum(r['return'] for r in results) / n:+.3f}  |  "
            f"RM {sum(r['rm_score'] for r in results) / n:+.3f}  |  gold {gold}  |  "
            f"KL {sum(r['kl'] for r in results) / n:+.3f}"
        )
    env.close()
    return results
