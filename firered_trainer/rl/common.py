"""Parts the DPO and NFT stages share: typed configs from YAML with ``key=value`` overrides, the
trained policy (LoRA adapters or full weights) with its reference and old-policy views, atomic
checkpoints with exact resume (past a damaged newest one: :func:`firered_trainer.checkpoint.choose_resume`),
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

from ..config import ConfigError  # every stage's one config error (it names the key), re-exported

# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def _coerce(cls_field: dataclasses.Field, value: Any, where: str):
    t = cls_field.type if isinstance(cls_field.type, str) else getattr(cls_field.type, "__name__", str(cls_field.type))
    if value is None:
        return None
    try:
        if t.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if t.startswith("int"):
            return int(value)
        if t.startswith("float"):
            return float(value)
        if t.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {cls_field.name} expects {t}, got {value!r}") from None
    return value


def load_config(cls, path=None, overrides: Any = None):
    """Build the dataclass ``cls`` from a YAML file (optional) and ``key=value`` overrides (a list
    of strings, whose values are parsed as YAML, or a dict). Unknown keys are errors."""
    import yaml

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of options, got {type(loaded).__name__}")
        data.update(loaded)
    if isinstance(overrides, dict):
        data.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must be key=value")
            k, v = item.split("=", 1)
            try:
                data[k.strip()] = yaml.safe_load(v)
            except yaml.YAMLError:
                raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(fields)}")
    kw = {k: _coerce(fields[k], v, str(path or "override")) for k, v in data.items()}
    missing = [n for n, f in fields.items() if n not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{cls.__name__} needs {missing}" + (f" (in {path})" if path else ""))
    cfg = cls(**kw)
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


# ---------------------------------------------------------------------------------------------
# Policy: LoRA (reference = adapters off) or full (reference = a frozen copy)
# ---------------------------------------------------------------------------------------------

#: FireRed's own LoRA target set without the modulation layers (DiffSynth / FireRed ``train/``).
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "img_mlp.net.2", "txt_mlp.net.2",
)  # fmt: skip


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


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, **state) -> None:
    """One file holding everything to resume (weights, EMA, optimizer, step, RNG, config)."""
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def list_checkpoints(folder: Path) -> list[Path]:
    """The ``step_N.pt`` checkpoints of ``folder``, oldest first (``*.corrupt`` ones set aside are not listed)."""
    found = [p for p in Path(folder).glob("step_*.pt") if p.stem.split("_")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.stem.split("_")[1]))


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


#: what every stage's :meth:`state` holds
_STATE_KEYS = ("step", "policy", "optimizer", "rng")


def load_checkpoint(path: Path) -> dict:
    """The state saved by :func:`save_checkpoint`; a truncated or foreign file raises
    :class:`firered_trainer.checkpoint.CorruptCheckpoint` naming it."""
    from ..checkpoint import CorruptCheckpoint

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CorruptCheckpoint(path, "missing") from None
    except Exception as e:  # noqa: BLE001 -- a file torch cannot read back is unusable, whatever the reason
        why = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__  # torch's first sentence
        raise CorruptCheckpoint(path, f"{path.stat().st_size if path.exists() else 0} bytes, not a readable "
                                      f"torch.save checkpoint ({why}; truncated?)") from None
    lacking = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if lacking:
        raise CorruptCheckpoint(path, f"expected a stage checkpoint with {list(_STATE_KEYS)}, it lacks {lacking}")
    return state


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


def stage_config(cls, config, overrides=None):
    """A stage's config from an instance of ``cls``, a YAML path (+ ``key=value`` overrides) or a dict."""
    if isinstance(config, cls):
        return config
    if isinstance(config, dict):
        return load_config(cls, None, {**config, **(overrides or {})})
    return load_config(cls, config, overrides)


def run_stage(cfg, make_run: Callable[[], Any], *, stage: str, curve_keys, progress=None, should_stop=None,
              after_step: Callable[[Any, dict, bool], None] | None = None) -> dict:
    """Resume from the last checkpoint, iterate ``make_run()``'s ``iteration()`` up to ``cfg.steps``
    (``after_step(run, row, is_main)`` may add to a row), log the curve, checkpoint every
    ``save_every`` steps and on a stop (keeping the last two), then save the LoRA and plot the curves.
    Returns ``{"lora", "steps", "stopped", "curve", "run"}``."""
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    torch.manual_seed(cfg.seed)
    state = None
    if cfg.resume:
        # the newest readable checkpoint; damaged newer ones are moved aside (step_N.pt.corrupt) with one log line
        from ..checkpoint import choose_resume
        from .nft import _dist

        found = choose_resume(list_checkpoints(ckpt_dir), load_checkpoint, is_main=_dist()[0] == 0,
                              start_afresh="resume=false")
        state = found.value if found is not None else None
    r = make_run()
    if state is not None:
        r.load(state)
    curve = Curve(out / "metrics.jsonl", resume_step=r.step if state is not None else None, fresh=state is None)
    is_main = r.rank == 0

    def save():
        if is_main:
            save_checkpoint(ckpt_dir / f"step_{r.step}.pt", **r.state())
            for old in sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[:-2]:
                old.unlink()

    stopped = False
    while r.step < cfg.steps:
        if should_stop is not None and should_stop():
            stopped = True
            break
        row = r.iteration()
        if after_step is not None:
            after_step(r, row, is_main)
        if is_main:
            curve.log(row)
        if progress is not None:
            progress(r.step, cfg.steps, row)
        if cfg.save_every and r.step % cfg.save_every == 0:
            save()
    if r.step and (stopped or r.step % max(cfg.save_every, 1)):
        save()
    lora = None
    if is_main and r.policy.lora:
        lora = save_lora(r.policy, out / f"{stage}_lora.safetensors", stage=stage, steps=r.step,
                         config=dataclasses.asdict(cfg), base_model=cfg.model)
    if is_main:
        plot_curve(curve, out / "curves.png", keys=curve_keys)
    return {"lora": lora, "steps": r.step, "stopped": stopped, "curve": out / "metrics.jsonl", "run": r}


def cli_main(argv, run, *, prog: str, description: str, example: str, show) -> int:
    """``python -m firered_trainer <stage> --config FILE key=value ...``: run with ``show(step, total, row)``."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", required=True, help=f"YAML file (see {example})")
    ap.add_argument("overrides", nargs="*", help="key=value options overriding the file")
    a = ap.parse_args(argv)
    from ..__main__ import _reported

    def go() -> int:
        res = run(a.config, overrides=a.overrides, progress=show)
        print(f"done: {res['steps']} steps; LoRA {res['lora']}; curve {res['curve']}")
        return 0

    return _reported(go)  # a bad config, data file or checkpoint: one line naming it, as every stage
