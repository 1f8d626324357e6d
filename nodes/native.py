"""Consistency guidance as a ``GUIDER`` for ComfyUI's native ``SamplerCustomAdvanced``.

Users of the native FireRed / Qwen-Image-Edit workflow (``UNETLoader`` -> ``MODEL``,
``TextEncodeQwenImageEditPlus`` -> ``CONDITIONING``, ``VAEEncode`` -> ``LATENT``) get the pack's
consistency guidance on the model they already load: ``FireRedConsistencyGuider`` is ComfyUI's
``CFGGuider`` (same cfg, same conditioning) whose prediction is then pulled toward the source latent
outside the edit region, by :class:`firered_core.editing.consistency_guidance.ConsistencyGuider` — the same
measure and schedule as FireRed Sampler's guidance.

The adapter (:class:`ConsistencyGuiderMixin`): ComfyUI's Qwen-Image model is a flow model (CONST
sampling) whose guided prediction is the clean estimate ``x0`` in the ``[B, 16, 1, h, w]`` latent the
model sees (ComfyUI's ``process_latent_in`` of the raw VAE latent). The core takes
``model_fn(tokens, sigma) -> velocity`` on 2x2-packed tokens, so the mixin packs / unpacks and converts
``v = (x - x0) / sigma`` around it; where the core changes nothing (strength 0, outside the window,
while the automatic mask is being estimated) ComfyUI's own ``x0`` is returned untouched.

Without ComfyUI (``comfy`` not importable) this module exports no nodes and logs one line.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..firered_core.editing import consistency_guidance as CG
from ..firered_core.editing import masks as M
from ..firered_core.model import latents as L

log = logging.getLogger("FireRed")

CATEGORY = "FireRed/consistency"
SCHEDULES = ("constant", "sigma2")

try:
    import comfy.samplers as _comfy_samplers
except ImportError as e:  # outside ComfyUI
    _comfy_samplers = None
    log.info("FireRed: the native GUIDER node (FireRedConsistencyGuider) needs ComfyUI (%s); left out", e)


class ConsistencyGuiderMixin:
    """Adds consistency guidance to a ComfyUI guider whose ``predict_noise`` returns ``x0``.

    Mixed in front of ``comfy.samplers.CFGGuider`` (see :func:`guider_class`); needs
    ``self.inner_model.process_latent_in`` during sampling, as CFGGuider provides.
    source: raw VAE latent ``[1 or B, 16, (1,) h, w]``; mask: ComfyUI ``MASK`` (1 = may change) or None
    for the automatic region; steps: ``(start, end)`` window over the run's sigmas.
    """

    def setup_consistency(self, *, source, mask=None, strength=1.0, schedule="constant", steps=(0, 10000),
                          feather_px=8.0, auto=None):  # fmt: skip
        if not isinstance(source, torch.Tensor) or source.dim() not in (4, 5) or source.shape[1] != L.LATENT_CHANNELS:
            shape = tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
            raise ValueError(
                f"source must be a Qwen-Image LATENT (samples [B, 16, 1, h, w] from VAEEncode with the Qwen-Image VAE), got {shape}"
            )
        if source.dim() == 5 and source.shape[2] != 1:
            raise ValueError(f"source must be a single-frame latent [B, 16, 1, h, w], got {tuple(source.shape)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.cg_source = source if source.dim() == 5 else source.unsqueeze(2)
        self.cg_mask = mask
        self.cg_strength = float(strength)
        self.cg_schedule = schedule
        self.cg_steps = (int(steps[0]), int(steps[1]))
        self.cg_feather = float(feather_px)
        self.cg_auto = auto if auto is not None else CG.AutoMask(feather_px=feather_px)
        self.cg_sigmas = None
        self.core = None
        self._call = {"tokens": None, "v": None}

    # -- sampling ---------------------------------------------------------------------------

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self.cg_sigmas = sigmas.detach().float().cpu()
        self.core = None  # built at the first prediction of each run
        return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def _build(self, x: torch.Tensor) -> None:
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        src = self.cg_source.to(x.device, torch.float32)
        if tuple(src.shape[-2:]) != (h, w):
            raise ValueError(
                f"source latent is {src.shape[-1] * 8}x{src.shape[-2] * 8} pixels but the sampled latent is {w * 8}x{h * 8}: "
                "encode the source at the output size (VAEEncode of the picture whose latent the sampler starts from)"
            )
        if src.shape[0] not in (1, b):
            raise ValueError(
                f"source latent has batch {src.shape[0]}, the sampled latent {b}: use 1 or {b} source latents"
            )
        src = self.inner_model.process_latent_in(src)[:, :, 0]
        self.cg_hw = (h, w)
        self.cg_pad = (h % 2, w % 2)
        keep = None
        if self.cg_mask is not None:
            keep = M.latent_keep_mask(self.cg_mask, (h, w), batch=b, feather_px=self.cg_feather).to(x.device)
            keep = M.mask_to_tokens(self._pad(keep))
        sigmas = self.cg_sigmas if self.cg_sigmas is not None else torch.tensor([1.0, 0.0])
        self.core = CG.consistency_guided(
            self._velocity,
            x_src_tokens=L.pack(self._pad(src)),
            latent_size=(h + self.cg_pad[0], w + self.cg_pad[1]),
            keep_mask_tokens=keep,
            strength=self.cg_strength,
            schedule=self.cg_schedule,
            steps=self.cg_steps,
            sigmas=sigmas,
            auto_mask=None if keep is not None else self.cg_auto,
        )

    def _pad(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> even height and width (edge replicate), as the 2x2 packing needs."""
        ph, pw = self.cg_pad
        return F.pad(z, (0, pw, 0, ph), mode="replicate") if (ph or pw) else z

    def _velocity(self, tokens: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The core's ``model_fn``: ComfyUI's guided ``x0`` as a packed velocity."""
        c = self._call
        return c["v"] if tokens is c["tokens"] else self._model_v(tokens, sigma)

    def _model_v(self, tokens, sigma):  # pragma: no cover - the core only calls with our own tokens
        raise RuntimeError("consistency guider: unexpected model call")

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
        x0 = super().predict_noise(x, timestep, model_options, seed)
        if self.cg_strength == 0:
            return x0
        if self.core is None:
            self._build(x)
        s = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if s <= 0:
            return x0
        h, w = self.cg_hw
        xf = self._pad(x.float().reshape(x.shape[0], x.shape[1], h, w))
        x0f = self._pad(x0.float().reshape(x.shape[0], x.shape[1], h, w))
        tokens = L.pack(xf)
        v = L.pack((xf - x0f) / s)
        self._call = {"tokens": tokens, "v": v}
        try:
            out = self.core(tokens, torch.full((x.shape[0],), s, device=x.device))
        finally:
            self._call = {"tokens": None, "v": None}
        if out is v:
            return x0  # nothing changed at this step: ComfyUI's prediction, bit for bit
        x0_new = L.unpack(tokens - s * out.float(), h + self.cg_pad[0], w + self.cg_pad[1])[:, :, :h, :w]
        return x0_new.reshape(x0.shape).to(x0.dtype)

    def edit_mask(self):
        """The edit region of the last run (1 = edit) as a ComfyUI ``MASK``, at 8x the latent."""
        if self.core is None:
            raise RuntimeError("the guider has not sampled yet")
        h, w = self.cg_hw
        return self.core.edit_mask()[:, : h * 8, : w * 8]


def guider_class(base):
    """The guider class for a ComfyUI guider ``base`` (``comfy.samplers.CFGGuider``)."""
    return type("FireRedConsistencyCFGGuider", (ConsistencyGuiderMixin, base), {})


_THRESHOLD_TIP = (
    "Automatic region: where it is cut. 0 = automatic (Otsu), else a quantile (0.8 = the 20% most-changed area)."
)


class FireRedConsistencyGuider:
    DESCRIPTION = (
        "Consistency guidance for ComfyUI's SamplerCustomAdvanced on the native FireRed / Qwen-Image-Edit model: "
        "CFG as CFGGuider, then outside the edit region the prediction is pulled toward the source latent, so what the "
        "instruction did not mention stays put. Connect a MASK (white = may change) or leave it out for an automatic region."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced's guider input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {
                        "tooltip": "The FireRed / Qwen-Image-Edit model from Load Diffusion Model (with its LoRAs, ModelSamplingAuraFlow, CFGNorm...)."
                    },
                ),
                "positive": (
                    "CONDITIONING",
                    {"tooltip": "The edit instruction, e.g. from TextEncodeQwenImageEditPlus with the picture(s)."},
                ),
                "negative": (
                    "CONDITIONING",
                    {"tooltip": "The negative conditioning (an empty prompt for the release settings)."},
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 4.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Classifier-free guidance scale, as CFGGuider (4 for the release settings, 1 with a Lightning LoRA).",
                    },
                ),
                "source": (
                    "LATENT",
                    {
                        "tooltip": "The source picture's latent (VAEEncode with the Qwen-Image VAE) at the output size: what is kept."
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "How strongly the unedited area is held to the source (1 = fully, 0 = off: exactly CFGGuider).",
                    },
                ),
                "schedule": (
                    list(SCHEDULES),
                    {
                        "default": "constant",
                        "tooltip": "Weight over the steps: constant, or the FireRed report's eta·sigma² (zero while sigma > 0.9, growing toward the end).",
                    },
                ),
                "start_step": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "First step with guidance."}),
                "end_step": (
                    "INT",
                    {
                        "default": 10000,
                        "min": 1,
                        "max": 10000,
                        "tooltip": "Guidance stops before this step (10000 = to the end).",
                    },
                ),
                "feather_px": (
                    "FLOAT",
                    {
                        "default": 8.0,
                        "min": 0.0,
                        "max": 128.0,
                        "step": 1.0,
                        "tooltip": "Softness of the region's edge, in pixels.",
                    },
                ),
                "estimate_steps": (
                    "INT",
                    {
                        "default": 3,
                        "min": 1,
                        "max": 50,
                        "tooltip": "Automatic region: how many first steps it is estimated from (no guidance on those).",
                    },
                ),
                "threshold": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": _THRESHOLD_TIP},
                ),
            },
            "optional": {
                "mask": (
                    "MASK",
                    {
                        "tooltip": "The edit region: 1 (white) = may change, 0 = keep. Any size of the same aspect; resized and feathered. Leave out for automatic."
                    },
                ),
            },
        }

    def build(self, model, positive, negative, cfg, source, strength, schedule, start_step, end_step, feather_px,
              estimate_steps, threshold, mask=None):  # fmt: skip
        if end_step <= start_step:
            raise ValueError(f"end_step ({end_step}) must be after start_step ({start_step})")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be 0 (automatic) or a quantile in (0, 1), got {threshold}")
        samples = source.get("samples") if isinstance(source, dict) else None
        if samples is None:
            raise ValueError("source must be a LATENT (connect VAEEncode of the source picture)")
        auto = CG.AutoMask(estimate_steps=estimate_steps, threshold="otsu" if threshold == 0 else float(threshold),
                           feather_px=feather_px)  # fmt: skip
        guider = guider_class(_comfy_samplers.CFGGuider)(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        guider.setup_consistency(source=samples, mask=mask, strength=strength, schedule=schedule,
                                 steps=(start_step, end_step), feather_px=feather_px, auto=auto)  # fmt: skip
        return (guider,)


NODE_CLASS_MAPPINGS = {
    "FireRedConsistencyGuider": FireRedConsistencyGuider,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FireRedConsistencyGuider": "FireRed Consistency Guider (native SamplerCustomAdvanced)",
}
if _comfy_samplers is None:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
