"""A Stable-Baselines3 actor-critic policy whose actor and critic are a pretrained causal LM.

Lets stock SB3 algorithms train a language model on the token MDP, one token per env step::

    import stable_baselines3
    from rlhfgym.envs.sb3 import make_sb3_vec_env
    from rlhfgym.agents.sb3_policy import LMActorCriticPolicy

    venv = make_sb3_vec_env("RLHF-Summarize-Gold-v0", num_envs=8)
    model = stable_baselines3.PPO(LMActorCriticPolicy, venv, learning_rate=1e-5, n_steps=64, batch_size=64,
                                  policy_kwargs={"model": venv.venv.reference_model})
    model.learn(10_000)

* **Features**: the LM's transformer (``model.base_model``) reads the observation's ``input_ids`` and
  ``attention_mask`` (right-aligned, left-padded Box int observations: SB3 would one-hot a
  MultiDiscrete observation into vocab x window floats: SB3's ``preprocess_obs``) and returns the last
  position's final hidden state, with position ids from the mask (so padding changes nothing).
* **Actor**: the LM head itself (the pretrained output embedding), giving the ``Discrete(V)`` logits
  of the next token: at step 0, the policy *is* the env's reference model.
* **Critic**: a new ``Linear(hidden, 1)`` on the same hidden state (zero-initialised: V = 0 at start).
* ``ortho_init`` is forced off: SB3's orthogonal init would overwrite the pretrained weights.

``model`` (policy kwarg): a causal LM module (deep-copied, so the env's frozen reference is never
trained), a ``save_pretrained`` directory, or None for the micro world's frozen SFT policy (= the
reference policy of ``RLHF-Summarize*-v0``).

Stepping is uncached (one full forward over the window per env step) because SB3 treats every
observation as independent; it is the slow, generic path. The agents in :mod:`rlhfgym.agents`
(PPO, RLOO, ...) sample whole completions with a KV cache instead.

Note on the return: the env pays ``kl_coef * log pi_ref(a_t|s_t)`` per token; the agent's half of
the KL penalty, ``-kl_coef * log pi_theta(a_t|s_t)``, is not added by SB3 (use ``kl_coef=0`` for the
pure RM/gold objective, or add it with a reward wrapper).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from rlhfgym.envs.hf import position_ids, quiet_transformers
from rlhfgym.envs.lm import model_vocab_size

__all__ = ["LMActorCriticPolicy", "LMFeaturesExtractor"]


@quiet_transformers()
def _load_model(model) -> nn.Module:
    if model is None:
        from transformers import AutoModelForCausalLM

        from rlhfgym.envs.assets import load_micro_assets

        return AutoModelForCausalLM.from_pretrained(load_micro_assets().sft_dir)
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model)
    if isinstance(model, nn.Module):
        return copy.deepcopy(model)  # never train the caller's module (it is often the env's frozen reference)
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):  # SB3's load(): the architecture; the weights follow in the state dict
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(model)
    raise TypeError(f"model must be a causal LM module, a save_pretrained directory or None, got {type(model).__name__}.")


class LMFeaturesExtractor(BaseFeaturesExtractor):
    """The LM's transformer body: ``{"input_ids", "attention_mask"}`` (B, W) -> last hidden state (B, hidden)."""

    def __init__(self, observation_space: spaces.Dict, model: nn.Module):
        if not (isinstance(observation_space, spaces.Dict) and {"input_ids", "attention_mask"} <= set(observation_space.spaces)):
            raise ValueError(
                "LMActorCriticPolicy needs the token MDP's Dict observation with 'input_ids' and 'attention_mask' "
                f"(an rlhf-gym env), got {observation_space}."
            )
        super().__init__(observation_space, features_dim=int(model.config.get_text_config().hidden_size))
        self.lm = model.float()

    @property
    def body(self) -> nn.Module:
        return self.lm.base_model

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = obs["input_ids"].long()  # SB3 hands Box observations over as floats
        att = obs["attention_mask"].long()
        used = att.any(0)  # drop the left columns that are padding in every row: same result, less compute
        if not bool(used[0]) and bool(used.any()):
            first = int(used.float().argmax())
            ids, att = ids[:, first:], att[:, first:]
        out = self.body(input_ids=ids, attention_mask=att, position_ids=position_ids(att), use_cache=False)
        return out.last_hidden_state[:, -1].float()  # right-aligned: the newest token is the last column


class _LMHead(nn.Module):
    """The LM's output embedding restricted to the ``n`` actions (the tokenizer's ids)."""

    def __init__(self, head: nn.Module, n: int):
        super().__init__()
        self.head, self.n = head, n

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)[..., : self.n]


class LMActorCriticPolicy(ActorCriticPolicy):
    """SB3 ``ActorCriticPolicy`` = pretrained causal LM (actor: its LM head; critic: a linear value head).

    Policy kwargs: ``model`` (see the module docstring); everything else is SB3's (``net_arch`` and
    ``features_extractor_class`` are fixed; ``ortho_init=True`` is refused).
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, lr_schedule, model: Any = None,
                 ortho_init: bool = False, **kwargs):
        if ortho_init:
            raise ValueError("LMActorCriticPolicy: ortho_init=True would overwrite the pretrained LM weights; leave it False.")
        for key in ("features_extractor_class", "features_extractor_kwargs", "net_arch", "share_features_extractor"):
            if key in kwargs:
                raise ValueError(f"LMActorCriticPolicy: {key} is fixed by the LM architecture; do not pass it.")
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"LMActorCriticPolicy needs a Discrete(vocab) action space (the token MDP), got {action_space}.")
        lm = _load_model(model)
        if model_vocab_size(lm) < int(action_space.n):
            raise ValueError(
                f"the LM has {model_vocab_size(lm)} logits but the env's action space is Discrete({action_space.n}); "
                "use the env's reference model or a model trained with the env's tokenizer."
            )
        self._lm_source = model if not isinstance(model, nn.Module) else None  # what to rebuild from on SB3 load
        super().__init__(observation_space, action_space, lr_schedule, net_arch=[], ortho_init=False,
                         features_extractor_class=LMFeaturesExtractor, features_extractor_kwargs={"model": lm},
                         share_features_extractor=True, **kwargs)

    def _build(self, lr_schedule) -> None:
        self._build_mlp_extractor()  # net_arch=[]: identity, latent = the LM's hidden state
        lm = self.features_extractor.lm
        self.action_net = _LMHead(lm.get_output_embeddings(), int(self.action_space.n))
        self.value_net = nn.Linear(self.features_dim, 1)
        nn.init.zeros_(self.value_net.weight)
        nn.init.zeros_(self.value_net.bias)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        # SB3 pickles these to rebuild the policy on load; the weights come from the state dict, so keep
        # only how to build the architecture (a path / None, not a module object).
        for key in ("features_extractor_class", "features_extractor_kwargs", "net_arch"):
            data.pop(key, None)
        data["model"] = self._lm_source if self._lm_source is not None else self.features_extractor.lm.config
        return data
