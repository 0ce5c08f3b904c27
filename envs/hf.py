"""The one place rlhf-gym touches version-specific parts of ``transformers`` and ``torch`` devices.

``transformers`` 5.24 renamed the key/value-cache argument of every model's ``forward`` from
``past_key_values`` to ``cache`` (the old name warns and is removed in 5.40), and the model
outputs' ``past_key_values`` field to ``cache``. rlhf-gym supports the range declared in
``pyproject.toml`` (CI tests both ends), so every cached forward pass in the package goes through
:func:`cached_forward`, which uses whichever name the installed release declares.

:func:`quiet_transformers` silences what ``from_pretrained`` prints on every call (the "Loading
weights" bars and load reports) so ``gym.make`` prints nothing the user did not ask for.

:func:`choose_cpu_threads` picks torch's intra-op thread count for small models on the CPU (one
thread), because torch's default (one thread a core) makes a small model's step 6-60x slower as
soon as another process uses a core (``rlhf-zoo bench threads`` measures it).

:func:`mixed_precision` is the one way a forward pass runs in lower precision: ``torch.autocast``
(matrix products in bfloat16, weights and optimizer state kept in their own dtype), as TRL's
``bf16=True`` does through accelerate.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from functools import lru_cache

import torch

__all__ = ["cached_forward", "cache_argument", "quiet_transformers", "resolve_device", "position_ids",
           "choose_cpu_threads", "threads_at_import", "SMALL_MODEL_PARAMETERS", "THREADS_VARIABLE",
           "PRECISIONS", "mixed_precision", "precision_dtype"]

#: an agent's ``precision`` setting -> the dtype its forward passes autocast to (None: no autocast)
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


@lru_cache(maxsize=None)
def _forward_cache_argument(forward_fn) -> str:
    params = inspect.signature(forward_fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(model: torch.nn.Module) -> str:
    """The name of ``model.forward``'s key/value-cache argument: ``"cache"`` (transformers >= 5.24)
    or ``"past_key_values"`` (older releases)."""
    return _forward_cache_argument(type(model).forward)


def cached_forward(model: torch.nn.Module, cache, **inputs):
    """``model(**inputs, use_cache=True)`` with ``cache`` passed under the installed release's name.

    Returns ``(output, cache)``: the model output and the updated cache object it returned.
    """
    out = model(use_cache=True, **{cache_argument(model): cache}, **inputs)
    new_cache = out["cache"] if "cache" in out else out["past_key_values"]
    return out, new_cache


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Within the block, transformers shows no progress bars and logs errors only; the previous
    settings are restored afterwards (a user's own verbosity choice is left as it was)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Parse ``device`` (``None``: CUDA when there is one, else CPU) and check that this machine has
    it; raise a ``ValueError`` that says what to use instead."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:0', ...).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(device)!r} was requested but CUDA is not available here "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use device='cpu'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s); "
                "use device='cuda:0' or device='cpu'."
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={str(device)!r} was requested but MPS is not available here; use device='cpu'.")
    return dev


def precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` name (``None`` for ``"float32"``); a clear error otherwise."""
    if precision not in PRECISIONS:
        hint = (" float16 needs loss scaling, which rlhf-gym does not do; use bfloat16 (CPUs and Ampere or newer GPUs)."
                if precision == "float16" else "")
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.{hint}")
    return PRECISIONS[precision]


def mixed_precision(device: str | torch.device, dtype: torch.dtype | None, *, cache: bool = True):
    """A context in which forward passes on ``device`` autocast to ``dtype`` (matrix products and
    attention in that dtype, reductions such as softmax in float32, weights untouched); no change when
    ``dtype`` is None or float32. Autocast is thread-local: enter it in the thread that runs the model.
    ``cache=False`` recasts the weights at every use instead of keeping the casts for the block, which
    a CUDA graph captured inside the block needs (the cached casts would be freed when it ends)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=cache)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, 2, ... over the valid (mask == 1) tokens of each row; padding gets 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


# ---------------------------------------------------------------------------------------------- CPU threads

#: below this many parameters a model runs on one CPU thread unless the user chose otherwise
SMALL_MODEL_PARAMETERS = 20_000_000
#: the environment variable that chooses the thread count: a number, or "torch" for torch's own default
THREADS_VARIABLE = "RLHFGYM_NUM_THREADS"
_THREADS_AT_IMPORT = torch.get_num_threads()
_threads_chosen = False


def threads_at_import() -> int:
    """torch's intra-op thread count when rlhf-gym was imported (torch's default, unless the user had set it)."""
    return _THREADS_AT_IMPORT


def choose_cpu_threads(model: torch.nn.Module, device: str | torch.device) -> int:
    """Set torch's intra-op threads for ``model`` on ``device`` once per process; returns the count in use.

    The small models of the micro world do a few small matrix products a token: splitting them over
    every core buys little on a quiet machine and, when another process holds a core, makes each
    step wait for the slowest thread (one ``env.step`` of 32 rows measured 6x slower with torch's
    default two threads than with one while another job ran; 40-60x has been seen). So, on the CPU:

    * ``RLHFGYM_NUM_THREADS=N`` sets N threads; ``RLHFGYM_NUM_THREADS=torch`` leaves torch's default;
    * else ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, or a ``torch.set_num_threads`` call made after
      rlhf-gym was imported, are the user's choice and are left alone;
    * else a model below :data:`SMALL_MODEL_PARAMETERS` parameters gets one thread.

    Only the first call decides (later envs and agents in the process keep the choice), so a
    ``torch.set_num_threads`` call after ``gym.make`` always wins. GPU devices are left alone.
    """
    global _threads_chosen
    import os

    if _threads_chosen or torch.device(device).type != "cpu":
        return torch.get_num_threads()
    _threads_chosen = True
    wanted = os.environ.get(THREADS_VARIABLE, "").strip()
    if wanted:
        if wanted == "torch":
            return torch.get_num_threads()
        if not wanted.isdigit() or int(wanted) < 1:
            raise ValueError(f"{THREADS_VARIABLE}={wanted!r}: use a number of threads >= 1, or 'torch' for torch's default.")
        torch.set_num_threads(int(wanted))
    elif any(os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        pass
    elif torch.get_num_threads() != _THREADS_AT_IMPORT:
        pass  # set by the user since rlhf-gym was imported
    elif sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
    return torch.get_num_threads()

