"""``rlhf-zoo label``: fill the labeling database with pairs and serve the page.

::

    rlhf-zoo label --db sqlite:///prefs.db --from-policies sft,runs/dpo/RLHF-Summarize-v0/seed0 \\
                   --env RLHF-Summarize-v0 --n 200 [--overlap 0.2] [--select active] [--port 8000]
    rlhf-zoo label --db sqlite:///prefs.db --pairs pairs.jsonl      # or pairs from a file
    rlhf-zoo label --db sqlite:///prefs.db                          # go on with the pairs already there
    rlhf-zoo label --db sqlite:///prefs.db --export prefs.jsonl     # the labels in our preference schema

Adding pairs is idempotent (a pair already in the database is not added twice), so the same
command restarts a killed server without duplicating anything. ``--select active`` serves the
pairs a small reward-model ensemble disagrees on first (:mod:`.active`; needs ``--env`` for the
features).
"""

from __future__ import annotations

import sys
from typing import Any


def label_command(db: str, *, pairs: str | None = None, from_policies: list[str] | None = None, env_id: str | None = None,
                  n: int = 100, split: str = "train", overlap: float = 0.0, labelers_per_overlap: int = 2,
                  select: str = "random", host: str = "127.0.0.1", port: int = 8000, seed: int = 0, device: str = "cpu",
                  export: str | None = None, serve: bool = True) -> dict[str, Any]:
    """What ``rlhf-zoo label`` does: open ``db``, add pairs, then export or serve. Returns a summary."""
    from rlhfgym.envs.feedback.store import INSTALL_HINT, PreferenceStore, export_preferences

    for module in ("fastapi", "uvicorn", "jinja2"):
        try:
            __import__(module)
        except ModuleNotFoundError:
            raise ValueError(f"the labeling page needs {module}, which is not installed; {INSTALL_HINT}.") from None
    if pairs and from_policies:
        raise ValueError("give either --pairs FILE or --from-policies A,B, not both.")
    if from_policies and not env_id:
        raise ValueError("--from-policies samples on an env's prompts; add --env ID (e.g. --env RLHF-Summarize-v0).")
    if select not in ("random", "active"):
        raise ValueError(f"--select must be random or active, got {select!r}.")
    if select == "active" and not env_id:
        raise ValueError("--select active computes features with the env's reference model; add --env ID.")
    if export:
        path = export_preferences(db, export)
        print(f"wrote the labels of {db} to {path}")
        return {"exported": str(path)}
    store = PreferenceStore(db)
    added = 0
    if pairs or from_policies:
        from .sources import pairs_from_file, pairs_from_policies, score_pairs

        if pairs:
            batch = pairs_from_file(pairs)
            if env_id:
                batch = score_pairs(batch, env_id, device)
        else:
            batch = pairs_from_policies(from_policies, env_id, n, split=split, seed=seed, device=device)
        added = store.add_pairs(batch.prompts, batch.a, batch.b, source_a=batch.source_a, source_b=batch.source_b,
                                rm_a=batch.rm_a, rm_b=batch.rm_b, overlap=overlap, labelers_per_overlap=labelers_per_overlap,
                                seed=seed)
    progress = store.progress()
    print(f"{db}: {added} new pairs; {progress.done} of {progress.total} planned labels answered")
    if progress.total == 0:
        raise ValueError(f"{db} has no pairs to label; add some with --pairs FILE or --from-policies A,B --env ID.")
    order = None
    if select == "active":
        import gymnasium as gym

        import rlhfgym.envs  # noqa: F401
        from .active import ActiveSelector, PairFeatures

        core = gym.make(env_id, device=device).unwrapped
        order = ActiveSelector(store, PairFeatures.for_pairs(core, store.pairs()), seed=seed)
    summary = {"db": db, "added": added, "progress": progress.__dict__}
    if not serve:
        return summary
    import uvicorn

    from .app import create_app

    app = create_app(store, order=order)
    print(f"labeling page: http://{host}:{port}/?labeler=YOUR_ID   admin: http://{host}:{port}/admin", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return summary
