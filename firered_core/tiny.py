"""Build a tiny, randomly initialised FireRed-Image-Edit model folder for tests.

FireRed-Image-Edit has the architecture of Qwen-Image-Edit-2509 and is run by
diffusers' ``QwenImageEditPlusPipeline``.  :func:`make_tiny` writes a complete
model folder in the Hugging Face release layout::

    model_index.json
    scheduler/scheduler_config.json
    text_encoder/   Qwen2_5_VLForConditionalGeneration (with its vision tower)
    tokenizer/      Qwen2Tokenizer (byte-level BPE trained here, offline)
    processor/      Qwen2VLProcessor (image + video processor, tokenizer, chat template)
    transformer/    QwenImageTransformer2DModel
    vae/            AutoencoderKLQwenImage (real 8x spatial layout and latent statistics)

Everything is built locally: no network access and no downloaded files.  The
output only depends on the arguments, so two calls with the same arguments write
byte-identical weight files.

The heavy libraries (torch, diffusers, transformers, tokenizers) are imported
inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from .model.architecture import LATENTS_MEAN, LATENTS_STD, default_axes_dims_rope
from .tiny_tokenizer import QWEN_SPECIAL_TOKENS, make_tiny_tokenizer, save_processor, save_tokenizer, write_json

__all__ = ["COMFYUI_FILES", "COMFYUI_VAE", "WORKFLOW_FILES", "TinyTextConfig", "make_tiny", "make_tiny_comfyui"]

@dataclasses.dataclass(frozen=True)
class TinyTextConfig:
    """Sizes of the tiny Qwen2.5-VL text encoder (text model and vision tower).

    The defaults are a miniature of Qwen2.5-VL-7B: grouped-query attention (2 heads,
    1 key/value head, head dim 32), M-RoPE with the real section proportions, a
    windowed vision tower whose last block uses full attention, patch 14, spatial
    merge 2 and temporal patch 2.  ``hidden_size`` is also the transformer's
    ``joint_attention_dim``.
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    #: M-RoPE split of head_dim/2 over (time, height, width); default like the real [16, 24, 24].
    mrope_section: tuple[int, int, int] | None = None
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_depth: int = 2
    vision_num_heads: int = 2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        half = self.hidden_size // self.num_attention_heads // 2
        if self.mrope_section is None:
            first = max(1, half // 4)
            rest = half - first
            object.__setattr__(self, "mrope_section", (first + rest % 2, rest // 2, rest // 2))
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != half:
            raise ValueError(f"mrope_section {self.mrope_section} must be 3 numbers summing to head_dim/2 = {half}")
        vision_head_dim, remainder = divmod(self.vision_hidden_size, self.vision_num_heads)
        if remainder or vision_head_dim % 4:
            raise ValueError("vision head dim (vision_hidden_size / vision_num_heads) must be a multiple of 4")


# --------------------------------------------------------------------------- helpers


def _reinit_zero_weights(module: Any, std: float = 0.02) -> None:
    """Give every all-zero weight matrix (e.g. zero-initialised output projections) small random values."""
    import torch

    with torch.no_grad():
        for param in module.parameters():
            if param.ndim >= 2 and not torch.any(param):
                param.normal_(0.0, std)


# --------------------------------------------------------------------------- main entry


def make_tiny(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int | None = None,
    width: int | None = None,
    axes_dims_rope: tuple[int, int, int] | list[int] | None = None,
    vae_base_dim: int = 16,
    vae_num_res_blocks: int = 1,
    text: TinyTextConfig | None = None,
    bpe_vocab_size: int = 1024,
) -> pathlib.Path:
    """Write a complete tiny random FireRed-Image-Edit model folder and return its path.

    The folder has the Hugging Face release layout and loads fully offline with
    ``diffusers.QwenImageEditPlusPipeline.from_pretrained(path)`` (which, with
    transformers 5, needs torchvision for the processor).  All weights are float32
    safetensors; the output is deterministic for given arguments.

    Args:
        path: Folder to write (created if needed; existing files are overwritten).
        seed: Seed of the random weights (``torch.manual_seed(seed + k)`` before model ``k``).
        num_layers: Number of transformer (MMDiT) blocks.
        num_attention_heads: Transformer attention heads.
        attention_head_dim: Transformer head dimension; default ``width // num_attention_heads``
            when ``width`` is given, else 16.
        width: Transformer inner width (``num_attention_heads * attention_head_dim``), an
            alternative to ``attention_head_dim``; e.g. ``width=512, num_attention_heads=4``.
        axes_dims_rope: RoPE split of the head dimension (frame, height, width); must sum to
            ``attention_head_dim``; default :func:`default_axes_dims_rope`.
        vae_base_dim: Base channel count of the VAE (real model: 96).
        vae_num_res_blocks: Residual blocks per VAE stage (real model: 2). ComfyUI's ``VAELoader``
            builds only the real configuration (96, 2), see :func:`make_tiny_comfyui`.
        text: Sizes of the text encoder; default :class:`TinyTextConfig()`.
        bpe_vocab_size: Upper bound of the BPE vocabulary size (training stops earlier once
            every word of the built-in corpus is a single token).

    Returns:
        The model folder as a ``pathlib.Path``.
    """
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from diffusers import __version__ as diffusers_version
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .formats.text_encoder_config import QWEN25_VL_7B, VISION_TOKENS

    text = text or TinyTextConfig()

    if attention_head_dim is None:
        if width is not None:
            if width % num_attention_heads:
                raise ValueError(f"width {width} is not divisible by num_attention_heads {num_attention_heads}")
            attention_head_dim = width // num_attention_heads
        else:
            attention_head_dim = 16
    elif width is not None and width != num_attention_heads * attention_head_dim:
        raise ValueError("width must equal num_attention_heads * attention_head_dim")
    axes = tuple(axes_dims_rope) if axes_dims_rope is not None else default_axes_dims_rope(attention_head_dim)
    if len(axes) != 3 or sum(axes) != attention_head_dim or any(a % 2 for a in axes):
        raise ValueError(f"axes_dims_rope {axes} must be 3 even numbers summing to {attention_head_dim}")

    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)

    # ---- tokenizer (+ processor) ---------------------------------------------------------
    tokenizer, vocab, merges = make_tiny_tokenizer(bpe_vocab_size)
    save_tokenizer(tokenizer, vocab, merges, root / "tokenizer")
    save_processor(tokenizer, vocab, merges, root / "processor")
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok, _ in QWEN_SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # cover all tokens, padded like the real model

    # ---- scheduler -------------------------------------------------------------------------
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        invert_sigmas=False,
        shift_terminal=0.02,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        time_shift_type="exponential",
        stochastic_sampling=False,
    )
    scheduler.save_pretrained(str(root / "scheduler"))

    # ---- text encoder (Qwen2.5-VL with vision tower) ------------------------------------------
    te_config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "max_window_layers": text.num_hidden_layers,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": list(text.mrope_section),
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={  # Qwen2.5-VL's vision tower (patches, merge, window), smaller
            **QWEN25_VL_7B["vision_config"],
            "depth": text.vision_depth,
            "hidden_size": text.vision_hidden_size,
            "intermediate_size": text.vision_intermediate_size,
            "num_heads": text.vision_num_heads,
            "out_hidden_size": text.hidden_size,
            "fullatt_block_indexes": [text.vision_depth - 1],
        },
        **{field: ids[token] for field, token in VISION_TOKENS.items()},
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(te_config).eval()
    text_encoder.save_pretrained(str(root / "text_encoder"))
    del text_encoder

    # ---- transformer (MMDiT) -----------------------------------------------------------------
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text.hidden_size,
        guidance_embeds=False,
        axes_dims_rope=axes,
    )
    _reinit_zero_weights(transformer)
    transformer.save_pretrained(str(root / "transformer"), safe_serialization=True)
    del transformer

    # ---- VAE -------------------------------------------------------------------------------
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=vae_base_dim,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=vae_num_res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        latents_mean=list(LATENTS_MEAN),
        latents_std=list(LATENTS_STD),
    )
    _reinit_zero_weights(vae)
    vae.save_pretrained(str(root / "vae"), safe_serialization=True)
    del vae

    # ---- model_index.json ------------------------------------------------------------------
    write_json(
        root / "model_index.json",
        {
            "_class_name": "QwenImageEditPlusPipeline",
            "_diffusers_version": diffusers_version,
            "processor": ["transformers", "Qwen2VLProcessor"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "QwenImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage"],
        },
    )
    return root


#: file names of :func:`make_tiny_comfyui`, relative to the ``models/`` folder it writes
COMFYUI_FILES = {
    "transformer": "diffusion_models/firered_tiny.safetensors",
    "transformer_fp8": "diffusion_models/firered_tiny_fp8_scaled.safetensors",
    "transformer_gguf": "diffusion_models/firered_tiny-Q8_0.gguf",
    "text_encoder": "text_encoders/qwen_2.5_vl_tiny.safetensors",
    "tokenizer": "text_encoders/qwen_2.5_vl_tiny_tokenizer",
    "vae": "vae/qwen_image_vae_tiny.safetensors",
    "lora": "loras/firered_tiny_lora.safetensors",
}


#: the release folder (diffusers layout, in ``models/diffusers``) the recaption workflow loads -- its
#: local backend needs the text encoder's language head, which ComfyUI's single files lack
WORKFLOW_RELEASE_FOLDER = "diffusers/FireRed-Image-Edit-1.1"
#: the release file names the shipped workflows (``workflows/*.json``) load; :func:`make_tiny_comfyui`
#: links them to the tiny files so every workflow runs unchanged on the tiny model
WORKFLOW_FILES = {
    "transformer": "diffusion_models/FireRed-Image-Edit-1.1-transformer.safetensors",
    "text_encoder": "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "tokenizer": "text_encoders/qwen_2.5_vl_7b_fp8_scaled_tokenizer",
    "vae": "vae/qwen_image_vae.safetensors",
    "lora": "loras/FireRed-Image-Edit-1.0-Lightning-8steps-v1.1.safetensors",
}


def _link(target: pathlib.Path, link: pathlib.Path) -> None:
    """A relative symlink ``link -> target`` (a copy where symlinks are not allowed)."""
    import shutil

    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    try:
        link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=target.is_dir())
    except OSError:
        (shutil.copytree if target.is_dir() else shutil.copyfile)(target, link)


#: the VAE configuration ComfyUI's ``VAELoader`` builds for every Wan-2.1 / Qwen-Image VAE file
#: (``comfy/sd.py``: dim 96, 2 residual blocks per stage, whatever the file holds)
COMFYUI_VAE = {"vae_base_dim": 96, "vae_num_res_blocks": 2}


def make_tiny_comfyui(
    models_dir: str | os.PathLike, *, seed: int = 0, num_layers: int = 2, workflow_names: bool = True
) -> dict[str, pathlib.Path]:
    """Write the tiny model as a ComfyUI ``models/`` folder, in the files users hold.

    ``diffusion_models/``: the MM-DiT as a prefixed single file, as scaled fp8 and as GGUF Q8_0;
    ``text_encoders/``: the Qwen2.5-VL file (ComfyUI's key layout) and, beside it, the tiny
    tokenizer folder it needs (the tiny vocabulary is not Qwen's); ``vae/``: the VAE in ComfyUI's
    layout, in the real configuration (:data:`COMFYUI_VAE`, random weights, about 127 M parameters):
    ComfyUI's own ``VAELoader`` builds only that one, so native ``VAEEncode`` / ``VAEDecode`` load it;
    it equals ``make_tiny(seed=seed, **COMFYUI_VAE)``'s VAE; ``loras/``: a small random LoRA in ComfyUI's ``diffusion_model.`` lora_up / lora_down
    layout. With ``workflow_names``, the release file names the shipped workflows use
    (:data:`WORKFLOW_FILES`) link to the tiny files, and ``diffusers/FireRed-Image-Edit-1.1``
    (:data:`WORKFLOW_RELEASE_FOLDER`) holds the tiny release folder (the same MM-DiT and text encoder,
    a small VAE). Returns the paths by role (:data:`COMFYUI_FILES`).
    """
    import shutil
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    from .formats import writers

    root = pathlib.Path(models_dir)
    paths = {k: root / v for k, v in COMFYUI_FILES.items()}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny(pathlib.Path(tmp) / "tiny", seed=seed, num_layers=num_layers, **COMFYUI_VAE)
        (tr_file,) = (folder / "transformer").glob("*.safetensors")
        tr = load_file(tr_file)
        save_file(writers.transformer_to_comfyui(tr), paths["transformer"])
        save_file(writers.transformer_to_comfyui(writers.to_scaled_fp8(tr)), paths["transformer_fp8"])
        writers.write_gguf(tr, paths["transformer_gguf"], "Q8_0")
        (te_file,) = (folder / "text_encoder").glob("*.safetensors")
        shutil.copyfile(te_file, paths["text_encoder"])
        if paths["tokenizer"].exists():
            shutil.rmtree(paths["tokenizer"])
        shutil.copytree(folder / "tokenizer", paths["tokenizer"])
        (vae_file,) = (folder / "vae").glob("*.safetensors")
        vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
        save_file(writers.vae_to_comfyui(load_file(vae_file), vae_cfg["num_res_blocks"]), paths["vae"])
        g = torch.Generator().manual_seed(seed + 7)
        lora = {}
        for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj"):
            w = tr[f"{name}.weight"]
            lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.5
            lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.5
            lora[f"diffusion_model.{name}.alpha"] = torch.tensor(4.0)
        save_file(lora, paths["lora"])
    if workflow_names:
        for role, name in WORKFLOW_FILES.items():
            _link(paths[role], root / name)
        release = root / WORKFLOW_RELEASE_FOLDER
        if release.exists():
            shutil.rmtree(release)
        make_tiny(release, seed=seed, num_layers=num_layers)  # the same MM-DiT and text encoder; a small VAE
    return paths
