"""The SFT stage (and, with other defaults, the pretrain stage): flow matching on edit pairs, as a
LoRA or a full fine-tune, on one card or many.

Launch::

    # a LoRA on one 24 GB card (fp8 base, gradient checkpointing, AdamW8bit, bf16)
    python -m firered_trainer sft --config firered_trainer/configs/sft_lora_24gb.yaml \\
        model.path=models/FireRed-Image-Edit-1.1 data.jsonl=data/pairs.jsonl output_dir=runs/my_lora

    # several GPUs, data-parallel (DDP) -- the same config
    accelerate launch --num_processes 4 -m firered_trainer sft --config firered_trainer/configs/sft_lora_24gb.yaml ...

    # a full fine-tune sharded with FSDP (the wrap unit is QwenImageTransformerBlock)
    accelerate launch --config_file fsdp.yaml -m firered_trainer sft --config firered_trainer/configs/sft_full_multigpu.yaml ...

    # from Python (what the ComfyUI nodes call)
    from firered_trainer import sft
    result = sft.run(cfg, progress=lambda step, total, loss, samples: ..., should_stop=lambda: False)

The run reads top to bottom: **setup** (data and buckets, the frozen encoders' features cached on
disk, the MM-DiT with LoRA / fp8 or nf4 base / checkpointing, optimizer, accelerate, resume), the
**loop** (homogeneous batches, stochastic instruction alignment, stratified timesteps, weighted
velocity loss and the optional consistency term, EMA, checkpoints, sample edits) and **save** (the
LoRA in ComfyUI and diffusers formats, or the full transformer; the loss curve).

Consistency loss (``objective.consistency_weight`` = eta > 0): for samples with exactly one source
picture of the target's size, ``+ eta sigma^2 [sigma < 0.9] * region_consistency(x0_hat, source,
keep)`` (:func:`consistency_term`, the measure consistency-guided editing uses), averaged over the
batch's samples (the others add 0); the keep mask is :func:`auto_keep_mask` of the pair.

Determinism: every random choice of a step (SIA, timestep, noise) is drawn per sample, from a
generator seeded by ``(seed, step, micro-batch, position of the sample in the global batch)`` --
never the rank -- and the bucket sampler gives process r the r-th slice of one global batch, so N
processes at batch b run the computation of one process at batch N x b (a test compares the
trained tensors). Timesteps are stratified over the positions of the global batch (position g of
B draws from sub-interval ``(g + step) mod B``: with batch 1 per process this is the report's
distributed stratified sampling). The sampler's position, optimizer, LR schedule, EMA and RNG
states are in every checkpoint -- a resumed run computes the same losses as an uninterrupted one.
Because the draws are known in advance, the feature cache encodes only the variants the run
draws (:func:`planned_draws`), not every one SIA could produce.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from firered_core.model import latents
from firered_core.model.images import fit_to_area
from firered_core.runtime.blockswap import swap_last_blocks
from firered_core.sampling import flow
from firered_core.sampling.denoiser import batch_texts

from . import cache as cache_mod
from . import checkpoint as ckpt
from .buckets import BucketBatchSampler, aspect_bucket, bucket_key, fit_to_buckets
from .config import ConfigError, DatasetEntry, StageConfig, load_config
from .data import LoadReport, load_dataset
from .lora import add_lora, load_lora_weights_into, quantize_frozen_base, quantize_frozen_base_nf4, save_lora
from .objective import EMA, flow_matching_loss, seed_of, stratified_uniform, training_sigmas
from .optim import build_optimizer
from .validation import LossLog, plot_loss, sample_edits

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float, "list | None"], None]


@dataclass
class TrainResult:
    """What a run produced. ``lora`` / ``lora_diffusers``: the LoRA files (LoRA runs);
    ``transformer``: the saved MM-DiT folder (full runs); ``stopped``: ended by ``should_stop``
    (a resumable checkpoint was saved first)."""

    output_dir: Path
    step: int
    total: int
    stopped: bool = False
    losses: list[float] = field(default_factory=list)
    lora: Path | None = None
    lora_diffusers: Path | None = None
    transformer: Path | None = None
    transformer_ema: Path | None = None  # full fine-tune with objective.ema_decay > 0: the EMA weights
    checkpoint: Path | None = None
    samples: list[Path] = field(default_factory=list)
    eval_loss_before: float = float("nan")
    eval_loss_after: float = float("nan")
    data_loaded: int = 0
    data_skipped: int = 0
    data_errors: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # feature-cache bytes per sample vs one variant's (cache.size_report)


def run(config, *, overrides: list[str] = (), progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train from a :class:`StageConfig` or a YAML path (+ ``key=value`` overrides)."""
    cfg = config if isinstance(config, StageConfig) else load_config(config, list(overrides), stage="sft")
    return train(cfg, progress=progress, should_stop=should_stop)


# ---------------------------------------------------------------------------------------------
# setup helpers
# ---------------------------------------------------------------------------------------------


def load_data(cfg: StageConfig):
    """(samples, dataset names, dataset weights, report) of every configured dataset."""
    entries = cfg.data.mix or [DatasetEntry(path=cfg.data.jsonl)]
    report = LoadReport()
    samples, weights = [], {}
    for e in entries:
        ds = load_dataset(e.path, dataset=e.name or None, max_bad=cfg.data.max_bad, report=report)
        samples.extend(ds)
        weights[ds[0].dataset] = e.weight
    report.loaded = len(samples)
    return samples, [s.dataset for s in samples], weights, report


def _fingerprint(folder: Path) -> str:
    """A cheap content fingerprint of a model part (config + head and tail of each weight file)."""
    h = hashlib.sha256()
    files = sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            size = f.stat().st_size
            if size > 1 << 20:
                fh.seek(max(size - (1 << 20), 1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def part_path(cfg: StageConfig, part: str) -> Path:
    given = getattr(cfg.model, part, "")
    if given:
        return Path(given)
    if not cfg.model.path:
        raise ValueError(f"model.path: no model folder (and no model.{part} file) given")
    return Path(cfg.model.path) / part


def model_id(cfg: StageConfig) -> str:
    name = cfg.model.id or Path(cfg.model.path or cfg.model.transformer).name
    return f"{name}:{_fingerprint(part_path(cfg, 'text_encoder'))}:{_fingerprint(part_path(cfg, 'vae'))}"


def target_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """Training size of a picture of ``size``: about ``resolution^2`` pixels at its aspect bucket."""
    return fit_to_area(resolution**2, aspect_bucket(*size))


def latent_jobs(sample, drawn: cache_mod.Drawn, cfg: StageConfig) -> list[tuple[str, int, int]]:
    """The ``(path, width, height)`` latents one draw of the sample reads (see :class:`Collator`)."""
    sizes = {sample.target: sample.target_size, **dict(zip(sample.sources, sample.source_sizes))}
    target, pics = drawn.target, drawn.variant.pictures
    jobs = [(target, *target_size(sizes[target], cfg.data.resolution))]
    jobs.extend((p, *target_size(sizes[p], cfg.data.ref_resolution)) for p in pics)
    if _consistency_source(cfg, sizes, drawn):
        # the consistency loss compares x0_hat with the source at the target's training size
        jobs.append((pics[0], *target_size(sizes[target], cfg.data.resolution)))
    return list(dict.fromkeys(jobs))


def _consistency_source(cfg: StageConfig, sizes: dict, drawn: cache_mod.Drawn) -> bool:
    """Whether the consistency loss applies to a draw: only a single source picture of the
    target's size has cell-by-cell correspondence with the target (several sources, or another
    size / aspect: no term)."""
    pics = drawn.variant.pictures
    return (cfg.objective.consistency_weight > 0 and len(drawn.sources) == 1 and len(pics) == 1
            and sizes[pics[0]] == sizes[drawn.target])


EVAL_SAMPLES = 4  # the fixed evaluation set: the first samples


def sia_rng(cfg: StageConfig, step: int, micro: int, position: int) -> random.Random:
    """The SIA generator of the sample at ``position`` of the global batch of ``micro`` at ``step``."""
    return random.Random(seed_of(cfg.seed, "sia", step, micro, position))


def eval_rng(cfg: StageConfig, k: int) -> random.Random:
    return random.Random(seed_of(cfg.seed, "eval", k))


def planned_draws(cfg: StageConfig, samples, sampler: BucketBatchSampler) -> list[tuple[int, cache_mod.Drawn]]:
    """Every ``(sample index, SIA draw)`` the run makes -- the fixed evaluation examples, then steps
    0 .. max_steps-1 of every process -- known before it starts: the draws are keyed by seed,
    step, micro-batch and position, and the sampler's order is fixed by its seed. The feature
    cache holds these and nothing else."""
    out = [(k, cache_mod.draw_variant(s, cfg.sia, eval_rng(cfg, k))) for k, s in enumerate(samples[:EVAL_SAMPLES])]
    batches = sampler.preview(cfg.max_steps * cfg.grad_accum)
    for step in range(cfg.max_steps):
        for micro in range(cfg.grad_accum):
            b = next(batches)
            out.extend((i, cache_mod.draw_variant(samples[i], cfg.sia, sia_rng(cfg, step, micro, g)))
                       for g, i in enumerate(b.all_indices))
    return out


def validation_variants(cfg: StageConfig) -> tuple[list, list]:
    pos = [cache_mod.TextVariant(tuple(p.pictures), p.prompt) for p in cfg.validation.prompts]
    neg = [cache_mod.TextVariant(tuple(p.pictures), " ") for p in cfg.validation.prompts]
    return pos, neg


def extract_features(cfg: StageConfig, samples, accelerator, feature_cache, mid: str, dtype, vae,
                     draws: list[tuple[int, cache_mod.Drawn]]) -> dict[str, float]:
    """Fill the cache with what the run's ``draws`` (:func:`planned_draws`) read -- texts, and
    latents when configured -- split across processes; the text encoder is loaded only when
    something is missing and freed afterwards. Returns :func:`cache.size_report` of the draws
    (logged on the main process)."""
    from firered_core.formats.text_encoder_files import find_processor, load_text_encoder
    from firered_core.model import conditioning
    from firered_core.model import vae as vae_mod

    rank, world = accelerator.process_index, accelerator.num_processes
    pos, neg = validation_variants(cfg)
    vl = cfg.data.vl_resolution
    variants = list(dict.fromkeys([d.variant for _, d in draws] + pos + neg))
    mine = variants[rank::world]
    if any(not feature_cache.has("text", cache_mod.text_key(v, model_id=mid, vl_resolution=vl)) for v in mine):
        te_path = part_path(cfg, "text_encoder")
        processor = find_processor(tokenizer_dir=cfg.model.tokenizer or None, model_dir=Path(cfg.model.path) if cfg.model.path else None)
        te = load_text_encoder(te_path, dtype=dtype, device=accelerator.device, processor=processor).eval()

        def encode(text, pics):
            return conditioning.encode_prompt(te, processor, text, pics, dtype=dtype)

        stats = cache_mod.extract_texts(mine, feature_cache, encode, model_id=mid, vl_resolution=vl)
        log.info("rank %d: %d of %d text variants encoded", rank, stats["encoded"], stats["total"])
        del te
    # the latents each distinct draw reads (a run repeats draws: computed once per draw)
    distinct = list(dict.fromkeys(draws))
    jobs_of = {x: latent_jobs(samples[x[0]], x[1], cfg) for x in distinct} if cfg.data.cache_latents else {}
    if jobs_of:
        jobs = list(dict.fromkeys(j for js in jobs_of.values() for j in js))
        cache_mod.extract_latents(jobs[rank::world], feature_cache, lambda px: vae_mod.encode(vae, px), model_id=mid)
    accelerator.wait_for_everyone()
    per_sample: dict[int, dict[cache_mod.TextVariant, set]] = {}
    for i, d in distinct:
        entries = {("text", cache_mod.text_key(d.variant, model_id=mid, vl_resolution=vl))}
        entries |= {("latents", cache_mod.latent_key(p, w, h, model_id=mid)) for p, w, h in jobs_of.get((i, d), ())}
        per_sample.setdefault(i, {})[d.variant] = entries
    report = cache_mod.size_report(feature_cache, {i: list(v.values()) for i, v in per_sample.items()})
    eager = sum(cache_mod.possible_variants(samples[i], cfg.sia) for i in per_sample) / max(len(per_sample), 1)
    report["variants_per_sample"] = sum(len(v) for v in per_sample.values()) / max(len(per_sample), 1)
    report["possible_per_sample"] = eager
    if accelerator.is_main_process:
        log.info("feature cache: %d samples drawn, %.1f text variants each (of %.1f possible), %.3f MB per sample = "
                 "%.2fx one variant's %.3f MB (largest %.2fx)", report["samples"], report["variants_per_sample"], eager,
                 report["per_sample"] / 1e6, report["ratio"], report["variant"] / 1e6, report["max_ratio"])
    return report


def build_transformer(cfg: StageConfig, dtype, device):
    """The MM-DiT ready to train: LoRA adapters (float32) or all weights trainable (float32
    master weights), fp8 / nf4 frozen base, gradient checkpointing."""
    from firered_core.formats.transformer_files import load_transformer

    tr = load_transformer(part_path(cfg, "transformer"), dtype=dtype, device="cpu", weight_dtype="dequantize")
    if cfg.train_mode == "lora":
        if cfg.model.base_precision == "nf4":
            # QLoRA-style: the frozen block linears become bitsandbytes 4-bit layers first, then
            # PEFT wraps those (its bnb Linear4bit LoRA layer)
            quantize_frozen_base_nf4(tr, compute_dtype=dtype)
        add_lora(tr, rank=cfg.lora.rank, alpha=cfg.lora.alpha, modules=cfg.lora_modules(), dropout=cfg.lora.dropout)
        if cfg.lora.init_from:
            load_lora_weights_into(tr, cfg.lora.init_from)
        if cfg.model.base_precision == "fp8":
            quantize_frozen_base(tr)
    else:
        tr.float().requires_grad_(True)
    if cfg.model.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    return tr.to(device).train()


def save_transformer_folder(model, state_dict: dict, folder: Path) -> Path:
    """``state_dict`` as a diffusers ``transformer/`` folder (the model's config, safetensors shards
    of 10 GB with their index). Written from the given tensors -- diffusers' ``save_pretrained``
    ignores a ``state_dict`` argument and saves the module's own, which under FSDP are shards."""
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    save_torch_state_dict({k: v.contiguous() for k, v in state_dict.items()}, folder,
                          filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")
    return folder


def lr_lambda(cfg: StageConfig):
    warm, total, kind = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.scheduler

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - frac if kind == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return f


# ---------------------------------------------------------------------------------------------
# one training example and the loss of a batch
# ---------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One collated sample: x0 ``[N, 64]`` packed target latent, refs ``[N_ref, 64]`` or None,
    text (cached :class:`TextCond`), img_shapes (target's grid first). With the consistency loss
    on, and exactly one source picture at the target's size: ``src`` ``[N, 64]`` its packed latent at
    the target's training size and ``keep`` ``[N, 64]`` the keep mask (1 = should stay); else None."""

    x0: torch.Tensor
    refs: torch.Tensor | None
    text: object
    img_shapes: list
    src: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @property
    def shape_key(self):
        return tuple(self.img_shapes)


def auto_keep_mask(src: torch.Tensor, tgt: torch.Tensor, threshold: float) -> torch.Tensor:
    """``consistency_mask: auto``: the keep region of a training pair, from the pair itself -- the
    latent cells (8x8 pixels each) where the source and target latents ``[16, h, w]`` (normalised,
    about unit variance) agree: mean over channels of ``|src - tgt|`` below ``threshold``.
    Returns ``[1, h, w]`` in {0, 1}."""
    return ((src.float() - tgt.float()).abs().mean(0, keepdim=True) < threshold).float()


def consistency_term(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, src: torch.Tensor,
                     keep: torch.Tensor, eta: float) -> torch.Tensor:
    """Per sample ``eta sigma^2 [sigma < 0.9] * region_consistency(x0_hat, src, keep)``, ``[B]``, with
    ``x0_hat = x_t - sigma v`` -- :func:`firered_trainer.rl.losses.consistency_loss` (the measure of
    consistency-guided editing, :func:`firered_core.editing.consistency.region_consistency`)."""
    from .rl.losses import consistency_loss, x0_estimate

    x0_hat = x0_estimate(x_t.to(v.device), v, sigma.to(v.device))
    return consistency_loss(x0_hat, src.to(v.device), keep.to(v.device), sigma.to(v.device), eta=eta,
                            schedule="sigma2", space="latent")


class Collator:
    """Turns a sample into an :class:`Example`: stochastic instruction alignment (instruction
    variant, reference shuffle & drop, renumbered text), then the cached embeddings and latents."""

    def __init__(self, cfg: StageConfig, feature_cache, mid: str, vae=None):
        self.cfg, self.cache, self.mid, self.vae = cfg, feature_cache, mid, vae

    def latent(self, path: str, w: int, h: int) -> torch.Tensor:
        key = cache_mod.latent_key(path, w, h, model_id=self.mid)
        if self.cache.has("latents", key):
            return self.cache.get_latent(key)
        if self.vae is None:
            raise KeyError(f"no cached latent for {path} at {w}x{h}")
        from firered_core.model import images
        from firered_core.model import vae as vae_mod

        px = images.pil_to_tensor(cache_mod.crop_resize(images.to_pil(path), w, h))
        return vae_mod.encode(self.vae, px)[0].float().cpu()

    def __call__(self, sample, rng: random.Random, allowed=None) -> Example:
        """``allowed``: the sample's :func:`cache.variant_budget` entry (``None``: no limit)."""
        c = self.cfg
        drawn = cache_mod.within_budget(cache_mod.draw_variant(sample, c.sia, rng), allowed)
        variant, target, pics = drawn.variant, drawn.target, drawn.variant.pictures
        cond = self.cache.get_text(cache_mod.text_key(variant, model_id=self.mid, vl_resolution=c.data.vl_resolution))
        sizes = {sample.target: sample.target_size, **dict(zip(sample.sources, sample.source_sizes))}
        tw, th = target_size(sizes[target], c.data.resolution)
        x0 = latents.pack(self.latent(target, tw, th).unsqueeze(0))[0]
        shapes = [latents.token_grid(th, tw)]
        refs = []
        for p in pics:
            rw, rh = target_size(sizes[p], c.data.ref_resolution)
            refs.append(latents.pack(self.latent(p, rw, rh).unsqueeze(0))[0])
            shapes.append(latents.token_grid(rh, rw))
        ex = Example(x0, torch.cat(refs, 0) if refs else None, cond, shapes)
        if _consistency_source(c, sizes, drawn):
            src = self.latent(pics[0], tw, th)
            tgt = latents.unpack(x0.unsqueeze(0), src.shape[-2], src.shape[-1])[0]
            keep = auto_keep_mask(src, tgt, c.objective.consistency_threshold).expand_as(src)
            ex.src = latents.pack(src.unsqueeze(0).float())[0]
            ex.keep = latents.pack(keep.unsqueeze(0))[0]
        return ex


def predict_velocity(model, x_t, sigma, refs, texts, img_shapes, dtype):
    """The MM-DiT's velocity for target tokens ``x_t`` ``[B, N, 64]`` (the same call the inference
    :class:`firered_core.sampling.denoiser.Denoiser` makes, one condition per row)."""
    n = x_t.shape[1]
    embeds, mask = batch_texts([t.to(x_t.device, dtype) for t in texts])
    hidden = x_t.to(dtype) if refs is None else torch.cat([x_t, refs], 1).to(dtype)
    timestep = (flow.sigma_to_timestep(sigma) / flow.NUM_TRAIN_TIMESTEPS).to(dtype)
    out = model(hidden_states=hidden, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                timestep=timestep, img_shapes=[img_shapes] * x_t.shape[0], return_dict=False)[0]
    return out[:, :n]


def batch_loss_backward(model, examples: list[Example], *, accelerator, cfg: StageConfig, sched_cfg, step: int,
                        micro: int, dtype, positions: list[int] | None = None) -> float:
    """Loss of one micro-batch, back-propagated group by group (examples whose token layout
    differs after SIA run as separate forwards); returns the batch's mean loss. ``positions``:
    the examples' places in the global batch (default: rank x batch + j), which key their
    timestep and noise draws (see the module docstring)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if positions is None:
        positions = [rank * len(examples) + j for j in range(len(examples))]
    n_global = len(examples) * world
    gens = [torch.Generator().manual_seed(seed_of(cfg.seed, "noise", step, micro, g)) for g in positions]
    u = torch.cat([stratified_uniform(1, rank=g % n_global, world_size=n_global, step=step * cfg.grad_accum + micro,
                                      generator=gen) for g, gen in zip(positions, gens)])
    groups: dict[tuple, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.shape_key, []).append(i)
    total, dev = 0.0, accelerator.device
    for gi, idx in enumerate(groups.values()):
        exs = [examples[i] for i in idx]
        x0 = torch.stack([e.x0 for e in exs]).float()
        eps = torch.stack([torch.randn(x0.shape[1:], generator=gens[i]) for i in idx])
        sigma = training_sigmas(u[idx], image_seq_len=x0.shape[1], config=sched_cfg)
        x_t = flow.add_noise(x0, eps, sigma)
        refs = torch.stack([e.refs for e in exs]).to(dev) if exs[0].refs is not None else None
        last = gi == len(groups) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                v = predict_velocity(model, x_t.to(dev), sigma.to(dev), refs, [e.text for e in exs], exs[0].img_shapes, dtype)
            loss = flow_matching_loss(v, x0.to(dev), eps.to(dev), sigma.to(dev), weighting=cfg.objective.weighting,
                                      clip=cfg.objective.clip or None)
            sel = [k for k, e in enumerate(exs) if e.src is not None]
            if cfg.objective.consistency_weight > 0 and sel:
                # mean over the group's samples; those without a usable source contribute 0
                c = consistency_term(x_t[sel], v[sel], sigma[sel], torch.stack([exs[k].src for k in sel]),
                                     torch.stack([exs[k].keep for k in sel]), cfg.objective.consistency_weight)
                loss = loss + c.sum() / len(exs)
            accelerator.backward(loss * (len(exs) / len(examples)))
        total += loss.detach().item() * len(exs) / len(examples)
    return total


@torch.no_grad()
def eval_loss(model, examples: list[Example], *, sched_cfg, dtype, device, sigmas=(0.25, 0.5, 0.75), seed: int = 0) -> float:
    """Velocity MSE on fixed examples at fixed sigmas with fixed noise: a loss that only changes
    when the model does (the training loss also moves with the random timesteps)."""
    gen = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for ex in examples:
        x0 = ex.x0.unsqueeze(0).float()
        for s in sigmas:
            eps = torch.randn(x0.shape, generator=gen)
            sigma = torch.tensor([s])
            x_t = flow.add_noise(x0, eps, sigma)
            refs = ex.refs.unsqueeze(0).to(device) if ex.refs is not None else None
            v = predict_velocity(model, x_t.to(device), sigma.to(device), refs, [ex.text], ex.img_shapes, dtype)
            total += flow_matching_loss(v, x0.to(device), eps.to(device), sigma.to(device), clip=None).item()
            n += 1
    return total / max(n, 1)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------


def train(cfg: StageConfig, *, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    if cfg.stage not in ("sft", "pretrain"):
        raise ConfigError(f"stage: this loop trains sft and pretrain; a {cfg.stage} config runs with "
                          f"python -m firered_trainer {cfg.stage} (firered_trainer.rl.{cfg.stage}.run)")
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    from firered_core.formats.vae_files import load_vae
    from firered_core.loading import load_scheduler_config, resolve_dtype
    from firered_core.model.modules import compute_dtype

    # ---- setup: processes, output folder -------------------------------------------------------
    # cpu=True on a machine without CUDA lets torchrun / mpirun start a multi-CPU (gloo) run.
    # The last block's text-stream layers (to_add_out, txt_mlp) feed nothing the loss sees, so DDP
    # must be told that some parameters get no gradient.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              step_scheduler_with_optimizer=False, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out)
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    accelerator.wait_for_everyone()
    dtype = resolve_dtype(cfg.model.dtype)

    # ---- data: samples, buckets ------------------------------------------------------------------
    samples, names, weights, report = load_data(cfg)
    sampler = BucketBatchSampler([bucket_key(s) for s in samples], names, cfg.data.batch_size,
                                 dataset_weights=weights, count_weights=cfg.data.count_weights, seed=cfg.seed,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes)
    samples = fit_to_buckets(samples, sampler.assigned)  # a sample merged into a neighbouring bucket trains at its aspects

    # ---- frozen encoders -> feature cache ---------------------------------------------------------
    mid = model_id(cfg)
    feature_cache = cache_mod.FeatureCache(cfg.data.cache_dir or out / "cache")
    vae = load_vae(part_path(cfg, "vae"), dtype=dtype, device=accelerator.device).eval().requires_grad_(False)
    draws = planned_draws(cfg, samples, sampler)
    budget = cache_mod.variant_budget(draws, cfg.data.cache_variants)
    draws = [(i, cache_mod.within_budget(d, budget.get(i))) for i, d in draws]
    cache_report = extract_features(cfg, samples, accelerator, feature_cache, mid, dtype, vae, draws)
    sched_cfg = load_scheduler_config(Path(cfg.model.path)) if cfg.model.path else None
    collate = Collator(cfg, feature_cache, mid, vae=None if cfg.data.cache_latents else vae)
    need_vae = not cfg.data.cache_latents or bool(cfg.validation.every and cfg.validation.prompts)
    if not need_vae:
        vae = None

    # ---- model, optimizer, schedule, EMA -----------------------------------------------------------
    transformer = build_transformer(cfg, dtype, accelerator.device)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optim.name, params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    ema = EMA(transformer, cfg.objective.ema_decay) if cfg.objective.ema_decay > 0 else None
    model, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    compute = compute_dtype(transformer)
    if cfg.model.blocks_to_swap:
        if accelerator.num_processes > 1:
            raise ValueError("model.blocks_to_swap: block swapping is for a single GPU; with several, shard the "
                             "model instead (FSDP) or set model.blocks_to_swap=0")
        swap_last_blocks(accelerator.unwrap_model(model), cfg.model.blocks_to_swap, accelerator.device)
    state = ckpt.TrainState()
    ckpt.install_hooks(accelerator)
    accelerator.register_for_checkpointing(state, ckpt.StatefulSampler(sampler), ckpt.EMAState(ema))

    # ---- resume --------------------------------------------------------------------------------
    loss_log = LossLog(out / "loss.csv")
    # the newest usable checkpoint; damaged newer ones are moved aside (step-N.corrupt) with one log line
    ckpt.resume(accelerator, out, cfg.checkpoint.resume)
    if accelerator.is_main_process:
        loss_log.truncate(state.step)

    result = TrainResult(out, state.step, cfg.max_steps, data_loaded=report.loaded, data_skipped=report.skipped,
                         data_errors=list(report.errors), cache=cache_report)
    val_pos, val_neg = validation_variants(cfg)
    vl = cfg.data.vl_resolution

    def lora_files(folder: Path, step: int) -> dict:
        return save_lora(accelerator.unwrap_model(model), folder / f"{cfg.name}.safetensors",
                         folder / "diffusers" / "pytorch_lora_weights.safetensors", rank=cfg.lora.rank,
                         alpha=cfg.lora.alpha, modules=cfg.lora_modules(), base_model=mid.split(":")[0],
                         steps=step, config=cfg.to_dict())

    def save(step: int, loss: float | None) -> Path:
        extra = (lambda tmp: lora_files(tmp, step)) if cfg.train_mode == "lora" else None
        return ckpt.save_checkpoint(accelerator, out, step, config_yaml=cfg.to_yaml(), meta={"loss": loss},
                                    keep_last=cfg.checkpoint.keep_last, extra=extra)

    def samples_now(step: int) -> list:
        if not accelerator.is_main_process:
            return []
        get = feature_cache.get_text
        pos = [get(cache_mod.text_key(v, model_id=mid, vl_resolution=vl)) for v in val_pos]
        neg = [get(cache_mod.text_key(v, model_id=mid, vl_resolution=vl)) for v in val_neg]
        v = cfg.validation
        pics = sample_edits(accelerator.unwrap_model(model), vae, sched_cfg, v.prompts, positive=pos, negative=neg,
                            steps=v.steps, cfg=v.cfg, seed=v.seed, resolution=v.resolution,
                            ref_resolution=cfg.data.ref_resolution)
        for i, pic in enumerate(pics):
            p = out / "samples" / f"step-{step:08d}-{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            pic.save(p)
            result.samples.append(p)
        return pics

    # a fixed evaluation set: the first samples, collated without randomness beyond a fixed seed
    eval_examples = [collate(s, eval_rng(cfg, k), budget.get(k)) for k, s in enumerate(samples[:EVAL_SAMPLES])]

    def evaluate() -> float:
        m = accelerator.unwrap_model(model)
        m.eval()
        try:
            with accelerator.autocast():
                return eval_loss(m, eval_examples, sched_cfg=sched_cfg, dtype=compute, device=accelerator.device)
        finally:
            m.train()

    result.eval_loss_before = evaluate()

    # ---- loop ----------------------------------------------------------------------------------
    model.train()
    loss = float("nan")
    while state.step < cfg.max_steps:
        if should_stop is not None and should_stop():
            result.checkpoint = save(state.step, None)
            result.stopped = True
            break
        t0 = time.perf_counter()
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            batch = sampler.next_batch()
            positions = [batch.offset + j for j in range(len(batch.indices))]
            examples = [collate(samples[i], sia_rng(cfg, state.step, micro, g), budget.get(i))
                        for g, i in zip(positions, batch.indices)]
            with accelerator.accumulate(model):
                step_loss += batch_loss_backward(model, examples, accelerator=accelerator, cfg=cfg,
                                                 sched_cfg=sched_cfg, step=state.step, micro=micro, dtype=compute,
                                                 positions=positions)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        state.step += 1
        loss = accelerator.reduce(torch.tensor(step_loss / cfg.grad_accum, device=accelerator.device), "mean").item()
        result.losses.append(loss)
        if accelerator.is_main_process:
            loss_log.append(state.step, loss, scheduler.get_last_lr()[0], time.perf_counter() - t0)
            if state.step % cfg.log_every == 0:
                log.info("step %d/%d loss %.5f", state.step, cfg.max_steps, loss)
        pics = None
        if cfg.validation.every and cfg.validation.prompts and state.step % cfg.validation.every == 0:
            pics = samples_now(state.step)
        if state.step % cfg.checkpoint.every == 0 or state.step == cfg.max_steps:
            result.checkpoint = save(state.step, loss)
        if progress is not None:
            progress(state.step, cfg.max_steps, loss, pics)

    # ---- save ----------------------------------------------------------------------------------
    result.step = state.step
    result.eval_loss_after = evaluate()
    log.info("eval loss (fixed samples, sigmas, noise): %.5f -> %.5f", result.eval_loss_before, result.eval_loss_after)
    if accelerator.is_main_process:
        plot_loss(loss_log.losses(), out / "loss.png", title=f"{cfg.stage} loss")
    if not result.stopped:
        unwrapped = accelerator.unwrap_model(model)
        if cfg.train_mode == "lora":
            if accelerator.is_main_process:
                files = lora_files(out, state.step)
                result.lora, result.lora_diffusers = files["comfyui"], files["diffusers"]
                if ema is not None:
                    ema.copy_to(unwrapped)
                    save_lora(unwrapped, out / f"{cfg.name}_ema.safetensors", rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                              modules=cfg.lora_modules(), base_model=mid.split(":")[0], steps=state.step,
                              config=cfg.to_dict())
        else:
            state_dict = accelerator.get_state_dict(model)  # gathered on the main process under FSDP
            if accelerator.is_main_process:
                result.transformer = save_transformer_folder(unwrapped, state_dict, out / "transformer")
                if ema is not None:
                    averaged = {k: ema.shadow[k].to(v.dtype) if k in ema.shadow else v for k, v in state_dict.items()}
                    result.transformer_ema = save_transformer_folder(unwrapped, averaged, out / "transformer_ema")
    if accelerator.is_main_process:
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()
                   if k not in ("samples",)}
        summary["world_size"] = accelerator.num_processes
        (out / "result.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
