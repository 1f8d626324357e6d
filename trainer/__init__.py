"""Pretrain / SFT / RL stages for FireRed-Image-Edit on top of ``firered_core`` (to come).

``trainer`` never imports ``nodes`` or ComfyUI; it reuses the core's conditioning, samplers and
consistency measures so training and inference cannot drift apart."""
