"""Training through the token MDP against the sequence path it replaced: the same runs on two commits.

    python docs/results/env-rollout/ab.py --baseline 77440b2 --agents rloo,reinforce,ppo,nash-md,rest \
        --budget 256 --repeats 2 --out docs/results/env-rollout

``--baseline`` is the last commit whose agents sampled with ``CausalLMPolicy.sample`` and scored with
``env.unwrapped.score`` (77440b2); the working tree is the other side. The baseline's package is
unpacked with ``git archive`` into a temporary directory and put first on ``PYTHONPATH``; each run is
``rlhfgym.zoo.train.train(agent, env, budget, seed=0, eval_n=100)`` in a fresh subprocess, the two
sides interleaved (baseline, env, baseline, env, ...), so both see the same machine load. Prints and
writes (``ab.md``, ``ab.json``) each run's training seconds and evaluation (gold, RM score, KL), and
per agent the median seconds and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

RUN = """
import json, sys
from rlhfgym.zoo.train import train
r = train(sys.argv[1], sys.argv[2], budget=int(sys.argv[3]), seed=0, run_dir=sys.argv[4], eval_n=100)
print("RESULT", json.dumps({"train_seconds": r["train_seconds"], "policy": r["policy"]}))
"""
REPO = Path(__file__).resolve().parents[3]


def baseline_tree(rev: str, where: Path) -> Path:
    """``rev``'s envs/agents/zoo as an importable ``rlhfgym`` under ``where``; returns the PYTHONPATH entry."""
    tree = where / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    pkg = where / "pkg" / "rlhfgym"
    pkg.mkdir(parents=True)
    for part in ("envs", "agents", "zoo"):
        (pkg / part).symlink_to(tree / part)
    return where / "pkg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="77440b2")
    ap.add_argument("--agents", default="rloo,reinforce,ppo,nash-md,rest")
    ap.add_argument("--env", default="RLHF-Summarize-v0")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    agents = args.agents.split(",")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        old_path = baseline_tree(args.baseline, Path(tmp))
        for rep in range(args.repeats):
            for agent in agents:
                for side in ("sequence", "env"):
                    env = dict(os.environ)
                    if side == "sequence":
                        env["PYTHONPATH"] = str(old_path)
                    run_dir = Path(tmp) / "runs" / side / agent / f"r{rep}"
                    out = subprocess.run([sys.executable, "-c", RUN, agent, args.env, str(args.budget), str(run_dir)],
                                         env=env, capture_output=True, text=True)
                    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                    if not line:
                        sys.exit(f"{side} {agent} failed:\n{out.stderr[-3000:]}")
                    res = json.loads(line[0][len("RESULT "):])
                    row = {"agent": agent, "side": side, "repeat": rep, "train_seconds": res["train_seconds"],
                           **{k: res["policy"][k] for k in ("gold", "rm", "kl") if k in res["policy"]}}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    lines = [f"Training through the token MDP (env) against the sequence path ({args.baseline}): {args.env}, "
             f"budget {args.budget}, seed 0, evaluation on 100 test prompts; {args.repeats} interleaved repeats.",
             "", "| agent | sequence path s (median) | env s (median) | env / sequence | gold sequence | gold env |"
             " KL sequence | KL env |", "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for agent in agents:
        seq = [r for r in rows if r["agent"] == agent and r["side"] == "sequence"]
        via_env = [r for r in rows if r["agent"] == agent and r["side"] == "env"]
        s_med = statistics.median(r["train_seconds"] for r in seq)
        e_med = statistics.median(r["train_seconds"] for r in via_env)
        summary[agent] = {"sequence_seconds": s_med, "env_seconds": e_med, "ratio": e_med / s_med}
        lines.append(f"| {agent} | {s_med:.1f} | {e_med:.1f} | {e_med / s_med:.2f} | {seq[0].get('gold', float('nan')):.4f} | "
                     f"{via_env[0].get('gold', float('nan')):.4f} | {seq[0].get('kl', float('nan')):.6f} | "
                     f"{via_env[0].get('kl', float('nan')):.6f} |")
    load = os.getloadavg()
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average at the end "
              f"{load[0]:.1f}; {date.today()}; `python docs/results/env-rollout/ab.py --baseline {args.baseline} "
              f"--agents {args.agents} --env {args.env} --budget {args.budget} --repeats {args.repeats}`."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("ab.md", table + "\n"), ("ab.json", json.dumps({"rows": rows, "summary": summary,
                                                                               "load_average": load, "date": str(date.today()),
                                                                               "time": time.time()}, indent=2))):
            tmp_file = args.out / (name + ".tmp")
            tmp_file.write_text(text)
            tmp_file.replace(args.out / name)


if __name__ == "__main__":
    main()
