"""rlhfgym.zoo: the algorithm zoo around the environments.

* ``rlhf-zoo`` command line: :mod:`rlhfgym.zoo.cli` (``play``, ``build-assets``, ``bench``; later
  ``train``, ``leaderboard``, ``plot``).
* Benchmarks: ``zoo/benchmarks/*.yml``; hyperparameters: ``zoo/hyperparams/<algo>.yml`` keyed by env id.

Dependencies point one way: zoo -> agents -> envs. This ``__init__`` imports nothing, so the
command line starts fast and ``import rlhfgym.zoo`` never pulls in torch.
"""

__all__: list[str] = []
