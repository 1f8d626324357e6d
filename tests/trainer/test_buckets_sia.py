"""The Multi-Condition Aware Bucket Sampler and Stochastic Instruction Alignment."""

import math
import random
from collections import Counter

import pytest

from firered_trainer.buckets import BucketBatchSampler, aspect_bucket, bucket_key, fit_to_buckets
from firered_trainer.sia import choose_instruction, referenced_pictures, renumber, shuffle_and_drop


def synthetic(n=600, seed=0):
    """keys and dataset names for n samples of 2 datasets, 0-2 sources, 3 aspect ratios."""
    rng = random.Random(seed)
    keys, names = [], []
    for i in range(n):
        ds = "photos" if i % 3 else "text"
        c = rng.choice([0, 1, 1, 2])
        keys.append((ds, c, tuple(rng.choice([1.0, 0.5]) for _ in range(c)), rng.choice([1.0, 1.5, 0.7])))
        names.append(ds)
    return keys, names


def draw(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_aspect_buckets():
    assert aspect_bucket(1024, 1024) == 1.0
    assert aspect_bucket(1920, 1080) == 1.8
    assert aspect_bucket(100, 1000) == 0.3  # clamped at 0.25, rounded to 0.1 steps
    assert aspect_bucket(5000, 100) == 4.0


def test_batches_are_homogeneous():
    keys, names = synthetic()
    s = BucketBatchSampler(keys, names, 4, seed=1)
    for b in draw(s, 200):
        assert len(b.indices) == 4
        assert {s.assigned[i] for i in b.indices} == {b.key}
        assert {(keys[i][0], keys[i][1]) for i in b.indices} == {b.key[:2]}  # one task, one picture count
        assert len({names[i] for i in b.indices}) == 1


def test_same_seed_same_order_other_seed_other_order():
    keys, names = synthetic()
    a = [b.indices for b in draw(BucketBatchSampler(keys, names, 4, seed=3), 100)]
    b = [b.indices for b in draw(BucketBatchSampler(keys, names, 4, seed=3), 100)]
    c = [b.indices for b in draw(BucketBatchSampler(keys, names, 4, seed=4), 100)]
    assert a == b and a != c


def test_weights_are_respected():
    keys, names = synthetic(900)
    s = BucketBatchSampler(keys, names, 2, seed=0, dataset_weights={"photos": 3.0, "text": 1.0},
                           count_weights={0: 0.0, 1: 1.0, 2: 1.0})
    n = 4000
    batches = draw(s, n)
    counts = Counter(b.key[1] for b in batches)
    assert counts[0] == 0  # weight 0: never drawn
    # per draw: count 1 or 2 with p = 1/2; then photos with p = 3/4. Bound: 4 standard deviations.
    for observed, p in ((counts[1], 0.5), (sum(names[b.indices[0]] == "photos" for b in batches), 0.75)):
        assert abs(observed - n * p) < 4 * math.sqrt(n * p * (1 - p)), (observed, n * p)


def test_ranks_split_the_one_process_batch():
    """2 processes at batch 3 draw, step for step, the batches of 1 process at batch 6: rank 0 the
    first half, rank 1 the second (what makes a 2-process run the 1-process computation)."""
    keys, names = synthetic()
    one = BucketBatchSampler(keys, names, 6, seed=5)
    r0 = BucketBatchSampler(keys, names, 3, seed=5, rank=0, world_size=2)
    r1 = BucketBatchSampler(keys, names, 3, seed=5, rank=1, world_size=2)
    for g, a, b in zip(draw(one, 400), draw(r0, 400), draw(r1, 400)):  # several cycles through every queue
        assert a.indices + b.indices == g.indices and a.key == b.key == g.key
        assert (a.offset, b.offset) == (0, 3) and a.all_indices == b.all_indices == g.indices
        assert not set(a.indices) & set(b.indices)  # one step: no sample on both ranks


def test_resume_mid_epoch_continues_the_same_order():
    keys, names = synthetic()
    full = [b.indices for b in draw(BucketBatchSampler(keys, names, 4, seed=9), 150)]
    s = BucketBatchSampler(keys, names, 4, seed=9)
    first = [b.indices for b in draw(s, 70)]
    state = s.state_dict()
    resumed = BucketBatchSampler(keys, names, 4, seed=9)
    resumed.load_state_dict(state)
    rest = [b.indices for b in draw(resumed, 80)]
    assert first + rest == full
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(keys, names, 4, seed=10).load_state_dict(state)


def test_preview_is_what_the_run_will_draw():
    """``preview`` (what the feature cache plans from) lists the batches a fresh sampler draws,
    on every rank the same global batches, without moving the sampler it is called on."""
    keys, names = synthetic()
    s = BucketBatchSampler(keys, names, 2, seed=7, rank=1, world_size=2)
    draw(s, 30)  # a sampler that has moved on
    planned = [(b.all_indices, b.indices, b.key) for b in s.preview(120)]
    assert s.step == 30
    fresh = BucketBatchSampler(keys, names, 2, seed=7, rank=1, world_size=2)
    assert planned == [(b.all_indices, b.indices, b.key) for b in draw(fresh, 120)]
    assert [b.indices for b in draw(s, 5)] == [p[1] for p in planned[30:35]]


ASPECTS = (1.0, 0.75, 1.33, 0.56, 1.78, 0.4, 2.5)


def mixed(n=2000, seed=0):
    """n samples of 1-3 pictures over 7 aspects, the common ones far more frequent, as real data is:
    most (count, aspects...) combinations hold only a few samples."""
    rng = random.Random(seed)
    weights = (30, 15, 15, 10, 10, 3, 2)
    keys, names = [], []
    for _ in range(n):
        c = rng.choice([1, 1, 2, 3])
        keys.append(("edit", c, tuple(aspect_bucket(rng.choices(ASPECTS, weights)[0] * 1000, 1000) for _ in range(c)),
                     aspect_bucket(rng.choices(ASPECTS, weights)[0] * 1000, 1000)))
        names.append("d")
    return keys, names


@pytest.mark.parametrize("batch, world", [(1, 8), (4, 1), (4, 8)])
def test_small_buckets_merge_and_every_sample_is_used(batch, world, caplog):
    keys, names = mixed()
    with caplog.at_level("INFO", logger="firered_trainer.buckets"):
        samplers = [BucketBatchSampler(keys, names, batch, seed=0, rank=r, world_size=world) for r in range(world)]
        epochs = 3
        seen = [set() for _ in range(world)]
        for _ in range(epochs * samplers[0].epoch_steps):
            drawn = [s.next_batch() for s in samplers]
            assert len({(b.key[1], b.key) for b in drawn}) >= 1 and len({b.key[1] for b in drawn}) == 1  # same kind
            for r, b in enumerate(drawn):
                assert len(b.indices) == batch and {samplers[r].assigned[i] for i in b.indices} == {b.key}
                seen[r].update(b.indices)
            flat = [i for b in drawn for i in b.indices]
            assert len(flat) == len(set(flat))  # the ranks of one step share no sample
    coverage = len(set().union(*seen)) / len(keys)
    print(f"batch {batch} x {world} processes: {coverage:.2%} of {len(keys)} samples used in {epochs} epochs")
    assert coverage >= 0.99
    # a merged sample moved to a bucket of its own picture count, at the nearest aspects there
    plan = samplers[0].plan
    assert plan.merged > 0 and all(k[:2] == keys[i][:2] for i, k in enumerate(plan.keys))
    assert any("epoch 1 (process 0) used" in r.getMessage() for r in caplog.records)


def test_merged_samples_train_at_their_buckets_aspect():
    from firered_trainer.data import EditSample

    wide = EditSample(("a.png",), "b.png", "x", ((1900, 1000),), (1900, 1000))
    square = [EditSample(("s.png",), "t.png", "x", ((1000, 1000),), (1000, 1000)) for _ in range(4)]
    samples = [wide, *square]
    s = BucketBatchSampler([bucket_key(x) for x in samples], ["d"] * 5, 2, seed=0)
    assert s.plan.merged == 1 and s.assigned[0] == bucket_key(square[0])
    fitted = fit_to_buckets(samples, s.assigned)
    assert [bucket_key(f) for f in fitted] == s.assigned and fitted[1:] == square
    w, h = fitted[0].target_size
    assert w == h and abs(w * h - 1900 * 1000) / (1900 * 1000) < 0.01  # cropped to square, same area


def test_a_bucket_set_that_cannot_fill_a_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="no bucket holds a full batch of 8"):
        BucketBatchSampler([("t", 1, (1.0,), 1.0)] * 5, ["d"] * 5, 8)


def test_picture_references_are_found_and_renumbered():
    text = "Put the cup from Picture 2 on the table in picture 1; keep Fig. 3 and image 2 as is. 把图2的杯子放到第1张图的桌子上，参考图片三"
    assert referenced_pictures(text) == {1, 2, 3}
    out = renumber(text, {1: 2, 2: 3, 3: 1})
    assert out == ("Put the cup from Picture 3 on the table in picture 2; keep Fig. 1 and image 3 as is. "
                   "把图3的杯子放到第2张图的桌子上，参考图片一")
    assert renumber("Picture 7 and 3 apples", {1: 2}) == "Picture 7 and 3 apples"


@pytest.mark.parametrize("text, refs, renumbered", [
    # English references written next to Chinese text (no \\b boundary between "把" and "Picture")
    ("把Picture 1的猫放到Picture 2中", {1, 2}, "把Picture 2的猫放到Picture 1中"),
    ("把image2里的狗换成pic 1的猫", {1, 2}, "把image1里的狗换成pic 2的猫"),
    # Chinese words that end in 图 are not picture references; a reference beside them still is
    ("把地图2挂到图1的墙上，保持构图", {1}, "把地图2挂到图2的墙上，保持构图"),
    ("画一张草图3和蓝图4，试图5", set(), "画一张草图3和蓝图4，试图5"),
    ("第二张图片的人站到图一旁边", {1, 2}, "第一张图片的人站到图二旁边"),
    # ordinals, in the form they were written
    ("Put the second image's hat on the person in the first picture", {1, 2},
     "Put the first image's hat on the person in the second picture"),
    ("The 2nd photo goes behind the 1st photo; First image stays.", {1, 2},
     "The 1st photo goes behind the 2nd photo; Second image stays."),
    # not references: a word that only contains the noun, a number of things
    ("the picturesque hill, 2 apples, imagery 1", set(), "the picturesque hill, 2 apples, imagery 1"),
])
def test_references_in_mixed_scripts_and_ordinals(text, refs, renumbered):
    assert referenced_pictures(text) == refs
    assert renumber(text, {1: 2, 2: 1}) == renumbered


def test_shuffle_and_drop_keeps_the_text_pointing_at_the_same_picture():
    rng = random.Random(0)
    pictures = ["cup", "table", "lamp"]
    text = "put the object in Picture 1 onto Picture 2"
    seen_orders, dropped_lamp = set(), 0
    for _ in range(300):
        al = shuffle_and_drop(text, 3, rng, drop_prob=0.5)
        new = [pictures[i] for i in al.order]
        seen_orders.add(al.order)
        assert "cup" in new and "table" in new  # referenced pictures are never dropped
        # the rewritten text names the cup's and the table's new places, exactly
        assert al.text == f"put the object in Picture {new.index('cup') + 1} onto Picture {new.index('table') + 1}"
        dropped_lamp += "lamp" not in new
    assert len(seen_orders) > 3 and 100 < dropped_lamp < 200


def test_instruction_choice_and_inverse(tmp_path):
    from firered_trainer.data import EditSample

    s = EditSample(("src.png",), "tgt.png", "make it red", ((8, 8),), (8, 8), instruction_cn="变红",
                   inverse_instruction="make it blue")
    rng = random.Random(1)
    outs = [choose_instruction(s, rng, chinese_prob=0.5, inverse_prob=0.3, text_dropout=0.1) for _ in range(400)]
    texts = Counter(o[0] for o in outs)
    assert set(texts) == {"make it red", "变红", "make it blue", ""}
    for text, sources, target in outs:
        if text == "make it blue":
            assert sources == ["tgt.png"] and target == "src.png"


@pytest.mark.parametrize("text,n", [("put the lamp of Picture 1 into Picture 3", 3), ("make it red", 3),
                                    ("把图2的猫放到图1中", 2), ("swap them", 1)])
@pytest.mark.parametrize("drop_prob,shuffle", [(0.3, True), (0.0, True), (0.3, False)])
def test_the_cache_enumerates_exactly_what_sia_draws(text, n, drop_prob, shuffle):
    """``sia.possible_orders`` (what the feature cache encodes) is the set of orders
    ``shuffle_and_drop`` draws: nothing drawn is missing from the cache, nothing cached is never drawn."""
    import random
    from types import SimpleNamespace

    from firered_trainer import sia

    settings = SimpleNamespace(drop_prob=drop_prob, shuffle=shuffle)
    rng = random.Random(0)
    drawn = {sia.shuffle_and_drop(text, n, rng, drop_prob=drop_prob, shuffle=shuffle).order for _ in range(3000)}
    assert drawn == set(sia.possible_orders(text, n, settings))


def test_the_cache_enumerates_every_instruction_sia_picks():
    import random
    from types import SimpleNamespace

    from firered_trainer import sia
    from firered_trainer.data import EditSample

    s = EditSample(sources=("a.png",), target="t.png", instruction="make it red", instruction_cn="变红",
                   inverse_instruction="make it blue", inverse_instruction_cn=None, source_sizes=((8, 8),),
                   target_size=(8, 8))
    settings = SimpleNamespace(chinese_prob=0.5, inverse_prob=0.3, text_dropout=0.1)
    rng = random.Random(1)
    picked = {(t, tuple(src), tgt) for t, src, tgt in (
        sia.choose_instruction(s, rng, chinese_prob=0.5, inverse_prob=0.3, text_dropout=0.1) for _ in range(4000))}
    assert picked == set(sia.instruction_choices(s, settings))
