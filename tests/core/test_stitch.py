"""Stitching up to ten pictures (firered_core/agent/stitch.py) and the editor taking them: masks to
crop boxes, rendered canvases, the renumbered instruction, the output size, the errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from firered_core.agent import stitch as S
from firered_core.pipeline import EditRequest, FireRedEditor

COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (220, 220, 30), (200, 30, 200), (30, 200, 200), (120, 60, 0)]


def _flat(size, colour):
    return Image.new("RGB", size, colour)


def test_each_picture_lands_in_its_tile():
    sizes = [(800, 600), (300, 300), (600, 200), (200, 500), (400, 400)]
    pics = [_flat(s, c) for s, c in zip(sizes, COLOURS)]
    st = S.stitch(pics, "put the hat of Picture 2 on the dog of Picture 4 in Picture 1, like picture 5")
    assert len(st.pictures) == 3 and st.layout is not None
    for ci, (canvas, plan) in enumerate(zip(st.pictures, st.layout.canvases)):
        assert canvas.size == (plan.width, plan.height)
        arr = np.asarray(canvas)
        for t in plan.tiles:
            x0, y0, x1, y1 = t.rect
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            assert tuple(arr[cy, cx]) == COLOURS[t.picture], (ci, t)
    mapping, notes = st.layout.canvas_of(), st.layout.notes()
    assert mapping[1] == 1 and len(st.layout.canvases[0].tiles) == 1
    expected = "put the hat of Picture {} on the dog of Picture {} in Picture 1, like picture {}".format(
        *(f"{mapping[k]} ({notes[k]['en']})" if k in notes else str(mapping[k]) for k in (2, 4, 5))
    )
    assert st.prompt == expected
    assert st.output_aspect == pytest.approx(800 / 600)
    d = st.describe()
    assert d["stitched"] and d["picture_canvas"] == mapping and d["prompt"] == st.prompt


def test_masks_crop_their_pictures():
    scene = _flat((400, 300), COLOURS[0])
    obj = np.zeros((200, 300, 3), np.uint8)
    obj[50:100, 100:200] = COLOURS[1]  # the object the instruction needs
    mask = torch.zeros(200, 300)
    mask[50:100, 100:200] = 1.0
    pics = [scene, Image.fromarray(obj), _flat((100, 100), COLOURS[2]), _flat((100, 100), COLOURS[3])]
    st = S.stitch(pics, "x", masks=[None, mask], margin=0.0)
    tile = next(t for t in st.layout.tiles if t.picture == 1)
    assert tile.box == (100, 50, 200, 100)
    canvas = np.asarray(st.pictures[st.layout.canvas_of()[2] - 1])
    x0, y0, x1, y1 = tile.rect
    assert (canvas[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2] == COLOURS[1]).all(), "only the masked object is shown"
    # three pictures or fewer are only cropped
    st = S.stitch(pics[:2], "x", masks=[None, mask], margin=0.0)
    assert st.layout is None and st.pictures[1].size == (100, 50) and st.pictures[0].size == (400, 300)


def test_box_from_mask():
    m = np.zeros((40, 60), np.float32)
    assert S.box_from_mask(m, (60, 40)) is None
    assert S.box_from_mask(torch.zeros(1, 64, 64), (60, 40)) is None  # LoadImage's empty mask, any size
    m[10:20, 30:40] = 1
    assert S.box_from_mask(m, (60, 40), margin=0.0) == (30, 10, 40, 20)
    assert S.box_from_mask(m, (60, 40), margin=0.5) == (25, 5, 45, 25)
    assert S.box_from_mask(Image.fromarray((m * 255).astype(np.uint8)), (60, 40), margin=0.0) == (30, 10, 40, 20)
    with pytest.raises(ValueError, match=r"crop mask of picture 2: the mask is 60x40 but its picture is 50x40"):
        S.box_from_mask(m, (50, 40), name="crop mask of picture 2")


@pytest.mark.parametrize("kwargs, match", [
    ({"boxes": [None, (0, 0, 10, 10)], "masks": [None, np.ones((8, 8))]}, r"picture 2: give a crop box or a crop mask, not both"),
    ({"boxes": [None, None, None, None, (0, 0, 999, 5)]}, r"crop box of picture 5: .* outside its 8x8 picture"),
    ({"boxes": [None] * 6}, r"crop boxes: got 6 for 5 pictures"),
    ({"base": 6}, r"base picture must be 0 \(none\) or 1 to 5, got 6"),
])
def test_bad_stitch_input_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.stitch([_flat((8, 8), c) for c in COLOURS[:5]], "x", **kwargs)


def test_the_editor_stitches_more_than_three_pictures_and_names_an_eleventh():
    pics = [_flat((64 + 16 * i, 48), COLOURS[i % 7]) for i in range(10)]
    req = EditRequest(prompt="the cat of Picture 7 in Picture 1")
    out, req2, st = FireRedEditor.stitch(pics, req)
    assert len(out) == 3 and st.layout is not None and req2.prompt == st.prompt != req.prompt
    assert (req2.width, req2.height) == S.output_size(64 / 48) == (1184, 896)  # as plan_sizes sizes a 4:3 last picture
    assert all(c.width * c.height <= req.ref_area for c in st.layout.canvases)
    # a set size is kept; three pictures pass through untouched
    assert FireRedEditor.stitch(pics[:5], EditRequest(prompt="x", width=512, height=512))[1].width == 512
    three = pics[:3]
    assert FireRedEditor.stitch(three, req) == (three, req, None)
    with pytest.raises(ValueError, match=r"picture 11 is one too many.*at most 10"):
        FireRedEditor.stitch(pics + [pics[0]], req)


@pytest.mark.slow
def test_a_stitched_edit_runs_on_the_tiny_model(tiny_model_dir):
    editor = FireRedEditor.from_pretrained(tiny_model_dir, dtype="fp32")
    pics = [_flat((96 + 8 * i, 64), COLOURS[i]) for i in range(5)]
    res = editor.edit(pics, "the hat of Picture 3 on Picture 1", steps=1, cfg=1.0, seed=1, ref_area=128 * 128,
                      vl_area=64 * 64, width=64, height=48)
    info = res.info["stitch"]
    assert info["stitched"] and len(info["canvases"]) == 3 and res.images[0].size == (64, 48)
    assert info["prompt"].startswith(f"the hat of Picture {info['picture_canvas'][3]} (")  # with its place
    assert all(w * h <= 128 * 128 for w, h in info["canvases"])


def test_cli_crop_options_and_an_eleventh_image(tmp_path, capsys, monkeypatch):
    from firered_core import cli

    src = tmp_path / "in.png"
    _flat((60, 40), COLOURS[0]).save(src)
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 30:40] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    pics = [_flat((60, 40), COLOURS[0])] * 4
    assert cli.crop_boxes([], pics) is None
    assert cli.crop_boxes(["2=1,2,30,40", "4=" + str(tmp_path / "m.png")], pics) == [None, (1, 2, 30, 40), None, (29, 9, 41, 21)]
    for spec, message in [
        (["5=1,2,3,4"], "N a picture number 1 to 4"), (["x"], "expected N=x0,y0,x1,y1"),
        (["1=0,0,99,9"], "crop box of picture 1 (--crop '1=0,0,99,9'): (0, 0, 99, 9) is empty or outside its 60x40"),
        (["1=1,1,5,5", "1=2,2,6,6"], "--crop given twice for picture 1"), (["1=" + str(tmp_path / "no.png")], "no such file"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=__import__("re").escape(message)):
            cli.crop_boxes(spec, pics)
    Image.fromarray(mask * 0).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="the mask has no white part"):
        cli.crop_boxes(["1=" + str(tmp_path / "empty.png")], pics)
    monkeypatch.setattr(FireRedEditor, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded a model")))
    out = str(tmp_path / "o.png")
    rc = cli.main(["edit", "--model", str(tmp_path), "--prompt", "x", "--out", out, *(["--image", str(src)] * 11)])
    err = capsys.readouterr().err
    assert rc == 2 and "--image given 11 times: picture 11" in err and "at most 10" in err
    rc = cli.main(["edit", "--model", str(tmp_path), "--prompt", "x", "--out", out, "--image", str(src), "--base-picture", "2"])
    assert rc == 2 and "--base-picture must be 0 (none) or 1 to 1, got 2" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_edits_five_pictures(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from firered_core import cli

    real_edit, seen = FireRedEditor.edit, {}  # small canvases, so the tiny model's run takes seconds
    monkeypatch.setattr(FireRedEditor, "edit",
                        lambda self, *a, **k: seen.update(k) or real_edit(self, *a, **k, ref_area=128 * 128, vl_area=64 * 64))

    paths = []
    for i in range(5):
        paths += ["--image", str(tmp_path / f"p{i}.png")]
        _flat((40 + 8 * i, 32), COLOURS[i]).save(paths[-1])
    out = tmp_path / "out.png"
    rc = cli.main(["edit", "--model", str(tiny_model_dir), *paths, "--crop", "2=0,0,20,32", "--prompt", "Picture 5 on Picture 1",
                   "--out", str(out), "--steps", "1", "--cfg", "1", "--width", "64", "--height", "48", "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "stitched onto canvases" in err and "the instruction read: 'Picture " in err
    assert Image.open(out).size == (64, 48)
    assert seen["crop_boxes"] == [None, (0, 0, 20, 32), None, None, None] and seen["base_picture"] == 1
