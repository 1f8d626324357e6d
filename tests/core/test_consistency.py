"""Consistency-guided editing (issue 5), the firered_core part: measures, masks, the guider,
compositing. Everything runs on the CPU in seconds: the tiny random model at 64x64, 6 steps."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from firered_core.editing import composite as CP  # noqa: E402
from firered_core.editing import consistency as C  # noqa: E402
from firered_core.editing import consistency_guidance as CG  # noqa: E402
from firered_core.editing import masks as M  # noqa: E402
from firered_core.model import images  # noqa: E402
from firered_core.model import latents as L  # noqa: E402
from firered_core.model import vae as V  # noqa: E402
from firered_core.sampling import flow, samplers
from tests.conftest import make_picture  # noqa: E402

SIZE = 64
OPTS = dict(steps=6, width=SIZE, height=SIZE, ref_area=SIZE * SIZE, vl_area=SIZE * SIZE)


def psnr(a, b):
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def editor(tiny_model_dir):
    from firered_core import FireRedEditor

    return FireRedEditor.from_pretrained(tiny_model_dir, dtype="fp32")


def half_mask(size=SIZE):
    """Edit the right half, keep the left."""
    m = torch.zeros(1, size, size)
    m[:, :, size // 2 :] = 1
    return m


# ---------------------------------------------------------------------------------------------
# The tiny model, end to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_guidance_keeps_the_masked_out_half_and_still_edits_the_other(editor, seed):
    pic = make_picture(SIZE, SIZE, seed + 1)
    with torch.inference_mode():
        z_src = V.encode(editor.c.vae, images.pil_to_tensor(pic))
        src_dec = images.tensor_to_unit(V.decode(editor.c.vae, z_src))
    plain = editor.edit(pic, "make it red", seed=seed, **OPTS)
    hook = CG.GuidanceHook(editor.c.vae, pic, half_mask(), feather_px=4, options=dict(strength=1.0))
    guided = editor.edit(pic, "make it red", seed=seed, guide=hook, **OPTS)
    assert hook.guider.guided_calls == 6

    # latent: with strength 1 the kept columns (0-1 of 8; 2-3 carry the seam) ARE the source's
    keep_lat, edit_lat = (..., slice(0, 2)), (..., slice(4, 8))
    err_guided = float((guided.latents - z_src)[keep_lat].abs().max())
    err_plain = float((plain.latents - z_src)[keep_lat].abs().max())
    assert err_guided < 1e-5 < 1.0 < err_plain  # measured: 4e-9 vs 4.6

    # pixels, away from the seam. Measured (seeds 0, 1): kept half 21.44 -> 23.11 dB and
    # 21.62 -> 24.95 dB. The tiny random VAE decoder mixes the whole picture (mid-block attention),
    # so the edited half leaks into the kept half's pixels; the margin is set below the smallest gain.
    K, E = slice(0, SIZE // 2 - 8), slice(SIZE // 2 + 8, SIZE)
    p_plain, p_guided = psnr(plain.pixels[:, :, K], src_dec[:, :, K]), psnr(guided.pixels[:, :, K], src_dec[:, :, K])
    assert p_guided > p_plain + 1.0, (p_plain, p_guided)

    # the edited half still changes: as far from the source as without guidance (measured
    # 20.49 vs 20.45 dB and 20.75 vs 20.68 dB), and its latent moves away from the source
    e_plain, e_guided = psnr(plain.pixels[:, :, E], src_dec[:, :, E]), psnr(guided.pixels[:, :, E], src_dec[:, :, E])
    assert e_guided < e_plain + 1.0 and e_guided < p_guided - 1.0, (e_plain, e_guided, p_guided)
    moved_plain = float((plain.latents - z_src)[edit_lat].abs().mean())
    moved_guided = float((guided.latents - z_src)[edit_lat].abs().mean())
    assert moved_guided > 0.7 * moved_plain, (moved_plain, moved_guided)


def test_strength_zero_is_bit_identical_to_unguided(editor):
    pic = make_picture(SIZE, SIZE, 3)
    plain = editor.edit(pic, "make it red", seed=5, **OPTS)
    hook = CG.GuidanceHook(editor.c.vae, pic, half_mask(), options=dict(strength=0.0, measures=("region", "region_pixel"), vae=editor.c.vae))
    off = editor.edit(pic, "make it red", seed=5, guide=hook, **OPTS)
    assert torch.equal(plain.latents, off.latents) and torch.equal(plain.pixels, off.pixels)
    assert hook.guider.guided_calls == 0


def test_pixel_region_measure_runs_inside_inference_mode(editor):
    pic = make_picture(SIZE, SIZE, 1)
    with torch.inference_mode():
        z_src = V.encode(editor.c.vae, images.pil_to_tensor(pic))
    plain = editor.edit(pic, "x", seed=0, **{**OPTS, "steps": 3})
    hook = CG.GuidanceHook(editor.c.vae, pic, half_mask(), options=dict(strength=1.0, measures=("region_pixel",), vae=editor.c.vae))
    guided = editor.edit(pic, "x", seed=0, guide=hook, **{**OPTS, "steps": 3})
    assert torch.isfinite(guided.latents).all()
    # the decoder-gradient pull brings the kept half's pixels closer to the decoded source
    with torch.inference_mode():
        src_dec = images.tensor_to_unit(V.decode(editor.c.vae, z_src))
    K = slice(0, SIZE // 2 - 8)
    p_plain, p_guided = psnr(plain.pixels[:, :, K], src_dec[:, :, K]), psnr(guided.pixels[:, :, K], src_dec[:, :, K])
    assert p_guided > p_plain + 0.3, (p_plain, p_guided)


# ---------------------------------------------------------------------------------------------
# The guider on synthetic model functions
# ---------------------------------------------------------------------------------------------


def _grid(h=8, w=8):
    n = (h // 2) * (w // 2)
    return h, w, n


def test_guider_pulls_x0_toward_the_source_and_converts_back_to_velocity():
    h, w, n = _grid()
    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, n, 64, generator=g)
    x = torch.randn(1, n, 64, generator=g)
    v = torch.randn(1, n, 64, generator=g)
    keep = M.mask_to_tokens(torch.ones(1, 1, h, w))
    sigma = torch.tensor([0.5])
    for s, expect in [(1.0, src), (0.25, None)]:
        fn = CG.consistency_guided(lambda x_, s_: v, x_src_tokens=src, latent_size=(h, w), keep_mask_tokens=keep, strength=s)
        x0 = flow.v_to_x0(x, fn(x, sigma), 0.5)
        x0_plain = flow.v_to_x0(x, v, 0.5)
        want = expect if expect is not None else x0_plain - s * (x0_plain - src)
        assert torch.allclose(x0, want, atol=1e-5)


def test_window_and_schedule_switch_guidance_off():
    h, w, n = _grid()
    src, x = torch.zeros(1, n, 64), torch.ones(1, n, 64)
    v = torch.full((1, n, 64), 0.3)
    keep = torch.ones(1, n, 64)
    inner = lambda x_, s_: v  # noqa: E731
    sig = torch.tensor([1.0, 0.95, 0.6, 0.3, 0.0])
    fn = CG.consistency_guided(inner, x_src_tokens=src, latent_size=(h, w), keep_mask_tokens=keep, steps=(1, 3), sigmas=sig)
    assert fn(x, sig[:1]) is v and fn(x, sig[3:4]) is v  # steps 0 and 3 are outside [1, 3)
    assert fn(x, sig[1:2]) is not v and fn(x, sig[2:3]) is not v
    fn2 = CG.consistency_guided(inner, x_src_tokens=src, latent_size=(h, w), keep_mask_tokens=keep, schedule="sigma2")
    assert fn2(x, torch.tensor([0.95])) is v  # sigma2 is 0 above 0.9
    assert not torch.equal(fn2(x, torch.tensor([0.5])), v)


def test_guider_errors_are_clear():
    h, w, n = _grid()
    src = torch.zeros(1, n, 64)
    with pytest.raises(ValueError, match="keep_mask_tokens"):
        CG.consistency_guided(lambda x, s: x, x_src_tokens=src, latent_size=(h, w))
    with pytest.raises(ValueError, match=r"keep_mask_tokens must be \[B, 16, 64\]"):
        CG.consistency_guided(lambda x, s: x, x_src_tokens=src, latent_size=(h, w), keep_mask_tokens=torch.ones(1, 4, 64))
    with pytest.raises(ValueError, match="unknown consistency measure"):
        CG.consistency_guided(lambda x, s: x, x_src_tokens=src, latent_size=(h, w), keep_mask_tokens=torch.ones(1, n, 64), measures=("lpips",))


def test_automatic_mask_recovers_the_changed_region():
    """A model_fn whose clean prediction is the source everywhere except a known rectangle."""
    h, w = 16, 16
    n = (h // 2) * (w // 2)
    g = torch.Generator().manual_seed(0)
    src_lat = torch.randn(1, 16, h, w, generator=g)
    truth = torch.zeros(1, 1, h, w)
    truth[..., 3:9, 6:14] = 1  # the region the "instruction" changes (latent cells)
    target = src_lat + truth * 2.0 * torch.randn(1, 16, h, w, generator=g)
    src, tgt = L.pack(src_lat), L.pack(target)

    def model_fn(x, sigma):  # predicts x0 = target (+ a little noise), as velocity
        s = float(sigma.reshape(-1)[0])
        x0 = tgt + 0.1 * s * torch.randn(tgt.shape, generator=g)
        return flow.x0_to_v(x, x0, s)

    guider = CG.consistency_guided(model_fn, x_src_tokens=src, latent_size=(h, w), auto_mask=CG.AutoMask(estimate_steps=2, smooth=0.7))
    x = torch.randn(1, n, 64, generator=g)
    samplers.sample_euler(guider, x, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]))
    mask = guider.edit_mask()
    assert mask.shape == (1, 8 * h, 8 * w)  # a ComfyUI MASK at pixel resolution
    truth_px = torch.nn.functional.interpolate(truth, scale_factor=8, mode="nearest")[:, 0]
    score = M.iou(mask, truth_px)
    assert score > 0.8, score  # measured 1.0 (smooth 0.7 cells, Otsu)
    assert guider.keep is not None  # frozen after 2 steps, then guided
    assert guider.guided_calls == 3  # steps 3-5 of 5 (sigma 0.6, 0.4, 0.2)

    # the one-shot function gives the same region from a single prediction
    one = M.auto_edit_mask(tgt, src, (h, w), smooth=0.7)
    assert M.iou(one, truth_px) > 0.8
    # quantile threshold: the top quarter
    q = M.auto_edit_mask(tgt, src, (h, w), threshold=1 - truth.mean().item(), smooth=0.0)
    assert M.iou(q, truth_px) > 0.8


def test_automatic_mask_marks_nothing_when_nothing_changes():
    h, w = 8, 8
    src = L.pack(torch.randn(1, 16, h, w))
    assert M.auto_edit_mask(src, src, (h, w)).sum() == 0


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def test_mask_shapes_resize_and_batch_rules():
    assert M.as_mask(torch.ones(5, 7)).shape == (1, 5, 7)
    assert M.as_mask(torch.ones(2, 1, 5, 7)).shape == (2, 5, 7)
    with pytest.raises(ValueError, match=r"\[H, W\], \[B, H, W\]"):
        M.as_mask(torch.ones(1, 2, 3, 4, 5))
    # documented resize: a mask of another size is stretched (area average when shrinking)
    big = half_mask(256)
    lat = M.latent_edit_mask(big, (8, 8), feather_px=0)
    assert lat.shape == (1, 1, 8, 8)
    assert torch.equal(lat[0, 0, :, 4:], torch.ones(8, 4)) and torch.equal(lat[0, 0, :, :4], torch.zeros(8, 4))
    small = M.resize_mask(half_mask(4), (8, 8))  # enlarging: bilinear
    assert small.shape == (1, 8, 8) and small[0, 0, 0] == 0 and small[0, 0, -1] == 1
    # a batch of 1 is shared; another mismatch is an error
    assert M.latent_edit_mask(big, (8, 8), batch=3).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="batch of 2 but there are 3 pictures"):
        M.latent_edit_mask(torch.ones(2, 64, 64), (8, 8), batch=3)
    with pytest.raises(ValueError, match="drawn on another picture"):
        M.latent_edit_mask(torch.ones(1, 64, 200), (8, 8))


def test_feather_puts_the_seam_outside_and_ends_exactly():
    m = torch.zeros(1, 32, 32)
    m[:, 8:24, 8:24] = 1
    f = M.feather(m, 2.0)
    assert torch.equal(f[m > 0], torch.ones(int(m.sum())))  # the edit region keeps 1
    r = math.ceil(3 * 2.0)
    far = M.dilate(m, r) == 0
    assert torch.equal(f[far], torch.zeros(int(far.sum())))  # exactly 0 beyond the seam
    assert ((f > 0) & (f < 1)).any()


def test_token_masks_line_up_with_packed_latents():
    lat = torch.zeros(1, 1, 8, 8)
    lat[..., :, 4:] = 1
    tok = M.mask_to_tokens(lat)
    z = torch.randn(1, 16, 8, 8)
    assert torch.equal(L.unpack(L.pack(z) * tok, 8, 8), z * lat)
    assert torch.equal(M.tokens_to_mask(tok, (8, 8)), lat)


# ---------------------------------------------------------------------------------------------
# Compositing
# ---------------------------------------------------------------------------------------------


def test_composite_keeps_source_pixels_exactly_away_from_the_seam():
    g = torch.Generator().manual_seed(0)
    source = torch.rand(1, 96, 96, 3, generator=g)
    edited = (torch.rand(1, 48, 48, 3, generator=g) * 0.5 + 0.3)  # other size: resized to the source's
    mask = half_mask(48)  # drawn at the edited picture's size: stretched
    out = CP.composite(edited, source, mask, feather_px=3.0, ring_px=6)
    assert out.shape == source.shape
    seam = CP.seam_width(3.0)
    # the stretched (bilinear) mask is already > 0 one pixel left of column 48; the seam reaches
    # `seam` pixels further, and from there on the source is copied as is
    keep = slice(0, 47 - seam)
    assert not torch.equal(out[:, :, 47 - seam], source[:, :, 47 - seam])  # the bound is tight
    assert torch.equal(out[:, :, keep], source[:, :, keep])  # the source's own pixels
    assert not torch.equal(out[:, :, 48:], source[:, :, 48:])  # the edit is there
    # colour matching: an edit with a global colour cast is brought back to the source's colours
    shifted = source * 0.5 + 0.4  # contrast halved, brightness raised
    matched = CP.composite(shifted, source, half_mask(96), feather_px=2.0, ring_px=8)
    raw = CP.composite(shifted, source, half_mask(96), feather_px=2.0, color_matching=False)
    inner = (..., slice(60, 96), slice(None))
    assert (matched[inner] - source[inner]).abs().mean() < 0.25 * (raw[inner] - source[inner]).abs().mean()


def test_composite_errors():
    with pytest.raises(ValueError, match="IMAGE"):
        CP.composite(torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8, 3), torch.ones(8, 8))
    with pytest.raises(ValueError, match="batch of 2 but there are 3"):
        CP.composite(torch.rand(3, 8, 8, 3), torch.rand(3, 8, 8, 3), torch.ones(2, 8, 8))


# ---------------------------------------------------------------------------------------------
# Region and identity measures
# ---------------------------------------------------------------------------------------------


def test_region_measure_ignores_the_edit_region():
    src = torch.randn(2, 16, 8, 8)
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :4] = 1
    x = src.clone()
    x[..., 4:] += 5.0  # changes only where editing is allowed
    assert torch.allclose(C.region_consistency(x, src, keep), torch.zeros(2))
    x[..., :4] += 1.0
    assert torch.allclose(C.region_consistency(x, src, keep), torch.ones(2))
    # tokens give the same number
    tok = C.region_consistency(L.pack(x), L.pack(src), M.mask_to_tokens(keep))
    assert torch.allclose(tok, torch.ones(2))


def test_umeyama_recovers_a_similarity_and_alignment_crops_the_template():
    ang, scale, t = 0.3, 1.7, torch.tensor([40.0, 25.0])
    rot = torch.tensor([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]], dtype=torch.float64)
    tmpl = C.ARCFACE_TEMPLATE
    pts = tmpl @ (scale * rot).T + t.double()  # the template placed in a bigger picture
    m = C.umeyama(pts, tmpl)  # picture -> template
    assert torch.allclose(pts @ m[:, :2].T + m[:, 2], tmpl, atol=1e-9)

    # a picture made by warping a known 112x112 crop: aligning it gives the crop back
    g = torch.Generator().manual_seed(0)
    crop = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 112, 112, generator=g), 5, 1, 2)
    H = W = 320
    theta_place = C.alignment_theta(torch.as_tensor(tmpl), (112, 112), out_size=112)  # identity-ish
    assert torch.allclose(theta_place, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64), atol=1e-6)
    # render the picture: for each picture pixel p, the crop pixel is m(p) (picture -> template)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    p = torch.stack([xs, ys], -1) @ m[:, :2].T + m[:, 2]
    grid = ((2 * p + 1) / 112 - 1).unsqueeze(0).float()
    picture = torch.nn.functional.grid_sample(crop, grid, align_corners=False, padding_mode="border")
    theta = C.alignment_theta(pts.unsqueeze(0), (H, W))
    back = C.align_faces(picture, theta, torch.zeros(1, dtype=torch.long))
    inner = (..., slice(16, 96), slice(16, 96))
    assert (back - crop)[inner].abs().mean() < 0.02


def test_identity_measure_orders_faces_and_has_a_useful_gradient():
    emb = C.tiny_face_embedder(seed=0)
    a = images.pil_to_tensor(make_picture(128, 128, 1))
    b = images.pil_to_tensor(make_picture(128, 128, 7)).flip(-1)
    face = C.Face.from_box((20, 20, 108, 108))
    same = C.identity_consistency(a, a, [face], emb)
    other = C.identity_consistency(b, a, [face], emb)
    # measured: same 0.0, other 0.027 (tiny random embedder with per-picture normalisation)
    assert float(same) < 1e-6 and float(other) > 0.01 and float(other) > 1000 * float(same) + 0.01
    # two faces per picture, a batch of two (the second picture has none)
    lm = face.landmarks
    two = C.identity_consistency(torch.cat([b, a]), a, [[face, C.Face(lm + 5)], []], emb)
    assert two.shape == (2,) and float(two[1]) == 0.0 and float(two[0]) > 0
    # gradient w.r.t. the prediction: finite and non-zero
    x = b.clone().requires_grad_(True)
    C.identity_consistency(x, a, [face], emb).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[5, 2\]"):
        C.identity_consistency(a, a, [torch.zeros(4, 2)], emb)


def test_identity_weight_schedule():
    w = C.get_weight_schedule("sigma2")
    assert w(0.95, 2.0) == 0.0 and w(0.9, 2.0) == 0.0
    assert w(0.5, 2.0) == pytest.approx(0.5)
    s = torch.tensor([1.0, 0.9, 0.89, 0.3, 0.0])
    assert torch.allclose(C.identity_weight(s, 1.0), torch.tensor([0, 0, 0.89**2, 0.09, 0]))
    assert C.get_weight_schedule("constant")(0.95, 2.0) == 2.0
    with pytest.raises(ValueError, match="unknown weight schedule"):
        C.get_weight_schedule("cosine")


def test_identity_guidance_step_lowers_the_identity_loss(editor):
    """One guided step on a synthetic model: the corrected x0 has a smaller identity loss."""
    vae, emb = editor.c.vae, C.tiny_face_embedder(seed=1)
    h = w = 8
    ref = images.pil_to_tensor(make_picture(64, 64, 2))
    face = C.Face.from_box((8, 8, 56, 56))
    with torch.no_grad():
        x0_bad = L.pack(V.encode(vae, images.pil_to_tensor(make_picture(64, 64, 9))))
    x = torch.randn(x0_bad.shape, generator=torch.Generator().manual_seed(0))
    s = 0.5
    v = flow.x0_to_v(x, x0_bad, s)
    term = CG.IdentityTerm(ref, [face], emb, vae, eta=1.0)
    guider = CG.consistency_guided(lambda x_, s_: v, x_src_tokens=x0_bad, latent_size=(h, w), measures=("identity",), identity=term, strength=4.0)
    x0_new = flow.v_to_x0(x, guider(x, torch.tensor([s])), s)

    def loss(tok):
        with torch.no_grad():
            return float(C.identity_consistency(C.decode_latents(vae, L.unpack(tok, h, w)), ref, [face], emb))

    assert loss(x0_new) < loss(x0_bad)
    assert torch.equal(guider(x, torch.tensor([0.95])), v)  # the report's schedule is off above 0.9
