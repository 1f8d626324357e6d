"""The MM-DiT's architecture read from its weights: ``QwenImageTransformer2DModel`` arguments
from key shapes (:func:`config_from_shapes`), shared by the safetensors and the GGUF loader, and
the Qwen-Image-Edit-2511 marker that turns on ``zero_cond_t``."""

from __future__ import annotations

import re
from typing import Any

from ._common import CheckpointFormatError

#: ComfyUI's Qwen-Image-Edit-2511 marker (see the module docstring)
INDEX_TIMESTEP_ZERO = "__index_timestep_zero__"
ZERO_COND_T_NOTE = (
    "__index_timestep_zero__ marker: a Qwen-Image-Edit-2511 file, whose reference pictures are conditioned at "
    "timestep 0 (ComfyUI's index_timestep_zero); built with zero_cond_t=True, which the pack supports"
)


def config_from_shapes(
    shapes: dict[str, tuple[int, ...]],
    base: dict[str, Any] | None = None,
    *,
    where: str = "",
    error: type[CheckpointFormatError] = CheckpointFormatError,
) -> dict[str, Any]:
    """``QwenImageTransformer2DModel`` arguments from the shapes of its (prefix-free) keys; shared by
    the safetensors and the GGUF loader.

    Read: ``in_channels`` and the width from ``img_in``, ``joint_attention_dim`` from ``txt_in``,
    the head size from ``attn.norm_q`` (so ``num_attention_heads = width / head size``),
    ``num_layers`` by counting ``transformer_blocks.N`` (which must be numbered 0..N-1),
    ``out_channels`` from ``proj_out``, ``use_additional_t_cond`` from its embedding.
    Not in the keys (parameter-free): ``patch_size`` (2), ``axes_dims_rope`` ((16, 56, 56) for
    128-wide heads, :func:`firered_core.model.architecture.default_axes_dims_rope` otherwise), ``zero_cond_t``,
    ``use_layer3d_rope`` and ``guidance_embeds`` (False), taken from ``base`` (a config.json) when
    given. Raises ``error`` naming ``where`` when a key it needs is missing or the shapes disagree.
    """
    from ..model.architecture import default_axes_dims_rope

    need = ("img_in.weight", "txt_in.weight", "proj_out.weight", "transformer_blocks.0.attn.norm_q.weight")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise error(
            f"{where}: a Qwen-Image MM-DiT but the keys {missing} are missing; expected the complete key set "
            "(the file is incomplete)"
        )
    cfg: dict[str, Any] = {"guidance_embeds": False}
    for k in ("patch_size", "axes_dims_rope", "zero_cond_t", "use_layer3d_rope", "guidance_embeds"):
        if base and k in base:
            cfg[k] = tuple(base[k]) if k == "axes_dims_rope" else base[k]
    patch = int(cfg.get("patch_size", 2))
    try:
        width, in_channels = shapes["img_in.weight"]
        (head_dim,) = shapes["transformer_blocks.0.attn.norm_q.weight"]
        text_dim = shapes["txt_in.weight"][1]
    except (ValueError, IndexError):
        found = {k: shapes[k] for k in need}
        raise error(
            f"{where}: unexpected shapes {found}; expected 2-D img_in / txt_in and 1-D norm_q weights"
        ) from None
    if width % head_dim:
        raise error(f"{where}: width {width} is not a multiple of the head size {head_dim}; expected whole heads")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    if blocks != set(range(len(blocks))):
        gaps = sorted(set(range(max(blocks) + 1)) - blocks)
        raise error(f"{where}: transformer blocks {gaps} are missing; expected blocks numbered 0..{max(blocks)}")
    cfg.update(
        patch_size=patch,
        in_channels=in_channels,
        out_channels=shapes["proj_out.weight"][0] // (patch * patch),
        num_layers=len(blocks),
        attention_head_dim=head_dim,
        num_attention_heads=width // head_dim,
        joint_attention_dim=text_dim,
        use_additional_t_cond="time_text_embed.addition_t_embedding.weight" in shapes,
    )
    if "axes_dims_rope" not in cfg or sum(cfg["axes_dims_rope"]) != head_dim:
        cfg["axes_dims_rope"] = tuple(default_axes_dims_rope(head_dim))
    return cfg
