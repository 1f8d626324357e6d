"""One edit through ComfyUI's native nodes and through the pack's nodes, in one ComfyUI process
(``python native_edit_graph.py OUT_DIR`` with ComfyUI's interpreter, ComfyUI's folder as the
working directory, ``$FIRERED_PACK`` the pack's folder): ``OUT_DIR/native.pt`` and ``OUT_DIR/pack.pt`` are the
two decoded ``IMAGE`` tensors, ``OUT_DIR/info.json`` what was run.

Native graph: ``UNETLoader`` -> ``ModelSamplingAuraFlow`` (shift) -> ``KSampler`` (euler, simple,
CFG 1) with ``CLIPLoader`` (type qwen_image) + ``VAELoader`` -> ``TextEncodeQwenImageEditPlus``
(one picture) and ``EmptySD3LatentImage``, then ``VAEDecode``; and at CFG 4 through ``CFGNorm``
(strength 1), as ComfyUI's Qwen-Image-Edit template runs it. Pack graph: FireRed Model / Text
Encoder / VAE Loader -> FireRed Edit Encode (``ref_mode="comfyui"``) -> FireRed Sampler (euler,
``linear_shift`` at the same shift, ``noise_device="comfyui"``, the same LATENT) -> FireRed Decode.

The files: the tiny MM-DiT and VAE, and a tiny Qwen2.5-VL with the real vocabulary (ComfyUI's
CLIPLoader tokenizes with the real Qwen tokenizer, ``comfy/text_encoders/qwen25_tokenizer``, which
the pack uses too for a single file with no tokenizer beside it), in ComfyUI's key layouts.
ComfyUI's constructors write in the release sizes (the MM-DiT's 24 x 128 heads and 3584 text
width, ``Qwen25_7BVLI_Config``, the 1280-wide vision tower with full attention at blocks
7/15/23/31, the VAE's base width 96 with two residual blocks) and CLIPLoader tells the 7B
text encoder by its key/value width;
this process gives them the tiny model's sizes before the loaders run, and nothing else of
ComfyUI is changed: the tokenizer, the Edit-Plus template and its cut, the picture sizing, the
model code, the sampling and the noise are ComfyUI's own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

PROMPT = "make the house blue and add a red door"
SEED, STEPS, SHIFT, CFG = 7, 4, 3.1, 4.0
PICTURE = (160, 160)  # the input picture: ComfyUI's node makes its reference 1024 x 1024
SIZE = (1024, 1024)  # the output as large as the reference (as the native template's VAEEncode latent)
SMALL = (496, 336)  # an output smaller than the reference, with odd token grids (31 x 21): the RoPE details
VOCAB = 152064  # Qwen2.5-VL-7B's embedding rows (ComfyUI's tokenizer ids reach 151664)


def write_files(models: Path) -> dict:
    """The tiny model in ComfyUI's layouts under ``models/``; returns the pack's text config."""
    from safetensors.torch import load_file, save_file

    from firered_core.formats import writers
    from firered_core.formats.text_encoder_keys import classic_name
    from firered_core.tiny import make_tiny

    folder = make_tiny(models / "_tiny", seed=0)
    tr = {}
    for f in sorted((folder / "transformer").glob("*.safetensors")):
        tr.update(load_file(f))
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    save_file(writers.transformer_to_comfyui(tr), models / "diffusion_models" / "tiny_dit.safetensors")
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    (vae_file,) = (folder / "vae").glob("*.safetensors")
    (models / "vae").mkdir(exist_ok=True)
    save_file(writers.vae_to_comfyui(load_file(vae_file), vae_cfg["num_res_blocks"]), models / "vae" / "tiny_vae.safetensors")
    te = {}
    for f in sorted((folder / "text_encoder").glob("*.safetensors")):
        te.update(load_file(f))
    te = {classic_name(k): v for k, v in te.items() if not k.startswith("lm_head.")}  # ComfyUI's files have no head
    emb = te["model.embed_tokens.weight"]
    g = torch.Generator().manual_seed(11)
    te["model.embed_tokens.weight"] = torch.randn(VOCAB, emb.shape[1], generator=g) * float(emb.std())
    (models / "text_encoders").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in te.items()}, models / "text_encoders" / "tiny_qwen25vl.safetensors")
    return {"vae": vae_cfg, "te": json.loads((folder / "text_encoder" / "config.json").read_text()),
            "dit": json.loads((folder / "transformer" / "config.json").read_text())}


def tiny_sizes_for_comfyui(cfg: dict) -> None:
    """Give ComfyUI's Qwen-Image MM-DiT, Qwen2.5-VL and Wan-2.1 VAE constructors the tiny model's sizes."""
    import comfy.ldm.qwen_image.model as qwen_image
    import comfy.ldm.wan.vae as wan_vae
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_vl as qwen_vl

    text = cfg["te"]["text_config"]
    vision = cfg["te"]["vision_config"]
    head = text["hidden_size"] // text["num_attention_heads"]

    @dataclasses.dataclass
    class TinyQwen25(llama.Qwen25_7BVLI_Config):
        vocab_size: int = VOCAB
        hidden_size: int = text["hidden_size"]
        intermediate_size: int = text["intermediate_size"]
        num_hidden_layers: int = text["num_hidden_layers"]
        num_attention_heads: int = text["num_attention_heads"]
        num_key_value_heads: int = text["num_key_value_heads"]

    TinyQwen25.head_dim = head
    TinyQwen25.rope_dims = list(text["rope_parameters"]["mrope_section"])
    llama.Qwen25_7BVLI_Config = TinyQwen25

    vision_class = qwen_vl.Qwen2VLVisionTransformer

    class TinyVision(vision_class):
        def __init__(self, hidden_size=None, output_hidden_size=None, **kw):
            super().__init__(hidden_size=vision["hidden_size"], output_hidden_size=output_hidden_size,
                             intermediate_size=vision["intermediate_size"], num_heads=vision["num_heads"],
                             num_layers=vision["depth"], **kw)
            self.fullatt_block_indexes = list(vision["fullatt_block_indexes"])

    qwen_vl.Qwen2VLVisionTransformer = TinyVision

    vae_class = wan_vae.WanVAE

    class TinyVAE(vae_class):
        def __init__(self, dim=96, num_res_blocks=2, **kw):
            super().__init__(dim=cfg["vae"]["base_dim"], num_res_blocks=cfg["vae"]["num_res_blocks"], **kw)

    wan_vae.WanVAE = TinyVAE

    dit = cfg["dit"]
    dit_class = qwen_image.QwenImageTransformer2DModel

    class TinyDiT(dit_class):
        def __init__(self, **kw):
            kw.update(attention_head_dim=dit["attention_head_dim"], num_attention_heads=dit["num_attention_heads"],
                      joint_attention_dim=dit["joint_attention_dim"], axes_dims_rope=tuple(dit["axes_dims_rope"]))
            super().__init__(**kw)

    qwen_image.QwenImageTransformer2DModel = TinyDiT

    import comfy.sd

    detect = comfy.sd.detect_te_model

    def detect_tiny_qwen25(sd):  # ComfyUI tells Qwen2.5-VL-7B from 3B by the k_proj bias's width (512)
        if sd.get("model.layers.0.self_attn.k_proj.bias") is not None and "visual.merger.mlp.2.weight" in sd:
            return comfy.sd.TEModel.QWEN25_7B
        return detect(sd)

    comfy.sd.detect_te_model = detect_tiny_qwen25


def first(out):
    """A node's first output, from a classic tuple or a V3 NodeOutput."""
    if hasattr(out, "result"):
        out = out.result
    return out[0]


def call(cls, **given):
    """Run a node class as ComfyUI does: defaults for every widget not given."""
    spec = cls.INPUT_TYPES()
    kw = {}
    for group in ("required", "optional"):
        for name, entry in spec.get(group, {}).items():
            if name in given:
                kw[name] = given[name]
            elif group == "required" and len(entry) > 1 and isinstance(entry[1], dict) and "default" in entry[1]:
                kw[name] = entry[1]["default"]
            elif group == "required" and isinstance(entry[0], list):
                kw[name] = entry[0][0]
    fn = getattr(cls(), cls.FUNCTION)
    return fn(**kw)


def main(out: Path) -> None:
    sys.path.insert(0, os.getcwd())  # ComfyUI's folder
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths

    models = out / "models"
    cfg = write_files(models)
    for kind in ("diffusion_models", "text_encoders", "vae"):
        folder_paths.add_model_folder_path(kind, str(models / kind), is_default=True)
    tiny_sizes_for_comfyui(cfg)

    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    import nodes

    torch.manual_seed(0)
    from PIL import Image

    picture = Image.open(Path(os.environ["FIRERED_PACK"]) / "assets" / "house.png").convert("RGB").resize(PICTURE)
    import numpy as np

    image = torch.from_numpy(np.asarray(picture).astype(np.float32) / 255.0)[None]

    # ---- native ------------------------------------------------------------------------------
    model = first(nodes.UNETLoader().load_unet("tiny_dit.safetensors", "default"))
    model = first(ModelSamplingAuraFlow().patch_aura(model, SHIFT))
    clip = first(nodes.CLIPLoader().load_clip("tiny_qwen25vl.safetensors", type="qwen_image"))
    vae = first(nodes.VAELoader().load_vae("tiny_vae.safetensors"))
    positive = first(TextEncodeQwenImageEditPlus.execute(clip, PROMPT, vae=vae, image1=image))
    negative = first(TextEncodeQwenImageEditPlus.execute(clip, "", vae=vae, image1=image))
    empty = EmptySD3LatentImage  # a V3 node in newer ComfyUI, classic before
    latent = first(empty().generate(*SIZE, 1) if hasattr(empty, "FUNCTION") else empty.execute(*SIZE, 1))
    sampled = first(nodes.KSampler().sample(model, SEED, STEPS, 1.0, "euler", "simple", positive, negative, latent,
                                            denoise=1.0))
    native = first(nodes.VAEDecode().decode(vae, sampled))

    # ---- the pack -----------------------------------------------------------------------------
    import importlib.util

    pack = Path(os.environ["FIRERED_PACK"])
    spec = importlib.util.spec_from_file_location("firered_pack", pack / "__init__.py",
                                                  submodule_search_locations=[str(pack)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["firered_pack"] = mod
    spec.loader.exec_module(mod)
    N = mod.NODE_CLASS_MAPPINGS
    # float32 as ComfyUI runs each of them on a CPU (the loaders' "auto" is the release's bf16)
    dit = first(call(N["FireRedModelLoader"], model_name="tiny_dit.safetensors", dtype="fp32"))
    te = first(call(N["FireRedTextEncoderLoader"], text_encoder_name="tiny_qwen25vl.safetensors", dtype="fp32"))
    fvae = first(call(N["FireRedVAELoader"], vae_name="tiny_vae.safetensors", dtype="fp32"))
    cond = first(call(N["FireRedEditEncode"], text_encoder=te, vae=fvae, prompt=PROMPT, negative_prompt="",
                      image1=image, ref_mode="comfyui"))
    lat = first(call(N["FireRedSampler"], dit=dit, cond=cond, seed=SEED, steps=STEPS, cfg=1.0, sampler="euler",
                     schedule="linear_shift", shift=SHIFT, width=SIZE[0], height=SIZE[1], latent=latent,
                     noise_device="comfyui"))
    mine = first(call(N["FireRedDecode"], vae=fvae, latent=lat))

    # the control: the same pack graph with the release's picture sizing (PIL resampling) instead
    cond_own = first(call(N["FireRedEditEncode"], text_encoder=te, vae=fvae, prompt=PROMPT, negative_prompt="",
                          image1=image, ref_mode="own_aspect"))
    lat_own = first(call(N["FireRedSampler"], dit=dit, cond=cond_own, seed=SEED, steps=STEPS, cfg=1.0, sampler="euler",
                         schedule="linear_shift", shift=SHIFT, width=SIZE[0], height=SIZE[1], latent=latent,
                         noise_device="comfyui"))
    torch.save(native.float(), out / "native.pt")
    torch.save(mine.float(), out / "pack.pt")
    torch.save(first(call(N["FireRedDecode"], vae=fvae, latent=lat_own)).float(), out / "pack_own_aspect.pt")
    # what the two graphs carry between their nodes, to say where a difference starts
    torch.save({"native_text": positive[0][0].float(), "pack_text": cond.enc.positive.embeds.float(),
                "native_refs": [r.float() for r in positive[0][1].get("reference_latents", [])],
                "native_latent": sampled["samples"].float(), "pack_latent": lat["samples"].float(),
                "own_aspect_latent": lat_own["samples"].float(),
                "pack_ref_tokens": cond.enc.cond.ref_tokens.float(), "own_aspect_ref_tokens": cond_own.enc.cond.ref_tokens.float()},
               out / "between.pt")
    # ---- the smaller output: the same conditioning, another LATENT --------------------------
    small = first(empty().generate(*SMALL, 1) if hasattr(empty, "FUNCTION") else empty.execute(*SMALL, 1))
    sampled_small = first(nodes.KSampler().sample(model, SEED, STEPS, 1.0, "euler", "simple", positive, negative,
                                                  small, denoise=1.0))
    lat_small = first(call(N["FireRedSampler"], dit=dit, cond=cond, seed=SEED, steps=STEPS, cfg=1.0, sampler="euler",
                           schedule="linear_shift", shift=SHIFT, width=SMALL[0], height=SMALL[1], latent=small,
                           noise_device="comfyui"))
    # the control: the reference's RoPE positions instead of ComfyUI's
    reference_rope = dataclasses.replace(cond, enc=dataclasses.replace(
        cond.enc, cond=dataclasses.replace(cond.enc.cond, rope="diffusers")))
    lat_small_ref = first(call(N["FireRedSampler"], dit=dit, cond=reference_rope, seed=SEED, steps=STEPS, cfg=1.0,
                               sampler="euler", schedule="linear_shift", shift=SHIFT, width=SMALL[0], height=SMALL[1],
                               latent=small, noise_device="comfyui"))
    # ---- CFG 4 with the native template's CFGNorm, at the smaller size ---------------------------
    from comfy_extras.nodes_cfg import CFGNorm

    normed = first(CFGNorm.execute(model, 1.0))
    sampled_cfg = first(nodes.KSampler().sample(normed, SEED, STEPS, CFG, "euler", "simple", positive, negative,
                                                small, denoise=1.0))
    lat_cfg = first(call(N["FireRedSampler"], dit=dit, cond=cond, seed=SEED, steps=STEPS, cfg=CFG, sampler="euler",
                         schedule="linear_shift", shift=SHIFT, width=SMALL[0], height=SMALL[1], latent=small,
                         noise_device="comfyui"))
    release_norm = dataclasses.replace(cond, enc=dataclasses.replace(
        cond.enc, cond=dataclasses.replace(cond.enc.cond, cfg_norm="flow")))  # the control
    lat_cfg_flow = first(call(N["FireRedSampler"], dit=dit, cond=release_norm, seed=SEED, steps=STEPS, cfg=CFG,
                              sampler="euler", schedule="linear_shift", shift=SHIFT, width=SMALL[0], height=SMALL[1],
                              latent=small, noise_device="comfyui"))
    torch.save({"native": sampled_cfg["samples"].float(), "pack": lat_cfg["samples"].float(),
                "pack_release_norm": lat_cfg_flow["samples"].float()}, out / "cfg.pt")
    torch.save({"native": first(nodes.VAEDecode().decode(vae, sampled_small)).float(),
                "pack": first(call(N["FireRedDecode"], vae=fvae, latent=lat_small)).float(),
                "pack_reference_rope": first(call(N["FireRedDecode"], vae=fvae, latent=lat_small_ref)).float(),
                "native_latent": sampled_small["samples"].float(), "pack_latent": lat_small["samples"].float()},
               out / "small.pt")
    (out / "info.json").write_text(json.dumps({"prompt": PROMPT, "seed": SEED, "steps": STEPS, "shift": SHIFT,
                                               "size": SIZE, "small": SMALL, "native_latent": list(sampled["samples"].shape),
                                               "pack_latent": list(lat["samples"].shape)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
