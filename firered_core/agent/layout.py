"""Plan how up to ten pictures share FireRed's one to three reference canvases: a pure function from
picture sizes (and optional crop boxes) to canvases of tiles, with no pixels touched.

FireRed-Image-Edit reads at most three pictures. FireRed's own agent (upstream ``agent/``) crops each
picture to what the instruction needs, stitches the crops onto 2-3 canvases and rewrites "Picture N"
to the canvases. :func:`plan_layout` is the layout half of that, done locally and deterministically:

* The **base picture** (``alone``, default the first: the scene being edited) gets a canvas of its
  own at its own aspect. The others are shared among the remaining canvases (every sharing is
  tried; canvases are numbered by their first picture, and each keeps its pictures in order).
* Each canvas is a **justified grid**: the pictures lie in rows (or columns), every picture of a row
  at the row's height, every row the canvas's width. Such a layout has no gaps, so every picture
  keeps its aspect exactly (up to one pixel of rounding) and nothing is cut off. Every way of
  breaking a canvas into rows or columns (keeping the reading order) is tried, and the layout that
  shows the *worst-placed* picture largest wins (ties: least padding). Ten pictures take about
  0.2 s (0.5 s without a base picture) on one CPU core.
* A stitched canvas is padded (centred, ``fill`` colour when rendered) to an aspect within
  ``[1 / max_aspect, max_aspect]`` and has sides that are multiples of ``multiple``; a picture
  alone is its canvas, at its own aspect. Every canvas holds at most ``canvas_area`` pixels (the
  VAE reference area), so the reference encoder does not shrink it again.

**The stated fraction.** A tile's *fraction* is its side relative to the same region given to the
model on its own (fitted to ``canvas_area`` at its aspect): ``sqrt(tile area / canvas_area)``.
With ``n`` pictures over ``k`` stitched canvases, about ``sqrt(k / n)`` is the most any layout can
give (nine pictures over two canvases: 0.45). :func:`plan_layout` never returns a tile below
``min_fraction`` (default :data:`MIN_FRACTION`, 0.25): it raises an error naming the picture instead
(crop it, or pass fewer pictures). For pictures between 1:3 and 3:1 every tile gets at least
:data:`FRACTION_1_3` (0.3) at any count up to ten (measured worst: 0.35, ten pictures at 1:3, 1:1
and 3:1 mixed). ``tests/core/test_layout_planner.py`` checks these over many random size mixes,
with the other guarantees: aspect kept, canvases within the area, tiles inside and disjoint.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

#: most pictures one edit takes (stitched onto at most :data:`MAX_CANVASES` canvases)
MAX_INPUT_PICTURES = 10
#: the pictures FireRed-Image-Edit reads
MAX_CANVASES = 3
#: the VAE reference area (``images.REF_AREA``): no canvas is larger
CANVAS_AREA = 1024 * 1024
#: canvas sides are multiples of this (``images.fit_to_area``'s rounding)
CANVAS_MULTIPLE = 32
#: stitched canvases are padded to an aspect within [1 / MAX_ASPECT, MAX_ASPECT]
MAX_ASPECT = 2.0
#: no tile is shown at less than this fraction of its side when alone (see the module docstring)
MIN_FRACTION = 0.25
#: the fraction every tile gets when all pictures (their boxes) are between 1:3 and 3:1 (tested)
FRACTION_1_3 = 0.3

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1): left, top, right, bottom (exclusive), pixels


@dataclass(frozen=True)
class Tile:
    """One picture on a canvas.

    picture: 0-based index of the input picture; box: the region of that picture shown (in its
    pixels); rect: where it lies on the canvas ``(x0, y0, x1, y1)``; fraction: its side relative
    to the same region alone at the canvas area. line / lines and place / places: its row (or
    column, when ``across`` is False) among the canvas's lines and its place within that line,
    both 0-based, for describing where it is.
    """

    picture: int
    box: Box
    rect: Box
    fraction: float
    line: int = 0
    lines: int = 1
    place: int = 0
    places: int = 1
    across: bool = True

    @property
    def size(self) -> tuple[int, int]:
        return self.rect[2] - self.rect[0], self.rect[3] - self.rect[1]


@dataclass(frozen=True)
class Canvas:
    """width x height pixels holding ``tiles`` in reading order."""

    width: int
    height: int
    tiles: tuple[Tile, ...]


@dataclass(frozen=True)
class Layout:
    """The canvases of one edit, in the order the model reads them (``Picture 1`` = ``canvases[0]``)."""

    canvases: tuple[Canvas, ...]

    @property
    def tiles(self) -> list[Tile]:
        return sorted((t for c in self.canvases for t in c.tiles), key=lambda t: t.picture)

    @property
    def min_fraction(self) -> float:
        return min(t.fraction for t in self.tiles)

    def canvas_of(self) -> dict[int, int]:
        """1-based picture number -> 1-based canvas number (what "Picture N" becomes)."""
        return {t.picture + 1: ci + 1 for ci, c in enumerate(self.canvases) for t in c.tiles}

    def notes(self) -> dict[int, dict[str, str]]:
        """1-based picture number -> where it lies on its canvas, ``{"en": "top left", "zh": "左上"}``,
        for every picture that shares its canvas (unique within each canvas)."""
        return {t.picture + 1: {"en": where_en(t), "zh": where_zh(t)} for c in self.canvases if len(c.tiles) > 1 for t in c.tiles}


# -- describing a place --------------------------------------------------------------------------


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _word(i: int, n: int, words: tuple[str, str, str]) -> str | None:
    """A plain position word for place ``i`` of ``n`` (n <= 3), else None."""
    if n == 2:
        return (words[0], words[2])[i]
    if n == 3:
        return words[i]
    return None


def where_en(t: Tile) -> str:
    """Where the tile lies on its canvas, in English: "top left", "right", "bottom row, 2nd from the left"."""
    vert, horiz = ("top", "middle", "bottom"), ("left", "middle", "right")
    line_words, place_words = (vert, horiz) if t.across else (horiz, vert)
    line_kind, place_from = ("row", "from the left") if t.across else ("column", "from the top")
    lw = _word(t.line, t.lines, line_words) if t.lines > 1 else ""
    pw = _word(t.place, t.places, place_words) if t.places > 1 else ""
    if lw is not None and pw is not None:  # plain words: vertical first ("top left")
        v, h = (lw, pw) if t.across else (pw, lw)
        if v == h == "middle":
            return "centre"
        return " ".join(w for w in (v, h) if w)
    line = "" if t.lines == 1 else (f"{lw} {line_kind}" if lw else f"{_ordinal(t.line + 1)} {line_kind} {'from the top' if t.across else 'from the left'}")
    place = "" if t.places == 1 else (pw if pw else f"{_ordinal(t.place + 1)} {place_from}")
    return ", ".join(p for p in (line, place) if p)


def where_zh(t: Tile) -> str:
    """Where the tile lies on its canvas, in Chinese: "左上", "右侧", "第2行从左数第3张"."""
    vert, horiz = ("上", "中", "下"), ("左", "中", "右")
    line_words, place_words = (vert, horiz) if t.across else (horiz, vert)
    lw = _word(t.line, t.lines, line_words) if t.lines > 1 else ""
    pw = _word(t.place, t.places, place_words) if t.places > 1 else ""
    if lw is not None and pw is not None:
        v, h = (lw, pw) if t.across else (pw, lw)
        if v == h == "中":
            return "中间"
        if v and h:
            return h + v if h != "中" else v + "方中间"
        return {"上": "上方", "下": "下方", "左": "左侧", "右": "右侧", "中": "中间"}[v or h]
    kind = "行" if t.across else "列"
    line = "" if t.lines == 1 else f"第{t.line + 1}{kind}"
    place = "" if t.places == 1 else f"{'从左数' if t.across else '从上数'}第{t.place + 1}张"
    return line + place


# -- checking the inputs -------------------------------------------------------------------------


def check_count(n: int, what: str = "pictures") -> None:
    """Raise a ValueError naming the first picture too many when ``n > MAX_INPUT_PICTURES``."""
    if n > MAX_INPUT_PICTURES:
        raise ValueError(
            f"picture {MAX_INPUT_PICTURES + 1} is one too many: FireRed-Image-Edit takes at most "
            f"{MAX_INPUT_PICTURES} {what} (more than {MAX_CANVASES} are stitched onto {MAX_CANVASES} canvases), got {n}"
        )


def check_box(box, size: tuple[int, int], name: str) -> Box:
    """``box`` as a valid ``(x0, y0, x1, y1)`` inside a ``size`` picture, or a ValueError naming ``name``."""
    w, h = size
    try:
        x0, y0, x1, y1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"crop box of {name}: expected (x0, y0, x1, y1) in pixels, got {box!r}") from None
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"crop box of {name}: {(x0, y0, x1, y1)} is empty or outside its {w}x{h} picture")
    return x0, y0, x1, y1


def _check_sizes(sizes) -> list[tuple[int, int]]:
    out = []
    for i, s in enumerate(sizes):
        try:
            w, h = (int(v) for v in s)
        except (TypeError, ValueError):
            raise ValueError(f"picture {i + 1}: expected a size (width, height), got {s!r}") from None
        if w < 1 or h < 1:
            raise ValueError(f"picture {i + 1}: empty picture ({w}x{h})")
        out.append((w, h))
    return out


# -- the search ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """A canvas arrangement in continuous units: lines of picture indices, the canvas aspect."""

    score: tuple[float, float]  # (worst fraction, total area fraction)
    across: bool
    lines: tuple[tuple[int, ...], ...]
    aspect: float  # canvas width / height after padding
    content: tuple[float, float]  # content (width, height) for canvas width 1 / height 1 scale


def _breaks(k: int):
    """Every way to cut a sequence of k items into consecutive lines, as tuples of line lengths."""
    for cuts in itertools.product((False, True), repeat=k - 1):
        lens, run = [], 1
        for c in cuts:
            if c:
                lens.append(run)
                run = 1
            else:
                run += 1
        lens.append(run)
        yield tuple(lens)


def _arrange(aspects: tuple[float, ...], max_aspect: float) -> _Plan:
    """The best justified arrangement of pictures with these aspects (w / h) on one canvas."""
    best = None
    k = len(aspects)
    for across in (True, False):
        a = aspects if across else tuple(1.0 / x for x in aspects)  # columns = rows of the transpose
        for lens in _breaks(k):
            lines, i = [], 0
            for n in lens:
                lines.append(tuple(range(i, i + n)))
                i += n
            # content of width 1: line r has height 1 / sum(aspects); picture area a_i * h_r^2
            heights = [1.0 / sum(a[j] for j in line) for line in lines]
            cw, ch = 1.0, sum(heights)
            content_aspect = cw / ch if across else ch / cw
            if k == 1:
                pad_aspect = content_aspect  # a single picture keeps its own aspect
            else:
                pad_aspect = min(max(content_aspect, 1.0 / max_aspect), max_aspect)
            # canvas (in content units, oriented as the real canvas) holding the content
            real_w, real_h = (cw, ch) if across else (ch, cw)
            canvas_w = max(real_w, real_h * pad_aspect)
            canvas_h = canvas_w / pad_aspect
            canvas_area = canvas_w * canvas_h
            fr = [math.sqrt(a[j] * heights[r] ** 2 / canvas_area) for r, line in enumerate(lines) for j in line]
            score = (min(fr), sum(f * f for f in fr))
            if best is None or score > best.score:
                best = _Plan(score, across, tuple(lines), pad_aspect, (real_w, real_h))
    return best


def _canvas_size(content: tuple[float, float], area: int, multiple: int, max_aspect: float | None) -> tuple[int, int]:
    """The canvas (sides multiples of ``multiple``, ``width * height <= area``, aspect within
    ``max_aspect`` when given) that shows ``content`` (width, height) largest; the smaller canvas
    on a tie (less padding)."""
    cw, ch = content
    best, best_key = (multiple, multiple), None
    for h in range(multiple, area // multiple + 1, multiple):
        w = area // h // multiple * multiple
        if w < multiple:
            break
        if max_aspect is not None:
            w = min(w, int(h * max_aspect) // multiple * multiple)
            if w < multiple or h > w * max_aspect:
                continue
        scale = min(w / cw, h / ch)
        # the narrowest width that still shows the content at this scale (less padding)
        w = min(w, max(multiple, math.ceil(cw * scale / multiple - 1e-9) * multiple))
        if max_aspect is not None and h > w * max_aspect:
            w = min(area // h // multiple * multiple, math.ceil(h / max_aspect / multiple) * multiple)
        key = (scale, -w * h)
        if best_key is None or key > best_key:
            best, best_key = (w, h), key
    return best


def _render_plan(plan: _Plan, pictures: Sequence[int], boxes: Sequence[Box], area: int, multiple: int, max_aspect: float) -> Canvas:
    """Integer canvas and tile rectangles for a plan (tiles abut: shared edges are rounded once)."""
    if len(pictures) == 1:  # a picture alone: its own aspect at the area, no padding (the VAE resize rounds it)
        bw, bh = boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]
        k = math.sqrt(area / (bw * bh))
        W, H = max(1, math.floor(bw * k)), max(1, math.floor(bh * k))
        while W * H > area:
            W, H = max(1, W - 1), max(1, H - 1)
        return Canvas(W, H, (Tile(pictures[0], boxes[0], (0, 0, W, H), math.sqrt(W * H / area)),))
    W, H = _canvas_size(plan.content, area, multiple, max_aspect)
    real_w, real_h = plan.content
    s = min(W / real_w, H / real_h)
    ox, oy = (W - real_w * s) / 2, (H - real_h * s) / 2
    aspects = [(b[2] - b[0]) / (b[3] - b[1]) for b in boxes]
    tiles = []
    pos = 0.0  # along the stacking axis (rows: y; columns: x)
    for li, line in enumerate(plan.lines):
        if plan.across:
            thick = 1.0 / sum(aspects[j] for j in line)  # row height, content width 1
        else:
            thick = 1.0 / sum(1.0 / aspects[j] for j in line)  # column width, content height 1
        along = 0.0
        for pi, j in enumerate(line):
            length = aspects[j] * thick if plan.across else thick / aspects[j]
            if plan.across:
                x0, x1, y0, y1 = ox + along * s, ox + (along + length) * s, oy + pos * s, oy + (pos + thick) * s
            else:
                x0, x1, y0, y1 = ox + pos * s, ox + (pos + thick) * s, oy + along * s, oy + (along + length) * s
            rect = (round(x0), round(y0), round(x1), round(y1))
            tw, th = rect[2] - rect[0], rect[3] - rect[1]
            tiles.append(
                Tile(pictures[j], boxes[j], rect, math.sqrt(max(tw, 0) * max(th, 0) / area), li, len(plan.lines), pi, len(line), plan.across)
            )
            along += length
        pos += thick
    return Canvas(W, H, tuple(tiles))


def _assignments(items: Sequence[int], groups: int):
    """Every way to share ``items`` among ``groups`` non-empty canvases, each canvas keeping the
    pictures in their order; canvases ordered by their first picture (so each sharing appears once)."""
    items = list(items)
    if groups == 1:
        yield (tuple(items),)
        return
    first, rest = items[0], items[1:]
    # the canvas of the first item takes any subset of the rest; the others share what is left
    for r in range(len(rest) + 1):
        for mates in itertools.combinations(rest, r):
            left = [i for i in rest if i not in mates]
            if len(left) < groups - 1:
                continue
            for others in _assignments(left, groups - 1):
                yield ((first, *mates), *others)


def plan_layout(
    sizes: Sequence[tuple[int, int]],
    boxes: Sequence[Box | None] | None = None,
    *,
    alone: int | None = 0,
    max_canvases: int = MAX_CANVASES,
    canvas_area: int = CANVAS_AREA,
    multiple: int = CANVAS_MULTIPLE,
    max_aspect: float = MAX_ASPECT,
    min_fraction: float = MIN_FRACTION,
) -> Layout:
    """Canvases for pictures of ``sizes`` (``(width, height)`` each, 1 to 10 of them).

    boxes: per picture, the region to show ``(x0, y0, x1, y1)`` or None for the whole picture.
    alone: 0-based index of the picture that gets a canvas of its own (placed first), or None.
    With no more pictures than ``max_canvases`` every picture (its box) gets its own canvas.
    Raises a ValueError naming the picture when a size, a box or the count is wrong, or when the
    best layout would show a picture below ``min_fraction`` (see the module docstring).
    """
    sizes = _check_sizes(sizes)
    n = len(sizes)
    if n == 0:
        raise ValueError("plan_layout needs at least one picture")
    check_count(n)
    if not 1 <= max_canvases <= MAX_CANVASES:
        raise ValueError(f"max_canvases must be 1 to {MAX_CANVASES}, got {max_canvases}")
    if canvas_area < multiple * multiple:
        raise ValueError(f"canvas_area must be at least {multiple}x{multiple} pixels, got {canvas_area}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be at least 1, got {max_aspect}")
    if boxes is None:
        boxes = [None] * n
    if len(boxes) != n:
        raise ValueError(f"crop boxes: got {len(boxes)} for {n} pictures (give one per picture, None for the whole picture)")
    regions = [(0, 0, w, h) if b is None else check_box(b, (w, h), f"picture {i + 1}") for i, ((w, h), b) in enumerate(zip(sizes, boxes))]
    if alone is not None and not 0 <= alone < n:
        raise ValueError(f"alone: picture index {alone} is not among the {n} pictures (0-based; None for no base picture)")
    aspects = [(b[2] - b[0]) / (b[3] - b[1]) for b in regions]

    @lru_cache(maxsize=None)
    def arrange(group: tuple[int, ...]) -> _Plan:
        return _arrange(tuple(aspects[i] for i in group), max_aspect)

    if n <= max_canvases:
        groups = [(i,) for i in range(n)]
    else:
        rest = [i for i in range(n) if i != alone]
        free = max_canvases - (alone is not None)
        best, groups = None, None
        if free < 1:
            raise ValueError(f"{n} pictures with picture {alone + 1} alone need at least 2 canvases, got max_canvases={max_canvases}")
        for cand in _assignments(rest, free):
            plans = [arrange(g) for g in cand]
            score = (min(p.score[0] for p in plans), sum(p.score[1] for p in plans))
            if best is None or score > best:
                best, groups = score, list(cand)
        groups = ([(alone,)] if alone is not None else []) + groups
    canvases = tuple(_render_plan(arrange(g), g, [regions[i] for i in g], canvas_area, multiple, max_aspect) for g in groups)
    layout = Layout(canvases)
    worst = min(layout.tiles, key=lambda t: t.fraction)
    if worst.fraction < min_fraction:
        bw, bh = worst.box[2] - worst.box[0], worst.box[3] - worst.box[1]
        raise ValueError(
            f"picture {worst.picture + 1} ({bw}x{bh}) would be shown at {worst.fraction:.2f} of its size alone "
            f"(at least {min_fraction:.2f} is kept): crop it to what the instruction needs, give fewer pictures, "
            "or lower min_fraction"
        )
    return layout
