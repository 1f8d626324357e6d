"""Latent layouts: 2x2 packing into transformer tokens, and the VAE's per-channel normalisation.

Shapes used throughout the pack:

* *raw* VAE latent: ``[B, 16, h, w]`` (the Qwen-Image VAE itself works on 5-D ``[B, 16, 1, h, w]``;
  the frame axis is added and removed at the VAE boundary only), ``h = H / 8``;
* *normalised* latent: ``(raw - mean) / std`` per channel -- what the MM-DiT sees;
* *packed* tokens: ``[B, (h/2)(w/2), 64]``, channel-major inside each 2x2 patch (the diffusers
  ``_pack_latents`` order);
* ComfyUI's ``LATENT`` for Qwen-Image: the raw latent with its frame axis, ``[B, 16, 1, h, w]``, float32
  on the CPU (:func:`to_raw_latent` / :func:`from_raw_latent`, what the node graphs pass around).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger(__name__)

LATENT_CHANNELS = 16
VAE_SCALE = 8
PATCH = 2
#: pixel sizes must be multiples of this (VAE 8x times the 2x2 patch)
SIZE_MULTIPLE = VAE_SCALE * PATCH


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` (or ``[B, C, 1, h, w]``) -> ``[B, (h/2)(w/2), 4C]``."""
    if latents.dim() == 5:
        if latents.shape[2] != 1:
            raise ValueError(f"expected a single-frame latent [B, C, 1, h, w], got {tuple(latents.shape)}")
        latents = latents[:, :, 0]
    if latents.dim() != 4:
        raise ValueError(f"expected a latent [B, C, h, w], got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B, (h/2)(w/2), 4C]`` -> ``[B, C, h, w]`` for a latent of ``h x w``."""
    b, n, c4 = tokens.shape
    if n != (h // 2) * (w // 2):
        raise ValueError(f"{n} tokens do not make a {h}x{w} latent ({(h // 2) * (w // 2)} expected)")
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def token_grid(height: int, width: int) -> tuple[int, int, int]:
    """The ``(frames, rows, cols)`` entry of ``img_shapes`` for a picture of ``height x width`` pixels
    (a side that is a multiple of 8 but not 16 counts its padded patch: see :func:`pad_to_patches`)."""
    return (1, -(-height // SIZE_MULTIPLE), -(-width // SIZE_MULTIPLE))


def pad_to_patches(z: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` with an odd ``h`` / ``w`` -> even, the first row / column repeated after the
    last (circular padding, as ComfyUI pads latents to the 2x2 patch); unchanged when both are even."""
    ph, pw = z.shape[-2] % PATCH, z.shape[-1] % PATCH
    if not (ph or pw):
        return z
    return torch.nn.functional.pad(z, (0, pw, 0, ph), mode="circular")


def _stats(vals, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(vals).view(1, -1, *([1] * (like.dim() - 2))).to(like.device, like.dtype)


def normalize(raw: torch.Tensor, mean, std) -> torch.Tensor:
    """Raw VAE latent -> the normalised latent the MM-DiT is trained on: ``(z - mean) / std``."""
    return (raw - _stats(mean, raw)) / _stats(std, raw)


def denormalize(z: torch.Tensor, mean, std) -> torch.Tensor:
    """Inverse of :func:`normalize`, in the release pipeline's order of operations (``z / (1/std) + mean``)."""
    return z / (1.0 / _stats(std, z)) + _stats(mean, z)


def to_raw_latent(z: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised ``[B, 16, h, w]`` -> raw VAE latent ``[B, 16, 1, h, w]`` float32 on the CPU."""
    return denormalize(z.float().cpu(), mean, std).unsqueeze(2)


def from_raw_latent(
    samples: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, name: str = "latent", crop_odd: bool = False
) -> torch.Tensor:
    """A raw Qwen-Image latent ``[B, 16, 1, h, w]`` or ``[B, 16, h, w]`` -> normalised ``[B, 16, h, w]``.

    crop_odd: the MM-DiT works on 2x2 latent patches (pictures a multiple of 16 px), while ComfyUI's
    VAEEncode only crops pictures to a multiple of 8; an odd last row / column is dropped (with a
    log line) instead of refusing the latent."""
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"{name}: expected a LATENT tensor, got {type(samples).__name__}")
    x = samples
    if x.dim() == 5:
        if x.shape[2] != 1:
            raise ValueError(f"{name}: a video latent with {x.shape[2]} frames was given; FireRed edits single pictures [B, 16, 1, h, w]")
        x = x[:, :, 0]
    if x.dim() != 4 or x.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"{name}: expected a 16-channel Qwen-Image latent [B, 16, 1, h, w], got shape {tuple(samples.shape)} "
            "(a latent from another model's VAE?)"
        )
    if crop_odd and (x.shape[-1] % 2 or x.shape[-2] % 2):
        h2, w2 = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        log.info("FireRed: %s of %dx%d px cropped to %dx%d px (a multiple of 16)", name, x.shape[-1] * 8, x.shape[-2] * 8, w2 * 8, h2 * 8)
        x = x[..., :h2, :w2]
    return normalize(x.float(), mean, std)
