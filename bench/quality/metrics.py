"""Pixel metrics outside the edit region: masked PSNR and masked SSIM.

Both compare the edited picture with its source only where the keep mask is 1 (the region the
instruction did not ask to change). Pictures are ``[H, W, 3]`` float arrays in [0, 1] (numpy or
torch); the keep mask is ``[H, W]`` in {0, 1} (values in between weigh a pixel partly), ``None``
meaning the whole picture.

* :func:`masked_psnr` -- ``10 log10(1 / MSE)`` with the MSE the keep-weighted mean over the kept
  pixels and all three channels (data range 1). Identical kept pixels give ``inf``.
* :func:`masked_ssim` -- Wang et al. 2004 SSIM on the luma (ITU-R BT.601, as scikit-image's
  ``rgb2gray`` weighs it: 0.2125 R + 0.7154 G + 0.0721 B) with an 11x11 Gaussian window
  (sigma 1.5), ``K1 = 0.01``, ``K2 = 0.03``, data range 1, edges reflected, the sample covariance
  correction off -- the
  settings of ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  use_sample_covariance=False, data_range=1)``. The SSIM map is averaged over the kept pixels whose
  window centre lies at least 5 pixels inside the picture (skimage crops the same border) with the
  keep mask as weights. The window straddles the mask boundary, so a kept pixel next to the edit
  sees a little of it: an SSIM of 1 needs the kept region and a 5-pixel band around it unchanged.
"""

from __future__ import annotations

import math

import numpy as np

LUMA = (0.2125, 0.7154, 0.0721)
WIN, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def _arr(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    return a


def _keep(mask, shape) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=np.float64)
    m = _arr(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"keep mask is {m.shape}; expected the pictures' {tuple(shape)}")
    if m.min() < 0 or m.max() > 1:
        raise ValueError("keep mask values must lie in [0, 1] (1 = keep)")
    return m


def _check_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _arr(a), _arr(b)
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"pictures must both be [H, W, 3], got {a.shape} and {b.shape}")
    return a, b


def masked_mse(edited, source, keep=None) -> float:
    a, b = _check_pair(edited, source)
    m = _keep(keep, a.shape[:2])
    w = m.sum()
    if w <= 0:
        return float("nan")
    return float(((a - b) ** 2 * m[..., None]).sum() / (3 * w))


def masked_psnr(edited, source, keep=None) -> float:
    """PSNR in dB over the kept pixels (data range 1); ``inf`` when they are identical, ``nan``
    when nothing is kept."""
    mse = masked_mse(edited, source, keep)
    if math.isnan(mse):
        return mse
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _gaussian_kernel() -> np.ndarray:
    r = np.arange(WIN) - (WIN - 1) / 2
    g = np.exp(-(r**2) / (2 * SIGMA**2))
    return g / g.sum()


def _filter(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable correlation with ``k`` along both axes, edges reflected (only the interior,
    where no reflection is used, enters the score)."""
    p = len(k) // 2
    y = np.pad(x, ((p, p), (0, 0)), mode="symmetric")
    y = sum(k[i] * y[i:i + x.shape[0]] for i in range(len(k)))
    y = np.pad(y, ((0, 0), (p, p)), mode="symmetric")
    return sum(k[i] * y[:, i:i + x.shape[1]] for i in range(len(k)))


def ssim_map(edited, source) -> np.ndarray:
    """The per-pixel SSIM of the two pictures' luma, ``[H, W]`` (its 5-pixel border is not valid)."""
    a, b = _check_pair(edited, source)
    luma = np.array(LUMA)
    x, y = a @ luma, b @ luma
    k = _gaussian_kernel()
    mx, my = _filter(x, k), _filter(y, k)
    vx = _filter(x * x, k) - mx * mx
    vy = _filter(y * y, k) - my * my
    cxy = _filter(x * y, k) - mx * my
    c1, c2 = K1**2, K2**2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def masked_ssim(edited, source, keep=None) -> float:
    """Mean SSIM over the kept pixels of the valid interior; ``nan`` when none is kept there."""
    a, _ = _check_pair(edited, source)
    h, w = a.shape[:2]
    if h < WIN or w < WIN:
        raise ValueError(f"SSIM needs pictures of at least {WIN}x{WIN} pixels, got {w}x{h}")
    s = ssim_map(edited, source)
    m = _keep(keep, (h, w)).copy()
    p = WIN // 2
    inner = np.zeros_like(m)
    inner[p:h - p, p:w - p] = 1
    m = m * inner
    if m.sum() <= 0:
        return float("nan")
    return float((s * m).sum() / m.sum())


__all__ = ["masked_mse", "masked_psnr", "masked_ssim", "ssim_map"]
