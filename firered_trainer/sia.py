"""Stochastic Instruction Alignment -- "collate shuffle & drop" (FireRed report section 3.2) --
and the choice of instruction per sample.

At collation the reference pictures of a multi-picture sample are randomly permuted and some are
dropped, and every reference to a picture in the instruction ("Picture 2", "Fig. 2", "image 2",
"the second image", "2nd picture", "图2", "第2张图", also with Chinese numerals 一/二/三, and next
to Chinese text as in "把Picture 1的猫") is renumbered so the text still points at the same
picture; 地图2 ("map 2") and the other Chinese words ending in 图 are not references. This teaches the model to bind "Picture N" to the N-th picture it is shown,
not to a fixed slot.

Choices where the report is silent (documented, and options):

* a picture the instruction refers to is never dropped (dropping it would leave the text pointing
  at nothing); only unreferenced pictures are dropped, each with probability ``drop_prob``;
* at least ``min_keep`` pictures stay (default 1: an edit sample stays an edit sample);
* a reference to a picture number that does not exist is left as written.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

_CN_DIGITS = {"一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_OUT = {v: k for k, v in _CN_DIGITS.items()}
_CN_NUM = r"\d+|[一二三四五六七八九]"
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


def renumber(text: str, mapping: dict[int, int]) -> str:
    """Rewrite every picture reference ``old -> mapping[old]`` (1-based); others are kept."""

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
                return whole[: start - s0] + _like(n, mapping[old]) + whole[end - s0 :]
        return m.group(0)

    return PICTURE_REF.sub(sub, text)


@dataclass(frozen=True)
class Alignment:
    """order: the kept pictures' original 0-based indices, in their new order; text: renumbered."""

    order: tuple[int, ...]
    text: str


def shuffle_and_drop(
    text: str,
    n_pictures: int,
    rng: random.Random,
    *,
    drop_prob: float = 0.2,
    shuffle: bool = True,
    min_keep: int = 1,
) -> Alignment:
    """Permute and drop the pictures of one sample, renumbering the instruction to match."""
    if n_pictures <= 1:
        return Alignment(tuple(range(n_pictures)), text)
    refs = {r - 1 for r in referenced_pictures(text) if 1 <= r <= n_pictures}
    keep = [i for i in range(n_pictures) if i in refs or rng.random() >= drop_prob]
    dropped = [i for i in range(n_pictures) if i not in keep]
    while len(keep) < min(min_keep, n_pictures):
        keep.append(dropped.pop(rng.randrange(len(dropped))))
    keep.sort()
    if shuffle:
        rng.shuffle(keep)
    mapping = {old + 1: new + 1 for new, old in enumerate(keep)}
    return Alignment(tuple(keep), renumber(text, mapping))


def choose_instruction(sample, rng: random.Random, *, chinese_prob: float = 0.5, inverse_prob: float = 0.0,
                       text_dropout: float = 0.05):
    """Pick the instruction variant for one sample (released trainer's candidates: English,
    Chinese, and -- for single-source samples -- the inverse edit, which swaps source and target),
    with ``text_dropout`` giving the empty instruction used for CFG.

    Returns ``(text, sources, target)`` as paths.
    """
    text, inverse = sample.instruction, False
    if sample.instruction_cn and rng.random() < chinese_prob:
        text = sample.instruction_cn
    if sample.n_sources == 1 and rng.random() < inverse_prob:
        inv = [t for t in (sample.inverse_instruction, sample.inverse_instruction_cn) if t]
        if inv:
            text, inverse = rng.choice(inv), True
    sources, target = list(sample.sources), sample.target
    if inverse:
        sources, target = [sample.target], sample.sources[0]
    if rng.random() < text_dropout:
        text = ""
    return text, sources, target


# ---------------------------------------------------------------------------------------------
# what the rules above can produce (the feature cache encodes exactly these)
# ---------------------------------------------------------------------------------------------


def possible_orders(text: str, n: int, sia) -> list[tuple[int, ...]]:
    """Every picture order :func:`shuffle_and_drop` can return for this text under the settings
    ``sia`` (``drop_prob``, ``shuffle``): what the feature cache must hold. Kept next to the rule
    it enumerates; a test checks the two agree."""
    if n <= 1:
        return [tuple(range(n))]
    refs = {r - 1 for r in referenced_pictures(text) if 1 <= r <= n}
    sizes = range(1, n + 1) if sia.drop_prob > 0 else [n]
    out = []
    for k in sizes:
        for subset in itertools.combinations(range(n), k):
            if not refs <= set(subset):
                continue
            out.extend(itertools.permutations(subset) if sia.shuffle else [subset])
    return out


def instruction_choices(sample, sia) -> list[tuple[str, tuple[str, ...], str]]:
    """(text, sources, target) for every instruction :func:`choose_instruction` can pick under ``sia``."""
    out = [(sample.instruction, tuple(sample.sources), sample.target)]
    if sample.instruction_cn and sia.chinese_prob > 0:
        out.append((sample.instruction_cn, tuple(sample.sources), sample.target))
    if sample.n_sources == 1 and sia.inverse_prob > 0:
        for t in (sample.inverse_instruction, sample.inverse_instruction_cn):
            if t:
                out.append((t, (sample.target,), sample.sources[0]))
    if sia.text_dropout > 0:
        out.extend(("", s, t) for _, s, t in list(out))
    return list(dict.fromkeys(out))
