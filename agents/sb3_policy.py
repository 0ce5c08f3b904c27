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

* **Rollouts are KV-cached**: SB3 treats every observation as new, but the token MDP's next
  observation is the previous one plus the action. Without gradients and in eval mode (SB3's
  ``collect_rollouts`` and ``predict``), the features extractor keeps an
  :class:`~rlhfgym.envs.lm.IncrementalLM` over the env rows and, for each row whose observation is
  its last one shifted by one token, runs the model on that token alone (a repeated observation
  reuses its features); other rows (new episodes, another batch) are prefilled from their observation. Training passes (gradients) and any change
  of mode use the full forward, and the cache is dropped whenever the mode changes (the weights
  may have moved). ``rlhf-zoo bench sb3`` compares the two paths.

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
from rlhfgym.envs.lm import IncrementalLM, model_vocab_size

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
        #: rollout cache: on for no-grad eval-mode calls (set False to always run the full forward)
        self.use_cache = True
        self._rollout: IncrementalLM | None = None
        #: (input_ids, attention_mask, features) of the last cached call
        self._last_call: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def body(self) -> nn.Module:
        return self.lm.base_model

    def train(self, mode: bool = True):
        self._rollout, self._last_call = None, None  # SB3 switches mode around every update: the weights may move
        return super().train(mode)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = obs["input_ids"].long()  # SB3 hands Box observations over as floats
        att = obs["attention_mask"].long()
        if self.use_cache and not self.training and not torch.is_grad_enabled():
            return self._cached(ids, att)
        used = att.any(0)  # drop the left columns that are padding in every row: same result, less compute
        if not bool(used[0]) and bool(used.any()):
            first = int(used.float().argmax())
            ids, att = ids[:, first:], att[:, first:]
        out = self.body(input_ids=ids, attention_mask=att, position_ids=position_ids(att), use_cache=False)
        return out.last_hidden_state[:, -1].float()  # right-aligned: the newest token is the last column

    def _cached(self, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """The full forward's features, computing only the new token of rows that continue their last observation."""
        rows, width = ids.shape
        features = torch.empty(rows, self.features_dim, device=ids.device)
        if self._last_call is None or self._last_call[0].shape != ids.shape:
            self._rollout = IncrementalLM(self.lm, rows, width, keep_hidden=True, cuda_graph=False)
            same = continuing = torch.zeros(rows, dtype=torch.bool, device=ids.device)
        else:
            last_ids, last_att, last_features = self._last_call
            # the same observation again (SB3's predict_values after a step): the same features
            same = ((ids == last_ids) & (att == last_att)).all(1)
            features[same] = last_features[same]
            # the last observation shifted left by one token (which was not yet dropped from a full
            # window, where position ids would differ from the full forward's)
            continuing = ((ids[:, :-1] == last_ids[:, 1:]) & (att[:, :-1] == last_att[:, 1:])).all(1) \
                & (att[:, -1] == 1) & (last_att[:, 0] == 0) & ~same
        if bool(continuing.any()):
            self._rollout.step(ids[:, -1], active=continuing)
            features[continuing] = self._rollout.hidden[continuing].float()
        restart = (~(continuing | same)).nonzero().view(-1)
        if restart.numel():
            self._rollout.reset_rows(restart, ids[restart], att[restart])
            features[restart] = self._rollout.hidden.float()
        self._last_call = (ids, att, features)
        return features


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
