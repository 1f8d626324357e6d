"""Training a LoRA from ComfyUI: point at a dataset, pick a preset, queue.

``FireRedTrainLoRA`` runs one trainer stage (``trainer.sft.run``; DPO / NFT presets run the RL
stages) on the model files already in ``models/``, with ComfyUI's progress bar, a live loss chart
in the node (the ``firered.train`` event and the ``firered_loss`` output, drawn by ``js/``), the
latest sample edit as the preview, and Cancel: the trainer saves a resumable checkpoint, then the
node stops. Queue the same LoRA name again to resume. The LoRA lands in ``models/loras/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import host

CATEGORY = "FireRed/training"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "trainer" / "configs"


def presets() -> list[str]:
    """The LoRA presets shipped in ``trainer/configs`` (SFT first; the RL presets when present)."""
    names = []
    for p in sorted(CONFIG_DIR.glob("*.yaml")):
        head = p.read_text(encoding="utf-8")
        if "train_mode: full" in head:
            continue
        names.append(p.stem)
    order = {"sft_lora_24gb": 0, "tiny_cpu": 1}
    return sorted(names, key=lambda n: (order.get(n, 2), n))


def _stage_of(preset: str) -> str:
    for rl in ("dpo", "nft"):
        if preset.startswith(rl + "_"):
            return rl
    for line in (CONFIG_DIR / f"{preset}.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("stage:"):
            return line.split(":", 1)[1].split("#")[0].strip()
    return "sft"


def _dataset_path(dataset: str) -> Path:
    if not dataset.strip():
        raise ValueError("dataset: give a folder of edit pairs or a .jsonl file (FireRed's format)")
    p = Path(dataset.strip()).expanduser()
    if not p.is_absolute():
        p = host.input_dir() / p
    if not p.exists():
        raise FileNotFoundError(f"dataset {str(p)!r} does not exist (relative paths are under ComfyUI's input folder)")
    return p


def _safe_name(name: str) -> str:
    name = name.strip()
    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        raise ValueError(f"lora_name {name!r}: give a plain file name (letters, digits, - and _), without folders")
    return name.removesuffix(".safetensors")


def _trainer_stage(name: str):
    """The trainer's stage module. The trainer imports the core by its plain name (``firered_core``,
    as ``python -m trainer`` runs it); inside ComfyUI the pack's own core is registered under that
    name first, so one copy of the core serves both."""
    import importlib
    import sys

    from .. import firered_core

    prefix = firered_core.__name__
    if prefix != "firered_core":
        for mod_name, mod in list(sys.modules.items()):
            if mod_name == prefix or mod_name.startswith(prefix + "."):
                sys.modules.setdefault("firered_core" + mod_name[len(prefix):], mod)
    return importlib.import_module(f"..trainer.{name}", __package__)


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
                "preset": (presets(), {"tooltip": "Training settings: sft_lora_24gb fits a 24 GB card (fp8 base, gradient checkpointing, AdamW8bit); tiny_cpu is a quick check."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000, "tooltip": "Optimizer steps."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False, "tooltip": "Peak learning rate."}),
                "rank": ("INT", {"default": 32, "min": 1, "max": 512, "tooltip": "LoRA rank (alpha = rank)."}),
                "resolution": ("INT", {"default": 1024, "min": 64, "max": 2048, "step": 64, "tooltip": "Training pictures are resized to about resolution² pixels."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed of the data order, timesteps and noise."}),
                "overrides": ("STRING", {"multiline": True, "default": "", "tooltip": "More settings, one key=value per line (e.g. optim.name=lion8bit, checkpoint.every=100); see trainer/configs."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # training has effects outside its outputs: run whenever queued

    def train(self, model_name, text_encoder_name, vae_name, dataset, lora_name, preset, steps, learning_rate, rank,
              resolution, seed, overrides="", unique_id=None):
        name = _safe_name(lora_name)
        stage = _stage_of(preset)
        te_path = host.full_path("text_encoders", text_encoder_name)
        settings = [
            f"model.transformer={host.full_path('diffusion_models', model_name)}",
            f"model.text_encoder={te_path}",
            f"model.vae={host.full_path('vae', vae_name)}",
            f"output_dir={host.output_dir() / 'FireRed' / 'training' / name}",
            f"name={name}",
            f"seed={seed}",
        ]
        tok = te_path.with_name(te_path.stem + "_tokenizer")
        if tok.is_dir():
            settings.append(f"model.tokenizer={tok}")
        user = [line.strip() for line in overrides.splitlines() if line.strip() and not line.strip().startswith("#")]
        losses: list[list[float]] = []
        update = host.step_progress(steps, unique_id)

        def progress(step, total, loss, pictures=None):
            if isinstance(loss, dict):  # the RL stages report a row of metrics
                loss = loss.get("loss", float("nan"))
            losses.append([int(step), float(loss)])
            host.send_event("firered.train", {"node": unique_id, "step": int(step), "total": int(total), "loss": float(loss)})
            update(int(step), pictures[0] if pictures else None)

        host.free_before_load()
        preset_file = str(CONFIG_DIR / f"{preset}.yaml")
        if stage in ("sft", "pretrain"):
            settings += [f"data.jsonl={_dataset_path(dataset)}", f"max_steps={steps}", f"optim.lr={learning_rate}",
                         f"lora.rank={rank}", f"lora.alpha={rank}", f"data.resolution={resolution}"]
            result = _trainer_stage("sft").run(preset_file, overrides=settings + user, progress=progress, should_stop=host.interrupt_requested)
            stopped, lora = result.stopped, result.lora
        elif stage in ("dpo", "nft"):
            lora, stopped = self._train_rl(stage, preset_file, settings, user, dataset, steps, learning_rate, rank, resolution, progress)
        else:
            raise ValueError(f"preset {preset!r} is for the {stage!r} stage; this node trains sft, dpo or nft LoRAs")
        if stopped:
            host.check_interrupt()  # a checkpoint is saved; report the run as cancelled
        if lora is None:
            raise RuntimeError(f"the {preset} preset wrote no LoRA (train_mode full?)")
        dest = host.folder_dirs("loras")[0] / f"{name}.safetensors"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".safetensors.tmp")
        shutil.copyfile(lora, tmp)
        os.replace(tmp, dest)
        return {"ui": {"firered_loss": losses, "text": [str(dest)]}, "result": (dest.name,)}

    @staticmethod
    def _train_rl(stage, preset_file, settings, user, dataset, steps, learning_rate, rank, resolution, progress):
        """DPO (preference pairs) or DiffusionNFT (prompts + reward) on a LoRA; the model is loaded
        from the chosen files into an editor the stage trains in place."""
        from ..firered_core import FireRedEditor

        given = dict(item.split("=", 1) for item in settings)
        device = host.load_device()
        editor = FireRedEditor.from_files(
            None, transformer=given["model.transformer"], text_encoder=given["model.text_encoder"], vae=given["model.vae"],
            tokenizer=given.get("model.tokenizer"), device=device, dtype=host.default_dtype(device),
        )
        opts = [f"model={given['model.transformer']}", f"output_dir={given['output_dir']}", f"seed={given['seed']}",
                f"steps={steps}", f"lr={learning_rate}", f"lora_rank={rank}", f"lora_alpha={2 * rank}",
                f"width={resolution}", f"height={resolution}", f"device={device}",
                f"{'data' if stage == 'dpo' else 'prompts'}={_dataset_path(dataset)}"]
        res = _trainer_stage(f"rl.{stage}").run(preset_file, overrides=opts + user, progress=progress,
                                                should_stop=host.interrupt_requested, editor=editor)
        return res["lora"], res["stopped"]


NODE_CLASS_MAPPINGS = {"FireRedTrainLoRA": FireRedTrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"FireRedTrainLoRA": "FireRed Train LoRA"}
