"""Human feedback: the A/B labeling page (``rlhf-zoo label``).

* :mod:`.app`: the FastAPI app (page, admin view, JSON API) over a
  :class:`rlhfgym.envs.feedback.store.PreferenceStore` (SQLite or PostgreSQL).
* :mod:`.sources`: pairs from a file or from two policies' samples on an env's prompts.
* :mod:`.active`: active query selection by the disagreement of a small reward-model ensemble.
* :mod:`.serve`: the command (add pairs, export, serve with uvicorn).
* :mod:`.study`: held-out reward-model accuracy against the number of labels, random vs active,
  with simulated labelers answering through the HTTP API.

Needs the ``label`` extra: ``pip install 'rlhf-gym[label]'``.
"""
