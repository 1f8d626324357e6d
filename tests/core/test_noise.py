"""The noise-device modes draw what the tool they name draws: ComfyUI's ``prepare_noise`` (run in
ComfyUI itself when ``$COMFYUI_PATH`` is set), diffusers' ``randn_tensor`` for ``cpu``; a CUDA mode
on a machine without CUDA is refused naming the option."""

import os
import subprocess
import sys

import pytest
import torch

from firered_core.model import latents
from firered_core.pipeline import EditRequest
from firered_core.sampling import noise


def _packed(raw):
    return latents.pack(raw.reshape(1, 16, raw.shape[-2], raw.shape[-1]))


def test_cpu_mode_draws_like_diffusers():
    from diffusers.utils.torch_utils import randn_tensor

    w, h = 80, 48
    ref = randn_tensor((2, 1, 16, h // 8, w // 8), generator=torch.Generator("cpu").manual_seed(11), dtype=torch.float32)
    got = noise.draw(noise.make_generator(11, "cpu"), (w, h), batch=2, noise_device="cpu")
    # one draw per picture: picture 0 is diffusers' single-picture draw
    assert torch.equal(got[0], _packed(ref[0]))


def _comfyui_prepare_noise(seed, shape):
    """ComfyUI's own prepare_noise on an empty latent, run in ComfyUI's interpreter."""
    code = (
        "import sys, torch\n"
        "from comfy.cli_args import args\nargs.cpu = True\n"
        "import comfy.sample\n"
        f"n = comfy.sample.prepare_noise(torch.zeros({list(shape)}), {seed})\n"
        "torch.save(n, sys.argv[1])\n"
    )
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"comfy_noise_{os.getpid()}.pt")
    py = os.environ.get("COMFYUI_PYTHON") or sys.executable
    done = subprocess.run([py, "-c", code, out], cwd=os.environ["COMFYUI_PATH"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    try:
        return torch.load(out)
    finally:
        os.remove(out)


def test_comfyui_mode_draws_like_comfyui():
    w, h, seed, batch = 96, 64, 123, 3
    if os.environ.get("COMFYUI_PATH"):
        ref = _comfyui_prepare_noise(seed, (batch, 16, 1, h // 8, w // 8))
    else:  # ComfyUI's definition: the default CPU generator seeded, one float32 draw of the batch
        ref = torch.randn((batch, 16, 1, h // 8, w // 8), generator=torch.manual_seed(seed))
    got = noise.draw(noise.make_generator(seed, "comfyui"), (w, h), batch=batch, noise_device="comfyui")
    for b in range(batch):
        assert torch.equal(got[b], _packed(ref[b])), b


def test_unknown_or_missing_noise_device_is_named():
    with pytest.raises(ValueError, match="noise_device 'gpu' is not known"):
        EditRequest(prompt="x", noise_device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            EditRequest(prompt="x", noise_device="cuda")


def test_cli_refuses_cuda_noise_before_loading(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run(
        [sys.executable, "-m", "firered_core", "edit", "--prompt", "x", "--out", str(tmp_path / "o.png"), "--noise-device", "cuda"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "--noise-device" in done.stderr and "no CUDA device" in done.stderr
    assert not (tmp_path / "o.png").exists()
