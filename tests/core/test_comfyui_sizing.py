"""``ref_mode="comfyui"`` feeds the VL encoder and the VAE what ComfyUI's ``TextEncodeQwenImageEditPlus``
feeds them: checked against a re-implementation of the stated rules written here (torch's "area" and
bilinear interpolation, CLIP statistics, Qwen2-VL's patch order as the Hugging Face processor cuts it),
and, when ``$COMFYUI_PATH`` is set, against ComfyUI's own node and functions (run in its interpreter
``$COMFYUI_PYTHON``) on the same picture.

The rules (ComfyUI ``comfy_extras/nodes_qwen.py``, ``comfy/text_encoders/qwen_vl.py``):

* VL copy: ``s = sqrt(384^2 / (w h))``, size ``(round(w s), round(h s))``, "area" resampling of the
  float picture; then each side rounded to a multiple of 28, a bilinear resize (align_corners=False),
  CLIP mean / std, 14-pixel patches, the frame repeated over the temporal patch of 2;
* VAE reference: ``s = sqrt(1024^2 / (w h))``, sides ``round(w s / 8) * 8``, "area" resampling, the
  latent padded circularly to the 2x2 patch by the MM-DiT.

What reaches the encoders is compared; the encoders' outputs in ComfyUI are not: ComfyUI builds its
Qwen2.5-VL with the fixed 7B configuration (no tiny model), and its VAE at the node's fixed 1024^2 does
not fit a 2-core CI machine's memory (killed at 24 GB). ComfyUI's VAE on the tiny VAE file equals the
pack's on the same pixels (``tests/workflows/test_comfyui_tiny_vae.py``), so with the pixels equal here
the reference latents are equal too.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from firered_core import FireRedEditor
from firered_core.model import images, latents
from firered_core.model import vae as vae_mod
from firered_core.pipeline import EditRequest

# a float picture (not 8-bit values: a ComfyUI IMAGE is float) whose 8-multiple reference has an
# odd latent width, at small areas to keep the test fast
W, H = 150, 100
VL_AREA, REF_AREA = 64 * 64, 96 * 96
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def picture(w=W, h=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h).view(h, 1, 1)
    x = torch.linspace(0, 1, w).view(1, w, 1)
    img = torch.cat([x.expand(h, w, 1), y.expand(h, w, 1), (x * y).expand(h, w, 1)], -1)
    return (img * 0.8 + 0.2 * torch.rand(h, w, 3, generator=g)).unsqueeze(0)  # [1, H, W, 3] in 0..1


def rule_sizes(w, h, vl_area=384 * 384, ref_area=1024 * 1024):
    s = math.sqrt(vl_area / (w * h))
    vl = (round(w * s), round(h * s))
    s = math.sqrt(ref_area / (w * h))
    ref = (round(w * s / 8) * 8, round(h * s / 8) * 8)
    return vl, ref


def rule_vl_pixels(image, size):
    """The VL input by the rules above, from the [1, H, W, 3] picture; the patch cut is the Hugging
    Face processor's own (checked in test_patch_order_is_the_processors)."""
    x = F.interpolate(image.movedim(-1, 1), size=(size[1], size[0]), mode="area")
    h, w = x.shape[-2:]
    hb, wb = round(h / 28) * 28, round(w / 28) * 28
    assert 3136 <= hb * wb <= 12845056  # the bounds do not apply at these sizes
    x = F.interpolate(x, size=(hb, wb), mode="bilinear", align_corners=False)[0]
    x = (x - MEAN) / STD
    gh, gw = hb // 14, wb // 14
    # [t=2, c, gh/2, 2, 14, gw/2, 2, 14] -> rows (gh/2, gw/2, 2, 2), columns (c, t, 14, 14)
    p = torch.stack([x, x]).reshape(2, 3, gh // 2, 2, 14, gw // 2, 2, 14)
    p = p.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(gh * gw, 3 * 2 * 14 * 14)
    return p, torch.tensor([[1, gh, gw]])


@pytest.mark.parametrize("w,h", [(W, H), (640, 480), (333, 517), (1920, 1080), (97, 1203), (1024, 1024)])
def test_sizes_follow_the_native_rule(w, h):
    from PIL import Image

    _, vl, refs = images.plan_sizes([Image.new("RGB", (w, h))], None, None, ref_mode="comfyui")
    want_vl, want_ref = rule_sizes(w, h)
    assert vl == [want_vl] and refs == [want_ref]
    assert refs[0][0] % 8 == 0 and refs[0][1] % 8 == 0


def test_patch_order_is_the_processors(tiny_model_dir):
    # at a size already a multiple of 28, the processor's resize is the identity: its patches must
    # equal the rule's (so rule_vl_pixels' permutation is not just a copy of the pack's)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_model_dir / "processor")
    img = picture(84, 56)
    pil = images.to_pil(img)
    hf = proc(text=["<|vision_start|><|image_pad|><|vision_end|>x"], images=[pil], return_tensors="pt")
    mine, grid = rule_vl_pixels(images.to_unit(pil).movedim(1, -1), (84, 56))
    assert torch.equal(hf["image_grid_thw"], grid)
    torch.testing.assert_close(hf["pixel_values"], mine, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def recorded(tiny_model_dir):
    """One comfyui-mode edit on the tiny model, with what reached the VL encoder and the VAE."""
    ed = FireRedEditor.from_pretrained(tiny_model_dir, dtype="fp32")
    seen = {"te": [], "vae": []}
    te_forward = ed.c.text_encoder.forward

    def te_spy(*a, **kw):
        seen["te"].append({k: kw.get(k) for k in ("input_ids", "pixel_values", "image_grid_thw")})
        return te_forward(*a, **kw)

    ed.c.text_encoder.forward = te_spy
    vae_encode = vae_mod.encode

    def vae_spy(vae, pixels, **kw):
        z = vae_encode(vae, pixels, **kw)
        seen["vae"].append((pixels.clone(), z))
        return z

    vae_mod.encode = vae_spy
    try:
        img = picture()
        req = EditRequest(prompt="make it red", cfg=4.0, ref_mode="comfyui", vl_area=VL_AREA, ref_area=REF_AREA,
                          width=48, height=32, steps=2)
        enc = ed.encode(img, req)
        result = ed.edit(img, "make it red", steps=2, cfg=4.0, seed=3, width=48, height=32, ref_mode="comfyui",
                         vl_area=VL_AREA, ref_area=REF_AREA)
    finally:
        vae_mod.encode = vae_encode
    return img, seen, enc, result, ed


def test_vl_input_is_the_native_one(recorded):
    img, seen, _, _, ed = recorded
    vl, _ = rule_sizes(W, H, VL_AREA, REF_AREA)
    want, grid = rule_vl_pixels(img, vl)
    for call in seen["te"][:2]:  # positive and negative prompt: the same pictures
        assert torch.equal(call["image_grid_thw"].cpu(), grid)
        torch.testing.assert_close(call["pixel_values"].cpu(), want, atol=1e-6, rtol=0)
        pad = ed.c.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert int((call["input_ids"] == pad).sum()) == int(grid.prod()) // 4


def test_vae_reference_is_the_native_one(recorded):
    img, seen, enc, _, _ = recorded
    _, (rw, rh) = rule_sizes(W, H, VL_AREA, REF_AREA)
    assert (rw, rh) == (120, 80)  # a 15 x 10 latent: the odd width is padded
    want = F.interpolate(img.movedim(-1, 1), size=(rh, rw), mode="area") * 2 - 1
    pixels, z = seen["vae"][0]
    torch.testing.assert_close(pixels, want, atol=1e-6, rtol=0)
    padded = torch.cat([z, z[..., :1]], dim=-1)  # circular: the first column again after the last
    torch.testing.assert_close(enc.cond.ref_tokens, latents.pack(padded), atol=0, rtol=0)
    assert enc.cond.img_shapes[1] == (1, 5, 8)


def test_comfyui_mode_changes_the_edit_and_is_refused_when_unknown(recorded, tiny_model_dir):
    _, _, _, result, ed = recorded
    own = ed.edit(picture(), "make it red", steps=2, cfg=4.0, seed=3, width=48, height=32, vl_area=VL_AREA,
                  ref_area=REF_AREA)
    assert result.pixels.shape == own.pixels.shape == (1, 32, 48, 3)
    assert (result.pixels - own.pixels).abs().max() > 1e-4
    with pytest.raises(ValueError, match="ref_mode must be one of"):
        EditRequest(prompt="x", ref_mode="native")


# -- ComfyUI's own node and functions ----------------------------------------------------------

_COMFY = r"""
import sys, torch
from comfy.cli_args import args
args.cpu = True
import comfy.ldm.common_dit
from comfy.text_encoders.qwen_vl import process_qwen2vl_images
from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus

img = torch.load(sys.argv[1])
seen = {}

class Clip:
    def tokenize(self, text, images=(), llama_template=None):
        seen["text"], seen["vl"], seen["template"] = text, [i.clone() for i in images], llama_template
        return {}
    def encode_from_tokens_scheduled(self, tokens):
        return [[torch.zeros(1, 1, 8), {}]]

class Vae:
    def encode(self, pixels):
        seen["ref"] = pixels.clone()
        return torch.zeros(1, 16, 1, pixels.shape[1] // 8, pixels.shape[2] // 8)

TextEncodeQwenImageEditPlus.execute(Clip(), "make it red", vae=Vae(), image1=img)
pv, grid = process_qwen2vl_images(seen["vl"][0])
z = torch.load(sys.argv[2])
torch.save({"vl": seen["vl"][0], "ref": seen["ref"], "pixel_values": pv, "grid": grid,
            "padded": comfy.ldm.common_dit.pad_to_patch_size(z, (1, 2, 2)), "text": seen["text"],
            "template": seen["template"]}, sys.argv[3])
"""


@pytest.fixture(scope="module")
def comfy_native(tmp_path_factory):
    if not os.environ.get("COMFYUI_PATH"):
        pytest.skip("COMFYUI_PATH is not set (the real-ComfyUI tier)")
    tmp = tmp_path_factory.mktemp("comfy_sizing")
    img = picture(160, 120, seed=5)  # 384^2 / 1024^2 as the node fixes them
    z = torch.randn(1, 16, 1, 15, 11)
    torch.save(img, tmp / "img.pt")
    torch.save(z, tmp / "z.pt")
    py = os.environ.get("COMFYUI_PYTHON") or sys.executable
    done = subprocess.run([py, "-c", _COMFY, str(tmp / "img.pt"), str(tmp / "z.pt"), str(tmp / "out.pt")],
                          cwd=os.environ["COMFYUI_PATH"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return img, z, torch.load(tmp / "out.pt")


@pytest.mark.comfyui
def test_sizes_and_pixels_equal_comfyuis_own(comfy_native):
    from firered_core.model import conditioning

    img, z, got = comfy_native
    unit = images.to_unit(img)
    _, (vl,), (ref,) = images.plan_sizes([images.to_pil(img)], None, None, ref_mode="comfyui")
    vl_copy = images.area_resize(unit, *vl)
    assert tuple(got["vl"].shape) == (1, vl[1], vl[0], 3) and tuple(got["ref"].shape) == (1, ref[1], ref[0], 3)
    torch.testing.assert_close(vl_copy.movedim(1, -1), got["vl"], atol=1e-6, rtol=0)
    torch.testing.assert_close(images.area_resize(unit, *ref).movedim(1, -1), got["ref"], atol=1e-6, rtol=0)
    mine = conditioning.vl_pixels_comfyui(vl_copy)
    assert torch.equal(mine.grid_thw, got["grid"])
    torch.testing.assert_close(mine.pixel_values, got["pixel_values"], atol=1e-6, rtol=0)
    assert torch.equal(latents.pad_to_patches(z[:, :, 0]), got["padded"][:, :, 0])
    # the same template text: ComfyUI's Edit-Plus template with "Picture 1: <vision block>"
    assert got["text"] == conditioning.user_turn("make it red", 1)
    assert got["template"] == conditioning.EDIT_TEMPLATE.text


def test_cli_and_node_offer_comfyui_mode():
    from firered_core.cli import _parser
    from tests.nodes.conftest import import_pack

    args = _parser().parse_args(["edit", "--prompt", "x", "--out", "o.png", "--ref-mode", "comfyui"])
    assert args.ref_mode == "comfyui"
    spec = import_pack().NODE_CLASS_MAPPINGS["FireRedEditEncode"].INPUT_TYPES()["optional"]["ref_mode"]
    assert spec[0] == ["own_aspect", "match_output", "comfyui"]  # a new choice at the end: old values stay valid

