"""Stochastic Instruction Alignment -- "collate shuffle & drop" (FireRed report section 3.2) --
and the choice of instruction per sample.

At collation the reference pictures of a multi-picture sample are randomly permuted and some are
dropped, and every reference to a picture in the instruction ("Picture 2", "Fig. 2", "image 2",
"the second image", "2nd picture", "图2", "第2张图", also with Chinese numerals 一/二/三, and next
to Chinese text as in "把Picture 1的猫") is renumbered so the text still points at the same
picture; 地图2 ("map 2") and the other Chinese words ending in 图 are not references. The grammar
and :func:`renumber` are the core's (``firered_core/agent/references.py``), shared with stitching
more than three pictures onto canvases. This teaches the model to bind "Picture N" to the N-th
picture it is shown, not to a fixed slot.

Choices where the report is silent (documented, and options):

* a picture the instruction refers to is never dropped (dropping it would leave the text pointing
  at nothing); only unreferenced pictures are dropped, each with probability ``drop_prob``;
* at least ``min_keep`` pictures stay (default 1: an edit sample stays an edit sample);
* a reference to a picture number that does not exist is left as written.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

# the reference grammar and the renumbering are the core's (one implementation with stitching)
from firered_core.agent.references import referenced_pictures, renumber

__all__ = ["Alignment", "choose_instruction", "instruction_choices", "possible_orders", "referenced_pictures",
           "renumber", "shuffle_and_drop"]


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
