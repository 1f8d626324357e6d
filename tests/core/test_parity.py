"""Parity with the numerical reference: diffusers' QwenImageEditPlusPipeline on the same tiny
random weights (float32, CPU). The prompt embeddings, the sigma schedule and the initial noise
are compared on their own, so a failure says where the two part; then whole edits.

The reference pipeline hard-codes the VAE reference area (1024^2) and the VL area (384^2); most
cases shrink both (the pipeline's module constants and our ``ref_area`` / ``vl_area`` options) to
keep the suite fast, and one case runs the real sizes.

The reference runs as in FireRed's environment (transformers 4.57): its text encoder is given the
picture tokens' types, so the pictures get Qwen2.5-VL's 2-D M-RoPE positions. diffusers' pipeline
passes only the usual four inputs, which under transformers 5 gives every token a 1-D text
position instead (``conditioning.picture_token_types``); ``test_picture_positions_are_2d`` shows
the difference.
"""

import inspect

import numpy as np
import pytest
import torch

from firered_core import FireRedEditor
from firered_core.model import conditioning, images
from tests.conftest import make_picture

PIPE_MODULE = "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus"
SMALL_REF, SMALL_VL = 256 * 256, 128 * 128


@pytest.fixture(scope="module")
def pipes(tiny_model_dir):
    from diffusers import QwenImageEditPlusPipeline

    ref = QwenImageEditPlusPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    with_token_types(ref.text_encoder)
    ours = FireRedEditor.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    return ref, ours


def with_token_types(text_encoder):
    """Give the reference text encoder the picture tokens' types when the pipeline leaves them out
    (what transformers 4 derived from ``input_ids`` itself: 1 where the token is ``<|image_pad|>``)."""
    forward = text_encoder.forward

    def forward_with_types(*args, **kw):
        takes = "mm_token_type_ids" in inspect.signature(forward).parameters
        if takes and kw.get("image_grid_thw") is not None and kw.get("mm_token_type_ids") is None:
            kw["mm_token_type_ids"] = (kw["input_ids"] == text_encoder.config.image_token_id).int()
        return forward(*args, **kw)

    text_encoder.forward = forward_with_types
    return text_encoder


@pytest.fixture
def small_areas(monkeypatch):
    import importlib

    mod = importlib.import_module(PIPE_MODULE)
    monkeypatch.setattr(mod, "VAE_IMAGE_SIZE", SMALL_REF)
    monkeypatch.setattr(mod, "CONDITION_IMAGE_SIZE", SMALL_VL)
    return {"ref_area": SMALL_REF, "vl_area": SMALL_VL}


PICTURES = {
    1: [(96, 64)],
    2: [(64, 96), (80, 80)],
    3: [(112, 48), (64, 64), (48, 96)],
}


def pictures(n):
    return [make_picture(w, h, seed=i) for i, (w, h) in enumerate(PICTURES[n])]


@pytest.mark.parametrize("n", [1, 3])
def test_prompt_embeddings_match(pipes, n):
    ref, ours = pipes
    pics = pictures(n)
    vl_sizes = [images.fit_to_area(images.VL_AREA, p.width / p.height) for p in pics]
    vl_ours = [images.resize(p, w, h) for p, (w, h) in zip(pics, vl_sizes)]
    vl_ref = [ref.image_processor.resize(p, h, w) for p, (w, h) in zip(pics, vl_sizes)]
    for a, b in zip(vl_ours, vl_ref):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for prompt in ("make the disc red", " "):
        e_ref, m_ref = ref.encode_prompt(prompt=prompt, image=vl_ref, device="cpu")
        e = conditioning.encode_prompt(ours.c.text_encoder, ours.c.processor, prompt, vl_ours)
        assert m_ref is None and e.mask is None
        assert e.embeds.shape == e_ref.shape
        torch.testing.assert_close(e.embeds, e_ref, atol=1e-6, rtol=0)


def test_picture_positions_are_2d(pipes):
    """The picture tokens sit on Qwen2.5-VL's 2-D M-RoPE grid: the language model's rotary
    embedding sees three different position rows (time, height, width) over a picture, and the
    reference pipeline run without the token types (1-D positions, what diffusers gives under
    transformers 5) encodes another prompt."""
    from diffusers import QwenImageEditPlusPipeline

    ref, ours = pipes
    pic = pictures(1)
    vl = [images.resize(p, *images.fit_to_area(images.VL_AREA, p.width / p.height)) for p in pic]
    seen = {}
    rotary = ours.c.text_encoder.model.language_model.rotary_emb
    hook = rotary.register_forward_hook(lambda m, a, o: seen.__setitem__("pos", a[1].clone()) and None)
    try:
        e = conditioning.encode_prompt(ours.c.text_encoder, ours.c.processor, "make the disc red", vl)
    finally:
        hook.remove()
    pos = seen["pos"][:, 0]
    assert not torch.equal(pos[1], pos[2]), "the picture tokens got 1-D text positions"
    plain = QwenImageEditPlusPipeline(**{k: getattr(ref, k) for k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                                       "processor", "transformer")})
    forward = ref.text_encoder.forward
    ref.text_encoder.forward = type(ref.text_encoder).forward.__get__(ref.text_encoder)  # without the types
    try:
        e_1d, _ = plain.encode_prompt(prompt="make the disc red", image=vl, device="cpu")
    finally:
        ref.text_encoder.forward = forward
    if "mm_token_type_ids" in inspect.signature(type(ref.text_encoder).forward).parameters:
        assert (e.embeds - e_1d).abs().max() > 1e-3  # transformers 5: diffusers' own call is 1-D


@pytest.mark.parametrize("steps,size", [(40, (1024, 1024)), (8, (768, 1360)), (3, (64, 48))])
def test_sigma_schedule_matches(pipes, steps, size):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift, retrieve_timesteps

    ref, ours = pipes
    w, h = size
    seq = (h // 16) * (w // 16)
    cfg = ref.scheduler.config
    mu = calculate_shift(seq, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"])
    retrieve_timesteps(ref.scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    from firered_core.pipeline import EditRequest

    ours_sig = ours.sigmas(EditRequest(prompt="x", steps=steps), (w, h))
    assert torch.equal(ours_sig, ref.scheduler.sigmas)


@pytest.mark.parametrize("size", [(64, 48), (128, 128)])
def test_initial_noise_matches_for_the_same_seed(pipes, size):
    ref, ours = pipes
    w, h = size
    g_ref = torch.Generator("cpu").manual_seed(1234)
    noise_ref, _ = ref.prepare_latents(None, 1, 16, h, w, torch.float32, "cpu", g_ref)
    g = torch.Generator("cpu").manual_seed(1234)
    noise = ours.initial_noise((w, h), g, torch.float32)
    assert torch.equal(noise, noise_ref)


def run_both(pipes, pics, cfg, width=None, height=None, steps=3, seed=7, areas=None, batched=True):
    ref, ours = pipes
    out_ref = ref(
        image=pics,
        prompt="replace the disc with a star",
        negative_prompt=" ",
        true_cfg_scale=cfg,
        num_inference_steps=steps,
        width=width,
        height=height,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images[0]
    res = ours.edit(
        pics,
        "replace the disc with a star",
        negative_prompt=" ",
        cfg=cfg,
        steps=steps,
        width=width,
        height=height,
        seed=seed,
        cfg_batched=batched,
        **(areas or {}),
    )
    return out_ref, res.pixels[0].numpy(), res


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_edit_matches_reference(pipes, small_areas, n, cfg):
    # CFG batched into one pass: the uncond text is padded and masked, the reference runs two passes
    pics = pictures(n)
    out_ref, out, res = run_both(pipes, pics, cfg, width=80, height=64, areas=small_areas, batched=True)
    assert out.shape == out_ref.shape
    assert out.std() > 0.01  # a real picture, not a constant
    np.testing.assert_allclose(out, out_ref, atol=1e-4, rtol=0)


def test_edit_matches_reference_with_default_output_size(pipes, small_areas):
    # no size given: ~1024^2 at the last picture's aspect (here 48x96 -> 736x1440)
    out_ref, out, res = run_both(pipes, pictures(3), 4.0, steps=2, areas=small_areas, batched=False)
    assert res.info["size"] == (736, 1440) and out.shape == (1440, 736, 3)
    np.testing.assert_allclose(out, out_ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_edit_matches_reference_at_release_sizes(pipes):
    # the real 384^2 VL and 1024^2 VAE areas, default output size (1024^2 area at the picture's aspect)
    out_ref, out, res = run_both(pipes, [make_picture(300, 200)], 4.0, steps=2)
    assert res.info["size"] == (1248, 832)
    np.testing.assert_allclose(out, out_ref, atol=1e-4, rtol=0)


def test_batched_and_sequential_cfg_agree(pipes, small_areas):
    _, ours = pipes
    pics = pictures(1)
    kw = dict(cfg=4.0, steps=2, seed=3, width=64, height=64, **small_areas)
    a = ours.edit(pics, "make it blue", cfg_batched=True, **kw)
    b = ours.edit(pics, "make it blue", cfg_batched=False, **kw)
    np.testing.assert_allclose(a.pixels.numpy(), b.pixels.numpy(), atol=1e-5, rtol=0)


def test_text_to_image_matches_qwen_image_pipeline(pipes):
    # no input picture: the Qwen-Image text-to-image template (34 tokens dropped), no references
    from diffusers import QwenImagePipeline

    ref_edit, ours = pipes
    t2i = QwenImagePipeline(
        scheduler=ref_edit.scheduler,
        vae=ref_edit.vae,
        text_encoder=ref_edit.text_encoder,
        tokenizer=ref_edit.tokenizer,
        transformer=ref_edit.transformer,
    )
    t2i.set_progress_bar_config(disable=True)
    out_ref = t2i(
        prompt="a red house by a lake",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        width=80,
        height=48,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images[0]
    res = ours.edit(None, "a red house by a lake", cfg=4.0, steps=3, width=80, height=48, seed=5)
    np.testing.assert_allclose(res.pixels[0].numpy(), out_ref, atol=1e-4, rtol=0)
