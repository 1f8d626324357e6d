"""The pack's graph with ``ref_mode="comfyui"`` and ``noise_device="comfyui"`` gives the picture of
ComfyUI's native Qwen-Image-Edit graph (``TextEncodeQwenImageEditPlus`` + ``KSampler``) on the same
weights and seed (issue 12.2; ``COMFYUI_PATH`` tier). Both graphs run in one ComfyUI process
(``native_edit_graph.py``: what it runs, and the sizes ComfyUI's constructors are given there).

Measured (tiny model, 4 euler steps at shift 3.1, CFG 1, a 1024 x 1024 edit of a 160 x 160 picture):
the text states equal to 1.1e-6 (of 4.7), the latents to 2.9e-6 (of 15), the pictures to 1.0e-6;
at 496 x 336 (odd token grids, smaller than the reference) the pictures to 7.7e-7, where the
reference's RoPE positions would move them by 1.2e-3 (``firered_core.model.rope``).
Before the pack gave the picture tokens their 2-D positions (``conditioning.picture_token_types``)
and ComfyUI's window order (``conditioning.window_ordered_tokens``), the text states differed by
4e-2 and 6.7. Controls: the release's sizing (``own_aspect``) instead moves the picture by 1.6e-4
(the tiny random MM-DiT follows its conditioning only weakly) and the reference latents by 8e-2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfyui
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    if not os.environ.get("COMFYUI_PATH"):
        pytest.skip("COMFYUI_PATH is not set (the real-ComfyUI tier)")
    out = tmp_path_factory.mktemp("native_edit")
    py = os.environ.get("COMFYUI_PYTHON") or sys.executable
    env = dict(os.environ, FIRERED_PACK=str(ROOT), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run([py, str(Path(__file__).with_name("native_edit_graph.py")), str(out)],
                          cwd=os.environ["COMFYUI_PATH"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return {name: torch.load(out / f"{name}.pt") for name in ("native", "pack", "pack_own_aspect", "between", "small", "cfg")}, \
        json.loads((out / "info.json").read_text())


def test_pack_graph_gives_the_native_graphs_picture(graphs):
    got, info = graphs
    native, pack = got["native"], got["pack"]
    assert native.shape == pack.shape == (1, info["size"][1], info["size"][0], 3)
    between = got["between"]
    latent = (between["native_latent"] - between["pack_latent"]).abs().max().item()
    pixels = (native - pack).abs().max().item()
    control = (native - got["pack_own_aspect"]).abs().max().item()
    print(f"pack vs native graph: max pixel difference {pixels:.2e}, latent {latent:.2e} "
          f"(of {between['native_latent'].abs().max().item():.1f}); with the release's sizing (own_aspect) instead: {control:.2e}")
    assert native.std() > 0.01  # a picture, not a constant
    assert pixels < 1e-5 and latent < 1e-4
    assert control > 1e-4


def test_text_states_equal_the_native_encoders(graphs):
    """TextEncodeQwenImageEditPlus's conditioning (ComfyUI's tokenizer, template cut, picture
    preprocessing and its own Qwen2.5-VL) against FireRed Edit Encode's text states."""
    got, _ = graphs
    native, pack = got["between"]["native_text"], got["between"]["pack_text"]
    assert native.shape == pack.shape
    err = (native - pack).abs().max().item()
    print(f"text states: pack vs native {err:.2e} (of {native.abs().max().item():.1f})")
    assert err < 1e-4


def test_reference_latents_equal_the_native_nodes(graphs):
    """What TextEncodeQwenImageEditPlus hands the model as ``reference_latents`` (raw VAE latents,
    normalised and cut into 2 x 2 patches here as the model does) is the pack's reference tokens."""
    from firered_core.model import latents as L
    from firered_core.model.architecture import LATENTS_MEAN, LATENTS_STD

    got, _ = graphs
    (ref,) = got["between"]["native_refs"]
    tokens = L.pack(L.pad_to_patches(L.normalize(ref[:, :, 0], LATENTS_MEAN, LATENTS_STD)))
    mine, own = got["between"]["pack_ref_tokens"], got["between"]["own_aspect_ref_tokens"]
    assert tokens.shape == mine.shape
    err = (tokens - mine).abs().max().item()
    off = (tokens - own).abs().max().item() if own.shape == tokens.shape else float("inf")
    print(f"reference tokens: pack vs native {err:.2e}; the release's sizing {off:.2e}")
    assert err < 1e-5 and off > 1e-2


def test_a_smaller_output_with_odd_grids(graphs):
    """The same conditioning sampled at 496 x 336 (token grids 31 x 21, smaller than the 64 x 64
    reference): where ComfyUI's MM-DiT places the tokens unlike diffusers (odd grids centred the
    other way, the text after the output's grid only), the pack follows it in ``comfyui`` mode;
    with the reference's positions instead the picture moves by ~1e-3."""
    got, info = graphs
    small = got["small"]
    assert small["native"].shape == (1, info["small"][1], info["small"][0], 3)
    err = (small["native"] - small["pack"]).abs().max().item()
    latent = (small["native_latent"] - small["pack_latent"]).abs().max().item()
    control = (small["native"] - small["pack_reference_rope"]).abs().max().item()
    print(f"496 x 336: pack vs native {err:.2e} (latent {latent:.2e}); with diffusers' positions {control:.2e}")
    assert err < 1e-5 and latent < 1e-4
    assert control > 1e-4


def test_cfg_with_the_native_cfgnorm(graphs):
    """CFG 4: KSampler on the model through ComfyUI's ``CFGNorm`` (strength 1) against the pack's
    sampler in ``comfyui`` mode (the same rescale); with the release's rescale instead (per 2 x 2
    patch on the velocity, unclamped) the latents part."""
    got, _ = graphs
    cfg = got["cfg"]
    err = (cfg["native"] - cfg["pack"]).abs().max().item()
    control = (cfg["native"] - cfg["pack_release_norm"]).abs().max().item()
    print(f"CFG 4 + CFGNorm: latent pack vs native {err:.2e} (of {cfg['native'].abs().max().item():.1f}); "
          f"with the release's rescale {control:.2e}")
    assert err < 1e-4
    assert control > 1e-3
