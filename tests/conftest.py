"""Shared offline fixtures: a toy task, a word-level tokenizer and a tiny random causal LM.

Nothing is downloaded; everything is built in a session temp dir in well under a second.

* ``toy_task``: a :class:`ToyTask` (``Task`` subclass) with short procedural prompts of varying
  length ("summarize : ana bought 3 boats in oslo . tl;dr :") and a gold scorer in [-1, 1].
* ``tiny_tokenizer``: a ``PreTrainedTokenizerFast`` (WordLevel, whitespace split) covering the toy
  task's words, with pad "<pad>", eos "<eos>", unk "<unk>" (as in the micro assets).
* ``tiny_tokenizer_dir``: where it is saved (``AutoTokenizer.from_pretrained`` works on it).
* ``tiny_lm_dir``: a 2-layer random ``LlamaForCausalLM`` (hidden 32) saved with
  ``save_pretrained``, together with the tokenizer, so both load from the same path.
* ``tiny_lm``: a fresh copy of that model, loaded from ``tiny_lm_dir`` (eval mode, CPU).
* ``fb_tokenizer``, ``fb_lm_dir``: the feedback tests' tokenizer (marker words "good"/"bad", answer
  letters) and a tiny random LM saved with it (tests/feedback_fixtures.py builds them).
"""

from __future__ import annotations

import random

import pytest

from feedback_fixtures import make_lm, make_tokenizer
from rlhfgym.envs.tasks.base import SPLITS, Task

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
NAMES = ["ana", "ben", "cai", "dora", "emil"]
ITEMS = ["boats", "cars", "ovens", "houses"]
PLACES = ["oslo", "bram", "holt", "ebbing"]
VERBS = ["bought", "sold", "built"]
NUMBERS = [str(i) for i in range(1, 10)]
TOY_VOCAB = [PAD, EOS, UNK, "summarize", ":", "tl;dr", ".", "in", "today", ",", *NAMES, *ITEMS, *PLACES, *VERBS, *NUMBERS]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Builds keep their resumable state under $RLHF_GYM_CACHE: a temp dir, never the user's cache."""
    import os

    old = os.environ.get("RLHF_GYM_CACHE")
    os.environ["RLHF_GYM_CACHE"] = str(tmp_path_factory.mktemp("rlhf-gym-cache"))
    yield
    if old is None:
        os.environ.pop("RLHF_GYM_CACHE", None)
    else:
        os.environ["RLHF_GYM_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every test runs torch on one thread: its models are tiny (more threads only add overhead)
    and CI machines are shared (oversubscribed threads crawl)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ToyTask(Task):
    """Tiny procedural summarization task: one to three "who did what where" sentences per prompt.

    The gold score rewards mentioning the first sentence's four key words (name, number, item,
    place) and penalizes extra words: ``2 * recall - 1 - 0.05 * extra``, clipped to [-1, 1].
    """

    name = "toy"
    answer_cue = "tl;dr :"
    sizes = {"train": 24, "validation": 8, "test": 8}

    def split_size(self, split: str) -> int:
        self.check_split(split)
        return self.sizes[split]

    def _facts(self, split: str, index: int) -> list[tuple[str, str, str, str, str]]:
        rng = random.Random(f"toy-{split}-{index}")
        return [
            (rng.choice(NAMES), rng.choice(VERBS), rng.choice(NUMBERS), rng.choice(ITEMS), rng.choice(PLACES))
            for _ in range(1 + index % 3)
        ]

    def prompt(self, split: str, index: int) -> str:
        self.check_split(split)
        if not 0 <= index < self.sizes[split]:
            raise IndexError(f"prompt {index} is outside split {split!r} of size {self.sizes[split]}.")
        sentences = " ".join(f"{n} {v} {k} {i} in {p} ." for n, v, k, i, p in self._facts(split, index))
        return f"summarize : {sentences} tl;dr :"

    def gold_one(self, prompt: str, completion: str) -> float:
        words = prompt.split()
        first = words[2:9]  # name verb number item in place .
        key = {first[0], first[2], first[3], first[5]}
        said = completion.split()
        recall = len(key & set(said)) / len(key)
        extra = max(0, len(said) - 7)
        return max(-1.0, min(1.0, 2 * recall - 1 - 0.05 * extra))


def make_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TOY_VOCAB)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def make_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, pad_id: int = 0, eos_id: int = 1):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def toy_task() -> ToyTask:
    assert set(SPLITS) == set(ToyTask.sizes)
    return ToyTask()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny_lm")
    model = make_tiny_llama(len(tiny_tokenizer), pad_id=tiny_tokenizer.pad_token_id, eos_id=tiny_tokenizer.eos_token_id)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()


@pytest.fixture(scope="session")
def fb_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def fb_lm_dir(tmp_path_factory, fb_tokenizer):
    """A saved tiny random causal LM + tokenizer (save_pretrained format), like an SFT checkpoint."""
    path = tmp_path_factory.mktemp("tiny_lm")
    make_lm(fb_tokenizer).save_pretrained(path)
    fb_tokenizer.save_pretrained(path)
    return path
