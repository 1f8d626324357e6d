"""The VAE ``make-tiny --layout comfyui`` writes loads in ComfyUI's own ``comfy.sd.VAE`` (what
``VAELoader`` builds: dim 96, 2 residual blocks, whatever the file holds) with every key used and
none missing, and encodes / decodes there as it does in the pack (``COMFYUI_PATH`` tier, run in
ComfyUI's interpreter ``$COMFYUI_PYTHON``; skipped when ``COMFYUI_PATH`` is unset)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.comfyui

_CODE = """
import sys, torch
from comfy.cli_args import args
args.cpu = True
import comfy.sd, comfy.utils
vae_path, img_path, out = sys.argv[1:4]
sd = comfy.utils.load_torch_file(vae_path)
vae = comfy.sd.VAE(sd=sd)
model_sd = vae.first_stage_model.state_dict()
same = all(torch.equal(model_sd[k].float(), sd[k].float()) for k in set(model_sd) & set(sd))
img = torch.load(img_path)
lat = vae.encode(img)
dec = vae.decode(lat)
torch.save({"missing": sorted(set(model_sd) - set(sd)), "unexpected": sorted(set(sd) - set(model_sd)),
            "same": same, "latent": lat.float(), "decoded": dec.float()}, out)
"""


@pytest.fixture(scope="module")
def comfy_vae_run(tmp_path_factory):
    if not os.environ.get("COMFYUI_PATH"):
        pytest.skip("COMFYUI_PATH is not set (the real-ComfyUI tier)")
    from firered_core.tiny import make_tiny_comfyui

    tmp = tmp_path_factory.mktemp("tiny_vae")
    paths = make_tiny_comfyui(tmp / "models", num_layers=1)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 48, 64, 3, generator=g)  # ComfyUI IMAGE [B, H, W, C] in 0..1
    torch.save(img, tmp / "img.pt")
    py = os.environ.get("COMFYUI_PYTHON") or sys.executable
    done = subprocess.run(
        [py, "-c", _CODE, str(paths["vae"]), str(tmp / "img.pt"), str(tmp / "out.pt")],
        cwd=os.environ["COMFYUI_PATH"], capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return paths, img, torch.load(tmp / "out.pt")


def test_comfyui_vaeloader_loads_the_tiny_vae_whole(comfy_vae_run):
    _, _, got = comfy_vae_run
    assert got["missing"] == [] and got["unexpected"] == []
    assert got["same"]


def test_comfyui_encodes_and_decodes_the_tiny_vae_like_the_pack(comfy_vae_run):
    from firered_core import parts
    from firered_core.formats.vae_files import load_vae
    from firered_core.model import vae as vae_mod

    paths, img, got = comfy_vae_run
    vae = load_vae(paths["vae"], dtype=torch.float32)
    mean, std = vae_mod.latent_stats(vae)
    z = vae_mod.encode(vae, img.permute(0, 3, 1, 2) * 2 - 1)
    raw = parts.to_raw_latent(z, mean, std)  # ComfyUI's LATENT: raw [B, 16, 1, h, w]
    assert got["latent"].shape == raw.shape
    torch.testing.assert_close(got["latent"], raw, atol=1e-4, rtol=1e-4)
    pixels = (vae_mod.decode(vae, z).float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(got["decoded"].reshape(pixels.shape), pixels, atol=1e-4, rtol=0)
