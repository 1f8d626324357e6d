"""Consistency measures: differentiable functions of the one-step clean estimate
``x0_hat = x_sigma - sigma v`` (see :mod:`firered_core.sampling.flow`), shared by consistency-guided
editing at inference (:mod:`firered_core.editing.consistency_guidance`) and by the trainer's losses.

* :func:`region_consistency` — agreement with the source *outside* the edit region (keep mask = 1),
  in latent space (cheap) or in pixels through the VAE decoder (differentiable).
* :func:`identity_consistency` — FireRed's consistency loss (report eqs. 6-8): the mean over faces
  of ``1 - cos(phi(T_i(x0)), phi(T_i(ref)))``, with ``T_i`` the similarity alignment of face ``i``'s
  five landmarks, estimated on the *reference*, onto the standard 112x112 ArcFace template, and
  ``phi`` a face-recognition embedder (any ``nn.Module`` ``[F, 3, 112, 112] -> [F, D]`` taking RGB
  in [-1, 1], the ArcFace input convention).
* weight schedules over sigma: ``"sigma2"`` is the report's ``lambda_id(sigma) = eta sigma^2`` for
  ``sigma < 0.9`` and 0 above; ``"constant"`` is ``eta`` everywhere. Name -> function registry.

Every measure returns one value per picture, ``[B]``; the caller reduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..model import latents as L

# ---------------------------------------------------------------------------------------------
# Weight schedules
# ---------------------------------------------------------------------------------------------

#: sigma at and above which the report's identity weight is 0
IDENTITY_SIGMA_CUTOFF = 0.9


def identity_weight(sigma, eta: float, *, cutoff: float = IDENTITY_SIGMA_CUTOFF):
    """The report's dynamic weight ``lambda_id(sigma) = eta * sigma^2`` for ``sigma < cutoff``, else 0.

    ``sigma``: a float or a tensor (elementwise)."""
    if isinstance(sigma, torch.Tensor):
        return torch.where(sigma < cutoff, eta * sigma**2, torch.zeros_like(sigma))
    return eta * sigma**2 if sigma < cutoff else 0.0


def constant_weight(sigma, eta: float, **_):
    """``eta`` at every sigma."""
    if isinstance(sigma, torch.Tensor):
        return torch.full_like(sigma, eta)
    return float(eta)


WEIGHT_SCHEDULES: dict[str, Callable] = {"constant": constant_weight, "sigma2": identity_weight}


def get_weight_schedule(name: str) -> Callable:
    """``name -> fn(sigma, eta)``; names: ``constant``, ``sigma2``."""
    try:
        return WEIGHT_SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown weight schedule {name!r}; expected one of {sorted(WEIGHT_SCHEDULES)}") from None


# ---------------------------------------------------------------------------------------------
# Region
# ---------------------------------------------------------------------------------------------


def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``[B, 16, h, w]`` -> pixels ``[B, 3, 8h, 8w]`` in about [-1, 1], **with**
    gradients (unlike :func:`firered_core.model.vae.decode`, which is for inference)."""
    from ..model.vae import latent_stats

    p = next(vae.parameters())
    mean, std = latent_stats(vae)
    raw = L.denormalize(z.to(p.dtype).unsqueeze(2), mean, std)
    return vae.decode(raw, return_dict=False)[0][:, :, 0]


def _weighted_mse(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-picture ``sum(w (x - y)^2) / sum(w broadcast to x)``; 0 where the weight is empty."""
    w = w.to(x.dtype).expand_as(x)
    dims = tuple(range(1, x.dim()))
    num = (w * (x - y.to(x.dtype)) ** 2).sum(dims)
    den = w.sum(dims)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def region_consistency(
    x0_hat: torch.Tensor,
    x_src: torch.Tensor,
    keep_mask: torch.Tensor,
    *,
    space: str = "latent",
    vae=None,
) -> torch.Tensor:
    """Mean squared disagreement with the source where ``keep_mask`` is 1 (soft masks weight it), ``[B]``.

    space="latent": ``x0_hat`` and ``x_src`` are packed tokens ``[B, N, 64]`` with ``keep_mask``
        ``[B or 1, N, 64]`` (see :func:`firered_core.editing.masks.mask_to_tokens`), or latents
        ``[B, 16, h, w]`` with ``keep_mask`` ``[B or 1, 1, h, w]``.
    space="pixel": ``x0_hat`` is a latent ``[B, 16, h, w]`` decoded through ``vae`` with gradients;
        ``x_src`` is either the source picture ``[B, 3, 8h, 8w]`` in [-1, 1] or its latent
        ``[B, 16, h, w]`` (decoded without gradients); ``keep_mask`` is ``[B or 1, 1, H', W']`` at any
        resolution (bilinear to the picture's).
    """
    if space == "latent":
        if x0_hat.shape[1:] != x_src.shape[1:]:
            raise ValueError(f"x0_hat {tuple(x0_hat.shape)} and x_src {tuple(x_src.shape)} differ in shape")
        return _weighted_mse(x0_hat.float(), x_src.float(), keep_mask.float())
    if space == "pixel":
        if vae is None:
            raise ValueError("region_consistency(space='pixel') needs the vae to decode x0_hat")
        if x0_hat.dim() != 4 or x0_hat.shape[1] != L.LATENT_CHANNELS:
            raise ValueError(f"pixel space takes latents [B, 16, h, w], got {tuple(x0_hat.shape)}")
        pix = decode_latents(vae, x0_hat).float()
        if x_src.shape[1] == L.LATENT_CHANNELS:
            with torch.no_grad():
                src = decode_latents(vae, x_src).float()
        else:
            src = x_src.float()
        if src.shape[-2:] != pix.shape[-2:]:
            raise ValueError(f"source picture {tuple(src.shape[-2:])} and decoded x0_hat {tuple(pix.shape[-2:])} differ in size")
        km = keep_mask.float()
        if km.dim() == 3:
            km = km.unsqueeze(1)
        if km.shape[-2:] != pix.shape[-2:]:
            km = F.interpolate(km, size=pix.shape[-2:], mode="bilinear", align_corners=False)
        return _weighted_mse(pix, src, km)
    raise ValueError(f"space must be 'latent' or 'pixel', got {space!r}")


# ---------------------------------------------------------------------------------------------
# Faces: landmarks, alignment
# ---------------------------------------------------------------------------------------------

#: The standard ArcFace 5-point template in a 112x112 crop (insightface ``arcface_dst``): left eye,
#: right eye, nose tip, left and right mouth corners, in pixel-centre coordinates (x, y).
ARCFACE_TEMPLATE = torch.tensor(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=torch.float64,
)
ARCFACE_SIZE = 112


@dataclass
class Face:
    """One face in the reference picture, in its pixel coordinates (x right, y down, pixel centres
    at integers, as detectors such as insightface's report them).

    landmarks: ``[5, 2]`` (left eye, right eye, nose, left mouth corner, right mouth corner).
    box: optional ``(x0, y0, x1, y1)``, kept for display; :meth:`from_box` builds coarse landmarks from it.
    """

    landmarks: torch.Tensor
    box: tuple[float, float, float, float] | None = None

    @classmethod
    def from_box(cls, box: Sequence[float]) -> "Face":
        """Coarse landmarks from a face box alone: the template's points placed as they sit in a
        112x112 ArcFace crop stretched onto the box. Use real landmarks when you have them."""
        x0, y0, x1, y1 = (float(v) for v in box)
        t = ARCFACE_TEMPLATE.clone()
        pts = torch.stack([x0 + (t[:, 0] + 0.5) / ARCFACE_SIZE * (x1 - x0) - 0.5, y0 + (t[:, 1] + 0.5) / ARCFACE_SIZE * (y1 - y0) - 0.5], 1)
        return cls(pts, (x0, y0, x1, y1))


def umeyama(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transform (rotation, uniform scale, translation; no reflection)
    taking points ``src`` to ``dst`` (Umeyama 1991). ``src``, ``dst``: ``[..., N, 2]``.
    Returns ``[..., 2, 3]`` with ``dst ~= M[:, :2] @ src + M[:, 2]``. Computed in float64."""
    src, dst = src.double(), dst.double()
    n = src.shape[-2]
    mu_s, mu_d = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.transpose(-1, -2) @ sc / n  # [..., 2, 2]
    u, s, vh = torch.linalg.svd(cov)
    d = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    d = torch.where(d == 0, torch.ones_like(d), d)
    diag = torch.stack([torch.ones_like(d), d], -1)
    rot = u @ torch.diag_embed(diag) @ vh
    var_s = sc.pow(2).sum((-1, -2)) / n
    scale = (s * diag).sum(-1) / var_s
    a = scale[..., None, None] * rot
    t = mu_d.transpose(-1, -2) - a @ mu_s.transpose(-1, -2)
    return torch.cat([a, t], -1)


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    """Inverse of ``[..., 2, 3]`` affine maps."""
    a, t = m[..., :2], m[..., 2:]
    ai = torch.linalg.inv(a)
    return torch.cat([ai, -ai @ t], -1)


def alignment_theta(landmarks: torch.Tensor, image_size: tuple[int, int], *, out_size: int = ARCFACE_SIZE) -> torch.Tensor:
    """``affine_grid`` matrices ``[F, 2, 3]`` (``align_corners=False``) that sample the ArcFace crop
    of each face from a picture of ``image_size = (H, W)`` pixels whose landmarks are ``[F, 5, 2]``.

    The similarity is fitted from the landmarks to the template (as insightface's ``norm_crop``
    does), inverted to map crop pixels to picture pixels, and expressed in normalised coordinates.
    Since normalised coordinates are relative, the same matrices crop the same face from another
    picture of the same framing at a different size (the edited picture vs its reference).
    """
    h, w = image_size
    tmpl = ARCFACE_TEMPLATE.to(landmarks.device) * (out_size / ARCFACE_SIZE)
    fwd = umeyama(landmarks.double(), tmpl.expand(landmarks.shape[0], -1, -1))  # picture px -> crop px
    inv = invert_affine(fwd)  # crop px -> picture px

    # output normalised (u, v) -> crop px (pixel centres: x = ((u + 1) size - 1) / 2)
    n_out = torch.tensor([[out_size / 2, 0.0, (out_size - 1) / 2], [0.0, out_size / 2, (out_size - 1) / 2], [0, 0, 1]], dtype=torch.float64)
    # picture px -> input normalised
    p_in = torch.tensor([[2 / w, 0.0, 1 / w - 1], [0.0, 2 / h, 1 / h - 1], [0, 0, 1]], dtype=torch.float64)
    inv3 = torch.cat([inv, torch.tensor([0, 0, 1], dtype=torch.float64).expand(inv.shape[0], 1, 3)], 1)
    theta = p_in.to(inv3.device) @ inv3 @ n_out.to(inv3.device)
    return theta[:, :2]


def align_faces(pixels: torch.Tensor, theta: torch.Tensor, index: torch.Tensor, *, out_size: int = ARCFACE_SIZE) -> torch.Tensor:
    """Differentiable crops ``[F, 3, out, out]`` of faces from ``pixels`` ``[B, 3, H, W]``;
    face ``f`` comes from picture ``index[f]`` with ``theta[f]`` (:func:`alignment_theta`)."""
    src = pixels[index]
    grid = F.affine_grid(theta.to(src.dtype), [theta.shape[0], 3, out_size, out_size], align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _collect_faces(faces, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``faces``: one list of :class:`Face` (or ``[5, 2]`` landmark tensors) per picture, or a
    flat list for a batch of one. Returns landmarks ``[F, 5, 2]`` and picture indices ``[F]``."""
    if faces and not isinstance(faces[0], (list, tuple)):
        if batch != 1:
            raise ValueError(f"faces must be given per picture (a list of {batch} lists) for a batch of {batch}")
        faces = [faces]
    if len(faces) != batch:
        raise ValueError(f"faces are given for {len(faces)} pictures but the batch has {batch}")
    lms, idx = [], []
    for b, per in enumerate(faces):
        for f in per:
            lm = f.landmarks if isinstance(f, Face) else torch.as_tensor(f)
            lm = torch.as_tensor(lm, dtype=torch.float64)
            if lm.shape != (5, 2):
                raise ValueError(f"face landmarks must be [5, 2] (eyes, nose, mouth corners), got {tuple(lm.shape)}")
            lms.append(lm)
            idx.append(b)
    if not lms:
        return torch.zeros(0, 5, 2, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.stack(lms), torch.tensor(idx, dtype=torch.long)


def identity_consistency(
    x0_pixels: torch.Tensor,
    ref_pixels: torch.Tensor,
    faces,
    embedder: torch.nn.Module,
    *,
    out_size: int = ARCFACE_SIZE,
) -> torch.Tensor:
    """Report eq. 6-8: per picture, the mean over its faces of ``1 - cos(phi(T_i(x0)), phi(T_i(ref)))``.

    x0_pixels: ``[B, 3, H, W]`` RGB in [-1, 1] (decoded ``x0_hat``; gradients flow to it);
    ref_pixels: ``[B or 1, 3, H', W']`` the reference (ground truth in training, the source picture
        at inference); its landmarks define ``T_i`` and its embeddings are targets (no gradient).
    faces: per picture, a list of :class:`Face` (or ``[5, 2]`` landmarks) in ``ref_pixels``'
        coordinates. Pictures without faces get 0.
    embedder: ``[F, 3, out, out]`` RGB in [-1, 1] -> ``[F, D]``.
    Returns ``[B]`` in [0, 2].
    """
    b = x0_pixels.shape[0]
    lms, idx = _collect_faces(faces, b)
    out = x0_pixels.new_zeros(b, dtype=torch.float32)
    if lms.shape[0] == 0:
        return out
    dev = x0_pixels.device
    theta = alignment_theta(lms, tuple(ref_pixels.shape[-2:]), out_size=out_size).to(dev)
    idx = idx.to(dev)
    ref_idx = idx if ref_pixels.shape[0] == b else torch.zeros_like(idx)
    p = next(embedder.parameters(), None)
    edt = p.dtype if p is not None else torch.float32
    with torch.no_grad():
        e_ref = embedder(align_faces(ref_pixels.to(dev, edt), theta, ref_idx, out_size=out_size)).float()
    e_x = embedder(align_faces(x0_pixels.to(edt), theta, idx, out_size=out_size)).float()
    per_face = 1.0 - F.cosine_similarity(e_x, e_ref, dim=-1, eps=1e-8)
    total = out.index_add(0, idx, per_face)
    count = out.index_add(0, idx, torch.ones_like(per_face))
    return torch.where(count > 0, total / count.clamp_min(1), out)


def tiny_face_embedder(dim: int = 32, seed: int = 0) -> torch.nn.Module:
    """A small random CNN ``[F, 3, 112, 112] -> [F, dim]`` standing in for ArcFace in tests and
    examples (nothing is downloaded). Deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        # per-picture normalisation: without it a random CNN answers mostly with the mean colour
        torch.nn.InstanceNorm2d(3),
        torch.nn.Conv2d(3, 8, 5, stride=4, padding=2),
        torch.nn.SiLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.SiLU(),
        torch.nn.Conv2d(16, 16, 3, stride=2, padding=1),
        torch.nn.SiLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 7 * 7, dim),
    )
    with torch.no_grad():
        for prm in net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * (1.0 / max(1, prm[0].numel()) ** 0.5))
    return net.eval()
