"""The Qwen-Image VAE at the pack's boundary: pictures in [-1, 1] <-> normalised latents.

The VAE (``AutoencoderKLQwenImage``, a causal video VAE used on single frames) takes 5-D input
``[B, 3, 1, H, W]``; this module adds and removes the frame axis and applies the per-channel
mean / std from the VAE's config, so the rest of the pack sees ``[B, 16, H/8, W/8]`` normalised
latents only. Encoding uses the posterior mode (deterministic), like the release pipeline.
"""

from __future__ import annotations

import torch

from . import latents as L
from .modules import compute_dtype, module_device


def latent_stats(vae) -> tuple[list[float], list[float]]:
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is None or std is None or len(mean) != L.LATENT_CHANNELS or len(std) != L.LATENT_CHANNELS:
        raise ValueError(
            f"the VAE config has no 16-channel latents_mean / latents_std; is this the Qwen-Image VAE? (z_dim={getattr(cfg, 'z_dim', '?')})"
        )
    return list(mean), list(std)


def _vae_device_dtype(vae) -> tuple[torch.device, torch.dtype]:
    return module_device(vae), compute_dtype(vae)


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, 3, H, W]`` in [-1, 1] -> normalised latents ``[B, 16, H/8, W/8]`` (posterior mode)."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pictures [B, 3, H, W], got {tuple(pixels.shape)}")
    if pixels.shape[-1] % L.VAE_SCALE or pixels.shape[-2] % L.VAE_SCALE:
        raise ValueError(f"picture size must be a multiple of {L.VAE_SCALE}, got {tuple(pixels.shape[-2:])}")
    device, vae_dtype = _vae_device_dtype(vae)
    x = pixels.to(device=device, dtype=dtype or vae_dtype).unsqueeze(2)
    raw = vae.encode(x).latent_dist.mode()
    mean, std = latent_stats(vae)
    return L.normalize(raw, mean, std)[:, :, 0]


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``[B, 16, h, w]`` -> pictures ``[B, 3, 8h, 8w]`` in about [-1, 1]."""
    if z.dim() != 4 or z.shape[1] != L.LATENT_CHANNELS:
        raise ValueError(f"expected latents [B, 16, h, w], got {tuple(z.shape)}")
    device, vae_dtype = _vae_device_dtype(vae)
    z = z.to(device=device, dtype=vae_dtype).unsqueeze(2)
    mean, std = latent_stats(vae)
    raw = L.denormalize(z, mean, std)
    return vae.decode(raw, return_dict=False)[0][:, :, 0]
