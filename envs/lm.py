"""Step a Hugging Face causal LM one token at a time, for a batch of independent rows.

:class:`IncrementalLM` is *the* way rlhf-gym steps a language model token by token: the environment
uses it for the frozen reference policy, agents use it for their own policy. It keeps one KV cache
for ``B`` rows and lets each row start a new prompt whenever it likes (``reset_rows``), so a vector
environment whose episodes end at different times never has to wait for the slowest row.

Logical layout of the shared cache (the same number of columns for every row)::

    column:      0   1   2   3   4   5   6   7        attention mask
    row 0:       .   .   a   b   c   d   e   f        0 0 1 1 1 1 1 1
    row 1:       .   .   .   .   .   x   y   z        0 0 0 0 0 1 1 1   <- reset 3 steps ago
    row 2:       .   p   q   r   s   .   t   u        0 1 1 1 1 0 1 1   <- inactive at column 5

* **Right-aligned (left-padded).** Every forward pass appends one column for *all* rows, so the
  newest token of every row is always the last column. A row that is reset writes its prompt into
  the *last* ``p`` columns and masks everything to their left; nothing else moves.
* **Explicit positions.** Each row carries its own position counter (the number of valid tokens
  since its last reset) and it is passed as ``position_ids``; together with the attention mask this
  makes a row's logits independent of padding, of the other rows and of where in the cache its
  tokens sit (rotary *and* learned position embeddings both see positions ``0, 1, 2, ...``).
* **Bounded window.** Only the last ``window`` columns are needed, so memory and per-step cost stay
  bounded however long the env runs.

Two backends implement this layout:

* ``"static"`` (default for the ``sdpa`` and ``eager`` attention implementations): the cache is a
  preallocated ring of ``window`` columns per layer, written in place one slot per step, with an
  additive 4D attention mask that we maintain ourselves (so transformers builds no mask per step).
  Shapes never change, so on CUDA the step is captured once as a **CUDA graph** and replayed: one
  launch per token instead of hundreds of kernels and Python calls. A row sees at most its last
  ``window`` tokens (older ones are overwritten), so size ``window`` to the longest context.
* ``"dynamic"``: a transformers ``DynamicCache`` that grows by one column per step and is cropped
  on the left when it is longer than ``window`` (only columns no row needs; a row whose context
  since its last reset is longer keeps all of it). Works with any attention implementation.

Either way the model is called directly with its key/value cache (:func:`rlhfgym.envs.hf.cached_forward`,
no ``generate``): one forward per step, no logits processors, no per-row Python work except at resets.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .hf import cached_forward, mixed_precision, position_ids

__all__ = [
    "IncrementalLM",
    "IncrementalLMPool",
    "SharedPrefixes",
    "length_chunks",
    "pad_left",
    "sequence_logprobs",
    "model_vocab_size",
    "encode_prompts",
    "encode_completions",
    "decode_completions",
    "generate_text",
    "sample_tokens",
    "TokenSampler",
    "distinct_rows",
]


# The one text <-> token convention of rlhf-gym (env, agents, feedback models and asset builds):
# a prompt is encoded as the model saw text in training, with the tokenizer's special tokens (a hub
# tokenizer's BOS); a completion continues the prompt, so it gets none; decoding drops special
# tokens and keeps the spaces exactly as the tokens spell them.


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's special tokens (e.g. BOS) as in training."""
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


def encode_completions(tokenizer, completions: Sequence[str]) -> list[list[int]]:
    """Token ids of each completion as a continuation of its prompt: no special tokens (no BOS, no EOS)."""
    return tokenizer(list(completions), add_special_tokens=False)["input_ids"]


def decode_completions(tokenizer, token_lists: Sequence[Sequence[int]]) -> list[str]:
    """Text of each completion: special tokens (EOS, pad) dropped, spaces kept as the tokens spell them."""
    return tokenizer.batch_decode([list(map(int, t)) for t in token_lists], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)


def model_vocab_size(model: torch.nn.Module) -> int:
    """Number of logits the model produces per position (its output-embedding rows)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


class _RingLayer(DynamicLayer):
    """One layer of the static backend: fixed ``(B, H, C, D)`` keys/values, written in place at
    ``slot`` (a 1-element device tensor shared by all layers, so a CUDA graph can replay it)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.slot = keys, values, slot
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.slot, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, self.slot, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.keys.shape[-2], 0


def distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, copies)`` for a batch of left-padded prompts ``(k, p)``: ``first`` indexes one row of
    each distinct prompt (in order of first appearance), ``copies[i]`` the entry of ``first`` that
    row ``i`` repeats, so ``ids[first][copies]`` equals ``ids`` (masked columns ignored)."""
    k = ids.shape[0]
    if k == 0:
        empty = torch.zeros(0, dtype=torch.long, device=ids.device)
        return empty, empty
    keyed = torch.where(mask.bool(), ids, -1)
    _, inverse = torch.unique(keyed, dim=0, return_inverse=True)
    order = torch.full((int(inverse.max()) + 1,), k, dtype=torch.long, device=ids.device)
    order = order.scatter_reduce(0, inverse, torch.arange(k, device=ids.device), reduce="amin")  # first row of each
    rank = torch.empty_like(order)
    sorted_first, perm = order.sort()
    rank[perm] = torch.arange(len(order), device=ids.device)  # unique id -> position in appearance order
    return sorted_first, rank[inverse]


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, T) ids and attention mask of token-id lists: the rows end together, so what
    follows (a completion, the rest of a sequence on a prefix's KV cache) continues all of them."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def length_chunks(lengths: Sequence[int], min_rows: int = 8, max_chunks: int = 3,
                  tiebreak: Sequence | None = None) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length (then by ``tiebreak``) and cut into up to ``max_chunks``
    runs of at least ``min_rows``: rows of similar length padded together (less padding, still large
    matrices)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tiebreak[i] if tiebreak is not None else i))
    k = max(1, min(max_chunks, len(order) // min_rows))
    return [order[c * len(order) // k:(c + 1) * len(order) // k] for c in range(k)]


class SharedPrefixes:
    """Distinct prefixes read once into one KV cache that rows continuing them can share.

    ``SharedPrefixes(net, ids, mask)`` runs the left-padded prefixes ``ids`` / ``mask`` (P, W) through
    ``net`` with a KV cache, rows of similar length together (:func:`length_chunks`, each run padded to
    its own longest prefix), and keeps every layer's keys and values at the common width ``W``
    (padding on the left, masked). :meth:`cache` gives the cache of some rows (a gather, so gradients
    from every row that continues a prefix add up), and ``last_logits`` / ``last_hidden`` the outputs at each prefix's last position (when ``net`` returns
    logits / when ``output_hidden_states=True``). Rows come back in the given order.
    """

    def __init__(self, net: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, *, output_hidden_states: bool = False):
        width, lengths = ids.shape[1], mask.sum(1).tolist()
        keys, values, logits, hidden, done = [], [], [], [], []
        for chunk in length_chunks(lengths):
            rows, w = torch.tensor(chunk, device=ids.device), max(lengths[i] for i in chunk)
            m = mask[rows, width - w:]
            out, cache = cached_forward(net, DynamicCache(), input_ids=ids[rows, width - w:], attention_mask=m,
                                        position_ids=position_ids(m), output_hidden_states=output_hidden_states)
            keys.append([torch.nn.functional.pad(layer.keys, (0, 0, width - w, 0)) for layer in cache.layers])
            values.append([torch.nn.functional.pad(layer.values, (0, 0, width - w, 0)) for layer in cache.layers])
            if getattr(out, "logits", None) is not None:
                logits.append(out.logits[:, -1:])
            if output_hidden_states:
                hidden.append(out.hidden_states[-1][:, -1:])
            done += chunk
        back = torch.tensor(done, device=ids.device).argsort()
        self.keys = [torch.cat(k)[back] for k in zip(*keys)]
        self.values = [torch.cat(v)[back] for v in zip(*values)]
        self.last_logits = torch.cat(logits)[back] if logits else None
        self.last_hidden = torch.cat(hidden)[back] if hidden else None

    def cache(self, take: torch.Tensor) -> DynamicCache:
        """A cache holding prefix ``take[i]`` in row ``i``."""
        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k[take], v[take], layer)
        return cache


class IncrementalLM:
    """Batched incremental decoding of a causal LM with per-row resets and a bounded KV cache.

    Args:
        model: any ``transformers`` causal LM with a standard per-layer key/value cache (Llama,
            GPT-2, Qwen, Mistral, ...). It is used as is: put it in ``eval()`` mode and on its device
            yourself, and do not move it afterwards (a captured CUDA graph reads the weights in
            place; in-place updates such as ``optimizer.step()`` are fine). No gradients are recorded.
        batch_size: number of rows ``B``.
        window: the longest context a row needs (prompt + generated tokens); the token env's
            observation width ``max_prompt_tokens + max_new_tokens`` is the right value for an agent.
            See the module docstring for what each backend does with longer contexts.
        backend: "static", "dynamic" or "auto" (static when the model's attention implementation
            is ``sdpa`` or ``eager``, which accept our 4D mask; dynamic otherwise).
        cuda_graph: capture the static step as a CUDA graph (default: on CUDA devices).
        keep_hidden: also keep the last layer's hidden state of the newest position of the rows each
            ``reset_rows`` / ``step`` call computed, in :attr:`hidden` (``(rows, H)``; a value head
            reads it). Not with ``cuda_graph``.

    Typical use (generation with ``B`` prompts, restarting rows as they finish)::

        lm = IncrementalLM(model, batch_size=B, window=max_prompt + max_new)
        logits = lm.reset_rows(range(B), prompt_token_lists)       # (B, V) next-token logits
        for _ in range(max_new):
            tokens = sample(logits)                                 # (B,)
            logits = lm.step(tokens)                                # (B, V)
            # rows that finished: logits[rows] = lm.reset_rows(rows, new_prompts)

    ``reset_rows`` and ``step`` return the logits of the *next* token, so a policy samples its action
    from the logits it already has, then feeds the action back with ``step``. Returned tensors are
    fresh (never overwritten by later calls).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int,
        window: int,
        *,
        backend: str = "auto",
        cuda_graph: bool | None = None,
        keep_hidden: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"IncrementalLM needs batch_size >= 1, got {batch_size}.")
        if window < 1:
            raise ValueError(f"IncrementalLM needs window >= 1, got {window}.")
        if backend not in ("auto", "static", "dynamic"):
            raise ValueError(f"unknown backend {backend!r}; use 'auto', 'static' or 'dynamic'.")
        self.model = model
        self.batch_size = int(batch_size)
        self.window = int(window)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = model_vocab_size(model)
        attn = getattr(model.config, "_attn_implementation", None)
        if backend == "auto":
            backend = "static" if attn in ("sdpa", "eager") else "dynamic"
        self.backend = backend
        on_cuda = self.device.type == "cuda"
        self.cuda_graph = (on_cuda and backend == "static") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and (backend != "static" or self.device.type != "cuda"):
            raise ValueError("cuda_graph=True needs backend='static' and a model on a CUDA device.")
        if keep_hidden and self.cuda_graph:
            raise ValueError("keep_hidden=True cannot be captured in a CUDA graph; pass cuda_graph=False.")
        self.keep_hidden = bool(keep_hidden)
        #: (rows, H): the last layer's hidden state at the newest position (with ``keep_hidden``)
        self.hidden: torch.Tensor | None = None
        # Prefills only need the last position's logits; skip the (p, V) projection when the
        # model supports it (all current transformers causal LMs do).
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._graph: torch.cuda.CUDAGraph | None = None
        if backend == "static":
            self._init_static()
        self.clear()

    # ------------------------------------------------------------------ state
    def clear(self) -> None:
        """Forget every row: empty (all-masked) cache, zero positions."""
        #: (B,) int64: position id of the row's next token (= valid tokens since its last reset).
        self.positions = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        # Host-side count of columns appended since each row's last reset (-1: never reset). The
        # dynamic backend uses it to decide what to crop without reading anything from the device.
        self._span = np.full(self.batch_size, -1, dtype=np.int64)
        if self.backend == "static":
            self._mask4d.fill_(self._neg)
            self._head = 0  # columns ever appended; the next one goes to slot head % window
        else:
            self.cache = DynamicCache()
            self._mask2d = torch.zeros(self.batch_size, 0, dtype=torch.long, device=self.device)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``(B, L)`` int64, 1 where a column holds a token of the row's context, oldest column first."""
        if self.backend == "dynamic":
            return self._mask2d
        order = (torch.arange(self.window, device=self.device) + self._head) % self.window
        return (self._mask4d[:, 0, 0, order] == 0).long()

    @property
    def cache_len(self) -> int:
        """Number of cache columns ``L`` (always ``window`` for the static backend)."""
        return self.window if self.backend == "static" else int(self._mask2d.shape[1])

    def _forward(self, cache, **inputs):
        """One forward pass over ``cache``; returns ``(logits, cache)`` (and keeps :attr:`hidden`)."""
        if self.keep_hidden:
            out, cache = cached_forward(self.model, cache, output_hidden_states=True, **inputs)
            self.hidden = out.hidden_states[-1][:, -1].clone()
        else:
            out, cache = cached_forward(self.model, cache, **inputs)
        return out.logits, cache

    # ------------------------------------------------------------------ reset
    @torch.no_grad()
    def reset_rows(
        self,
        rows: Sequence[int] | np.ndarray | torch.Tensor,
        input_ids: Sequence[Sequence[int]] | torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Start new contexts in ``rows`` and return their next-token logits ``(len(rows), V)``.

        The prompts of all the given rows are prefilled in one batched forward pass; their keys and
        values are written into the last ``p`` columns of those rows (``p`` = longest of these
        prompts), everything older in those rows is masked. The other rows are untouched.

        Args:
            rows: distinct row indices in ``[0, B)``.
            input_ids: one prompt per row, either a list of token-id lists (any lengths >= 1) or a
                ``(len(rows), T)`` tensor, left-padded, with ``attention_mask`` marking valid tokens
                (e.g. the right-aligned observations of the token environment).
            attention_mask: ``(len(rows), T)`` 0/1 tensor when ``input_ids`` is a tensor; ``None``
                means every token is valid.
        """
        rows_np = np.asarray(rows.tolist() if isinstance(rows, torch.Tensor) else list(rows), dtype=np.int64)
        if rows_np.size == 0:
            return torch.empty(0, self.vocab_size, device=self.device)
        if rows_np.min() < 0 or rows_np.max() >= self.batch_size or len(np.unique(rows_np)) != rows_np.size:
            raise ValueError(f"reset_rows: rows must be distinct indices in [0, {self.batch_size}); got {rows_np.tolist()}.")
        ids, mask = self._pad_prompts(input_ids, attention_mask, len(rows_np))
        p = ids.shape[1]
        if self.backend == "static" and p > self.window:
            raise ValueError(f"reset_rows: a prompt of {p} tokens does not fit the window of {self.window}; raise window.")

        # A prompt given to several rows (RLOO's k samples of a prompt, best-of-n) is prefilled once
        # and its keys, values and logits are copied to those rows.
        first, copies = distinct_rows(ids, mask)
        logits, fresh = self._forward(
            DynamicCache(),
            input_ids=ids[first],
            attention_mask=mask[first],
            position_ids=position_ids(mask[first]),
            **({"logits_to_keep": 1} if self._logits_to_keep else {}),
        )
        if len(first) < len(rows_np):
            logits = logits[copies]
            for layer in fresh.layers:
                layer.keys, layer.values = layer.keys[copies], layer.values[copies]
            if self.keep_hidden:
                self.hidden = self.hidden[copies]
        rows_t = torch.as_tensor(rows_np, device=self.device)
        if self.backend == "static":
            self._write_static(rows_t, fresh, mask)
        else:
            self._write_dynamic(rows_t, fresh, mask)
        self.positions[rows_t] = mask.sum(-1)
        self._span[rows_np] = p
        if self.backend == "dynamic":
            self._crop()
        return logits[:, -1, :]

    def _pad_prompts(self, input_ids, attention_mask, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad the prompts into ``(k, p)`` tensors on the model's device (p = longest prompt)."""
        if isinstance(input_ids, torch.Tensor):
            ids = input_ids.to(self.device, torch.long)
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device, torch.long)
            if ids.ndim != 2 or ids.shape[0] != k or mask.shape != ids.shape:
                raise ValueError(
                    f"reset_rows: input_ids must be ({k}, T) with an attention_mask of the same shape; "
                    f"got {tuple(ids.shape)} and {tuple(mask.shape)}."
                )
            lengths = mask.sum(-1)
            p = int(lengths.max())
            if int(lengths.min()) == 0:
                raise ValueError("reset_rows: every prompt needs at least one token (a row has an all-zero attention_mask).")
            return ids[:, ids.shape[1] - p :], mask[:, mask.shape[1] - p :]
        prompts = [list(map(int, x)) for x in input_ids]
        if len(prompts) != k:
            raise ValueError(f"reset_rows: got {k} rows but {len(prompts)} prompts; pass one prompt per row.")
        if min(len(x) for x in prompts) == 0:
            raise ValueError("reset_rows: every prompt needs at least one token; got an empty prompt.")
        return pad_left(prompts, 0, self.device)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Append one token per row and return the next-token logits ``(B, V)``.

        Args:
            tokens: ``(B,)`` token ids, one per row (any valid id for inactive rows).
            active: optional ``(B,)`` bool tensor; rows where it is False do not consume their
                token: the new column is masked for them afterwards and their position does not
                advance, so their context is unchanged. Their returned logits are meaningless.
        """
        tokens = tokens.to(self.device, torch.long).view(self.batch_size, 1)
        logits = self._step_static(tokens, active) if self.backend == "static" else self._step_dynamic(tokens, active)
        self.positions = self.positions + (1 if active is None else active.to(self.device, torch.long))
        self._span[self._span >= 0] += 1
        return logits

    # ------------------------------------------------------------------ static backend
    def _init_static(self) -> None:
        """Allocate the ring (B, H, W, D) per layer, shaped like a 1-token forward's cache."""
        _, probe = self._forward(DynamicCache(), input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device))
        self._slot = torch.zeros(1, dtype=torch.long, device=self.device)
        layers = []
        for layer in probe.layers:
            k, v = layer.keys, layer.values
            layers.append(
                _RingLayer(
                    k.new_zeros(self.batch_size, k.shape[1], self.window, k.shape[3]),
                    v.new_zeros(self.batch_size, v.shape[1], self.window, v.shape[3]),
                    self._slot,
                )
            )
        self._ring = Cache(layers=layers)
        mask_dtype = layers[0].keys.dtype if layers else self.dtype
        self._neg = torch.finfo(mask_dtype).min
        # additive mask: 0 = attend, most negative = masked; (B, 1, 1, W) broadcasts over heads/queries
        self._mask4d = torch.full((self.batch_size, 1, 1, self.window), self._neg, dtype=mask_dtype, device=self.device)
        self._tok = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)

    def _write_static(self, rows_t: torch.Tensor, fresh: DynamicCache, mask: torch.Tensor) -> None:
        p = mask.shape[1]
        slots = (torch.arange(p, device=self.device) + (self._head - p)) % self.window  # the last p columns
        for ring, new in zip(self._ring.layers, fresh.layers):
            # transpose views (B, W, H, D) let one index_put write rows x slots in place
            ring.keys.transpose(1, 2)[rows_t[:, None], slots[None, :]] = new.keys.transpose(1, 2).to(ring.keys.dtype)
            ring.values.transpose(1, 2)[rows_t[:, None], slots[None, :]] = new.values.transpose(1, 2).to(ring.values.dtype)
        row_mask = torch.full((len(rows_t), self.window), self._neg, dtype=self._mask4d.dtype, device=self.device)
        row_mask[:, slots] = torch.where(mask.bool(), 0.0, self._neg).to(row_mask.dtype)
        self._mask4d[rows_t, 0, 0, :] = row_mask

    def _static_forward(self) -> torch.Tensor:
        logits, _ = self._forward(self._ring, input_ids=self._tok, attention_mask=self._mask4d, position_ids=self._pos)
        return logits[:, -1, :]

    def _step_static(self, tokens: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        slot = self._head % self.window
        self._slot.fill_(slot)
        # The new column is visible to every row during this forward (so no row is fully masked);
        # the column it replaces was the oldest one and is no longer anybody's context.
        self._mask4d[:, 0, 0, slot] = 0.0
        self._tok.copy_(tokens)
        self._pos.copy_(self.positions.view(self.batch_size, 1))
        if self.cuda_graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            logits = self._graph_logits.clone()
        else:
            logits = self._static_forward()
        if active is not None:
            self._mask4d[:, 0, 0, slot].masked_fill_(~active.to(self.device, torch.bool), self._neg)
        self._head += 1
        return logits

    def _capture(self) -> None:
        """Record the static step as a CUDA graph (warm-up runs on a side stream, as CUDA requires).
        Warm-ups write the same keys/values into the same slot as the real step, so they are harmless."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._static_forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = self._static_forward()
        self._graph = graph

    # ------------------------------------------------------------------ dynamic backend
    def _dynamic_initialized(self) -> bool:
        return len(self.cache.layers) > 0 and all(layer.is_initialized for layer in self.cache.layers)

    def _write_dynamic(self, rows_t: torch.Tensor, fresh: DynamicCache, mask: torch.Tensor) -> None:
        k, p = mask.shape
        if not self._dynamic_initialized():  # allocate a zero (all masked) cache of p columns
            data = [
                (
                    layer.keys.new_zeros(self.batch_size, *layer.keys.shape[1:]),
                    layer.values.new_zeros(self.batch_size, *layer.values.shape[1:]),
                )
                for layer in fresh.layers
            ]
            self.cache = DynamicCache(ddp_cache_data=data)
            self._mask2d = torch.zeros(self.batch_size, p, dtype=torch.long, device=self.device)
        elif p > self.cache_len:  # prepend masked columns so the prompt fits into the last p
            n = p - self.cache_len
            for layer in self.cache.layers:
                layer.keys = torch.cat([layer.keys.new_zeros(*layer.keys.shape[:2], n, layer.keys.shape[3]), layer.keys], 2)
                layer.values = torch.cat(
                    [layer.values.new_zeros(*layer.values.shape[:2], n, layer.values.shape[3]), layer.values], 2
                )
            self._mask2d = torch.cat([self._mask2d.new_zeros(self.batch_size, n), self._mask2d], dim=1)
        L = self.cache_len
        for layer, new in zip(self.cache.layers, fresh.layers):
            layer.keys[rows_t, :, L - p :] = new.keys.to(layer.keys.dtype)
            layer.values[rows_t, :, L - p :] = new.values.to(layer.values.dtype)
        row_mask = torch.zeros(k, L, dtype=torch.long, device=self.device)
        row_mask[:, L - p :] = mask
        self._mask2d[rows_t] = row_mask

    def _step_dynamic(self, tokens: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        # During this forward every row's query may look at its own new column, so a row with no
        # valid context (never reset) still has one key to attend to instead of a fully masked row.
        mask = torch.cat([self._mask2d, self._mask2d.new_ones(self.batch_size, 1)], dim=1)
        logits, self.cache = self._forward(
            self.cache,
            input_ids=tokens,
            attention_mask=mask,
            position_ids=self.positions.view(self.batch_size, 1),
        )
        if active is not None:
            mask = torch.cat([self._mask2d, active.to(self.device, torch.long).view(self.batch_size, 1)], dim=1)
        self._mask2d = mask
        self._crop(extra=1)  # step() counts the new column in _span after this
        return logits[:, -1, :]

    def _crop(self, extra: int = 0) -> None:
        """Drop leftmost columns that no row needs any more (they are masked for every row)."""
        keep = max(self.window, int(self._span.max()) + extra)
        excess = self.cache_len - keep
        if excess <= 0:
            return
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, excess:]
            layer.values = layer.values[:, :, excess:]
        self._mask2d = self._mask2d[:, excess:]


class IncrementalLMPool:
    """Hands out :class:`IncrementalLM` objects again across rollouts, so that each batch shape
    allocates its ring cache and, on CUDA, captures its graph (two warm-up forwards and the capture)
    once instead of at every rollout.

    ``pool.get(model, batch_size, window)`` returns an emptied LM (:meth:`IncrementalLM.clear`; its old
    keys and values stay in the ring but are masked, so its logits equal a new LM's). It is the LM the
    pool made before for the same ``(batch_size, window)`` and the autocast dtype in force at the
    call, if that LM still fits ``model``: the same object, in the same training mode, with every
    parameter and buffer at the same address (a captured graph reads them there; ``optimizer.step()``
    and ``load_state_dict`` update them in place and keep it). Otherwise a new LM replaces it, so the
    pool holds one LM per shape. An owner (an agent's :class:`~rlhfgym.agents.common.EnvSampler`)
    drives one rollout at a time: an LM it gets again is one it no longer uses.
    """

    def __init__(self, **lm_kwargs):
        self.lm_kwargs = lm_kwargs  # passed to IncrementalLM (backend, cuda_graph, ...)
        self._lms: dict[tuple, tuple[tuple, IncrementalLM]] = {}

    def get(self, model: torch.nn.Module, batch_size: int, window: int) -> IncrementalLM:
        device_type = next(model.parameters()).device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        key = (int(batch_size), int(window), autocast)
        fits = (model.training, *(t.data_ptr() for t in (*model.parameters(), *model.buffers())))
        held = self._lms.get(key)
        if held is not None and held[1].model is model and held[0] == fits:
            held[1].clear()
            return held[1]
        lm = IncrementalLM(model, batch_size, window, **self.lm_kwargs)
        self._lms[key] = (fits, lm)
        return lm


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Teacher-forced log-probabilities of a batch of sequences under ``model``.

    Args:
        model: a causal LM (gradients flow if they are enabled by the caller).
        input_ids: ``(B, T)`` prompt + completion tokens, padded on either side.
        attention_mask: ``(B, T)`` 0/1, valid tokens. Position ids are derived from it, so left- and
            right-padded batches give the same numbers as unpadded rows.
        completion_mask: ``(B, T)`` 0/1, the tokens whose log-probabilities are wanted (usually the
            completion). Column 0 is never scored (nothing predicts it).

    Returns:
        ``(B, T)`` float32: entry ``[b, t]`` is ``log p(input_ids[b, t] | input_ids[b, :t])`` where
        ``completion_mask[b, t]`` is 1 and 0 elsewhere. Sum over ``t`` for sequence log-probs.
    """
    attention_mask = attention_mask.long()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    # gather - logsumexp avoids materializing a full log_softmax copy of (B, T, V)
    token_lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_lp = token_lp * completion_mask[:, 1:].to(token_lp.dtype)
    return torch.cat([token_lp.new_zeros(input_ids.shape[0], 1), token_lp], dim=1)


@torch.no_grad()
def generate_text(model, tokenizer, prompts, *, max_new_tokens=32, temperature=1.0, num_return_sequences=1, batch_size=256):
    """Completions (text) for prompts with ``model.generate`` (whole batches, no per-row resets);
    greedy when ``temperature == 0``. Encodes and decodes with the package's one convention."""
    device = next(model.parameters()).device
    out = []
    tokenizer.padding_side = "left"
    for s in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[s : s + batch_size], return_tensors="pt", padding=True, add_special_tokens=True).to(device)
        kw = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kw,
        )
        out.extend(decode_completions(tokenizer, gen[:, enc["input_ids"].shape[1]:].tolist()))
    return out


class TokenSampler:
    """The one sampling rule of rlhf-gym, one token at a time, for ``B`` prompts on an
    :class:`IncrementalLM`: :func:`sample_tokens` loops over it on its own, an agent's env rollout
    (``rlhfgym.agents.common.env_rollout``) loops over it acting through the token MDP's ``step``.
    Both draw the same tokens from the same logits in the same order, so for the same torch seed
    they produce the same completions.

    Next-token log-probabilities are ``log_softmax(logits[:, :vocab_size] / temperature)``
    (``mixture.mix`` applied when given); a token is drawn with ``torch.multinomial`` (the global
    torch RNG, one draw for every row each step), or by argmax when ``temperature == 0``.

    Args:
        model: the causal LM that samples (used in its current mode; no gradients are recorded).
        prompt_ids: one token-id list per row, or a ``(B, T)`` left-padded tensor with
            ``attention_mask`` (e.g. the token env's observations).
        window: the longest context a row needs (prompt + generated tokens).
        mixture: optional hook (see :func:`sample_tokens`); it gets ``prompt_ids`` as lists.
        autocast_dtype: run the model's forward passes under :func:`~rlhfgym.envs.hf.mixed_precision`
            to this dtype (e.g. ``torch.bfloat16``); ``None``: in the weights' own dtype.
        pool: optional :class:`IncrementalLMPool` to take the KV cache from (a new one otherwise);
            the sampler uses it until the next sampler takes it from the same pool.
    """

    def __init__(self, model: torch.nn.Module, prompt_ids, *, max_new_tokens: int, window: int, vocab_size: int,
                 temperature: float = 1.0, mixture=None, attention_mask: torch.Tensor | None = None,
                 autocast_dtype: torch.dtype | None = None, pool: IncrementalLMPool | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        self.temperature, self.vocab_size = float(temperature), int(vocab_size)
        self.autocast_dtype, self.device = autocast_dtype, next(model.parameters()).device
        b = len(prompt_ids)
        with self._precision():  # the cache (and a CUDA graph) is made in the dtype the steps compute in
            self.lm = pool.get(model, b, window) if pool is not None else IncrementalLM(model, b, window)
            self.logits = self.lm.reset_rows(range(b), prompt_ids, attention_mask)
            if mixture is not None and isinstance(prompt_ids, torch.Tensor):
                mask = torch.ones_like(prompt_ids) if attention_mask is None else attention_mask
                prompt_ids = [row[m.bool()].tolist() for row, m in zip(prompt_ids.cpu(), mask.cpu())]
            self.mixture = mixture.start(prompt_ids, int(max_new_tokens)) if mixture is not None else None

    @torch.no_grad()
    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the next token of every row: ``(tokens (B,), their log-probabilities (B,))``."""
        logp = torch.log_softmax(self.logits.float()[:, : self.vocab_size] / max(self.temperature, 1e-6), dim=-1)
        if self.mixture is not None:
            logp = self.mixture.mix(logp)
        tok = logp.argmax(-1) if self.temperature == 0 else torch.multinomial(logp.exp(), 1).squeeze(-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    def _precision(self):
        # entered per call, in the calling thread (autocast is thread-local; an agent may step in a worker)
        return mixed_precision(self.device, self.autocast_dtype, cache=False)

    def advance(self, tokens: torch.Tensor, active: torch.Tensor) -> None:
        """Feed the drawn tokens back (rows where ``active`` is False keep their context)."""
        with self._precision():
            self.logits = self.lm.step(tokens, active=active)
            if self.mixture is not None:
                self.mixture.step(tokens, active)


@torch.no_grad()
def sample_tokens(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, window: int,
                  eos_id: int, pad_id: int, vocab_size: int, temperature: float = 1.0, mixture=None,
                  autocast_dtype: torch.dtype | None = None):
    """Sample one completion per prompt token by token with a :class:`TokenSampler` (all rows in
    one batch; greedy when ``temperature == 0``). A row stops after its EOS; its later columns hold
    ``pad_id``. ``mixture`` (optional) changes the distribution sampled from:
    ``mixture.start(prompt_ids, max_new_tokens)`` returns a stepper whose ``mix(logp) -> logp`` maps
    the model's (B, V) log-probs to the sampled ones and whose ``step(tokens, active)`` sees every
    sampled token (Nash-MD's geometric mixture with pi_ref). The model is put in eval mode while
    sampling and given back in the mode it was in. ``autocast_dtype``: as for :class:`TokenSampler`.

    Returns ``(tokens, mask, logprobs, done)``: ``(B, max_new_tokens)`` ids, 1 on sampled tokens (EOS
    included), their log-probabilities under the sampled distribution, and ``(B,)`` whether the row
    ended with EOS.
    """
    device = next(model.parameters()).device
    b, t_max = len(prompt_ids), int(max_new_tokens)
    was_training = model.training
    model.eval()
    sampler = TokenSampler(model, prompt_ids, max_new_tokens=t_max, window=window, vocab_size=vocab_size,
                           temperature=temperature, mixture=mixture, autocast_dtype=autocast_dtype)
    tokens = torch.full((b, t_max), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(b, t_max, device=device)
    mask = torch.zeros(b, t_max, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for t in range(t_max):
        tok, tok_logp = sampler.draw()
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens[:, t] = tok
        logps[:, t] = torch.where(done, 0.0, tok_logp)
        mask[:, t] = (~done).long()
        active = ~done
        done = done | (tok == eos_id)
        if bool(done.all()):
            break
        sampler.advance(tok, active)
    model.train(was_training)
    return tokens, mask, logps, done
