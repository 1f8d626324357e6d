"""The RL stage (FireRed report section 3.6): DPO with Asymmetric Gradient Optimization and
DiffusionNFT with pluggable rewards (layout-aware OCR, consistency, VLM judge, cheap statistics).

* :mod:`trainer.rl.losses` -- the objectives as pure tensor functions;
* :mod:`trainer.rl.rewards` -- ``reward(images, batch) -> scores`` and the reward registry;
* :mod:`trainer.rl.dpo`, :mod:`trainer.rl.nft` -- the stage entrypoints (``run(config, ...)``).

Heavy libraries are imported inside the functions that use them.
"""
