"""Crop boxes from a grounding model (firered_core/agent/grounding.py): answers parsed and mapped back
to the picture, what the model is shown, the tiny Qwen2.5-VL end to end (its answers are gibberish:
whole pictures), and the refusal of a text encoder without its language head."""

import pytest
import torch
from PIL import Image

from firered_core.agent import grounding as G
from firered_core.agent import stitch, vlm


@pytest.mark.parametrize("answer, box", [
    ('{"bbox_2d": [10, 20, 110, 70]}', (20, 40, 220, 140)),  # shown at half size: doubled
    ('```json\n[{"bbox_2d": [10, 20, 110, 70], "label": "cat"}]\n```', (20, 40, 220, 140)),
    ("The cat is at [10, 20, 110, 70].", (20, 40, 220, 140)),
    ('{"bbox_2d": [110, 70, 10, 20]}', (20, 40, 220, 140)),  # corners in either order
    ('{"bbox_2d": [-5, -5, 60, 300]}', (0, 0, 120, 200)),  # clamped to the picture
    ('{"bbox_2d": [0, 0, 150, 100]}', None),  # the whole picture
    ('{"bbox_2d": [5, 5, 5, 50]}', None),  # empty
    ("no idea", None),
    ("", None),
])
def test_answers_map_back_to_the_picture(answer, box):
    assert G.parse_box(answer, (150, 100), (300, 200)) == box


def test_shown_size_is_kept_by_the_processor_grid():
    assert G.shown_size((4000, 3000)) == (756, 588)  # 768 x 576 rounded to the 28-pixel grid
    assert all(v % 28 == 0 for v in G.shown_size((1234, 567)))
    assert G.shown_size((20, 10)) == (28, 28)


class _Stub(vlm.LocalVLM):
    """A grounding model that answers a fixed box for the picture it is shown."""

    def __init__(self, answers):
        super().__init__(model=None, processor=None, source="stub")
        self.answers, self.seen = list(answers), []

    def chat_text(self, messages):
        return messages[-1]["content"][-1]["text"]

    def generate(self, text, pictures=(), **kw):
        self.seen.append((text, pictures[0].size, kw))
        return self.answers.pop(0)


def test_each_picture_is_asked_and_its_box_returned():
    pics = [Image.new("RGB", (1536, 768)), Image.new("RGB", (300, 200)), Image.new("RGB", (64, 64))]
    stub = _Stub(['{"bbox_2d": [0, 0, 384, 196]}', "I cannot tell."])
    boxes = G.ground_boxes(pics, "put the cat of Picture 2 on Picture 1", stub, skip=[False, False, True])
    assert boxes == [(0, 0, round(384 * 1536 / 756), 384), None, None]  # picture 2: no box in the answer; 3 not asked
    (t1, size1, kw1), (t2, size2, _) = stub.seen
    assert size1 == (756, 392) and size2 == (308, 196)  # multiples of 28, longer side about 768 at most
    assert "Picture 1 of 3" in t1 and "Picture 2 of 3" in t2 and "put the cat of Picture 2 on Picture 1" in t1
    assert kw1["temperature"] == 0.0  # greedy: the same answer every time
    with pytest.raises(ValueError, match="needs the edit instruction"):
        G.ground_boxes(pics, " ", stub)
    with pytest.raises(ValueError, match="picture 11 is one too many"):
        G.ground_boxes(pics * 4, "x", stub)


def test_boxes_feed_stitching():
    pics = [Image.new("RGB", (400, 300), (200, 0, 0))] + [Image.new("RGB", (300, 300), (0, 200, 0))] * 3
    stub = _Stub(['{"bbox_2d": [0, 0, 100, 200]}'] * 3)
    boxes = G.ground_boxes(pics, "x", stub, skip=[True])
    st = stitch.stitch(pics, "x", boxes=boxes)
    box = (0, 0, round(100 * 300 / 308), round(200 * 300 / 308))  # 300x300 is shown at 308x308
    assert boxes == [None] + [box] * 3
    assert [t.box for t in st.layout.tiles] == [(0, 0, 400, 300)] + [box] * 3


@pytest.mark.slow
def test_the_tiny_qwen_runs_and_a_headless_file_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from firered_core.formats.text_encoder_files import load_text_encoder

    local = vlm.LocalVLM.load(tiny_model_dir)
    pics = [Image.new("RGB", (96, 64), (200, 40, 30)), Image.new("RGB", (64, 96), (30, 40, 200))]
    first = G.ground_boxes(pics, "the cat of Picture 2 in Picture 1", local, max_new_tokens=6)
    assert len(first) == 2 and first == G.ground_boxes(pics, "the cat of Picture 2 in Picture 1", local, max_new_tokens=6)
    (src,) = (tiny_model_dir / "text_encoder").glob("*.safetensors")
    state = load_file(src)
    del state["lm_head.weight"]  # what ComfyUI's single text-encoder files hold
    headless = tmp_path / "qwen_2.5_vl_tiny.safetensors"
    save_file(state, headless)
    te = load_text_encoder(headless, dtype=torch.float32, processor=local.processor)
    with pytest.raises(vlm.NoLanguageHeadError, match=r"no language head \(lm_head\), which finding crop boxes") as e:
        G.ground_boxes(pics, "x", te, local.processor, source=str(headless))
    assert "ComfyUI's single text-encoder files" in str(e.value) and headless.name in str(e.value)


@pytest.mark.slow
def test_cli_ground_on_the_tiny_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from firered_core import cli
    from firered_core.pipeline import FireRedEditor

    real_edit, seen = FireRedEditor.edit, {}  # small canvases, so the tiny model's run takes seconds
    monkeypatch.setattr(FireRedEditor, "edit",
                        lambda self, *a, **k: seen.update(k) or real_edit(self, *a, **k, ref_area=128 * 128, vl_area=64 * 64))
    asked = []
    real_ground = G.ground_boxes
    monkeypatch.setattr(G, "ground_boxes", lambda *a, **k: asked.append(k["skip"]) or real_ground(*a, **k, max_new_tokens=4))
    paths = []
    for i in range(4):
        paths += ["--image", str(tmp_path / f"p{i}.png")]
        Image.new("RGB", (48 + 8 * i, 32), (40 * i, 90, 30)).save(paths[-1])
    rc = cli.main(["edit", "--model", str(tiny_model_dir), *paths, "--crop", "2=0,0,20,30", "--ground", "--prompt",
                   "Picture 4 on Picture 1", "--out", str(tmp_path / "o.png"), "--steps", "1", "--cfg", "1",
                   "--width", "64", "--height", "48", "--dtype", "fp32"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert asked == [[True, True, False, False]] and "crop boxes:" in err
    assert seen["crop_boxes"][1] == (0, 0, 20, 30) and seen["crop_boxes"][0] is None
