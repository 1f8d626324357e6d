"""Stochastic Instruction Alignment -- "collate shuffle & drop" (FireRed report section 3.2) --
and the choice of instruction per sample.

At collation the reference pictures of a multi-picture sample are randomly permuted and some are
dropped, and every reference to a picture in the instruction ("Picture 2", "Fig. 2", "image 2",
"图2", "第2张图", also with Chinese numerals 一/二/三) is renumbered so the text still points at
the same picture. This teaches the model to bind "Picture N" to the N-th picture it is shown,
not to a fixed slot.

Choices where the report is silent (documented, and options):

* a picture the instruction refers to is never dropped (dropping it would leave the text pointing
  at nothing); only unreferenced pictures are dropped, each with probability ``drop_prob``;
* at least ``min_keep`` pictures stay (default 1: an edit sample stays an edit sample);
* a reference to a picture number that does not exist is left as written.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_CN_DIGITS = {"一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_OUT = {v: k for k, v in _CN_DIGITS.items()}
_NUM = r"(\d+|[一二三四五六七八九])"
# (pattern, group of the number); English words are case-insensitive and whole words
PICTURE_REF = re.compile(
    r"(?P<en>\b(?:picture|pic|image|img|figure|fig\.?|photo)\s*#?\s*)(?P<en_n>\d+)\b"
    r"|(?P<cn_di>第)(?P<cn_di_n>" + _NUM[1:-1] + r")(?P<cn_di_tail>张(?:图片?|照片|图像)?|幅图)"
    r"|(?P<cn>图片?|图像|照片)\s*(?P<cn_n>" + _NUM[1:-1] + r")",
    re.IGNORECASE,
)


def _to_int(s: str) -> int:
    return _CN_DIGITS[s] if s in _CN_DIGITS else int(s)


def _like(old: str, new: int) -> str:
    return _CN_OUT.get(new, str(new)) if old in _CN_DIGITS else str(new)


def referenced_pictures(text: str) -> set[int]:
    """The 1-based picture numbers the text mentions."""
    out = set()
    for m in PICTURE_REF.finditer(text):
        n = m.group("en_n") or m.group("cn_di_n") or m.group("cn_n")
        out.add(_to_int(n))
    return out


def renumber(text: str, mapping: dict[int, int]) -> str:
    """Rewrite every picture reference ``old -> mapping[old]`` (1-based); others are kept."""

    def sub(m: re.Match) -> str:
        for grp in ("en_n", "cn_di_n", "cn_n"):
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
