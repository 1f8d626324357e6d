"""One typed config per training stage: dataclasses, read from a commented YAML file plus
``key=value`` dotted overrides, checked with errors that name the key, and written into every
checkpoint.

>>> cfg = load_config("firered_trainer/configs/sft_lora_24gb.yaml", ["data.jsonl=pairs.jsonl", "optim.lr=1e-4"])
>>> cfg.optim.lr
0.0001

``pretrain`` and ``sft`` share :class:`StageConfig` (one loop, two configs); they differ in their
defaults (:func:`default_config`): pretrain is a full fine-tune on a text-to-image + edit mixture,
SFT a LoRA on edit pairs.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("sft", "pretrain")
LORA_PRESETS = {
    # FireRed's own training code (and DiffSynth's FireRed scripts): the eight attention
    # projections, the second MLP linears and the modulation linears
    "firered": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                "img_mlp.net.2", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"],
    # diffusers' / SimpleTuner's default
    "attn_qkvo": ["to_q", "to_k", "to_v", "to_out.0"],
    # both streams' attention projections
    "attn": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"],
    # musubi-tuner: every linear of a block except the modulation
    "musubi": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"],
}  # fmt: skip


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the dotted key."""


@dataclass
class ModelConfig:
    path: str = ""  # release folder (diffusers layout): transformer/, text_encoder/, vae/, processor/
    transformer: str = ""  # optional MM-DiT file (bf16 safetensors, ComfyUI single file) instead of path/transformer
    text_encoder: str = ""  # optional Qwen2.5-VL file or folder instead of path/text_encoder
    vae: str = ""  # optional VAE file or folder instead of path/vae
    tokenizer: str = ""  # optional tokenizer folder (default: the release folder's, else ComfyUI's)
    id: str = ""  # name written into LoRA metadata and the cache key; default: the folder name
    dtype: str = "bf16"  # weights of the frozen parts: bf16 | fp32 | fp16
    base_precision: str = "bf16"  # frozen MM-DiT linears: bf16 (= dtype) | fp8 (scaled e4m3) | nf4 (bnb 4-bit); LoRA only
    gradient_checkpointing: bool = True  # recompute each block in backward
    blocks_to_swap: int = 0  # LoRA on one GPU: frozen weights of the last N blocks wait in CPU memory


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 32.0  # scale = alpha / rank (written as explicit .alpha tensors)
    targets: str = "firered"  # preset: firered | attn | attn_qkvo | musubi
    modules: list[str] = field(default_factory=list)  # explicit module suffixes; overrides the preset
    dropout: float = 0.0
    init_from: str = ""  # continue training from a LoRA file this trainer wrote


@dataclass
class DatasetEntry:
    path: str = ""  # a .jsonl file or a folder of pairs
    weight: float = 1.0
    name: str = ""


@dataclass
class DataConfig:
    jsonl: str = ""  # one dataset: a .jsonl file (FireRed format) or a folder of pairs
    mix: list[DatasetEntry] = field(default_factory=list)  # several datasets with weights
    count_weights: dict[int, float] = field(default_factory=dict)  # sampling weight per number of inputs
    max_bad: int = 10  # bad samples skipped (and counted) before the run stops
    resolution: int = 1024  # target pictures are trained at about resolution^2 pixels, bucket aspect
    ref_resolution: int = 1024  # references are VAE-encoded at about ref_resolution^2 (the inference rule)
    vl_resolution: int = 384  # pictures as Qwen2.5-VL sees them (the inference rule)
    batch_size: int = 1  # per process
    cache_dir: str = ""  # embeddings / latents cache, shared by runs; default <output_dir>/cache
    cache_latents: bool = True  # VAE latents cached too (else encoded every step)
    cache_variants: int = 0  # at most this many SIA variants per sample over a run (0: every drawn one; see cache.variant_budget)
    num_workers: int = 0


@dataclass
class SIAConfig:
    shuffle: bool = True  # permute the reference pictures (renumbering "Picture N")
    drop_prob: float = 0.2  # drop an unreferenced reference picture
    chinese_prob: float = 0.5  # use instruction_cn when present
    inverse_prob: float = 0.0  # use the inverse instruction (swapping source and target)
    text_dropout: float = 0.05  # empty instruction, for CFG


@dataclass
class OptimConfig:
    name: str = "adamw8bit"  # adamw | adamw8bit | paged_adamw8bit | lion8bit | adafactor
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    scheduler: str = "constant"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0


@dataclass
class ObjectiveConfig:
    weighting: str = "logit_normal"  # none | logit_normal
    clip: float = 50.0  # elements with |error| above this are ignored (the released trainer's guard)
    ema_decay: float = 0.0  # 0 = no EMA; e.g. 0.999
    # consistency loss (report eqs. 6-8, region form): + eta sigma^2 [sigma < 0.9] * region_consistency(
    # x0_hat, source latent, keep mask), only for samples with exactly one source picture at the
    # target's size (others get no term). 0 = off.
    consistency_weight: float = 0.0  # eta
    consistency_mask: str = "auto"  # auto: keep = latent cells where the pair's source and target agree
    # auto mask: a latent cell (8x8 pixels) is kept when the mean over its 16 channels of
    # |source - target| (normalised latents, about unit variance) is below this
    consistency_threshold: float = 0.1


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (the last step is always saved)
    keep_last: int = 3
    resume: str = "auto"  # auto (latest in output_dir) | none | a checkpoint folder


@dataclass
class ValidationPrompt:
    prompt: str = ""
    pictures: list[str] = field(default_factory=list)


@dataclass
class ValidationConfig:
    every: int = 0  # steps between sample edits (with prompts); 0 = only the loss curve
    prompts: list[ValidationPrompt] = field(default_factory=list)
    steps: int = 20
    cfg: float = 4.0
    seed: int = 42
    resolution: int = 1024


@dataclass
class StageConfig:
    stage: str = "sft"  # sft | pretrain
    train_mode: str = "lora"  # lora | full
    output_dir: str = "runs/firered"
    name: str = "firered_lora"  # file name of the saved LoRA (<output_dir>/<name>.safetensors)
    max_steps: int = 1000
    seed: int = 0
    mixed_precision: str = "bf16"  # bf16 | fp16 | no (autocast around the forward)
    grad_accum: int = 1
    log_every: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sia: SIAConfig = field(default_factory=SIAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def lora_modules(self) -> list[str]:
        return list(self.lora.modules) or list(LORA_PRESETS[self.lora.targets])


def default_config(stage: str = "sft") -> StageConfig:
    """The stage's defaults: SFT = LoRA; pretrain = full fine-tune (AdamW, lr 1e-5, T2I + edit)."""
    if stage not in STAGES:
        raise ConfigError(f"stage: unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    cfg = StageConfig(stage=stage)
    if stage == "pretrain":
        cfg.train_mode = "full"
        cfg.optim = OptimConfig(name="adamw", lr=1e-5)
        cfg.objective.ema_decay = 0.9999
        cfg.sia = SIAConfig(text_dropout=0.1)
    return cfg


# ---------------------------------------------------------------------------------------------
# reading values into dataclasses, with the key in every error
# ---------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} settings, got {value!r}")
        return _fill(tp(), value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, kt, f"{key}.{k}"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _fill(obj, values: dict, prefix: str):
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{key}: unknown setting; {('the settings of ' + prefix) if prefix else 'top-level keys'} are {', '.join(names)}")
        setattr(obj, k, _coerce(v, hints[k], key))
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _nest(path: list[str], value) -> dict:
    out: Any = value
    for p in reversed(path):
        out = {p: out}
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(values: dict, stage: str | None = None) -> StageConfig:
    """A config from a plain mapping (e.g. a checkpoint's ``config.yaml``), over the stage defaults."""
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(values).__name__}")
    stage = stage or values.get("stage") or "sft"
    cfg = _fill(default_config(str(stage)), {k: v for k, v in values.items() if k != "stage"}, "")
    cfg.stage = str(stage)
    validate(cfg)
    return cfg


def load_config(path=None, overrides: list[str] = (), stage: str | None = None) -> StageConfig:
    """Read a YAML config (optional) and apply ``key=value`` overrides (dotted keys); the result is
    validated. ``stage`` (from the command line) wins over the file's ``stage:``."""
    import yaml

    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: expected a mapping of settings at the top level")
    for item in overrides:
        keys, value = _parse_override(item)
        values = _merge(values, _nest(keys, value))
    if stage is not None:
        file_stage = values.get("stage")
        if file_stage not in (None, stage):
            raise ConfigError(f"stage: the config file is for {file_stage!r} but the {stage!r} stage was asked for")
        values["stage"] = stage
    return from_dict(values)


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
    for k in ("resolution", "ref_resolution", "vl_resolution"):
        v = getattr(cfg.data, k)
        _check(v >= 16 and v % 16 == 0, f"data.{k}", f"must be a positive multiple of 16 pixels, got {v}")
    _check(cfg.data.max_bad >= 0, "data.max_bad", f"must be >= 0, got {cfg.data.max_bad}")
    for k in ("drop_prob", "chinese_prob", "inverse_prob", "text_dropout"):
        v = getattr(cfg.sia, k)
        _check(0 <= v <= 1, f"sia.{k}", f"must be a probability in [0, 1], got {v}")
    _check(cfg.checkpoint.every >= 1, "checkpoint.every", f"must be >= 1, got {cfg.checkpoint.every}")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {cfg.checkpoint.keep_last}")
    _check(cfg.validation.every >= 0, "validation.every", f"must be >= 0, got {cfg.validation.every}")
    for i, p in enumerate(cfg.validation.prompts):
        _check(bool(p.prompt.strip()), f"validation.prompts[{i}].prompt", "empty prompt")
        _check(len(p.pictures) <= 3, f"validation.prompts[{i}].pictures", f"0 to 3 pictures, got {len(p.pictures)}")
    return cfg


def config_hash(cfg: StageConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
