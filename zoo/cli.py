"""``rlhf-zoo``: the command line of the zoo.

Each subcommand is one :class:`Command`: a name, a one-line help, a function that adds its
arguments, and a function that runs it. ``run`` imports the implementation *inside* the function,
so ``rlhf-zoo --help`` never imports torch or transformers and answers instantly.

Adding a subcommand (``train``, ``leaderboard``, ``plot``, ...)::

    def _train_args(p):
        p.add_argument("algo")
        p.add_argument("env_id")

    def _train(args):
        from rlhfgym.zoo.train import train   # lazy: heavy imports happen here
        train(args.algo, args.env_id)

    COMMANDS.append(Command("train", "train an agent", _train_args, _train))

Errors caused by user input (``ValueError`` or any exception class defined in an ``rlhfgym``
module, plus gymnasium's registry errors) print one line to stderr and exit with status 2; pass
``--debug`` to see the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROG = "rlhf-zoo"
USER_ERROR_EXIT = 2
SPLITS = ("train", "validation", "test")  # = rlhfgym.envs.tasks.base.SPLITS, repeated to keep --help light
DEFAULT_ASSET_VERSION = "micro-v0"  # = rlhfgym.envs.assets.DEFAULT_VERSION
IMPORT_HELP = ("import a Python module first (a dotted name importable from the current directory, or a path to a "
               ".py file), e.g. one that registers a custom agent with rlhfgym.agents.register(); repeatable")
#: a number in scientific notation without a dot (``1e-4``), which YAML 1.1 reads as a string
SCIENTIFIC = re.compile(r"[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+")


class CLIError(Exception):
    """A problem the user can fix, reported as one line without a traceback."""


@dataclass(frozen=True)
class Command:
    """One ``rlhf-zoo`` subcommand."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]


# --------------------------------------------------------------------------------------------
# argument types (argparse turns their ValueError/ArgumentTypeError into a usage error, exit 2)
# --------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (checked for availability by the code that uses it)."""
    if text in ("cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N")


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as tokenizer,sft")
    return items


def positive_int_list(text: str) -> list[int]:
    """``64,256,1024``: one or more positive integers."""
    return [positive_int(item) for item in comma_list(text)]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def common_options() -> argparse.ArgumentParser:
    """Options every (sub)command accepts; pass as ``parents=[common_options()]`` to nested parsers.

    ``--debug`` is also accepted after the command; its SUPPRESS default keeps a subparser from
    resetting a ``--debug`` given before the command.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    # its own dest: a subparser's value would replace, not extend, the `--import` given before the command
    common.add_argument("--import", dest="more_imports", action="append", default=argparse.SUPPRESS, metavar="MODULE",
                        help=IMPORT_HELP)
    return common


def load_impl(module: str, attr: str) -> Callable[..., Any]:
    """Import ``module.attr`` now (not at startup); a missing rlhfgym module becomes a clear error."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise CLIError(
                f"{module} is not part of this install of rlhf-gym; reinstall it with `pip install -e .` "
                "from a complete checkout."
            ) from e
        raise  # a third-party dependency is missing: its own message says which
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise CLIError(f"{module} has no {attr}(); this install of rlhf-gym is incomplete, reinstall it.") from None


def check_env_id(env_id: str) -> None:
    """Fail early, with suggestions, on an env id that no imported package registered, or that is
    not an rlhf-gym env (e.g. ``CartPole-v1``: the zoo's agents need the RLHF token MDP); the check
    is :func:`rlhfgym.zoo.train.check_rlhf_env_id`, the one ``train`` runs."""
    load_impl("rlhfgym.zoo.train", "check_rlhf_env_id")(env_id)


def check_agent(name: str, imports: Sequence[str] = ()) -> None:
    """Fail early, with the closest names, on an agent name nothing registered; import a registered one
    (a broken entry point fails here too)."""
    from rlhfgym.agents import agent_class, registered

    known = registered()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        fix = (f"none of --import {', '.join(imports)} registered it: call rlhfgym.agents.register({name!r}, YourAgent) "
               "in one of them" if imports else
               f"for your own agent, call rlhfgym.agents.register({name!r}, YourAgent) in a module and pass "
               "--import MODULE (or declare an 'rlhfgym.agents' entry point)")
        raise CLIError(f"unknown agent {name!r}.{hint} Known agents: {', '.join(known)}; {fix}.")
    agent_class(name)


def import_modules(specs: Sequence[str]) -> None:
    """Import each of ``specs`` (``--import``): a dotted module name, looked up from the current
    directory and ``sys.path``, or a path to a ``.py`` file (imported under its file name, with its
    directory put on ``sys.path`` so it can import its neighbours). Idempotent."""
    for spec in specs:
        path = Path(spec).expanduser()
        is_path = spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)
        try:
            if is_path:
                _import_file(spec, path)
            else:
                if os.getcwd() not in sys.path and "" not in sys.path:
                    sys.path.insert(0, os.getcwd())  # as `python -m` does; the console script does not
                try:
                    importlib.import_module(spec)
                except ModuleNotFoundError as e:
                    if e.name is None or not (spec == e.name or spec.startswith(e.name + ".")):
                        raise
                    raise CLIError(f"--import {spec}: no module named {e.name!r} (from {os.getcwd()} or sys.path); "
                                   "install it, add its directory to PYTHONPATH, or pass the path to its .py file.") from None
        except CLIError:
            raise
        except SyntaxError as e:
            raise CLIError(f"--import {spec}: syntax error in {e.filename}, line {e.lineno}: {e.msg}.") from e
        except Exception as e:
            raise CLIError(f"--import {spec}: importing it raised {type(e).__name__}: {e} "
                           "(run with --debug for the traceback).") from e


def _import_file(spec: str, path: Path) -> None:
    import importlib.util

    if not path.is_file() or path.suffix != ".py":
        raise CLIError(f"--import {spec}: no such .py file; give the path to a Python file or a dotted module name.")
    path = path.resolve()
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
            return
        raise CLIError(f"--import {spec}: a module named {name!r} is already imported (from "
                       f"{getattr(loaded, '__file__', None) or 'built in'}); rename your file.")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before running it: its classes' __module__ must resolve (pickling, load())
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


# --------------------------------------------------------------------------------------------
# play
# --------------------------------------------------------------------------------------------


def _play_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("env_id", help="environment id, e.g. RLHF-Summarize-Gold-v0")
    p.add_argument("--n", type=positive_int, default=1,
                   help="number of prompts to play (default: 1); above 10, the first 3 are shown, then a progress bar and the means")
    p.add_argument("--split", choices=SPLITS, default="test", help="prompt split (default: test)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--temperature", type=non_negative_float, default=1.0,
                   help="sampling temperature; 0 is greedy (default: 1.0)")
    p.add_argument("--agent", default=None, metavar="DIR",
                   help="a trained agent to play: a run directory (its agent/) or an agent directory (default: the SFT policy)")


def _play(args: argparse.Namespace) -> Any:
    check_env_id(args.env_id)
    agent_dir = None
    if args.agent is not None:
        from rlhfgym.zoo.train import saved_agent_dir

        agent_dir = saved_agent_dir(args.agent)
        if agent_dir is None:
            raise ValueError(f"--agent {args.agent}: no agent.json there or in its agent/; pass a run directory "
                             "written by rlhf-zoo train (or its agent/ subdirectory).")
    play = load_impl("rlhfgym.zoo.play", "play")
    return play(args.env_id, n=args.n, split=args.split, seed=args.seed, device=args.device,
                temperature=args.temperature, agent_dir=None if agent_dir is None else str(agent_dir))


# --------------------------------------------------------------------------------------------
# build-assets
# --------------------------------------------------------------------------------------------


def _build_assets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--version", default=DEFAULT_ASSET_VERSION, help=f"asset version to build (default: {DEFAULT_ASSET_VERSION})"
    )
    p.add_argument("--out", metavar="DIR", default=None, help="write here instead of into the installed package")
    p.add_argument("--seed", type=non_negative_int, default=0, help="build seed (default: 0)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--only", type=comma_list, default=None, metavar="A,B",
        help="build these parts (default tokenizer,sft): tokenizer, sft, reward, reward_fact, preference, judge, "
        "or feedback for the last four",
    )
    p.add_argument("--preferences", metavar="URL", default=None,
                   help="with --only reward and --out DIR: train the reward model on the human labels of a labeling "
                   "database (rlhf-zoo label --db URL), e.g. sqlite:///prefs.db")
    scale = p.add_argument_group("feedback parts: the build's scale")
    scale.add_argument("--prompts", type=positive_int, default=None, metavar="N", help="train prompts (default 20000)")
    scale.add_argument("--heldout-prompts", type=positive_int, default=None, metavar="N", help="held-out prompts (default 2000)")
    scale.add_argument("--gen-batch-size", type=positive_int, default=None, metavar="N", help="sampling batch (default 2048)")
    scale.add_argument("--rm-epochs", type=positive_int, default=None, metavar="N",
                       help="epochs of the reward models (default 4)")
    scale.add_argument("--pm-pairs", type=positive_int, default=None, metavar="N",
                       help="train the preference model on N random pairs (default all)")


def _build_assets(args: argparse.Namespace) -> Any:
    build_assets = load_impl("rlhfgym.envs.build.sft", "build_assets")
    only = ",".join(args.only) if args.only else None  # build_assets takes "tokenizer,sft" as one string
    flags = {"n_train_prompts": args.prompts, "n_heldout_prompts": args.heldout_prompts, "gen_batch_size": args.gen_batch_size,
             "rm_epochs": args.rm_epochs, "pm_max_pairs": args.pm_pairs}
    feedback = {k: v for k, v in flags.items() if v is not None}
    if args.preferences is not None:  # the human labels of a labeling database (rlhf-zoo label)
        return build_assets(version=args.version, out=args.out, seed=args.seed, device=args.device, only=only,
                            preferences=args.preferences)
    return build_assets(version=args.version, out=args.out, seed=args.seed, device=args.device, only=only,
                        feedback=feedback or None)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def _bench_args(p: argparse.ArgumentParser) -> None:
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    env = targets.add_parser(
        "env", help="environment throughput (tokens/s of the batched token MDP)", parents=[common_options()]
    )
    env.add_argument("--batch", type=positive_int_list, default=[64],
                     help="parallel episodes; comma-separated for one table each, e.g. 64,256,1024 (default: 64)")
    env.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens per episode (default: 32)")
    env.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    env.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (default: 3)")
    env.add_argument("--reference", default=None,
                     help="a causal LM directory to run as policy and reference instead of the micro world's SFT model "
                          "(e.g. one made by `rlhf-zoo bench policy`; it must use the micro tokenizer)")
    env.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="load the policy/reference in this dtype (default: float32)")
    env.add_argument("--rounds", type=positive_int, default=1,
                     help="interleaved rounds (generate, env, bare, generate, ...), median shown (default: 1)")
    env.add_argument("--isolate", action="store_true",
                     help="run each measurement in a fresh process (a process's history moves a CPU measurement by ~10%%)")
    env.set_defaults(bench=_bench_env)
    threads = targets.add_parser(
        "threads", help="env.step calls/s by torch thread count, as the machine is and with one more core busy",
        parents=[common_options()])
    threads.add_argument("--num-envs", type=positive_int, default=32, help="rows of the vector env (default: 32)")
    threads.add_argument("--seconds", type=positive_float, default=5.0, help="seconds a measurement (default: 5)")
    threads.add_argument("--repeats", type=positive_int, default=3, help="interleaved repeats, median shown (default: 3)")
    threads.set_defaults(bench=_bench_threads)
    sb3 = targets.add_parser(
        "sb3", help="SB3 PPO rollout env steps/s with LMActorCriticPolicy's KV cache and without; "
        "with --minutes, SB3 PPO against rlhf-gym's PPO for that long", parents=[common_options()])
    sb3.add_argument("--num-envs", type=positive_int, default=16, help="SB3 envs (default: 16)")
    sb3.add_argument("--steps", type=positive_int, default=64, help="rollout steps a measurement (default: 64)")
    sb3.add_argument("--repeats", type=positive_int, default=3, help="interleaved repeats, median shown (default: 3)")
    sb3.add_argument("--minutes", type=non_negative_float, default=0.0,
                     help="also train SB3 PPO and rlhf-gym's PPO this long each and report test gold (default: 0, off)")
    sb3.set_defaults(bench=_bench_sb3)
    rollout = targets.add_parser(
        "rollout", help="a batch of completions collected through the token MDP (as the agents do) against "
        "sampling + one teacher-forced reference pass + the reward model", parents=[common_options()])
    rollout.add_argument("--batch", type=positive_int, default=32, help="completions a batch (default: 32)")
    rollout.add_argument("--repeats", type=positive_int, default=7, help="interleaved repeats, median shown (default: 7)")
    rollout.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    rollout.set_defaults(bench=_bench_rollout)
    trl = targets.add_parser(
        "trl", help="rlhf-gym against TRL on identical work (rloo, dpo, reward, ppo, env), fresh interleaved subprocesses",
        parents=[common_options()])
    trl.add_argument("--pair", default="all",
                     help="rloo, dpo, reward, ppo, env (comma-separated) or all (default: all)")
    trl.add_argument("--repeats", type=positive_int, default=3, help="runs a side, interleaved ours/TRL (default: 3)")
    trl.add_argument("--out", default="docs/results/bench-trl",
                     help="where bench-trl.md and bench-trl.json go (default: docs/results/bench-trl)")
    trl.add_argument("--trl-python", default=None,
                     help="the Python that runs the TRL sides (a venv with rlhf-gym[bench]; default: this one)")
    trl.add_argument("--trl-ppo-python", default=None,
                     help="the Python that runs TRL's PPO (trl==1.12.0, the last with PPOTrainer; default: --trl-python)")
    trl.add_argument("--updates", type=positive_int, default=None,
                     help="optimizer updates a run (ppo: rollouts; default: each pair's own small budget)")
    trl.add_argument("--seed", type=non_negative_int, default=0, help="training seed of both sides (default: 0)")
    trl.add_argument("--threads", type=positive_int, default=1, help="torch threads of both sides (default: 1)")
    trl.add_argument("--timeout", type=positive_float, default=900.0, help="seconds a run may take (default: 900)")
    trl.add_argument("--env-rounds", type=positive_int, default=5,
                     help="interleaved rounds of the env pair (rlhf-zoo bench env), median shown (default: 5)")
    trl.add_argument("--device", type=device, default="cpu", help="where both sides train: cpu, cuda or cuda:N (default: cpu)")
    trl.add_argument("--policy", default="sft",
                     help="what both sides start from: sft (the micro world's SFT model), a model directory, or a preset "
                          "built first (llama-113m, llama-403m, llama-tiny; see `rlhf-zoo bench policy`) (default: sft)")
    trl.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="both sides' precision: float32, or bfloat16 autocast on float32 weights (TRL's bf16=True, "
                          "rlhf-gym's precision=bfloat16) (default: float32)")
    trl.set_defaults(bench=_bench_trl)
    policy = targets.add_parser(
        "policy", help="save a randomly initialised Llama of a preset size over the micro tokenizer (for GPU benches)",
        parents=[common_options()])
    policy.add_argument("name", help="llama-113m, llama-403m or llama-tiny")
    policy.add_argument("--out", required=True, help="the model directory to write")
    policy.add_argument("--seed", type=non_negative_int, default=0, help="initialisation seed (default: 0)")
    policy.set_defaults(bench=_bench_policy)


def _bench_env(args: argparse.Namespace) -> Any:
    bench_env = load_impl("rlhfgym.zoo.bench", "bench_env")
    extra = {k: v for k, v in (("reference", args.reference), ("dtype", args.dtype)) if v is not None}
    return [bench_env(batch=b, max_new_tokens=args.max_new_tokens, device=args.device, repeats=args.repeats,
                      rounds=args.rounds, isolate=args.isolate, **extra) for b in args.batch]


def _bench_rollout(args: argparse.Namespace) -> Any:
    bench_rollouts = load_impl("rlhfgym.zoo.bench_rollout", "bench_rollouts")
    return bench_rollouts(batch=args.batch, repeats=args.repeats, device=args.device)


def _bench_threads(args: argparse.Namespace) -> Any:
    bench_threads = load_impl("rlhfgym.zoo.bench", "bench_threads")
    return bench_threads(num_envs=args.num_envs, seconds=args.seconds, repeats=args.repeats)


def _bench_sb3(args: argparse.Namespace) -> Any:
    bench_sb3 = load_impl("rlhfgym.zoo.bench", "bench_sb3")
    return bench_sb3(num_envs=args.num_envs, steps=args.steps, repeats=args.repeats, minutes=args.minutes)


def _bench_trl(args: argparse.Namespace) -> Any:
    bench_trl = load_impl("rlhfgym.zoo.bench_trl", "bench_trl")
    command = "rlhf-zoo " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None
    return bench_trl(pair=args.pair, repeats=args.repeats, out=args.out, trl_python=args.trl_python,
                     trl_ppo_python=args.trl_ppo_python, updates=args.updates, seed=args.seed, threads=args.threads,
                     timeout=args.timeout, command=command, env_rounds=args.env_rounds, device=args.device,
                     policy=args.policy, dtype=args.dtype)


def _bench_policy(args: argparse.Namespace) -> Any:
    build_policy = load_impl("rlhfgym.zoo.bench_trl", "build_policy")
    return build_policy(args.name, args.out, seed=args.seed)


def _bench(args: argparse.Namespace) -> Any:
    return args.bench(args)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def _hp_override(text: str) -> tuple[str, Any]:
    """``key=value``; the value is read as YAML (``0.1``, ``true``, ``null``, ``[0, 0.5]``), ``1e-4`` as a number."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--hp takes key=value, e.g. learning_rate=1e-4, got {text!r}")
    if key in ("seed", "device"):
        raise argparse.ArgumentTypeError(f"{key} is not a hyperparameter here; use --{key}")
    if SCIENTIFIC.fullmatch(value.strip()):
        return key, float(value)
    import yaml

    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"the value of {key} is not valid YAML ({one_line(e)}); quote a string") from None


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("algo", help="agent name, e.g. ppo, rloo, dpo (rlhfgym.agents.registered() lists them)")
    p.add_argument("env_id", help="environment id, e.g. RLHF-Summarize-v0")
    p.add_argument("--budget", type=positive_int, default=None, help="completions to spend (default: from the YAML)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed (default: 0)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--run-dir", default=None, help="where checkpoints, logs and results go (default: runs/ALGO/ENV/seedK)")
    p.add_argument("--eval-n", type=positive_int, default=200, help="test prompts to evaluate on (default: 200)")
    p.add_argument("--hp", type=_hp_override, action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyperparameter of the YAML (repeatable)")


def _train(args: argparse.Namespace) -> Any:
    check_agent(args.algo, imported_modules(args))  # before anything is built
    check_env_id(args.env_id)
    train = load_impl("rlhfgym.zoo.train", "train")
    return train(args.algo, args.env_id, budget=args.budget, seed=args.seed, device=args.device,
                 run_dir=args.run_dir, eval_n=args.eval_n, overrides=dict(args.hp))


# --------------------------------------------------------------------------------------------
# eval, leaderboard, benchmark
# --------------------------------------------------------------------------------------------


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by `rlhf-zoo train` or `rlhf-zoo benchmark`")
    p.add_argument("--split", choices=SPLITS, default="test", help="prompts to evaluate on (default: test)")
    p.add_argument("--prompts", type=positive_int, default=200, help="number of prompts, the split's first (default: 200)")
    p.add_argument("--samples", type=positive_int, default=1, help="completions per prompt (default: 1)")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="sampling temperature; 0 is greedy (default: 1)")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help="sampling seed (default: the run's own seed, as train and benchmark evaluate)")
    p.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: the run's device)")


def _eval(args: argparse.Namespace) -> Any:
    evaluate_run = load_impl("rlhfgym.zoo.evaluate", "evaluate_run")
    return evaluate_run(args.run_dir, split=args.split, prompts=args.prompts, samples=args.samples,
                        temperature=args.temperature, seed=args.seed, device=args.device)


def _leaderboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs_dir", help="a directory holding run directories (searched recursively for eval.json)")
    p.add_argument("--out", default=None, help="where leaderboard.md/.csv and the plots go (default: RUNS_DIR)")


def _leaderboard(args: argparse.Namespace) -> Any:
    write_leaderboard = load_impl("rlhfgym.zoo.leaderboard", "write_leaderboard")
    return write_leaderboard(args.runs_dir, out_dir=args.out)


def _benchmark_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a registered benchmark, e.g. summarize-quick (rlhfgym.zoo.benchmark.registered() lists them)")
    p.add_argument("--agents", type=comma_list, default=None, help="comma-separated agents (default: the benchmark's)")
    p.add_argument("--seeds", type=positive_int, default=None, help="number of seeds 0..N-1 (default: the benchmark's)")
    p.add_argument("--budget", type=positive_int, default=None, help="completions per run (default: the benchmark's budgets)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="run locally one by one, or as Ray tasks")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    p.add_argument("--out", default="runs", help="output directory (default: runs/); runs go to OUT/NAME/...")


def _benchmark(args: argparse.Namespace) -> Any:
    run_benchmark = load_impl("rlhfgym.zoo.benchmark", "run_benchmark")
    return run_benchmark(args.name, agents=args.agents, seeds=args.seeds, budget=args.budget, device=args.device,
                         backend=args.backend, address=args.address, out=args.out)


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a registered study, e.g. method-ranking (rlhfgym.zoo.study.registered() lists them), "
                                "or the path of a study YAML file")
    p.add_argument("--preset", choices=("quick", "full"), default="quick",
                   help="quick: a 2-core CPU, <= 45 min; full: sized for one GPU (default: quick)")
    p.add_argument("--seeds", type=positive_int, default=None, help="number of seeds 0..N-1 (default: the preset's)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="run locally one by one, or as Ray tasks")
    p.add_argument("--out", default="runs", help="output directory (default: runs/); runs and the report go to OUT/NAME/PRESET/")
    p.add_argument("--report-only", action="store_true", help="run nothing: write the report of the runs finished so far")


def _study(args: argparse.Namespace) -> Any:
    run_study = load_impl("rlhfgym.zoo.study", "run_study")
    return run_study(args.name, preset=args.preset, seeds=args.seeds, backend=args.backend, device=args.device, out=args.out,
                     report_only=args.report_only)


# --------------------------------------------------------------------------------------------
# label: the human A/B labeling page
# --------------------------------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def _label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, metavar="URL",
                   help="database URL: sqlite:///prefs.db (a file, created if missing) or postgresql://user:pw@host/db")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pairs", metavar="FILE", default=None,
                     help='add the pairs of a JSONL file ({"prompt", "completion_a", "completion_b"} per line)')
    src.add_argument("--from-policies", type=comma_list, default=None, metavar="A,B",
                     help="add pairs sampled by two policies on --env's prompts: sft or a run directory of rlhf-zoo train")
    p.add_argument("--env", dest="env_id", default=None, metavar="ID",
                   help="env whose prompts (--from-policies), reward model (admin view) and features (--select active) are used")
    p.add_argument("--n", type=positive_int, default=100, help="prompts to sample pairs on (default: 100)")
    p.add_argument("--split", choices=SPLITS, default="train", help="prompt split for --from-policies (default: train)")
    p.add_argument("--overlap", type=_fraction, default=0.0,
                   help="fraction of new pairs shown to several labelers, for inter-annotator agreement (default: 0)")
    p.add_argument("--labelers-per-overlap", type=positive_int, default=2,
                   help="how many labelers see an overlapping pair (default: 2)")
    p.add_argument("--select", choices=("random", "active"), default="random",
                   help="serving order: random, or active (reward-model ensemble disagreement first; needs --env)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default: 8000)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of sampling and of the overlap draw (default: 0)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--export", metavar="FILE", default=None,
                   help="write the labels in the preference schema (FILE.jsonl: JSONL, else a datasets directory) and exit")


def _label(args: argparse.Namespace) -> Any:
    if args.env_id:
        check_env_id(args.env_id)
    label_command = load_impl("rlhfgym.zoo.label.serve", "label_command")
    return label_command(args.db, pairs=args.pairs, from_policies=args.from_policies, env_id=args.env_id, n=args.n,
                         split=args.split, overlap=args.overlap, labelers_per_overlap=args.labelers_per_overlap,
                         select=args.select, host=args.host, port=args.port, seed=args.seed, device=args.device,
                         export=args.export)


COMMANDS: list[Command] = [
    Command("play", "sample completions in an environment and show their rewards", _play_args, _play),
    Command("label", "serve the A/B human labeling page; labels go to a database (SQLite or PostgreSQL)",
            _label_args, _label),
    Command("build-assets", "rebuild the frozen assets (tokenizer, SFT policy, reward model)", _build_assets_args, _build_assets),
    Command("bench", "measure throughput", _bench_args, _bench),
    Command("train", "train one agent on one env and evaluate it against SFT", _train_args, _train),
    Command("eval", "evaluate a run: reward, gold, KL, win rate against SFT, diversity (writes eval.json)", _eval_args, _eval),
    Command("leaderboard", "tables (mean and 95% CI over seeds, Bradley-Terry ratings) and plots of many runs",
            _leaderboard_args, _leaderboard),
    Command("benchmark", "run a registered benchmark (every agent x env x budget x seed), then its leaderboard",
            _benchmark_args, _benchmark),
    Command("study", "run a registered study of a seed's claim (arms x seeds), then its table, JSON and plot",
            _study_args, _study),
]


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("rlhf-gym")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="rlhf-gym zoo: play, benchmark and rebuild the RLHF environments.",
        epilog=f"Run `{PROG} COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=IMPORT_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        # argparse %-formats help strings ("95% CI" would break --help)
        p = sub.add_parser(cmd.name, help=cmd.help.replace("%", "%%"), description=cmd.help, parents=[common_options()])
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def is_user_error(exc: BaseException) -> bool:
    """ValueError, exceptions defined by rlhfgym, and gymnasium's errors (e.g. an unregistered env id)."""
    if isinstance(exc, (ValueError, CLIError)):  # CLIError: under `python -m` its module is __main__
        return True
    gym_error = getattr(sys.modules.get("gymnasium.error"), "Error", None)
    if gym_error is not None and isinstance(exc, gym_error):
        return True
    return any(getattr(cls, "__module__", "").startswith("rlhfgym.") for cls in type(exc).__mro__)


def imported_modules(args: argparse.Namespace) -> list[str]:
    """The ``--import`` modules, given before and after the command."""
    return [*getattr(args, "imports", []), *getattr(args, "more_imports", [])]


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its class name if it has no message)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _quiet_model_loading() -> None:
    """transformers draws a "Loading weights" bar for every model it loads; our commands show their own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rlhf-zoo``; returns the exit status (0 ok, 2 usage or user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import_modules(imported_modules(args))
        _quiet_model_loading()
        args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not is_user_error(exc):
            raise
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
