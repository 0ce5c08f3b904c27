"""``rlhf-zoo bench trl``: rlhf-gym's trainers raced against TRL's on identical work.

Each *pair* trains the same thing twice, once with rlhf-gym's public API and once with TRL:

=========  ============================================  ==================================================
pair       rlhf-gym                                      TRL
=========  ============================================  ==================================================
rloo       ``agents.make("rloo").learn(env, budget)``    ``trl.RLOOTrainer``
dpo        ``agents.make("dpo").learn(env, budget,       ``trl.DPOTrainer`` (``precompute_ref_log_probs``:
           dataset=pairs)`` (offline)                    both sides compute the reference once)
reward     ``envs.feedback.training.train_reward_model`` ``trl.RewardTrainer``
ppo        ``agents.make("ppo").learn(env, budget)``     ``trl.experimental.ppo.PPOTrainer`` (trl 1.12.0,
                                                         the last TRL that ships it: ``--trl-ppo-python``)
=========  ============================================  ==================================================

*Identical work*: both sides start from the shipped SFT policy (``env.unwrapped.reference_model``)
and its tokenizer, read the env's task prompts (RLOO/PPO: the prompts rlhf-gym's sampler draws,
``stream_prompts``, handed to TRL as its dataset), are rewarded by the shipped reward model
(``env.unwrapped.score(prompts, completions)``, TRL's reward function; for TRL's PPO, which only
takes a reward *model*, its ``get_reward`` is routed to the same ``score``), and share batch sizes,
completion length, learning rate and schedule, Adam's epsilon, gradient clipping, beta,
temperature, precision (``dtype``: float32, TRL's ``bf16=False``; or bfloat16 autocast on float32
weights, TRL's ``bf16=True`` and rlhf-gym's ``precision="bfloat16"``), ``gradient_checkpointing=False``,
the device (``use_cpu`` on the CPU), torch threads and the number of optimizer updates (:func:`side_settings`
writes both sides' arguments from one :class:`Settings`, and the tests check they agree).
DPO and the reward model train on the same preference pairs, built once per benchmark
(``make_preference_pairs``: two SFT samples per prompt, labelled by the gold labelers).

*Protocol*: one process (this one) runs the sides in fresh subprocesses, interleaved
(ours, TRL, ours, TRL, ...) ``repeats`` times. A side (``python -m rlhfgym.zoo.bench_trl
--child SIDE PAIR SETTINGS OUT``) loads the env, times the training call from the moment its
trainer is constructed (model and data in memory; TRL's tokenisation and reference precompute
happen in its constructor, ours inside ``learn``) to the end of training, saves the final model
under ``OUT/model`` and writes ``OUT/result.json`` (:func:`write_result`). The parent then scores
every final model with one evaluator: :func:`rlhfgym.envs.evaluation.evaluate_samples` on the
first ``eval_prompts`` test prompts (seeded, the sampler of ``rlhf-zoo eval``), giving mean gold and
reward-model score of the policy; for the reward pair, the held-out accuracy and gold agreement of
the trained reward model (:func:`~rlhfgym.envs.feedback.reward_model.evaluate_reward_model`).

Reported per side: seconds per optimizer update of every run (training time / updates), their
median, the steady-state step (median step after the first), peak RSS of the side's process, and
the evaluator's numbers; the ratio is TRL's median time over ours (> 1: rlhf-gym is faster).
Results go to ``OUT/bench-trl.md`` and ``OUT/bench-trl.json`` (written atomically).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PAIRS = ("rloo", "dpo", "reward", "ppo")
SIDES = ("ours", "trl")
RESULT_FILE = "result.json"
RESULT_KEYS = ("side", "pair", "updates", "train_s", "step_ends", "peak_rss_mb", "versions")
DEFAULT_OUT = "docs/results/bench-trl"


class BenchError(ValueError):
    """A problem with the benchmark's arguments or one of its subprocesses (reported as one line)."""


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """What both sides of a pair share. ``batch_size`` counts completions for rloo/ppo (TRL's RLOO
    batch counts completions too) and preference pairs for dpo/reward; ``updates`` is the number of
    optimizer steps each side takes (ppo: rollouts, each ``ppo_epochs * batch_size / mini_batch_size``
    steps)."""

    pair: str
    updates: int
    batch_size: int
    learning_rate: float
    beta: float = 0.05
    rloo_k: int = 4
    mini_batch_size: int = 16
    ppo_epochs: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0
    threads: int = 1
    dtype: str = "float32"
    env_id: str = "RLHF-Summarize-v0"
    eval_prompts: int = 200
    eval_pairs: int = 200
    device: str = "cpu"
    policy: str = "sft"  # "sft": the env's SFT model; else a model directory (build_policy) both sides start from

    def __post_init__(self) -> None:
        if self.pair not in PAIRS:
            raise BenchError(f"unknown pair {self.pair!r}; use one of {', '.join(PAIRS)} or all.")
        for name in ("updates", "batch_size", "rloo_k", "mini_batch_size", "ppo_epochs", "max_new_tokens", "threads",
                     "eval_prompts", "eval_pairs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BenchError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.pair == "rloo" and (self.rloo_k < 2 or self.batch_size % self.rloo_k):
            raise BenchError(f"rloo: batch_size ({self.batch_size}) must be a multiple of rloo_k ({self.rloo_k}) >= 2.")
        if self.pair == "ppo" and self.batch_size % self.mini_batch_size:
            raise BenchError(f"ppo: batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                             f"({self.mini_batch_size}).")
        from rlhfgym.envs.hf import PRECISIONS

        if self.dtype not in PRECISIONS:
            raise BenchError(f"unknown dtype {self.dtype!r}; use {' or '.join(PRECISIONS)} (bfloat16: autocast on "
                             "float32 weights, TRL's bf16=True).")
        if self.device != "cpu" and not (self.device == "cuda" or self.device.startswith("cuda:")):
            raise BenchError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N.")
        if self.policy != "sft" and not (Path(self.policy) / "config.json").is_file():
            raise BenchError(f"policy {self.policy!r} is neither 'sft' nor a model directory; make one with "
                             "`rlhf-zoo bench policy NAME --out DIR`.")

    @property
    def budget(self) -> int:
        """Completions rlhf-gym's agent is given: rloo/ppo sample them, dpo pays 2 per pair."""
        return self.updates * self.batch_size * (2 if self.pair == "dpo" else 1)

    @property
    def optimizer_steps(self) -> int:
        if self.pair == "ppo":
            return self.updates * self.ppo_epochs * (self.batch_size // self.mini_batch_size)
        return self.updates


#: small budgets: each run takes about a minute on one loaded CPU core
DEFAULTS: dict[str, dict[str, Any]] = {
    "rloo": {"updates": 16, "batch_size": 32, "learning_rate": 1e-4, "beta": 0.05, "rloo_k": 4},
    "dpo": {"updates": 32, "batch_size": 16, "learning_rate": 5e-5, "beta": 0.1},
    "reward": {"updates": 32, "batch_size": 16, "learning_rate": 1e-4},
    "ppo": {"updates": 6, "batch_size": 64, "mini_batch_size": 16, "ppo_epochs": 4, "learning_rate": 1e-4, "beta": 0.05},
}


def default_settings(pair: str, **overrides: Any) -> Settings:
    if pair not in DEFAULTS:
        raise BenchError(f"unknown pair {pair!r}; use one of {', '.join(PAIRS)} or all.")
    return Settings(pair=pair, **{**DEFAULTS[pair], **{k: v for k, v in overrides.items() if v is not None}})


def side_settings(s: Settings) -> dict[str, dict[str, Any]]:
    """The arguments each side is given, from one :class:`Settings`: ``ours`` (the agent's
    hyperparameters, or ``train_reward_model``'s keywords) and ``trl`` (the TRL config's fields)."""
    trl_common = {
        "learning_rate": s.learning_rate, "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": s.seed,
        "bf16": s.dtype == "bfloat16", "fp16": False, "gradient_checkpointing": False, "use_cpu": s.device == "cpu", "report_to": "none",
        "save_strategy": "no", "logging_steps": 1, "dataloader_num_workers": 0, "disable_dropout": True,
    }
    if s.pair == "rloo":
        ours = {"learning_rate": s.learning_rate, "batch_size": s.batch_size, "rloo_k": s.rloo_k, "kl_coef": s.beta,
                "temperature": s.temperature, "max_grad_norm": 1.0, "normalize_advantages": False,
                "missing_eos_penalty": None}
        trl = {**trl_common, "per_device_train_batch_size": s.batch_size, "num_generations": s.rloo_k,
               "max_completion_length": s.max_new_tokens, "beta": s.beta, "temperature": s.temperature, "top_k": 0,
               "top_p": 1.0, "max_steps": s.updates, "lr_scheduler_type": "constant", "adam_epsilon": 1e-5,
               "num_iterations": 1, "normalize_advantages": False}
    elif s.pair == "dpo":
        ours = {"learning_rate": s.learning_rate, "batch_size": s.batch_size, "beta": s.beta, "epochs": 1,
                "loss_type": "sigmoid", "label_smoothing": 0.0, "max_grad_norm": 1.0}
        trl = {**trl_common, "per_device_train_batch_size": s.batch_size, "beta": s.beta, "num_train_epochs": 1,
               "loss_type": ["sigmoid"], "label_smoothing": 0.0, "lr_scheduler_type": "constant", "adam_epsilon": 1e-8,
               "precompute_ref_log_probs": True}
    elif s.pair == "reward":
        ours = {"lr": s.learning_rate, "batch_size": s.batch_size, "epochs": 1, "seed": s.seed, "max_grad_norm": 1.0,
                "weight_decay": 0.0}
        trl = {**trl_common, "per_device_train_batch_size": s.batch_size, "num_train_epochs": 1,
               "lr_scheduler_type": "linear", "warmup_steps": 0, "adam_epsilon": 1e-8, "center_rewards_coefficient": None}
    else:  # ppo
        ours = {"learning_rate": s.learning_rate, "batch_size": s.batch_size, "mini_batch_size": s.mini_batch_size,
                "ppo_epochs": s.ppo_epochs, "kl_coef": s.beta, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
                "gamma": 1.0, "lam": 0.95, "whiten_advantages": True, "temperature": s.temperature,
                "max_grad_norm": 1.0, "missing_eos_penalty": None, "value_warmup_steps": 0, "kl_controller": "fixed"}
        # trl 1.12: rollout = per_device_train_batch_size * gradient_accumulation_steps, minibatch = rollout /
        # num_mini_batches, one optimizer step per minibatch (its micro-batch loop slices the minibatch, so a
        # per-device batch of the whole rollout means no accumulation; gradient_accumulation_steps > 1 would make
        # accelerate skip the optimizer step of all but every k-th minibatch)
        trl = {**trl_common, "per_device_train_batch_size": s.batch_size, "gradient_accumulation_steps": 1,
               "num_mini_batches": s.batch_size // s.mini_batch_size, "num_ppo_epochs": s.ppo_epochs,
               "total_episodes": s.updates * s.batch_size, "response_length": s.max_new_tokens, "kl_coef": s.beta,
               "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95,
               "whiten_rewards": False, "temperature": s.temperature, "missing_eos_penalty": None,
               "local_rollout_forward_batch_size": s.batch_size, "lr_scheduler_type": "constant", "adam_epsilon": 1e-8,
               "kl_estimator": "k1", "num_sample_generations": 0}
        trl.pop("disable_dropout")  # trl 1.12's PPOConfig has no such field (its trainer disables dropout itself)
        trl.pop("logging_steps")
    ours["precision"] = s.dtype  # every pair's agent (or train_reward_model) takes it; TRL's is bf16 above
    return {"ours": ours, "trl": trl}


def shared_view(s: Settings) -> dict[str, dict[str, Any]]:
    """The settings both sides must agree on, as each side's arguments spell them (the tests compare
    the two columns): learning rate, batch, KL coefficient, length, temperature, optimizer steps, precision."""
    a = side_settings(s)
    o, t = a["ours"], a["trl"]
    if s.pair == "rloo":
        ours = {"lr": o["learning_rate"], "completions_per_update": o["batch_size"], "k": o["rloo_k"], "beta": o["kl_coef"],
                "temperature": o["temperature"], "clip": o["max_grad_norm"], "updates": s.budget // o["batch_size"],
                "max_new_tokens": s.max_new_tokens, "normalize": o["normalize_advantages"]}
        trl = {"lr": t["learning_rate"], "completions_per_update": t["per_device_train_batch_size"],
               "k": t["num_generations"], "beta": t["beta"], "temperature": t["temperature"], "clip": t["max_grad_norm"],
               "updates": t["max_steps"], "max_new_tokens": t["max_completion_length"],
               "normalize": t["normalize_advantages"]}
    elif s.pair == "dpo":
        n_pairs = s.updates * s.batch_size
        ours = {"lr": o["learning_rate"], "pairs_per_update": o["batch_size"], "beta": o["beta"], "clip": o["max_grad_norm"],
                "updates": (s.budget // 2) // o["batch_size"] * o["epochs"], "loss": o["loss_type"]}
        trl = {"lr": t["learning_rate"], "pairs_per_update": t["per_device_train_batch_size"], "beta": t["beta"],
               "clip": t["max_grad_norm"], "updates": n_pairs // t["per_device_train_batch_size"] * t["num_train_epochs"],
               "loss": t["loss_type"][0]}
    elif s.pair == "reward":
        n_pairs = s.updates * s.batch_size
        ours = {"lr": o["lr"], "pairs_per_update": o["batch_size"], "clip": o["max_grad_norm"],
                "updates": n_pairs // o["batch_size"] * o["epochs"], "weight_decay": o["weight_decay"]}
        trl = {"lr": t["learning_rate"], "pairs_per_update": t["per_device_train_batch_size"], "clip": t["max_grad_norm"],
               "updates": n_pairs // t["per_device_train_batch_size"] * t["num_train_epochs"],
               "weight_decay": t["weight_decay"]}
    else:
        ours = {"lr": o["learning_rate"], "rollout": o["batch_size"], "minibatch": o["mini_batch_size"],
                "epochs": o["ppo_epochs"], "beta": o["kl_coef"], "temperature": o["temperature"],
                "rollouts": s.budget // o["batch_size"], "vf_coef": o["vf_coef"], "gamma": o["gamma"], "lam": o["lam"]}
        trl = {"lr": t["learning_rate"],
               "rollout": t["per_device_train_batch_size"] * t["gradient_accumulation_steps"],
               "minibatch": t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] // t["num_mini_batches"],
               "epochs": t["num_ppo_epochs"], "beta": t["kl_coef"], "temperature": t["temperature"],
               "rollouts": t["total_episodes"] // (t["per_device_train_batch_size"] * t["gradient_accumulation_steps"]),
               "vf_coef": t["vf_coef"], "gamma": t["gamma"], "lam": t["lam"]}
    ours["precision"] = o["precision"]
    trl["precision"] = "bfloat16" if t["bf16"] else "float32"  # fp16 is never set
    return {"ours": ours, "trl": trl}


# ---------------------------------------------------------------------------------------------- the sides (children)


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, which starts afresh at ``exec``; ``getrusage``'s
    ``ru_maxrss`` would not do, as it keeps the parent's peak across fork + exec (a side started by
    a parent that holds the env reported the parent's RSS). Elsewhere ``ru_maxrss`` (KiB on Linux,
    bytes on macOS).
    """
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _side_versions(side: str) -> dict[str, str]:
    import torch
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if side == "trl":
        import trl

        v["trl"] = trl.__version__
    else:
        from importlib import metadata

        v["rlhf-gym"] = metadata.version("rlhf-gym")
    return v


def _load_env(s: Settings):
    import gymnasium as gym
    import torch

    import rlhfgym.envs  # noqa: F401  (registers the ids)

    torch.set_num_threads(s.threads)
    reference = {} if s.policy == "sft" else {"reference": s.policy}
    env = gym.make(s.env_id, kl_coef=s.beta, max_new_tokens=s.max_new_tokens, device=s.device, **reference)
    return env, env.unwrapped


#: policies made locally from a config for GPU runs (no download): Llama decoders over the micro world's
#: tokenizer, randomly initialised, so they time the work of a model of that size (their gold means nothing)
POLICY_PRESETS: dict[str, dict[str, int]] = {
    "llama-113m": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "llama-403m": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
    "llama-tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
}


def build_policy(name: str, out: str | os.PathLike, seed: int = 0, env_id: str = "RLHF-Summarize-v0") -> Path:
    """Save the preset ``name`` of :data:`POLICY_PRESETS` (with the env's tokenizer) to ``out``:
    the ``policy`` of a :class:`Settings`, or ``rlhf-zoo bench env --reference``. Returns ``out``."""
    if name not in POLICY_PRESETS:
        raise BenchError(f"unknown policy preset {name!r}; use one of {', '.join(POLICY_PRESETS)}.")
    import gymnasium as gym
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import rlhfgym.envs  # noqa: F401  (registers the ids)
    from rlhfgym.envs.assets import atomic_save_dir

    tok = gym.make(env_id).unwrapped.tokenizer
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **POLICY_PRESETS[name])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_save_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"[bench] {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {out}", flush=True)
    return Path(out)


def _sft_copy(core):
    import copy

    return copy.deepcopy(core.reference_model).float()


def rl_prompts(core, s: Settings) -> list[str]:
    """The training prompts of an RL pair, in the order rlhf-gym's agents draw them: ``batch_size /
    rloo_k`` (rloo) or ``batch_size`` (ppo) prompts per update from ``stream_prompts`` at the
    completions spent so far (TRL shuffles its dataset, so it sees the same prompts in another order)."""
    from rlhfgym.agents.common import stream_prompts

    per = s.batch_size // s.rloo_k if s.pair == "rloo" else s.batch_size
    out: list[str] = []
    for u in range(s.updates):
        out.extend(stream_prompts(core, per, seed=s.seed, position=u * s.batch_size))
    return out


class _Clock:
    """Wall-clock times of the end of every optimizer update (``tick``), from ``start``."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.ends: list[float] = []

    def tick(self, *_: Any, **__: Any) -> bool:
        self.ends.append(time.perf_counter() - self.t0)
        return True


def _trl_clock_callback(clock: _Clock):
    from transformers import TrainerCallback

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return Tick()


def _run_ours(s: Settings, data_dir: Path, out: Path) -> tuple[float, list[float], dict[str, float]]:
    """Train our side; returns the training seconds, the clock's ticks and extra timings (the reward
    model's centring pass, which TRL's ``RewardTrainer`` does not do, is timed apart)."""
    from rlhfgym.agents import make

    env, core = _load_env(s)
    kw = side_settings(s)["ours"]
    extra: dict[str, float] = {}
    if s.pair in ("rloo", "ppo"):
        agent = make(s.pair, seed=s.seed, device=s.device, **kw)
        clock = _Clock()
        agent.learn(env, s.budget, clock.tick, progress_bar=False)
        train_s = time.perf_counter() - clock.t0
        agent.policy.model.save_pretrained(out / "model")
    elif s.pair == "dpo":
        import datasets

        pairs = datasets.load_from_disk(str(data_dir / "train_pairs"))
        agent = make("dpo", seed=s.seed, device=s.device, **kw)
        clock = _Clock()
        agent.learn(env, s.budget, clock.tick, dataset=pairs, progress_bar=False)
        train_s = time.perf_counter() - clock.t0
        agent.policy.model.save_pretrained(out / "model")
    else:
        import datasets

        from rlhfgym.envs.feedback.training import train_reward_model

        pairs = datasets.load_from_disk(str(data_dir / "train_pairs"))
        backbone = _sft_copy(core)
        clock = _Clock()
        rm = train_reward_model(backbone, core.tokenizer, pairs, None, device=s.device, progress=False, normalise=False, **kw)
        train_s = time.perf_counter() - clock.t0
        clock.ends = []  # train_reward_model reports no per-step times
        t0 = time.perf_counter()  # what train_reward_model does by default after training
        rm.normalise(list(pairs["prompt"]) * 2, list(pairs["chosen"]) + list(pairs["rejected"]))
        extra["centring_s"] = time.perf_counter() - t0
        rm.model.save_pretrained(out / "model")
    env.close()
    return train_s, clock.ends, extra


def installed_trl_names(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with each field under the name the installed ``TrainingArguments`` reads. transformers
    renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name warns and is a
    fallback that TRL's configs set to True), so where the new name exists ours goes there."""
    import dataclasses

    from transformers import TrainingArguments

    if "gradient_checkpointing" in kw and "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        kw = dict(kw)
        kw["activation_checkpointing"] = kw.pop("gradient_checkpointing")
    return kw


def _run_trl(s: Settings, data_dir: Path, out: Path) -> tuple[float, list[float], dict[str, float]]:
    import datasets

    env, core = _load_env(s)
    tok = core.tokenizer
    kw = installed_trl_names(side_settings(s)["trl"])
    scratch = tempfile.mkdtemp(prefix=f"bench-trl-{s.pair}-")
    if s.pair == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        ds = datasets.Dataset.from_dict({"prompt": rl_prompts(core, s)})

        def reward_model(prompts, completions, **_):  # the shipped reward model, as TRL's reward function
            return core.score(list(prompts), list(completions)).tolist()

        model = _sft_copy(core)
        clock = _Clock()
        trainer = RLOOTrainer(model=model, reward_funcs=reward_model, args=RLOOConfig(output_dir=scratch, **kw),
                              train_dataset=ds, processing_class=tok, callbacks=[_trl_clock_callback(clock)])
    elif s.pair == "dpo":
        from trl import DPOConfig, DPOTrainer

        pairs = datasets.load_from_disk(str(data_dir / "train_pairs")).select_columns(["prompt", "chosen", "rejected"])
        # TRL tokenizes prompt + completion as one string; rlhf-gym's texts join them with a space (the token
        # ids are then exactly the ones rlhf-gym's DPO trains on: prompt, completion, EOS)
        pairs = pairs.map(lambda r: {"chosen": " " + r["chosen"], "rejected": " " + r["rejected"]})
        model = _sft_copy(core)
        clock = _Clock()
        trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=scratch, **kw), train_dataset=pairs,
                             processing_class=tok, callbacks=[_trl_clock_callback(clock)])
    elif s.pair == "reward":
        from trl import RewardConfig, RewardTrainer

        from rlhfgym.envs.feedback.reward_model import RewardModel, load_scalar_model, seed_everything

        pairs = datasets.load_from_disk(str(data_dir / "train_pairs"))
        seed_everything(s.seed)  # the scalar head initialised as train_reward_model initialises it
        model = load_scalar_model(_sft_copy(core), tok)
        enc = RewardModel(model, tok).encode  # the token ids rlhf-gym's reward model reads (prompt, completion, EOS)
        ds = datasets.Dataset.from_dict({"chosen_ids": enc(pairs["prompt"], pairs["chosen"]),
                                         "rejected_ids": enc(pairs["prompt"], pairs["rejected"])})
        clock = _Clock()
        trainer = RewardTrainer(model=model, args=RewardConfig(output_dir=scratch, **kw), train_dataset=ds,
                                processing_class=tok, callbacks=[_trl_clock_callback(clock)])
    else:
        trainer, clock = _trl_ppo_trainer(s, core, kw, scratch)
    trainer.train()
    train_s = time.perf_counter() - clock.t0
    model = trainer.model
    if s.pair == "ppo":
        model = trainer.accelerator.unwrap_model(trainer.model).policy
    model.save_pretrained(out / "model")
    env.close()
    return train_s, clock.ends, {}


def _trl_ppo_trainer(s: Settings, core, kw: dict[str, Any], scratch: str):
    """TRL 1.12's ``PPOTrainer`` on the shipped SFT policy, rewarded by ``core.score``.

    TRL's PPO takes a reward *model* and calls ``get_reward(reward_model, query_response, pad_id,
    context_length)``; that module-level function is replaced here by one that, for the reward model
    (and only for it; the value model keeps TRL's own), decodes the prompt and the post-processed
    response exactly as rlhf-gym decodes a completion and returns ``core.score(prompts, texts)``.
    The value model is TRL's usual separate one: a sequence-classification copy of the SFT model.
    """
    import copy

    import datasets
    import torch
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    from rlhfgym.envs.feedback.reward_model import load_scalar_model, seed_everything
    from rlhfgym.envs.lm import decode_completions, encode_prompts

    tok = copy.deepcopy(core.tokenizer)
    tok.padding_side = "left"  # TRL's PPO pads the prompts with the tokenizer's collator and generates after them
    prompts = rl_prompts(core, s)
    ids = [row[-96:] for row in encode_prompts(tok, prompts)]
    by_ids = {tuple(r): p for r, p in zip(ids, prompts)}
    ds = datasets.Dataset.from_dict({"input_ids": ids})
    # the shipped RM's network (BTReward.rm.model), handed to TRL so it can move it; scoring goes through core.score
    reward_module = core.reward_model.rm.model
    original = ppo_module.get_reward

    def get_reward(model, query_responses, pad_token_id, context_length):
        if model is not reward_module:
            return original(model, query_responses, pad_token_id, context_length)
        q = query_responses[:, :context_length].tolist()
        r = query_responses[:, context_length:].tolist()
        ps = [by_ids[tuple(t for t in row if t != pad_token_id)] for row in q]
        texts = decode_completions(tok, [[t for t in row if t != pad_token_id] for row in r])
        score = core.score(ps, texts).to(query_responses.device).float()
        return None, score, None

    ppo_module.get_reward = get_reward
    seed_everything(s.seed)
    value_model = load_scalar_model(_sft_copy(core), tok)
    policy, ref = _sft_copy(core), _sft_copy(core)
    for m in (policy, ref):
        m.generation_config.eos_token_id = tok.eos_token_id
        m.generation_config.pad_token_id = tok.pad_token_id
    clock = _Clock()
    trainer = PPOTrainer(args=PPOConfig(output_dir=scratch, stop_token="eos", **kw), processing_class=tok, model=policy,
                         ref_model=ref, reward_model=reward_module, value_model=value_model, train_dataset=ds,
                         callbacks=[_trl_clock_callback(clock)])
    torch.manual_seed(s.seed)
    return trainer, clock


def write_result(out: Path, record: dict[str, Any]) -> Path:
    """``OUT/result.json`` of a side, written atomically (the parent never reads half a file)."""
    missing = [k for k in RESULT_KEYS if k not in record]
    if missing:
        raise BenchError(f"a side's result lacks {missing}.")
    return _atomic_write(out / RESULT_FILE, json.dumps(record, indent=2) + "\n")


def run_child(side: str, pair: str, settings_file: str, out: str) -> None:
    """One side of one run (``python -m rlhfgym.zoo.bench_trl --child ...``): train, save, report."""
    if side not in SIDES:
        raise BenchError(f"unknown side {side!r}; use one of {', '.join(SIDES)}.")
    s = Settings(**json.loads(Path(settings_file).read_text()))
    if s.pair != pair:
        raise BenchError(f"settings are for pair {s.pair!r}, asked to run {pair!r}.")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(settings_file).parent
    t0 = time.perf_counter()
    train_s, ends, extra = (_run_ours if side == "ours" else _run_trl)(s, data_dir, out_dir)
    # PPO's clocks tick once a rollout (ppo_epochs * batch / minibatch optimizer steps); the others once a step
    write_result(out_dir, {"side": side, "pair": pair, "updates": s.optimizer_steps, "train_s": train_s,
                           "step_ends": ends, "steps_per_tick": s.optimizer_steps / len(ends) if ends else None, "process_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                           "versions": _side_versions(side), "model_dir": str(out_dir / "model"), **extra})


# ---------------------------------------------------------------------------------------------- the parent


def _atomic_write(path: Path, text: str) -> Path:
    from rlhfgym.envs.assets import atomic_write_text  # the project's one atomic write (fsynced, mode kept)

    return atomic_write_text(path, text)


def child_command(python: str, side: str, pair: str, settings_file: Path, out: Path) -> list[str]:
    return [python, "-m", "rlhfgym.zoo.bench_trl", "--child", side, pair, str(settings_file), str(out)]


def run_side(cmd: list[str], out: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run one side in a fresh subprocess and read its ``result.json``.

    The child's output streams through (its progress); a non-zero exit, a timeout or a missing or
    incomplete result is a :class:`BenchError` that quotes the command.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout:.0f} s: {shlex.join(cmd)}") from e
    if proc.returncode != 0:
        raise BenchError(f"exit status {proc.returncode}: {shlex.join(cmd)}")
    try:
        record = json.loads((out / RESULT_FILE).read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"no readable {RESULT_FILE} from {shlex.join(cmd)}: {e}") from e
    missing = [k for k in RESULT_KEYS if k not in record]
    if missing:
        raise BenchError(f"{RESULT_FILE} of {shlex.join(cmd)} lacks {missing}.")
    return record


def python_versions(python: str) -> dict[str, str]:
    """Versions of torch / transformers / trl in another interpreter (raises if trl is missing)."""
    code = ("import json, platform, torch, transformers, trl; print(json.dumps({'python': platform.python_version(), "
            "'torch': torch.__version__, 'transformers': transformers.__version__, 'trl': trl.__version__}))")
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"cannot run {python}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise BenchError(f"{python} cannot import trl ({tail}); install the bench extra there: pip install 'rlhf-gym[bench]'.")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_data(s: Settings, data_dir: Path) -> Path:
    """Write the settings (and, for dpo/reward, the shared preference pairs) to ``data_dir``; returns
    the settings file the children read."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if s.pair in ("dpo", "reward"):
        from rlhfgym.agents.dpo import make_preference_pairs

        _, core = _load_env(s)
        n = s.updates * s.batch_size
        print(f"[bench trl] {s.pair}: building {n} training pairs and {s.eval_pairs} test pairs (SFT samples, gold labelers)",
              flush=True)
        make_preference_pairs(core, n, "train", seed=s.seed).save_to_disk(str(data_dir / "train_pairs"))
        make_preference_pairs(core, s.eval_pairs, "test", seed=s.seed + 1).save_to_disk(str(data_dir / "test_pairs"))
    return _atomic_write(data_dir / "settings.json", json.dumps(asdict(s)) + "\n")


def evaluate_model(s: Settings, model_dir: str, data_dir: Path) -> dict[str, float]:
    """The one evaluator both sides' final models go through (see the module docstring)."""
    import torch

    _, core = _load_env(s)
    if s.pair == "reward":
        import datasets

        from rlhfgym.envs.feedback.reward_model import RewardModel, evaluate_reward_model, load_scalar_model

        rm = RewardModel(load_scalar_model(model_dir, core.tokenizer), core.tokenizer, device=s.device)
        ev = evaluate_reward_model(rm, datasets.load_from_disk(str(data_dir / "test_pairs")), gold=core.gold)
        return {k: float(v) for k, v in ev.items() if isinstance(v, (int, float))}
    from transformers import AutoModelForCausalLM

    from rlhfgym.envs.evaluation import evaluate_samples, lm_sampler

    model = core.reference_model if model_dir == "sft" else AutoModelForCausalLM.from_pretrained(model_dir).float()
    model.to(core.device).eval()
    inner = getattr(core, "core", core)
    sample = lm_sampler(model, core.tokenizer, max_new_tokens=s.max_new_tokens,
                        max_prompt_tokens=getattr(inner, "max_prompt_tokens", 96))
    with torch.no_grad():
        ev = evaluate_samples(sample, core.prompts("test", s.eval_prompts), core.gold, reward=core.score,
                              temperature=s.temperature, seed=0)
    return {"gold": ev["gold"], "rm": ev["reward"]}


def steady_step_s(step_ends: list[float]) -> float | None:
    """Median time between clock ticks after the first (None with fewer than 2 ticks): the steady-state
    update, without the first one's setup (e.g. DPO's reference log-probs)."""
    if len(step_ends) < 2:
        return None
    return statistics.median(b - a for a, b in zip(step_ends, step_ends[1:]))


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per side: every run's seconds per update, their median, steady-state step, peak RSS and the
    evaluator's means; and the ratio (TRL's median over ours)."""
    out: dict[str, Any] = {}
    for side in SIDES:
        rs = [r for r in runs if r["side"] == side]
        if not rs:
            continue
        per = [r["train_s"] / r["updates"] for r in rs]
        steady = [x / (r.get("steps_per_tick") or 1) for r in rs
                  if (x := steady_step_s(r["step_ends"])) is not None]
        evals = [r["eval"] for r in rs if r.get("eval")]
        keys = sorted({k for e in evals for k in e})
        out[side] = {
            "s_per_update": per, "median_s_per_update": statistics.median(per),
            "steady_s_per_update": statistics.median(steady) if steady else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "eval": {k: statistics.mean(e[k] for e in evals if k in e) for k in keys},
        }
        centring = [(r["train_s"] + r["centring_s"]) / r["updates"] for r in rs if "centring_s" in r]
        if centring:
            out[side]["median_s_per_update_with_centring"] = statistics.median(centring)
    if "ours" in out and "trl" in out:
        out["ratio"] = out["trl"]["median_s_per_update"] / out["ours"]["median_s_per_update"]
        if "median_s_per_update_with_centring" in out["ours"]:
            out["ratio_with_centring"] = out["trl"]["median_s_per_update"] / out["ours"]["median_s_per_update_with_centring"]
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "device": device}
    if device != "cpu":
        import torch

        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


PAIR_LABELS = {
    "rloo": ("RLOO", "agents.make('rloo').learn", "trl.RLOOTrainer"),
    "dpo": ("offline DPO", "agents.make('dpo').learn", "trl.DPOTrainer"),
    "reward": ("reward model", "train_reward_model", "trl.RewardTrainer"),
    "ppo": ("PPO", "agents.make('ppo').learn", "trl.experimental.ppo.PPOTrainer"),
    "env": ("env rollout", "gym.make_vec + step()", "generate + ref pass + RM"),
}


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _quality(pair: str, ev: dict[str, float]) -> str:
    if not ev:
        return "-"
    if pair == "reward":
        return f"acc {ev.get('accuracy', float('nan')):.3f}, gold-pair acc {ev.get('gold_pair_accuracy', float('nan')):.3f}"
    return f"gold {ev['gold']:.3f}, RM {ev['rm']:.3f}"


def markdown(report: dict[str, Any]) -> str:
    """The Markdown table of a report (one row per pair; the env pair's numbers are tokens/s)."""
    lines = [f"# rlhf-zoo bench trl — {report['date']}", "",
             f"Machine: {report['machine']['processor']} ({report['machine']['cpu_count']} cores)"
             + (f", {report['machine']['gpu']} ({report['machine']['device']})" if report['machine'].get('gpu') else "")
             + ", "
             f"load average before/after {report['load_average_before']} / {report['load_average_after']}; "
             f"torch threads {report['threads']}.  ",
             f"Command: `{report['command']}`  ",
             f"Policy both sides start from: {report.get('policy', 'sft')}; precision: {report.get('dtype', 'float32')}"
             + (" (autocast on float32 weights; the env's reference and reward model compute in float32)"
                if report.get("dtype", "float32") != "float32" else "") + ".  ",
             "Versions: " + "; ".join(f"{side}: " + ", ".join(f"{k} {v}" for k, v in vs.items())
                                     for side, vs in report["versions"].items()), "",
             "Seconds per optimizer update (training time / updates; median of the runs, each run in brackets), "
             "ratio = TRL / rlhf-gym (> 1: rlhf-gym faster). Quality: one shared evaluator "
             f"({report['eval_prompts']} test prompts, seed 0); SFT policy: {_quality('rloo', report.get('sft', {}))}.", "",
             "| pair | settings | rlhf-gym s/update | TRL s/update | ratio | steady s/update (ours / TRL) | "
             "peak RSS MiB (ours / TRL) | quality rlhf-gym | quality TRL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for pair, res in report["pairs"].items():
        label = PAIR_LABELS[pair][0]
        if pair == "env":
            for r in res["rows"]:
                lines.append(f"| {label} (kl_coef {r['kl_coef']}) | batch {res['batch']}, {res['max_new_tokens']} tokens | "
                             f"{r['env_tokens_per_s']:.0f} tokens/s | {r['usual_tokens_per_s']:.0f} tokens/s | "
                             f"{r['ratio']:.2f} | bare KV-cached decoding {r.get('bare_tokens_per_s', 0):.0f} tokens/s, "
                             f"env/bare {r.get('env_over_bare', float('nan')):.2f} | - | - | - |")
            continue
        if "error" in res:
            lines.append(f"| {label} | {res['settings_line']} | failed: {res['error']} | | | | | | |")
            continue
        sm = res["summary"]
        o, t = sm.get("ours", {}), sm.get("trl", {})
        runs = lambda d: ", ".join(f"{x:.3f}" for x in d.get("s_per_update", []))  # noqa: E731
        lines.append(
            f"| {label} | {res['settings_line']} | {_fmt(o.get('median_s_per_update'))} ({runs(o)}) | "
            f"{_fmt(t.get('median_s_per_update'))} ({runs(t)}) | {_fmt(sm.get('ratio'), 2)} | "
            f"{_fmt(o.get('steady_s_per_update'))} / {_fmt(t.get('steady_s_per_update'))} | "
            f"{_fmt(o.get('peak_rss_mb'), 0)} / {_fmt(t.get('peak_rss_mb'), 0)} | {_quality(pair, o.get('eval', {}))} | "
            f"{_quality(pair, t.get('eval', {}))} |")
    for pair, res in report["pairs"].items():
        sm = res.get("summary", {})
        if "ratio_with_centring" in sm:
            lines += ["", f"{PAIR_LABELS[pair][0]}: rlhf-gym's `train_reward_model` also centres the reward after training "
                      "(one scoring pass over the training completions, so the SFT policy scores 0 on average); TRL's "
                      "`RewardTrainer` does not, so the table times training alone. With that pass: "
                      f"{sm['ours']['median_s_per_update_with_centring']:.3f} s/update, ratio {sm['ratio_with_centring']:.2f}."]
    return "\n".join(lines) + "\n"


def settings_line(s: Settings) -> str:
    if s.pair == "rloo":
        return f"{s.updates} updates x {s.batch_size} completions (k {s.rloo_k}), lr {s.learning_rate:g}, beta {s.beta:g}"
    if s.pair == "ppo":
        return (f"{s.updates} rollouts x {s.batch_size}, minibatch {s.mini_batch_size}, {s.ppo_epochs} epochs "
                f"({s.optimizer_steps} updates), lr {s.learning_rate:g}, beta {s.beta:g}")
    if s.pair == "dpo":
        return f"{s.updates} updates x {s.batch_size} pairs, lr {s.learning_rate:g}, beta {s.beta:g}"
    return f"{s.updates} updates x {s.batch_size} pairs, lr {s.learning_rate:g}"


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``bench-trl.json`` and ``bench-trl.md`` under ``out``, each written atomically."""
    j = _atomic_write(out / "bench-trl.json", json.dumps(report, indent=2, default=str) + "\n")
    m = _atomic_write(out / "bench-trl.md", markdown(report))
    return j, m


def resolve_pairs(pair: str) -> list[str]:
    """``all``, one pair, or a comma-separated list of pairs (run in that order)."""
    if pair == "all":
        return [*PAIRS, "env"]
    names = [p.strip() for p in pair.split(",")]
    bad = [p for p in names if p not in (*PAIRS, "env")]
    if bad:
        raise BenchError(f"unknown pair {', '.join(map(repr, bad))}; use {', '.join(PAIRS)}, env (comma-separated) or all.")
    return list(dict.fromkeys(names))


def bench_trl(pair: str = "all", repeats: int = 3, out: str | os.PathLike = DEFAULT_OUT, trl_python: str | None = None,
              trl_ppo_python: str | None = None, updates: int | None = None, seed: int = 0, threads: int = 1,
              timeout: float = 900.0, command: str | None = None, env_rounds: int = 5, device: str = "cpu",
              policy: str = "sft", dtype: str = "float32") -> dict[str, Any]:
    """Run the pairs (interleaved fresh subprocesses, ``repeats`` runs a side), print and write the report.

    ``device``: where both sides train (and the env pair runs). ``policy``: what both sides start from:
    "sft" (the micro world's SFT model), a model directory, or a :data:`POLICY_PRESETS` name (built
    into the work directory first, seeded with ``seed``). ``dtype``: both sides' precision, float32 or
    bfloat16 (autocast on float32 weights: TRL's ``bf16=True``, rlhf-gym's ``precision="bfloat16"``)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise BenchError(f"repeats must be a positive integer, got {repeats!r}.")
    pairs = resolve_pairs(pair)
    default_settings("rloo", dtype=dtype, device=device)  # a bad dtype or device fails before anything runs
    trl_python = trl_python or sys.executable
    trl_ppo_python = trl_ppo_python or trl_python
    versions: dict[str, dict[str, str]] = {"ours": _side_versions("ours")}
    if any(p in ("rloo", "dpo", "reward") for p in pairs):
        versions["trl"] = python_versions(trl_python)
    if "ppo" in pairs:
        versions["trl (ppo)"] = python_versions(trl_ppo_python)
        if not hasattr_ppo(trl_ppo_python):
            raise BenchError(f"{trl_ppo_python} has trl {versions['trl (ppo)']['trl']}, which has no "
                             "trl.experimental.ppo.PPOTrainer; pass --trl-ppo-python with trl==1.12.0.")
    out = Path(out)
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(device),
        "load_average_before": load_average(), "threads": threads, "repeats": repeats, "versions": versions,
        "policy": policy, "dtype": dtype,
        "command": command or shlex.join(["rlhf-zoo", "bench", "trl", "--pair", pair, "--repeats", str(repeats)]),
        "pairs": {}, "eval_prompts": default_settings("rloo").eval_prompts,
    }
    work = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    if policy in POLICY_PRESETS:
        policy = str(build_policy(policy, work / "policy", seed=seed))
    common = {"seed": seed, "threads": threads, "device": device, "policy": policy, "dtype": dtype}
    first = default_settings("rloo", **common)
    report["sft"] = evaluate_model(first, "sft", work)
    print(f"[bench trl] SFT policy: {_quality('rloo', report['sft'])}", flush=True)
    for p in pairs:
        if p == "env":
            report["pairs"]["env"] = bench_env_pair(env_rounds, device, None if policy == "sft" else policy)
            continue
        s = default_settings(p, updates=updates, **common)
        entry: dict[str, Any] = {"settings": asdict(s), "settings_line": settings_line(s), "sides": side_settings(s),
                                 "runs": []}
        report["pairs"][p] = entry
        try:
            data_dir = work / p
            settings_file = prepare_data(s, data_dir)
            pythons = {"ours": sys.executable, "trl": trl_ppo_python if p == "ppo" else trl_python}
            for r in range(repeats):
                for side in SIDES:
                    run_dir = data_dir / f"{side}-{r}"
                    print(f"[bench trl] {p}: run {r + 1}/{repeats}, {side} ({settings_line(s)})", flush=True)
                    rec = run_side(child_command(pythons[side], side, p, settings_file, run_dir), run_dir, timeout)
                    rec["repeat"] = r
                    rec["eval"] = evaluate_model(s, rec["model_dir"], data_dir)
                    print(f"[bench trl] {p} {side}: {rec['train_s'] / rec['updates']:.3f} s/update, peak RSS "
                          f"{rec['peak_rss_mb']:.0f} MiB, {_quality(p, rec['eval'])}", flush=True)
                    entry["runs"].append(rec)
        except BenchError as e:
            entry["error"] = str(e)
            print(f"[bench trl] {p}: {e}", file=sys.stderr, flush=True)
        entry["summary"] = summarise(entry["runs"])
        report["load_average_after"] = load_average()
        write_report(report, out)  # after every pair: a long run keeps what it measured
    report["load_average_after"] = load_average()
    j, m = write_report(report, out)
    print(markdown(report))
    print(f"[bench trl] wrote {m} and {j}")
    return report


def hasattr_ppo(python: str) -> bool:
    code = "import trl.experimental.ppo as p; p.PPOTrainer"
    return subprocess.run([python, "-c", code], capture_output=True, timeout=300).returncode == 0


def bench_env_pair(rounds: int, device: str = "cpu", reference: str | None = None) -> dict[str, Any]:
    """The env-rollout pair: ``rlhf-zoo bench env`` (env vs generate + ref + RM, and bare KV-cached decoding),
    each measurement in a fresh process, as each training run is."""
    from rlhfgym.zoo.bench import bench_env

    batch, max_new = 64, 32
    rows = bench_env(batch=batch, max_new_tokens=max_new, repeats=3, rounds=rounds, device=device, reference=reference,
                     isolate=True)
    return {"batch": batch, "max_new_tokens": max_new, "rounds": rounds, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m rlhfgym.zoo.bench_trl", description="one side of rlhf-zoo bench trl")
    p.add_argument("--child", nargs=4, metavar=("SIDE", "PAIR", "SETTINGS", "OUT"), required=True)
    a = p.parse_args(argv)
    run_child(*a.child)


if __name__ == "__main__":
    main()
