"""Consistency nodes on the tiny model: guidance through FireRed Sampler, the auto mask, the composite."""

import pytest
import torch

from tests.nodes.test_nodes import SMALL, image, node, sample_kwargs

S = 64  # square pictures: the mask halves are exact in latent cells


@pytest.fixture(scope="module")
def setup(pack, loaded):
    dit, te, vae = loaded
    src = image(2, S, S)
    cond = node(pack, "FireRedEditEncode").encode(te, vae, "make the disc red", " ", image1=src, **SMALL)[0]
    return dit, vae, cond, src


def guidance(pack, strength=1.0, mask=None, **over):
    w = dict(strength=strength, schedule="constant", start_step=0, end_step=200, measure="region", feather_px=4.0,
             estimate_steps=2, threshold=0.0, source_picture=1)
    w.update(over)
    return node(pack, "FireRedConsistencyGuidance").build(**w, mask=mask)[0]


def right_half(size=S):
    m = torch.zeros(1, size, size)
    m[:, :, size // 2 :] = 1
    return m


def test_guidance_holds_the_kept_half_to_the_source(pack, setup):
    from firered_core import parts

    dit, vae, cond, src = setup
    kw = sample_kwargs(width=S, height=S, steps=4)
    sampler = node(pack, "FireRedSampler")
    plain = sampler.sample(dit, cond, **kw)[0]["samples"]
    lat, mask = sampler.sample(dit, cond, **kw, guidance=guidance(pack, 1.0, right_half()))
    src_lat = parts.encode_picture(vae, src)
    keep = (..., slice(0, 2))  # latent columns 0-1 of 8 (2-3 carry the feathered seam)
    err_g = (lat["samples"] - src_lat)[keep].abs().max().item()
    err_p = (plain - src_lat)[keep].abs().max().item()
    assert err_g < 1e-4 < 0.1 < err_p, (err_g, err_p)  # strength 1: the kept cells are the source's
    edit = (..., slice(5, 8))
    assert (lat["samples"] - src_lat)[edit].abs().mean() > 0.5 * (plain - src_lat)[edit].abs().mean()  # still edited
    assert mask.shape == (1, S, S) and mask[:, :, -8:].min() > 0.99 and mask[:, :, :8].max() < 0.01


def test_strength_zero_is_the_unguided_sampler_bit_for_bit(pack, setup):
    dit, vae, cond, src = setup
    kw = sample_kwargs(width=S, height=S, steps=3)
    plain = node(pack, "FireRedSampler").sample(dit, cond, **kw)[0]["samples"]
    off = node(pack, "FireRedSampler").sample(dit, cond, **kw, guidance=guidance(pack, 0.0, right_half()))[0]["samples"]
    assert torch.equal(plain, off)


def test_auto_mask_node_and_automatic_guidance(pack, setup):
    dit, vae, cond, src = setup
    m = node(pack, "FireRedAutoMask").estimate(dit, cond, 7, 4, 4.0, "flowmatch", 2, 0.0, 1.0, S, S, 1)[0]
    assert m.shape == (1, S, S) and 0.0 <= m.min() and m.max() <= 1.0
    # the sampler with automatic guidance reports the same estimate (same seed and first steps)
    _, used = node(pack, "FireRedSampler").sample(dit, cond, **sample_kwargs(width=S, height=S, steps=4), guidance=guidance(pack, estimate_steps=2))
    assert torch.allclose(used, m, atol=1e-5)


def test_composite_keeps_source_pixels_exactly_outside_the_seam(pack):
    from firered_core.editing.composite import seam_width

    src, edited = image(1, S, S), image(5, S, S)
    out = node(pack, "FireRedComposite").composite(edited, src, right_half(), 4.0, True)[0]
    assert out.shape == src.shape
    k = S // 2 - seam_width(4.0)  # the feathered seam reaches this far into the kept half
    assert torch.equal(out[:, :, :k], src[:, :, :k])
    assert (out[:, :, S // 2 + 8 :] - src[:, :, S // 2 + 8 :]).abs().mean() > 0.05  # the edit shows inside


def test_guidance_errors_name_the_problem(pack, setup):
    dit, vae, cond, src = setup
    with pytest.raises(ValueError, match="end_step"):
        guidance(pack, start_step=5, end_step=5)
    with pytest.raises(ValueError, match="picture 3"):
        node(pack, "FireRedSampler").sample(dit, cond, **sample_kwargs(width=S, height=S, steps=2), guidance=guidance(pack, source_picture=3, mask=right_half()))
