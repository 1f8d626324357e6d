"""Consistency guidance: wrap a ``model_fn(x, sigma) -> v`` so the edit keeps what it should keep.

Inside a window of sigmas, the wrapper takes the inner model's velocity ``v``, forms the one-step
clean estimate ``x0_hat = x - sigma v`` (:func:`firered_core.sampling.flow.v_to_x0`), moves ``x0_hat`` down
the gradient of the chosen consistency measures (:mod:`firered_core.editing.consistency`), weighted by a
schedule over sigma, and returns the velocity of the corrected estimate
(:func:`firered_core.sampling.flow.x0_to_v`). Like the CFG guider it returns a ``model_fn``, so every sampler
gets it; it adds no forward pass of the MM-DiT and never backpropagates through it.

Measures (``measures=``):

* ``"region"`` — latent region consistency ``0.5 sum keep (x0 - src)^2``; its gradient is
  ``keep (x0 - src)`` in closed form, so the step is ``x0 <- x0 - w keep (x0 - src)`` with
  ``w = strength * schedule(sigma)`` clamped to [0, 1]: ``w = 1`` puts the source itself outside the
  edit region, smaller values pull part of the way. Costs a few elementwise operations.
* ``"region_pixel"`` — the same agreement measured in pixels through the VAE decoder (autograd
  through the decoder only). Its gradient is rescaled to the RMS size of the latent step above,
  so ``strength`` means the same thing; it costs a decoder forward + backward per guided step.
* ``"identity"`` — the report's face identity measure (needs an :class:`IdentityTerm`): autograd
  through the decoder and the embedder; the step is ``w * eta * L * g / max|g|`` (the largest latent
  change equals the weight times the current loss, so it fades as identity is restored).

Edit region: ``keep_mask_tokens`` (1 = keep, see :mod:`firered_core.editing.masks`) or, with
``auto_mask=AutoMask(...)``, estimated from the first ``estimate_steps`` distinct sigmas (where the
model's own ``x0_hat`` departs from the source, averaged), then frozen; no region guidance is applied
while it is being estimated. The estimated mask is available as a ComfyUI ``MASK`` through
:meth:`ConsistencyGuider.edit_mask`.

``strength == 0`` returns the inner model's output object itself: bit for bit the unguided run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..model import latents as L
from ..sampling import flow
from . import consistency as C
from . import masks as M

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MEASURES = ("region", "region_pixel", "identity")


@dataclass
class AutoMask:
    """Automatic edit region, estimated during sampling then frozen.

    estimate_steps: how many distinct sigmas (sampler steps) feed the estimate;
    threshold: "otsu" or a quantile in (0, 1) (:func:`firered_core.editing.masks.threshold_map`);
    smooth: Gaussian sigma of the score, in latent cells; feather_px: the seam, in pixels.
    """

    estimate_steps: int = 3
    threshold: str | float = "otsu"
    smooth: float = 1.0
    feather_px: float = 8.0


@dataclass
class IdentityTerm:
    """What the identity measure needs.

    ref_pixels: ``[1 or B, 3, H, W]`` the source picture in [-1, 1] (its landmarks define the alignment);
    faces: per picture, a list of :class:`firered_core.editing.consistency.Face` in ``ref_pixels`` coordinates;
    embedder: ArcFace-class ``nn.Module`` ``[F, 3, 112, 112] -> [F, D]`` (gradients must flow through it);
    vae: the VAE, to decode ``x0_hat`` with gradients; eta: the report's weight;
    schedule: weight schedule over sigma (the report's "sigma2" by default).
    """

    ref_pixels: torch.Tensor
    faces: Sequence[Any]
    embedder: torch.nn.Module
    vae: Any
    eta: float = 1.0
    schedule: str = "sigma2"


def sigma_window_from_steps(steps: tuple[int, int], sigmas: torch.Tensor) -> tuple[float, float]:
    """Steps ``[start, end)`` of a schedule -> the ``(high, low)`` sigma window covering exactly their
    start sigmas (where a first-order sampler evaluates the model)."""
    n = len(sigmas) - 1
    start, end = int(steps[0]), min(int(steps[1]), n)
    if not 0 <= start < end:
        return (-1.0, -1.0)  # empty window
    return (float(sigmas[start]), float(sigmas[end - 1]))


class ConsistencyGuider:
    """A ``model_fn`` with consistency guidance (see the module docstring); built by
    :func:`consistency_guided`. After sampling, :meth:`edit_mask` returns the edit region used."""

    def __init__(
        self,
        model_fn: ModelFn,
        *,
        x_src_tokens: torch.Tensor,
        latent_size: tuple[int, int],
        keep_mask_tokens: torch.Tensor | None = None,
        strength: float = 1.0,
        schedule: str = "constant",
        window: tuple[float, float] = (1.0, 0.0),
        measures: Sequence[str] = ("region",),
        auto_mask: AutoMask | bool | None = None,
        vae: Any = None,
        identity: IdentityTerm | None = None,
    ):
        if auto_mask is True:
            auto_mask = AutoMask()
        elif auto_mask is False:
            auto_mask = None
        elif auto_mask is not None and not isinstance(auto_mask, AutoMask):
            raise TypeError(f"auto_mask must be an AutoMask, True or None, got {type(auto_mask).__name__}")
        self.inner = model_fn
        self.src = x_src_tokens
        self.latent_size = tuple(latent_size)
        self.strength = float(strength)
        self.schedule = C.get_weight_schedule(schedule)
        self.window = (max(window), min(window))
        self.measures = tuple(measures)
        for m in self.measures:
            if m not in MEASURES:
                raise ValueError(f"unknown consistency measure {m!r}; expected some of {MEASURES}")
        if "identity" in self.measures and identity is None:
            raise ValueError("measure 'identity' needs identity=IdentityTerm(ref_pixels, faces, embedder, vae)")
        if "region_pixel" in self.measures and vae is None:
            raise ValueError("measure 'region_pixel' needs the vae")
        needs_region = any(m in self.measures for m in ("region", "region_pixel"))
        if needs_region and keep_mask_tokens is None and auto_mask is None:
            raise ValueError("region guidance needs keep_mask_tokens (1 = keep) or auto_mask=AutoMask()")
        h, w = self.latent_size
        n = (h // 2) * (w // 2)
        if x_src_tokens.dim() != 3 or x_src_tokens.shape[1:] != (n, 64):
            raise ValueError(f"x_src_tokens must be [B, {n}, 64] for a {h}x{w} latent, got {tuple(x_src_tokens.shape)}")
        if keep_mask_tokens is not None and (keep_mask_tokens.dim() != 3 or keep_mask_tokens.shape[1:] != (n, 64)):
            raise ValueError(
                f"keep_mask_tokens must be [B, {n}, 64] (masks.mask_to_tokens of a [B, 1, {h}, {w}] mask), "
                f"got {tuple(keep_mask_tokens.shape)}"
            )
        self.keep = keep_mask_tokens
        self.auto = auto_mask
        self.vae = vae
        self.identity = identity
        self._score_sum: torch.Tensor | None = None
        self._score_sigmas: list[float] = []
        self.guided_calls = 0

    # -- the edit region --------------------------------------------------------------------

    @property
    def estimating(self) -> bool:
        return self.keep is None and self.auto is not None

    def _observe(self, x0: torch.Tensor, sigma: float) -> None:
        """Accumulate the departure score of this step; freeze the mask after ``estimate_steps``."""
        score = M.departure_map(x0, self.src.to(x0.device), self.latent_size)
        if sigma not in self._score_sigmas:
            self._score_sigmas.append(sigma)
            self._score_sum = score if self._score_sum is None else self._score_sum + score
        if len(self._score_sigmas) >= self.auto.estimate_steps:
            self._freeze()

    def _freeze(self) -> None:
        edit = M.threshold_map(self._score_sum, threshold=self.auto.threshold, smooth=self.auto.smooth)
        edit = M.feather(edit, self.auto.feather_px / L.VAE_SCALE).unsqueeze(1)
        self.keep = M.mask_to_tokens(1.0 - edit)

    def edit_mask(self, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """The edit region (1 = edit) as a ComfyUI ``MASK`` ``[B, H, W]`` at pixel resolution
        (``out_size = (H, W)``, default 8x the latent). For an automatic mask still being estimated,
        the estimate so far; raises if nothing was seen yet."""
        h, w = self.latent_size
        out_size = out_size or (h * L.VAE_SCALE, w * L.VAE_SCALE)
        if self.auto is not None and self._score_sum is not None:
            return M.auto_edit_mask(
                None, None, self.latent_size, out_size=out_size, threshold=self.auto.threshold,
                smooth=self.auto.smooth, score=self._score_sum,
            )
        if self.keep is None:
            raise RuntimeError("no edit region yet: the automatic mask is estimated during sampling")
        edit = 1.0 - M.tokens_to_mask(self.keep.float(), self.latent_size)
        return torch.nn.functional.interpolate(edit, size=tuple(out_size), mode="bilinear", align_corners=False)[:, 0]

    # -- guidance ------------------------------------------------------------------------------

    def weight(self, sigma: float) -> float:
        hi, lo = self.window
        if not (lo <= sigma <= hi) or sigma <= 0:
            return 0.0
        return float(self.schedule(sigma, self.strength))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = self.inner(x, sigma)
        if self.strength == 0:
            return v
        s = float(sigma.reshape(-1)[0])
        if s <= 0:
            return v
        w = self.weight(s)
        if self.keep is None or not ({"region", "region_pixel"} & set(self.measures)):
            w = 0.0  # no region term to apply (identity only, or the automatic mask not frozen yet)
        id_w = 0.0
        if self.identity is not None and "identity" in self.measures:
            hi, lo = self.window
            if lo <= s <= hi:
                id_w = self.strength * float(C.get_weight_schedule(self.identity.schedule)(s, self.identity.eta))
        if self.estimating:
            xf = x.float()
            self._observe(flow.v_to_x0(xf, v.float(), s), s)
            w = 0.0  # no region guidance until the mask is frozen
        if w == 0.0 and id_w == 0.0:
            return v
        self.guided_calls += 1
        xf, vf = x.float(), v.float()
        x0 = flow.v_to_x0(xf, vf, s)
        step = torch.zeros_like(x0)
        src = self.src.to(x0.device, torch.float32)
        if w > 0 and self.keep is not None:
            keep = self.keep.to(x0.device, torch.float32)
            if "region" in self.measures:
                step = step + min(w, 1.0) * keep * (x0 - src)
            if "region_pixel" in self.measures:
                step = step + min(w, 1.0) * self._pixel_region_step(x0, src, keep)
        if id_w > 0:
            step = step + id_w * self._identity_step(x0)
        return flow.x0_to_v(xf, x0 - step, s).to(v.dtype)

    def _grad(self, x0: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss [B], d sum(loss) / d x0) for a loss of the unpacked latent, outside any no-grad mode."""
        h, w = self.latent_size
        with torch.inference_mode(False), torch.enable_grad():
            leaf = x0.detach().clone().requires_grad_(True)
            loss = loss_fn(L.unpack(leaf, h, w))
            (g,) = torch.autograd.grad(loss.sum(), leaf)
        return loss.detach(), g.detach()

    def _pixel_region_step(self, x0: torch.Tensor, src: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h, w = self.latent_size
        keep_lat = M.tokens_to_mask(keep, self.latent_size)
        src_lat = L.unpack(src.expand_as(x0).contiguous(), h, w)
        _, g = self._grad(x0, lambda z: C.region_consistency(z, src_lat, keep_lat, space="pixel", vae=self.vae))
        target = (keep * (x0 - src)).flatten(1).pow(2).mean(1).sqrt()
        rms = g.flatten(1).pow(2).mean(1).sqrt()
        scale = torch.where(rms > 0, target / rms.clamp_min(1e-30), torch.zeros_like(rms))
        return g * scale.view(-1, 1, 1)

    def _identity_step(self, x0: torch.Tensor) -> torch.Tensor:
        it = self.identity
        loss, g = self._grad(
            x0, lambda z: C.identity_consistency(C.decode_latents(it.vae, z).float(), it.ref_pixels, it.faces, it.embedder)
        )
        peak = g.flatten(1).abs().amax(1)
        scale = torch.where(peak > 0, loss / peak.clamp_min(1e-30), torch.zeros_like(peak))
        return g * scale.view(-1, 1, 1)


def consistency_guided(
    model_fn: ModelFn,
    *,
    x_src_tokens: torch.Tensor,
    latent_size: tuple[int, int],
    keep_mask_tokens: torch.Tensor | None = None,
    strength: float = 1.0,
    schedule: str = "constant",
    eta: float | None = None,
    window: tuple[float, float] | None = None,
    steps: tuple[int, int] | None = None,
    sigmas: torch.Tensor | None = None,
    measures: Sequence[str] = ("region",),
    auto_mask: AutoMask | None = None,
    vae: Any = None,
    identity: IdentityTerm | None = None,
) -> ConsistencyGuider:
    """Wrap ``model_fn`` with consistency guidance.

    x_src_tokens: the source picture's packed latent at the *output* size, ``[1 or B, N, 64]``
        (:func:`source_tokens`); latent_size: ``(h, w)`` = output pixels / 8.
    keep_mask_tokens: ``[1 or B, N, 64]``, 1 = keep (``masks.mask_to_tokens(masks.latent_keep_mask(...))``);
        or ``auto_mask=AutoMask(...)``.
    strength: the region weight (``w = schedule(sigma, strength)``, clamped to 1; 0 = off, bit for bit);
        it also multiplies the identity weight.
    schedule: "constant" or "sigma2" (the report's ``eta sigma^2`` below sigma 0.9, 0 above).
    eta: shorthand for ``identity.eta``.
    window: ``(start_sigma, end_sigma)`` (inclusive, either order), or ``steps=(start, end)`` with
        the ``sigmas`` of the run: guidance on the steps ``start <= i < end`` only.
    measures: some of "region", "region_pixel", "identity".
    """
    if steps is not None:
        if sigmas is None:
            raise ValueError("a step window needs the sampling sigmas: steps=(start, end), sigmas=...")
        window = sigma_window_from_steps(steps, sigmas)
    if identity is not None and eta is not None:
        identity = IdentityTerm(**{**identity.__dict__, "eta": float(eta)})
    return ConsistencyGuider(
        model_fn,
        x_src_tokens=x_src_tokens,
        latent_size=latent_size,
        keep_mask_tokens=keep_mask_tokens,
        strength=strength,
        schedule=schedule,
        window=window if window is not None else (1.0, 0.0),
        measures=measures,
        auto_mask=auto_mask,
        vae=vae,
        identity=identity,
    )


def source_tokens(vae, picture: Any, size: tuple[int, int]) -> torch.Tensor:
    """The source picture (PIL, path or tensor) VAE-encoded at the output ``size = (width, height)``
    and packed: ``[1, N, 64]``."""
    from ..model import images
    from ..model import vae as vae_mod

    w, h = size
    pil = images.to_pil(picture)
    z = vae_mod.encode(vae, images.pil_to_tensor(images.resize(pil, w, h)))
    return L.pack(z)


@dataclass
class GuidanceHook:
    """A ready ``guide`` hook for :meth:`firered_core.pipeline.FireRedEditor.sample` / ``edit``:
    builds the source tokens and the keep mask for the edit's output size, wraps the model, and
    keeps the guider (``.guider``) so its edit mask can be read after sampling.

    source: the picture to keep (usually the first input picture); mask: a user edit mask (1 = edit,
    any size, :mod:`firered_core.editing.masks`) or None with ``auto_mask``; feather_px: seam of the user mask;
    options: the other keyword arguments of :func:`consistency_guided`.
    """

    vae: Any
    source: Any
    mask: Any = None
    feather_px: float = 8.0
    options: dict[str, Any] = field(default_factory=dict)
    guider: ConsistencyGuider | None = None

    def __call__(self, model_fn: ModelFn, enc, sigmas: torch.Tensor) -> ModelFn:
        w, h = enc.size
        lat = (h // L.VAE_SCALE, w // L.VAE_SCALE)
        src = source_tokens(self.vae, self.source, enc.size)
        keep = None
        if self.mask is not None:
            keep = M.mask_to_tokens(M.latent_keep_mask(self.mask, lat, feather_px=self.feather_px))
        opts = dict(self.options)
        if opts.get("steps") is not None:
            opts.setdefault("sigmas", sigmas)
        self.guider = consistency_guided(model_fn, x_src_tokens=src, latent_size=lat, keep_mask_tokens=keep, **opts)
        return self.guider
