"""The RL stage (FireRed report section 3.6): DPO with Asymmetric Gradient Optimization and
DiffusionNFT with pluggable rewards (layout-aware OCR, consistency, VLM judge, cheap statistics).

* :mod:`firered_trainer.rl.losses` -- the objectives as pure tensor functions;
* :mod:`firered_trainer.rl.rewards` -- ``reward(images, batch) -> scores`` and the reward registry;
* :mod:`firered_trainer.rl.dpo`, :mod:`firered_trainer.rl.nft` -- the stage entrypoints (``run(config, ...)``).

Heavy libraries are imported inside the functions that use them.
"""
