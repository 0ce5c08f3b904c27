"""The world: tasks, the token-level MDP (single and natively batched), reward models, judges,
simulated labelers and frozen benchmark assets.

Importing this package registers the environment ids with gymnasium::

    import gymnasium as gym, rlhfgym.envs
    env = gym.make("RLHF-Summarize-v0")
"""

from .config import EnvConfig
from .registration import ENV_IDS, register_envs

register_envs()

__all__ = ["ENV_IDS", "EnvConfig", "register_envs"]
