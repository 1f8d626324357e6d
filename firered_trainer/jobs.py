"""One LoRA training job over the files users hold, whatever the stage: what the ComfyUI node runs.

A job names the three model files, a dataset, a preset from ``firered_trainer/configs`` (any stage's,
by its ``stage:`` key) and a few common knobs; :func:`run_lora_job` turns them into that
stage's overrides, runs it, and :func:`install_lora` puts the result where ComfyUI's loaders look.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: presets shown first, in this order
PREFERRED = ("sft_lora_24gb", "tiny_cpu")


def lora_presets() -> list[str]:
    """The presets in ``firered_trainer/configs`` that train a LoRA (not ``train_mode: full``)."""
    names = [p.stem for p in CONFIG_DIR.glob("*.yaml") if "train_mode: full" not in p.read_text(encoding="utf-8")]
    order = {n: i for i, n in enumerate(PREFERRED)}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def preset_stage(preset: str) -> str:
    """The preset's stage: its ``stage:`` key (``sft`` when it has none)."""
    path = CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ValueError(f"preset {preset!r}: no {path.name} in {CONFIG_DIR}")
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("stage:"):
            return line.split(":", 1)[1].split("#")[0].strip()
    return "sft"


def lora_file_name(name: str) -> str:
    """A LoRA name as given by a user -> a plain file stem (no folders), or a clear error."""
    stem = name.strip().removesuffix(".safetensors")
    if not stem or any(c in stem for c in "/\\:") or stem.startswith("."):
        raise ValueError(f"lora_name {name!r}: give a plain file name (letters, digits, - and _), without folders")
    return stem


@dataclass
class LoraJob:
    """transformer / text_encoder / vae: model files; tokenizer: a tokenizer folder or None;
    dataset: pairs (SFT: folder or JSONL), preference JSONL (DPO) or prompt JSONL (NFT);
    output_dir: the run's folder (checkpoints, curves; the same folder resumes); overrides:
    more ``key=value`` settings of the stage's config."""

    transformer: Path
    text_encoder: Path
    vae: Path
    dataset: Path
    name: str
    preset: str
    output_dir: Path
    tokenizer: Path | None = None
    steps: int = 1000
    learning_rate: float = 1e-4
    rank: int = 32
    resolution: int = 1024
    seed: int = 0
    overrides: list[str] = field(default_factory=list)


@dataclass
class JobResult:
    """lora: the LoRA in ComfyUI's layout (None if none was written); stopped: ended by ``should_stop``
    after saving a resumable checkpoint; losses: ``[[step, loss], ...]``."""

    lora: Path | None
    stopped: bool
    losses: list[list[float]]


Progress = Callable[[int, int, float, "list | None"], None]


def run_lora_job(job: LoraJob, *, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                 device=None, dtype=None) -> JobResult:
    """Run ``job`` with its preset's stage. ``progress(step, total, loss, pictures or None)`` after
    each step (RL stages report their row's ``loss``); ``device`` / ``dtype``: where the RL stages
    load the model (the SFT stage places it itself)."""
    stage = preset_stage(job.preset)
    preset_file = str(CONFIG_DIR / f"{job.preset}.yaml")
    losses: list[list[float]] = []

    def report(step, total, loss, pictures=None):
        if isinstance(loss, dict):  # the RL stages report a row of metrics
            loss = loss.get("loss", float("nan"))
        losses.append([int(step), float(loss)])
        if progress is not None:
            progress(int(step), int(total), float(loss), pictures)

    if stage in ("sft", "pretrain"):
        from . import sft

        settings = [
            f"model.transformer={job.transformer}", f"model.text_encoder={job.text_encoder}", f"model.vae={job.vae}",
            f"output_dir={job.output_dir}", f"name={job.name}", f"seed={job.seed}", f"data.jsonl={job.dataset}",
            f"max_steps={job.steps}", f"optim.lr={job.learning_rate}", f"lora.rank={job.rank}", f"lora.alpha={job.rank}",
            f"data.resolution={job.resolution}",
        ] + ([f"model.tokenizer={job.tokenizer}"] if job.tokenizer else [])
        result = sft.run(preset_file, overrides=settings + job.overrides, progress=report, should_stop=should_stop)
        return JobResult(result.lora, result.stopped, losses)
    if stage in ("dpo", "nft"):
        import importlib

        from firered_core import FireRedEditor

        editor = FireRedEditor.from_files(None, transformer=job.transformer, text_encoder=job.text_encoder, vae=job.vae,
                                          tokenizer=job.tokenizer, device=device or "cpu", dtype=dtype or "fp32")
        settings = [
            f"model.transformer={job.transformer}", f"output_dir={job.output_dir}", f"name={job.name}",
            f"seed={job.seed}", f"max_steps={job.steps}", f"optim.lr={job.learning_rate}", f"lora.rank={job.rank}",
            f"lora.alpha={2 * job.rank}", f"{stage}.width={job.resolution}", f"{stage}.height={job.resolution}",
            f"device={device or 'cpu'}", f"data.jsonl={job.dataset}",
        ]
        mod = importlib.import_module(f".rl.{stage}", __package__)
        res = mod.run(preset_file, overrides=settings + job.overrides, progress=report, should_stop=should_stop, editor=editor)
        return JobResult(res["lora"], res["stopped"], losses)
    raise ValueError(f"preset {job.preset!r} is for the {stage!r} stage; a LoRA job runs sft, dpo or nft")


def install_lora(lora: Path, folder: Path, name: str) -> Path:
    """Copy ``lora`` to ``folder/<name>.safetensors`` atomically (a reader never sees half a file)."""
    dest = Path(folder) / f"{lora_file_name(name)}.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".safetensors.tmp")
    shutil.copyfile(lora, tmp)
    os.replace(tmp, dest)
    return dest
