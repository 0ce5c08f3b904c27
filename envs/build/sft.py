"""Build the micro world's frozen assets from a seed: tokenizer, then the SFT policy (= pi_ref).

``rlhf-zoo build-assets`` calls :func:`build_assets`. The SFT policy is a small Llama-style causal
LM (rotary positions, so copying names and numbers does not depend on where they sit), first
trained on articles, then fine-tuned on article -> reference summary with the loss on article
tokens down-weighted (x0.1): the summary tokens carry the signal, the article tokens keep it a
language model of the world.

The feedback models (reward, reward_fact, preference, judge) are built by :mod:`.feedback`;
``build_assets(only="reward,...")`` runs them and keeps the manifest whole.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..tasks.news import NewsTask, lead_summary, world_words

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


# ----------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(task: NewsTask, n_texts: int = 5000):
    """A word-level tokenizer trained on the world's text, saved as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, EOS, UNK], min_frequency=1)
    texts = [task.prompt("train", i) + " " + task.reference("train", i) for i in range(n_texts)]
    texts.append(" ".join(world_words()))  # every word the world can write, even rare ones
    tok.train_from_iterator(texts, trainer=trainer)
    # decoder-only batches are left-padded for generation
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left")


# ----------------------------------------------------------------------------------------------
# Policy


@dataclass
class SFTConfig:
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    pretrain_steps: int = 1000
    sft_steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    prompt_loss_weight: float = 0.1
    warmup_steps: int = 200
    n_examples: int = 100_000
    seed: int = 0
    extra: dict = field(default_factory=dict)


def new_policy(tokenizer, cfg: SFTConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def _example(args):
    task, i = args
    return task.prompt("train", i), task.reference("train", i)


def make_sft_data(task: NewsTask, tokenizer, n: int, seed: int = 0, workers: int | None = None):
    """``n`` random training articles with one reference summary each, tokenized once.

    Returns right-padded ``ids`` (n, L) and ``is_summary`` (n, L) marking summary and EOS tokens
    (0 elsewhere, -1 on padding). Generating text is the slow part, so it runs in a process pool.
    """
    import multiprocessing as mp

    rng = random.Random(seed)
    idx = rng.sample(range(task.split_size("train")), n)
    workers = workers or max(1, min(16, mp.cpu_count()))
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        pairs = list(tqdm(pool.imap(_example, [(task, i) for i in idx], chunksize=256), total=n, desc="sft data"))
    p_ids = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    c_ids = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    width = max(len(a) + len(b) + 1 for a, b in zip(p_ids, c_ids))
    ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    is_summary = torch.full((n, width), -1, dtype=torch.int8)
    for r, (a, b) in enumerate(zip(p_ids, c_ids)):
        row = a + b + [tokenizer.eos_token_id]
        ids[r, : len(row)] = torch.tensor(row)
        is_summary[r, : len(a)] = 0
        is_summary[r, len(a) : len(row)] = 1
    return ids, is_summary


def _weighted_lm_loss(model, ids, weights):
    """Mean next-token NLL weighted per target token (weights 0 on padding)."""
    mask = (weights > 0).long()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    w = weights[:, 1:]
    return (nll * w).sum() / w.sum()


def train_sft(task: NewsTask, tokenizer, cfg: SFTConfig, device: str = "cpu", progress: bool = True, log=print):
    """Pretrain on articles, then SFT on article -> reference summary. Returns the model (eval mode)."""
    torch.manual_seed(cfg.seed)
    ids, is_summary = make_sft_data(task, tokenizer, cfg.n_examples, seed=cfg.seed)
    ids, is_summary = ids.to(device), is_summary.to(device)
    model = new_policy(tokenizer, cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    total = cfg.pretrain_steps + cfg.sft_steps

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    bar = tqdm(range(total), desc="train policy", disable=not progress)
    model.train()
    ema = None
    for step in bar:
        rows = torch.randint(0, ids.shape[0], (cfg.batch_size,), generator=gen).to(device)
        b_ids, b_sum = ids[rows], is_summary[rows]
        width = int((b_sum >= 0).sum(1).max())
        b_ids, b_sum = b_ids[:, :width], b_sum[:, :width].float()
        if step < cfg.pretrain_steps:  # a language model of articles first
            weights = (b_sum == 0).float()
        else:  # then article -> summary, article tokens down-weighted
            weights = torch.where(b_sum == 1, 1.0, torch.where(b_sum == 0, cfg.prompt_loss_weight, 0.0))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = _weighted_lm_loss(model, b_ids, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", phase="pre" if step < cfg.pretrain_steps else "sft")
        if log and (step + 1) % 1000 == 0:
            log(f"step {step + 1}/{total} loss {ema:.4f}")
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# Evaluation of a summarization policy against the gold scorer


def evaluate_policy(model, tokenizer, task: NewsTask, n: int = 200, best_of: int = 8, seed: int = 0, *,
                    batch_size: int = 100, max_new_tokens: int = 32, max_prompt_tokens: int | None = None) -> dict:
    """The SFT policy's report on the first ``n`` test articles, for the asset manifest.

    Every row that samples the policy is :func:`rlhfgym.envs.evaluation.evaluate_samples` with the
    same prompts, seed and batch size: ``sft_sampled_t1`` (one sample per article at temperature 1;
    the number ``rlhf-zoo train`` reports as the SFT baseline, with the registered envs' window:
    ``max_prompt_tokens`` defaults to theirs), ``sft_greedy`` (temperature 0) and
    ``sft_best_of_<best_of>_gold`` (the best gold score of ``best_of`` samples per article). The
    model-free rows: ``lead_2`` (the article's first two sentences) and the world's writers
    (``writer_expert``, ``writer_average``).
    """
    from ..evaluation import evaluate_samples, lm_sampler

    if max_prompt_tokens is None:
        from ..registration import DEFAULT_MAX_PROMPT_TOKENS as max_prompt_tokens
    sample = lm_sampler(model, tokenizer, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens)
    arts = [task.example("test", i) for i in range(n)]
    prompts = [a.prompt for a in arts]

    def run(temperature: float, k: int = 1) -> dict:
        return evaluate_samples(sample, prompts, task.gold, temperature=temperature, samples_per_prompt=k,
                                batch_size=batch_size, seed=seed)

    sampled, greedy, best = run(1.0), run(0.0), run(1.0, best_of)
    per_prompt = [best["gold_scores"][i * best_of : (i + 1) * best_of] for i in range(n)]
    mean = lambda xs: float(sum(xs) / len(xs))  # noqa: E731
    return {
        "n_test_articles": n,
        "sft_greedy": greedy["gold"],
        "sft_sampled_t1": sampled["gold"],
        f"sft_best_of_{best_of}_gold": mean([max(g) for g in per_prompt]),
        "lead_2": mean([task.gold_one(a.prompt, lead_summary(a, 2)) for a in arts]),
        "writer_expert": mean([task.gold_one(a.prompt, task.reference("test", i, "expert")) for i, a in enumerate(arts)]),
        "writer_average": mean([task.gold_one(a.prompt, task.reference("test", i)) for i, a in enumerate(arts)]),
        "examples": [{"prompt": prompts[i], "greedy": greedy["texts"][i], "sampled": sampled["texts"][i]}
                     for i in range(min(3, n))],
    }


#: ``build_assets(feedback=...)`` keys (the feedback build's scale, see :func:`.feedback.build_all_feedback`)
#: and the ``rlhf-zoo build-assets`` flag of each
def evaluate_shipped_policy(version: str = "micro-v0", n: int = 200, seed: int = 0) -> dict:
    """:func:`evaluate_policy` of the shipped SFT policy of ``version`` (the README's table of summarizers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..assets import load_micro_assets
    from ..hf import quiet_transformers

    assets = load_micro_assets(version)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(assets.sft_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    report = evaluate_policy(model, tokenizer, NewsTask(), n=n, seed=seed)
    report.pop("examples")
    return report


FEEDBACK_SCALE_FLAGS = {"n_train_prompts": "prompts", "n_heldout_prompts": "heldout-prompts", "gen_batch_size": "gen-batch-size",
                        "rm_epochs": "rm-epochs", "pm_max_pairs": "pm-pairs"}


def build_assets(version: str = "micro-v0", out: str | None = None, seed: int = 0, device: str = "cpu",
                 only: str | None = None, sft_config: SFTConfig | None = None, progress: bool = True,
                 eval_articles: int = 200, feedback: dict | None = None, work_dir=None,
                 preferences: str | None = None) -> Path:
    """Rebuild the frozen assets of ``version`` into ``out`` (default: the package's asset dir).

    ``only``: comma-separated :data:`~rlhfgym.envs.assets.COMPONENTS` (``"feedback"`` = the four feedback
    models); default ``"tokenizer,sft"``. Feedback parts need the tokenizer and SFT policy in place
    and sample their preference data from it; ``feedback`` sets that data's scale (keys
    :data:`FEEDBACK_SCALE_FLAGS`, e.g. ``{"n_train_prompts": 8000}``). The manifest is rewritten
    last; it keeps the build record (command, machine, date) of the parts not rebuilt.

    Feedback parts are resumable: their sampled data, finished parts and snapshots of the model in
    training are kept in ``work_dir`` (default :func:`~.checkpoint.default_work_dir`), so the same
    command run again after a kill goes on where it stopped. The work dir is deleted on success.

    ``preferences``: a labeling database URL (``rlhf-zoo label --db URL``): ``only="reward"`` then trains
    the reward model on its human labels (:func:`.feedback.build_reward_from_preferences`) instead of
    simulated ones. It needs ``out`` (the shipped reward model of ``RLHF-Summarize-v0`` never changes);
    a new ``out`` gets a copy of the shipped tokenizer and SFT policy, which the reward model reads with.
    """
    from ..assets import COMPONENTS, FEEDBACK_COMPONENTS, asset_dir, atomic_save_dir

    if version != "micro-v0":
        raise ValueError(f"unknown asset version {version!r}; this release builds 'micro-v0'.")
    target = Path(out) if out else asset_dir(version, must_exist=False)
    names = [n.strip() for n in (only or "tokenizer,sft").split(",") if n.strip()]
    parts = {q for n in names for q in (FEEDBACK_COMPONENTS if n == "feedback" else (n,))}
    unknown = parts - set(COMPONENTS)
    if unknown or not parts:
        raise ValueError(f"unknown asset parts {sorted(unknown)}; choose from {', '.join(COMPONENTS)} or feedback.")
    feedback = dict(feedback or {})
    bad = set(feedback) - set(FEEDBACK_SCALE_FLAGS)
    if bad:
        raise ValueError(f"unknown feedback scale keys {sorted(bad)}; use {', '.join(FEEDBACK_SCALE_FLAGS)}.")
    if preferences is not None:
        return _build_reward_from_preferences(version, out, parts, preferences, seed, device, progress)
    task = NewsTask(seed=0)
    cfg = sft_config or SFTConfig(seed=seed)
    t0 = time.time()
    target.mkdir(parents=True, exist_ok=True)
    if "tokenizer" in parts:
        with atomic_save_dir(target / "tokenizer") as tmp:
            build_tokenizer(task).save_pretrained(tmp)
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(target / "tokenizer")
    extra = {}
    if "sft" in parts:
        model = train_sft(task, tokenizer, cfg, device=device, progress=progress)
        metrics = evaluate_policy(model, tokenizer, task, n=eval_articles)
        with atomic_save_dir(target / "sft") as tmp:
            model.to("cpu").save_pretrained(tmp)
            (Path(tmp) / "build_metrics.json").write_text(json.dumps(metrics, indent=2))
        extra["sft_config"] = asdict(cfg)
        extra["metrics"] = {k: v for k, v in metrics.items() if k != "examples"}
        stale = [q for q in FEEDBACK_COMPONENTS if (target / q).is_dir() and q not in parts]
        if stale:
            import warnings

            warnings.warn(f"{', '.join(stale)} in {target} were built on the previous SFT policy; rebuild them "
                          f"(--only {','.join(stale)}) so that they judge what the new policy writes.", stacklevel=2)
    steps = [q for q in FEEDBACK_COMPONENTS if q in parts]
    if steps:
        from .feedback import build_all_feedback, headline_metrics
        from .checkpoint import default_work_dir

        work = Path(work_dir) if work_dir is not None else default_work_dir(target, version)
        fb = build_all_feedback(target, device, seed, steps=steps, progress=progress, work_dir=work, **feedback)
        extra["feedback_metrics"] = headline_metrics(fb)
        shutil.rmtree(work, ignore_errors=True)
    command = f"rlhf-zoo build-assets --version {version} --seed {seed} --device {device} --only {','.join(names)}"
    if steps:
        command += "".join(f" --{FEEDBACK_SCALE_FLAGS[k]} {v}" for k, v in sorted(feedback.items()))
    record_build(target, parts, command, seed, time.time() - t0, extra)
    return target


def _build_reward_from_preferences(version: str, out, parts: set, url: str, seed: int, device: str, progress: bool) -> Path:
    """``build_assets(only="reward", preferences=URL, out=DIR)``: the reward model of DIR from a labeling database."""
    from ..assets import asset_dir, atomic_save_dir, load_micro_assets
    from ..feedback.store import describe_url
    from .feedback import build_reward_from_preferences

    if parts != {"reward"}:
        raise ValueError(f"--preferences trains the reward model only; use --only reward (got {', '.join(sorted(parts))}).")
    if not out:
        raise ValueError("--preferences trains a reward model on your labels; pass --out DIR so it does not replace the "
                         f"shipped reward model of {version} (RLHF-Summarize-v0 keeps its meaning).")
    target = Path(out)
    if target.resolve() == asset_dir(version, must_exist=False).resolve():
        raise ValueError(f"--out {out} is the shipped {version} assets; pass another directory.")
    t0 = time.time()
    target.mkdir(parents=True, exist_ok=True)
    shipped = load_micro_assets(version)
    for part in ("tokenizer", "sft"):  # the reward model reads with the shipped tokenizer and starts from the SFT policy
        if not (target / part).is_dir():
            with atomic_save_dir(target / part) as tmp:
                shutil.copytree(shipped.root / part, tmp, dirs_exist_ok=True)
    metrics = build_reward_from_preferences(target, url, device, seed, progress=progress)
    command = (f"rlhf-zoo build-assets --version {version} --seed {seed} --device {device} --only reward "
               f"--out {out} --preferences {describe_url(url)}")
    record_build(target, {"reward"}, command, seed, time.time() - t0, {"preference_metrics": {
        k: metrics[k] for k in ("n_records", "n_train_pairs", "n_heldout_pairs", "heldout_accuracy")}})
    return target


def record_build(target, parts, command: str, seed: int, seconds: float, extra: dict | None = None) -> dict:
    """Rewrite ``target``'s manifest after building ``parts`` there with ``command``: every file is
    listed with its checksum, ``parts`` get this build's record (command, seed, machine, date,
    seconds) and the other parts keep theirs, with their metrics (``sft_config``, ``metrics``,
    ``feedback_metrics``) unless ``extra`` replaces them. Returns the manifest."""
    from ..assets import device_string, write_manifest

    target = Path(target)
    old = _previous_manifest(target)
    merged = {k: old[k] for k in ("sft_config", "metrics", "feedback_metrics") if k in old}
    merged.update(extra or {})
    record = {"command": command, "seed": seed, "built_on": device_string(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": round(seconds, 1)}
    merged["parts"] = {**_part_records(old), **{q: record for q in sorted(parts)}}
    merged["build_seconds"] = record["seconds"]
    return write_manifest(target, command=command, seed=seed, extra=merged)


def _previous_manifest(target: Path) -> dict:
    """The manifest already in ``target`` (its build records are kept), or {} if there is none to read."""
    try:
        return json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _part_records(old: dict) -> dict:
    """Per-part build records of an earlier manifest; one from before per-part records lists its
    command for the parts it built (tokenizer and sft)."""
    if "parts" in old:
        return dict(old["parts"])
    if "command" not in old:
        return {}
    record = {k: old.get(k) for k in ("command", "seed", "built_on", "created")}
    record["seconds"] = old.get("build_seconds")
    return {q: record for q in ("tokenizer", "sft") if q in {f.split("/", 1)[0] for f in old.get("files", {})}}
