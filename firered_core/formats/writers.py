"""Writers of the files users hold, from diffusers-named state dicts.

Used by ``make-tiny --layout comfyui`` (a tiny model as a ComfyUI ``models/`` folder, so every
workflow can be tried without downloads), by the tests of the loaders, and by the benchmarks.
Each writer produces the layout its loader in this package reads:

* :func:`transformer_to_comfyui` -- the MM-DiT under ComfyUI's ``model.diffusion_model.`` prefix
  (ComfyUI's Qwen-Image uses the diffusers module names);
* :func:`to_scaled_fp8` -- ComfyUI's "scaled fp8": every 2-D linear weight stored as
  ``float8_e4m3fn`` with a per-tensor float32 ``scale_weight`` and the ``scaled_fp8`` marker;
* :func:`vae_to_comfyui` -- the Qwen-Image VAE in ComfyUI's Wan-2.1 layout (``comfy/ldm/wan/vae.py``:
  ``conv1`` / ``conv2`` quant convs, flat ``downsamples`` / ``upsamples`` lists, ``middle`` =
  [residual, attention, residual], ``head`` = [norm, SiLU, conv]);
* :func:`to_comfy_quant` -- ComfyUI's block-quantized mixed-precision layers (``int8_tensorwise``,
  ``mxfp8``, ``nvfp4``: per-layer ``comfy_quant`` JSON and scales, padded and swizzled as ComfyUI
  stores them; layouts in :mod:`.comfy_quant`);
* :func:`write_gguf` -- a city96 ComfyUI-GGUF style file (2-D weights quantized, the rest F16/F32);
* :func:`write_gguf_text_encoder` -- a Qwen2.5-VL text encoder as llama.cpp writes it: the language
  model (``qwen2vl``) in one GGUF and, with ``mmproj``, the vision tower (``clip``) in another.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

COMFY_PREFIX = "model.diffusion_model."
_RES_LEAF = (
    ("norm1.gamma", "residual.0.gamma"),
    ("conv1.", "residual.2."),
    ("norm2.gamma", "residual.3.gamma"),
    ("conv2.", "residual.6."),
    ("conv_shortcut.", "shortcut."),
)


def transformer_to_comfyui(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {COMFY_PREFIX + k: v for k, v in state.items()}


def to_scaled_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store every 2-D linear weight (not norms / embeddings of other shapes) as scaled fp8."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in state.items():
        if k.endswith(".weight") and v.dim() == 2 and "norm" not in k:
            scale = (v.float().abs().max() / 448.0).clamp_min(1e-12)
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            out[k] = v
    return out


def vae_to_comfyui(state: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKLQwenImage`` state dict in ComfyUI's ``qwen_image_vae`` names."""

    def res(rest: str) -> str:
        for a, b in _RES_LEAF:
            if rest.startswith(a):
                return b + rest[len(a) :]
        return rest

    out = {}
    for k, v in state.items():
        if k.startswith("quant_conv."):
            c = "conv1." + k[len("quant_conv.") :]
        elif k.startswith("post_quant_conv."):
            c = "conv2." + k[len("post_quant_conv.") :]
        elif m := re.match(r"(encoder|decoder)\.conv_in\.(.+)", k):
            c = f"{m[1]}.conv1.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.norm_out\.(.+)", k):
            c = f"{m[1]}.head.0.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.conv_out\.(.+)", k):
            c = f"{m[1]}.head.2.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", k):
            c = f"{m[1]}.middle.{2 * int(m[2])}.{res(m[3])}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", k):
            c = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)", k):
            c = f"encoder.downsamples.{m[1]}.{res(m[2])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            c = f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + int(m[2])}.{res(m[3])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k):
            c = f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + num_res_blocks + 1}.{m[2]}"
        else:
            raise ValueError(f"VAE tensor {k!r} has no ComfyUI name: not a Qwen-Image VAE state dict?")
        out[c] = v.contiguous()
    return out


def write_gguf(state: dict[str, torch.Tensor], path, quant: str = "Q8_0", *, arch: str = "qwen_image") -> Path:
    """Write ``state`` as a GGUF file: 2-D weights whose rows fit the block size in ``quant``
    (``Q8_0``, ``Q4_0``, ``Q5_0``, ...; what gguf-py can quantize), the rest in F16 (F32 for 1-D)."""
    import gguf
    import numpy as np

    q = getattr(gguf.GGMLQuantizationType, quant)
    block = gguf.GGML_QUANT_SIZES[q][0]
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for k, v in state.items():
        a = v.float().numpy()
        if a.ndim == 2 and a.shape[1] % block == 0:
            w.add_tensor(k, gguf.quants.quantize(a, q), raw_dtype=q)
        elif a.ndim == 1:
            w.add_tensor(k, a.astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
        else:
            w.add_tensor(k, a.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
    _write_out(w)
    return Path(path)


E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _pad2(w: torch.Tensor, multiple: int) -> torch.Tensor:
    rows, cols = w.shape
    out = w.new_zeros(-(-rows // multiple) * multiple, -(-cols // multiple) * multiple)
    out[:rows, :cols] = w
    return out


def quantize_comfy(w: torch.Tensor, fmt: str, *, per_row: bool = False) -> dict[str, torch.Tensor]:
    """One ``[out, in]`` weight in a ComfyUI comfy_quant format: ``{"weight", "weight_scale"[,
    "weight_scale_2"]}`` as the file stores them (round to nearest; block scales from each block's
    absolute maximum, as comfy-kitchen's eager quantizers choose them). ``per_row``: one int8 scale
    per output row instead of one per tensor."""
    from .comfy_quant import swizzle

    w = w.detach().float()
    if fmt == "int8_tensorwise":
        amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
        scale = (amax / 127.0).clamp_min(1e-12)
        q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
        return {"weight": q, "weight_scale": scale.reshape(-1) if per_row else scale.reshape(())}
    if fmt == "mxfp8":
        w = _pad2(w, 32)
        rows, cols = w.shape
        blocks = w.reshape(rows, cols // 32, 32)
        amax = blocks.abs().amax(dim=-1)
        exp = torch.ceil(torch.log2((amax / 448.0).clamp_min(2.0**-127))).to(torch.int32) + 127
        exp = torch.where(amax == 0, torch.zeros_like(exp), exp.clamp(0, 254))
        step = torch.pow(2.0, (exp - 127).float())
        q = (blocks / step.unsqueeze(-1)).clamp_(-448, 448).reshape(rows, cols).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale": swizzle(exp.to(torch.uint8))}
    if fmt == "nvfp4":
        w = _pad2(w, 16)
        rows, cols = w.shape
        s2 = (w.abs().amax() / (448.0 * 6.0)).clamp_min(1e-12)
        blocks = w.reshape(rows, cols // 16, 16)
        bs = (blocks.abs().amax(dim=-1) / 6.0 / s2).clamp_(max=448.0).to(torch.float8_e4m3fn)
        step = (bs.float() * s2).unsqueeze(-1)
        x = torch.where(step > 0, blocks / torch.where(step > 0, step, torch.ones_like(step)), torch.zeros_like(blocks))
        mags = torch.tensor(E2M1_MAGNITUDES)
        codes = (x.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1).to(torch.uint8)
        codes = torch.where(x < 0, codes | 8, codes).reshape(rows, cols)
        packed = (codes[:, 0::2] << 4) | codes[:, 1::2]  # high nibble first
        return {"weight": packed, "weight_scale": swizzle(bs.view(torch.uint8)).view(torch.float8_e4m3fn),
                "weight_scale_2": s2.reshape(())}  # fmt: skip
    raise ValueError(f"unknown comfy_quant format {fmt!r}")


def to_comfy_quant(state: dict[str, torch.Tensor], layers: dict[str, str], **kw) -> dict[str, torch.Tensor]:
    """``state`` with each layer in ``layers`` (name -> format) stored as ComfyUI stores it: the
    tensors of :func:`quantize_comfy` and a ``<layer>.comfy_quant`` JSON tensor; the rest unchanged."""
    out = dict(state)
    for layer, fmt in layers.items():
        out.update({f"{layer}.{k}": v for k, v in quantize_comfy(state[layer + ".weight"], fmt, **kw).items()})
        out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    return out


def _write_out(writer) -> None:
    """Write a filled ``GGUFWriter``'s header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_add(w, name: str, t: torch.Tensor, quant: str) -> None:
    """One tensor the way llama.cpp's converter stores it: 1-D in F32, 2-D weights whose rows fit the
    block in ``quant``, everything else in F16."""
    import gguf
    import numpy as np

    q = getattr(gguf.GGMLQuantizationType, quant)
    a = t.detach().float().numpy()
    if a.ndim == 1:
        w.add_tensor(name, a.astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
    elif a.ndim == 2 and quant not in ("F16", "F32") and a.shape[1] % gguf.GGML_QUANT_SIZES[q][0] == 0:
        w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
    elif quant == "F32":
        w.add_tensor(name, a.astype(np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
    else:
        w.add_tensor(name, a.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)


def write_gguf_text_encoder(state: dict[str, torch.Tensor], config, path, quant: str = "Q8_0", *,
                            mmproj=None, mmproj_quant: str = "F16") -> tuple[Path, Path | None]:  # fmt: skip
    """Write a Qwen2.5-VL text encoder as llama.cpp's ``convert_hf_to_gguf.py`` does: the language model
    as a ``qwen2vl`` GGUF at ``path`` (names from gguf-py's own tensor map: ``token_embd``,
    ``blk.N.attn_q`` ...) and, when ``mmproj`` is a path, the vision tower as a ``clip`` GGUF there
    (``v.patch_embd.weight`` / ``.weight.1`` = the two temporal slices of the Conv3d, ``attn.qkv``
    split into ``attn_q`` / ``attn_k`` / ``attn_v``, ``mm.0`` / ``mm.2`` the merger). ``state`` has the
    classic names (``model.layers.N...``, ``visual.*``) or transformers 5's; ``config`` is the
    model's ``Qwen2_5_VLConfig``."""
    import gguf

    classic = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model.") :]
        elif k.startswith("model.visual."):
            k = k[len("model.") :]
        classic[k] = v
    tc, vc = config.text_config, config.vision_config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2VL, tc.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch="qwen2vl")
    w.add_block_count(tc.num_hidden_layers)
    w.add_context_length(tc.max_position_embeddings)
    w.add_embedding_length(tc.hidden_size)
    w.add_feed_forward_length(tc.intermediate_size)
    w.add_head_count(tc.num_attention_heads)
    w.add_head_count_kv(tc.num_key_value_heads)
    w.add_layer_norm_rms_eps(tc.rms_norm_eps)
    rope = tc.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_dimension_sections([*rope["mrope_section"], 0])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for k, v in classic.items():
        if k.startswith("visual."):
            continue
        new = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"no llama.cpp name for {k!r}")
        _gguf_add(w, new, v, quant)
    _write_out(w)
    if mmproj is None:
        return Path(path), None
    vnames = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(vc.depth, 3))  # mm.{2} is numbered as a block
    m = gguf.GGUFWriter(str(mmproj), arch="clip")
    m.add_string("general.type", "mmproj")
    m.add_bool("clip.has_vision_encoder", True)
    m.add_string("clip.projector_type", gguf.VisionProjectorType.QWEN25VL)
    m.add_uint32("clip.vision.block_count", vc.depth)
    m.add_uint32("clip.vision.embedding_length", vc.hidden_size)
    m.add_uint32("clip.vision.feed_forward_length", vc.intermediate_size)
    m.add_uint32("clip.vision.attention.head_count", vc.num_heads)
    m.add_uint32("clip.vision.patch_size", vc.patch_size)
    m.add_uint32("clip.vision.projection_dim", vc.out_hidden_size)
    m.add_uint32("clip.vision.n_wa_pattern", vc.fullatt_block_indexes[0] + 1)
    m.add_uint32("clip.vision.window_size", vc.window_size)
    m.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    for k, v in classic.items():
        if not k.startswith("visual."):
            continue
        if k == "visual.patch_embed.proj.weight":  # Conv3d [out, in, t=2, h, w] -> two Conv2d kernels
            _gguf_add(m, "v.patch_embd.weight", v[:, :, 0].contiguous(), mmproj_quant)
            _gguf_add(m, "v.patch_embd.weight.1", v[:, :, 1].contiguous(), mmproj_quant)
            continue
        if ".attn.qkv." in k:
            for part, chunk in zip("qkv", v.chunk(3, dim=0)):
                new = vnames.get_name(k.replace(".qkv.", f".{part}."), try_suffixes=(".weight", ".bias"))
                _gguf_add(m, new, chunk.contiguous(), mmproj_quant)
            continue
        new = vnames.get_name(k, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"no llama.cpp name for {k!r}")
        _gguf_add(m, new, v, mmproj_quant)
    _write_out(m)
    return Path(path), Path(mmproj)
