"""``ref_mode="comfyui"`` hands the language model the picture tokens in the vision tower's
window-attention order, as ComfyUI's Qwen2.5-VL does (``comfy/text_encoders/qwen_vl.py`` returns
the merger's output without undoing the window permutation, 0.3.64); the reference model puts them
back in raster order. Found by running ComfyUI's native graph next to the pack's
(``tests/workflows/test_comfyui_native_edit.py``): its vision output equals the Hugging Face one
permuted this way to 3e-8."""

from __future__ import annotations

import pytest
import torch

from firered_core.model import conditioning


def padded_window_index(grid_thw, merge=2, window=112, patch=14):
    """Qwen2.5-VL's window index written the other way: pad each picture's merged grid to whole
    windows with -1, cut it into windows, read them in order, drop the padding."""
    side = window // merge // patch
    out, offset = [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        ph, pw = -gh % side, -gw % side
        idx = torch.nn.functional.pad(torch.arange(t * gh * gw).view(t, gh, gw), (0, pw, 0, ph), value=-1)
        idx = idx.view(t, (gh + ph) // side, side, (gw + pw) // side, side).permute(0, 1, 3, 2, 4).reshape(-1)
        out.append(idx[idx >= 0] + offset)
        offset += t * gh * gw
    return torch.cat(out)


@pytest.mark.parametrize("grids", [[(1, 8, 8)], [(1, 24, 32)], [(1, 10, 14)], [(1, 26, 18), (1, 8, 12)], [(2, 12, 20)]])
def test_window_order_is_qwen25vls(grids):
    g = torch.tensor(grids)
    got = conditioning.window_token_order(g)
    assert torch.equal(got, padded_window_index(g))
    assert sorted(got.tolist()) == list(range(len(got)))  # a permutation of all the tokens


def test_comfyui_pixels_take_the_window_order(tiny_model_dir):
    from firered_core import FireRedEditor
    from firered_core.model import images
    from tests.conftest import make_picture

    editor = FireRedEditor.from_pretrained(tiny_model_dir, dtype=torch.float32)
    te, proc = editor.c.text_encoder, editor.c.processor

    def encode(size, window_order):
        unit = images.to_unit(make_picture(*size, seed=3))
        vl = conditioning.vl_pixels_comfyui(unit, proc)
        vl = conditioning.VLPixels(vl.pixel_values, vl.grid_thw, window_order=window_order)
        return conditioning.encode_prompt(te, proc, "make it red", [vl]).embeds

    big = (224, 168)  # 16 x 12 patches: 8 x 6 merged tokens, 2 x 2 windows
    assert conditioning.vl_pixels_comfyui(images.to_unit(make_picture(*big)), proc).window_order
    assert (encode(big, True) - encode(big, False)).abs().max() > 1e-3
    small = (112, 84)  # 4 x 3 merged tokens: one window, the same order either way
    torch.testing.assert_close(encode(small, True), encode(small, False), atol=1e-6, rtol=0)
