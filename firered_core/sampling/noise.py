"""Where the initial noise comes from: the generator a seed drives, so one seed gives the picture of the tool a user compares with.

The same seed gives different noise on different generators, so a seed only reproduces a picture
together with the place its noise was drawn. ``noise_device`` names it:

========== ================================================= =====================================
mode       draws                                             reproduces
========== ================================================= =====================================
``cpu``    ``torch.Generator("cpu")``, one ``[1, 1, 16, h,   the diffusers examples
           w]`` draw per picture in the model's dtype        (``generator=torch.Generator().manual_seed(s)``)
``cuda``   ``torch.Generator("cuda")`` (or ``cuda:N``), the  FireRed's ``inference.py`` and its bench
           same draw on that GPU                             (``torch.Generator(device="cuda")``)
``comfyui`` ComfyUI's ``prepare_noise``: a CPU generator,     ComfyUI's ``KSampler`` /
           float32, the whole batch ``[B, 16, h, w]`` in one ``SamplerCustom`` with that seed
           draw
========== ================================================= =====================================

Only the initial noise follows the mode; the SDE sampler's fresh noise each step is drawn from the
same generator by the pack's own rule (no other tool samples it the same way).
"""

from __future__ import annotations

import torch

from ..model import latents

#: the named modes; any torch device string of a CUDA device (``cuda:1``) also works
NOISE_DEVICES = ("cpu", "cuda", "comfyui")


def check_noise_device(noise_device: str) -> str:
    """``noise_device`` normalised, or a ``ValueError`` naming it and what was expected."""
    name = str(noise_device).strip().lower()
    if name in ("cpu", "comfyui"):
        return name
    if name == "cuda" or name.startswith("cuda:"):
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"noise_device {noise_device!r} is not a device; expected one of {', '.join(NOISE_DEVICES)} or cuda:N") from None
        if not torch.cuda.is_available():
            raise ValueError(
                f"noise_device {noise_device!r} draws the noise on a CUDA generator (FireRed's inference.py), but this "
                "machine has no CUDA device; use 'cpu' (diffusers' examples) or 'comfyui' (ComfyUI's KSampler)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"noise_device {noise_device!r}: there are only {torch.cuda.device_count()} CUDA devices")
        return name
    raise ValueError(f"noise_device {noise_device!r} is not known; expected one of {', '.join(NOISE_DEVICES)} or cuda:N")


def make_generator(seed: int, noise_device: str = "cpu") -> torch.Generator:
    """The generator ``seed`` drives in mode ``noise_device`` (``comfyui`` is a CPU generator, as
    ``torch.manual_seed`` gives ComfyUI)."""
    name = check_noise_device(noise_device)
    device = "cpu" if name in ("cpu", "comfyui") else name
    return torch.Generator(device).manual_seed(int(seed))


def draw(
    generator: torch.Generator | None,
    size: tuple[int, int],
    *,
    batch: int = 1,
    noise_device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """The initial noise of ``batch`` pictures of ``size = (width, height)`` pixels, packed
    (``[1, h/16 * w/16, 64]`` each), on ``device`` in ``dtype``.

    ``cpu`` / ``cuda``: one draw per picture from the generator, in ``dtype`` on the generator's
    device (as diffusers' ``prepare_latents`` with ``num_images_per_prompt=1``), so picture 0 of a
    batch is the single edit with that seed. ``comfyui``: one float32 draw of the whole batch, as
    ComfyUI's ``prepare_noise`` does for a batch latent.
    """
    w, h = size
    lh, lw = h // latents.VAE_SCALE, w // latents.VAE_SCALE
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if check_noise_device(noise_device) == "comfyui":
        if gen_device.type != "cpu":
            raise ValueError("noise_device 'comfyui' draws on a CPU generator, but a generator on "
                             f"{gen_device} was given")
        whole = torch.randn((batch, latents.LATENT_CHANNELS, lh, lw), generator=generator, dtype=torch.float32)
        raw = [whole[b : b + 1] for b in range(batch)]
    else:
        shape = (1, 1, latents.LATENT_CHANNELS, lh, lw)
        raw = [torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).view(1, latents.LATENT_CHANNELS, lh, lw)
               for _ in range(batch)]
    return [latents.pack(n.to(device=device, dtype=dtype)) for n in raw]
