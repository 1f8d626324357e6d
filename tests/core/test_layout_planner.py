"""The multi-picture layout planner (firered_core/agent/layout.py): property tests over many seeded
random size mixes (hypothesis is not in the environment), the stated fraction, and its errors."""

import itertools
import math
import random

import pytest

from firered_core.agent import layout as L


def _sizes(rng, n, lo=1 / 3, hi=3.0):
    out = []
    for _ in range(n):
        a = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        area = rng.uniform(48**2, 3000**2)
        w = max(1, round(math.sqrt(area * a)))
        out.append((w, max(1, round(w / a))))
    return out


def _boxes(rng, sizes, lo=1 / 3, hi=3.0):
    """Random crop boxes (or None) whose aspect stays in [lo, hi]."""
    out = []
    for w, h in sizes:
        if rng.random() < 0.5 or w < 4 or h < 4:
            out.append(None)
            continue
        for _ in range(20):
            x0, x1 = sorted(rng.sample(range(w + 1), 2))
            y0, y1 = sorted(rng.sample(range(h + 1), 2))
            if lo <= (x1 - x0) / (y1 - y0) <= hi and (x1 - x0) * (y1 - y0) >= 16:
                out.append((x0, y0, x1, y1))
                break
        else:
            out.append(None)
    return out


def _check(lay: L.Layout, sizes, boxes, *, alone, max_canvases=3, area=L.CANVAS_AREA, max_aspect=L.MAX_ASPECT):
    n = len(sizes)
    assert len(lay.canvases) == min(n, max_canvases)
    assert sorted(t.picture for t in lay.tiles) == list(range(n)), "every picture exactly once"
    regions = [(0, 0, w, h) if b is None else tuple(b) for (w, h), b in zip(sizes, boxes or [None] * n)]
    mapping = lay.canvas_of()
    for ci, c in enumerate(lay.canvases):
        assert c.width * c.height <= area, "canvas within the VAE area"
        if len(c.tiles) > 1:  # stitched canvases are padded to the aspect bound (one step of rounding)
            assert c.width % L.CANVAS_MULTIPLE == 0 and c.height % L.CANVAS_MULTIPLE == 0
            step = L.CANVAS_MULTIPLE
            assert c.width / (c.height + step) <= max_aspect and c.height / (c.width + step) <= max_aspect
        assert [t.picture for t in c.tiles] == sorted(t.picture for t in c.tiles), "reading order kept"
        for t in c.tiles:
            assert mapping[t.picture + 1] == ci + 1
            x0, y0, x1, y1 = t.rect
            assert 0 <= x0 < x1 <= c.width and 0 <= y0 < y1 <= c.height, "tile inside its canvas"
            assert t.box == regions[t.picture]
            bw, bh = t.box[2] - t.box[0], t.box[3] - t.box[1]
            tw, th = t.size
            a = bw / bh
            assert abs(tw / th - a) / a <= 1.0 / tw + 1.0 / th + 1e-9, f"aspect kept: {tw}x{th} for {bw}x{bh}"
            assert t.fraction == pytest.approx(math.sqrt(tw * th / area))
        for p, q in itertools.combinations(c.tiles, 2):
            a, b = p.rect, q.rect
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "tiles do not overlap"
        if len(c.tiles) > 1:
            words = [lay.notes()[t.picture + 1] for t in c.tiles]
            assert len({w["en"] for w in words}) == len(words) and len({w["zh"] for w in words}) == len(words)
    if n > max_canvases and alone is not None:
        first = lay.canvases[0]
        assert [t.picture for t in first.tiles] == [alone], "the base picture has canvas 1 to itself"
        assert first.tiles[0].fraction > 0.9
    assert set(lay.notes()) == {t.picture + 1 for c in lay.canvases if len(c.tiles) > 1 for t in c.tiles}


def test_random_mixes_keep_every_guarantee_and_the_stated_fraction():
    rng = random.Random(1234)
    worst = 1.0
    for trial in range(120):
        n = rng.choice([1, 2, 3, 4, 4, 5, 5, 6, 6, 7, 8, 9]) if trial % 12 else 10
        sizes = _sizes(rng, n)
        boxes = _boxes(rng, sizes) if trial % 3 == 0 else None
        alone = rng.choice([0, 0, None, rng.randrange(n)]) if n < 10 else rng.choice([0, rng.randrange(n)])
        lay = L.plan_layout(sizes, boxes, alone=alone)
        _check(lay, sizes, boxes, alone=alone)
        assert lay.min_fraction >= L.FRACTION_1_3, (sizes, boxes, alone)
        if n > 3:
            worst = min(worst, lay.min_fraction)
    assert worst < 0.6  # the mixes did include hard ones


def test_extreme_aspects_of_ten_pictures_keep_the_stated_fraction():
    rng = random.Random(7)
    for _ in range(12):
        aspects = [rng.choice([1 / 3, 1.0, 3.0]) for _ in range(10)]
        sizes = [(round(600 * math.sqrt(a)), round(600 / math.sqrt(a))) for a in aspects]
        lay = L.plan_layout(sizes)
        _check(lay, sizes, None, alone=0)
        assert lay.min_fraction >= L.FRACTION_1_3, aspects


def test_other_settings_keep_the_guarantees():
    rng = random.Random(99)
    for _ in range(40):
        n = rng.randint(1, 7)
        sizes = _sizes(rng, n, 1 / 2, 2)
        mc, area, ma = rng.choice([2, 3]), rng.choice([512 * 512, 768 * 768, 1024 * 1024]), rng.choice([1.5, 2.0, 3.0])
        alone = rng.choice([0, None])
        lay = L.plan_layout(sizes, alone=alone, max_canvases=mc, canvas_area=area, max_aspect=ma, min_fraction=0.0)
        _check(lay, sizes, None, alone=alone, max_canvases=mc, area=area, max_aspect=ma)


def test_wild_aspects_either_keep_min_fraction_or_name_the_picture():
    rng = random.Random(5)
    raised = 0
    for _ in range(50):
        n = rng.randint(4, 8)
        sizes = _sizes(rng, n, 1 / 12, 12)
        try:
            lay = L.plan_layout(sizes, min_fraction=0.45)
        except ValueError as e:
            raised += 1
            assert "picture " in str(e) and "of its size alone" in str(e) and "min_fraction" in str(e)
            continue
        _check(lay, sizes, None, alone=0)
        assert lay.min_fraction >= 0.45
    assert raised  # the mixes did include impossible ones


def _one_row_per_canvas(aspects, groups):
    """Fraction of the worst tile when each group is a single padded row: a simple rival layout."""
    worst = 1.0
    for g in groups:
        a = [aspects[i] for i in g]
        s = sum(a)
        pad = max(s / L.MAX_ASPECT, 1.0) if len(g) > 1 else 1.0  # padded canvas height per row height
        worst = min(worst, min(math.sqrt(x / (s * pad)) for x in a))
    return worst


def test_the_search_beats_simple_rivals():
    """The chosen layout is at least as good (in continuous units, less a rounding allowance) as
    one row per canvas over every in-order split, and as every single-column layout."""
    rng = random.Random(3)
    for _ in range(30):
        n = rng.randint(4, 7)
        sizes = _sizes(rng, n)
        lay = L.plan_layout(sizes, alone=0, min_fraction=0.0)
        aspects = [w / h for w, h in sizes]
        rest = list(range(1, n))
        rival = max(
            _one_row_per_canvas(aspects, [rest[:c], rest[c:]]) for c in range(1, len(rest))
        )
        rival_cols = max(
            _one_row_per_canvas([1 / a for a in aspects], [rest[:c], rest[c:]]) for c in range(1, len(rest))
        )
        assert lay.min_fraction >= max(rival, rival_cols) * 0.95, (sizes, lay.min_fraction, rival, rival_cols)


def test_equal_pictures_get_the_obvious_layouts():
    # four square pictures besides the base: two canvases of two side by side (or stacked)
    lay = L.plan_layout([(1024, 768)] + [(512, 512)] * 4)
    assert [len(c.tiles) for c in lay.canvases] == [1, 2, 2]
    assert {(c.width, c.height) for c in lay.canvases[1:]} <= {(1408, 704), (704, 1408)}
    assert all(sum(t.size[0] * t.size[1] for t in c.tiles) == c.width * c.height for c in lay.canvases[1:]), "no padding"
    assert (lay.canvases[0].width, lay.canvases[0].height) == (1182, 886)  # the base picture at 1024^2, 4:3
    notes = lay.notes()
    assert {notes[2]["en"], notes[3]["en"]} in ({"left", "right"}, {"top", "bottom"})
    # three pictures or fewer: one canvas each, nothing shared
    lay = L.plan_layout([(640, 480), (480, 640), (500, 500)])
    assert [len(c.tiles) for c in lay.canvases] == [1, 1, 1] and lay.notes() == {}


def test_columns_are_tried_too():
    """3:1 over 2:1 beside a 1:3 (two columns) shows the worst picture at 0.47 of its size alone;
    the best rows-only layout manages 0.28."""
    lay = L.plan_layout([(800, 600), (600, 200), (400, 200), (200, 600)], max_canvases=2)
    c = lay.canvases[1]
    assert [t.picture for t in c.tiles] == [1, 2, 3] and not c.tiles[0].across
    assert lay.min_fraction > 0.44
    assert {k: v["en"] for k, v in lay.notes().items()} == {2: "top left", 3: "bottom left", 4: "right"}
    assert lay.notes()[2]["zh"] == "左上"


def test_place_words():
    t = L.Tile(0, (0, 0, 1, 1), (0, 0, 1, 1), 1.0, line=0, lines=2, place=1, places=2, across=True)
    assert (L.where_en(t), L.where_zh(t)) == ("top right", "右上")
    t = L.Tile(0, (0, 0, 1, 1), (0, 0, 1, 1), 1.0, line=1, lines=3, place=1, places=3, across=False)
    assert (L.where_en(t), L.where_zh(t)) == ("centre", "中间")
    t = L.Tile(0, (0, 0, 1, 1), (0, 0, 1, 1), 1.0, line=0, lines=1, place=2, places=3, across=True)
    assert (L.where_en(t), L.where_zh(t)) == ("right", "右侧")
    t = L.Tile(0, (0, 0, 1, 1), (0, 0, 1, 1), 1.0, line=1, lines=2, place=3, places=5, across=True)
    assert L.where_en(t) == "bottom row, 4th from the left"
    assert L.where_zh(t) == "第2行从左数第4张"


def test_an_eleventh_picture_is_named():
    with pytest.raises(ValueError, match=r"picture 11 is one too many.*at most 10"):
        L.plan_layout([(64, 64)] * 11)
    L.plan_layout([(64, 64)] * 10)


@pytest.mark.parametrize("kwargs, match", [
    ({"boxes": [None, (0, 0, 0, 10), None, None]}, r"crop box of picture 2: \(0, 0, 0, 10\) is empty or outside its 64x48"),
    ({"boxes": [None, None, None, (10, 10, 70, 20)]}, r"crop box of picture 4: .* outside its 64x48"),
    ({"boxes": [None, None, None, "abc"]}, r"crop box of picture 4: expected \(x0, y0, x1, y1\)"),
    ({"boxes": [None]}, r"got 1 for 4 pictures"),
    ({"alone": 4}, r"alone: picture index 4 is not among the 4 pictures"),
    ({"max_canvases": 4}, r"max_canvases must be 1 to 3"),
    ({"alone": 0, "max_canvases": 1}, r"need at least 2 canvases"),
])
def test_bad_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        L.plan_layout([(64, 48)] * 4, **kwargs)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match=r"picture 2: empty picture \(0x5\)"):
        L.plan_layout([(5, 5), (0, 5)])
    with pytest.raises(ValueError, match=r"picture 1: expected a size"):
        L.plan_layout(["big"])
    with pytest.raises(ValueError, match="at least one picture"):
        L.plan_layout([])


def test_a_very_long_picture_alone_stays_within_the_area():
    lay = L.plan_layout([(40000, 10)], min_fraction=0.0)
    c = lay.canvases[0]
    assert c.width * c.height <= L.CANVAS_AREA and abs(c.width / c.height / 4000 - 1) <= 1 / c.height + 1 / c.width
