"""Parts the DPO and NFT stages share: their config (the one :class:`firered_trainer.config.StageConfig`)
and editor, the trained policy (LoRA adapters or full weights) with its reference and old-policy views, their
state in every stage's checkpoint folders (:mod:`firered_trainer.checkpoint`: atomic, exact resume,
past a damaged newest one),
the metrics curve, and the prompt / preference JSONL readers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import LORA_PRESETS, ConfigError  # every stage's one config error (it names the key), re-exported

# ---------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------


def stage_config(stage: str, config, overrides=None):
    """The stage's :class:`firered_trainer.config.StageConfig` from a config, a YAML path or a
    mapping of settings, plus overrides (``key=value`` strings or a mapping; dotted keys)."""
    from ..config import StageConfig, load_config

    if isinstance(config, StageConfig):
        if config.stage != stage:
            raise ConfigError(f"stage: the {stage} stage was given a config for {config.stage!r}")
        if overrides:
            raise ConfigError("overrides: apply them when loading the config (load_config(path, overrides))")
        return config
    return load_config(config, overrides or (), stage=stage)


def lora_rank(cfg) -> int:
    """The policy's LoRA rank: ``lora.rank``, or 0 (full weights) with ``train_mode: full``."""
    return cfg.lora.rank if cfg.train_mode == "lora" else 0


def load_editor(cfg, device: str):
    """The editor a stage trains: ``model.path`` (a release folder), or the single files
    ``model.transformer`` / ``text_encoder`` / ``vae`` (over the folder, when both are given)."""
    from firered_core import FireRedEditor

    m = cfg.model
    if m.transformer or m.text_encoder or m.vae:
        return FireRedEditor.from_files(m.path or None, transformer=m.transformer or None, text_encoder=m.text_encoder or None,
                                        vae=m.vae or None, tokenizer=m.tokenizer or None, device=device, dtype=m.dtype)
    if not m.path:
        raise ConfigError("model.path: no model: set model.path=<release folder> (or model.transformer / "
                          "model.text_encoder / model.vae files)")
    return FireRedEditor.from_pretrained(m.path, device=device, dtype=m.dtype)


# ---------------------------------------------------------------------------------------------
# Policy: LoRA (reference = adapters off) or full (reference = a frozen copy)
# ---------------------------------------------------------------------------------------------

#: FireRed's own LoRA target set without the modulation layers (DiffSynth / FireRed ``train/``).
LORA_TARGETS = tuple(LORA_PRESETS["firered_nomod"])


class Policy:
    """The trained transformer and its two frozen views.

    ``lora_rank > 0``: PEFT LoRA adapters are added to ``transformer`` (diffusers ``add_adapter``);
    the **reference** is the same module with the adapters switched off. ``lora_rank == 0``: full
    fine-tuning; the reference is a frozen copy (made only when ``need_reference``).
    The **old policy** is an EMA of the trainable weights (float32), swapped in for a forward pass.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        *,
        lora_rank: int = 32,
        lora_alpha: float = 64.0,
        targets=LORA_TARGETS,
        need_reference: bool = True,
        keep_old: bool = False,
        seed: int = 0,
    ):
        self.transformer = transformer
        self.lora = lora_rank > 0
        self.lora_rank, self.lora_alpha, self.targets = lora_rank, lora_alpha, tuple(targets)
        self._ref_copy = None
        if self.lora:
            from peft import LoraConfig

            transformer.requires_grad_(False)
            torch.manual_seed(seed)
            transformer.add_adapter(
                LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(targets), init_lora_weights="gaussian")
            )
            # gaussian init gives lora_B = 0: the adapter starts as the identity
        else:
            import copy

            transformer.requires_grad_(True)
            if need_reference:
                self._ref_copy = copy.deepcopy(transformer).requires_grad_(False).eval()
        self.names = [n for n, p in transformer.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the policy has no trainable parameters (no LoRA target matched?)")
        self.old: dict[str, torch.Tensor] | None = (
            {n: p.detach().float().clone() for n, p in self.trainable()} if keep_old else None
        )

    def trainable(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        names = set(self.names)
        for n, p in self.transformer.named_parameters():
            if n in names:
                yield n, p

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.trainable()]

    @contextmanager
    def reference(self):
        """The frozen reference: the base with the LoRA switched off (or the frozen copy)."""
        if self.lora:
            self.transformer.disable_adapters()
            try:
                yield self.transformer
            finally:
                self.transformer.enable_adapters()
        else:
            if self._ref_copy is None:
                raise RuntimeError("full fine-tuning was set up without a reference copy")
            yield self._ref_copy

    @contextmanager
    def old_policy(self):
        """The old policy's weights (the EMA) swapped in; the trained ones restored after."""
        if self.old is None:
            raise RuntimeError("the policy keeps no old-policy EMA (keep_old=False)")
        saved = {}
        with torch.no_grad():
            for n, p in self.trainable():
                saved[n] = p.detach().clone()
                p.copy_(self.old[n].to(p.dtype))
        try:
            yield self.transformer
        finally:
            with torch.no_grad():
                for n, p in self.trainable():
                    p.copy_(saved[n])

    @torch.no_grad()
    def update_old(self, decay: float) -> None:
        """``old <- decay * old + (1 - decay) * theta``."""
        for n, p in self.trainable():
            self.old[n].mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    def state_dict(self) -> dict:
        return {
            "weights": {n: p.detach().cpu().clone() for n, p in self.trainable()},
            "old": {k: v.cpu().clone() for k, v in self.old.items()} if self.old is not None else None,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        w = state["weights"]
        missing = sorted(set(self.names) - set(w))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
        for n, p in self.trainable():
            p.copy_(w[n].to(p.device, p.dtype))
        if self.old is not None and state.get("old") is not None:
            self.old = {k: v.float().clone() for k, v in state["old"].items()}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA in ComfyUI's layout: ``diffusion_model.<module>.lora_A/lora_B.weight`` plus
        ``.alpha`` (ComfyUI scales by alpha / rank; diffusers and this pack read it too)."""
        if not self.lora:
            raise ValueError("lora_state_dict() needs a LoRA policy (lora_rank > 0)")
        out = {}
        for n, p in self.trainable():
            mod, _, rest = n.partition(".lora_")
            kind = rest.split(".")[0]  # A or B
            out[f"diffusion_model.{mod}.lora_{kind}.weight"] = p.detach().to("cpu", torch.float32).contiguous()
            out[f"diffusion_model.{mod}.alpha"] = torch.tensor(float(self.lora_alpha))
        return out


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, metrics
# ---------------------------------------------------------------------------------------------


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then ``os.replace`` onto ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_lora(policy: Policy, path: Path, *, stage: str, steps: int, config: dict | None = None,
              base_model: str = "FireRed-Image-Edit") -> Path:
    """Write the trained LoRA in ComfyUI's layout at ``path`` (and, through the trainer's
    :func:`firered_trainer.lora.save_lora` when present, the diffusers / PEFT layout beside it as
    ``<stem>_diffusers.safetensors``). Atomic."""
    path = Path(path)
    try:
        from ..lora import save_lora as trainer_save_lora
    except ImportError:
        trainer_save_lora = None
    if trainer_save_lora is not None:
        mods = list(policy.targets)
        trainer_save_lora(
            policy.transformer, path, path.with_name(path.stem + "_diffusers.safetensors"), rank=policy.lora_rank,
            alpha=policy.lora_alpha, modules=mods, base_model=base_model, steps=steps,
            config={"stage": stage, **(config or {})}, dtype=torch.float32,
        )  # fmt: skip
        return path
    from safetensors.torch import save_file

    sd = policy.lora_state_dict()
    meta = {"firered.stage": stage, "firered.steps": str(steps), "firered.rank": str(policy.lora_rank),
            "firered.alpha": str(policy.lora_alpha), "firered.config": json.dumps(config or {}, default=str)}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return path


def plot_curve(curve: "Curve", path: Path, keys=("reward", "loss")) -> Path | None:
    """The run's curves (one panel per key present) as a PNG, if matplotlib is installed."""
    rows = curve.read()
    keys = [k for k in keys if rows and k in rows[0]]
    if not keys:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        try:  # the trainer's PIL plotter: the first curve only
            from ..validation import plot_loss
        except ImportError:
            return None
        return plot_loss([(r["step"], r[keys[0]]) for r in rows if keys[0] in r], path, title=keys[0])
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.5 * len(keys)), dpi=100, squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, k in zip(axes[:, 0], keys):
        ax.plot(steps, [r.get(k, float("nan")) for r in rows], lw=1.0)
        ax.set_ylabel(k)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)


def average_and_clip(params: list, world: int, grad_clip: float | None) -> float | None:
    """Average the gradients over the ``world`` processes (all-reduce, then / world: what DDP
    does), then clip their norm to ``grad_clip`` when set; returns the norm before clipping."""
    if world > 1:
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)
    if grad_clip and grad_clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    return None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(run, cfg, meta: dict | None = None) -> Path:
    """The run's state as every stage's checkpoint folder (:func:`firered_trainer.checkpoint.write_checkpoint`):
    ``trainable.safetensors`` (the trained weights) and ``state.pt`` (step, optimizer, scheduler,
    RNG states, the old-policy EMA) beside ``config.yaml`` and the manifest. Main process only."""
    from safetensors.torch import save_file

    from ..checkpoint import write_checkpoint

    state = run.state()
    policy = state.pop("policy")
    state.pop("config", None)  # config.yaml holds it

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in policy["weights"].items()}, str(tmp / "trainable.safetensors"))
        torch.save({**state, "old_policy": policy["old"]}, tmp / "state.pt")

    return write_checkpoint(cfg.output_dir, run.step, write, config_yaml=cfg.to_yaml(), meta=meta,
                            keep_last=cfg.checkpoint.keep_last)


#: what every RL stage's ``state.pt`` holds
_STATE_KEYS = ("step", "optimizer", "rng")


def load_checkpoint(path: Path) -> dict:
    """The state :func:`save_checkpoint` wrote, in the form the runs' ``load`` takes; the folder is
    verified first (:func:`firered_trainer.checkpoint.verify_checkpoint`), and a damaged or foreign
    file raises :class:`firered_trainer.checkpoint.CorruptCheckpoint` naming it."""
    from safetensors.torch import load_file

    from ..checkpoint import CorruptCheckpoint, verify_checkpoint

    path = Path(path)
    verify_checkpoint(path)
    f = path / "state.pt"
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CorruptCheckpoint(f, "missing (a DPO / NFT checkpoint has one)") from None
    except Exception as e:  # noqa: BLE001 -- a file torch cannot read back is unusable, whatever the reason
        why = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__  # torch's first sentence
        raise CorruptCheckpoint(f, f"not a readable torch.save file ({why})") from None
    lacking = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if lacking:
        raise CorruptCheckpoint(f, f"expected a DPO / NFT state with {list(_STATE_KEYS)}, it lacks {lacking}")
    old = state.pop("old_policy", None)
    return {**state, "policy": {"weights": load_file(str(path / "trainable.safetensors")), "old": old}}


class Curve:
    """Append-only JSONL of per-step metrics (``metrics.jsonl``); on resume the lines after the
    checkpoint's step are dropped, so the file is the curve of one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None, *, fresh: bool = False):
        """``fresh``: start an empty curve (a new run); ``resume_step``: keep the rows up to it;
        neither: open as is (to read)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))
        elif fresh and self.path.is_file():
            self.path.unlink()

    def log(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------
# Data: prompts (NFT) and preference pairs (DPO)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptSample:
    """One NFT prompt. source: picture path or None (text-to-image); target_text / target_box:
    what the OCR reward checks (optional); where: ``file:line``."""

    instruction: str
    source: str | None = None
    target_text: str | None = None
    target_box: tuple[float, float, float, float] | None = None
    where: str = ""


@dataclasses.dataclass(frozen=True)
class PreferenceSample:
    """One DPO pair: the same source and instruction, a preferred and a rejected edit (paths)."""

    instruction: str
    preferred: str
    rejected: str
    source: str | None = None
    where: str = ""


def _source(rec, base, where):
    from ..data import DataError, picture_size

    src = rec.get("source_image")
    if isinstance(src, list):
        if len(src) != 1:
            raise DataError(f"{where}: the RL stage takes one source picture per sample, got {len(src)}")
        src = src[0]
    if src is None:
        return None
    if not isinstance(src, str):
        raise DataError(f"{where}: 'source_image' must be a path or null")
    picture_size(base / src, where)
    return str(base / src)


def read_prompts(path, *, max_bad: int = 10, report=None) -> list[PromptSample]:
    """NFT prompts, JSONL: ``{"instruction", "source_image"?, "target_text"?, "target_box"?}``;
    bad lines are skipped and counted as in every stage (:func:`firered_trainer.data.read_records`)."""
    from ..data import DataError, read_records

    def parse(rec, base, where):
        ins = rec.get("instruction") or rec.get("instruction_cn")
        if not isinstance(ins, str) or not ins.strip():
            raise DataError(f"{where}: no instruction")
        box = rec.get("target_box")
        if box is not None and (not isinstance(box, list) or len(box) != 4):
            raise DataError(f"{where}: 'target_box' must be [x0, y0, x1, y1] in output pixels")
        return PromptSample(ins, _source(rec, base, where), rec.get("target_text"), tuple(box) if box else None, where)

    return read_records(path, parse, max_bad=max_bad, report=report, what="prompts")


def read_preferences(path, *, max_bad: int = 10, report=None) -> list[PreferenceSample]:
    """DPO pairs, JSONL: ``{"source_image"?, "instruction", "preferred", "rejected"}`` (also
    accepted: ``chosen`` / ``win`` for the preferred edit and ``lose`` for the rejected one); bad
    lines are skipped and counted as in every stage."""
    from ..data import DataError, picture_size, read_records

    def parse(rec, base, where):
        ins = rec.get("instruction") or rec.get("instruction_cn")
        if not isinstance(ins, str) or not ins.strip():
            raise DataError(f"{where}: no instruction")
        pref = rec.get("preferred", rec.get("chosen", rec.get("win")))
        rej = rec.get("rejected", rec.get("lose"))
        if not isinstance(pref, str) or not isinstance(rej, str):
            raise DataError(f"{where}: a preference pair needs 'preferred' and 'rejected' picture paths")
        picture_size(base / pref, where)
        picture_size(base / rej, where)
        return PreferenceSample(ins, str(base / pref), str(base / rej), _source(rec, base, where), where)

    return read_records(path, parse, max_bad=max_bad, report=report, what="preference pairs")


# ---------------------------------------------------------------------------------------------
# The loop both stages share
# ---------------------------------------------------------------------------------------------


def run_stage(cfg, make_run: Callable[[], Any], *, stage: str, curve_keys, progress=None, should_stop=None,
              after_step: Callable[[Any, dict, bool], None] | None = None) -> dict:
    """Resume from the last checkpoint (``checkpoint.resume: auto``), iterate ``make_run()``'s
    ``iteration()`` up to ``max_steps`` (``after_step(run, row, is_main)`` may add to a row), log the
    curve, checkpoint every ``checkpoint.every`` steps and on a stop (keeping the last
    ``checkpoint.keep_last``), then save the LoRA (``<output_dir>/<name>.safetensors``) and plot the curves.
    Returns ``{"lora", "steps", "stopped", "curve", "run"}``."""
    from ..checkpoint import clean_partial, find_resume
    from .nft import _dist

    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    main = _dist()[0] == 0
    if main:
        clean_partial(out)
    # the newest usable checkpoint (every stage's rule); damaged newer ones are moved aside with one log line
    found = find_resume(out, cfg.checkpoint.resume, check=load_checkpoint, is_main=main)
    state = found.value if found is not None else None
    r = make_run()
    if state is not None:
        r.load(state)
    curve = Curve(out / "metrics.jsonl", resume_step=r.step if state is not None else None, fresh=state is None)
    is_main = r.rank == 0

    def save():
        if is_main:
            save_checkpoint(r, cfg)

    stopped = False
    while r.step < cfg.max_steps:
        if should_stop is not None and should_stop():
            stopped = True
            break
        row = r.iteration()
        if after_step is not None:
            after_step(r, row, is_main)
        if is_main:
            curve.log(row)
        if progress is not None:
            progress(r.step, cfg.max_steps, row)
        if r.step % cfg.checkpoint.every == 0:
            save()
    if r.step and (stopped or r.step % cfg.checkpoint.every):
        save()
    lora = None
    if is_main and r.policy.lora:
        lora = save_lora(r.policy, out / f"{cfg.name}.safetensors", stage=stage, steps=r.step,
                         config=cfg.to_dict(), base_model=cfg.model_name())
    if is_main:
        plot_curve(curve, out / "curves.png", keys=curve_keys)
    return {"lora": lora, "steps": r.step, "stopped": stopped, "curve": out / "metrics.jsonl", "run": r}
