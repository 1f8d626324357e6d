"""Every stage's checkpoints: atomic folders with a manifest, exactly resumable, and a damaged
newest one passed over with one log line.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00001000/`` holding

* ``trainable.safetensors`` -- only the trained weights (the LoRA adapters, or the whole MM-DiT
  for a full fine-tune; a sharded run, ``model.fsdp``, writes every process's shards of the
  weights, the optimizer state and the EMA into ``fsdp/`` instead: :mod:`firered_trainer.fsdp`),
* the stage's state: for SFT / pretrain accelerate's files (``save_state``: the optimizer,
  ``optimizer.bin`` with 8-bit states, the LR scheduler, every process's RNG states
  ``random_states_<rank>.pkl`` and the registered objects: the bucket sampler's position, the EMA,
  the step); for DPO / NFT ``state.pt`` (the optimizer, scheduler, RNG states and the old-policy
  EMA, see :mod:`firered_trainer.rl.common`),
* ``config.yaml`` (the run's config) and, written last, ``meta.json`` (step, loss, time and the
  size of every other file: the checkpoint's manifest).

:func:`write_checkpoint` writes it into a hidden ``.tmp-step-...`` folder and renames it into place
with ``os.replace`` only when every process has finished writing, so a crash at any moment leaves
either the whole checkpoint or none: a ``step-*`` folder is always complete. Leftover temporary
folders are removed at the next start. Only the last ``keep_last`` checkpoints are kept.

A checkpoint damaged later (a disk filled up, a copy cut short) is found before anything is loaded
from it: :func:`verify_checkpoint` checks each file against the manifest and its own format.
:func:`find_resume` (``checkpoint.resume``: ``auto``, ``none`` or a folder) then resumes from the
newest usable checkpoint (:func:`choose_resume`), moves each unusable newer one aside as
``step-N.corrupt`` (never deleted: the user decides) and says so in one log line; when none is
usable it raises a :class:`CheckpointError` naming every file at fault, and moves nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
#: zip archives (torch.save files) up to this size get their CRCs checked when verified; larger
#: ones only their structure (a full read of a 20B model's optimizer state would double its load)
_CRC_LIMIT = 256 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what was expected."""


class CorruptCheckpoint(CheckpointError):
    """One file of a checkpoint is missing, truncated or unreadable (``file``: that file)."""

    def __init__(self, file, why: str):
        self.file, self.why = Path(file), why
        super().__init__(f"{self.file}: {why}")


class TrainState:
    """The step counter (and the data report) as an accelerate checkpointing object."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class StatefulSampler:
    """Adapts a :class:`firered_trainer.buckets.BucketBatchSampler` to accelerate's checkpoint objects
    (its state is a small JSON-able dict)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class EMAState:
    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None and state:
            self.ema.load_state_dict(state)


def checkpoints_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(output_dir) -> Path | None:
    cks = list_checkpoints(output_dir)
    return cks[-1] if cks else None


def checkpoint_step(path) -> int:
    m = _STEP_DIR.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (expected .../checkpoints/step-NNNNNNNN)")
    return int(m.group(1))


def clean_partial(output_dir) -> list[Path]:
    """Remove temporary folders a crashed save left behind (main process only)."""
    root = checkpoints_dir(output_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def install_hooks(accelerator) -> None:
    """Make accelerate save and load only the trained weights of each prepared model (not the
    frozen 20B base), as ``trainable.safetensors``. (A sharded run's model is not prepared by
    accelerate: :mod:`firered_trainer.fsdp` saves it.)"""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, m in enumerate(models):
                name = "trainable.safetensors" if i == 0 else f"trainable_{i}.safetensors"
                save_file(_trainable_state(accelerator.unwrap_model(m)), os.path.join(output_dir, name))
        weights.clear()

    def load_hook(models, input_dir):
        for i, m in enumerate(models):
            name = "trainable.safetensors" if i == 0 else f"trainable_{i}.safetensors"
            sd = load_file(os.path.join(input_dir, name))
            model = accelerator.unwrap_model(m)
            params = dict(model.named_parameters())
            missing = [k for k in sd if k not in params]
            if missing:
                raise CheckpointError(f"{input_dir}: checkpoint weights {missing[:3]} are not in this model "
                                 "(was it saved with another train_mode or LoRA setting?)")
            with torch.no_grad():
                for k, v in sd.items():
                    params[k].copy_(v.to(params[k].device, params[k].dtype))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def write_checkpoint(output_dir, step: int, write: Callable[[Path], None], *, config_yaml: str,
                     meta: dict | None = None, keep_last: int = 3, is_main: bool = True,
                     barrier: Callable[[], None] = lambda: None) -> Path:
    """Every stage's checkpoint writer: ``write(tmp_dir)`` puts the stage's files into a hidden
    temporary folder (on every process that calls this), then the main process adds ``config.yaml``
    and, last, the manifest ``meta.json`` (step, time, ``meta``, the size of every file), syncs them
    to disk and renames the folder to ``checkpoints/step-NNNNNNNN`` -- a checkpoint is complete or
    absent, never half there -- and keeps the last ``keep_last``. ``barrier``: waits for every
    process (the training processes' ``wait_for_everyone``). Returns the checkpoint's folder."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    write(tmp)
    if is_main:
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    barrier()  # every process's files are written: the manifest sees them all
    if is_main:
        written = sorted(f for f in tmp.rglob("*") if f.is_file())
        files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in written}
        (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), **(meta or {}), "files": files},
                                                  indent=1))
        for f in [*written, tmp / "meta.json"]:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved again (a resumed run): the new one replaces it
            old = root / f".tmp-old-{step:08d}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def save_checkpoint(accelerator, output_dir, step: int, *, config_yaml: str, meta: dict | None = None,
                    keep_last: int = 3, extra=None, every_process=None) -> Path:
    """SFT / pretrain: :func:`write_checkpoint` with accelerate's ``save_state`` writing the files
    (every process calls this). ``extra(tmp_dir)``, if given, writes more files (e.g. the LoRA in
    ComfyUI format) on the main process before the rename; ``every_process(tmp_dir)`` on every
    process (a sharded model's shards)."""

    def write(tmp: Path) -> None:
        accelerator.save_state(str(tmp))
        if every_process is not None:
            every_process(tmp)
        if extra is not None and accelerator.is_main_process:
            extra(tmp)

    return write_checkpoint(output_dir, step, write, config_yaml=config_yaml, meta=meta, keep_last=keep_last,
                            is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone)


# ---------------------------------------------------------------------------------------------
# verify, choose, load
# ---------------------------------------------------------------------------------------------


def _check_safetensors(f: Path, size: int) -> None:
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptCheckpoint(f, f"{size} bytes, too short for a safetensors file (truncated?)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CorruptCheckpoint(f, f"{size} bytes, shorter than its {n}-byte safetensors header (truncated?)")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise CorruptCheckpoint(f, "its safetensors header is not valid JSON (damaged?)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CorruptCheckpoint(f, f"{size} bytes where its safetensors header describes {8 + n + end} (truncated?)")


def _check_file(f: Path, size: int) -> None:
    """The format checks a file can get without loading it into a model."""
    try:
        if f.suffix == ".safetensors":
            _check_safetensors(f, size)
        elif f.suffix in (".bin", ".pkl", ".pt", ".pth"):
            if size == 0:
                raise CorruptCheckpoint(f, "empty (0 bytes)")
            with open(f, "rb") as fh:
                zipped = fh.read(4) == b"PK\x03\x04"
            if zipped:  # torch.save's format
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip() if size <= _CRC_LIMIT else None
                if bad is not None:
                    raise CorruptCheckpoint(f, f"member {bad} of the archive fails its CRC check (damaged)")
        elif f.suffix == ".json":
            json.loads(f.read_text(encoding="utf-8"))
        elif f.suffix in (".yaml", ".yml"):
            import yaml

            yaml.safe_load(f.read_text(encoding="utf-8"))
    except CorruptCheckpoint:
        raise
    except zipfile.BadZipFile:
        raise CorruptCheckpoint(f, f"{size} bytes, not a complete torch.save zip archive (truncated?)") from None
    except FileNotFoundError:
        raise CorruptCheckpoint(f, "missing") from None
    except Exception as e:  # noqa: BLE001 -- any failure to read the file makes the checkpoint unusable
        raise CorruptCheckpoint(f, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def verify_checkpoint(path) -> None:
    """Raise :class:`CorruptCheckpoint` naming the first file of checkpoint folder ``path`` that is
    missing, of another size than ``meta.json`` records, or not readable in its format. Reads the
    small files; of a large one only its structure (safetensors header, zip directory)."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not path.is_dir():
        raise CorruptCheckpoint(path, "not found (expected a checkpoint folder .../checkpoints/step-NNNNNNNN)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptCheckpoint(meta_path, "missing (it is written last: the checkpoint is incomplete)") from None
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(meta_path, f"not valid JSON ({e}; truncated?)") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CorruptCheckpoint(meta_path, "expected a JSON object with the checkpoint's step")
    files = meta.get("files")
    if not isinstance(files, dict):  # written before meta.json had a manifest: check what is there
        files = {f.relative_to(path).as_posix(): None for f in sorted(path.rglob("*")) if f.is_file() and f != meta_path}
    for rel, want in files.items():
        f = path / rel
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            raise CorruptCheckpoint(f, "missing (meta.json lists it)") from None
        if want is not None and size != want:
            raise CorruptCheckpoint(f, f"{size} bytes where {want} were written" + (" (truncated)" if size < want else ""))
        _check_file(f, size)


def set_aside(path) -> Path:
    """Rename an unusable checkpoint (folder or file) to ``<name>.corrupt`` (``.corrupt-2``, ... if
    taken) -- out of the resume and ``keep_last`` lists, kept for the user to inspect."""
    path = Path(path)
    target = path.with_name(path.name + ".corrupt")
    k = 2
    while target.exists():
        target, k = path.with_name(f"{path.name}.corrupt-{k}"), k + 1
    os.replace(path, target)
    return target


@dataclass
class Resume:
    """The checkpoint to resume from (``value``: what ``check`` returned for it) and the newer
    ones found unusable (``skipped``: ``(error, where it was moved)``)."""

    path: Path
    value: Any = None
    skipped: list = field(default_factory=list)


def choose_resume(candidates, check: Callable[[Path], Any], *, is_main: bool = True,
                  start_afresh: str = "checkpoint.resume=none", logger: logging.Logger | None = None) -> Resume | None:
    """The newest of ``candidates`` (checkpoints, oldest first) for which ``check(path)`` does not
    raise :class:`CorruptCheckpoint`, or None when there are none. Unusable newer ones are moved
    aside (:func:`set_aside`, on the main process) and named in one log line; if every candidate is
    unusable, raises :class:`CheckpointError` naming each fault and moves nothing. Every process
    may call this (the main one renames; another that meets a folder mid-rename sees it as
    unusable and moves on to the same choice)."""
    logger = logger or log
    bad: list[tuple[Path, CorruptCheckpoint]] = []
    for path in reversed(list(candidates)):
        try:
            value = check(Path(path))
        except CorruptCheckpoint as e:
            bad.append((Path(path), e))
            continue
        chosen = Resume(Path(path), value)
        if bad:
            for p, e in bad:
                moved = set_aside(p) if is_main and p.exists() else None
                chosen.skipped.append((e, moved))
            if is_main:
                faults = "; ".join(f"{e}" + (f" (moved aside to {m.name})" if m else "") for e, m in chosen.skipped)
                logger.warning("unusable checkpoint: %s -- resuming from the previous complete one, %s", faults, path)
        elif is_main:
            logger.info("resuming from %s", path)
        return chosen
    if bad:
        faults = "; ".join(str(e) for _, e in bad)
        raise CheckpointError(f"no usable checkpoint in {bad[0][0].parent}: {faults}. Move the damaged ones away "
                              f"(nothing was moved or deleted), name one with a resume setting, or start afresh "
                              f"with {start_afresh}")
    return None


def load_checkpoint(accelerator, path) -> int:
    """Verify (:func:`verify_checkpoint`) and restore everything saved by :func:`save_checkpoint`;
    returns its step."""
    path = Path(path)
    verify_checkpoint(path)
    accelerator.load_state(str(path))
    return checkpoint_step(path)


def find_resume(output_dir, setting: str, *, check: Callable[[Path], Any] = verify_checkpoint,
                is_main: bool = True) -> Resume | None:
    """The checkpoint to resume from per ``checkpoint.resume`` (every stage): ``none``; ``auto`` --
    the newest one of ``output_dir`` that ``check`` accepts (falling back past damaged ones,
    :func:`choose_resume`); or a folder -- that one, checked, with no fallback. None: start afresh.
    ``check(path)`` raises :class:`CorruptCheckpoint` for an unusable checkpoint; what it returns
    is the :class:`Resume`'s ``value`` (the RL stages load the state there)."""
    if setting == "none":
        return None
    if setting == "auto":
        return choose_resume(list_checkpoints(output_dir), check, is_main=is_main)
    path = Path(setting)
    value = check(path)
    if is_main:
        log.info("resuming from %s", path)
    return Resume(path, value)


def resume(accelerator, output_dir, setting: str) -> Path | None:
    """SFT / pretrain: restore the run's state from :func:`find_resume`'s checkpoint through
    accelerate's ``load_state``. Returns the folder resumed from, or None."""
    found = find_resume(output_dir, setting, is_main=accelerator.is_main_process)
    accelerator.wait_for_everyone()  # the damaged ones are moved aside before anyone loads
    if found is None:
        return None
    accelerator.load_state(str(found.path))
    return found.path
