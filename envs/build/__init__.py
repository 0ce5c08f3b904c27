"""Building the micro world's frozen assets: tokenizer, SFT policy (:mod:`.sft`), feedback models
(:mod:`.feedback`), the one training loop of the feedback models (:mod:`.training`) and its
resumable snapshots (:mod:`.checkpoint`).

``rlhf-zoo build-assets`` calls :func:`rlhfgym.envs.build.sft.build_assets`. Runtime code (the
envs, the feedback models as rewards, the agents) never imports this package: it only reads what
the build wrote.
"""
