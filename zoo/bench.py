"""``rlhf-zoo bench env``: rollout throughput of the token MDP against the usual way and against bare
KV-cached decoding (its limit);
``rlhf-zoo bench threads``: the token MDP's step rate by torch thread count, quiet and with a busy core.

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
                             steps: int, temperature: float = 1.0, seed: int = 0, reference=None) -> float:
    import gymnasium as gym

    from rlhfgym.envs.lm import IncrementalLM

    env = gym.make_vec(env_id, num_envs=batch, kl_coef=kl_coef, max_new_tokens=max_new_tokens, device=device,
                       **_reference_kwargs(reference))
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


def _batches_tokens_per_s(one_batch, prompts: list[str], batch: int, repeats: int, device: str) -> float:
    """Generated tokens per second of ``one_batch(prompts) -> tokens`` over ``repeats`` batches of
    ``batch`` prompts, after one warm-up batch."""
    one_batch(prompts[:batch])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for r in range(1, repeats + 1):
        n += one_batch(prompts[r * batch:(r + 1) * batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


@torch.no_grad()
def generate_tokens_per_s(env_id: str, batch: int, max_new_tokens: int, kl_coef: float, device: str,
                          repeats: int, temperature: float = 1.0, reference=None) -> float:
    import gymnasium as gym

    from rlhfgym.envs.lm import sequence_logprobs

    env = gym.make(env_id, kl_coef=kl_coef, max_new_tokens=max_new_tokens, device=device, **_reference_kwargs(reference))
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

    rate = _batches_tokens_per_s(one_batch, prompts, batch, repeats, device)
    env.close()
    return rate


@torch.no_grad()
def bare_tokens_per_s(env_id: str, batch: int, max_new_tokens: int, kl_coef: float, device: str,
                      repeats: int, temperature: float = 1.0, reference=None) -> float:
    """The limit of the env path: the same policy, reference and reward model with no env around them.

    Each batch of ``batch`` prompts is decoded token by token with the policy's KV cache
    (:class:`~rlhfgym.envs.lm.TokenSampler`); with ``kl_coef != 0`` the reference model follows with
    its own KV cache and gives ``log pi_ref`` of every sampled token (what the env computes per step);
    the finished batch is decoded and scored by the reward model once. Rows that ended wait (batch
    synchronous, as ``generate``); the batch stops when every row has ended.
    """
    import gymnasium as gym

    from rlhfgym.envs.lm import IncrementalLMPool, TokenSampler, decode_completions, encode_prompts

    env = gym.make(env_id, kl_coef=kl_coef, max_new_tokens=max_new_tokens, device=device, **_reference_kwargs(reference))
    core = env.unwrapped
    policy, ref, tok = core.reference_model, core.reference_model, core.tokenizer
    max_prompt = getattr(getattr(core, "core", core), "max_prompt_tokens", 96)
    window, vocab = max_prompt + max_new_tokens, len(tok)
    eos, pad = int(tok.eos_token_id), int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    prompts = core.prompts("train", batch * (repeats + 1))
    policy_lms, ref_lms = IncrementalLMPool(), IncrementalLMPool()  # caches (and CUDA graphs) made once

    def one_batch(ps):
        ids = [row[-max_prompt:] for row in encode_prompts(tok, ps)]
        sampler = TokenSampler(policy, ids, max_new_tokens=max_new_tokens, window=window, vocab_size=vocab,
                               temperature=temperature, pool=policy_lms)
        ref_lm = ref_lms.get(ref, len(ids), window) if kl_coef else None
        ref_logits = ref_lm.reset_rows(range(len(ids)), ids) if ref_lm is not None else None
        done = torch.zeros(len(ids), dtype=torch.bool, device=core.device)
        tokens, ref_logp, n = [], torch.zeros(len(ids), device=core.device), 0
        for _ in range(max_new_tokens):
            t, _ = sampler.draw()
            t = torch.where(done, torch.full_like(t, pad), t)
            active = ~done
            if ref_lm is not None:  # log pi_ref(a_t | s_t), as the env pays it per step
                lp = torch.log_softmax(ref_logits.float()[:, :vocab], -1).gather(-1, t[:, None]).squeeze(-1)
                ref_logp += torch.where(active, lp, 0.0)
            tokens.append(t)
            n += int(active.sum())
            done = done | (t == eos)
            if bool(done.all()):
                break
            sampler.advance(t, active)
            if ref_lm is not None:
                ref_logits = ref_lm.step(t, active=active)
        toks = torch.stack(tokens, 1).tolist()
        texts = decode_completions(tok, [[x for x in row if x != pad] for row in toks])
        core.score(ps, texts)
        return n

    rate = _batches_tokens_per_s(one_batch, prompts, batch, repeats, device)
    env.close()
    return rate


def load_reference(reference: str | None = None, dtype: str | None = None):
    """The policy (= reference) a bench runs: None (the env's own, the micro world's SFT model) unless
    ``reference`` (a model directory, e.g. one made by :func:`rlhfgym.zoo.bench_trl.build_policy`) or
    ``dtype`` ("float32", "bfloat16", "float16") is given; then that model, loaded in that dtype."""
    if reference is None and dtype is None:
        return None
    from transformers import AutoModelForCausalLM

    from rlhfgym.envs.assets import load_micro_assets
    from rlhfgym.envs.hf import quiet_transformers

    wanted = getattr(torch, str(dtype or "float32"), None)
    if not (isinstance(wanted, torch.dtype) and wanted.is_floating_point):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(reference or load_micro_assets().sft_dir, dtype=wanted)


def _reference_kwargs(reference) -> dict:
    return {} if reference is None else {"reference": reference}


def describe_model(model=None) -> str:
    """``"<n>M parameters, <dtype>"`` of a model (None: the micro world's SFT model, as the env loads it)."""
    model = model if model is not None else load_reference(dtype="float32")
    param = next(model.parameters())
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {str(param.dtype).removeprefix('torch.')}"


def measure(kind: str, env_id: str, batch: int, max_new_tokens: int, kl_coef: float, device: str, repeats: int,
            reference=None) -> float:
    """Tokens/s of one way of rolling out: ``"env"`` (:func:`env_rollout_tokens_per_s`), ``"usual"``
    (:func:`generate_tokens_per_s`) or ``"bare"`` (:func:`bare_tokens_per_s`)."""
    if kind == "env":
        return env_rollout_tokens_per_s(env_id, batch, max_new_tokens, kl_coef, device, steps=repeats * max_new_tokens,
                                        reference=reference)
    if kind == "usual":
        return generate_tokens_per_s(env_id, batch, max_new_tokens, kl_coef, device, repeats, reference=reference)
    if kind == "bare":
        return bare_tokens_per_s(env_id, batch, max_new_tokens, kl_coef, device, repeats, reference=reference)
    raise ValueError(f"unknown measurement {kind!r}; use env, usual or bare.")


def measure_in_fresh_process(spec: dict, timeout: float = 1800.0) -> dict:
    """:func:`measure` of ``spec`` (its keywords, with ``reference`` / ``dtype`` as for
    :func:`load_reference`) in a new Python process: ``{"tokens_per_s", "threads", "policy"}``
    (``policy``: :func:`describe_model` of what it ran). A process's
    history (what it allocated before, where its memory lies) moves one way's speed by up to ~10% on
    the CPU, so isolated measurements sample that spread instead of carrying one process's luck."""
    import json
    import shlex
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "rlhfgym.zoo.bench", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"the measurement {shlex.join(cmd)} failed (exit status {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_spec(spec: dict) -> dict:
    """What a fresh process of :func:`measure_in_fresh_process` runs and prints."""
    import rlhfgym.envs  # noqa: F401  (registers the ids)

    spec = dict(spec)
    reference = load_reference(spec.pop("reference", None), spec.pop("dtype", None))
    rate = measure(**spec, reference=reference)
    return {"tokens_per_s": rate, "threads": torch.get_num_threads(), "policy": describe_model(reference)}


def bench_env(env_id: str = "RLHF-Summarize-v0", batch: int = 64, max_new_tokens: int = 32, device: str = "cpu",
              repeats: int = 3, rounds: int = 1, reference: str | None = None, dtype: str | None = None,
              isolate: bool = False) -> list[dict]:
    """Print (and return) tokens/s of env rollouts vs generate (+ reference pass + RM) and vs bare
    KV-cached decoding of the same policy + reference + RM (:func:`bare_tokens_per_s`), for kl_coef
    0.05 and 0. Each cell is the median of ``rounds`` interleaved measurements (generate, env, bare,
    generate, ...), each over ``repeats`` batches; with ``isolate`` each measurement runs in a fresh
    process (:func:`measure_in_fresh_process`). ``reference`` / ``dtype``: the policy (which is also
    the reference) to run instead of the micro world's SFT model (:func:`load_reference`); the
    reward model stays the env's."""
    import statistics

    import rlhfgym.envs  # noqa: F401  (registers the ids)

    model = None if isolate else load_reference(reference, dtype)
    threads = set()
    policies = set() if isolate else {describe_model(model)}  # isolated: the processes that loaded it say

    def one(kind: str, kl_coef: float) -> float:
        spec = {"kind": kind, "env_id": env_id, "batch": batch, "max_new_tokens": max_new_tokens, "kl_coef": kl_coef,
                "device": device, "repeats": repeats}
        if not isolate:
            rate = measure(**spec, reference=model)
            threads.add(torch.get_num_threads())
            return rate
        out = measure_in_fresh_process({**spec, "reference": reference, "dtype": dtype})
        threads.add(out["threads"])
        policies.add(out["policy"])
        return out["tokens_per_s"]

    rows = []
    for kl_coef in (0.05, 0.0):
        runs = {"env": [], "usual": [], "bare": []}
        for _ in range(rounds):
            for kind in ("usual", "env", "bare"):
                runs[kind].append(one(kind, kl_coef))
        e, u, b = (statistics.median(runs[k]) for k in ("env", "usual", "bare"))
        rows.append({"kl_coef": kl_coef, "env_tokens_per_s": e, "usual_tokens_per_s": u, "bare_tokens_per_s": b,
                     "ratio": e / u, "env_over_bare": e / b, "rounds": rounds, "isolated": isolate, "runs": runs})
    machine = (f"{platform.machine()}, {'/'.join(map(str, sorted(threads)))} threads" if device == "cpu"
               else torch.cuda.get_device_name(device))
    policy = "; ".join(sorted(policies))
    where = "each in a fresh process" if isolate else "in this process"
    print(f"rlhf-zoo bench env — {env_id}, batch {batch}, max_new_tokens {max_new_tokens}, device {device} ({machine}), "
          f"policy = reference {reference or 'micro SFT'} ({policy}), {date.today()}, median of {rounds} interleaved "
          f"round(s), {where}")
    print("| kl_coef | env rollout (tokens/s) | usual way (tokens/s) | ratio | bare KV-cached decoding (tokens/s) | env / bare |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        usual = "generate + ref pass + RM" if r["kl_coef"] else "generate + RM"
        bare = "policy + ref + RM" if r["kl_coef"] else "policy + RM"
        print(f"| {r['kl_coef']} | {r['env_tokens_per_s']:.0f} | {r['usual_tokens_per_s']:.0f} ({usual}) | {r['ratio']:.2f} | "
              f"{r['bare_tokens_per_s']:.0f} ({bare}) | {r['env_over_bare']:.2f} |")
    return rows


# ---------------------------------------------------------------------------------------------- threads


def _step_rate(env, threads: int, seconds: float) -> float:
    """``env.step`` calls per second with ``threads`` torch intra-op threads (after a warm-up)."""
    torch.set_num_threads(threads)
    actions = torch.full((env.num_envs,), 5, dtype=torch.long)
    env.reset(seed=0)
    for _ in range(10):
        env.step(actions)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        env.step(actions)
        n += 1
    return n / (time.perf_counter() - t0)


def _busy_core(stop) -> None:
    """Another process's work: keep one core busy until ``stop`` is set."""
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1_000_003


def bench_threads(env_id: str = "RLHF-Summarize-Gold-v0", num_envs: int = 32, seconds: float = 5.0,
                  repeats: int = 3) -> list[dict]:
    """Print (and return) ``env.step`` calls/s of a ``num_envs``-row vector env with one thread and with
    torch's default, on the machine as it is and with one more core kept busy by a second process;
    each cell the median of ``repeats`` interleaved measurements."""
    import multiprocessing as mp
    import statistics

    import gymnasium as gym

    import rlhfgym.envs  # noqa: F401  (registers the ids)
    from rlhfgym.envs.hf import threads_at_import

    default = threads_at_import()
    env = gym.make_vec(env_id, num_envs=num_envs)
    counts = sorted({1, default})
    rates: dict[tuple[int, bool], list[float]] = {(t, b): [] for t in counts for b in (False, True)}
    for _ in range(repeats):
        for busy in (False, True):
            stop = mp.Event()
            hog = mp.Process(target=_busy_core, args=(stop,), daemon=True) if busy else None
            if hog is not None:
                hog.start()
            try:
                for t in counts:
                    rates[(t, busy)].append(_step_rate(env, t, seconds))
            finally:
                stop.set()
                if hog is not None:
                    hog.join()
    env.close()
    rows = [{"threads": t, "quiet": statistics.median(rates[(t, False)]), "busy": statistics.median(rates[(t, True)])}
            for t in counts]
    print(f"rlhf-zoo bench threads — {env_id}, {num_envs} rows, env.step calls/s (median of {repeats}), "
          f"{platform.machine()}, {mp.cpu_count()} cores, torch default {default} threads, {date.today()}")
    print("| torch threads | as the machine is | with one more core busy |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['quiet']:.1f} | {r['busy']:.1f} |")
    return rows


# ---------------------------------------------------------------------------------------------- SB3


#: the SB3 keyword arguments of the zoo's sb3-ppo settings (zoo/hyperparams/sb3-ppo.yml)
SB3_KEYS = ("n_steps", "batch_size", "n_epochs", "learning_rate", "gamma", "gae_lambda", "ent_coef")


def sb3_ppo_settings(env_id: str) -> dict:
    """``stable_baselines3.PPO`` keywords that finish and learn on the micro world, from the zoo's
    ``sb3-ppo`` hyperparameters for ``env_id`` (SB3's defaults, n_steps=2048 with a 10-epoch update,
    take many minutes before the first update on a CPU)."""
    from rlhfgym.zoo.train import load_hyperparams

    hp = load_hyperparams("sb3-ppo", env_id)
    return {key: hp[key] for key in SB3_KEYS}


def _sb3_rollout_steps_per_s(model, venv, steps: int, cached: bool) -> float:
    """Env steps per second of SB3's rollout loop (policy forward without gradients, then ``step``)."""
    extractor = model.policy.features_extractor
    extractor.use_cache = cached
    model.policy.set_training_mode(False)
    obs = venv.reset()
    with torch.no_grad():
        for _ in range(4):  # warm-up
            actions, _, _ = model.policy(model.policy.obs_to_tensor(obs)[0])
            obs, *_ = venv.step(actions.numpy())
        t0 = time.perf_counter()
        for _ in range(steps):
            actions, _, _ = model.policy(model.policy.obs_to_tensor(obs)[0])
            obs, *_ = venv.step(actions.numpy())
    extractor.use_cache = True
    return steps * venv.num_envs / (time.perf_counter() - t0)


def _gold(env, policy_lm, n: int = 200, seed: int = 0) -> float:
    """Mean gold of one sample per test prompt from ``policy_lm`` (the shared KV-cached sampler)."""
    from rlhfgym.agents.policy import CausalLMPolicy

    pol = CausalLMPolicy.from_env(env, model=policy_lm)
    prompts = env.prompts("test", n)
    torch.manual_seed(seed)
    return float(sum(env.gold(prompts, pol.sample(prompts).texts)) / n)


def bench_sb3(env_id: str = "RLHF-Summarize-Gold-v0", num_envs: int = 16, steps: int = 64, repeats: int = 3,
              minutes: float = 0.0) -> dict:
    """Print (and return) SB3 PPO's rollout throughput with :class:`LMActorCriticPolicy`'s KV cache and
    without (the full forward over the window every step), interleaved, median of ``repeats``; with
    ``minutes`` > 0, also SB3 PPO (:func:`sb3_ppo_settings`) trained for that long and its test gold
    before and after, next to rlhf-gym's PPO trained for the same wall time."""
    import statistics

    import stable_baselines3 as sb3

    import rlhfgym.envs  # noqa: F401  (registers the ids)
    from rlhfgym.agents.sb3_policy import LMActorCriticPolicy
    from rlhfgym.envs.sb3 import make_sb3_vec_env

    venv = make_sb3_vec_env(env_id, num_envs=num_envs, seed=0)
    model = sb3.PPO(LMActorCriticPolicy, venv, seed=0, **sb3_ppo_settings(env_id))
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for cached in (False, True):
            rates[cached].append(_sb3_rollout_steps_per_s(model, venv, steps, cached))
    result = {"cached": statistics.median(rates[True]), "uncached": statistics.median(rates[False])}
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"rlhf-zoo bench sb3 — {env_id}, {num_envs} envs, SB3 {sb3.__version__}, {machine}, {date.today()}")
    print("| SB3 rollout | env steps/s (median of %d) |\n|---|---|" % repeats)
    print(f"| full forward over the window each step | {result['uncached']:.0f} |")
    print(f"| KV-cached (LMActorCriticPolicy default) | {result['cached']:.0f} |")
    print(f"| ratio | {result['cached'] / result['uncached']:.1f}x |")
    if minutes > 0:
        result["training"] = _race_ppo(env_id, venv, model, minutes)
    return result


def _race_ppo(env_id: str, venv, model, minutes: float) -> list[dict]:
    """SB3 PPO and rlhf-gym's PPO, each trained for ``minutes`` of wall time: test gold before and after."""
    import gymnasium as gym
    from stable_baselines3.common.callbacks import BaseCallback

    from rlhfgym.agents import make

    deadline_s = minutes * 60

    class Deadline(BaseCallback):
        def _on_training_start(self) -> None:
            self.t0 = time.perf_counter()

        def _on_step(self) -> bool:
            return time.perf_counter() - self.t0 < deadline_s

    before = _gold(venv, model.policy.features_extractor.lm)
    t0 = time.perf_counter()
    model.learn(total_timesteps=10**9, callback=Deadline())
    sb3_s = time.perf_counter() - t0
    rows = [{"agent": "SB3 PPO (LMActorCriticPolicy)", "seconds": sb3_s, "env_steps": int(model.num_timesteps),
             "gold_before": before, "gold_after": _gold(venv, model.policy.features_extractor.lm)}]

    from rlhfgym.zoo.train import load_hyperparams

    hp = load_hyperparams("ppo", env_id)  # the zoo's settings for this env, less what train() takes per run
    for key in ("budget", "env_kwargs", "checkpoint_every", "checkpoint_seconds"):
        hp.pop(key, None)
    env = gym.make(env_id)
    ppo = make("ppo", seed=0, **hp)
    t0 = time.perf_counter()
    ppo.learn(env, 10**9, lambda agent, metrics: time.perf_counter() - t0 < deadline_s)
    rows.append({"agent": "rlhf-gym PPO", "seconds": time.perf_counter() - t0, "env_steps": None,
                 "completions": ppo.spent, "gold_before": before, "gold_after": _gold(env.unwrapped, ppo.policy.model)})
    print(f"\n| {minutes:g} min of training | wall s | test gold before | after | gain per minute |\n|---|---|---|---|---|")
    for r in rows:
        gain = (r["gold_after"] - r["gold_before"]) / (r["seconds"] / 60)
        print(f"| {r['agent']} | {r['seconds']:.0f} | {r['gold_before']:.3f} | {r['gold_after']:.3f} | {gain:+.3f} |")
    return rows


if __name__ == "__main__":  # one isolated measurement of bench_env (measure_in_fresh_process)
    import json
    import sys

    print(json.dumps(_measure_spec(json.loads(sys.argv[1]))))
