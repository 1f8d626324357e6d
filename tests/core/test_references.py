"""Picture references in instructions (firered_core/agent/references.py): property tests of the one
renumbering that the trainer's SIA shuffle and the stitched canvases share."""

import random
import re

import pytest

from firered_core.agent import references as R

CN = "零一二三四五六七八九十"
ORD = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def _ref(rng, n):
    """One reference to picture n in a random form, and its language."""
    forms = [
        (f"Picture {n}", "en"), (f"picture {n}", "en"), (f"image {n}", "en"), (f"img{n}", "en"), (f"Fig. {n}", "en"),
        (f"photo #{n}", "en"), (f"the {ORD[n - 1]} image", "en"), (f"the {ORD[n - 1].capitalize()} picture", "en"),
        (f"图{n}", "zh"), (f"图片{n}", "zh"), (f"第{n}张图", "zh"), (f"图{CN[n]}", "zh"), (f"第{CN[n]}张图片", "zh"),
    ]
    return rng.choice(forms)


FILLER = ["put", "the cat", "from", "on the table in", "and", "把", "的猫放到", "上", ", keep", "3 apples", "地图2", "a map",
          "in 2024", "(left)", "Picture frames", "10 cats"]


def _text(rng, n_pictures):
    parts, refs = [], []
    for _ in range(rng.randint(1, 6)):
        parts.append(rng.choice(FILLER))
        if rng.random() < 0.7:
            k = rng.randint(1, n_pictures)
            form, lang = _ref(rng, k)
            parts.append(form)
            refs.append((k, lang))
    return " ".join(parts), refs


def test_random_texts_renumber_by_the_mapping_and_back():
    rng = random.Random(11)
    for _ in range(400):
        n = rng.randint(1, 10)
        text, refs = _text(rng, n)
        assert R.referenced_pictures(text) == {k for k, _ in refs}, text
        perm = list(range(1, n + 1))
        rng.shuffle(perm)
        mapping = {old: new for old, new in zip(range(1, n + 1), perm)}
        out = R.renumber(text, mapping)
        assert R.referenced_pictures(out) == {mapping[k] for k, _ in refs}, (text, out)
        inverse = {v: k for k, v in mapping.items()}
        assert R.renumber(out, inverse) == text, "renumbering is undone by the inverse mapping"
        # words outside the references are kept: the texts agree once the numbers are blanked
        assert _skeleton(out) == _skeleton(text)


def _skeleton(text):
    return R.PICTURE_REF.sub("#", text)


def test_partial_mappings_leave_other_numbers_alone():
    rng = random.Random(2)
    for _ in range(200):
        text, refs = _text(rng, 10)
        keep = {k for k, _ in refs if rng.random() < 0.5}
        mapping = {k: 11 - k for k in keep}
        out = R.renumber(text, mapping)
        assert R.referenced_pictures(out) == {mapping.get(k, k) for k, _ in refs}


def test_notes_follow_each_reference_in_its_own_language():
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randint(4, 10)
        text, refs = _text(rng, n)
        mapping = {k: 1 + (k - 1) % 3 for k in range(1, n + 1)}  # several pictures per canvas
        notes = {k: {"en": f"spot{k}x", "zh": f"位{k}置"} for k in range(2, n + 1)}
        out = R.renumber(text, mapping, notes)
        for k in range(2, n + 1):
            en = sum(1 for r, lang in refs if r == k and lang == "en")
            zh = sum(1 for r, lang in refs if r == k and lang == "zh")
            assert out.count(f" (spot{k}x)") == en and out.count(f"（位{k}置）") == zh, (text, out)
        assert "spot1x" not in out  # a picture without a note gets none
        # with the notes removed the text is the plain renumbering
        plain = re.sub(r" \(spot\d+x\)|（位\d+置）", "", out)
        assert plain == R.renumber(text, mapping)


def test_examples():
    notes = {4: {"en": "top right", "zh": "右上"}}
    assert R.renumber("Put the cat of Picture 4 into the second image", {4: 2, 2: 1}, notes) == (
        "Put the cat of Picture 2 (top right) into the first image"
    )
    assert R.renumber("把图4的猫放到第二张图里", {4: 2, 2: 1}, notes) == "把图2（右上）的猫放到第一张图里"
    assert R.referenced_pictures("图十 and the tenth image and 地图2 and 图十一") == {10}
    assert R.renumber("图十", {10: 3}) == "图三"


def test_the_trainer_uses_the_same_function():
    from firered_trainer import sia

    assert sia.renumber is R.renumber and sia.referenced_pictures is R.referenced_pictures


@pytest.mark.parametrize("text", ["Picture 7 and 3 apples", "a map 地图2", ""])
def test_unmapped_text_is_unchanged(text):
    assert R.renumber(text, {1: 2}) == text
