"""Stitching nodes: up to ten pictures onto FireRed's three canvases with the instruction renumbered
(:func:`firered_core.agent.stitch.stitch`), and cropping a picture to a mask's region.

``FireRedStitchPictures`` takes its pictures as lists (``INPUT_IS_LIST``): each picture socket
accepts one picture, an ``IMAGE`` batch or a list of pictures (of any sizes), and all of them are
read in socket order. Its three canvases go to FireRed Edit Encode's ``image1``-``image3`` and its
``prompt`` to the encoder's prompt (convert the widget to an input).
"""

from __future__ import annotations

from ..firered_core.agent import grounding as ground
from ..firered_core.agent import layout, stitch
from ..firered_core.model import images as imgs
from . import host

CATEGORY = "FireRed"
EXTRA = 9  # picture sockets after the first

_PROMPT_TIP = (
    "The edit instruction, naming the pictures in socket order as Picture 1, Picture 2, ... (also 'the second image', "
    "'图2'). It comes out rewritten to the canvases, e.g. 'Picture 5' -> 'Picture 2 (top right)'."
)
_GROUND_TIP = (
    "Optional: a Qwen2.5-VL with its language head (FireRed Diffusers Loader's text_encoder; ComfyUI's single "
    "text-encoder files have none) finds what the instruction needs in each picture without a mask, and those are "
    "cropped to it. Used with more than three pictures; the base picture stays whole."
)
_MASK_TIP = (
    "Optional crop masks, one per picture in order (a batch or a list): each picture is cropped to its mask's region plus "
    "margin. An empty mask (LoadImage's, for a picture without alpha) keeps the whole picture."
)


def _first(v, default=None):
    """A widget value under INPUT_IS_LIST (a list of one)."""
    if isinstance(v, list):
        return v[0] if v else default
    return default if v is None else v


def _pictures(groups) -> list:
    """Every picture of the connected sockets, in order: batches split, lists flattened."""
    out = []
    for group in groups:
        for item in group or []:
            out.extend(imgs.picture_list(item))
    return out


def _masks(masks) -> list | None:
    if not masks:
        return None
    out = []
    for m in masks:
        if m is None:
            continue
        if m.dim() == 3:  # a MASK batch [B, H, W]
            out.extend(m[i] for i in range(m.shape[0]))
        else:
            out.append(m)
    return out


def _unit(pil):
    return imgs.tensor_to_unit(imgs.pil_to_tensor(pil))


class FireRedStitchPictures:
    DESCRIPTION = (
        "Up to ten pictures for one edit: more than three are cropped (optional masks) and stitched onto three canvases "
        "as FireRed's agent does (the base picture keeps a canvas of its own), and 'Picture N' in the instruction is "
        "rewritten to the canvases. Connect image1-image3 and prompt to FireRed Edit Encode."
    )
    CATEGORY = CATEGORY
    FUNCTION = "stitch"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("image1", "image2", "image3", "prompt", "preview")
    OUTPUT_TOOLTIPS = (
        "Canvas 1 (with a base picture: the base picture alone).",
        "Canvas 2 (None when there is only one picture).",
        "Canvas 3 (None with fewer than three pictures).",
        "The instruction with its picture references rewritten to the canvases.",
        "The canvases side by side, to check the stitching.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        pics = {
            f"images_{i}": ("IMAGE", {"tooltip": f"More pictures (socket {i}): one, a batch or a list, read after those before."})
            for i in range(2, EXTRA + 2)
        }
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The first pictures: one, a batch or a list (of any sizes). At most 10 in all."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": _PROMPT_TIP}),
                "base_picture": ("INT", {"default": 1, "min": 0, "max": layout.MAX_INPUT_PICTURES,
                                         "tooltip": "The picture that keeps a canvas of its own, placed first (the scene being edited). 0 = none."}),
                "ref_size": ("INT", {"default": 1024, "min": 256, "max": 2048, "step": 32,
                                     "tooltip": "Canvases hold at most ref_size x ref_size pixels: set it to FireRed Edit Encode's ref_size."}),
                "margin": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01,
                                     "tooltip": "Context kept around a mask's region, as a fraction of its width and height."}),
            },
            "optional": {
                **pics,
                "masks": ("MASK", {"tooltip": _MASK_TIP}),
                "grounding": ("FIRERED_TEXT_ENCODER", {"tooltip": _GROUND_TIP}),
            },
        }

    def stitch(self, images, prompt, base_picture, ref_size, margin, masks=None, grounding=None, **more):
        groups = [images] + [more.get(f"images_{i}") for i in range(2, EXTRA + 2)]
        pics = _pictures(groups)
        if not pics:
            raise ValueError("FireRed Stitch Pictures: no pictures connected")
        size, base, text = int(_first(ref_size, 1024)), int(_first(base_picture, 1)), _first(prompt, "")
        layout.check_count(len(pics))
        crop_masks = _masks(masks)
        boxes = None
        te = _first(grounding)
        if te is not None and len(pics) > layout.MAX_CANVASES:
            # ask the model only for pictures without a mask of their own, never for the base picture
            masked = [m is not None and bool((m >= 0.5).any()) for m in (crop_masks or [])]
            skip = [i + 1 == base or (i < len(masked) and masked[i]) for i in range(len(pics))]
            with host.on_device(te):
                found = ground.ground_boxes(pics, text, te.model, te.processor, skip=skip, source=te.source)
            boxes = [b if not (i < len(masked) and masked[i]) else None for i, b in enumerate(found)]
            crop_masks = [m if i < len(masked) and masked[i] else None for i, m in enumerate(crop_masks or [])] or None
        st = stitch.stitch(pics, text, boxes=boxes, masks=crop_masks, base=base, canvas_area=size * size,
                           margin=float(_first(margin, 0.1)))
        canvases = [_unit(p) for p in st.pictures] + [None] * (3 - len(st.pictures))
        return (*canvases, st.prompt, _unit(stitch.preview(st.pictures)))


class FireRedCropToMask:
    DESCRIPTION = "Crops a picture to its mask's region (plus a margin), e.g. before FireRed Stitch Pictures."
    CATEGORY = CATEGORY
    FUNCTION = "crop"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The cropped picture (the whole picture when the mask is empty).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The picture (one)."}),
                "mask": ("MASK", {"tooltip": "Its mask (LoadImage's mask editor): the region to keep. Empty = keep everything."}),
                "margin": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01,
                                     "tooltip": "Context kept around the region, as a fraction of its width and height."}),
            }
        }

    def crop(self, image, mask, margin=0.1):
        if image.dim() == 4 and image.shape[0] != 1:
            raise ValueError(f"FireRed Crop To Mask: expected one picture, got a batch of {image.shape[0]}")
        h, w = image.shape[-3], image.shape[-2]
        box = stitch.box_from_mask(mask, (w, h), margin=margin, name="FireRed Crop To Mask: mask")
        if box is None:
            return (image,)
        x0, y0, x1, y1 = box
        return (image[..., y0:y1, x0:x1, :].clone(),)


NODE_CLASS_MAPPINGS = {
    "FireRedStitchPictures": FireRedStitchPictures,
    "FireRedCropToMask": FireRedCropToMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FireRedStitchPictures": "FireRed Stitch Pictures (up to 10)",
    "FireRedCropToMask": "FireRed Crop To Mask",
}
