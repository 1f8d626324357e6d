"""Pretrain / SFT / RL stages for FireRed-Image-Edit on top of ``firered_core``.

Stages: ``python -m trainer sft|pretrain --config trainer/configs/<file>.yaml key=value ...`` or
``trainer.sft.run(config, progress=..., should_stop=...)`` (see :mod:`trainer.sft`).

``trainer`` never imports ``nodes`` or ComfyUI; it reuses the core's conditioning, samplers and
consistency measures so training and inference cannot drift apart."""
