"""The model as separate parts, for graphs that load and use each part on its own (ComfyUI nodes).

:class:`FireRedEditor` holds a whole model. A node graph instead loads the MM-DiT, the text encoder
and the VAE from three files, stacks LoRAs on the MM-DiT, encodes once and samples several times.
This module gives those steps as functions over three small typed parts, each a thin record around
the loaded module:

* :class:`DiT` -- the MM-DiT, its schedule settings and the LoRA stack to apply when it runs;
* :class:`TextEncoder` -- Qwen2.5-VL and its processor;
* :class:`VAE` -- the Qwen-Image VAE;
* :class:`EditCond` -- an encoded edit (instruction, negative prompt, reference tokens) plus what
  the sampler needs to hand back ComfyUI latents and to keep the source (the pictures and the
  VAE's latent statistics).

Latents leave and enter as *raw* VAE latents ``[B, 16, 1, h, w]`` (ComfyUI's ``LATENT`` layout for
Qwen-Image, so ComfyUI's own ``VAEDecode`` / ``VAEEncode`` interoperate); inside, the sampler works
on normalised latents as everywhere else in the core (the conversions, :func:`to_raw_latent` /
:func:`from_raw_latent`, are :mod:`firered_core.model.latents`'; the MM-DiT's placement by its memory
options is :mod:`firered_core.runtime.placement`; attaching a LoRA stack is
:func:`firered_core.formats.lora.sync_loras`).

Parts are never modified by the functions that take them: adding a LoRA returns a new :class:`DiT`
sharing the same module, and the module's attached LoRAs are brought in line with the part that is
running (:func:`sync_loras`) just before it runs. That is what a cached node graph needs, where one
loaded MM-DiT may feed a branch with a LoRA and a branch without.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .loading import FireRedComponents, ModelFolderError, check_model_folder, load_scheduler_config, resolve_dtype
from .model import images, latents
from .model import vae as vae_mod
from .model.latents import from_raw_latent, to_raw_latent
from .model.modules import module_device
from .pipeline import EditRequest, EncodedEdit, FireRedEditor
from .sampling import noise as noise_mod
from .sampling import samplers
from .sampling.schedules import FlowMatchConfig


@dataclass(frozen=True)
class DiT:
    """A loaded MM-DiT (``QwenImageTransformer2DModel``) with the LoRAs to apply when it runs.

    loras: ``((path, strength), ...)`` in stacking order; scheduler_config: the release's sigma
    schedule settings; source: the file it came from; keep_loaded: a host application should leave
    it on the compute device after use instead of offloading it (same field on every part);
    speed: :class:`~firered_core.runtime.speed.SpeedOptions` for its runs (attention, step cache, compile);
    memory: :class:`~firered_core.runtime.memory.MemoryOptions` for its placement (see :func:`placed`).
    """

    transformer: torch.nn.Module
    scheduler_config: FlowMatchConfig = field(default_factory=FlowMatchConfig)
    source: str = ""
    loras: tuple[tuple[str, float], ...] = ()
    keep_loaded: bool = False
    speed: Any = None
    memory: Any = None

    def with_lora(self, path, strength: float = 1.0) -> "DiT":
        """A new part with one more LoRA on the stack (the module is shared, not copied)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"LoRA file {str(p)!r} does not exist")
        return replace(self, loras=self.loras + ((str(p), float(strength)),))


@dataclass(frozen=True)
class TextEncoder:
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) and its processor (tokenizer + image settings)."""

    model: torch.nn.Module
    processor: Any
    source: str = ""
    keep_loaded: bool = False


@dataclass(frozen=True)
class VAE:
    """The Qwen-Image VAE (``AutoencoderKLQwenImage``)."""

    model: torch.nn.Module
    source: str = ""
    keep_loaded: bool = False


@dataclass
class EditCond:
    """An encoded edit, ready to sample.

    enc: the text conditions, reference tokens and planned output size (:class:`EncodedEdit`);
    request: the encoding settings used (prompt, negative prompt, reference sizing);
    pictures: the input pictures ``[1, H, W, 3]`` in 0..1, in order (empty for text-to-image);
    latent_mean / latent_std: the VAE's 16 per-channel statistics, to return raw latents;
    vae: the VAE it was encoded with (consistency guidance encodes the source with it).
    """

    enc: EncodedEdit
    request: EditRequest
    pictures: list[torch.Tensor]
    latent_mean: list[float]
    latent_std: list[float]
    vae: VAE | None = None


@dataclass(frozen=True)
class GuidanceSettings:
    """Consistency guidance asked for by a graph (see :mod:`firered_core.editing.consistency_guidance`).

    strength: weight of the pull toward the source outside the edit region (0 = off, bit for bit);
    schedule: "constant" or "sigma2" (the report's eta sigma^2 below sigma 0.9);
    steps: ``(start, end)`` step window, guidance on ``start <= i < end`` (None = every step);
    measures: some of "region" (latent, cheap) and "region_pixel" (through the VAE decoder);
    mask: the edit region as a ``MASK`` ``[B or 1, H, W]`` (1 = may change, any size), or None with
    auto_mask: estimate it during sampling from where the model departs from the source
    (estimate_steps steps, ``threshold`` "otsu" or a quantile, ``smooth`` in latent cells);
    feather_px: seam of the user mask, in pixels; source: which input picture to keep (0-based).
    """

    strength: float = 1.0
    schedule: str = "constant"
    steps: tuple[int, int] | None = None
    measures: tuple[str, ...] = ("region",)
    mask: torch.Tensor | None = None
    auto_mask: bool = False
    estimate_steps: int = 3
    threshold: str | float = "otsu"
    smooth: float = 1.0
    feather_px: float = 8.0
    source: int = 0


@dataclass
class Sampled:
    """samples: raw latents ``[B, 16, 1, h, w]`` (ComfyUI ``LATENT`` layout), float32 on the CPU;
    edit_mask: the edit region consistency guidance used (``MASK`` ``[B, H, W]``), None without it."""

    samples: torch.Tensor
    edit_mask: torch.Tensor | None = None


@dataclass
class Progress:
    """What a sampling callback receives after each step.

    step: steps done so far over the whole batch; total: steps of the whole batch;
    x0: the current clean estimate as a normalised latent ``[1, 16, h, w]`` (for previews).
    """

    step: int
    total: int
    x0: torch.Tensor


# -- fingerprints and loading -----------------------------------------------------------------------


def file_fingerprint(path) -> str:
    """A cheap identity for a model file or folder: resolved path, size and modification time
    (hashing a 40 GB file on every queue would cost minutes). For a folder, every file under it."""
    p = Path(path).resolve()
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    parts = [str(p)] + [f"{f.relative_to(p) if f != p else ''}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_dit(path, *, device="cpu", dtype="bf16", weight_dtype: str = "auto", scheduler_from=None) -> DiT:
    """Load the MM-DiT from a ``diffusion_models/`` file (bf16 / fp16 / fp8 / scaled fp8 / GGUF) or a
    diffusers folder. ``weight_dtype``: see :func:`firered_core.formats.transformer_files.load_transformer`,
    plus ``"fp8_scaled"`` / ``"int8"`` (:mod:`firered_core.runtime.precision`).
    ``scheduler_from``: a release folder whose ``scheduler/`` settings to use (default: the release's)."""
    from .formats.transformer_files import load_transformer
    from .runtime import precision

    quant = weight_dtype if weight_dtype in precision.WEIGHT_MODES else None
    tr = load_transformer(path, dtype=resolve_dtype(dtype), device=device, weight_dtype="auto" if quant else weight_dtype)
    if quant:  # int8 / scaled fp8 with per-channel scales, made from the loaded weights
        precision.quantize_weights(tr, quant)
    tr.eval().requires_grad_(False)
    sched = load_scheduler_config(Path(scheduler_from)) if scheduler_from is not None else FlowMatchConfig()
    return DiT(tr, sched, str(path))


def load_text_encoder(path, *, tokenizer=None, comfyui_root=None, device="cpu", dtype="bf16") -> TextEncoder:
    """Load Qwen2.5-VL from a ``text_encoders/`` file or a folder, with its processor: from
    ``tokenizer`` (a folder), else a tokenizer folder beside the file named like it
    (``<stem>_tokenizer/``), else the one a ComfyUI install carries."""
    from .formats.text_encoder_files import find_processor
    from .formats.text_encoder_files import load_text_encoder as _load_te

    p = Path(path)
    model_dir = p if p.is_dir() else None
    processor = find_processor(tokenizer_dir=tokenizer, model_dir=model_dir, comfyui_root=comfyui_root, text_encoder_file=p)
    te = _load_te(p, dtype=resolve_dtype(dtype), device=device, processor=processor)
    te.eval().requires_grad_(False)
    return TextEncoder(te, processor, str(p))


def load_vae(path, *, device="cpu", dtype="bf16", tiling: bool = False) -> VAE:
    """Load the Qwen-Image VAE from a ``vae/`` file (ComfyUI or diffusers key names) or a folder;
    ``tiling``: encode / decode in overlapping tiles (diffusers' VAE tiling) for large pictures."""
    from .formats.vae_files import load_vae as _load_vae

    v = _load_vae(path, dtype=resolve_dtype(dtype), device=device)
    v.eval().requires_grad_(False)
    if tiling:
        v.enable_tiling()
    return VAE(v, str(path))


def load_release(folder, *, device="cpu", dtype="bf16", weight_dtype: str = "auto") -> tuple[DiT, TextEncoder, VAE]:
    """Load all three parts from a diffusers release folder (``transformer/``, ``text_encoder/``, ...)."""
    root = check_model_folder(folder)
    dit = load_dit(root / "transformer", device=device, dtype=dtype, weight_dtype=weight_dtype, scheduler_from=root)
    te = load_text_encoder(root / "text_encoder", tokenizer=_release_tokenizer(root), device=device, dtype=dtype)
    return dit, te, load_vae(root / "vae", device=device, dtype=dtype)


def _release_tokenizer(root: Path) -> Path:
    for sub in ("processor", "tokenizer"):
        if (root / sub).is_dir():
            return root / sub
    raise ModelFolderError(f"model folder {str(root)!r} has neither processor/ nor tokenizer/")


def sync_loras(dit: DiT) -> None:
    """Attach to ``dit.transformer`` exactly the LoRAs of ``dit.loras`` (re-reading files only when
    the stack changed; a strength change alone is applied in place)."""
    from .formats.lora import sync_loras as sync

    sync(dit.transformer, dit.loras)


# -- encode, sample, decode -------------------------------------------------------------------------


def encode_edit(te: TextEncoder, vae: VAE, pictures: Sequence[Any], req: EditRequest) -> EditCond:
    """Encode the instruction (and the negative prompt when ``req.cfg > 1``) with 0-3 pictures, and
    VAE-encode the pictures as reference tokens. ``pictures``: ComfyUI ``IMAGE`` tensors, PIL images
    or paths; an ``IMAGE`` batch of several pictures counts as several pictures."""
    pics = _split_pictures(pictures)
    if len(pics) > 3:
        raise ValueError(f"FireRed-Image-Edit reads 1-3 input pictures; {len(pics)} were given")
    comps = FireRedComponents(None, vae.model, te.model, te.processor, FlowMatchConfig(), "")
    with torch.inference_mode():
        enc = FireRedEditor(comps, device=module_device(te.model)).encode(pics, req)
    mean, std = vae_mod.latent_stats(vae.model)
    units = [images.pil_to_tensor(images.to_pil(p)).add(1).div(2).permute(0, 2, 3, 1).cpu() for p in pics]
    return EditCond(enc, req, units, mean, std, vae)


def _split_pictures(pictures) -> list[Any]:
    if pictures is None:
        return []
    if isinstance(pictures, torch.Tensor) or not isinstance(pictures, (list, tuple)):
        pictures = [pictures]
    out: list[Any] = []
    for i, p in enumerate(pictures):
        if p is None:
            continue
        if isinstance(p, torch.Tensor) and p.dim() == 4:
            if p.shape[-1] not in (3, 4):
                raise ValueError(f"picture {i + 1}: expected an IMAGE [B, H, W, 3], got shape {tuple(p.shape)}")
            out.extend(p[j : j + 1, ..., :3] for j in range(p.shape[0]))
        else:
            out.append(p)
    return out


def with_output_size(enc: EncodedEdit, size: tuple[int, int]) -> EncodedEdit:
    """The same encoded edit, sampled at another output ``(width, height)`` (multiples of 16)."""
    w, h = size
    images.check_size(w, h)
    cond = replace(enc.cond, img_shapes=[latents.token_grid(h, w)] + list(enc.cond.img_shapes[1:]))
    return replace(enc, cond=cond, size=(w, h))


def sample_edit(
    dit: DiT,
    cond: EditCond,
    *,
    seed: int = 0,
    steps: int = 40,
    cfg: float = 4.0,
    sampler: str = "euler",
    schedule: str = "flowmatch",
    shift: float | None = None,
    size: tuple[int, int] | None = None,
    latent: torch.Tensor | None = None,
    denoise: float = 1.0,
    batch_size: int = 1,
    callback: Callable[[Progress], None] | None = None,
    guidance: Any = None,
    noise_device: str = "cpu",
) -> Sampled:
    """Sample ``batch_size`` edits (or one per picture of ``latent``).

    size: output ``(width, height)``; default: the encoder's plan, or the size of ``latent``.
    latent: a raw starting latent (e.g. ComfyUI ``VAEEncode``); with ``denoise < 1`` sampling starts
        from it noised to the first kept sigma (the last ``round(denoise * steps)`` steps of the
        schedule); with ``denoise = 1`` only its size and batch are used.
    seed, noise_device: one generator seeded once draws every picture's noise, on the CPU as the
        diffusers examples (``cpu``), on a GPU as FireRed's inference.py (``cuda``), or as ComfyUI's
        KSampler (``comfyui``: the whole batch in one float32 draw); see :mod:`firered_core.sampling.noise`.
        Picture 0 of a batch equals the single edit with that seed.
    callback(Progress) after every step; raise in it to cancel.
    guidance: consistency guidance toward the input picture ``guidance.source`` (needs pictures), as
        :class:`GuidanceSettings`, or a ready hook from :func:`guidance_hook` (to read its mask after).
    """
    hook = guidance if guidance is None or hasattr(guidance, "guider") else guidance_hook(guidance, cond)
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if cfg > 1.0 and cond.enc.negative is None:
        raise ValueError(
            f"cfg {cfg} needs a negative prompt, but the edit was encoded without one (encoded for cfg 1): "
            "re-encode with a negative prompt, or set cfg to 1"
        )
    if latent is not None:
        start = from_raw_latent(latent, cond.latent_mean, cond.latent_std, crop_odd=True)
        lat_size = (start.shape[-1] * latents.VAE_SCALE, start.shape[-2] * latents.VAE_SCALE)
        if size is not None and tuple(size) != lat_size:
            raise ValueError(f"the given size {tuple(size)} differs from the input latent's picture size {lat_size}")
        size, batch = lat_size, start.shape[0]
    else:
        start, batch = None, int(batch_size)
        if denoise < 1.0:
            raise ValueError("denoise < 1 needs an input latent to start from (connect a LATENT)")
    if batch < 1:
        raise ValueError(f"batch size must be at least 1, got {batch}")
    enc = with_output_size(cond.enc, size) if size is not None and tuple(size) != cond.enc.size else cond.enc
    req = replace(
        cond.request, steps=int(steps), cfg=float(cfg), sampler=sampler, schedule=schedule, shift=shift, seed=seed, denoise=float(denoise),
        noise_device=noise_device,
    )
    w, h = enc.size
    editor = FireRedEditor(
        FireRedComponents(dit.transformer, None, None, None, dit.scheduler_config, dit.source), device=module_device(dit.transformer)
    )
    from .runtime.speed import SpeedOptions, apply_speed

    # the module may be shared with a branch that had other settings: always set this part's own
    editor.speed = dit.speed or SpeedOptions()
    apply_speed(dit.transformer, editor.speed)
    sig = editor.sigmas(req, enc.size)
    per = len(sig) - 1
    sync_loras(dit)
    gen = noise_mod.make_generator(int(seed), req.noise_device)
    dtype = enc.positive.embeds.dtype
    outs = []
    with torch.inference_mode():
        # ComfyUI draws the whole batch at once; the others one picture after the other, between
        # the pictures' sampling (so an SDE sampler's draws sit in between, as before)
        whole = None
        if req.noise_device == "comfyui":
            whole = noise_mod.draw(gen, enc.size, batch=batch, noise_device="comfyui", dtype=dtype, device=editor.device)
        for b in range(batch):
            noise = whole[b] if whole is not None else editor.initial_noise(enc.size, gen, dtype, req.noise_device)
            if start is not None and denoise < 1.0:
                s0 = float(sig[0])
                x0 = latents.pack(start[b : b + 1].to(noise.device, noise.dtype))
                noise = s0 * noise + (1.0 - s0) * x0
            step_cb = None
            if callback is not None:

                def step_cb(info: samplers.StepInfo, b=b):
                    callback(Progress(b * per + info.i + 1, batch * per, latents.unpack(info.x0, h // 8, w // 8)))

            z, _ = editor.sample(enc, req, generator=gen, noise=noise, callback=step_cb, guide=hook)
            outs.append(z)
    z = torch.cat(outs)
    mask = None
    if hook is not None and hook.guider is not None:
        mask = hook.guider.edit_mask(tuple(d * latents.VAE_SCALE for d in z.shape[-2:])).float().cpu()
    return Sampled(to_raw_latent(z, cond.latent_mean, cond.latent_std), mask)


def guidance_hook(settings: GuidanceSettings, cond: EditCond):
    """The :class:`~firered_core.editing.consistency_guidance.GuidanceHook` for ``settings`` on this edit."""
    from .editing.consistency_guidance import AutoMask, GuidanceHook

    if not cond.pictures:
        raise ValueError("consistency guidance keeps an input picture, but this edit has none (text-to-image)")
    if not 0 <= settings.source < len(cond.pictures):
        raise ValueError(f"guidance source picture {settings.source + 1} does not exist; the edit has {len(cond.pictures)}")
    if cond.vae is None:
        raise ValueError("consistency guidance needs the VAE the edit was encoded with")
    if settings.mask is None and not settings.auto_mask and settings.strength > 0:
        raise ValueError("consistency guidance needs an edit mask (1 = may change) or the automatic mask")
    options: dict[str, Any] = dict(strength=settings.strength, schedule=settings.schedule, measures=tuple(settings.measures))
    if settings.steps is not None:
        options["steps"] = tuple(settings.steps)
    if "region_pixel" in settings.measures:
        options["vae"] = cond.vae.model
    if settings.mask is None:
        options["auto_mask"] = AutoMask(settings.estimate_steps, settings.threshold, settings.smooth, settings.feather_px)
    return GuidanceHook(cond.vae.model, cond.pictures[settings.source], settings.mask, settings.feather_px, options)


class _Stop(Exception):
    pass


def estimate_edit_mask(
    dit: DiT,
    cond: EditCond,
    *,
    seed: int = 0,
    steps: int = 40,
    cfg: float = 4.0,
    schedule: str = "flowmatch",
    estimate_steps: int = 3,
    threshold: str | float = "otsu",
    smooth: float = 1.0,
    size: tuple[int, int] | None = None,
    source: int = 0,
    callback: Callable[[Progress], None] | None = None,
    noise_device: str = "cpu",
) -> torch.Tensor:
    """Where will the edit change the picture? Runs the first ``estimate_steps`` sampling steps and
    returns the automatic edit region as a ``MASK`` ``[1, H, W]`` (1 = changes) -- the same estimate
    automatic consistency guidance makes, to look at, correct and feed back as a user mask."""
    settings = GuidanceSettings(
        auto_mask=True, estimate_steps=estimate_steps, threshold=threshold, smooth=smooth, source=source
    )
    hook = guidance_hook(settings, cond)
    seen = 0

    def cb(p: Progress) -> None:
        nonlocal seen
        seen += 1
        if callback is not None:
            callback(Progress(seen, estimate_steps, p.x0))
        if seen >= estimate_steps:
            raise _Stop

    try:
        sample_edit(dit, cond, seed=seed, steps=steps, cfg=cfg, schedule=schedule, size=size, callback=cb, guidance=hook,
                    noise_device=noise_device)
    except _Stop:
        pass
    if hook.guider is None:
        raise RuntimeError("the automatic mask was not estimated (no sampling step ran)")
    w, h = size or cond.enc.size
    return hook.guider.edit_mask((h, w)).float().cpu()


def decode(vae: VAE, samples: torch.Tensor) -> torch.Tensor:
    """Raw latents ``[B, 16, 1, h, w]`` -> ``IMAGE`` ``[B, H, W, 3]`` float32 in 0..1 on the CPU."""
    mean, std = vae_mod.latent_stats(vae.model)
    z = from_raw_latent(samples, mean, std)
    with torch.inference_mode():
        return torch.cat([images.tensor_to_unit(vae_mod.decode(vae.model, z[i : i + 1])).float().cpu() for i in range(z.shape[0])])


def encode_picture(vae: VAE, picture: torch.Tensor, *, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``IMAGE`` -> raw latents ``[B, 16, 1, h, w]``; resized to ``size`` (else floored to a multiple of 16)."""
    pics = _split_pictures(picture)
    out = []
    mean, std = vae_mod.latent_stats(vae.model)
    with torch.inference_mode():
        for p in pics:
            pil = images.to_pil(p)
            w, h = size or (max(16, pil.width // 16 * 16), max(16, pil.height // 16 * 16))
            z = vae_mod.encode(vae.model, images.pil_to_tensor(images.resize(pil, w, h)))
            out.append(to_raw_latent(z, mean, std))
    return torch.cat(out)


def full_mask(samples: torch.Tensor) -> torch.Tensor:
    """An all-ones ``MASK`` ``[B, H, W]`` (everything may change) for raw latents ``[B, 16, 1, h, w]``."""
    b, h, w = samples.shape[0], samples.shape[-2], samples.shape[-1]
    return torch.ones(b, h * latents.VAE_SCALE, w * latents.VAE_SCALE)


def edit(
    dit: DiT, te: TextEncoder, vae: VAE, pictures: Sequence[Any], req: EditRequest, **sampling: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole edit over parts: :func:`encode_edit`, :func:`sample_edit` (``sampling`` are its
    keyword arguments), :func:`decode`. Returns ``(IMAGE [B, H, W, 3], raw latents [B, 16, 1, h, w])``."""
    cond = encode_edit(te, vae, pictures, req)
    samples = sample_edit(dit, cond, **sampling).samples
    return decode(vae, samples), samples


def placed(dit: DiT, device, offload_device="cpu", *, width: int = 1024, height: int = 1024):
    """A context manager: run a block with ``dit``'s MM-DiT placed on ``device`` as its memory options
    say; afterwards it goes to ``offload_device`` unless ``dit.keep_loaded``. Yields the plan used
    (resident, block swap or sequential; see
    :func:`firered_core.runtime.placement.placed_transformer`)."""
    from .runtime.placement import placed_transformer

    return placed_transformer(dit.transformer, dit.memory, device, offload_device, keep_loaded=dit.keep_loaded,
                              width=width, height=height)  # fmt: skip
