"""Benchmark cases: the case file format (read, write, checked field by field).

A case file is JSON Lines (one case per line; a ``.json`` file holding a list is read too). Paths
are relative to the file's folder. Fields:

* ``id`` (str, unique), ``image`` (path; or ``images``: a list of 1-3 paths, the last one the
  picture being edited), ``instruction`` (str), ``category`` (one of :data:`CATEGORIES`, the 15 of
  REDEdit-Bench),
* optional ``target_text`` (the text the edit must show: scored by the OCR reward),
  ``target_box`` (``[x0, y0, x1, y1]`` source pixels where that text should stand: the OCR
  reward's layout term), ``keep_mask`` (a greyscale picture the size of the edited picture,
  white = must stay as the source: masked PSNR / SSIM are computed there; absent = the whole
  picture), ``rubric`` / ``rubric_consistency`` (judge prompts for this case, see
  :func:`firered_trainer.rl.rewards.judge_prompt`), ``seed`` (overrides the config's seed).

Cases come from :func:`bench.quality.drawn.make_cases` (30 cases drawn with PIL on the spot) or
:func:`bench.quality.redbench.read_redbench` (a user's own copy of REDEdit-Bench), or by hand.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

# REDEdit-Bench's 15 categories, as named in its release (pair counts of the public 1,542-pair
# release in brackets): Add (143), Adjust (156), Background (91), Beauty (79), Color (99),
# Compose (100), Extract (95), Lowlevel (47), Motion (78), Portrait (102), Remove (147),
# Replace (140), Stylize (92), Text (123), Viewpoint (50).
CATEGORIES = (
    "Add", "Adjust", "Background", "Beauty", "Color", "Compose", "Extract", "Lowlevel",
    "Motion", "Portrait", "Remove", "Replace", "Stylize", "Text", "Viewpoint",
)

_ALIASES = {
    "add": "Add", "addition": "Add", "objectaddition": "Add",
    "adjust": "Adjust", "attribute": "Adjust", "attributeadjust": "Adjust", "attributemodification": "Adjust",
    "background": "Background", "backgroundchange": "Background", "backgroundreplace": "Background",
    "beauty": "Beauty", "beautify": "Beauty", "beautification": "Beauty",
    "color": "Color", "colour": "Color", "colorchange": "Color", "coloralteration": "Color",
    "compose": "Compose", "composition": "Compose", "multiimage": "Compose",
    "extract": "Extract", "extraction": "Extract",
    "lowlevel": "Lowlevel", "enhancement": "Lowlevel", "lowlevelenhancement": "Lowlevel",
    "motion": "Motion", "action": "Motion", "motionchange": "Motion",
    "portrait": "Portrait", "human": "Portrait",
    "remove": "Remove", "removal": "Remove", "objectremoval": "Remove",
    "replace": "Replace", "replacement": "Replace", "objectreplacement": "Replace",
    "stylize": "Stylize", "style": "Stylize", "styletransfer": "Stylize", "stylise": "Stylize",
    "text": "Text", "textedit": "Text", "textediting": "Text",
    "viewpoint": "Viewpoint", "view": "Viewpoint", "viewchange": "Viewpoint",
}


def category_name(name: str) -> str | None:
    """The REDEdit-Bench category a name stands for (case, spaces, ``_`` / ``-`` ignored), or None."""
    return _ALIASES.get(re.sub(r"[^a-z]", "", str(name).lower()))


@dataclass
class Case:
    """One benchmark case; paths are absolute once read (see the module docstring)."""

    id: str
    images: list[str]
    instruction: str
    category: str
    target_text: str | None = None
    target_box: list[float] | None = None
    keep_mask: str | None = None
    rubric: str | None = None
    rubric_consistency: str | None = None
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def image(self) -> str:
        return self.images[-1]


def _case_from_record(rec: dict, base: Path, where: str, strict: bool = True) -> Case:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a case must be a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("id", "instruction", "category") if not rec.get(k)]
    if not (rec.get("image") or rec.get("images")):
        missing.append("image")
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    cat = category_name(rec["category"])
    if cat is None:
        if strict:
            raise ValueError(f"{where}: category {rec['category']!r} is not one of {', '.join(CATEGORIES)}")
        cat = str(rec["category"])
    imgs = rec.get("images") or [rec["image"]]
    if isinstance(imgs, str):
        imgs = [imgs]
    if not 1 <= len(imgs) <= 3:
        raise ValueError(f"{where}: a case takes 1 to 3 pictures, got {len(imgs)}")
    box = rec.get("target_box")
    if box is not None and (len(box) != 4 or not (box[2] > box[0] and box[3] > box[1])):
        raise ValueError(f"{where}: target_box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {box}")
    known = {f for f in Case.__dataclass_fields__} | {"image"}
    return Case(
        id=str(rec["id"]),
        images=[str((base / p).resolve()) for p in imgs],
        instruction=str(rec["instruction"]),
        category=cat,
        target_text=rec.get("target_text"),
        target_box=[float(v) for v in box] if box is not None else None,
        keep_mask=str((base / rec["keep_mask"]).resolve()) if rec.get("keep_mask") else None,
        rubric=rec.get("rubric"),
        rubric_consistency=rec.get("rubric_consistency"),
        seed=rec.get("seed"),
        extra={k: v for k, v in rec.items() if k not in known},
    )


def case_file(path) -> Path:
    """The case file at ``path``, or ``cases.jsonl`` inside the folder ``path``."""
    p = Path(path)
    if p.is_dir():
        p = p / "cases.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no case file at {p} (expected a cases.jsonl; `python -m bench.quality make-cases DIR` writes one)")
    return p


def read_cases(path, *, strict: bool = True) -> list[Case]:
    """Cases from a JSONL / JSON case file (or a folder holding ``cases.jsonl``); every error names
    the file and line. ``strict=False`` keeps categories outside the 15."""
    p = case_file(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        recs = [(f"{p} item {i}", r) for i, r in enumerate(json.loads(text))]
    else:
        recs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    recs.append((f"{p}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n}: not JSON ({e})") from None
    cases, seen = [], set()
    for where, r in recs:
        c = _case_from_record(r, p.parent, where, strict)
        if c.id in seen:
            raise ValueError(f"{where}: duplicate case id {c.id!r}")
        seen.add(c.id)
        for f in c.images + ([c.keep_mask] if c.keep_mask else []):
            if not Path(f).is_file():
                raise FileNotFoundError(f"{where}: case {c.id!r} names {f}, which does not exist")
        cases.append(c)
    if not cases:
        raise ValueError(f"{p} holds no cases")
    return cases


def write_cases(cases: list[Case], path) -> Path:
    """Write ``cases`` as JSONL at ``path``, paths relative to its folder where they lie under it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    base = p.parent.resolve()

    def rel(f):
        f = Path(f).resolve()
        return str(f.relative_to(base)) if f.is_relative_to(base) else str(f)

    with open(p, "w", encoding="utf-8") as fh:
        for c in cases:
            d = asdict(c)
            d.update(d.pop("extra") or {})
            d["images"] = [rel(f) for f in c.images]
            if c.keep_mask:
                d["keep_mask"] = rel(c.keep_mask)
            fh.write(json.dumps({k: v for k, v in d.items() if v is not None}, ensure_ascii=False) + "\n")
    return p


__all__ = ["CATEGORIES", "Case", "case_file", "category_name", "read_cases", "write_cases"]
