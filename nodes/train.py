"""Training a LoRA from ComfyUI: point at a dataset, pick a preset, queue.

``FireRedTrainLoRA`` runs one LoRA job (``firered_trainer.jobs.run_lora_job``: SFT, or the DPO / NFT
presets) on the model files already in ``models/``, with ComfyUI's progress bar, a live loss chart
in the node (the ``firered.train`` event and the ``firered_loss`` output, drawn by ``js/``), the
latest sample edit as the preview, and Cancel: the trainer saves a resumable checkpoint, then the
node stops. Queue the same LoRA name again to resume. The LoRA lands in ``models/loras/``.
"""

from __future__ import annotations

from pathlib import Path

from . import host

CATEGORY = "FireRed/training"


def _dataset_path(dataset: str) -> Path:
    if not dataset.strip():
        raise ValueError("dataset: give a folder of edit pairs or a .jsonl file (FireRed's format)")
    p = Path(dataset.strip()).expanduser()
    if not p.is_absolute():
        p = host.input_dir() / p
    if not p.exists():
        raise FileNotFoundError(f"dataset {str(p)!r} does not exist (relative paths are under ComfyUI's input folder)")
    return p


def _trainer_stage(name: str):
    """The trainer's stage module. The trainer imports the core by its plain name (``firered_core``,
    as ``python -m firered_trainer`` runs it); inside ComfyUI the pack's own core is registered under that
    name first, so one copy of the core serves both."""
    import importlib
    import sys

    from .. import firered_core

    prefix = firered_core.__name__
    if prefix != "firered_core":
        for mod_name, mod in list(sys.modules.items()):
            if mod_name == prefix or mod_name.startswith(prefix + "."):
                sys.modules.setdefault("firered_core" + mod_name[len(prefix):], mod)
    return importlib.import_module(f"..firered_trainer.{name}", __package__)


def _presets() -> list[str]:
    try:
        return _trainer_stage("jobs").lora_presets()
    except Exception:  # listing must never break the node definition
        return []


class FireRedTrainLoRA:
    DESCRIPTION = (
        "Trains a LoRA on your edit pairs (a folder of before/after pictures with caption files, or a FireRed .jsonl) "
        "and saves it in models/loras. Cancel saves a checkpoint; queue again with the same name to resume."
    )
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The LoRA's file name in models/loras (type it into FireRed LoRA Loader after a refresh).",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (host.list_files("diffusion_models"), {"tooltip": "The MM-DiT to train on (a bf16 file; the 24 GB preset holds it in fp8)."}),
                "text_encoder_name": (host.list_files("text_encoders"), {"tooltip": "Qwen2.5-VL; its features are computed once and cached on disk."}),
                "vae_name": (host.list_files("vae"), {"tooltip": "The Qwen-Image VAE."}),
                "dataset": ("STRING", {"default": "", "tooltip": "A folder of edit pairs (source, target and caption files) or a .jsonl in FireRed's format; relative to ComfyUI's input folder."}),
                "lora_name": ("STRING", {"default": "my_firered_lora", "tooltip": "File name of the LoRA (and of its training folder under output/FireRed/training)."}),
                "preset": (_presets(), {"tooltip": "Training settings: sft_lora_24gb fits a 24 GB card (fp8 base, gradient checkpointing, AdamW8bit); tiny_cpu is a quick check."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000, "tooltip": "Optimizer steps."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False, "tooltip": "Peak learning rate."}),
                "rank": ("INT", {"default": 32, "min": 1, "max": 512, "tooltip": "LoRA rank. Its alpha: = rank for SFT (scale 1), = 2 x rank for the DPO / NFT presets (DiffusionNFT's r32 / alpha 64)."}),
                "resolution": ("INT", {"default": 1024, "min": 64, "max": 2048, "step": 64, "tooltip": "Training pictures are resized to about resolution² pixels."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed of the data order, timesteps and noise."}),
                "overrides": ("STRING", {"multiline": True, "default": "", "tooltip": "More settings, one key=value per line (e.g. optim.name=lion8bit, checkpoint.every=100); see firered_trainer/configs."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # training has effects outside its outputs: run whenever queued

    def train(self, model_name, text_encoder_name, vae_name, dataset, lora_name, preset, steps, learning_rate, rank,
              resolution, seed, overrides="", unique_id=None):
        jobs = _trainer_stage("jobs")
        name = jobs.lora_file_name(lora_name)
        te_path = host.full_path("text_encoders", text_encoder_name)
        tok = te_path.with_name(te_path.stem + "_tokenizer")
        job = jobs.LoraJob(
            transformer=host.full_path("diffusion_models", model_name), text_encoder=te_path, vae=host.full_path("vae", vae_name),
            tokenizer=tok if tok.is_dir() else None, dataset=_dataset_path(dataset), name=name, preset=preset,
            output_dir=host.output_dir() / "FireRed" / "training" / name, steps=steps, learning_rate=learning_rate, rank=rank,
            resolution=resolution, seed=seed,
            overrides=[ln.strip() for ln in overrides.splitlines() if ln.strip() and not ln.strip().startswith("#")],
        )
        update = host.step_progress(steps, unique_id)

        def progress(step, total, loss, pictures):
            host.send_event("firered.train", {"node": unique_id, "step": step, "total": total, "loss": loss})
            update(step, pictures[0] if pictures else None)

        host.free_before_load()
        device = host.load_device()
        result = jobs.run_lora_job(job, progress=progress, should_stop=host.interrupt_requested, device=device, dtype=host.default_dtype(device))
        if result.stopped:
            host.check_interrupt()  # a checkpoint is saved; report the run as cancelled
        if result.lora is None:
            raise RuntimeError(f"the {preset} preset wrote no LoRA (train_mode full?)")
        dest = jobs.install_lora(result.lora, host.folder_dirs("loras")[0], name)
        return {"ui": {"firered_loss": result.losses, "text": [str(dest)]}, "result": (dest.name,)}


NODE_CLASS_MAPPINGS = {"FireRedTrainLoRA": FireRedTrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"FireRedTrainLoRA": "FireRed Train LoRA"}
