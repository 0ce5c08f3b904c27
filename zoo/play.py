"""``rlhf-zoo play ENV_ID``: watch the world work.

Samples articles, lets a policy (the env's SFT reference policy by default, or a saved agent)
write a summary token by token *through the environment's* ``step``, and prints the article, the
summary, the summed reward, the reward model's score, the gold score and the KL to the reference.
"""

from __future__ import annotations

import torch


def play(env_id: str, n: int = 1, split: str = "test", seed: int = 0, device: str = "cpu", temperature: float = 1.0,
         agent_dir: str | None = None) -> list[dict]:
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
    results = []
    for episode in range(n):
        obs, start = env.reset(seed=seed + episode)
        logits = lm.reset_rows([0], torch.as_tensor(obs["input_ids"])[None], torch.as_tensor(obs["attention_mask"])[None])
        total, log_ratio, done = 0.0, 0.0, False
        while not done:
            logp = torch.log_softmax(logits[0].float()[: env.action_space.n] / temperature, -1)
            action = int(torch.multinomial(logp.exp(), 1))
            obs, reward, terminated, truncated, info = env.step(action)
            total += reward
            log_ratio += float(logp[action]) - info["ref_logprob"] if core.kl_coef else 0.0
            done = terminated or truncated
            if not done:
                logits = lm.step(torch.tensor([action]))
        article = start["prompt"]
        row = {"completion": info["completion"], "return": total, "rm_score": info["rm_score"], "gold": info.get("gold"),
               "kl": log_ratio}
        results.append(row)
        gold = "n/a" if row["gold"] is None else f"{row['gold']:+.3f}"
        console.print(Panel(article, title=f"{env_id} · {split} article {episode + 1}/{n}", expand=False))
        console.print(f"[bold]{name}:[/bold] {row['completion']}")
        console.print(
            f"return {total:+.3f} = RM {row['rm_score']:+.3f} + {core.kl_coef} x sum log pi_ref  |  gold {gold}  |  "
            f"KL(pi || pi_ref) on this sample {log_ratio:+.3f}\n"
        )
    env.close()
    return results
