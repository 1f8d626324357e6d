"""``ref_mode="comfyui"`` at CFG > 1 rescales as ComfyUI's ``CFGNorm`` node (strength 1) does
(``comfy_extras/nodes_cfg.py``, 0.3.64): on the clean estimates, per latent pixel over the 16
channels, clamped at 1. Checked here against that rule applied to unpacked ``[B, 16, H, W]``
latents, and end to end against ComfyUI's own node in ``tests/workflows/test_comfyui_native_edit.py``."""

from __future__ import annotations

import torch

from firered_core.model import latents
from firered_core.sampling.guidance import cfg_combine, cfg_combine_comfyui


def cfgnorm_on_pixels(x, v_pos, v_neg, scale, sigma, h, w):
    """ComfyUI's path: CFG on the denoised latents, then CFGNorm's per-pixel rescale, on [B, 16, H, W]."""
    un = lambda t: latents.unpack(t, h, w)  # noqa: E731
    x0_pos, x0_neg = un(x) - sigma * un(v_pos), un(x) - sigma * un(v_neg)
    x0 = x0_neg + scale * (x0_pos - x0_neg)
    ratio = torch.norm(x0_pos, dim=1, keepdim=True) / (torch.norm(x0, dim=1, keepdim=True) + 1e-8)
    x0 = x0 * ratio.clamp(min=0.0, max=1.0)
    return latents.pack((un(x) - x0) / sigma)


def test_the_comfyui_rescale_is_cfgnorms():
    g = torch.Generator().manual_seed(0)
    h, w = 6, 10  # latent pixels
    x, v_pos, v_neg = (torch.randn(2, (h // 2) * (w // 2), 64, generator=g) for _ in range(3))
    v_neg = v_neg * 2.0  # guided estimates larger than the positive one somewhere, smaller elsewhere
    sigma = torch.tensor([0.7, 0.7])
    got = cfg_combine_comfyui(v_pos, v_neg, 4.0, x, sigma)
    want = cfgnorm_on_pixels(x, v_pos, v_neg, 4.0, 0.7, h, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # not the release's rescale (per 2 x 2 patch on the velocity, unclamped)
    assert (got - cfg_combine(v_pos, v_neg, 4.0)).abs().max() > 1e-2
