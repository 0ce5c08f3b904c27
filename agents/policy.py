"""The shared causal-LM policy: sampling with a KV cache, batched log-probs, an optional value head.

The same code serves the micro world's tiny model and a hub model (``from_pretrained`` with a
local directory or a model name; optional LoRA through ``peft`` and a ``dtype`` for large
models). Prompts are encoded exactly as the token environment encodes them (its tokenizer, the
last ``max_prompt_tokens`` tokens kept), so a completion sampled here is one episode of the env.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlhfgym.envs.hf import cached_forward, mixed_precision, position_ids, quiet_transformers
from rlhfgym.envs.evaluation import Samples
from rlhfgym.envs.lm import (
    SharedPrefixes,
    decode_completions,
    distinct_rows,
    encode_completions,
    encode_prompts,
    length_chunks,
    model_vocab_size,
    pad_left,
    sample_tokens,
)


@dataclass
class Rollout(Samples):
    """A batch of sampled completions (:class:`rlhfgym.envs.evaluation.Samples`: ``prompts``,
    ``prompt_ids``, ``tokens`` (B, T) padded after EOS, ``mask`` (B, T) 1 on real tokens with EOS,
    ``logprobs`` (B, T) under the sampling policy, ``texts``) and ``ended``: (B,) bool, EOS was sampled.
    """

    ended: torch.Tensor


class CausalLMPolicy(nn.Module):
    """A causal LM as a policy over next tokens, with an optional scalar value head.

    Args:
        model: a ``transformers`` causal LM.
        tokenizer: its tokenizer (needs ``eos_token_id``; ``pad_token_id`` defaults to EOS).
        value_head: add a ``Linear(hidden, 1)`` value head on the last hidden state (PPO).
        max_prompt_tokens / max_new_tokens: the env's window; prompts keep their last tokens.
        device: where the model lives.
        autocast_dtype: mixed precision of its forward passes (``torch.bfloat16``: matrix products in
            bfloat16 under ``torch.autocast``, weights, gradients and optimizer state in float32);
            ``None``: the weights' own dtype. An agent sets it from its ``precision`` hyperparameter.
    """

    def __init__(self, model, tokenizer, *, value_head: bool = False, max_prompt_tokens: int = 96,
                 max_new_tokens: int = 32, device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.autocast_dtype = autocast_dtype
        if tokenizer.eos_token_id is None:
            raise ValueError("the policy's tokenizer has no eos_token; set tokenizer.eos_token first.")
        if model_vocab_size(model) < len(tokenizer):
            raise ValueError(
                f"tokenizer/model vocab mismatch: tokenizer has {len(tokenizer)} tokens, the model {model_vocab_size(model)} logits."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_new_tokens = int(max_new_tokens)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.to(device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, env, *, value_head: bool = False, model=None, device: str | None = None) -> "CausalLMPolicy":
        """A trainable copy of the env's reference policy (the usual RLHF start), or ``model`` checked against the env."""
        core = env.unwrapped
        tokenizer = core.tokenizer
        model = copy.deepcopy(core.reference_model) if model is None else model
        if model_vocab_size(model) < len(tokenizer):
            raise ValueError(
                f"the policy does not match the env: the env's tokenizer has {len(tokenizer)} tokens, the policy "
                f"{model_vocab_size(model)} logits; start from the env's reference model or its tokenizer."
            )
        device = device or str(core.device)
        inner = getattr(core, "core", core)
        return cls(model.float(), tokenizer, value_head=value_head,
                   max_prompt_tokens=getattr(inner, "max_prompt_tokens", 96), max_new_tokens=core.max_new_tokens, device=device)

    @classmethod
    @quiet_transformers()
    def from_pretrained(cls, path: str | Path, *, tokenizer=None, device: str = "cpu", dtype: torch.dtype | None = None,
                        value_head: bool | None = None, lora: dict[str, Any] | None = None, **kwargs) -> "CausalLMPolicy":
        """Load a policy saved by :meth:`save`, a local model directory, or a hub model name."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path) if Path(str(path)).exists() else path
        model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype else {}))
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        vh_file = Path(str(path)) / "value_head.pt"
        if value_head is None:
            value_head = vh_file.exists()
        meta_file = Path(str(path)) / "policy.json"
        meta = {}
        if meta_file.exists():
            import json

            meta = json.loads(meta_file.read_text())
        policy = cls(model, tokenizer, value_head=value_head, device=device,
                     max_prompt_tokens=kwargs.get("max_prompt_tokens", meta.get("max_prompt_tokens", 96)),
                     max_new_tokens=kwargs.get("max_new_tokens", meta.get("max_new_tokens", 32)))
        if value_head and vh_file.exists():
            policy.value_head.load_state_dict(torch.load(vh_file, map_location=device, weights_only=True))
        return policy

    def save(self, directory: str | Path) -> None:
        import json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.value_head is not None:
            torch.save(self.value_head.state_dict(), directory / "value_head.pt")
        (directory / "policy.json").write_text(json.dumps(
            {"max_prompt_tokens": self.max_prompt_tokens, "max_new_tokens": self.max_new_tokens}))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        """The context every forward pass of this policy runs in (:attr:`autocast_dtype`, see
        :func:`rlhfgym.envs.hf.mixed_precision`)."""
        return mixed_precision(self.device, self.autocast_dtype)

    # ------------------------------------------------------------------ encoding
    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt, keeping the last ``max_prompt_tokens`` (as the env does)."""
        ids = encode_prompts(self.tokenizer, prompts)  # the one convention of rlhfgym.envs.lm
        return [row[-self.max_prompt_tokens:] for row in ids]

    def encode_completions(self, completions) -> tuple[torch.Tensor, torch.Tensor]:
        """Completion texts -> ``(B, T)`` token ids ending in EOS (as the env ends episodes), cut to
        ``max_new_tokens``, right-padded, and their mask (on the policy's device)."""
        ids = encode_completions(self.tokenizer, completions)  # the one convention of rlhfgym.envs.lm
        ids = [(row + [self.eos_id])[: self.max_new_tokens] for row in ids]
        t = max(map(len, ids))
        tokens = torch.full((len(ids), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), t, dtype=torch.long)
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return tokens.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ sampling (no gradients)
    @torch.no_grad()
    def sample(self, prompts: list[str], *, temperature: float = 1.0, max_new_tokens: int | None = None,
               mixture=None) -> Rollout:
        """Sample one completion per prompt with a KV cache (all rows in one batch).

        ``mixture``: optional hook that changes the sampling distribution (Nash-MD's geometric
        mixture with pi_ref, :class:`rlhfgym.agents.nash_md.GeometricMixture`): ``mixture.start(
        prompt_ids, max_new_tokens)`` returns a per-rollout stepper whose ``mix(logp) -> logp``
        maps this policy's (temperature-scaled) next-token log-probs (B, V) to the ones sampled
        from, and ``step(tokens, active)`` sees every sampled token (e.g. to advance its own KV
        cache). ``Rollout.logprobs`` are then the mixture's. ``None`` samples from the policy itself.
        """
        t_max = int(max_new_tokens or self.max_new_tokens)
        prompt_ids = self.encode_prompts(prompts)
        tokens, mask, logps, done = sample_tokens(
            self.model, prompt_ids, max_new_tokens=t_max, window=self.max_prompt_tokens + t_max, eos_id=self.eos_id,
            pad_id=self.pad_id, vocab_size=len(self.tokenizer), temperature=temperature, mixture=mixture,
            autocast_dtype=self.autocast_dtype,
        )
        # decoded as the env decodes an episode (rlhfgym.envs.lm: special tokens dropped, spaces kept)
        texts = decode_completions(self.tokenizer, [row[: int(n)] for row, n in zip(tokens.tolist(), mask.sum(1).tolist())])
        return Rollout(list(prompts), prompt_ids, tokens, mask, logps, texts, done)

    def generate_text(self, prompts, *, temperature: float = 1.0, max_new_tokens: int | None = None,
                      batch_size: int = 256) -> list[str]:
        out: list[str] = []
        for s in range(0, len(prompts), batch_size):
            out.extend(self.sample(list(prompts[s:s + batch_size]), temperature=temperature, max_new_tokens=max_new_tokens).texts)
        return out

    # ------------------------------------------------------------------ teacher-forced (with gradients)
    def batch(self, prompt_ids: list[list[int]], tokens: torch.Tensor, mask: torch.Tensor):
        """``[left-padded prompt | completion]`` ids and attention mask, and where the completion starts."""
        ids, att = pad_left(prompt_ids, self.pad_id, self.device)
        p = ids.shape[1]
        ids = torch.cat([ids, tokens.to(self.device)], 1)
        att = torch.cat([att, mask.to(self.device).long()], 1)
        return ids, att, p

    def forward_logprobs(self, prompt_ids, tokens, mask, *, temperature: float = 1.0, with_values: bool = False,
                         model=None):
        """Per-token log-probs (B, T) of ``tokens`` (and values (B, T) of the states before them).

        ``model`` overrides the network (e.g. the frozen reference) while keeping this policy's batching.
        A prompt shared by several rows (RLOO's k samples of a prompt) runs through the network once:
        its keys and values are computed for one row and reused by the others (gradients flow to all
        of them), which gives the same numbers as the full pass for a fraction of the compute.
        """
        ids, att, p = self.batch(prompt_ids, tokens, mask)
        net = model if model is not None else self.model
        first, copies = distinct_rows(ids[:, :p], att[:, :p])
        with self.autocast():
            if len(first) < len(prompt_ids):
                logits, hidden = self._shared_prompt_forward(net, ids, att, p, first, copies, with_values)
            else:
                out = net(input_ids=ids, attention_mask=att, position_ids=position_ids(att), output_hidden_states=with_values)
                logits = out.logits[:, p - 1:-1]
                hidden = out.hidden_states[-1][:, p - 1:-1] if with_values else None
        # log-softmax and the value head in float32, whatever the forward pass computed in
        logits = logits.float()[..., : len(self.tokenizer)] / max(temperature, 1e-6)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.to(self.device)[..., None]).squeeze(-1)
        logp = logp * mask.to(self.device)
        if not with_values:
            return logp
        if self.value_head is None:
            raise ValueError("this policy has no value head; build it with value_head=True.")
        values = self.value_head(hidden.float()).squeeze(-1) * mask.to(self.device)
        return logp, values

    @staticmethod
    def _shared_prompt_forward(net, ids, att, p: int, first, copies, with_values: bool):
        """The logits (B, T, V) (and last hidden states) that predict the completion tokens, in two
        passes: the distinct prompts (``ids[first, :p]``) into a KV cache, then every row's completion
        on its prompt's cached keys and values (a gather: gradients from all rows add up). Each pass
        batches rows of similar length together (:func:`~rlhfgym.envs.lm.length_chunks`), so a short
        prompt or completion is not padded to the batch's longest; positions past a row's completion
        get zero logits (its mask is 0 there)."""
        device, width = ids.device, ids.shape[1] - p
        # 1. the distinct prompts, read once (rows of similar length together)
        prompts = SharedPrefixes(net, ids[first, :p], att[first, :p], output_hidden_states=with_values)
        # 2. every row's completion on its prompt's keys and values
        completion_len = att[:, p:].sum(1).tolist()
        positions = position_ids(att)
        logits, hidden, rows_done = [], [], []
        for chunk in length_chunks(completion_len):
            rows = torch.tensor(chunk, device=device)
            take, t = copies[rows], max(1, max(completion_len[i] for i in chunk))
            rest, _ = cached_forward(net, prompts.cache(take), input_ids=ids[rows, p:p + t], attention_mask=att[rows, :p + t],
                                     position_ids=positions[rows, p:p + t], output_hidden_states=with_values)
            logits.append(F.pad(torch.cat([prompts.last_logits[take], rest.logits[:, :-1]], 1), (0, 0, 0, width - t)))
            if with_values:
                hidden.append(F.pad(torch.cat([prompts.last_hidden[take], rest.hidden_states[-1][:, :-1]], 1),
                                    (0, 0, 0, width - t)))
            rows_done += chunk
        back = torch.tensor(rows_done, device=device).argsort()
        return torch.cat(logits)[back], torch.cat(hidden)[back] if with_values else None

    # ------------------------------------------------------------------ token-env acting
    @torch.no_grad()
    def act(self, obs, deterministic: bool = False):
        """Next tokens for token-env observations (dict of ``input_ids``/``attention_mask``, numpy or torch)."""
        ids = torch.as_tensor(obs["input_ids"], device=self.device).long()
        att = torch.as_tensor(obs["attention_mask"], device=self.device).long()
        single = ids.dim() == 1
        if single:
            ids, att = ids[None], att[None]
        with self.autocast():
            logits = self.model(input_ids=ids, attention_mask=att, position_ids=position_ids(att)).logits[:, -1]
        logits = logits.float()[:, : len(self.tokenizer)]
        act = logits.argmax(-1) if deterministic else torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)
        if isinstance(obs["input_ids"], torch.Tensor):
            return act[0] if single else act
        act = act.cpu().numpy()
        return act[0] if single else act
