"""Deprecated: moved to :mod:`rlhfgym.envs.build.feedback` (this alias goes in rlhf-gym 0.3)."""

from .moved import alias_module

alias_module(__name__, "rlhfgym.envs.build.feedback")
