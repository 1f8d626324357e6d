"""The fixed numbers of the real FireRed-Image-Edit / Qwen-Image architecture that loaders and the
tiny-model builder share: the VAE's per-channel latent statistics and the MM-DiT's RoPE axis split."""

from __future__ import annotations

#: Per-channel latent statistics of the real Qwen-Image VAE (16 channels).
LATENTS_MEAN: list[float] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
LATENTS_STD: list[float] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip


def default_axes_dims_rope(attention_head_dim: int) -> tuple[int, int, int]:
    """Split a transformer head dimension into the three RoPE axes (frame, height, width).

    Follows the proportions of the real model (``[16, 56, 56]`` for 128): about one
    eighth for the frame axis, the rest split evenly, every part even.
    Examples: 16 -> (4, 6, 6), 32 -> (4, 14, 14), 64 -> (8, 28, 28), 128 -> (16, 56, 56).
    """
    if attention_head_dim < 6 or attention_head_dim % 2:
        raise ValueError(f"attention_head_dim must be an even number >= 6, got {attention_head_dim}")
    frame = max(2, 2 * round(attention_head_dim / 16))
    if (attention_head_dim - frame) % 4:
        frame += 2
    rest = (attention_head_dim - frame) // 2
    return frame, rest, rest
