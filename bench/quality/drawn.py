"""The benchmark's generated set: 2 cases per REDEdit-Bench category, drawn with PIL on the spot
(shapes on a textured background, a face, a stick figure, signs with text), so the benchmark runs
anywhere with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

from .cases import CATEGORIES, Case, write_cases

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
