"""Instruction conditioning: the Edit-Plus chat template and the frozen Qwen2.5-VL encoder.

The instruction is read together with the input pictures:

``<|im_start|>system\\n{EDIT_SYSTEM}<|im_end|>\\n<|im_start|>user\\n``
``Picture 1: <|vision_start|><|image_pad|><|vision_end|>...{instruction}<|im_end|>\\n<|im_start|>assistant\\n``

and the last hidden layer of Qwen2.5-VL (3584-d for the 7B model) is the conditioning, with the
first 64 tokens (the system block and ``<|im_start|>user\\n``) dropped. Without pictures the
Qwen-Image text-to-image template is used instead (34 tokens dropped). The negative prompt goes
through the same template with the same pictures, so true CFG contrasts the text only.
"""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from .modules import module_device

log = logging.getLogger(__name__)

EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate."
)
T2I_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:"
)
PICTURE_BLOCK = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class PromptTemplate:
    """A chat template with one ``{}`` slot for the user turn, how many leading tokens to drop, and
    how many encoder states at most are kept after them (the rest of a very long instruction is cut,
    with one warning)."""

    text: str
    drop_tokens: int
    max_tokens: int

    def format(self, user: str) -> str:
        return self.text.format(user)


def _chat(system: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"


# The limits are the reference pipelines': QwenImagePipeline cuts the states at its
# max_sequence_length (512 by default); QwenImageEditPlusPipeline does not cut (a longer sequence
# then fails in the MM-DiT's RoPE, whose text positions end at 4096) and accepts no
# max_sequence_length above 1024, its tokenizer_max_length, so 1024 is the edit's limit.
EDIT_TEMPLATE = PromptTemplate(_chat(EDIT_SYSTEM), 64, 1024)
T2I_TEMPLATE = PromptTemplate(_chat(T2I_SYSTEM), 34, 512)


@dataclass
class TextCond:
    """One encoded prompt.

    embeds: ``[1, L, D]`` last-layer Qwen2.5-VL states after the template prefix (D = 3584 for 7B).
    mask: ``[1, L]`` long, 1 for real tokens; ``None`` when every token is real (the usual case
    for a single prompt).
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    def to(self, device=None, dtype=None) -> "TextCond":
        m = self.mask.to(device) if self.mask is not None else None
        return TextCond(self.embeds.to(device=device, dtype=dtype), m)


def user_turn(instruction: str, n_pictures: int) -> str:
    """The user turn: one ``Picture N:`` vision block per input picture, then the instruction."""
    return "".join(PICTURE_BLOCK.format(i + 1) for i in range(n_pictures)) + instruction


def template_for(n_pictures: int) -> PromptTemplate:
    return EDIT_TEMPLATE if n_pictures > 0 else T2I_TEMPLATE


def check_instruction(prompt: object, name: str = "prompt", *, required: bool = True) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"{name} must be a string, got {type(prompt).__name__}")
    if required and not prompt.strip():
        raise ValueError(f"{name} is empty: write the edit instruction, e.g. 'make the sky pink'")
    return prompt


@dataclass
class VLPixels:
    """One picture already turned into Qwen2.5-VL vision input (bypassing the processor's resize).

    pixel_values: ``[grid_t * grid_h * grid_w, C * temporal_patch * patch * patch]`` float32, the
    flattened patches in the Hugging Face / ComfyUI order; grid_thw: ``[1, 3]`` long ``(t, h, w)``
    in patches. window_order: the picture's tokens reach the language model in the vision tower's
    window-attention order, as ComfyUI's Qwen2.5-VL hands them over (see :func:`window_ordered_tokens`).
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    window_order: bool = False

    @property
    def n_tokens(self) -> int:
        """``<|image_pad|>`` tokens this picture takes (one per 2x2 merged patch)."""
        return int(self.grid_thw.prod()) // 4


#: Qwen2-VL's smart-resize bounds and CLIP normalisation (the real processor's and ComfyUI's defaults)
VL_MIN_PIXELS = 56 * 56
VL_MAX_PIXELS = 28 * 28 * 16384
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _vl_param(processor, name: str, default):
    ip = getattr(processor, "image_processor", None)
    v = getattr(ip, name, None) if ip is not None else None
    return default if v is None else v


def vl_pixels_comfyui(unit: torch.Tensor, processor=None) -> VLPixels:
    """ComfyUI's Qwen2.5-VL preprocessing of one VL-sized picture ``[1, 3, H, W]`` in [0, 1]:
    each side rounded to a multiple of ``patch * merge`` (28), scaled into the processor's
    min / max pixel bounds when outside them, a bilinear resize (``align_corners=False``, no
    antialias), CLIP mean / std, then cut into patches (the picture repeated over the temporal
    patch). Patch sizes, bounds and statistics are read from ``processor.image_processor`` where it
    has them (the real model's: 14, merge 2, temporal 2, 3136..12845056, CLIP)."""
    patch = int(_vl_param(processor, "patch_size", 14))
    merge = int(_vl_param(processor, "merge_size", 2))
    temporal = int(_vl_param(processor, "temporal_patch_size", 2))
    mean = torch.tensor(_vl_param(processor, "image_mean", CLIP_MEAN), dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(_vl_param(processor, "image_std", CLIP_STD), dtype=torch.float32).view(3, 1, 1)
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    lo = int(size.get("shortest_edge") or _vl_param(processor, "min_pixels", VL_MIN_PIXELS))
    hi = int(size.get("longest_edge") or _vl_param(processor, "max_pixels", VL_MAX_PIXELS))
    if unit.dim() != 4 or unit.shape[:2] != (1, 3):
        raise ValueError(f"expected one RGB picture [1, 3, H, W], got {tuple(unit.shape)}")
    h, w = unit.shape[-2:]
    f = patch * merge
    hb, wb = round(h / f) * f, round(w / f) * f
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb, wb = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    x = torch.nn.functional.interpolate(unit.float(), size=(hb, wb), mode="bilinear", align_corners=False)[0]
    x = (x - mean) / std
    gh, gw = hb // patch, wb // patch
    x = x.unsqueeze(0).expand(temporal, -1, -1, -1)  # [T, C, H, W]: one frame repeated
    x = x.reshape(1, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, 3 * temporal * patch * patch)
    return VLPixels(x.contiguous(), torch.tensor([[1, gh, gw]], dtype=torch.long), window_order=True)


def picture_token_types(text_encoder: torch.nn.Module, input_ids: torch.Tensor, image_grid_thw) -> dict:
    """``{"mm_token_type_ids": ...}`` (1 on the picture tokens, 0 elsewhere) for a text encoder whose
    ``forward`` takes it, else ``{}``.

    Qwen2.5-VL places a picture's tokens on a 2-D grid of M-RoPE positions (height, width). From
    transformers 5 the model computes those positions only when it is given ``mm_token_type_ids``
    (the processor returns them, but a caller that passes the usual four inputs -- diffusers'
    Qwen-Image pipelines among them -- does not); without them every token gets a 1-D text
    position, a conditioning the model was not trained on. transformers 4 (FireRed's training and
    inference environment, 4.57.1) found the picture tokens from ``input_ids`` itself, and so does
    ComfyUI's own Qwen2.5-VL. Passing the types here gives the 2-D positions on either version."""
    if image_grid_thw is None or "mm_token_type_ids" not in inspect.signature(text_encoder.forward).parameters:
        return {}
    image_id = getattr(text_encoder.config, "image_token_id", None)
    if image_id is None:
        return {}
    return {"mm_token_type_ids": (input_ids == image_id).to(torch.int32)}


def window_token_order(grid_thw: torch.Tensor, *, merge: int = 2, window: int = 112, patch: int = 14) -> torch.Tensor:
    """The merged picture tokens (raster order, picture after picture) in Qwen2.5-VL's
    window-attention order: windows of ``window / patch / merge`` tokens a side (4 for the real
    model), row after row of windows, each window's tokens row by row; edge windows are cut short."""
    side = window // patch // merge
    order, offset = [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).view(t, gh, gw) + offset
        for frame in index:
            for y in range(0, gh, side):
                for x in range(0, gw, side):
                    order.append(frame[y : y + side, x : x + side].reshape(-1))
        offset += t * gh * gw
    return torch.cat(order)


@contextmanager
def window_ordered_tokens(text_encoder: torch.nn.Module):
    """Inside this context the vision tower hands its merged picture tokens to the language model
    in its window-attention order, as ComfyUI's Qwen2.5-VL does (``comfy/text_encoders/qwen_vl.py``
    ``Qwen2VLVisionTransformer.forward`` returns the merger's output without undoing the window
    permutation; checked in ComfyUI 0.3.64), instead of back in raster order as the reference model
    (Hugging Face ``Qwen2_5_VisionTransformerPretrainedModel``) does. The tokens' M-RoPE positions stay
    the raster ones in both. A picture smaller than one window (4 x 4 merged tokens, 112 pixels) is
    the same either way."""
    visual = getattr(getattr(text_encoder, "model", None), "visual", None) or getattr(text_encoder, "visual", None)
    if visual is None or not hasattr(visual, "window_size"):
        raise ValueError("ref_mode 'comfyui' needs a Qwen2.5-VL vision tower with windowed attention")

    def reorder(module, args, kwargs, output):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        order = window_token_order(grid, merge=module.spatial_merge_size, window=module.window_size,
                                   patch=module.patch_size)
        output.pooler_output = output.pooler_output[order.to(output.pooler_output.device)]
        return output

    handle = visual.register_forward_hook(reorder, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def encode_prompt(
    text_encoder: torch.nn.Module,
    processor,
    prompt: str,
    vl_pictures: Sequence[Image.Image] | Sequence[VLPixels] = (),
    *,
    template: PromptTemplate | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TextCond:
    """Encode one prompt with its (already VL-sized) pictures into a :class:`TextCond`.

    ``vl_pictures`` are the pictures resized to the encoder's area (:func:`images.plan_sizes`);
    the processor still applies Qwen2-VL's own 28-pixel smart-resize and normalisation. Or they are
    :class:`VLPixels` already prepared (:func:`vl_pixels_comfyui`): the processor then only
    tokenizes, with each ``<|image_pad|>`` repeated once per merged patch as the processor would.
    """
    template = template or template_for(len(vl_pictures))
    device = device or module_device(text_encoder)
    text = template.format(user_turn(prompt, len(vl_pictures)))
    if vl_pictures and all(isinstance(p, VLPixels) for p in vl_pictures):
        parts = text.split("<|image_pad|>")
        text = parts[0] + "".join("<|image_pad|>" * p.n_tokens + rest for p, rest in zip(vl_pictures, parts[1:]))
        tokenizer = getattr(processor, "tokenizer", processor)
        inputs = dict(tokenizer(text=[text], padding=True, return_tensors="pt"))
        inputs["pixel_values"] = torch.cat([p.pixel_values for p in vl_pictures])
        inputs["image_grid_thw"] = torch.cat([p.grid_thw for p in vl_pictures])
        inputs = {k: v.to(device) for k, v in inputs.items()}
    else:
        inputs = processor(
            text=[text], images=list(vl_pictures) or None, padding=True, return_tensors="pt"
        ).to(device)
    windowed = any(getattr(p, "window_order", False) for p in vl_pictures)
    with window_ordered_tokens(text_encoder) if windowed else nullcontext():
        out = text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            output_hidden_states=True,
            **picture_token_types(text_encoder, inputs["input_ids"], inputs.get("image_grid_thw")),
        )
    hidden = out.hidden_states[-1]
    keep = inputs["attention_mask"][0].bool()
    states = hidden[0][keep][template.drop_tokens :]
    if states.shape[0] == 0:
        raise ValueError(
            f"the prompt template has only {int(keep.sum())} tokens, not more than the {template.drop_tokens} "
            "it drops: the tokenizer does not match this model"
        )
    if states.shape[0] > template.max_tokens:
        log.warning("FireRed: the instruction is too long: %d encoder tokens, only the first %d are used "
                    "(the reference pipeline's limit); the end of the instruction is ignored",
                    states.shape[0], template.max_tokens)
        states = states[: template.max_tokens]
    return TextCond(states.unsqueeze(0).to(dtype=dtype or hidden.dtype))
