"""Learners behind one small interface (:class:`Agent`), and their registry.

    import rlhfgym.agents
    agent = rlhfgym.agents.make("ppo", learning_rate=1e-4)
    agent.learn(env, budget=20_000)

Built-in agents are imported on first use; external packages register through the entry-point
group ``rlhfgym.agents`` or call :func:`register` when imported (``rlhf-zoo --import MODULE`` imports
a user's module first); see CONTRIBUTING.md, "Adding an agent".
"""

from .base import Agent, AgentError, agent_class, check_constructor, load, make, register, registered

BUILTIN_AGENTS = {
    "ppo": "rlhfgym.agents.ppo:PPO",
    "reinforce": "rlhfgym.agents.reinforce:Reinforce",
    "rloo": "rlhfgym.agents.reinforce:RLOO",
    "dpo": "rlhfgym.agents.dpo:DPO",
    "kto": "rlhfgym.agents.dpo:KTO",
    "rest": "rlhfgym.agents.rest:ReST",
    "nash-md": "rlhfgym.agents.nash_md:NashMD",
    "sft": "rlhfgym.agents.sft:SFT",
    "best-of-n": "rlhfgym.agents.best_of_n:BestOfN",
    "sb3-ppo": "rlhfgym.agents.sb3_ppo:SB3PPO",
}
for _name, _target in BUILTIN_AGENTS.items():
    register(_name, _target)

__all__ = ["Agent", "AgentError", "make", "load", "register", "registered", "agent_class", "check_constructor",
           "BUILTIN_AGENTS"]
