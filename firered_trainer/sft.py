"""The SFT stage (and, with other defaults, the pretrain stage): flow matching on edit pairs, as a
LoRA or a full fine-tune, on one card or many.

Launch::

    # a LoRA on one 24 GB card (fp8 base, gradient checkpointing, AdamW8bit, bf16)
    python -m firered_trainer sft --config firered_trainer/configs/sft_lora_24gb.yaml \\
        model.path=models/FireRed-Image-Edit-1.1 data.jsonl=data/pairs.jsonl output_dir=runs/my_lora

    # several GPUs, data-parallel (DDP) -- the same config
    accelerate launch --num_processes 4 -m firered_trainer sft --config firered_trainer/configs/sft_lora_24gb.yaml ...

    # a full fine-tune sharded over the processes (torch FSDP2, one unit per QwenImageTransformerBlock;
    # model.fsdp: true in this config, see firered_trainer/fsdp.py)
    accelerate launch --num_processes 8 -m firered_trainer sft --config firered_trainer/configs/sft_full_multigpu.yaml ...

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

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from firered_core.runtime.blockswap import swap_last_blocks

from . import cache as cache_mod
from . import checkpoint as ckpt
from . import fsdp
from .batches import Collator, batch_loss_backward, eval_loss
from .buckets import BucketBatchSampler, bucket_key, fit_to_buckets
from .config import ConfigError, StageConfig, load_config
from .features import (
    EVAL_SAMPLES,
    eval_rng,
    extract_features,
    load_data,
    model_id,
    part_path,
    planned_draws,
    sia_rng,
    validation_variants,
)
from .lora import add_lora, load_lora_weights_into, quantize_frozen_base, quantize_frozen_base_nf4, save_lora
from .objective import EMA
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
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"this launch asks accelerate for {accelerator.distributed_type.value}: the stage shards "
                          "the model itself: launch without accelerate's FSDP / DeepSpeed config and set "
                          "model.fsdp=true (see firered_trainer/fsdp.py)")
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
    # model.fsdp on several processes: the MM-DiT is sharded (firered_trainer.fsdp) and stays out of
    # accelerate's prepare (which would wrap it in DDP); its optimizer state and EMA live on the shards
    sharded = cfg.model.fsdp and accelerator.num_processes > 1
    if sharded:
        transformer = fsdp.build_sharded(part_path(cfg, "transformer"), dtype, accelerator.device,
                                         gradient_checkpointing=cfg.model.gradient_checkpointing)
    else:
        transformer = build_transformer(cfg, dtype, accelerator.device)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optim.name, params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    ema = EMA(transformer, cfg.objective.ema_decay) if cfg.objective.ema_decay > 0 else None
    if sharded:
        model = transformer
    else:
        model, optimizer, scheduler = accelerator.prepare(transformer, optimizer, scheduler)
    compute = compute_dtype(transformer)
    if cfg.model.blocks_to_swap:
        if accelerator.num_processes > 1:
            raise ValueError("model.blocks_to_swap: block swapping is for a single GPU; with several, shard the "
                             "model instead (FSDP) or set model.blocks_to_swap=0")
        swap_last_blocks(accelerator.unwrap_model(model), cfg.model.blocks_to_swap, accelerator.device)
    state = ckpt.TrainState()
    ckpt.install_hooks(accelerator)
    if sharded:  # the schedule through accelerate; the model, optimizer and EMA shards by fsdp.save_shards
        accelerator.register_for_checkpointing(state, ckpt.StatefulSampler(sampler), scheduler)
    else:
        accelerator.register_for_checkpointing(state, ckpt.StatefulSampler(sampler), ckpt.EMAState(ema))

    # ---- resume --------------------------------------------------------------------------------
    loss_log = LossLog(out / "loss.csv")
    # the newest usable checkpoint; damaged newer ones are moved aside (step-N.corrupt) with one log line
    resumed = ckpt.resume(accelerator, out, cfg.checkpoint.resume)
    if sharded and resumed is not None:
        fsdp.load_shards(resumed, model, optimizer, ema)
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
        shards = (lambda tmp: fsdp.save_shards(tmp, model, optimizer, ema)) if sharded else None
        return ckpt.save_checkpoint(accelerator, out, step, config_yaml=cfg.to_yaml(), meta={"loss": loss},
                                    keep_last=cfg.checkpoint.keep_last, extra=extra, every_process=shards)

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
                # accelerate's prepared optimizer skips the step between accumulated micro-batches;
                # the sharded run's plain torch optimizer is told here
                if accelerator.sync_gradients or not sharded:
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
            # the whole weights on the main process (gathered from the shards under model.fsdp)
            state_dict = fsdp.gathered_weights(model) if sharded else accelerator.get_state_dict(model)
            shadow = (fsdp.gathered_ema(ema) if sharded else ema.shadow) if ema is not None else None
            if accelerator.is_main_process:
                result.transformer = save_transformer_folder(unwrapped, state_dict, out / "transformer")
                if ema is not None:
                    averaged = {k: shadow[k].to(v.dtype) if k in shadow else v for k, v in state_dict.items()}
                    result.transformer_ema = save_transformer_folder(unwrapped, averaged, out / "transformer_ema")
    if accelerator.is_main_process:
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()
                   if k not in ("samples",)}
        summary["world_size"] = accelerator.num_processes
        (out / "result.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
