"""The value checks of the stage config (:mod:`firered_trainer.config`): every setting with a fixed
set or range, each failure a :class:`~firered_trainer.config.ConfigError` that names its dotted key."""

from __future__ import annotations

from .config import LORA_PRESETS, RL_STAGES, STAGES, ConfigError, StageConfig


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: StageConfig) -> StageConfig:
    """Check every value that has a fixed set or range; raise :class:`ConfigError` naming the key."""
    from .optim import OPTIMIZERS

    _check(cfg.stage in STAGES, "stage", f"expected one of {STAGES}, got {cfg.stage!r}")
    _check(cfg.train_mode in ("lora", "full"), "train_mode", f"expected 'lora' or 'full', got {cfg.train_mode!r}")
    _check(cfg.max_steps >= 1, "max_steps", f"must be >= 1, got {cfg.max_steps}")
    _check(cfg.data.cache_variants >= 0, "data.cache_variants", f"must be >= 0 (0 = no limit), got {cfg.data.cache_variants}")
    _check(cfg.mixed_precision in ("bf16", "fp16", "no"), "mixed_precision",
           f"expected bf16, fp16 or no, got {cfg.mixed_precision!r}")
    _check(cfg.grad_accum >= 1, "grad_accum", f"must be >= 1, got {cfg.grad_accum}")
    _check(cfg.log_every >= 1, "log_every", f"must be >= 1, got {cfg.log_every}")
    _check(cfg.model.dtype in ("bf16", "fp32", "fp16"), "model.dtype", f"expected bf16, fp32 or fp16, got {cfg.model.dtype!r}")
    _check(cfg.model.base_precision in ("bf16", "fp8", "nf4"), "model.base_precision",
           f"expected bf16, fp8 or nf4, got {cfg.model.base_precision!r}")
    _check(not (cfg.model.base_precision in ("fp8", "nf4") and cfg.train_mode == "full"), "model.base_precision",
           f"an {cfg.model.base_precision} base can only be trained through a LoRA (train_mode: lora); "
           "full fine-tuning needs bf16 weights")
    _check(not (cfg.model.base_precision == "nf4" and cfg.model.blocks_to_swap), "model.blocks_to_swap",
           "block swapping is not supported with an nf4 base (it is already 4x smaller); use fp8 with block swapping")
    _check(cfg.model.blocks_to_swap >= 0, "model.blocks_to_swap", f"must be >= 0, got {cfg.model.blocks_to_swap}")
    _check(not (cfg.model.blocks_to_swap and cfg.train_mode == "full"), "model.blocks_to_swap",
           "block swapping moves frozen weights only: it needs train_mode: lora")
    if cfg.model.fsdp:
        _check(cfg.train_mode == "full", "model.fsdp", "sharding is for a full fine-tune (train_mode: full); "
               "a LoRA trains data-parallel without it")
        _check(cfg.optim.name.lower() in ("adamw", "adafactor"), "model.fsdp",
               f"a sharded run needs optim.name adamw or adafactor (torch optimizers over the shards), got {cfg.optim.name!r}")
        _check(not (cfg.validation.every and cfg.validation.prompts), "model.fsdp",
               "sample edits during a sharded run are not supported yet: set validation.every=0")
    _check(cfg.lora.rank >= 1, "lora.rank", f"must be >= 1, got {cfg.lora.rank}")
    _check(cfg.lora.alpha > 0, "lora.alpha", f"must be > 0, got {cfg.lora.alpha}")
    _check(bool(cfg.lora.modules) or cfg.lora.targets in LORA_PRESETS, "lora.targets",
           f"unknown preset {cfg.lora.targets!r}; expected one of {', '.join(LORA_PRESETS)} or a lora.modules list")
    _check(0 <= cfg.lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
    _check(cfg.optim.name.lower() in OPTIMIZERS, "optim.name",
           f"unknown optimizer {cfg.optim.name!r}; expected one of {', '.join(OPTIMIZERS)}")
    _check(cfg.optim.lr > 0, "optim.lr", f"must be > 0, got {cfg.optim.lr}")
    _check(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
           f"expected two numbers in [0, 1), got {cfg.optim.betas}")
    _check(cfg.optim.scheduler in ("constant", "linear", "cosine"), "optim.scheduler",
           f"expected constant, linear or cosine, got {cfg.optim.scheduler!r}")
    _check(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {cfg.optim.warmup_steps}")
    _check(cfg.objective.weighting in ("none", "logit_normal"), "objective.weighting",
           f"expected none or logit_normal, got {cfg.objective.weighting!r}")
    _check(cfg.objective.consistency_weight >= 0, "objective.consistency_weight",
           f"must be >= 0 (0 = off), got {cfg.objective.consistency_weight}")
    _check(cfg.objective.consistency_mask in ("auto",), "objective.consistency_mask",
           f"expected auto, got {cfg.objective.consistency_mask!r}")
    _check(cfg.objective.consistency_threshold > 0, "objective.consistency_threshold",
           f"must be > 0, got {cfg.objective.consistency_threshold}")
    _check(0 <= cfg.objective.ema_decay < 1, "objective.ema_decay", f"must be in [0, 1), got {cfg.objective.ema_decay}")
    _check(bool(cfg.data.jsonl) or bool(cfg.data.mix), "data.jsonl",
           "no training data: set data.jsonl=<file.jsonl or folder> (or data.mix)")
    for i, d in enumerate(cfg.data.mix):
        _check(bool(d.path), f"data.mix[{i}].path", "empty path")
        _check(d.weight >= 0, f"data.mix[{i}].weight", f"must be >= 0, got {d.weight}")
    _check(cfg.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {cfg.data.batch_size}")
    for k in ("resolution", "ref_resolution"):
        v = getattr(cfg.data, k)
        _check(v >= 16 and v % 16 == 0, f"data.{k}", f"must be a positive multiple of 16 pixels, got {v}")
    _check(cfg.data.vl_resolution >= 28, "data.vl_resolution",
           f"must be at least 28 pixels (one Qwen2.5-VL patch of 14 x 2), got {cfg.data.vl_resolution}")
    _check(cfg.data.max_bad >= 0, "data.max_bad", f"must be >= 0, got {cfg.data.max_bad}")
    for k in ("drop_prob", "chinese_prob", "inverse_prob", "text_dropout"):
        v = getattr(cfg.sia, k)
        _check(0 <= v <= 1, f"sia.{k}", f"must be a probability in [0, 1], got {v}")
    if cfg.stage in RL_STAGES:
        _validate_rl(cfg)
    _check(cfg.checkpoint.every >= 1, "checkpoint.every", f"must be >= 1, got {cfg.checkpoint.every}")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {cfg.checkpoint.keep_last}")
    _check(cfg.validation.every >= 0, "validation.every", f"must be >= 0, got {cfg.validation.every}")
    for i, p in enumerate(cfg.validation.prompts):
        _check(bool(p.prompt.strip()), f"validation.prompts[{i}].prompt", "empty prompt")
        _check(len(p.pictures) <= 3, f"validation.prompts[{i}].pictures", f"0 to 3 pictures, got {len(p.pictures)}")
    return cfg


def _validate_rl(cfg: StageConfig) -> None:
    st = cfg.stage
    _check(not cfg.data.mix, "data.mix", f"the {st} stage reads one file (data.jsonl), not a mix")
    _check(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
           f"expected auto, cpu or cuda[:N], got {cfg.device!r}")
    sec = cfg.dpo if st == "dpo" else cfg.nft
    for k in ("width", "height"):
        v = getattr(sec, k)
        _check(v >= 16 and v % 16 == 0, f"{st}.{k}", f"must be a positive multiple of 16 pixels, got {v}")
    if st == "dpo":
        _check(cfg.dpo.beta > 0, "dpo.beta", f"must be > 0, got {cfg.dpo.beta}")
        _check(cfg.dpo.omega > 0, "dpo.omega", f"must be > 0, got {cfg.dpo.omega}")
        _check(cfg.dpo.lam >= 0, "dpo.lam", f"must be >= 0, got {cfg.dpo.lam}")
        return
    n = cfg.nft
    for k in ("prompts_per_step", "sample_steps", "timesteps_per_sample", "micro_batch", "validation_seeds"):
        _check(getattr(n, k) >= 1, f"nft.{k}", f"must be >= 1, got {getattr(n, k)}")
    _check(n.group_size >= 2, "nft.group_size",
           f"must be >= 2 (rewards are normalised within each prompt's group), got {n.group_size}")
    _check(n.beta > 0, "nft.beta", f"must be > 0, got {n.beta}")
    _check(n.train_timesteps in ("shift", "sampler"), "nft.train_timesteps",
           f"expected shift or sampler, got {n.train_timesteps!r}")
    _check(0 < n.timestep_fraction <= 1, "nft.timestep_fraction", f"must be in (0, 1], got {n.timestep_fraction}")
    _check(isinstance(n.reward, (str, dict)) and bool(n.reward), "nft.reward",
           f"expected a reward name or a mapping of names to weights, got {n.reward!r}")
