"""One typed config for every training stage: dataclasses, read from a commented YAML file plus
``key=value`` dotted overrides, checked with errors that name the key, and written into every
checkpoint.

>>> cfg = load_config("firered_trainer/configs/sft_lora_24gb.yaml", ["data.jsonl=pairs.jsonl", "optim.lr=1e-4"])
>>> cfg.optim.lr
0.0001

All four stages (``sft``, ``pretrain``, ``dpo``, ``nft``) read :class:`StageConfig`. They share its
sections (``model``, ``lora``, ``data``, ``optim``, ``checkpoint``, ``validation``, ...) and differ in
their defaults (:func:`default_config`): pretrain is a full fine-tune on a text-to-image + edit
mixture, SFT a LoRA on edit pairs, DPO a LoRA on preference pairs (``data.jsonl``), NFT a LoRA on
prompts (``data.jsonl``). What only one RL stage has lives in its section, ``dpo:`` or ``nft:``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("sft", "pretrain", "dpo", "nft")
RL_STAGES = ("dpo", "nft")
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
    # FireRed's set without the modulation linears (DiffSynth / FireRed train/): the RL stages' default
    "firered_nomod": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                      "img_mlp.net.2", "txt_mlp.net.2"],
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
    fsdp: bool = False  # full fine-tune on several processes: shard the MM-DiT (torch FSDP2, one unit per block)


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
class DPOSection:
    """The DPO stage's own settings (report eq. 2, asymmetric gradient optimization)."""

    width: int = 512  # the pairs are trained at this output size (multiples of 16)
    height: int = 512
    # eq. 2: -log sigmoid(beta [(L^l - L^l_ref) - omega (L^w - L^w_ref)]) + lam L^w
    beta: float = 100.0  # flow-matching scale
    omega: float = 1.5  # > 1: the preferred term's gradient is omega times the rejected one's
    lam: float = 1.0  # SFT anchor on the preferred edit


@dataclass
class NFTSection:
    """The NFT stage's own settings (DiffusionNFT with the report's rewards)."""

    reward: Any = "brightness"  # a name or {name: weight | {weight, **options}}, see firered_trainer.rl.rewards
    prompts_per_step: int = 1  # prompt groups per step and process
    group_size: int = 8  # rollouts per prompt; rewards are normalised within each group
    sample_steps: int = 10
    sampler: str = "euler"
    schedule: str = "flowmatch"
    width: int = 512
    height: int = 512
    beta: float = 1.0  # DiffusionNFT's beta (implicit positive / negative policy step)
    adv_clip_max: float = 5.0
    kl_weight: float = 1e-4  # to the LoRA-off reference; 0 = off
    weighting: str = "adaptive"
    old_decay: str = "ramp"  # the old policy's EMA schedule
    timesteps_per_sample: int = 1
    train_timesteps: str = "shift"  # shift (fresh sigma, SFT's training shift) | sampler (DiffusionNFT: the rollout grid)
    timestep_fraction: float = 0.99  # with train_timesteps=sampler: the share of the grid's steps trained on
    micro_batch: int = 4
    validation_seeds: int = 4  # with validation.every: fixed-seed samples of the first prompt


@dataclass
class StageConfig:
    stage: str = "sft"  # sft | pretrain | dpo | nft
    train_mode: str = "lora"  # lora | full
    output_dir: str = "runs/firered"
    name: str = "firered_lora"  # file name of the saved LoRA (<output_dir>/<name>.safetensors)
    max_steps: int = 1000
    seed: int = 0
    mixed_precision: str = "bf16"  # bf16 | fp16 | no (autocast around the forward)
    grad_accum: int = 1
    log_every: int = 10
    device: str = "auto"  # dpo / nft: auto | cpu | cuda[:N] (sft / pretrain: accelerate's placement)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sia: SIAConfig = field(default_factory=SIAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    dpo: DPOSection = field(default_factory=DPOSection)
    nft: NFTSection = field(default_factory=NFTSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def lora_modules(self) -> list[str]:
        return list(self.lora.modules) or list(LORA_PRESETS[self.lora.targets])

    def model_name(self) -> str:
        """The base model's name for LoRA metadata: ``model.id``, else the folder's or file's name."""
        return self.model.id or Path(self.model.path or self.model.transformer or "FireRed-Image-Edit").name


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
    if stage in RL_STAGES:  # one source picture, at a fixed output size (the stage's section)
        cfg.name = f"{stage}_lora"
        cfg.model.gradient_checkpointing = False
        cfg.lora = LoraConfig(rank=32, alpha=64.0, targets="firered_nomod")
        cfg.data.ref_resolution, cfg.data.vl_resolution = 512, 384
        cfg.checkpoint.resume = "auto"
    if stage == "dpo":
        cfg.max_steps = 1000
        cfg.optim = OptimConfig(name="adamw", lr=5e-5, weight_decay=0.01, warmup_steps=500)
        cfg.checkpoint.every = 250
    if stage == "nft":
        cfg.max_steps = 500
        cfg.optim = OptimConfig(name="adamw", lr=3e-4, weight_decay=1e-4)
        cfg.checkpoint.every = 50
    return cfg


#: the RL stages' flat keys of before they became sections of this config -> where each lives now
_RL_MOVED = {
    "data": "data.jsonl", "prompts": "data.jsonl", "steps": "max_steps", "max_bad": "data.max_bad",
    "batch_size": "data.batch_size", "ref_area": "data.ref_resolution (the side in pixels, e.g. 512)",
    "vl_area": "data.vl_resolution (the side in pixels, e.g. 384)", "optimizer": "optim.name", "lr": "optim.lr",
    "weight_decay": "optim.weight_decay", "warmup_steps": "optim.warmup_steps", "grad_clip": "optim.grad_clip",
    "lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "dtype": "model.dtype",
    "gradient_checkpointing": "model.gradient_checkpointing", "save_every": "checkpoint.every",
    "resume": "checkpoint.resume (auto | none | a checkpoint folder)", "validate_every": "validation.every", "nft_beta": "nft.beta",
    **{k: f"dpo.{k}" for k in ("beta", "omega", "lam")},
    **{f.name: f"nft.{f.name}" for f in dataclasses.fields(NFTSection) if f.name not in ("beta",)},
}  # fmt: skip


def _moved_key_error(values: dict, stage: str) -> None:
    for k, v in values.items():
        if k == "model" and isinstance(v, str):
            raise ConfigError(f"model: a mapping now; the release folder is model.path={v}")
        if k in _RL_MOVED and k not in {f.name for f in dataclasses.fields(StageConfig)}:
            where = _RL_MOVED[k]
            if stage == "dpo" and k in ("width", "height"):
                where = f"dpo.{k}"
            raise ConfigError(f"{k}: unknown setting; the {stage} stage's settings are sections of the one stage "
                              f"config now: use {where}")


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
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):  # a section: over the stage's defaults
            setattr(obj, k, _fill(dataclasses.replace(current), v, key))
        else:
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
    if stage in RL_STAGES:
        _moved_key_error(values, str(stage))
    cfg = _fill(default_config(str(stage)), {k: v for k, v in values.items() if k != "stage"}, "")
    cfg.stage = str(stage)
    from .config_checks import validate

    validate(cfg)
    return cfg


def load_config(path=None, overrides: list[str] | dict = (), stage: str | None = None) -> StageConfig:
    """Read a YAML config (optional; or a mapping of settings) and apply overrides: ``key=value``
    strings or a mapping, with dotted keys for sections (``optim.lr=1e-4``); the result is validated.
    ``stage`` (from the command line) wins over the file's ``stage:``."""
    import copy

    import yaml

    values: dict = {}
    if isinstance(path, dict):  # settings given directly: nested sections or dotted keys
        for k, v in path.items():
            values = _merge(values, _nest(str(k).split("."), copy.deepcopy(v)))
    elif path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: expected a mapping of settings at the top level")
    items = [(k.split("."), v) for k, v in overrides.items()] if isinstance(overrides, dict) else map(_parse_override, overrides)
    for keys, value in items:
        values = _merge(values, _nest(keys, value))
    if stage is not None:
        file_stage = values.get("stage")
        if file_stage not in (None, stage):
            raise ConfigError(f"stage: the config file is for {file_stage!r} but the {stage!r} stage was asked for")
        values["stage"] = stage
    return from_dict(values)


def config_hash(cfg: StageConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
