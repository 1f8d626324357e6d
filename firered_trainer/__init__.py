"""Pretrain / SFT / RL stages for FireRed-Image-Edit on top of ``firered_core``.

Stages: ``python -m firered_trainer sft|pretrain --config firered_trainer/configs/<file>.yaml key=value ...`` or
``firered_trainer.sft.run(config, progress=..., should_stop=...)`` (see :mod:`firered_trainer.sft`).

``firered_trainer`` never imports ``nodes`` or ComfyUI; it reuses the core's conditioning, samplers and
consistency measures so training and inference cannot drift apart."""

import firered_core as _core  # noqa: F401,E402  (light; installs the core's log filters before bitsandbytes loads)
