"""ComfyUI's RoPE positions for ``ref_mode="comfyui"`` (``firered_core.model.rope``): the same as
diffusers' ``QwenEmbedRope`` where the two agree (even grids, the output the largest), ComfyUI's
own where they part (``comfy/ldm/qwen_image/model.py`` 0.3.64: ``linspace(0, h - 1) - h // 2``
rows and columns, the text after the output's grid only), each checked against positions written
out here."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

from firered_core.model.rope import ComfyUIRope, comfyui_positions

AXES = [4, 6, 6]
CPU = torch.device("cpu")


def expected(shapes, txt_len, theta=10000):
    """The frequencies at ComfyUI's integer positions, from the rope formula."""
    def freqs(pos, dim):
        inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).float() / dim)
        return torch.polar(torch.ones(len(pos), dim // 2), torch.outer(pos.float(), inv))

    out = []
    for idx, (f, h, w) in enumerate(shapes):
        t = torch.full((f, h, w), idx, dtype=torch.long) + torch.arange(f).view(f, 1, 1)
        r = (torch.arange(h) - h // 2).view(1, h, 1).expand(f, h, w)
        c = (torch.arange(w) - w // 2).view(1, 1, w).expand(f, h, w)
        out.append(torch.cat([freqs(t.reshape(-1), AXES[0]), freqs(r.reshape(-1), AXES[1]), freqs(c.reshape(-1), AXES[2])], -1))
    start = max(shapes[0][1] // 2, shapes[0][2] // 2)
    text = torch.arange(start, start + txt_len)
    return torch.cat(out), torch.cat([freqs(text, d) for d in AXES], -1)


@pytest.mark.parametrize("shapes", [[(1, 8, 12), (1, 8, 12)], [(1, 8, 12), (1, 4, 6)], [(1, 4, 6), (1, 8, 12)],
                                    [(1, 5, 7), (1, 5, 7)], [(1, 31, 21), (1, 64, 64), (1, 9, 4)]])
def test_positions_are_comfyuis(shapes):
    rope = QwenEmbedRope(10000, AXES, scale_rope=True)
    got_img, got_txt = ComfyUIRope(rope)([shapes], device=CPU, max_txt_seq_len=10)
    want_img, want_txt = expected(shapes, 10)
    torch.testing.assert_close(got_img, want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_txt, want_txt, atol=1e-5, rtol=0)
    ref_img, ref_txt = rope([shapes], device=CPU, max_txt_seq_len=10)
    even = all(h % 2 == 0 and w % 2 == 0 for _, h, w in shapes)
    largest = max(max(h // 2, w // 2) for _, h, w in shapes) == max(shapes[0][1] // 2, shapes[0][2] // 2)
    assert torch.equal(got_img, ref_img) == even  # where diffusers agrees, and only there
    assert torch.equal(got_txt, ref_txt) == largest


def test_swap_on_a_transformer_and_refused_elsewhere():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = QwenEmbedRope(10000, AXES, scale_rope=True)

    m = Model()
    before = m.pos_embed
    with comfyui_positions(m):
        assert isinstance(m.pos_embed, ComfyUIRope)
    assert m.pos_embed is before
    with pytest.raises(ValueError, match="Qwen-Image MM-DiT"):
        with comfyui_positions(torch.nn.Linear(2, 2)):
            pass
