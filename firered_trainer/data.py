"""Training data: FireRed's JSONL format and plain folders of pairs, as typed samples.

**JSONL** (the FireRed release's format), one sample per line::

    {"source_image": "src/001.png" | ["a.png", "b.png"] | null,
     "target_image": "tgt/001.png",            # the released extractor reads "edit_image": both accepted
     "instruction": "make the sky pink", "instruction_cn": "把天空变成粉色",
     "inverse_instruction": "make the sky blue", "inverse_instruction_cn": "...",
     "task": "color"}

Relative paths are resolved against the JSONL file's folder. ``source_image: null`` is a
text-to-image sample. ``task`` defaults to the dataset name.

**Folder of pairs**: for every caption file ``<stem>.txt`` (the instruction; a second line, if
present, is the Chinese instruction), the target is ``<stem>_target.<ext>`` (or ``<stem>.<ext>``)
and the sources ``<stem>_source.<ext>`` or ``<stem>_source1..3.<ext>`` (none: text-to-image).

Bad samples (a broken JSON line, a missing picture, an unreadable picture, more than 3 sources,
no instruction) are skipped and counted, each with an error naming the file and line; more than
``max_bad`` of them is fatal (:class:`DataError`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

MAX_SOURCES = 3
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class EditSample:
    """One training pair.

    sources: 0-3 picture paths (0 = text-to-image); target: the edited picture's path;
    source_sizes / target_size: ``(width, height)`` read from the picture headers;
    where: ``"file:line"`` for error messages.
    """

    sources: tuple[str, ...]
    target: str
    instruction: str
    source_sizes: tuple[tuple[int, int], ...]
    target_size: tuple[int, int]
    instruction_cn: str | None = None
    inverse_instruction: str | None = None
    inverse_instruction_cn: str | None = None
    task: str = "edit"
    dataset: str = "default"
    where: str = ""

    @property
    def n_sources(self) -> int:
        return len(self.sources)


@dataclass
class LoadReport:
    """What loading skipped: ``errors`` holds one message per bad sample."""

    loaded: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.errors)


def picture_size(path: Path, where: str) -> tuple[int, int]:
    if not path.is_file():
        raise DataError(f"{where}: picture not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{where}: {path} is not a readable picture ({e})") from None


def _opt_str(rec: dict, key: str, where: str) -> str | None:
    v = rec.get(key)
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    return v


def sample_from_record(rec: dict, base: Path, *, dataset: str, where: str) -> EditSample:
    """Validate one JSONL record and turn it into an :class:`EditSample`."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    target = rec.get("target_image", rec.get("edit_image"))
    if not isinstance(target, str) or not target:
        raise DataError(f"{where}: no target picture (expected a 'target_image' or 'edit_image' path)")
    src = rec.get("source_image")
    if src is None:
        sources: list[str] = []
    elif isinstance(src, str):
        sources = [src]
    elif isinstance(src, list) and all(isinstance(s, str) for s in src):
        sources = list(src)
    else:
        raise DataError(f"{where}: 'source_image' must be a path, a list of paths or null")
    if len(sources) > MAX_SOURCES:
        raise DataError(f"{where}: {len(sources)} source pictures; FireRed-Image-Edit takes 0 to {MAX_SOURCES}")
    instruction = _opt_str(rec, "instruction", where) or _opt_str(rec, "instruction_cn", where)
    if instruction is None:
        raise DataError(f"{where}: no instruction ('instruction' or 'instruction_cn')")
    paths = [(base / s) for s in sources]
    tpath = base / target
    sizes = tuple(picture_size(p, where) for p in paths)
    return EditSample(
        sources=tuple(str(p) for p in paths),
        target=str(tpath),
        instruction=_opt_str(rec, "instruction", where) or instruction,
        instruction_cn=_opt_str(rec, "instruction_cn", where),
        inverse_instruction=_opt_str(rec, "inverse_instruction", where),
        inverse_instruction_cn=_opt_str(rec, "inverse_instruction_cn", where),
        source_sizes=sizes,
        target_size=picture_size(tpath, where),
        task=_opt_str(rec, "task", where) or dataset,
        dataset=dataset,
        where=where,
    )


def _finish(samples: list[EditSample], report: LoadReport, max_bad: int, what: str) -> list[EditSample]:
    report.loaded = len(samples)
    for e in report.errors:
        log.warning("skipped a bad sample: %s", e)
    if report.skipped > max_bad:
        shown = "\n  ".join(report.errors[:5])
        raise DataError(f"{what}: {report.skipped} bad samples (more than max_bad={max_bad}); first ones:\n  {shown}")
    if not samples:
        raise DataError(f"{what}: no usable samples" + (f"; first error: {report.errors[0]}" if report.errors else ""))
    return samples


def read_records(path, parse: Callable[[dict, Path, str], Any], *, max_bad: int = 10,
                 report: LoadReport | None = None, what: str = "samples") -> list:
    """Every stage's JSONL reader: ``parse(record, folder of the file, "file:line")`` turns each
    line into a sample; a line that is not a JSON object, or that ``parse`` rejects with a
    :class:`DataError`, is skipped and counted in ``report`` (with file and line); more than
    ``max_bad`` of them, or no usable line at all, is a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    report = report if report is not None else LoadReport()
    samples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                samples.append(parse(rec, path.parent, where))
            except DataError as e:
                report.errors.append(str(e))
    return _finish(samples, report, max_bad, f"{path} ({what})")


def read_jsonl(path, *, dataset: str | None = None, max_bad: int = 10, report: LoadReport | None = None) -> list[EditSample]:
    """Read a FireRed JSONL file; bad lines are skipped and counted in ``report``."""
    dataset = dataset or Path(path).stem
    return read_records(path, lambda rec, base, where: sample_from_record(rec, base, dataset=dataset, where=where),
                        max_bad=max_bad, report=report, what="edit pairs")


def _find_picture(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def read_folder(path, *, dataset: str | None = None, max_bad: int = 10, report: LoadReport | None = None) -> list[EditSample]:
    """Read a folder of pairs with caption files (see the module docstring for the naming)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    dataset = dataset or root.name
    report = report if report is not None else LoadReport()
    samples = []
    for cap in sorted(root.glob("*.txt")):
        stem, where = cap.stem, f"{cap}:1"
        try:
            lines = [ln.strip() for ln in cap.read_text(encoding="utf-8").splitlines() if ln.strip()]
            if not lines:
                raise DataError(f"{where}: empty caption file")
            target = _find_picture(root, f"{stem}_target") or _find_picture(root, stem)
            if target is None:
                raise DataError(f"{where}: no target picture {stem}_target.* or {stem}.* beside the caption")
            one = _find_picture(root, f"{stem}_source")
            sources = [one] if one else [p for i in range(1, MAX_SOURCES + 2) if (p := _find_picture(root, f"{stem}_source{i}"))]
            rec = {
                "source_image": [str(s.relative_to(root)) for s in sources] or None,
                "target_image": str(target.relative_to(root)),
                "instruction": lines[0],
                "instruction_cn": lines[1] if len(lines) > 1 else None,
            }
            samples.append(sample_from_record(rec, root, dataset=dataset, where=where))
        except DataError as e:
            report.errors.append(str(e))
    return _finish(samples, report, max_bad, str(root))


def load_dataset(path, **kw) -> list[EditSample]:
    """A ``.jsonl`` file or a folder of pairs."""
    p = Path(path)
    return read_folder(p, **kw) if p.is_dir() else read_jsonl(p, **kw)


def mix(datasets: Iterable[tuple[str, list[EditSample]]]) -> tuple[list[EditSample], list[str]]:
    """Concatenate named datasets; returns the samples and each sample's dataset name
    (the bucket sampler weights datasets by these names)."""
    samples, names = [], []
    for name, ds in datasets:
        samples.extend(ds)
        names.extend([name] * len(ds))
    return samples, names
