"""The CPU thread choice for small models (envs/hf.py: choose_cpu_threads), each case in a fresh
process: torch's thread count is process-global and only the first env of a process decides."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a fresh interpreter that makes an env, per case

MAKE = ("import torch, gymnasium as gym, rlhfgym.envs\n"
        "{before}\n"
        "gym.make('RLHF-Summarize-Gold-v0')\n"
        "{after}\n"
        "print(torch.get_num_threads())\n")


def threads_after_make(before: str = "", after: str = "", **env_vars: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RLHFGYM_NUM_THREADS")}
    env.update(env_vars)
    proc = subprocess.run([sys.executable, "-c", MAKE.format(before=before, after=after)], env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return -1, proc.stderr.strip().splitlines()[-1]
    return int(proc.stdout.split()[-1]), ""


def test_a_small_model_on_the_cpu_gets_one_thread_unless_the_user_chose():
    assert threads_after_make() == (1, "")
    assert threads_after_make(RLHFGYM_NUM_THREADS="3") == (3, "")
    # torch's own default, the user's OMP_NUM_THREADS, and a set_num_threads call after import are kept
    torch_default = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                       capture_output=True, text=True, check=True).stdout)
    assert threads_after_make(RLHFGYM_NUM_THREADS="torch") == (torch_default, "")
    omp = {k: v for k, v in os.environ.items() if k != "RLHFGYM_NUM_THREADS"} | {"OMP_NUM_THREADS": "2"}
    omp_threads = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=omp,
                                     capture_output=True, text=True, check=True).stdout)
    assert threads_after_make(OMP_NUM_THREADS="2") == (omp_threads, "")
    assert threads_after_make(before="torch.set_num_threads(3)") == (3, "")
    # only the first env decides: a later set_num_threads wins over the next gym.make
    assert threads_after_make(after="torch.set_num_threads(3); gym.make('RLHF-Summarize-v0')") == (3, "")


def test_a_bad_thread_setting_names_the_variable_and_the_fix():
    code, message = threads_after_make(RLHFGYM_NUM_THREADS="many")
    assert code == -1 and "RLHFGYM_NUM_THREADS='many': use a number of threads >= 1, or 'torch'" in message
