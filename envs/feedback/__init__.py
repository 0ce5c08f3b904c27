"""The reward side of RLHF, generic over tasks and models.

* :mod:`.labelers`: simulated labelers over a task's gold components (Bradley-Terry choice with a
  temperature, label flips, populations of labeler types) and the Bayes ceiling of a labelled set.
* :mod:`.preferences`: preference datasets (Hugging Face ``datasets``; JSONL and the TL;DR
  comparisons schema).
* :mod:`.reward_model`: a Bradley-Terry reward model on any causal-LM backbone.
* :mod:`.preference_model`: a two-argument preference model P(a > b | x).
* :mod:`.judge`: a judge that reads a constitution (RLAIF).
* :mod:`.ratings`: Bradley-Terry ratings of many systems from pairwise outcomes.
* :mod:`.factories`: the feedback models of the micro world as env rewards (``reward_model="learned"`` ...).

Training these models (:mod:`rlhfgym.envs.build.training`) and building the shipped ones is
:mod:`rlhfgym.envs.build`'s job; nothing here imports it (``reward_model.train_reward_model`` and
``preference_model.train_preference_model``, the old names, look it up when asked for, with a
DeprecationWarning, until rlhf-gym 0.3).
"""
