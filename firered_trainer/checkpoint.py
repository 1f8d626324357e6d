"""Atomic, exactly resumable checkpoints through accelerate's ``save_state`` / ``load_state``.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00001000/`` holding

* ``trainable.safetensors`` -- only the trained weights (the LoRA adapters, or the whole MM-DiT
  for a full fine-tune; under FSDP accelerate writes its own sharded model files instead),
* accelerate's files: the optimizer (``optimizer.bin``, 8-bit states included), the LR scheduler,
  every process's RNG states (python, numpy, torch, CUDA: ``random_states_<rank>.pkl``) and the
  registered objects (the bucket sampler's position, the EMA, the step),
* ``config.yaml`` (the run's config) and ``meta.json`` (step, loss, time).

It is written into a hidden ``.tmp-step-...`` folder and renamed into place with ``os.replace``
only when every process has finished writing, so a crash at any moment leaves either the whole
checkpoint or none: a ``step-*`` folder is always complete. Leftover temporary folders are removed
at the next start. Only the last ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class TrainState:
    """The step counter (and the data report) as an accelerate checkpointing object."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class StatefulSampler:
    """Adapts a :class:`firered_trainer.buckets.BucketBatchSampler` to accelerate's checkpoint objects
    (its state is a small JSON-able dict)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class EMAState:
    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None and state:
            self.ema.load_state_dict(state)


def checkpoints_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(output_dir) -> Path | None:
    cks = list_checkpoints(output_dir)
    return cks[-1] if cks else None


def checkpoint_step(path) -> int:
    m = _STEP_DIR.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (expected .../checkpoints/step-NNNNNNNN)")
    return int(m.group(1))


def clean_partial(output_dir) -> list[Path]:
    """Remove temporary folders a crashed save left behind (main process only)."""
    root = checkpoints_dir(output_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def install_hooks(accelerator) -> None:
    """Make accelerate save and load only the trained weights of each prepared model (not the
    frozen 20B base), as ``trainable.safetensors``. Under FSDP accelerate's own model files stay."""
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if not weights:  # FSDP / DeepSpeed: accelerate saved the model itself
            return
        if accelerator.is_main_process:
            for i, m in enumerate(models):
                name = "trainable.safetensors" if i == 0 else f"trainable_{i}.safetensors"
                save_file(_trainable_state(accelerator.unwrap_model(m)), os.path.join(output_dir, name))
        weights.clear()

    def load_hook(models, input_dir):
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return
        for i, m in enumerate(models):
            name = "trainable.safetensors" if i == 0 else f"trainable_{i}.safetensors"
            sd = load_file(os.path.join(input_dir, name))
            model = accelerator.unwrap_model(m)
            params = dict(model.named_parameters())
            missing = [k for k in sd if k not in params]
            if missing:
                raise ValueError(f"{input_dir}: checkpoint weights {missing[:3]} are not in this model "
                                 "(was it saved with another train_mode or LoRA setting?)")
            with torch.no_grad():
                for k, v in sd.items():
                    params[k].copy_(v.to(params[k].device, params[k].dtype))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir, step: int, *, config_yaml: str, meta: dict | None = None,
                    keep_last: int = 3, extra=None) -> Path:
    """Write the checkpoint of ``step`` atomically (every process calls this); returns its folder.
    ``extra(tmp_dir)``, if given, writes more files (e.g. the LoRA in ComfyUI format) on the main
    process before the rename."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), **(meta or {})}, indent=1))
        if extra is not None:
            extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # the same step saved again (a resumed run): the new one replaces it
            old = root / f".tmp-old-{step:08d}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path) -> int:
    """Restore everything saved by :func:`save_checkpoint`; returns its step."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no meta.json)")
    accelerator.load_state(str(path))
    return checkpoint_step(path)
