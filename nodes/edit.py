"""Editing nodes: encode the instruction with the pictures, sample, decode, the one-node edit, and
the before/after comparison.

``FireRedSampler`` returns a standard ``LATENT`` (raw 16-channel Qwen-Image VAE latents
``[B, 16, 1, h, w]``), so ComfyUI's own ``VAEDecode`` with ``qwen_image_vae`` decodes it, and a
``VAEEncode`` latent can start it (size, batch and, with denoise < 1, content).
"""

from __future__ import annotations

import uuid

from ..firered_core import parts
from ..firered_core.model import images
from ..firered_core.pipeline import EditRequest
from ..firered_core.sampling import noise, samplers, schedules
from . import host

CATEGORY = "FireRed"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
SAMPLER_NAMES = sorted(samplers.SAMPLERS)
# the release's schedule first (the default), then the rest of the registry
SCHEDULE_NAMES = ["flowmatch"] + sorted(n for n in schedules.SCHEDULES if n != "flowmatch")

_TIPS = {
    "seed": "Seed of the initial noise. The same seed with the same settings gives the same picture (with noise_device, the picture of the tool it names).",
    "steps": "Sampling steps: 40 for the release settings, 8 with the Lightning LoRA and the lightning schedule.",
    "cfg": "True CFG scale (with norm rescale): 4.0 for the release settings; 1.0 = no negative pass (Lightning).",
    "sampler": "The solver. euler is what the release uses; heun and dpmpp_2m are higher order; euler_sde adds fresh noise each step.",
    "schedule": "flowmatch: the release's resolution-dependent shift; linear_shift: ComfyUI's ModelSamplingAuraFlow (see shift); "
    "lightning: the 8-step Lightning LoRA's schedule; linear: no shift.",
    "shift": "Shift of the linear_shift schedule (3.1 in the official ComfyUI template). 0 = the schedule's default; ignored by the other schedules.",
    "width": "Output width in pixels (multiple of 16). 0 = about 1024x1024 at the aspect of the last picture, or the input latent's size.",
    "height": "Output height in pixels (multiple of 16). 0 = automatic, like width.",
    "denoise": "1 = edit from pure noise (usual). Below 1, start from the input latent partly noised: lower keeps more of it.",
    "noise_device": "Where the seed's noise is drawn, i.e. whose picture a seed gives: cpu = diffusers' examples; "
    "cuda = FireRed's inference.py (needs a CUDA GPU); comfyui = ComfyUI's KSampler (the whole batch in one draw).",
    "batch_size": "How many edits to make (each with its own noise). Ignored when a latent is connected: its batch is used.",
}
_PROMPT_TIP = "The edit instruction. With several pictures, refer to them as Picture 1, Picture 2, Picture 3."
_NEG_TIP = 'What CFG steers away from. The release uses a single space " ".'
_IMAGE_TIP = "Input picture {n} (optional). No pictures = text to image."


def _sampling_inputs() -> dict:
    return {
        "seed": ("INT", {"default": 43, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": _TIPS["seed"]}),
        "steps": ("INT", {"default": 40, "min": 1, "max": 200, "tooltip": _TIPS["steps"]}),
        "cfg": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 20.0, "step": 0.1, "round": 0.01, "tooltip": _TIPS["cfg"]}),
        "sampler": (SAMPLER_NAMES, {"default": "euler", "tooltip": _TIPS["sampler"]}),
        "schedule": (SCHEDULE_NAMES, {"default": "flowmatch", "tooltip": _TIPS["schedule"]}),
        "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.05, "tooltip": _TIPS["shift"]}),
        "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16, "tooltip": _TIPS["width"]}),
        "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16, "tooltip": _TIPS["height"]}),
    }


def _noise_input() -> dict:
    return {"noise_device": (list(noise.NOISE_DEVICES), {"default": "cpu", "tooltip": _TIPS["noise_device"]})}


def _encoder_inputs() -> dict:
    return {
        "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": _PROMPT_TIP}),
        "negative_prompt": ("STRING", {"multiline": True, "default": " ", "tooltip": _NEG_TIP}),
    }


def _picture_inputs() -> dict:
    return {f"image{n}": ("IMAGE", {"tooltip": _IMAGE_TIP.format(n=n)}) for n in (1, 2, 3)}


def _reference_inputs() -> dict:
    return {
        "ref_mode": (
            list(images.REF_MODES),
            {"default": "own_aspect", "tooltip": "How each picture is sized: own_aspect = reference latent about ref_size² at its own aspect "
             "(the release, diffusers); match_output = reference exactly the output size; comfyui = as ComfyUI's TextEncodeQwenImageEditPlus "
             "(area resampling, VL copy to the pixel, reference to multiples of 8), and sampled as its KSampler samples (its RoPE positions, "
             "CFGNorm at CFG > 1), so the native graph's picture can be reproduced (with noise_device comfyui)."},
        ),
        "ref_size": ("INT", {"default": 1024, "min": 256, "max": 2048, "step": 32, "tooltip": "Reference latents hold about ref_size x ref_size pixels (the release: 1024)."}),
        "vl_size": ("INT", {"default": 384, "min": 128, "max": 1024, "step": 32, "tooltip": "Qwen2.5-VL sees each picture at about vl_size x vl_size pixels (the release: 384)."}),
    }


def _size(width: int, height: int):
    if bool(width) != bool(height):
        raise ValueError(f"set both width and height, or leave both at 0 for automatic (got {width}x{height})")
    return (int(width), int(height)) if width else None


def _request(prompt, negative_prompt, ref_mode="own_aspect", ref_size=1024, vl_size=384) -> EditRequest:
    # encoded for CFG (negative included), so one encoding serves any cfg in the sampler
    return EditRequest(prompt=prompt, negative_prompt=negative_prompt, cfg=2.0, ref_mode=ref_mode, ref_area=ref_size * ref_size, vl_area=vl_size * vl_size)


class FireRedEditEncode:
    DESCRIPTION = (
        "Reads the instruction together with up to three pictures through Qwen2.5-VL (the Edit-Plus template) and "
        "VAE-encodes the pictures as reference latents. Connect to FireRed Sampler."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("FIRERED_COND",)
    RETURN_NAMES = ("cond",)
    OUTPUT_TOOLTIPS = ("The encoded edit: instruction, negative prompt and reference latents.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": ("FIRERED_TEXT_ENCODER", {"tooltip": "Qwen2.5-VL from FireRed Text Encoder Loader."}),
                "vae": ("FIRERED_VAE", {"tooltip": "The VAE from FireRed VAE Loader."}),
                **_encoder_inputs(),
            },
            "optional": {**_picture_inputs(), **_reference_inputs()},
        }

    def encode(self, text_encoder, vae, prompt, negative_prompt=" ", image1=None, image2=None, image3=None, **ref):
        req = _request(prompt, negative_prompt, **ref)
        with host.on_device(text_encoder, vae):
            return (parts.encode_edit(text_encoder, vae, [image1, image2, image3], req),)


class FireRedSampler:
    DESCRIPTION = (
        "Samples the edit with the MM-DiT (flow matching, true CFG). Its LATENT is the raw Qwen-Image latent, so "
        "ComfyUI's VAEDecode decodes it and a VAEEncode latent can feed it."
    )
    CATEGORY = CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "MASK")
    RETURN_NAMES = ("latent", "edit_mask")
    OUTPUT_TOOLTIPS = (
        "Raw 16-channel Qwen-Image VAE latents [B, 16, 1, h, w].",
        "The edit region consistency guidance used (1 = changed); all ones without guidance.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": ("FIRERED_DIT", {"tooltip": "The MM-DiT (with its LoRAs) from FireRed Model Loader / LoRA Loader."}),
                "cond": ("FIRERED_COND", {"tooltip": "The encoded edit from FireRed Edit Encode."}),
                **_sampling_inputs(),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": _TIPS["denoise"]}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": _TIPS["batch_size"]}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Optional starting latent (e.g. VAEEncode of the picture): sets size and batch; with denoise < 1 also the content."}),
                "guidance": ("FIRERED_GUIDANCE", {"tooltip": "Optional consistency guidance from FireRed Consistency Guidance: keep what the instruction did not ask to change."}),
                **_noise_input(),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, dit, cond, seed, steps, cfg, sampler, schedule, shift, width, height, denoise=1.0, batch_size=1, latent=None, guidance=None,
               noise_device="cpu", unique_id=None):
        samples = latent["samples"] if latent is not None else None
        vae_part = cond.vae if guidance is not None else None
        with host.on_device(dit, vae_part):
            out = parts.sample_edit(
                dit, cond, seed=seed, steps=steps, cfg=cfg, sampler=sampler, schedule=schedule, shift=shift or None,
                size=_size(width, height), latent=samples, denoise=denoise, batch_size=batch_size,
                callback=host.progress_callback(unique_id), guidance=guidance, noise_device=noise_device,
            )
        mask = out.edit_mask
        if mask is None:
            mask = parts.full_mask(out.samples)
        return ({"samples": out.samples}, mask)


class FireRedDecode:
    DESCRIPTION = "Decodes FireRed latents (or any Qwen-Image LATENT) to pictures with the Qwen-Image VAE."
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The pictures [B, H, W, 3].",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("FIRERED_VAE", {"tooltip": "The VAE from FireRed VAE Loader."}),
                "latent": ("LATENT", {"tooltip": "Latents from FireRed Sampler or ComfyUI's Qwen-Image nodes."}),
            }
        }

    def decode(self, vae, latent):
        with host.on_device(vae):
            return (parts.decode(vae, latent["samples"]),)


class FireRedEdit:
    DESCRIPTION = "The whole edit in one node: encode the instruction with the pictures, sample, decode."
    CATEGORY = CATEGORY
    FUNCTION = "edit"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    OUTPUT_TOOLTIPS = ("The edited pictures.", "Their raw Qwen-Image latents.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": ("FIRERED_DIT", {"tooltip": "The MM-DiT (with its LoRAs)."}),
                "text_encoder": ("FIRERED_TEXT_ENCODER", {"tooltip": "Qwen2.5-VL from FireRed Text Encoder Loader."}),
                "vae": ("FIRERED_VAE", {"tooltip": "The VAE from FireRed VAE Loader."}),
                **_encoder_inputs(),
                **_sampling_inputs(),
            },
            "optional": {**_picture_inputs(), **_reference_inputs(), **_noise_input()},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def edit(self, dit, text_encoder, vae, prompt, negative_prompt, seed, steps, cfg, sampler, schedule, shift, width, height,
             image1=None, image2=None, image3=None, noise_device="cpu", unique_id=None, **ref):
        req = _request(prompt, negative_prompt, **ref)
        with host.on_device(dit, text_encoder, vae):
            pixels, samples = parts.edit(
                dit, text_encoder, vae, [image1, image2, image3], req, seed=seed, steps=steps, cfg=cfg, sampler=sampler,
                schedule=schedule, shift=shift or None, size=_size(width, height), callback=host.progress_callback(unique_id),
                noise_device=noise_device,
            )
        return (pixels, {"samples": samples})


class FireRedCompare:
    DESCRIPTION = "Shows the source and the result in one frame with a slider to compare them (drag across the picture)."
    CATEGORY = CATEGORY
    FUNCTION = "compare"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "before": ("IMAGE", {"tooltip": "The source picture(s)."}),
                "after": ("IMAGE", {"tooltip": "The edited picture(s); resized to the source's size for display if they differ."}),
            }
        }

    def compare(self, before, after):
        pairs = images.comparison_pairs(before, after)
        folder = host.temp_dir()
        ui = []
        for b, a in pairs:
            entry = {}
            for role, pic in (("before", b), ("after", a)):
                name = f"firered_compare_{uuid.uuid4().hex[:12]}_{role}.png"
                images.unit_to_pil(pic)[0].save(folder / name, compress_level=1)
                entry[role] = {"filename": name, "subfolder": "", "type": "temp"}
            ui.append(entry)
        return {"ui": {"firered_compare": ui}, "result": ()}


NODE_CLASS_MAPPINGS = {
    "FireRedEditEncode": FireRedEditEncode,
    "FireRedSampler": FireRedSampler,
    "FireRedDecode": FireRedDecode,
    "FireRedEdit": FireRedEdit,
    "FireRedCompare": FireRedCompare,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FireRedEditEncode": "FireRed Edit Encode",
    "FireRedSampler": "FireRed Sampler",
    "FireRedDecode": "FireRed Decode",
    "FireRedEdit": "FireRed Edit (one node)",
    "FireRedCompare": "FireRed Compare (before / after)",
}
