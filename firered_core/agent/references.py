"""Picture references in an instruction ("Picture 2", "the second image", "图2", "第2张图"): find
them and renumber them. One implementation for the trainer's SIA shuffle (``firered_trainer.sia``)
and for stitched canvases (:mod:`firered_core.agent.stitch`).

Recognised: "Picture 2", "Fig. 2", "image 2", "img 2", "photo #2", "the second image", "2nd picture",
"图2", "图片2", "第2张图", Chinese numerals 一 to 十 ("图三"), also next to Chinese text as in
"把Picture 1的猫". 地图2 ("map 2") and the other Chinese words ending in 图 are not references, and
a reference to a number the mapping does not name is left as written.
"""

from __future__ import annotations

import re

_CN_DIGITS = {"一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}
_CN_OUT = {v: k for k, v in _CN_DIGITS.items()}
_CN_NUM = r"\d+|[一二三四五六七八九](?![十])|十(?![一二三四五六七八九])"
_ORDINAL_WORDS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_ORDINAL_IN = {w: i + 1 for i, w in enumerate(_ORDINAL_WORDS)}
# Chinese words ending in 图 that are not a picture reference: 地图 map, 蓝图 blueprint, 草图 sketch,
# 试图 / 企图 / 力图 attempt, 意图 intention (示意图 diagram), 构图 composition, 版图 territory,
# 拼图 puzzle, 略图 outline, 视图 view, 制图 / 绘图 drawing, 插图 illustration, 贴图 texture, 宏图.
_CN_NOT_A_REF = "地蓝草试企力意构版拼略视制绘插贴宏"
_EN_NOUN = r"(?:picture|pic|image|img|figure|fig\.?|photo)"
# The edges are look-arounds on ASCII letters and digits, not \b: Python counts CJK characters as
# word characters, so "\bPicture 1\b" would miss "把Picture 1的猫" entirely.
PICTURE_REF = re.compile(
    r"(?P<en>(?<![A-Za-z])" + _EN_NOUN + r"\s*#?\s*)(?P<en_n>\d+)(?![\d])"
    r"|(?<![A-Za-z])(?P<ord_n>" + "|".join(_ORDINAL_WORDS) + r"|\d+(?:st|nd|rd|th))(?P<ord_tail>\s+" + _EN_NOUN
    + r"s?)(?![A-Za-z])"
    r"|(?P<cn_di>第)(?P<cn_di_n>" + _CN_NUM + r")(?P<cn_di_tail>张(?:图片?|照片|图像)?|幅图)"
    r"|(?<![" + _CN_NOT_A_REF + r"])(?P<cn>图片?|图像|照片)\s*(?P<cn_n>" + _CN_NUM + r")",
    re.IGNORECASE,
)
_GROUPS = ("en_n", "ord_n", "cn_di_n", "cn_n")


def _to_int(s: str) -> int:
    low = s.lower()
    if low in _ORDINAL_IN:
        return _ORDINAL_IN[low]
    if low[-2:] in ("st", "nd", "rd", "th") and low[:-2].isdigit():
        return int(low[:-2])
    return _CN_DIGITS[s] if s in _CN_DIGITS else int(s)


def _ordinal_suffix(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def _like(old: str, new: int) -> str:
    """``new`` written the way ``old`` was: a digit, a Chinese numeral, an English ordinal word
    (keeping its capitalisation) or a digit ordinal ("2nd")."""
    low = old.lower()
    if low in _ORDINAL_IN:
        if new > len(_ORDINAL_WORDS):
            return f"{new}{_ordinal_suffix(new)}"
        word = _ORDINAL_WORDS[new - 1]
        return word.capitalize() if old[0].isupper() else word
    if low[-2:] in ("st", "nd", "rd", "th") and low[:-2].isdigit():
        return f"{new}{_ordinal_suffix(new)}"
    return _CN_OUT.get(new, str(new)) if old in _CN_DIGITS else str(new)


def referenced_pictures(text: str) -> set[int]:
    """The 1-based picture numbers the text mentions."""
    out = set()
    for m in PICTURE_REF.finditer(text):
        out.add(_to_int(next(m.group(g) for g in _GROUPS if m.group(g) is not None)))
    return out


def renumber(text: str, mapping: dict[int, int], notes: dict[int, dict[str, str]] | None = None) -> str:
    """Rewrite every picture reference ``old -> mapping[old]`` (1-based); others are kept.

    notes: optional words per old number, ``{"en": ..., "zh": ...}``, written after the reference in
    the reference's own language: "Picture 5" -> "Picture 2 (top right)", "图5" -> "图2（右上）" (how
    stitched canvases are named, see :mod:`firered_core.agent.layout`)."""

    def sub(m: re.Match) -> str:
        for grp in _GROUPS:
            n = m.group(grp)
            if n is not None:
                old = _to_int(n)
                if old not in mapping:
                    return m.group(0)
                start, end = m.span(grp)
                s0 = m.start(0)
                whole = m.group(0)
                out = whole[: start - s0] + _like(n, mapping[old]) + whole[end - s0 :]
                note = (notes or {}).get(old)
                if note:
                    out += f"（{note['zh']}）" if grp.startswith("cn") else f" ({note['en']})"
                return out
        return m.group(0)

    return PICTURE_REF.sub(sub, text)
