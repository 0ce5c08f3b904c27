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
* :mod:`.training`: the training loop of these models and the reward model's trainer;
  :mod:`.checkpoint`: its resumable snapshots.
* :mod:`.fitting`: a Bradley-Terry reward model fitted at runtime on preference records and cached
  (the studies' reward models trained on part of the data, or on a labeler population's labels).

Building the shipped models (and training the preference model and the judge,
:mod:`rlhfgym.envs.build.training`) is :mod:`rlhfgym.envs.build`'s job; nothing here imports it
(``preference_model.train_preference_model``, an old name, looks it up when asked for, with a
DeprecationWarning, until rlhf-gym 0.3; ``reward_model.train_reward_model`` resolves to
:mod:`.training`, with the same warning).
"""
