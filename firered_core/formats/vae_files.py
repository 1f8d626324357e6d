"""The Qwen-Image VAE from the files users hold.

Formats (detected from the keys, never the file name):

- ComfyUI's ``qwen_image_vae.safetensors`` -- the original Wan-2.1 VAE layout that ComfyUI's
  ``comfy/ldm/wan/vae.py`` uses: ``encoder.conv1``, ``encoder.downsamples.N.residual.{0,2,3,6}``,
  ``encoder.middle.{0,1,2}``, ``encoder.head.{0,2}``, ``conv1`` / ``conv2`` (the quant convs) and a
  flat ``decoder.upsamples.N`` list. Recognised by ``decoder.middle.0.residual.0.gamma``; a
  ``vae.`` / ``first_stage_model.`` prefix (checkpoint merges) is stripped.
- the same weights in diffusers' names (a lone ``vae/diffusion_pytorch_model.safetensors``),
  recognised by ``decoder.mid_block.resnets.0.norm1.gamma``;
- the diffusers ``vae/`` folder (or a release folder holding one).

The architecture (base width, latent channels, stage widths, residual blocks per stage, which
stages also downsample time) is read from the tensor shapes; the latent statistics are
Qwen-Image's (:data:`firered_core.model.architecture.LATENTS_MEAN` / ``LATENTS_STD``), which need 16 latent
channels. The model is built on the meta device and the file's tensors are assigned to it, so
only one copy of the weights is ever in memory.

diffusers has a converter for this layout (``single_file_utils.convert_wan_vae_to_diffusers``), but
it hard-codes the decoder's flat indices for two residual blocks per stage (the real model), so it
cannot load other sizes (e.g. the tests' tiny VAE). :func:`comfy_to_diffusers_keys` maps any size;
a test checks that it agrees with diffusers' converter on the real layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ._common import (
    FORMAT_WORDS,
    VAEFileError,
    common_prefix,
    describe_keys,
    load_model_folder,
    read_safetensors_header,
    sniff,
)

__all__ = ["VAEFileError", "VAELayout", "comfy_to_diffusers_keys", "inspect_vae", "load_vae"]

EXPECTED = (
    "the Qwen-Image VAE: ComfyUI's qwen_image_vae.safetensors (Wan-2.1 layout), the same weights in "
    "diffusers names, or a diffusers vae/ folder"
)
PREFIXES = ("vae.", "first_stage_model.", "model.vae.")


@dataclass(frozen=True)
class VAELayout:
    """What :func:`inspect_vae` found: the key layout and the ``AutoencoderKLQwenImage`` config."""

    layout: str  # "comfyui" or "diffusers"
    prefix: str
    config: dict


_RES = {"residual.0.gamma": "norm1.gamma", "residual.2.": "conv1.", "residual.3.gamma": "norm2.gamma",
        "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}  # fmt: skip


def _res(rest: str) -> str:
    for a, b in _RES.items():
        if rest.startswith(a):
            return b + rest[len(a) :]
    return rest


def _stage_plan(kinds: dict[int, str]) -> tuple[int, list[list[int]], list[int]]:
    """From ``{flat index: 'res'|'down'|'attn'}`` of the encoder: residual blocks per stage, the
    flat indices of each stage's residual blocks, and the flat index of each downsample."""
    stages: list[list[int]] = [[]]
    downs: list[int] = []
    for i in sorted(kinds):
        if kinds[i] == "res":
            stages[-1].append(i)
        elif kinds[i] == "down":
            downs.append(i)
            stages.append([])
        else:
            raise VAEFileError(
                "attention blocks inside the encoder stages (attn_scales) are not part of the Qwen-Image VAE"
            )
    counts = {len(s) for s in stages}
    if len(counts) != 1 or 0 in counts:
        raise VAEFileError(f"uneven encoder stages ({[len(s) for s in stages]} residual blocks)")
    return counts.pop(), stages, downs


def _infer_config(shapes: dict[str, tuple[int, ...]], layout: str) -> dict:
    if layout == "comfyui":
        conv_in, post_quant, enc = "encoder.conv1.weight", "conv2.weight", "encoder.downsamples."
        res_key, res_conv2 = "residual.0.gamma", "residual.6.weight"
    else:
        conv_in, post_quant, enc = "encoder.conv_in.weight", "post_quant_conv.weight", "encoder.down_blocks."
        res_key, res_conv2 = "norm1.gamma", "conv2.weight"
    for k in (conv_in, post_quant):
        if k not in shapes:
            raise VAEFileError(f"missing {k}")
    kinds: dict[int, str] = {}
    pat = re.compile(re.escape(enc) + r"(\d+)\.(.+)$")
    for k in shapes:
        m = pat.match(k)
        if not m:
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest == res_key:
            kinds[i] = "res"
        elif rest == "resample.1.weight":
            kinds[i] = "down"
        elif rest.startswith(("to_qkv.", "norm.gamma", "proj.")):
            kinds[i] = "attn"
    nrb, stages, downs = _stage_plan(kinds)
    base = shapes[conv_in][0]
    dim_mult = []
    for s in stages:
        out = shapes[f"{enc}{s[-1]}.{res_conv2}"][0]
        if out % base:
            raise VAEFileError(f"stage width {out} is not a multiple of the base width {base}")
        dim_mult.append(out // base)
    temporal = [f"{enc}{d}.time_conv.weight" in shapes for d in downs]
    return {
        "base_dim": base,
        "z_dim": shapes[post_quant][0],
        "dim_mult": dim_mult,
        "num_res_blocks": nrb,
        "attn_scales": [],
        "temperal_downsample": temporal,
        "dropout": 0.0,
        "input_channels": shapes[conv_in][1],
    }


def comfy_to_diffusers_keys(keys, num_res_blocks: int, num_stages: int) -> dict[str, str]:
    """``{ComfyUI (Wan-2.1) name: diffusers AutoencoderKLQwenImage name}`` for the given keys.

    ``num_res_blocks`` / ``num_stages`` place the decoder's flat ``upsamples.N`` list: each stage has
    ``num_res_blocks + 1`` residual blocks followed by one upsampler (none after the last stage).
    Raises :class:`VAEFileError` for a key that has no place in the diffusers model.
    """
    per_stage = num_res_blocks + 2
    out: dict[str, str] = {}
    fixed = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv.", "encoder.conv1.": "encoder.conv_in.",
             "decoder.conv1.": "decoder.conv_in.", "encoder.head.0.": "encoder.norm_out.",
             "encoder.head.2.": "encoder.conv_out.", "decoder.head.0.": "decoder.norm_out.",
             "decoder.head.2.": "decoder.conv_out."}  # fmt: skip
    for key in keys:
        new = None
        for a, b in fixed.items():
            if key.startswith(a):
                new = b + key[len(a) :]
                break
        if new is None:
            m = re.match(r"(encoder|decoder)\.middle\.(\d)\.(.+)$", key)
            if m:
                part, i, rest = m.group(1), int(m.group(2)), m.group(3)
                new = (
                    f"{part}.mid_block.attentions.0.{rest}"
                    if i == 1
                    else f"{part}.mid_block.resnets.{i // 2}.{_res(rest)}"
                )
        if new is None:
            m = re.match(r"encoder\.downsamples\.(\d+)\.(.+)$", key)
            if m:
                new = f"encoder.down_blocks.{m.group(1)}.{_res(m.group(2))}"
        if new is None:
            m = re.match(r"decoder\.upsamples\.(\d+)\.(.+)$", key)
            if m:
                i, rest = int(m.group(1)), m.group(2)
                stage, j = divmod(i, per_stage)
                if stage >= num_stages or (stage == num_stages - 1 and j > num_res_blocks):
                    raise VAEFileError(
                        f"decoder block {i} ({key}) does not fit {num_stages} stages of {num_res_blocks} residual blocks"
                    )
                if j <= num_res_blocks:
                    new = f"decoder.up_blocks.{stage}.resnets.{j}.{_res(rest)}"
                else:
                    new = f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
        if new is None:
            raise VAEFileError(f"unexpected key {key!r} for a Wan-2.1 / Qwen-Image VAE")
        out[key] = new
    return out


def inspect_vae(path) -> VAELayout:
    """Detect the layout of a VAE ``.safetensors`` file and read its config from the shapes."""
    p = Path(path)
    header = read_safetensors_header(p, error=VAEFileError, expected=EXPECTED).tensors
    prefix = common_prefix(header, PREFIXES)
    shapes = {k[len(prefix) :]: v[1] for k, v in header.items()}
    if "decoder.middle.0.residual.0.gamma" in shapes and "encoder.conv1.weight" in shapes:
        layout = "comfyui"
    elif "decoder.mid_block.resnets.0.norm1.gamma" in shapes and "encoder.conv_in.weight" in shapes:
        layout = "diffusers"
    else:
        raise VAEFileError(f"{str(p)!r} is {describe_keys(shapes)}, but {EXPECTED} was expected")
    if any(k.startswith("decoder.upsamples.0.upsamples.") for k in shapes):
        raise VAEFileError(f"{str(p)!r} is a Wan-2.2 VAE (48 latent channels), but {EXPECTED} was expected")
    try:
        config = _infer_config(shapes, layout)
    except (VAEFileError, KeyError, IndexError) as e:
        raise VAEFileError(
            f"{str(p)!r} looks like a VAE ({layout} layout) but its shapes do not fit the Qwen-Image VAE: {e}"
        ) from None
    if config["z_dim"] != 16:
        raise VAEFileError(
            f"{str(p)!r} is a VAE with {config['z_dim']} latent channels, but {EXPECTED} (16 latent channels) was expected"
        )
    return VAELayout(layout, prefix, config)


def _load_folder(folder: Path, dtype, device):
    from diffusers import AutoencoderKLQwenImage

    def load(f: Path):
        return AutoencoderKLQwenImage.from_pretrained(f, torch_dtype=dtype, local_files_only=True)

    return load_model_folder(folder, "vae", load, device, error=VAEFileError, expected=EXPECTED, what="VAE")


def load_vae(path, *, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """Load the Qwen-Image VAE from a file or folder as a diffusers ``AutoencoderKLQwenImage``.

    Args:
        path: ``qwen_image_vae.safetensors`` (ComfyUI layout), a VAE safetensors in diffusers
            names, a diffusers ``vae/`` folder, or a release folder that has ``vae/``.
        dtype: Parameter dtype (the file's tensors are cast to it).
        device: Where the model goes.

    Raises:
        VAEFileError: the file is missing, truncated, not a VAE, or a VAE of another model; the
            message names the file, what was found and what was expected.
    """
    from safetensors import safe_open

    from ..model.architecture import LATENTS_MEAN, LATENTS_STD

    p = Path(path)
    kind = sniff(p, error=VAEFileError, expected=EXPECTED)
    if kind == "directory":
        return _load_folder(p, dtype, device)
    if kind != "safetensors":
        raise VAEFileError(f"{str(p)!r} is {FORMAT_WORDS.get(kind, kind)}, but {EXPECTED} was expected")
    info = inspect_vae(p)
    cfg = info.config
    with safe_open(str(p), "pt", device="cpu") as f:
        names = [k for k in f.keys() if k.startswith(info.prefix)]
        local = [k[len(info.prefix) :] for k in names]
        if info.layout == "comfyui":
            rename = comfy_to_diffusers_keys(local, cfg["num_res_blocks"], len(cfg["dim_mult"]))
        else:
            rename = {k: k for k in local}
        vae = _build(cfg, LATENTS_MEAN, LATENTS_STD)
        expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
        found = set(rename.values())
        missing, extra = sorted(set(expected) - found), sorted(found - set(expected))
        if missing or extra:
            raise VAEFileError(
                f"{str(p)!r} is a Qwen-Image VAE ({info.layout} layout) with the wrong tensors: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        state = {}
        for name, key in zip(names, local):
            t = f.get_tensor(name)
            target = rename[key]
            if tuple(t.shape) != expected[target]:
                raise VAEFileError(f"{str(p)!r}: {name} has shape {tuple(t.shape)}, expected {expected[target]}")
            state[target] = t.to(dtype)
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.to(device).eval().requires_grad_(False)


def _build(cfg: dict, mean, std):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage

    with init_empty_weights():
        return AutoencoderKLQwenImage(**cfg, latents_mean=list(mean), latents_std=list(std))
