"""The one small interface every learner implements, and the agent registry.

An agent owns a policy (usually a :class:`~rlhfgym.agents.policy.CausalLMPolicy`) and trains it
against an rlhf-gym environment::

    agent = rlhfgym.agents.make("ppo", env=env, learning_rate=1e-4)
    agent.learn(env, budget=20_000)
    agent.generate(["summarize : ... tl;dr :"])
    agent.save("runs/ppo"); agent = rlhfgym.agents.load("runs/ppo")

``budget`` is counted in **completions**: every completion the agent samples from a policy, or
consumes from a dataset (a preference pair counts two), costs one unit. Algorithms are compared
at equal budgets this way, whatever they do with the samples.

External packages add agents through the entry-point group ``rlhfgym.agents``::

    [project.entry-points."rlhfgym.agents"]
    my_agent = "my_package.agent:MyAgent"
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

#: 2: ``agent.json`` lists every other file of the saved agent with its sha256 and size (``files``),
#: checked on load and resume; 1 (rlhf-gym 0.1, no ``files``) is still read, without the checksums
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
CONFIG_FILE = "agent.json"
#: hyperparameters added after agents and zoo runs were first saved, with the value every earlier one
#: had: a saved config or run identity without the key means this value (resume and run identities read it so)
ADDED_HYPERPARAMETERS = {"precision": "float32"}


class AgentError(ValueError):
    """A bad hyperparameter, budget, checkpoint or policy/env mismatch."""


class Agent(ABC):
    """Base class of all learners.

    Subclasses set :attr:`name`, declare their hyperparameters as keyword arguments of
    ``__init__`` (validated there, with errors that say the allowed range), store them in
    ``self.config`` (a JSON-serialisable dict), and implement :meth:`learn`.

    ``callback(agent, metrics: dict) -> bool | None`` is called after each update; returning
    ``False`` stops training early.

    ``precision`` (``"float32"`` or ``"bfloat16"``) is how the policy's forward passes compute: in
    bfloat16 under ``torch.autocast`` (weights, gradients and optimizer state stay float32; TRL's
    ``bf16=True``), or in float32. It is a hyperparameter like the others (``--hp precision=bfloat16``).
    """

    name: str = "agent"

    def __init__(self, policy=None, *, device: str = "cpu", seed: int = 0, precision: str = "float32", **config: Any):
        from rlhfgym.envs.hf import precision_dtype

        try:
            self._autocast_dtype = precision_dtype(precision)
        except ValueError as e:
            raise AgentError(f"{self.name}: {e}") from None
        self.policy = policy
        self.device = device
        self.seed = int(seed)
        self.config: dict[str, Any] = {"device": device, "seed": self.seed, "precision": precision, **config}
        self.spent = 0  # completions sampled or consumed so far
        self.train_seconds = 0.0  # wall seconds in learn() so far, over resumes (kept by TrainingRun)

    # ------------------------------------------------------------------ learning
    @abstractmethod
    def learn(self, env, budget: int, callback: Callable[["Agent", dict], bool | None] | None = None) -> "Agent":
        """Train on ``env`` until ``budget`` completions are spent (or the callback says stop)."""

    def policy_for(self, env, **from_env: Any):
        """This agent's policy, made from the env's reference model on first use
        (``CausalLMPolicy.from_env(env, device=self.device, **from_env)``), after checking that it
        speaks the env's tokens (:func:`check_policy_env`)."""
        if self.policy is None:
            from .policy import CausalLMPolicy

            self.policy = CausalLMPolicy.from_env(env, device=self.device, **from_env)
        check_policy_env(self, self.policy, env)
        self._set_precision()
        return self.policy

    def _set_precision(self) -> None:
        if hasattr(self.policy, "autocast_dtype"):  # a CausalLMPolicy (a custom agent's policy may be anything)
            self.policy.autocast_dtype = self._autocast_dtype

    def check_budget(self, budget: int) -> int:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
            raise AgentError(f"{self.name}: budget must be a positive number of completions, got {budget!r}.")
        return budget

    # ------------------------------------------------------------------ acting
    def generate(self, prompts: Sequence[str], *, temperature: float = 1.0, max_new_tokens: int | None = None) -> list[str]:
        """Completions for ``prompts`` from the current policy (greedy when ``temperature == 0``)."""
        if self.policy is None:
            raise AgentError(f"{self.name}: no policy yet; call learn(env, budget) or load(dir) first.")
        return self.policy.generate_text(prompts, temperature=temperature, max_new_tokens=max_new_tokens)

    def predict(self, obs, deterministic: bool = False):
        """Next-token actions for token-env observations (a dict with ``input_ids``/``attention_mask``)."""
        if self.policy is None:
            raise AgentError(f"{self.name}: no policy yet; call learn(env, budget) or load(dir) first.")
        return self.policy.act(obs, deterministic=deterministic)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Save the policy (Hugging Face ``save_pretrained`` format) and the agent's config, atomically.

        ``agent.json`` is written last and lists the sha256 and size of every other file
        (:func:`verify_agent_files` checks them on load and resume)."""
        from rlhfgym.envs.assets import atomic_save_dir, atomic_write_text

        directory = Path(directory)
        with atomic_save_dir(directory) as tmp:
            if self.policy is not None:
                self.policy.save(Path(tmp) / "policy")
            self.save_extra(Path(tmp))
            meta = {"format": FORMAT_VERSION, "agent": self.name, "spent": self.spent, "config": self.config,
                    "train_seconds": round(float(self.train_seconds), 3), "files": _file_digests(Path(tmp))}
            atomic_write_text(Path(tmp) / CONFIG_FILE, json.dumps(meta, indent=2))
        return directory

    def save_extra(self, directory: Path) -> None:
        """Hook: write algorithm state beside the policy (optimizer, controller, ...)."""

    def load_extra(self, directory: Path) -> None:
        """Hook: read what :meth:`save_extra` wrote."""

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None) -> "Agent":
        """Load an agent saved with :meth:`save` (use :func:`rlhfgym.agents.load` when the class is unknown)."""
        directory = Path(directory)
        meta = read_agent_config(directory)
        if meta["agent"] != cls.name and cls is not Agent:
            raise AgentError(f"{directory} holds a {meta['agent']!r} agent, not {cls.name!r}; use rlhfgym.agents.load().")
        config = dict(meta["config"])
        if device is not None:
            config["device"] = device
        agent = cls(**config)
        agent.restore(directory, meta)
        return agent

    def restore(self, directory: str | os.PathLike, meta: dict | None = None) -> dict:
        """Take the policy, ``spent`` and the extra state (:meth:`load_extra`) of the agent saved in
        ``directory`` into this one, after checking its files (:func:`verify_agent_files`); returns its
        ``agent.json``. :meth:`load` and a resumed training run both restore this way."""
        from .policy import CausalLMPolicy

        directory = Path(directory)
        meta = read_agent_config(directory) if meta is None else meta
        verify_agent_files(directory, meta)
        spent = int(meta.get("spent", 0))
        policy_dir = directory / "policy"
        if policy_dir.exists():
            try:
                self.policy = CausalLMPolicy.from_pretrained(policy_dir, device=self.config.get("device", self.device))
            except Exception as e:
                weights = policy_dir / "model.safetensors"
                where = weights if "safetensor" in f"{type(e).__name__} {e}".lower() and weights.exists() else policy_dir
                raise AgentError(f"{where} could not be loaded ({type(e).__name__}: {e}); {_fix(directory)}") from e
        elif meta.get("format") == 1 and spent > 0:  # format 2 lists the policy's files: verify_agent_files said it
            raise AgentError(f"{directory} has trained {spent} completions but its policy/ is missing; {_fix(directory)}")
        self.spent = spent
        self.train_seconds = float(meta.get("train_seconds", 0.0))  # absent before it was recorded
        self._set_precision()
        self.load_extra(directory)
        return meta


def _fix(directory: Path) -> str:
    return (f"delete the checkpoint {directory} (or its whole run directory) to train again from the start, "
            "or restore it from a copy")


def _file_digests(root: Path) -> dict[str, dict]:
    """``{relative/posix/path: {"sha256", "size"}}`` of every file under ``root`` but ``agent.json``."""
    from rlhfgym.envs.assets import sha256_file

    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != CONFIG_FILE:
            out[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return out


def verify_agent_files(directory: str | os.PathLike, meta: dict | None = None) -> None:
    """Raise :class:`AgentError`, naming the file and the fix, unless every file ``agent.json`` lists
    is in ``directory`` with its recorded size and sha256 (format 1 lists none: nothing to check)."""
    from rlhfgym.envs.assets import sha256_file

    directory = Path(directory)
    meta = read_agent_config(directory) if meta is None else meta
    files = meta.get("files")
    if files is None and meta.get("format") != 1:
        raise AgentError(f"{directory / CONFIG_FILE} lists no files (it should list every file with its sha256); "
                         f"{_fix(directory)}")
    for rel, want in (files or {}).items():
        path = directory / rel
        if not path.is_file():
            raise AgentError(f"{path} is missing from the saved agent {directory} ({CONFIG_FILE} lists it); {_fix(directory)}")
        size = path.stat().st_size
        if size != want.get("size", size) or sha256_file(path) != want.get("sha256"):
            raise AgentError(
                f"{path} is corrupted: its sha256 differs from the one recorded in {directory / CONFIG_FILE} when it was "
                f"saved ({size} bytes, {want.get('size')} saved); {_fix(directory)}"
            )


def read_agent_config(directory: str | os.PathLike) -> dict:
    """The ``agent.json`` of a saved agent, checked: a JSON object of a format this rlhf-gym reads, with
    ``agent`` and ``config``; errors name the file and the fix."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.exists():
        raise AgentError(f"{directory} is not a saved agent (no {CONFIG_FILE}); save one with agent.save(dir).")
    text = path.read_text(errors="replace")
    try:
        meta = json.loads(text)
    except ValueError as e:
        what = "empty" if not text.strip() else f"not valid JSON ({e})"
        raise AgentError(f"{path} is {what}: a truncated or damaged save; {_fix(directory)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("agent"), str) or not isinstance(meta.get("config"), dict):
        raise AgentError(f"{path} is not an agent's {CONFIG_FILE} (it needs 'format', 'agent' and 'config'); "
                         f"{_fix(directory)}")
    if meta.get("format") not in READABLE_FORMATS:
        raise AgentError(
            f"{path} was written by agent format {meta.get('format')!r}, this rlhf-gym reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}; retrain, or load it with the rlhf-gym version that wrote it."
        )
    return meta


# ---------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Agent] | str | "_Conflict"] = {}
_ENTRY_POINTS_LOADED = False


class _Conflict:
    """Two different targets claim one name (``register()`` and an entry point, or two entry points);
    :func:`agent_class` imports both and raises unless they turn out to be the same class."""

    def __init__(self, first: type[Agent] | str, first_from: str, second: str, second_from: str):
        self.first, self.first_from, self.second, self.second_from = first, first_from, second, second_from


def _qualified(target: type | str) -> str:
    """``"module:QualName"`` of a class; a target string as it is."""
    return target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def _import_target(target: str):
    """The object a ``"module:attr"`` string names (importing the module)."""
    import importlib

    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def _imported_target(target: type | str):
    """The object ``target`` names when its module is already (fully enough) imported, else None; imports nothing."""
    if not isinstance(target, str):
        return target
    import sys

    module, _, attr = target.partition(":")
    obj = sys.modules.get(module)
    for part in attr.split(".") if attr and obj is not None else ():
        obj = getattr(obj, part, None)
    return obj


def _module_importing(target: str) -> bool:
    """``target``'s module is being imported right now: in ``sys.modules`` but its attribute is not defined yet."""
    import sys

    return target.partition(":")[0] in sys.modules and _imported_target(target) is None


def _same_agent(a: type | str, b: type | str) -> bool:
    if a is b or _qualified(a) == _qualified(b):
        return True
    ra = _imported_target(a)
    return ra is not None and ra is _imported_target(b)


def register(name: str, cls: type[Agent] | str, *, override: bool = False) -> None:
    """Register an agent class (or a ``"module:Class"`` string, imported on first use) under ``name``.

    Registering the same class again under the same name is a no-op, so a module may both call
    ``register()`` when imported and be named by an entry point of the same name. Another class
    under a taken name is an error unless ``override=True``.
    """
    if not isinstance(name, str) or not name.strip():
        raise AgentError(f"an agent name must be a non-empty string, got {name!r}.")
    if isinstance(cls, str):
        if ":" not in cls or not all(cls.partition(":")[::2]):
            raise AgentError(f"register({name!r}, {cls!r}): a target string is 'module:Class', e.g. 'my_package.ppo:MyPPO'.")
    elif not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise AgentError(f"register({name!r}, {cls!r}): an agent is a subclass of rlhfgym.agents.Agent (or a 'module:Class' string).")
    existing = _REGISTRY.get(name)
    if existing is None or override:
        _REGISTRY[name] = cls
        return
    if isinstance(existing, _Conflict):
        raise AgentError(f"{_conflict_message(name, existing)} Registering {_qualified(cls)} too does not resolve it.")
    if _same_agent(existing, cls):
        if not isinstance(cls, str):
            _REGISTRY[name] = cls  # the class itself from now on: nothing left to import
        return
    if isinstance(existing, str) and not isinstance(cls, str) and _module_importing(existing):
        # the module an entry point names is registering while it is imported: agent_class() checks, once
        # the import is done, that the entry point's class is this one
        _REGISTRY[name] = cls
        return
    raise AgentError(
        f"an agent named {name!r} is already registered ({_qualified(existing)}); cannot register {_qualified(cls)} "
        "under the same name: pick another name, or pass override=True to replace it."
    )


def _conflict_message(name: str, c: _Conflict) -> str:
    return (f"agent {name!r} is claimed twice: {_qualified(c.first)} ({c.first_from}) and {c.second} ({c.second_from}); "
            "rename one of them, or uninstall the package you do not want.")


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group="rlhfgym.agents"):
        existing = _REGISTRY.get(ep.name)
        if existing is None:
            _REGISTRY[ep.name] = ep.value
        elif not isinstance(existing, _Conflict) and not _same_agent(existing, ep.value):
            dist = getattr(getattr(ep, "dist", None), "name", None)
            where = f"entry point of {dist!r}" if dist else "an entry point"
            _REGISTRY[ep.name] = _Conflict(existing, "registered first", ep.value, where)


def registered() -> list[str]:
    """Names of every known agent (built-in, registered, and from installed entry points)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def _resolve(name: str, target: str):
    try:
        return _import_target(target)
    except (ImportError, AttributeError) as e:
        raise AgentError(f"agent {name!r} names {target}, which cannot be imported ({type(e).__name__}: {e}); "
                         "reinstall the package that provides it.") from e


def agent_class(name: str) -> type[Agent]:
    """The class registered under ``name`` (imported now if it was registered as a string)."""
    _load_entry_points()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise AgentError(f"unknown agent {name!r}{hint}; known agents: {', '.join(registered())}. "
                         "Register a new one with rlhfgym.agents.register(name, cls) or an 'rlhfgym.agents' entry point.")
    cls = _REGISTRY[name]
    if isinstance(cls, _Conflict):
        first = cls.first if not isinstance(cls.first, str) else _resolve(name, cls.first)
        if first is not _resolve(name, cls.second):
            raise AgentError(_conflict_message(name, cls))
        _REGISTRY[name] = cls = first
    if isinstance(cls, str):
        target = cls
        cls = _resolve(name, target)
        current = _REGISTRY.get(name)
        if not isinstance(current, str) and current is not cls:  # its module registered another class while imported
            raise AgentError(f"agent {name!r}: the entry point names {target} ({_qualified(cls)}), but importing it "
                             f"registered {_qualified(current)} under the same name; make them one class, or rename one.")
        _REGISTRY[name] = cls
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise AgentError(f"agent {name!r} resolves to {cls!r}, which is not a subclass of rlhfgym.agents.Agent.")
    return cls


def check_constructor(name: str, cls: type[Agent], keywords) -> None:
    """Raise :class:`AgentError` unless ``cls(**{k: ... for k in keywords})`` can bind every keyword.

    The contract: an agent's constructor accepts ``device`` and ``seed`` (the zoo passes both; the
    :class:`Agent` base takes them), and its hyperparameters as keywords.
    """
    import inspect

    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: let the call itself decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in keywords if k not in accepted]
    contract = [k for k in ("device", "seed") if k in unknown]
    if contract:
        raise AgentError(
            f"agent {name!r} ({_qualified(cls)}): its constructor does not accept {' and '.join(contract)}; every agent's "
            "__init__ must take the keywords device and seed (the zoo passes them) and hand them to Agent.__init__, "
            "e.g. def __init__(self, my_param=1.0, **kw): super().__init__(my_param=my_param, **kw)."
        )
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, accepted, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        takes = ", ".join(a for a in accepted if a != "policy")
        raise AgentError(f"{name}: unknown hyperparameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                         f"{name} takes {takes}.")


def check_learn(name: str, cls: type[Agent]) -> None:
    """Raise :class:`AgentError` unless ``agent.learn(env, budget, callback)`` can bind: the zoo passes the
    callback that logs, checkpoints and stops a run, so an agent that cannot take it cannot run in the zoo."""
    import inspect

    try:
        inspect.signature(cls.learn).bind(None, "env", 1, None)
    except TypeError:
        raise AgentError(
            f"agent {name!r} ({_qualified(cls)}): learn{inspect.signature(cls.learn)} cannot be called as "
            "learn(env, budget, callback); declare def learn(self, env, budget, callback=None, **kw) and call "
            "callback(self, info) after each update (see Agent.learn)."
        ) from None
    except ValueError:  # no introspectable signature: let the call itself decide
        return


def make(name: str, **hyperparams: Any) -> Agent:
    """Create a registered agent by name with its hyperparameters (checked against its constructor and
    its ``learn`` signature first)."""
    cls = agent_class(name)
    check_constructor(name, cls, hyperparams)
    check_learn(name, cls)
    return cls(**hyperparams)


def load(directory: str | os.PathLike, device: str | None = None) -> Agent:
    """Load any saved agent; the class is read from the checkpoint."""
    meta = read_agent_config(Path(directory))
    return agent_class(meta["agent"]).load(directory, device=device)


# ---------------------------------------------------------------------------------------------- policy/env check


def check_policy_env(agent: Agent, policy, env) -> None:
    """Raise :class:`AgentError` unless ``policy`` speaks the env's tokens (same vocabulary and EOS)."""
    env_tok, tok = env.unwrapped.tokenizer, policy.tokenizer
    if tok is env_tok:
        return
    if tok.get_vocab() != env_tok.get_vocab() or tok.eos_token_id != env_tok.eos_token_id:
        raise AgentError(
            f"{agent.name}: the policy's tokenizer ({len(tok)} tokens, eos id {tok.eos_token_id}) is not the env's "
            f"({len(env_tok)} tokens, eos id {env_tok.eos_token_id}); the env scores token ids, so start from the "
            "env's reference model (CausalLMPolicy.from_env(env)) or a model trained with its tokenizer."
        )

