"""IncrementalLM and sequence_logprobs agree with plain full forward passes."""

from __future__ import annotations

import pytest
import torch

from rlhfgym.envs.lm import IncrementalLM, IncrementalLMPool, sequence_logprobs

V = 40


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0):
    from conftest import make_tiny_llama

    return make_tiny_llama(V, seed=seed)


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
BACKENDS = ["static", "dynamic"]


def full_next_logits(model, tokens: list[int]) -> torch.Tensor:
    """Reference: the row alone, unpadded, no cache."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_staggered_resets_match_full_forward(arch, backend):
    """Rows reset at different times, with inactive steps and a rolling window, still give each
    row's own unpadded logits (learned positions in GPT-2 need the explicit position_ids too)."""
    model = MODELS[arch]()
    B, W = 3, 10
    lm = IncrementalLM(model, batch_size=B, window=W, backend=backend)
    assert lm.backend == backend
    g = torch.Generator().manual_seed(0)
    history: list[list[int]] = [[] for _ in range(B)]
    worst = 0.0

    def check(row: int, logits: torch.Tensor) -> None:
        nonlocal worst
        worst = max(worst, (logits - full_next_logits(model, history[row])).abs().max().item())

    prompts = [[2, 3, 4], [5, 6], [7, 8, 9, 10, 11]]
    logits = lm.reset_rows([0, 1, 2], prompts)
    for r in range(B):
        history[r] = list(prompts[r])
        check(r, logits[r])
    checked_after_crop = False
    for t in range(40):
        tokens = torch.randint(0, V, (B,), generator=g)
        active = torch.rand(B, generator=g) > 0.25
        logits = lm.step(tokens, active)
        for r in range(B):
            if active[r]:
                history[r].append(int(tokens[r]))
                check(r, logits[r])
                checked_after_crop |= t > W
        # restart rows whose context (inactive columns included) nearly fills the window, plus one
        # row every 5 steps, with prompts of 1..6 tokens
        rows = [r for r in range(B) if lm._span[r] >= W - 1 or (t % 5 == 2 and r == t % B)]
        if rows:
            new = [torch.randint(0, V, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist() for _ in rows]
            logits_reset = lm.reset_rows(rows, new)
            for j, r in enumerate(rows):
                history[r] = new[j]
                check(r, logits_reset[j])
        assert lm.cache_len <= W
        assert lm.attention_mask.sum(1).tolist() == [len(h) for h in history]
    assert checked_after_crop
    assert worst < 1e-4, f"{arch}: max |logit difference| {worst}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_without_mask_and_tensor_prompts(backend):
    """reset_rows accepts left-padded tensors (e.g. env observations) and a full-batch step."""
    model = tiny_llama()
    lm = IncrementalLM(model, batch_size=2, window=8, backend=backend)
    ids = torch.tensor([[0, 0, 5, 6, 7], [0, 2, 3, 4, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    logits = lm.reset_rows(torch.tensor([0, 1]), ids, mask)
    if backend == "dynamic":
        assert lm.cache_len == 4  # the all-padding leading column is dropped
    torch.testing.assert_close(logits[0], full_next_logits(model, [5, 6, 7]), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1], full_next_logits(model, [2, 3, 4, 9]), atol=1e-4, rtol=0)
    logits = lm.step(torch.tensor([11, 12]))
    torch.testing.assert_close(logits[0], full_next_logits(model, [5, 6, 7, 11]), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1], full_next_logits(model, [2, 3, 4, 9, 12]), atol=1e-4, rtol=0)


def test_dynamic_window_bounds_cache_length():
    model = tiny_llama()
    lm = IncrementalLM(model, batch_size=2, window=6, backend="dynamic")
    for t in range(30):
        if t % 4 == 0:
            lm.reset_rows([0, 1], [[2, 3], [4]])
        lm.step(torch.tensor([5, 6]))
        assert lm.cache_len <= 6


def test_static_backend_is_a_sliding_window():
    """Past the window, the static ring keeps each row's last `window` tokens (documented)."""
    model = tiny_llama()
    lm = IncrementalLM(model, batch_size=1, window=4, backend="static")
    lm.reset_rows([0], [[2, 3]])
    for tok in [4, 5, 6]:
        logits = lm.step(torch.tensor([tok]))
    assert lm.attention_mask.tolist() == [[1, 1, 1, 1]]  # tokens 3, 4, 5, 6; token 2 was overwritten
    assert lm.positions.tolist() == [5] and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="does not fit the window of 4"):
        lm.reset_rows([0], [[2, 3, 4, 5, 6]])


def _decode(lm: IncrementalLM) -> torch.Tensor:
    """Logits of a fixed run: staggered resets and an inactive row."""
    steps = [lm.reset_rows([0, 1, 2], [[2, 3, 4], [5, 6], [7, 8, 9, 10]])]
    for t in range(12):
        if t == 5:
            steps.append(lm.reset_rows([1], [[11, 12, 13]]))
        steps.append(lm.step(torch.tensor([t + 3, t + 4, t + 5]), active=torch.tensor([True, True, t % 3 > 0])))
    return torch.cat(steps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pooled_lm_is_reused_only_while_it_fits_and_decodes_as_a_new_one(backend):
    model = tiny_llama()
    pool = IncrementalLMPool(backend=backend)
    lm = pool.get(model, 3, 16)
    first = _decode(lm)
    assert pool.get(model, 3, 16) is lm  # the same shape again: the same LM, emptied
    assert torch.equal(_decode(lm), first)  # its old keys and values change nothing
    with torch.no_grad():  # an in-place update (what optimizer.step() does) keeps it, and it reads the new weights
        for p in model.parameters():
            p.mul_(1.1)
    assert pool.get(model, 3, 16) is lm
    updated = _decode(lm)
    assert not torch.allclose(updated, first)
    assert torch.equal(updated, _decode(IncrementalLM(model, 3, 16, backend=backend)))
    # what it does not fit: another shape, mode, model, autocast dtype or a moved parameter
    assert pool.get(model, 4, 16) is not lm and pool.get(model, 3, 20) is not lm
    assert pool.get(model.train(), 3, 16) is not lm
    model.eval()
    other = tiny_llama(seed=1)
    in_float32 = pool.get(other, 3, 16)
    assert in_float32.model is other
    with torch.autocast("cpu", dtype=torch.bfloat16):  # its cache and graph are made in bf16: one of its own
        in_bfloat16 = pool.get(other, 3, 16)
        assert in_bfloat16 is not in_float32 and pool.get(other, 3, 16) is in_bfloat16
    assert pool.get(other, 3, 16) is in_float32
    other.lm_head.weight = torch.nn.Parameter(other.lm_head.weight.detach().clone())
    assert pool.get(other, 3, 16) is not in_float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_rows_rejects_bad_input(backend):
    lm = IncrementalLM(tiny_llama(), batch_size=2, window=6, backend=backend)
    with pytest.raises(ValueError, match="at least one token"):
        lm.reset_rows([0], [[]])
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 2\)"):
        lm.reset_rows([2], [[3]])
    with pytest.raises(ValueError, match="one prompt per row"):
        lm.reset_rows([0, 1], [[3]])


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_sequence_logprobs_padding_invariant(arch):
    model = MODELS[arch]()
    rows = [[2, 3, 4, 5, 6], [7, 8, 9]]
    prompt_len = [3, 1]
    T = 6
    # left-padded batch
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    comp = torch.zeros(2, T, dtype=torch.long)
    for b, (x, p) in enumerate(zip(rows, prompt_len)):
        ids[b, T - len(x) :] = torch.tensor(x)
        mask[b, T - len(x) :] = 1
        comp[b, T - len(x) + p :] = 1
    with torch.no_grad():
        lp = sequence_logprobs(model, ids, mask, comp)
    assert lp.shape == (2, T) and lp.dtype == torch.float32
    for b, (x, p) in enumerate(zip(rows, prompt_len)):
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0].float(), -1)
        expected = sum(ref[t - 1, x[t]].item() for t in range(p, len(x)))
        assert abs(lp[b].sum().item() - expected) < 1e-4
        assert (lp[b][comp[b] == 0] == 0).all()
