"""Edit regions: user masks to latent / token resolution, feathering, and the automatic mask.

Conventions (the ComfyUI ones, so a MaskEditor / LoadImage mask plugs in without glue):

* a *mask* is ``[B, H, W]`` (or ``[H, W]``) float in [0, 1]; **1 = edit** (the region the instruction
  may change), 0 = keep. ``keep = 1 - edit``.
* the *latent* mask of a picture of ``H x W`` pixels is ``[B, 1, H/8, W/8]``; the *token* mask is
  the latent mask broadcast over the 16 channels and 2x2-packed like the latent itself,
  ``[B, (h/2)(w/2), 64]``, so it multiplies packed tokens element by element.

Resizing (documented behaviour, tested): a mask of any size is **stretched** to the target grid —
it is taken to cover the whole picture, as a mask painted on the source picture does after the
source is resized to the output. Shrinking averages the covered area (``area`` interpolation, so a
latent cell that is half edit gets 0.5), enlarging is bilinear. Masks whose aspect ratio differs from
the target's by more than ``max_aspect_change`` (default 10 %) are refused with an error, since they
were almost certainly drawn on another picture. A batch of 1 is broadcast to every picture; any
other batch mismatch is an error.

Feathering (:func:`feather`) blurs with a truncated Gaussian and doubles, so the soft seam lies
*outside* the edit region (which keeps the value 1) and the mask is exactly 0 a few sigmas away.

The automatic mask (:func:`auto_edit_mask`) is estimated from where the model's clean-image
prediction departs from the source latent: a per-cell distance, smoothed, thresholded (Otsu, or a
quantile), returned at pixel resolution as a ``MASK`` so an artist can look at it, correct it and
feed it back as a user mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model import latents as L

# ---------------------------------------------------------------------------------------------
# Shapes and resizing
# ---------------------------------------------------------------------------------------------


def as_mask(mask, *, name: str = "mask") -> torch.Tensor:
    """Any mask-like input -> float32 ``[B, H, W]``.

    Accepts ``[H, W]``, ``[B, H, W]`` (ComfyUI ``MASK``), ``[B, 1, H, W]``, numpy arrays and
    PIL images ("L" or any mode, converted to luminance, 255 = 1).
    """
    if not isinstance(mask, torch.Tensor):
        try:
            from PIL import Image

            if isinstance(mask, Image.Image):
                import numpy as np

                mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype="float32") / 255.0)
        except ImportError:  # pragma: no cover
            pass
        mask = torch.as_tensor(mask)
    m = mask.float()
    if m.dim() == 2:
        m = m.unsqueeze(0)
    elif m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() != 3:
        raise ValueError(
            f"{name} must be [H, W], [B, H, W] (ComfyUI MASK) or [B, 1, H, W]; got shape {tuple(mask.shape)}"
        )
    if m.shape[-1] == 0 or m.shape[-2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(mask.shape)}")
    return m


def match_batch(mask: torch.Tensor, batch: int, *, name: str = "mask") -> torch.Tensor:
    """Broadcast a batch-1 mask to ``batch``; any other mismatch is an error."""
    if mask.shape[0] == batch:
        return mask
    if mask.shape[0] == 1:
        return mask.expand(batch, *mask.shape[1:])
    raise ValueError(
        f"{name} has a batch of {mask.shape[0]} but there are {batch} pictures; "
        "give one mask for all of them or one per picture"
    )


def resize_mask(mask, size: tuple[int, int], *, max_aspect_change: float | None = 0.1, name: str = "mask") -> torch.Tensor:
    """Stretch a mask to ``size = (height, width)``: area-average when shrinking, bilinear when
    enlarging (per axis), values kept in [0, 1]. Returns ``[B, H, W]``.

    Raises if the aspect ratio differs by more than ``max_aspect_change`` (relative; ``None``
    disables the check).
    """
    m = as_mask(mask, name=name)
    h, w = int(size[0]), int(size[1])
    mh, mw = m.shape[-2:]
    if (mh, mw) == (h, w):
        return m
    if max_aspect_change is not None:
        change = abs((mw / mh) / (w / h) - 1.0)
        if change > max_aspect_change:
            raise ValueError(
                f"{name} is {mw}x{mh} (aspect {mw / mh:.3f}) but the picture is {w}x{h} (aspect {w / h:.3f}); "
                "was it drawn on another picture? Resize or crop it to the picture's shape"
            )
    x = m.unsqueeze(1)
    # area-average along the axes that shrink, then bilinear along the axes that grow
    mid = (min(h, mh), min(w, mw))
    if mid != (mh, mw):
        x = F.interpolate(x, size=mid, mode="area")
    if mid != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x[:, 0].clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Blur and feather
# ---------------------------------------------------------------------------------------------


def gaussian_kernel1d(sigma: float, *, truncate: float = 3.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """A normalised 1-D Gaussian of radius ``ceil(truncate * sigma)`` (finite support)."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, sigma: float, *, truncate: float = 3.0) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with replicate padding. Finite support: a value
    further than ``ceil(truncate * sigma)`` cells from any non-zero stays exactly 0.
    ``sigma <= 0`` returns ``x`` unchanged."""
    if sigma <= 0:
        return x
    k = gaussian_kernel1d(sigma, truncate=truncate, dtype=x.dtype, device=x.device)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    kx = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    # replicate padding needs pad < size for 'reflect' only; replicate works for any size
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kx, groups=c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), ky, groups=c)
    return x


def feather(edit: torch.Tensor, sigma: float) -> torch.Tensor:
    """Soften an edit mask (``[B, H, W]`` or ``[B, 1, H, W]``) so that its seam lies *outside* it:
    ``clamp(2 * blur(edit), 0, 1)``. Inside a binary edit region the result stays 1 (up to the
    blur at its own corners), and it is exactly 0 beyond ``3 sigma`` from it."""
    squeeze = edit.dim() == 3
    x = edit.unsqueeze(1) if squeeze else edit
    out = (2 * gaussian_blur(x.float(), sigma)).clamp(0, 1)
    if sigma > 0:
        out = torch.maximum(out, x.float())  # never less than the mask itself
    return out[:, 0] if squeeze else out


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Max-filter a ``[B, H, W]`` mask with a square of side ``2 radius + 1``."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask.unsqueeze(1), 2 * radius + 1, stride=1, padding=radius)[:, 0]


# ---------------------------------------------------------------------------------------------
# Latent / token masks
# ---------------------------------------------------------------------------------------------


def latent_edit_mask(
    mask,
    latent_size: tuple[int, int],
    *,
    batch: int = 1,
    feather_px: float = 8.0,
    max_aspect_change: float | None = 0.1,
) -> torch.Tensor:
    """A user edit mask (1 = edit, any size) -> feathered edit mask ``[B, 1, h, w]`` at latent
    resolution ``latent_size = (h, w)``. ``feather_px`` is the Gaussian sigma in picture pixels
    (one latent cell is 8 pixels)."""
    m = match_batch(as_mask(mask), batch)
    m = resize_mask(m, latent_size, max_aspect_change=max_aspect_change)
    return feather(m, feather_px / L.VAE_SCALE).unsqueeze(1)


def latent_keep_mask(mask, latent_size: tuple[int, int], **kw) -> torch.Tensor:
    """``1 - latent_edit_mask(...)``: 1 where the picture must be kept, ``[B, 1, h, w]``."""
    return 1.0 - latent_edit_mask(mask, latent_size, **kw)


def mask_to_tokens(mask_latent: torch.Tensor) -> torch.Tensor:
    """``[B, 1, h, w]`` latent mask -> ``[B, (h/2)(w/2), 64]``, aligned with packed tokens."""
    if mask_latent.dim() != 4 or mask_latent.shape[1] != 1:
        raise ValueError(f"expected a latent mask [B, 1, h, w], got {tuple(mask_latent.shape)}")
    b, _, h, w = mask_latent.shape
    return L.pack(mask_latent.expand(b, L.LATENT_CHANNELS, h, w).contiguous())


def tokens_to_mask(mask_tokens: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`mask_to_tokens` (channel mean): ``[B, N, 64]`` -> ``[B, 1, h, w]``."""
    return L.unpack(mask_tokens, *latent_size).mean(1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Automatic edit region
# ---------------------------------------------------------------------------------------------


def otsu_threshold(values: torch.Tensor) -> float:
    """Otsu's threshold of a 1-D set of values (exact, over the sorted values): the split that
    maximises the between-class variance. Returns a value between the two classes."""
    v = values.detach().flatten().double().sort().values
    n = v.numel()
    if n < 2 or float(v[-1] - v[0]) <= 0:
        return float(v[-1]) if n else 0.0
    c = v.cumsum(0)
    k = torch.arange(1, n, dtype=torch.float64)  # size of the lower class
    w0, w1 = k / n, 1 - k / n
    m0 = c[:-1] / k
    m1 = (c[-1] - c[:-1]) / (n - k)
    between = w0 * w1 * (m0 - m1) ** 2
    between = torch.where(v[1:] > v[:-1], between, torch.full_like(between, -1.0))  # split between distinct values
    i = int(between.argmax())
    return float((v[i] + v[i + 1]) / 2)


def departure_map(x0_tokens: torch.Tensor, src_tokens: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Per latent cell, the RMS over the 16 channels of ``x0_hat - source``: ``[B, h, w]``."""
    d = L.unpack((x0_tokens.float() - src_tokens.float()), *latent_size)
    return d.pow(2).mean(1).sqrt()


def threshold_map(
    score: torch.Tensor, *, threshold: str | float = "otsu", smooth: float = 1.0, min_contrast: float = 0.05
) -> torch.Tensor:
    """Smooth a ``[B, h, w]`` score (Gaussian, ``smooth`` cells) and threshold it per picture into a
    binary edit mask. ``threshold``: "otsu", or a float q in (0, 1) = the q-quantile (e.g. 0.75 marks
    the top quarter). Where the score hardly varies (max - min below ``min_contrast`` times the max)
    nothing is marked: no region stands out from the rest."""
    s = gaussian_blur(score.float().unsqueeze(1), smooth)[:, 0] if smooth > 0 else score.float()
    out = torch.zeros_like(s)
    for b in range(s.shape[0]):
        sb = s[b]
        hi, lo = float(sb.max()), float(sb.min())
        if hi <= 0 or hi - lo < min_contrast * hi:
            continue
        if threshold == "otsu":
            t = otsu_threshold(sb)
        elif isinstance(threshold, (int, float)) and 0 < float(threshold) < 1:
            t = float(torch.quantile(sb.flatten(), float(threshold)))
        else:
            raise ValueError(f"threshold must be 'otsu' or a quantile in (0, 1), got {threshold!r}")
        out[b] = (sb > t).float()
    return out


def auto_edit_mask(
    x0_tokens: torch.Tensor,
    src_tokens: torch.Tensor,
    latent_size: tuple[int, int],
    *,
    out_size: tuple[int, int] | None = None,
    threshold: str | float = "otsu",
    smooth: float = 1.0,
    score: torch.Tensor | None = None,
) -> torch.Tensor:
    """The automatic edit region, as a ComfyUI ``MASK`` ``[B, H, W]`` (1 = edit) at pixel resolution.

    x0_tokens: the model's clean-image prediction ``[B, N, 64]``; src_tokens: the source latent,
    packed, ``[1 or B, N, 64]``; latent_size: ``(h, w)`` of the latent grid; out_size: ``(H, W)``
    pixels (default ``8h x 8w``). ``score``, when given (e.g. a departure map averaged over several
    steps), replaces the one computed from ``x0_tokens``. Each latent cell's decision covers its
    8x8 pixels (nearest resize).
    """
    if score is None:
        score = departure_map(x0_tokens, src_tokens, latent_size)
    m = threshold_map(score, threshold=threshold, smooth=smooth)
    h, w = latent_size
    out_size = out_size or (h * L.VAE_SCALE, w * L.VAE_SCALE)
    return F.interpolate(m.unsqueeze(1), size=tuple(out_size), mode="nearest")[:, 0]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two masks thresholded at 0.5."""
    a, b = a > 0.5, b > 0.5
    union = (a | b).sum()
    return float((a & b).sum() / union) if union > 0 else 1.0
