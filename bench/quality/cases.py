"""Benchmark cases: the file format, the generated CPU set, and a reader for a local REDEdit-Bench.

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

:func:`make_cases` draws 30 such cases (2 per category) with PIL: shapes, a face, a stick figure,
signs with text. :func:`read_redbench` turns a user's own copy of REDEdit-Bench into cases; nothing
of that dataset (CC BY-NC-ND 4.0) is shipped here.
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


# ---------------------------------------------------------------------------------------------
# The generated set: 2 cases per category, drawn with PIL
# ---------------------------------------------------------------------------------------------

_COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 205, 40),
            "purple": (140, 60, 190), "orange": (240, 140, 30)}


def _scene(w, h, rng):
    """A soft gradient background with a few grey pebbles (texture for SSIM)."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(120, 230, 3), rng.uniform(120, 230, 3)
    t = (x / w * 0.6 + y / h * 0.4)[..., None]
    arr = c0 * (1 - t) + c1 * t + rng.normal(0, 4, (h, w, 1))
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        px, py, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(2, 5)
        g = int(rng.uniform(60, 110))
        d.ellipse([px - r, py - r, px + r, py + r], fill=(g, g, g))
    return im, d


def _shape(d, kind, box, colour):
    x0, y0, x1, y1 = box
    if kind == "circle":
        d.ellipse(box, fill=colour)
    elif kind == "square":
        d.rectangle(box, fill=colour)
    elif kind == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    elif kind == "star":
        import math

        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        pts = [(cx + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=colour)


def _face(d, box, skin=(230, 190, 160)):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d.ellipse(box, fill=skin)
    for ex in (x0 + 0.32 * w, x0 + 0.68 * w):
        d.ellipse([ex - 0.06 * w, y0 + 0.35 * h, ex + 0.06 * w, y0 + 0.45 * h], fill=(40, 30, 30))
    d.arc([x0 + 0.3 * w, y0 + 0.5 * h, x0 + 0.7 * w, y0 + 0.75 * h], 20, 160, fill=(150, 50, 50), width=2)


def _figure(d, cx, top, size, colour=(30, 30, 30)):
    r = size * 0.12
    d.ellipse([cx - r, top, cx + r, top + 2 * r], outline=colour, width=2)
    neck, hip = top + 2 * r, top + size * 0.6
    d.line([cx, neck, cx, hip], fill=colour, width=2)
    d.line([cx - size * 0.25, neck + size * 0.25, cx, neck + size * 0.1, cx + size * 0.25, neck + size * 0.25], fill=colour, width=2)
    d.line([cx - size * 0.2, top + size, cx, hip, cx + size * 0.2, top + size], fill=colour, width=2)
    return [cx - size * 0.3, top, cx + size * 0.3, top + size]


def _grow(box, m, w, h):
    return [max(0, box[0] - m), max(0, box[1] - m), min(w, box[2] + m), min(h, box[3] + m)]


def _box_mask(w, h, boxes, *, kept: bool):
    """An "L" keep mask: the boxes kept (``kept=True``: white boxes on black) or excluded (black
    boxes on white, the edit's region)."""
    from PIL import Image, ImageDraw

    m = Image.new("L", (w, h), 0 if kept else 255)
    d = ImageDraw.Draw(m)
    for b in boxes:
        d.rectangle(b, fill=255 if kept else 0)
    return m


def _keep_outside(w, h, boxes):
    return _box_mask(w, h, boxes, kept=False)


def _keep_inside(w, h, boxes):
    return _box_mask(w, h, boxes, kept=True)


def _draw_case(category: str, k: int, w: int, h: int, rng):
    """One drawn case: (picture, instruction, keep mask or None, target text, target box)."""
    from PIL import ImageFont

    im, d = _scene(w, h, rng)
    names = list(_COLOURS)
    c1, c2 = names[(2 * k + len(category)) % len(names)], names[(2 * k + len(category) + 3) % len(names)]
    s = min(w, h)
    sz = int(s * rng.uniform(0.28, 0.36))
    x = int(rng.uniform(0.08, 0.55) * w)
    y = int(rng.uniform(0.12, 0.5) * h)
    box = [x, y, x + sz, y + sz]
    kind = ("circle", "square", "triangle", "star")[(k + len(category)) % 4]
    other = ("square", "circle", "star", "triangle")[(k + len(category)) % 4]
    margin = max(4, s // 20)
    keep = None
    text, tbox = None, None
    if category == "Add":
        _shape(d, kind, box, _COLOURS[c1])
        corner = [int(0.72 * w), int(0.08 * h), int(0.95 * w), int(0.08 * h) + int(0.23 * w)] if x < w / 2 else [int(0.05 * w), int(0.08 * h), int(0.28 * w), int(0.08 * h) + int(0.23 * w)]
        side = "top right" if x < w / 2 else "top left"
        instr = f"Add a small {c2} {other} in the {side} corner"
        keep = _keep_outside(w, h, [_grow(corner, margin, w, h)])
    elif category == "Adjust":
        _shape(d, kind, box, _COLOURS[c1])
        instr = f"Make the {c1} {kind} twice as large" if k == 0 else f"Rotate the {c1} {kind} by 45 degrees"
        keep = _keep_outside(w, h, [_grow(box, sz // 2 + margin, w, h)])
    elif category == "Background":
        _shape(d, kind, box, _COLOURS[c1])
        instr = "Replace the background with a plain white wall" if k == 0 else "Change the background to a starry night sky"
        keep = _keep_inside(w, h, [box])
    elif category == "Beauty":
        _face(d, box)
        instr = "Smooth the skin and brighten the face slightly" if k == 0 else "Apply light natural makeup with pink lips"
        keep = _keep_outside(w, h, [_grow(box, margin, w, h)])
    elif category == "Color":
        _shape(d, kind, box, _COLOURS[c1])
        instr = f"Make the {c1} {kind} {c2}"
        keep = _keep_outside(w, h, [_grow(box, margin, w, h)])
    elif category == "Compose":
        _shape(d, kind, box, _COLOURS[c1])
        ox = int(0.62 * w) if x < w / 2 else int(0.08 * w)
        instr = f"Place a {c2} {other} next to the {c1} {kind}, the same size"
        keep = _keep_outside(w, h, [_grow(box, margin, w, h), [ox - margin, 0, ox + sz + 3 * margin, h]])
    elif category == "Extract":
        _shape(d, kind, box, _COLOURS[c1])
        instr = f"Extract the {c1} {kind} and put it on a pure white background"
        keep = _keep_inside(w, h, [box])
    elif category == "Lowlevel":
        import numpy as np
        from PIL import Image

        _shape(d, kind, box, _COLOURS[c1])
        arr = np.asarray(im, dtype=np.float32)
        arr = arr + rng.normal(0, 18, arr.shape) if k == 0 else arr * 0.45
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        instr = "Remove the noise from the picture" if k == 0 else "Brighten this underexposed photo"
    elif category == "Motion":
        fb = _figure(d, x + sz / 2, y, sz)
        instr = "Make the stick figure raise both arms above its head" if k == 0 else "Make the stick figure jump"
        keep = _keep_outside(w, h, [_grow(fb, sz // 2, w, h)])
    elif category == "Portrait":
        _face(d, box)
        instr = "Give the person a red hat" if k == 0 else "Give the person round glasses"
        keep = _keep_outside(w, h, [_grow([box[0], box[1] - sz // 2, box[2], box[3]], margin, w, h)])
    elif category == "Remove":
        _shape(d, kind, box, _COLOURS[c1])
        instr = f"Remove the {c1} {kind}"
        keep = _keep_outside(w, h, [_grow(box, margin, w, h)])
    elif category == "Replace":
        _shape(d, kind, box, _COLOURS[c1])
        instr = f"Replace the {c1} {kind} with a {c1} {other}"
        keep = _keep_outside(w, h, [_grow(box, margin, w, h)])
    elif category == "Stylize":
        _shape(d, kind, box, _COLOURS[c1])
        instr = "Turn the picture into a pencil sketch" if k == 0 else "Render the picture in the style of a watercolour painting"
    elif category == "Text":
        board = [int(0.12 * w), int(0.3 * h), int(0.88 * w), int(0.7 * h)]
        d.rectangle(board, fill=(250, 250, 245), outline=(60, 40, 20), width=3)
        font = ImageFont.load_default(size=max(10, int(0.16 * h)))
        old, new = ("OPEN", "SALE") if k == 0 else ("CAFE", "BAR")
        tw, th = d.textbbox((0, 0), old, font=font)[2:]
        tx, ty = (board[0] + board[2] - tw) / 2, (board[1] + board[3] - th) / 2
        d.text((tx, ty), old, fill=(20, 20, 20), font=font)
        tb = d.textbbox((tx, ty), old, font=font)
        instr = f'Change the text "{old}" on the sign to "{new}"'
        text, tbox = new, [float(v) for v in tb]
        keep = _keep_outside(w, h, [_grow(list(tb), margin, w, h)])
    elif category == "Viewpoint":
        _shape(d, kind, box, _COLOURS[c1])
        instr = "Show the scene from a higher viewpoint, looking down" if k == 0 else "Zoom out to show more of the scene"
    else:
        raise ValueError(f"unknown category {category!r}")
    return im, instr, keep, text, tbox


def make_cases(out_dir, *, per_category: int = 2, size: tuple[int, int] = (256, 192), seed: int = 0) -> list[Case]:
    """Draw ``15 * per_category`` cases into ``out_dir`` (pictures, masks, ``cases.jsonl``).
    The same arguments draw the same pictures, byte for byte."""
    import numpy as np

    w, h = size
    if w < 64 or h < 64:
        raise ValueError(f"generated cases need pictures of at least 64x64, got {w}x{h}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cases = []
    for ci, cat in enumerate(CATEGORIES):
        for k in range(per_category):
            rng = np.random.default_rng([seed, ci, k])
            im, instr, keep, text, tbox = _draw_case(cat, k % 2, w, h, rng)
            cid = f"{cat.lower()}_{k:02d}"
            ip = out / "images" / f"{cid}.png"
            im.save(ip)
            mp = None
            if keep is not None:
                mp = out / "images" / f"{cid}_keep.png"
                keep.save(mp)
            cases.append(Case(cid, [str(ip)], instr, cat, target_text=text, target_box=tbox,
                              keep_mask=str(mp) if mp else None))
    write_cases(cases, out / "cases.jsonl")
    return cases


# ---------------------------------------------------------------------------------------------
# A user's local copy of REDEdit-Bench
# ---------------------------------------------------------------------------------------------

_IMAGE_KEYS = ("source_image", "input_image", "src_image", "image", "source", "input", "ori_image", "image_path", "img")
_INSTR_KEYS = {"en": ("instruction_en", "prompt_en", "en_instruction", "edit_instruction_en", "en", "instruction", "prompt", "edit_instruction"),
               "zh": ("instruction_zh", "instruction_cn", "prompt_zh", "prompt_cn", "zh_instruction", "cn", "zh", "instruction", "prompt")}
_CAT_KEYS = ("category", "task", "task_type", "type", "edit_type", "class")
_ID_KEYS = ("id", "key", "uid", "index", "idx", "name")
_FOLLOW_KEYS = ("alignment", "instruction", "following", "prompt_following", "semantic", "sc", "edit")
_CONS_KEYS = ("consistency", "preservation", "keep", "identity")


def _first(rec: dict, keys):
    for k in keys:
        if k in rec and rec[k] not in (None, ""):
            return rec[k]
    low = {str(k).lower(): v for k, v in rec.items()}
    for k in keys:
        if low.get(k) not in (None, ""):
            return low[k]
    return None


def read_rubrics(path, lang: str = "en") -> dict[str, dict[str, str]]:
    """``prompts.json`` -> ``{category: {"following": prompt, "consistency": prompt}}`` (either may
    be missing). Accepted shapes: ``{category: prompt}``, ``{category: {lang: prompt}}``,
    ``{category: {dimension: prompt or {lang: prompt}}}`` (dimension names such as alignment /
    instruction -> following, consistency -> consistency), ``{category: [prompt, ...]}`` (the first
    for following, the second for consistency) and a list of ``{category, prompt}`` objects."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, list):
        data = {(_first(r, _CAT_KEYS) or ""): r for r in data if isinstance(r, dict)}

    def pick_lang(v):
        if isinstance(v, dict):
            for k in (lang, lang.upper(), "cn" if lang == "zh" else lang, "prompt", "text"):
                if isinstance(v.get(k), str):
                    return v[k]
            return None
        return v if isinstance(v, str) else None

    out: dict[str, dict[str, str]] = {}
    for cat, v in data.items():
        name = category_name(cat) or str(cat)
        r: dict[str, str] = {}
        if isinstance(v, list):
            if v:
                r["following"] = pick_lang(v[0])
            if len(v) > 1:
                r["consistency"] = pick_lang(v[1])
        elif isinstance(v, dict) and pick_lang(v) is None:
            for dim, dv in v.items():
                d = str(dim).lower()
                if any(k in d for k in _CONS_KEYS):
                    r["consistency"] = pick_lang(dv)
                elif any(k in d for k in _FOLLOW_KEYS):
                    r["following"] = pick_lang(dv)
        else:
            r["following"] = pick_lang(v)
        r = {k: s for k, s in r.items() if s}
        if r:
            out[name] = r
    return out


def _save_embedded(img, dest: Path) -> str:
    """A datasets-style image cell (``{"bytes": ..., "path": ...}``) written to ``dest``."""
    if isinstance(img, dict) and img.get("bytes"):
        data = img["bytes"]
        suffix = Path(img.get("path") or "x.png").suffix or ".png"
        p = dest.with_suffix(suffix)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return str(p)
    if isinstance(img, dict) and img.get("path"):
        return img["path"]
    return img


def read_redbench(root, *, lang: str = "en", extract_to=None) -> list[Case]:
    """Cases from a local copy of FireRedTeam/REDEdit-Bench at ``root`` (never downloaded here).

    Its exact file layout could not be checked here (the dataset is not reachable from this
    project's machines); the published facts are: parquet files (the Hub's viewer format), 1,542
    bilingual pairs in the 15 :data:`CATEGORIES`, and the judge rubrics in ``prompts.json``. So this
    reader accepts: parquet files anywhere under ``root`` (needs pyarrow; embedded images are
    written to ``extract_to``, default ``root/_extracted``), or JSON / JSONL metadata files whose
    records name picture files relative to themselves. Column names are matched from common
    spellings (source_image / image / input_image ..., instruction_en / instruction / prompt ...,
    category / task / type ...). ``prompts.json`` (anywhere under ``root``), when present, gives each
    case its category's rubrics. Categories outside the 15 are kept under their own name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"REDEdit-Bench folder {root} does not exist")
    extract = Path(extract_to) if extract_to else root / "_extracted"
    rubric_files = sorted(root.rglob("prompts.json"))
    rubrics = read_rubrics(rubric_files[0], lang) if rubric_files else {}
    records: list[tuple[dict, Path, str]] = []
    parquets = sorted(root.rglob("*.parquet"))
    if parquets:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{root} holds parquet files ({parquets[0].name}, ...): reading them needs pyarrow (pip install pyarrow)") from e
        for f in parquets:
            for i, r in enumerate(pq.read_table(f).to_pylist()):
                records.append((r, f.parent, f"{f} row {i}"))
    else:
        for f in sorted(list(root.rglob("*.jsonl")) + list(root.rglob("*.json"))):
            if f.name == "prompts.json" or extract in f.parents:
                continue
            text = f.read_text(encoding="utf-8")
            try:
                rows = json.loads(text) if f.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: not JSON ({e})") from None
            if isinstance(rows, dict):
                rows = [dict(v, id=k) if isinstance(v, dict) else v for k, v in rows.items()]
            for i, r in enumerate(rows if isinstance(rows, list) else []):
                if isinstance(r, dict):
                    records.append((r, f.parent, f"{f} item {i}"))
    if not records:
        raise ValueError(f"found no REDEdit-Bench records under {root} (looked for *.parquet, *.jsonl, *.json)")
    cases, seen = [], set()
    for n, (r, base, where) in enumerate(records):
        img = _first(r, _IMAGE_KEYS)
        instr = _first(r, _INSTR_KEYS.get(lang, _INSTR_KEYS["en"]))
        cat = _first(r, _CAT_KEYS)
        if img is None or instr is None or cat is None:
            raise ValueError(f"{where}: expected a picture ({'/'.join(_IMAGE_KEYS[:3])}...), an instruction and a category; "
                             f"found keys {sorted(r)}")
        cid = str(_first(r, _ID_KEYS) if _first(r, _ID_KEYS) is not None else n)
        if cid in seen:
            cid = f"{cid}_{n}"
        seen.add(cid)
        imgs = img if isinstance(img, list) else [img]
        paths = []
        for j, im in enumerate(imgs):
            p = _save_embedded(im, extract / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', cid)}_{j}")
            paths.append(str((base / p).resolve()))
        name = category_name(cat) or str(cat)
        rb = rubrics.get(name, {})
        cases.append(Case(cid, paths, str(instr), name, rubric=rb.get("following"),
                          rubric_consistency=rb.get("consistency"), extra={"source": "REDEdit-Bench", "lang": lang}))
    return cases


__all__ = ["CATEGORIES", "Case", "case_file", "category_name", "make_cases", "read_cases", "read_redbench",
           "read_rubrics", "write_cases"]
