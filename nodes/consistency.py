"""Consistency nodes: keep what the instruction did not ask to change.

* ``FireRedConsistencyGuidance`` -> ``FIRERED_GUIDANCE`` for FireRed Sampler: during a window of
  steps, the model's clean-image estimate is pulled toward the source picture outside the edit
  region (a user ``MASK``, or estimated automatically);
* ``FireRedAutoMask`` -> ``MASK``: where the edit will change the picture, to look at and correct;
* ``FireRedComposite``: paste the source's own pixels back outside the region after decoding.
"""

from __future__ import annotations

from ..firered_core import parts
from ..firered_core.editing import composite
from . import host
from .edit import SCHEDULE_NAMES, _size

CATEGORY = "FireRed/consistency"

_THRESHOLD_TIP = "Where the automatic mask is cut: 0 = automatic (Otsu), else a quantile (0.8 = the 20% most-changed area)."


def _threshold(value: float):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"threshold must be 0 (automatic) or a quantile in (0, 1), got {value}")
    return "otsu" if value == 0 else float(value)


class FireRedConsistencyGuidance:
    DESCRIPTION = (
        "Consistency guidance for FireRed Sampler: outside the edit region, the picture is pulled toward the source "
        "while sampling, so walls, faces and colours the instruction did not mention stay put. Connect a MASK "
        "(white = may change) or leave it out for an automatic region."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("FIRERED_GUIDANCE",)
    RETURN_NAMES = ("guidance",)
    OUTPUT_TOOLTIPS = ("Connect to FireRed Sampler's guidance input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "How strongly the unedited area is held to the source (1 = fully, 0 = off)."}),
                "schedule": (["constant", "sigma2"], {"default": "constant", "tooltip": "Weight over the steps: constant, or the FireRed report's eta·sigma² (zero while sigma > 0.9, growing toward the end)."}),
                "start_step": ("INT", {"default": 0, "min": 0, "max": 200, "tooltip": "First step with guidance."}),
                "end_step": ("INT", {"default": 200, "min": 1, "max": 200, "tooltip": "Guidance stops before this step (200 = to the end)."}),
                "measure": (["region", "region_pixel"], {"default": "region", "tooltip": "region: agreement in latent space (nearly free); region_pixel: measured in pixels through the VAE decoder (slower, finer)."}),
                "feather_px": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 128.0, "step": 1.0, "tooltip": "Softness of the mask's edge, in pixels."}),
                "estimate_steps": ("INT", {"default": 3, "min": 1, "max": 20, "tooltip": "Automatic mask: how many first steps it is estimated from."}),
                "threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": _THRESHOLD_TIP}),
                "source_picture": ("INT", {"default": 1, "min": 1, "max": 3, "tooltip": "Which input picture to keep (1 = the first)."}),
            },
            "optional": {"mask": ("MASK", {"tooltip": "The edit region: 1 (white) = may change, 0 = keep. Any size; resized and feathered. Leave out for automatic."})},
        }

    def build(self, strength, schedule, start_step, end_step, measure, feather_px, estimate_steps, threshold, source_picture, mask=None):
        if end_step <= start_step:
            raise ValueError(f"end_step ({end_step}) must be after start_step ({start_step})")
        return (
            parts.GuidanceSettings(
                strength=strength, schedule=schedule, steps=(start_step, end_step), measures=(measure,), mask=mask,
                auto_mask=mask is None, estimate_steps=estimate_steps, threshold=_threshold(threshold),
                feather_px=feather_px, source=source_picture - 1,
            ),
        )


class FireRedAutoMask:
    DESCRIPTION = (
        "Estimates where the edit will change the picture from the first sampling steps (where the model's "
        "clean-image prediction departs from the source). Look at it, paint over it, feed it to the guidance."
    )
    CATEGORY = CATEGORY
    FUNCTION = "estimate"
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("edit_mask",)
    OUTPUT_TOOLTIPS = ("1 (white) = changes, 0 = stays; at the output size.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": ("FIRERED_DIT", {"tooltip": "The MM-DiT."}),
                "cond": ("FIRERED_COND", {"tooltip": "The encoded edit (with at least one picture)."}),
                "seed": ("INT", {"default": 43, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Use the sampler's seed to see that edit's region."}),
                "steps": ("INT", {"default": 40, "min": 1, "max": 200, "tooltip": "The sampler's steps (the schedule depends on them)."}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 20.0, "step": 0.1, "tooltip": "The sampler's CFG."}),
                "schedule": (SCHEDULE_NAMES, {"default": "flowmatch", "tooltip": "The sampler's schedule."}),
                "estimate_steps": ("INT", {"default": 3, "min": 1, "max": 20, "tooltip": "How many first steps to run and average."}),
                "threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": _THRESHOLD_TIP}),
                "smooth": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 8.0, "step": 0.25, "tooltip": "Smoothing of the change map before cutting, in latent cells (8 px each)."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16, "tooltip": "The sampler's output width (0 = automatic)."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16, "tooltip": "The sampler's output height (0 = automatic)."}),
                "source_picture": ("INT", {"default": 1, "min": 1, "max": 3, "tooltip": "Which input picture the change is measured against."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def estimate(self, dit, cond, seed, steps, cfg, schedule, estimate_steps, threshold, smooth, width, height, source_picture, unique_id=None):
        with host.on_device(dit, cond.vae):
            mask = parts.estimate_edit_mask(
                dit, cond, seed=seed, steps=steps, cfg=cfg, schedule=schedule, estimate_steps=estimate_steps,
                threshold=_threshold(threshold), smooth=smooth, size=_size(width, height), source=source_picture - 1,
                callback=host.progress_callback(unique_id),
            )
        return (mask,)


class FireRedComposite:
    DESCRIPTION = (
        "Pastes the source's own pixels back outside the edit region, with a feathered seam and the edit's colours "
        "matched to the source around it: unedited pixels are exactly the source's."
    )
    CATEGORY = CATEGORY
    FUNCTION = "composite"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The composite, at the source's size.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "edited": ("IMAGE", {"tooltip": "The edited picture(s)."}),
                "source": ("IMAGE", {"tooltip": "The source picture (resized edits are scaled to its size)."}),
                "mask": ("MASK", {"tooltip": "The edit region, 1 = take the edit (e.g. FireRed Sampler's edit_mask)."}),
                "feather_px": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 128.0, "step": 1.0, "tooltip": "Width of the blended seam, in pixels."}),
                "color_match": ("BOOLEAN", {"default": True, "tooltip": "Match the edit's colours to the source in a ring around the region, so the seam does not show."}),
            }
        }

    def composite(self, edited, source, mask, feather_px=4.0, color_match=True):
        return (composite.composite(edited, source, mask, feather_px=feather_px, color_matching=color_match),)


NODE_CLASS_MAPPINGS = {
    "FireRedConsistencyGuidance": FireRedConsistencyGuidance,
    "FireRedAutoMask": FireRedAutoMask,
    "FireRedComposite": FireRedComposite,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FireRedConsistencyGuidance": "FireRed Consistency Guidance",
    "FireRedAutoMask": "FireRed Auto Edit Mask",
    "FireRedComposite": "FireRed Composite (keep source pixels)",
}
