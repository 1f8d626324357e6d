"""The public Python API: :class:`FireRedEditor` holds a loaded model and runs ``edit(...)``.

>>> from firered_core import FireRedEditor
>>> editor = FireRedEditor.from_pretrained("models/FireRed-Image-Edit-1.1", dtype="bf16", device="cuda")
>>> result = editor.edit("cat.png", "give the cat a red hat", seed=43)
>>> result.images[0].save("out.png")

One edit is: plan sizes -> encode the instruction and the negative prompt with the pictures ->
VAE-encode the references -> draw the initial noise -> sample with (batched) true CFG -> decode.
Each stage is a function of its own module; this file only wires them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from .loading import FireRedComponents, load_components, load_pretrained, resolve_dtype
from .model import conditioning, images, latents
from .model import vae as vae_mod
from .model.conditioning import TextCond
from .model.modules import compute_dtype, module_device
from .sampling import guidance, samplers, schedules
from .sampling import noise as noise_mod
from .sampling.denoiser import Denoiser, EditCondition


@dataclass
class EditRequest:
    """The knobs of one edit (defaults: the FireRed release's 40 steps, true CFG 4, negative " ").

    schedule: "flowmatch" (release), "linear_shift" (ComfyUI AuraFlow shift, ``shift``), "lightning".
    sampler: "euler", "heun", "dpmpp_2m", "euler_sde".
    ref_mode: "own_aspect" (each reference at ~1024^2, its own aspect), "match_output", or "comfyui"
        (ComfyUI's ``TextEncodeQwenImageEditPlus``: "area" resampling of the float picture, VL sides
        rounded to whole pixels, then ComfyUI's bilinear 28-multiple VL preprocessing, references
        at multiples of 8; see :func:`images.plan_sizes`).
    ref_area / vl_area: pixel area of each reference for the VAE (1024^2) and for Qwen2.5-VL (384^2).
    denoise: keep the last ``round(denoise * steps)`` steps of the schedule (img2img-style partial
        denoising from a given starting latent; 1 = the whole schedule).
    noise_device: where the seed's initial noise is drawn, i.e. which tool's picture a seed gives:
        "cpu" (diffusers' examples), "cuda" / "cuda:N" (FireRed's inference.py), "comfyui"
        (ComfyUI's KSampler); see :mod:`firered_core.sampling.noise`.
    cfg_batched: run cond and uncond in one forward pass (texts of different lengths are padded
        and masked). ``None`` = automatic: batched on CUDA, where it saves most of the second
        pass; one after the other on the CPU, where a measured batched pass is no faster
        (the CPU is already saturated by one sequence) and holds twice the activations.
    crop_boxes: per picture (in order), ``(x0, y0, x1, y1)`` pixels to keep, or None for all of it.
    base_picture: with more than three pictures, the 1-based picture that keeps a canvas of its own
        (the scene; the output takes its aspect unless width / height are set), 0 for none. More than
        three pictures (up to 10) are stitched onto three canvases of ``ref_area`` and "Picture N" in
        the prompt is rewritten to them (:func:`firered_core.agent.stitch.stitch`).
    """

    prompt: str
    negative_prompt: str | None = " "
    steps: int = 40
    cfg: float = 4.0
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    sampler: str = "euler"
    schedule: str = "flowmatch"
    shift: float | None = None
    ref_mode: str = "own_aspect"
    ref_area: int = images.REF_AREA
    vl_area: int = images.VL_AREA
    cfg_batched: bool | None = None
    cfg_norm_rescale: bool = True
    denoise: float = 1.0
    noise_device: str = "cpu"
    crop_boxes: Sequence[tuple[int, int, int, int] | None] | None = None
    base_picture: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a whole number of at least 1, got {self.steps!r}")
        self.noise_device = noise_mod.check_noise_device(self.noise_device)
        images.check_ref_mode(self.ref_mode)
        images.check_size(self.width, self.height)


@dataclass
class EncodedEdit:
    """The once-per-edit work: text conditions, reference tokens and sizes.

    positive / negative: encoded prompts (negative is None when CFG is off).
    cond: reference tokens + ``img_shapes``; size: output ``(width, height)`` in pixels.
    stitched: the :class:`firered_core.agent.stitch.Stitched` canvases and prompt when the pictures
    were stitched or cropped, else None.
    """

    positive: TextCond
    negative: TextCond | None
    cond: EditCondition
    size: tuple[int, int]
    stitched: Any = None


@dataclass
class EditResult:
    """images: PIL results; pixels: ``[B, H, W, 3]`` float in [0, 1]; latents: normalised ``[B, 16, h, w]``."""

    images: list[Image.Image]
    pixels: torch.Tensor
    latents: torch.Tensor
    sigmas: torch.Tensor
    seed: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


class FireRedEditor:
    """A loaded FireRed-Image-Edit model (MM-DiT, VAE, Qwen2.5-VL and its processor).

    Speed and memory settings (:meth:`configure`, or ``speed=`` / ``memory=`` when loading):
    :class:`firered_core.runtime.speed.SpeedOptions`, :class:`firered_core.runtime.memory.MemoryOptions`.
    Without them every part stays where it was loaded and nothing changes.
    """

    def __init__(self, components: FireRedComponents, *, device=None):
        self.c = components
        self.target_device = torch.device(device) if device is not None else module_device(components.transformer)
        self.speed = None  # SpeedOptions, set by configure()
        self.memory = None  # MemoryManager, set by configure()
        self.last_cache_stats = None  # StepCacheStats of the last sampling run with caching on

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype="bf16", speed=None, memory=None) -> "FireRedEditor":
        load_device = "cpu" if memory is not None else device
        editor = cls(load_pretrained(path, device=load_device, dtype=resolve_dtype(dtype)), device=device)
        if speed is not None or memory is not None:
            editor.configure(speed=speed, memory=memory)
        return editor

    @classmethod
    def from_files(cls, model=None, *, device="cpu", dtype="bf16", speed=None, memory=None, **files) -> "FireRedEditor":
        """Load from the files users hold: any of ``transformer=``, ``text_encoder=``, ``vae=``,
        ``tokenizer=`` (paths; ComfyUI single files, fp8, GGUF, diffusers folders), ``loras=``
        (``[(path, strength), ...]``) and ``weight_dtype=``, with the rest from the release folder
        ``model`` (see :func:`firered_core.loading.load_components`). ``weight_dtype="int8"`` or
        ``"fp8_scaled"`` quantizes the MM-DiT's block linears after loading (see
        :mod:`firered_core.runtime.precision`). With ``memory=`` the parts are loaded on the CPU and then
        placed by the memory plan."""
        from .runtime import precision

        quant = files.get("weight_dtype") if files.get("weight_dtype") in precision.WEIGHT_MODES else None
        if quant:
            files["weight_dtype"] = "auto"
        load_device = "cpu" if (memory is not None or quant) else device
        comps = load_components(model, device=load_device, dtype=resolve_dtype(dtype), **files)
        if quant:
            precision.quantize_weights(comps.transformer, quant)
            if memory is None:
                for m in (comps.transformer, comps.text_encoder, comps.vae):
                    m.to(device)
        editor = cls(comps, device=device)
        if speed is not None or memory is not None:
            editor.configure(speed=speed, memory=memory)
        return editor

    # -- speed and memory ---------------------------------------------------------------------

    def configure(self, speed=None, memory=None, *, width: int = 1024, height: int = 1024, refs: int = 1) -> dict:
        """Apply :class:`~firered_core.runtime.speed.SpeedOptions` and / or
        :class:`~firered_core.runtime.memory.MemoryOptions` (``None`` leaves that part as it is).
        The memory plan is chosen for a ``width`` x ``height`` edit with ``refs`` pictures (the
        free memory of the device, or ``memory.budget_gb``). Returns what is in effect:
        ``{"attention", "memory_plan", ...}``."""
        from .runtime import blockswap
        from .runtime import memory as mem
        from .runtime.speed import apply_speed

        info: dict[str, Any] = {}
        if speed is not None:
            info.update(apply_speed(self.c.transformer, speed))
            self.speed = speed
        if memory is not None:
            if self.memory is not None:
                self.memory.remove()
                self.memory = None
            device = self.target_device
            free = int(memory.budget_gb * mem.GB) if memory.budget_gb else mem.free_device_bytes(device)
            if free is not None and not memory.budget_gb:  # our own parts already there count as free
                free += sum(blockswap.bytes_on(m, device) for m in (self.c.transformer, self.c.text_encoder, self.c.vae))
            sizes = mem.ModelSizes.of(self.c.transformer, self.c.text_encoder, self.c.vae)
            if free is None and memory.plan == "auto":  # the CPU: nothing to plan
                plan = mem.MemoryPlan("resident", vae_tiling=bool(memory.vae_tiling), reason="auto: CPU")
            else:
                plan = mem.plan_memory(free or 1 << 62, sizes, width=width, height=height, refs=refs, plan=memory.plan,
                                       blocks_resident=memory.blocks_resident, vae_tiling=memory.vae_tiling,
                                       prefetch=memory.prefetch)
            self.memory = mem.MemoryManager(self.c, plan, device, memory)
            self.memory.apply()
            info["memory_plan"] = plan.describe()
        return info

    def offload(self) -> None:
        """Move every part to the offload device (the CPU), freeing the GPU, e.g. when a ComfyUI node
        finishes; the next edit (or :meth:`to_device`) puts the memory plan back in place."""
        if self.memory is None:
            from .runtime import memory as mem

            self.memory = mem.MemoryManager(self.c, mem.MemoryPlan("resident", reason="offload()"), self.target_device)
        self.memory.offload()

    def to_device(self) -> None:
        """Put the parts back on the device as the memory plan says (all of them without a plan)."""
        if self.memory is not None:
            self.memory.to_device()
        else:
            for m in (self.c.transformer, self.c.text_encoder, self.c.vae):
                m.to(self.target_device)

    def _stage(self, part: str):
        return self.memory.stage(part) if self.memory is not None else contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        if self.memory is not None:
            return self.memory.device
        return module_device(self.c.transformer)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.c.transformer)

    # -- stages -------------------------------------------------------------------------------

    def encode(self, pictures: Any, req: EditRequest) -> EncodedEdit:
        """Everything done once per edit, before sampling."""
        conditioning.check_instruction(req.prompt, "prompt")
        pictures, req, stitched = self.stitch(pictures, req)
        pils = images.to_pil_list(pictures)
        (w, h), vl_sizes, ref_sizes = images.plan_sizes(
            pils, req.width, req.height, ref_mode=req.ref_mode, vl_area=req.vl_area, ref_area=req.ref_area
        )
        if req.ref_mode == "comfyui":
            # ComfyUI's TextEncodeQwenImageEditPlus: "area" on the float picture for both copies
            units = images.to_unit_list(pictures)
            vl = [conditioning.vl_pixels_comfyui(images.area_resize(u, *s), self.c.processor) for u, s in zip(units, vl_sizes)]
            ref_pixels = [images.area_resize(u, rw, rh) * 2.0 - 1.0 for u, (rw, rh) in zip(units, ref_sizes)]
        else:
            vl = [images.resize(p, *s) for p, s in zip(pils, vl_sizes)]
            ref_pixels = [images.pil_to_tensor(images.resize(p, rw, rh)) for p, (rw, rh) in zip(pils, ref_sizes)]
        te = self.c.text_encoder
        te_dtype = compute_dtype(te)
        with self._stage("text_encoder"):
            positive = conditioning.encode_prompt(te, self.c.processor, req.prompt, vl, dtype=te_dtype)
            negative = None
            if req.cfg > 1.0 and req.negative_prompt is not None:
                negative = conditioning.encode_prompt(te, self.c.processor, req.negative_prompt, vl, dtype=te_dtype)
        refs = []
        with self._stage("vae"):
            for px in ref_pixels:
                z = vae_mod.encode(self.c.vae, px)
                # a multiple-of-8 reference (comfyui) has an odd latent side: wrapped round to the
                # 2x2 patch as ComfyUI's pad_to_patch_size does
                z = latents.pad_to_patches(z)
                refs.append(latents.pack(z))
        cond = EditCondition(
            ref_tokens=torch.cat(refs, dim=1) if refs else None,
            img_shapes=[latents.token_grid(h, w)] + [latents.token_grid(rh, rw) for rw, rh in ref_sizes],
            rope="comfyui" if req.ref_mode == "comfyui" else "diffusers",
            cfg_norm="comfyui" if req.ref_mode == "comfyui" else "flow",
        )
        return EncodedEdit(positive, negative, cond, (w, h), stitched)

    @staticmethod
    def stitch(pictures: Any, req: EditRequest) -> tuple[Any, EditRequest, Any]:
        """More than three pictures (up to 10), or crop boxes: the 1-3 canvases, the request with the
        prompt renumbered to them (and the base picture's output size), and the ``Stitched`` record
        (:mod:`firered_core.agent.stitch`). Anything else passes through with None."""
        listed = images.picture_list(pictures)
        if len(listed) <= images.MAX_PICTURES and not req.crop_boxes:
            return pictures, req, None
        from .agent import stitch

        st = stitch.stitch(listed, req.prompt, boxes=req.crop_boxes, base=req.base_picture, canvas_area=req.ref_area)
        changes: dict[str, Any] = {"prompt": st.prompt}
        if st.output_aspect is not None and req.width is None and req.height is None:
            changes["width"], changes["height"] = stitch.output_size(st.output_aspect)
        return st.pictures, replace(req, **changes), st

    def sigmas(self, req: EditRequest, size: tuple[int, int]) -> torch.Tensor:
        w, h = size
        opts: dict[str, Any] = {}
        if req.schedule == "flowmatch":
            opts = {"image_seq_len": (h // 16) * (w // 16), "config": self.c.scheduler_config}
        elif req.schedule == "linear_shift" and req.shift is not None:
            opts = {"shift": req.shift}
        sig = schedules.get_schedule(req.schedule)(req.steps, **opts)
        return schedules.truncate_for_denoise(sig, req.denoise) if req.denoise < 1.0 else sig

    def initial_noise(
        self, size: tuple[int, int], generator: torch.Generator | None, dtype: torch.dtype, noise_device: str = "cpu"
    ) -> torch.Tensor:
        """Packed noise of one picture drawn as the tool ``noise_device`` names draws it (see
        :mod:`firered_core.sampling.noise`; ``cpu``: exactly as the reference pipeline), so a seed gives the
        same picture in both."""
        return noise_mod.draw(generator, size, noise_device=noise_device, dtype=dtype, device=self.device)[0]

    def sample(
        self,
        enc: EncodedEdit,
        req: EditRequest,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        callback: Callable[[samplers.StepInfo], None] | None = None,
        guide: Callable[..., Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the sampler; returns normalised latents ``[1, 16, h, w]`` and the sigmas used.

        ``guide(model_fn, enc, sigmas) -> model_fn``, when given, wraps the (CFG-guided) model
        function, e.g. :class:`firered_core.editing.consistency_guidance.GuidanceHook`.
        """
        w, h = enc.size
        sig = self.sigmas(req, enc.size)
        te_dtype = enc.positive.embeds.dtype
        x = noise if noise is not None else self.initial_noise(enc.size, generator, te_dtype, req.noise_device)
        with self._stage("transformer"):
            cache = self.speed.step_cache(self.c.transformer) if self.speed is not None else None
            den = Denoiser(self.c.transformer, enc.cond, step_cache=cache)
            batched = req.cfg_batched if req.cfg_batched is not None else self.device.type == "cuda"
            if batched and self.speed is not None:
                from .runtime.attention import current_attention, supports_mask

                batched = supports_mask(current_attention(self.c.transformer))  # flash / sage take no mask
            model_fn = guidance.true_cfg(
                den, enc.positive, enc.negative, req.cfg, norm_rescale=req.cfg_norm_rescale, batched=batched
            )
            if guide is not None:
                model_fn = guide(model_fn, enc, sig)
            with cache.installed() if cache is not None else contextlib.nullcontext():
                x = samplers.get_sampler(req.sampler)(model_fn, x, sig, callback=callback, generator=generator)
            self.last_cache_stats = cache.stats if cache is not None else None
        return latents.unpack(x, h // 8, w // 8), sig

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> ``[B, H, W, 3]`` float pixels in [0, 1]."""
        with self._stage("vae"):
            return images.tensor_to_unit(vae_mod.decode(self.c.vae, z))

    # -- the one call -------------------------------------------------------------------------

    def edit(
        self,
        pictures: Any = None,
        prompt: str | None = None,
        *,
        callback: Callable[[samplers.StepInfo], None] | None = None,
        generator: torch.Generator | None = None,
        guide: Callable[..., Any] | None = None,
        **options: Any,
    ) -> EditResult:
        """Edit 1-10 pictures (PIL, paths or tensors) following ``prompt``; no pictures = text-to-image.
        More than three are stitched onto three canvases (see :meth:`stitch`; ``info["stitch"]``
        says how).

        ``options`` are the fields of :class:`EditRequest` (steps, cfg, seed, width, height, sampler,
        schedule, shift, negative_prompt, ref_mode, cfg_batched, noise_device). ``seed`` seeds the
        generator ``noise_device`` names (default a CPU generator, like the diffusers examples);
        pass ``generator`` to control it yourself.
        ``guide``: an optional model-function wrapper, see :meth:`sample`.
        """
        if prompt is None:
            raise ValueError("prompt is required: the edit instruction, e.g. 'make the sky pink'")
        req = EditRequest(prompt=prompt, **options)
        if generator is None and req.seed is not None:
            generator = noise_mod.make_generator(req.seed, req.noise_device)
        with torch.inference_mode():
            enc = self.encode(pictures, req)
            z, sig = self.sample(enc, req, generator=generator, callback=callback, guide=guide)
            pixels = self.decode(z)
        info: dict[str, Any] = {"size": enc.size}
        if enc.stitched is not None:
            info["stitch"] = enc.stitched.describe()
        if self.memory is not None:
            info["memory_plan"] = self.memory.plan.describe()
        if self.last_cache_stats is not None:
            info["cache"] = self.last_cache_stats.as_dict()
        return EditResult(images.unit_to_pil(pixels), pixels, z, sig, req.seed, info)
