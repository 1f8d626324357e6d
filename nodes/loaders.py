"""Loader nodes: the MM-DiT, the text encoder, the VAE, a diffusers release folder, and LoRAs.

Each resolves the chosen file in ComfyUI's model folders and calls one ``firered_core.parts``
loader. Models are read onto the offload device (the CPU) and moved to the GPU only while a node
uses them, unless ``keep_loaded`` is on. Every loader fingerprints the file it reads, so ComfyUI
reloads when the file on disk changes.
"""

from __future__ import annotations

from ..firered_core import parts
from . import host

CATEGORY = "FireRed/loaders"

DTYPES = ["auto", "bf16", "fp16", "fp32"]
WEIGHT_DTYPES = ["auto", "fp8_e4m3fn", "fp8_e5m2", "dequantize", "fp8_scaled", "int8"]

_DTYPE_TIP = "Compute precision. auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU."
_KEEP_TIP = (
    "Keep this model on the GPU between runs (faster repeats, but the memory stays taken). "
    "Off: it moves to the offload device after each node that uses it."
)


def _dtype(choice: str, device):
    return host.default_dtype(device) if choice == "auto" else choice


def _load_target(keep_loaded: bool):
    return host.load_device() if keep_loaded else host.offload_device()


def _fingerprint(folder: str, name: str) -> str:
    try:
        return parts.file_fingerprint(host.full_path(folder, name))
    except (FileNotFoundError, ValueError) as e:  # let validation / execution report it
        return f"missing:{e}"


class FireRedModelLoader:
    DESCRIPTION = (
        "Loads the FireRed-Image-Edit (or Qwen-Image-Edit-2509) MM-DiT from models/diffusion_models: "
        "bf16 / fp16 safetensors, fp8_e4m3fn, ComfyUI 'fp8 scaled' and mixed-precision files, GGUF."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FIRERED_DIT",)
    RETURN_NAMES = ("dit",)
    OUTPUT_TOOLTIPS = ("The MM-DiT, for FireRed LoRA Loader, FireRed Sampler or FireRed Edit.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (host.list_files("diffusion_models"), {"tooltip": "The MM-DiT file in models/diffusion_models (.safetensors or .gguf)."}),
                "weight_dtype": (
                    WEIGHT_DTYPES,
                    {
                        "default": "auto",
                        "tooltip": "How weights are held in memory. auto: as stored (fp8 and GGUF stay quantized, dequantized layer by layer); "
                        "fp8_e4m3fn / fp8_e5m2: store a bf16 file in fp8 (half the memory); dequantize: expand fp8 to the compute precision; "
                        "fp8_scaled: fp8 with per-channel scales (pick this with the Lightning LoRA: plain fp8 is reported to give grid artefacts); "
                        "int8: int8 weights with per-channel scales.",
                    },
                ),
                "dtype": (DTYPES, {"default": "auto", "tooltip": _DTYPE_TIP}),
                "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": _KEEP_TIP}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, model_name, **_):
        return _fingerprint("diffusion_models", model_name)

    def load(self, model_name, weight_dtype="auto", dtype="auto", keep_loaded=False):
        path = host.full_path("diffusion_models", model_name)
        host.free_before_load()
        device = _load_target(keep_loaded)
        dit = parts.load_dit(path, device=device, dtype=_dtype(dtype, host.load_device()), weight_dtype=weight_dtype)
        return (parts.DiT(dit.transformer, dit.scheduler_config, dit.source, keep_loaded=keep_loaded),)


class FireRedTextEncoderLoader:
    DESCRIPTION = (
        "Loads Qwen2.5-VL-7B, the instruction and picture reader, from models/text_encoders "
        "(qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors). The tokenizer comes with ComfyUI."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FIRERED_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("Qwen2.5-VL with its processor, for FireRed Edit Encode or FireRed Edit.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (host.list_files("text_encoders"), {"tooltip": "The Qwen2.5-VL-7B file in models/text_encoders."}),
                "dtype": (DTYPES, {"default": "auto", "tooltip": _DTYPE_TIP + " fp8 files are expanded to this precision."}),
                "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": _KEEP_TIP}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, text_encoder_name, **_):
        return _fingerprint("text_encoders", text_encoder_name)

    def load(self, text_encoder_name, dtype="auto", keep_loaded=False):
        path = host.full_path("text_encoders", text_encoder_name)
        host.free_before_load()
        te = parts.load_text_encoder(path, device=_load_target(keep_loaded), dtype=_dtype(dtype, host.load_device()))
        return (parts.TextEncoder(te.model, te.processor, te.source, keep_loaded=keep_loaded),)


class FireRedVAELoader:
    DESCRIPTION = "Loads the Qwen-Image VAE from models/vae (qwen_image_vae.safetensors)."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FIRERED_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE, for FireRed Edit Encode, FireRed Decode or FireRed Edit.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (host.list_files("vae"), {"tooltip": "The Qwen-Image VAE file in models/vae."}),
                "dtype": (DTYPES, {"default": "auto", "tooltip": _DTYPE_TIP}),
                "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": _KEEP_TIP}),
                "tiling": ("BOOLEAN", {"default": False, "tooltip": "Encode and decode in overlapping tiles: large pictures in much less memory (seams are blended)."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, vae_name, **_):
        return _fingerprint("vae", vae_name)

    def load(self, vae_name, dtype="auto", keep_loaded=False, tiling=False):
        path = host.full_path("vae", vae_name)
        vae = parts.load_vae(path, device=_load_target(keep_loaded), dtype=_dtype(dtype, host.load_device()), tiling=tiling)
        return (parts.VAE(vae.model, vae.source, keep_loaded=keep_loaded),)


class FireRedDiffusersLoader:
    DESCRIPTION = (
        "Loads a whole FireRed-Image-Edit release folder in the diffusers layout (transformer/, text_encoder/, vae/, "
        "tokenizer/ or processor/, scheduler/) from models/diffusers."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FIRERED_DIT", "FIRERED_TEXT_ENCODER", "FIRERED_VAE")
    RETURN_NAMES = ("dit", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = ("The MM-DiT.", "Qwen2.5-VL with its processor.", "The VAE.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder_name": (host.list_model_folders("diffusers"), {"tooltip": "A release folder in models/diffusers, e.g. FireRed-Image-Edit-1.1."}),
                "weight_dtype": (WEIGHT_DTYPES, {"default": "auto", "tooltip": "How the MM-DiT's weights are held; see FireRed Model Loader."}),
                "dtype": (DTYPES, {"default": "auto", "tooltip": _DTYPE_TIP}),
                "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": _KEEP_TIP}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, folder_name, **_):
        return _fingerprint("diffusers", folder_name)

    def load(self, folder_name, weight_dtype="auto", dtype="auto", keep_loaded=False):
        path = host.full_path("diffusers", folder_name)
        host.free_before_load()
        dt = _dtype(dtype, host.load_device())
        dit, te, vae = parts.load_release(path, device=_load_target(keep_loaded), dtype=dt, weight_dtype=weight_dtype)
        return (
            parts.DiT(dit.transformer, dit.scheduler_config, dit.source, keep_loaded=keep_loaded),
            parts.TextEncoder(te.model, te.processor, te.source, keep_loaded=keep_loaded),
            parts.VAE(vae.model, vae.source, keep_loaded=keep_loaded),
        )


class FireRedLoraLoader:
    DESCRIPTION = (
        "Adds a LoRA to the MM-DiT (stack several of these nodes). Reads diffusers / PEFT, kohya, ComfyUI, "
        "Lightning and LyCORIS (LoHa / LoKr) files. The loaded model is not changed: the LoRA applies to this branch only."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("FIRERED_DIT",)
    RETURN_NAMES = ("dit",)
    OUTPUT_TOOLTIPS = ("The MM-DiT with this LoRA on its stack.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": ("FIRERED_DIT", {"tooltip": "The MM-DiT from FireRed Model Loader (or another LoRA loader)."}),
                "lora_name": (host.list_files("loras"), {"tooltip": "The LoRA file in models/loras."}),
                "strength": (
                    "FLOAT",
                    {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05, "tooltip": "How strongly the LoRA applies (1 = as trained, 0 = off, negative = away from it)."},
                ),
            }
        }

    @classmethod
    def IS_CHANGED(cls, lora_name, **_):
        return _fingerprint("loras", lora_name)

    def apply(self, dit, lora_name, strength=1.0):
        return (dit.with_lora(host.full_path("loras", lora_name), strength),)


NODE_CLASS_MAPPINGS = {
    "FireRedModelLoader": FireRedModelLoader,
    "FireRedTextEncoderLoader": FireRedTextEncoderLoader,
    "FireRedVAELoader": FireRedVAELoader,
    "FireRedDiffusersLoader": FireRedDiffusersLoader,
    "FireRedLoraLoader": FireRedLoraLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FireRedModelLoader": "FireRed Model Loader (MM-DiT)",
    "FireRedTextEncoderLoader": "FireRed Text Encoder Loader (Qwen2.5-VL)",
    "FireRedVAELoader": "FireRed VAE Loader",
    "FireRedDiffusersLoader": "FireRed Diffusers Folder Loader",
    "FireRedLoraLoader": "FireRed LoRA Loader",
}
