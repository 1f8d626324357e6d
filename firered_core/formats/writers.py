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
* :func:`write_gguf` -- a city96 ComfyUI-GGUF style file (2-D weights quantized, the rest F16/F32).
"""

from __future__ import annotations

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
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
