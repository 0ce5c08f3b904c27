"""Tiny, offline fixtures for the feedback tests (labelers, reward / preference models, judge).

A word-level tokenizer and a 2-layer random Llama built in a temp dir: no downloads, seconds on CPU.
The fixtures built from them (``fb_tokenizer``, ``fb_lm_dir``) live in conftest.py.
"""

from __future__ import annotations

import random

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
WORDS = [f"w{i}" for i in range(24)]
MARKER, ANTI = "good", "bad"
VOCAB = [PAD, EOS, UNK, "summarize", ":", "tl;dr", MARKER, ANTI, "A", "B", "(", ")", *WORDS]


def make_tokenizer(vocab=VOCAB):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def make_lm(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def marker_preferences(n: int, seed: int):
    """Pairs where the chosen completion contains the marker word and the rejected one does not."""
    from rlhfgym.envs.feedback.preferences import make_preferences

    rng = random.Random(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        prompts.append("summarize : " + " ".join(rng.choices(WORDS, k=rng.randint(3, 6))) + " tl;dr :")
        good = rng.choices(WORDS, k=rng.randint(3, 6))
        good.insert(rng.randrange(len(good) + 1), MARKER)
        bad = rng.choices(WORDS, k=rng.randint(3, 6))
        chosen.append(" ".join(good))
        rejected.append(" ".join(bad))
    return make_preferences(prompts, chosen, rejected, labeler_id="marker-rule")
