"""The pretrain stage: the SFT loop with the pretrain config -- a full fine-tune (AdamW, lr 1e-5,
EMA 0.9999) on a mixture of text-to-image and edit data (``source_image: null`` rows are
text-to-image samples; ``data.mix`` weights the datasets and ``data.count_weights`` the number of
input pictures). One loop, two configs: see :mod:`firered_trainer.sft` for the loop itself.

Launch::

    accelerate launch --num_processes 8 -m firered_trainer pretrain --config firered_trainer/configs/pretrain.yaml \\
        model.path=models/FireRed-Image-Edit-1.1 output_dir=runs/pretrain
"""

from __future__ import annotations

from typing import Callable

from . import sft
from .config import StageConfig, load_config


def run(config, *, overrides: list[str] = (), progress: sft.Progress | None = None,
        should_stop: Callable[[], bool] | None = None) -> sft.TrainResult:
    """Train from a :class:`StageConfig` or a YAML path (+ ``key=value`` overrides)."""
    cfg = config if isinstance(config, StageConfig) else load_config(config, list(overrides), stage="pretrain")
    return sft.train(cfg, progress=progress, should_stop=should_stop)
