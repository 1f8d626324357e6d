"""FireRedConsistencyGuider (nodes/native.py) in a real ComfyUI, on the native Qwen-Image path
(``COMFYUI_PATH`` tier; skipped when it is unset).

ComfyUI only loads a full-width Qwen-Image MM-DiT, and its Qwen2.5-VL text encoder cannot be
shrunk, so: a random 1-block full-width DiT, the VAE ``make_tiny_comfyui`` writes (the real
configuration; conftest ``native_files``), and conditioning from the test-only ``FireRedTestConditioning`` node
(random Qwen2.5-VL-shaped hidden states), with the source latent as a ``ReferenceLatent`` as in the
native edit workflows. ``UNETLoader -> ModelSamplingAuraFlow``, ``VAEEncode``, ``KSamplerSelect``,
``BasicScheduler``, ``RandomNoise``, ``SamplerCustomAdvanced``, ``VAEDecode``, ``SaveImage`` and
``SaveLatent`` are ComfyUI's own nodes.
"""

from __future__ import annotations

import time

import pytest
from tier_files import NATIVE_DIT, write_rgba_half_mask, write_test_picture
from tier_files import NATIVE_SIZE as SIZE  # 64x48 pixels: an 8x6 latent

from firered_core.tiny import WORKFLOW_FILES

pytestmark = pytest.mark.comfyui


STEPS = 3
NATIVE_VAE = WORKFLOW_FILES["vae"].split("/", 1)[1]  # qwen_image_vae.safetensors: the tiny VAE


def _latent(server, prefix: str):
    import torch
    from safetensors.torch import load_file

    files = sorted((server.output_dir / "latents").glob(f"{prefix}_0*.latent"))
    assert files, f"no latent saved under {prefix}"
    return load_file(str(files[-1]))["latent_tensor"].to(torch.float32)


def _prompt(prefix: str, *, strength: float, mask: bool, seed: int = 0) -> dict:
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": NATIVE_DIT, "weight_dtype": "default"}},
        "2": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": NATIVE_VAE}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "native_source.png"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["3", 0]}},
        "6": {"class_type": "FireRedTestConditioning", "inputs": {"seed": 1, "tokens": 6, "dim": 3584, "scale": 1.0}},
        "7": {"class_type": "FireRedTestConditioning", "inputs": {"seed": 2, "tokens": 6, "dim": 3584, "scale": 1.0}},
        "8": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["6", 0], "latent": ["5", 0]}},
        "9": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["7", 0], "latent": ["5", 0]}},
        "10": {"class_type": "FireRedConsistencyGuider", "inputs": {
            "model": ["2", 0], "positive": ["8", 0], "negative": ["9", 0], "cfg": 2.0, "source": ["5", 0],
            "strength": strength, "schedule": "constant", "start_step": 0, "end_step": 10000, "feather_px": 0.0,
            "estimate_steps": 1, "threshold": 0.0}},
        "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "12": {"class_type": "BasicScheduler", "inputs": {"model": ["2", 0], "scheduler": "simple", "steps": STEPS, "denoise": 1.0}},
        "13": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["13", 0], "guider": ["10", 0], "sampler": ["11", 0], "sigmas": ["12", 0], "latent_image": ["5", 0]}},
        "15": {"class_type": "SaveLatent", "inputs": {"samples": ["14", 0], "filename_prefix": f"latents/{prefix}"}},
        "16": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}_source"}},
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["3", 0]}},
        "18": {"class_type": "SaveImage", "inputs": {"images": ["17", 0], "filename_prefix": f"native/{prefix}"}},
    }  # fmt: skip
    if mask:
        p["19"] = {"class_type": "LoadImage", "inputs": {"image": "native_half_mask.png"}}
        p["10"]["inputs"]["mask"] = ["19", 1]
    return p


@pytest.fixture(scope="module")
def native_inputs(comfy_server, native_files):
    write_test_picture(comfy_server.input_dir / "native_source.png", size=SIZE, seed=3)
    write_rgba_half_mask(comfy_server.input_dir / "native_half_mask.png", SIZE)
    return comfy_server


def test_guider_is_registered_with_tooltips(comfy_server):
    info = comfy_server.object_info()["FireRedConsistencyGuider"]
    assert info["output"] == ["GUIDER"] and info["category"] == "FireRed/consistency"
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            assert spec[1].get("tooltip"), name


def test_guider_keeps_the_unmasked_half_in_a_real_sampler(native_inputs):
    """SamplerCustomAdvanced with the guider (mask: left half may change) against the same run at
    strength 0 (= CFGGuider, checked against ComfyUI's own node): guided, the kept half's latent
    equals the source's; unguided, the random model moves it far away. The edited half changes."""
    import torch

    server = native_inputs
    t = int(time.time()) % 100000
    runs = {}
    for name, strength in (("guided", 1.0), ("plain", 0.0)):
        prefix = f"{name}_{t}"
        res = server.run(_prompt(prefix, strength=strength, mask=True, seed=t), timeout=300)
        assert res.status == "execution_success", res.describe()
        runs[name] = _latent(server, prefix)
    # strength 0 is ComfyUI's own CFGGuider, bit for bit
    p = _prompt(f"cfgguider_{t}", strength=0.0, mask=True, seed=t)
    p["10"] = {
        "class_type": "CFGGuider",
        "inputs": {k: p["10"]["inputs"][k] for k in ("model", "positive", "negative", "cfg")},
    }
    res = server.run(p, timeout=300)
    assert res.status == "execution_success", res.describe()
    assert torch.equal(_latent(server, f"cfgguider_{t}"), runs["plain"])
    src = _latent(server, f"guided_{t}_source")
    assert runs["guided"].shape == src.shape and src.shape[-2:] == (SIZE[1] // 8, SIZE[0] // 8)
    w = src.shape[-1]
    keep = (slice(None),) * (src.dim() - 1) + (slice(w // 2, None),)
    edit = (slice(None),) * (src.dim() - 1) + (slice(0, w // 2),)
    err_guided = (runs["guided"][keep] - src[keep]).abs().max().item()
    err_plain = (runs["plain"][keep] - src[keep]).abs().max().item()
    print(f"kept half, max |latent - source|: guided {err_guided:.2e}, CFGGuider {err_plain:.2e}")
    assert err_guided < 1e-2, err_guided  # held to the source (bf16 / float rounding only)
    assert err_plain > 0.5, err_plain  # the untrained model does move it
    assert (runs["guided"][edit] - src[edit]).abs().mean() > 0.1  # and the edit region still changes
    assert (runs["guided"][edit] - runs["plain"][edit]).abs().max() < 1e3  # finite


def test_guider_with_the_automatic_region_runs(native_inputs):
    server = native_inputs
    res = server.run(_prompt(f"auto_{int(time.time())}", strength=1.0, mask=False, seed=5), timeout=300)
    assert res.status == "execution_success", res.describe()


def test_mismatched_source_size_names_the_input(native_inputs):
    server = native_inputs
    p = _prompt(f"bad_{int(time.time())}", strength=1.0, mask=True)
    p["20"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 96, "height": 48, "batch_size": 1}}
    p["14"]["inputs"]["latent_image"] = ["20", 0]
    res = server.run(p, timeout=300)
    assert res.status == "execution_error"
    err = res.message("execution_error")
    assert "source latent" in err["exception_message"] and "output size" in err["exception_message"], err
    assert server.alive()
