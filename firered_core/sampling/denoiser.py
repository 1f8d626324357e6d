"""The MM-DiT as a velocity function: ``model_fn(x, sigma) -> v`` over packed target tokens.

:class:`Denoiser` hides everything model-specific from the samplers: the reference tokens that
are appended to the target sequence, the ``img_shapes`` that place each image on its own RoPE
frame, the timestep convention (``1000 sigma``, passed to the transformer as ``/ 1000``), slicing
the reference part off the output, and the compute dtype. Work that does not change between steps
(the reference tokens in the compute dtype, the batched text) is prepared once per edit.

:meth:`Denoiser.predict` evaluates several text conditions on the same latent in one forward
pass (cond and uncond for CFG): texts of different lengths are zero-padded and masked, which the
transformer's joint attention honours exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..model.conditioning import TextCond
from ..model.modules import compute_dtype, module_device
from ..model.rope import ComfyUIRope, comfyui_positions
from . import flow


@dataclass
class EditCondition:
    """Everything the MM-DiT is conditioned on, except the text.

    ref_tokens: ``[1, N_ref, 64]`` packed, normalised VAE latents of the 0-3 input pictures,
        concatenated in picture order (``None`` for text-to-image).
    img_shapes: ``[(1, rows, cols)]`` token grids, the target's first, then one per reference.
    rope: ``"diffusers"`` (the reference's RoPE positions) or ``"comfyui"`` (ComfyUI's Qwen-Image
        model's, :mod:`firered_core.model.rope`; what ``ref_mode="comfyui"`` encodes for).
    cfg_norm: ``"flow"`` (the reference's CFG rescale) or ``"comfyui"`` (ComfyUI's ``CFGNorm``,
        :func:`firered_core.sampling.guidance.cfg_combine_comfyui`; also set by ``ref_mode="comfyui"``).
    """

    ref_tokens: torch.Tensor | None
    img_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    rope: str = "diffusers"
    cfg_norm: str = "flow"

    @property
    def target_tokens(self) -> int:
        _, r, c = self.img_shapes[0]
        return r * c


def batch_texts(conds: Sequence[TextCond]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack text conditions into ``[B, L_max, D]`` embeddings and a ``[B, L_max]`` mask.

    The mask is ``None`` when no padding was needed and no condition carried one (the transformer
    then takes its unmasked attention path, as the reference pipeline does for a single prompt).
    """
    lmax = max(c.length for c in conds)
    needs_mask = any(c.length != lmax or c.mask is not None for c in conds)
    embeds, masks = [], []
    for c in conds:
        e = c.embeds
        pad = lmax - e.shape[1]
        if pad:
            e = torch.cat([e, e.new_zeros(e.shape[0], pad, e.shape[2])], dim=1)
        embeds.append(e)
        if needs_mask:
            m = c.mask if c.mask is not None else torch.ones(e.shape[0], c.length, dtype=torch.long, device=e.device)
            if pad:
                m = torch.cat([m, m.new_zeros(m.shape[0], pad)], dim=1)
            masks.append(m)
    return torch.cat(embeds, 0), (torch.cat(masks, 0) if needs_mask else None)


def transformer_velocity(transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                         mask: torch.Tensor | None, img_shapes: list[tuple[int, int, int]], dtype: torch.dtype,
                         refs: torch.Tensor | None = None) -> torch.Tensor:
    """The MM-DiT's velocity for the target tokens ``x`` ``[B, N, 64]`` at ``sigma`` ``[B]``, one
    condition per row: the reference tokens ``refs`` ``[B, M, 64]`` appended after the target's,
    the timestep as the reference pipeline passes it (``1000 sigma`` in ``dtype``, then ``/ 1000``),
    ``img_shapes`` one row's token grids (``sigma`` follows ``x`` to its device). The one forward
    call inference and training share."""
    n = x.shape[1]
    hidden = x.to(dtype) if refs is None else torch.cat([x.to(dtype), refs.to(dtype)], dim=1)
    timestep = flow.sigma_to_timestep(sigma.to(x.device, torch.float32).reshape(-1)).to(dtype) / flow.NUM_TRAIN_TIMESTEPS
    out = transformer(hidden_states=hidden, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                      timestep=timestep, img_shapes=[img_shapes] * x.shape[0], return_dict=False)[0]
    return out[:, :n]


class Denoiser:
    """Wraps a ``QwenImageTransformer2DModel`` and one :class:`EditCondition`.

    ``predict(x, sigma, texts)`` -> one velocity per text, each ``[B, N, 64]`` in the compute dtype.
    ``model_fn(text)`` -> the plain ``(x, sigma) -> v`` function for a single text.
    ``step_cache``: an optional :class:`firered_core.runtime.step_cache.StepCache` (installed by the
    caller); each forward runs in its own stream, keyed by the texts and the batch size.
    """

    def __init__(self, transformer: torch.nn.Module, cond: EditCondition, *, dtype: torch.dtype | None = None,
                 step_cache: Any = None):
        self.transformer = transformer
        self.cond = cond
        self.step_cache = step_cache
        self.device = module_device(transformer)
        self.dtype = dtype or compute_dtype(transformer)
        self._refs = cond.ref_tokens.to(self.device, self.dtype) if cond.ref_tokens is not None else None
        self._text_cache: tuple | None = None
        self._positions: ComfyUIRope | None = None  # ComfyUI's RoPE positions, made once (cond.rope)
        self.forward_calls = 0

    def _texts(self, texts: Sequence[TextCond], reps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batched text for these conditions, built once per edit (kept while the same
        condition objects are asked for again, i.e. for every step of one sampling run)."""
        cached = self._text_cache
        if cached is not None and cached[1] == reps and len(cached[0]) == len(texts) and all(
            a is b for a, b in zip(cached[0], texts)
        ):
            return cached[2]
        embeds, mask = batch_texts([t.to(self.device, self.dtype) for t in texts])
        if reps > 1:
            embeds = embeds.repeat_interleave(reps, 0)
            mask = mask.repeat_interleave(reps, 0) if mask is not None else None
        self._text_cache = (tuple(texts), reps, (embeds, mask))
        return embeds, mask

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, texts: Sequence[TextCond]) -> list[torch.Tensor]:
        """Velocities for ``x`` ``[B, N, 64]`` at ``sigma`` ``[B]`` under each text, in one forward pass."""
        b, n = x.shape[:2]
        k = len(texts)
        if n != self.cond.target_tokens:
            raise ValueError(f"latent has {n} tokens but the condition was prepared for {self.cond.target_tokens}")
        embeds, mask = self._texts(texts, b)
        xk = x.to(self.dtype)
        if k > 1:
            xk = xk.repeat(k, 1, 1)
        refs = None if self._refs is None else self._refs.expand(xk.shape[0], -1, -1)
        sig = sigma.to(torch.float32).reshape(-1).expand(b)
        # texts are repeated text-major ([t0] * B + [t1] * B ...) and the latent batch k times,
        # so row i pairs text i // B with latent i % B.
        stream = (
            self.step_cache.stream((tuple(id(t) for t in texts), b), float(sig[0]))
            if self.step_cache is not None
            else contextlib.nullcontext()
        )
        positions = (comfyui_positions(self.transformer, self._positions) if self.cond.rope == "comfyui"
                     else contextlib.nullcontext(self._positions))
        with stream, positions as self._positions:
            out = transformer_velocity(self.transformer, xk, sig.repeat(k), embeds, mask, self.cond.img_shapes,
                                       self.dtype, refs)
        self.forward_calls += 1
        return list(out.chunk(k, dim=0)) if k > 1 else [out]

    def model_fn(self, text: TextCond):
        def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return self.predict(x, sigma, [text])[0]

        return fn
