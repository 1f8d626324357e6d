"""Rewards: the layout-aware OCR reward on pictures rendered with PIL (English and Chinese), the
consistency and cheap rewards, and the VLM judge (eq. 4) through the tiny Qwen2.5-VL and through
a stub OpenAI-compatible server."""

import math

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from firered_trainer.rl import rewards as R
from tests.conftest import json_server, judge_choice

W, H = 320, 160


def _unit(img: Image.Image) -> torch.Tensor:
    return R.as_unit_images([img])[0]


def render_en(text: str, xy, size: int = 28) -> tuple[torch.Tensor, tuple]:
    """Black text on white with PIL's default (scalable) font; returns the picture and the text's
    ink box."""
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=size)
    d.text(xy, text, fill="black", font=font)
    return _unit(im), d.textbbox(xy, text, font=font)


# No CJK font is installed here or in CI (fc-list lists DejaVu only) and none may be fetched, so
# the Chinese pictures are drawn stroke by stroke: characters made of straight strokes, drawn as
# rectangles on a 10x10 grid, which the PP-OCR Chinese recogniser reads (checked: 王田, 上下, 十三).
def _h(y, a=1, b=9):
    return (a, y, b, y + 1)


def _v(x, a=1, b=9):
    return (x, a, x + 1, b)


GLYPHS = {
    "王": [_h(1.5, 2, 8), _h(4.5, 2.5, 7.5), _h(7.5, 1, 9), _v(4.5, 1.5, 8)],
    "田": [_v(1.5, 1.5, 8.5), _v(7.5, 1.5, 8.5), _h(1.5, 1.5, 8.5), _h(7.5, 1.5, 8.5), _h(4.5, 1.5, 8.5), _v(4.5, 1.5, 8.5)],
    "上": [_v(4, 0.5, 8.5), _h(4, 4, 8), _h(8, 1, 9)],
    "下": [_h(1, 1, 9), _v(4, 1, 9.5), (5, 3.5, 6.5, 4.5)],
}


def render_zh(text: str, xy, cell: int = 40) -> tuple[torch.Tensor, tuple]:
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    x, y = xy
    for k, ch in enumerate(text):
        ox = x + k * cell * 1.1
        for a, b, c, e in GLYPHS[ch]:
            d.rectangle([ox + a * cell / 10, y + b * cell / 10, ox + c * cell / 10 - 1, y + e * cell / 10 - 1], fill="black")
    box = (x, y, x + (len(text) - 1) * cell * 1.1 + cell, y + cell)
    return _unit(im), box


@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip("rapidocr_onnxruntime", reason="the OCR reward's engine (pip install rapidocr_onnxruntime)")
    return R.OCRReward()


def _scores(ocr, pics, target, box):
    batch = R.RewardBatch(prompts=[f'write "{target}"'] * len(pics), target_boxes=[box] * len(pics))
    s = ocr(torch.stack(pics), batch)
    return s.tolist(), ocr.last


def test_ocr_reward_english(ocr):
    xy = (100, 40)
    right, box = render_en("SALE 50", xy)
    elsewhere, _ = render_en("SALE 50", (10, 120))
    wrong, _ = render_en("OPEN 24", xy)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    big, _ = render_en("SALE 50", (cx - 2 * (cx - xy[0]), cy - 2 * (cy - xy[1])), size=56)  # 2x, same centre
    (s_right, s_else, s_wrong, s_big), info = _scores(ocr, [right, elsewhere, wrong, big], "SALE 50", box)
    assert [d["read"] for d in info] == ["sale50", "sale50", "open24", "sale50"]
    # measured: 0.86, 0.50, 0.08, 0.56
    assert s_right > s_else + 0.3 and s_else > s_wrong + 0.3
    assert info[2]["gate"] == 0.0  # wrong text: the layout term is shut
    assert s_big < s_right - 0.2  # over-sized glyphs in the right place do not farm the reward


def test_ocr_reward_chinese(ocr):
    right, box = render_zh("王田", (30, 20))
    elsewhere, _ = render_zh("王田", (200, 110))
    wrong, _ = render_zh("上下", (30, 20))
    (s_right, s_else, s_wrong), info = _scores(ocr, [right, elsewhere, wrong], "王田", box)
    assert [d["read"] for d in info] == ["王田", "王田", "上下"]
    assert s_right > s_else + 0.3 and s_else > s_wrong + 0.3


def test_ocr_reward_without_box_is_the_text_term(ocr):
    right, _ = render_en("SALE 50", (30, 30))
    batch = R.RewardBatch(prompts=['replace the sign with "sale 5O"'])
    s = ocr(right[None], batch)
    assert s.item() == pytest.approx(1 - 1 / 6)  # "sale5o" vs "sale50": one substitution of six
    with pytest.raises(ValueError, match="target text"):
        ocr(right[None], R.RewardBatch(prompts=["make it nicer"]))


def test_substring_alignment_and_quotes():
    assert R.substring_alignment("abc", "xxabcxx") == (0, [2, 3, 4])
    assert R.substring_alignment("abc", "abd") == (1, [0, 1, None])
    assert R.substring_alignment("abc", "") == (3, [None, None, None])
    assert R.quoted_text('put "Hello World" on it') == "Hello World"
    assert R.quoted_text("把标题改成\u201c王田\u201d") == "王田"
    assert R.quoted_text("no quotes") is None


def test_cheap_rewards_and_registry():
    imgs = torch.stack([torch.full((4, 4, 3), 0.25), torch.full((4, 4, 3), 0.75)])
    batch = R.RewardBatch(prompts=["a", "b"])
    assert R.build_reward("brightness")(imgs, batch).tolist() == [0.25, 0.75]
    red = torch.zeros(1, 4, 4, 3)
    red[..., 0] = 1
    assert R.build_reward({"colour": {"target": [1, 0, 0]}})(red, R.RewardBatch(["x"])).item() == pytest.approx(1.0)
    combo = R.build_reward({"brightness": 2.0, "colour": {"weight": 1.0, "target": [0, 0, 0]}})
    s = combo(imgs, batch)
    assert s.tolist() == pytest.approx([0.5 + 1 - 0.25, 1.5 + 1 - 0.75])
    assert set(combo.last) == {"brightness", "colour"}
    with pytest.raises(ValueError, match="unknown reward"):
        R.build_reward("aesthetics")
    with pytest.raises(ValueError, match="describes 1 pictures"):
        combo(imgs, R.RewardBatch(prompts=["a"]))


def test_consistency_reward():
    torch.manual_seed(0)
    src = torch.rand(8, 8, 3)
    keep = torch.ones(8, 8)
    keep[:4] = 0  # the top half is the edit region
    edited = src.clone()
    edited[:4] = 1 - edited[:4]
    spoiled = edited.clone()
    spoiled[6:] = 0
    fn = R.build_reward("consistency")
    batch = R.RewardBatch(prompts=["x"] * 3, sources=[src] * 3, keep_masks=[keep] * 3)
    s = fn(torch.stack([src, edited, spoiled]), batch)
    assert s[0].item() == 1.0 and s[1].item() == 1.0 and s[2].item() < 0.9
    with pytest.raises(ValueError, match="sources"):
        fn(src[None], R.RewardBatch(prompts=["x"]))


def test_expected_rating():
    assert R.expected_rating(torch.zeros(5)).item() == pytest.approx(3.0)
    assert R.expected_rating(torch.tensor([-1e4, -1e4, -1e4, -1e4, 0.0])).item() == pytest.approx(5.0)
    # p = (0, 0, 0, 1/2, 1/2) -> 4.5
    assert R.expected_rating(torch.tensor([-math.inf, -math.inf, -math.inf, 0.0, 0.0])).item() == pytest.approx(4.5)


def test_vlm_judge_local_tiny(tiny_model_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir / "text_encoder").eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir / "processor")
    judge = R.build_reward({"vlm_judge": {"model": model, "processor": processor, "passes": 2, "max_new_tokens": 6, "image_size": 56}})
    imgs = torch.rand(2, 56, 56, 3, generator=torch.Generator().manual_seed(0))
    batch = R.RewardBatch(prompts=["make it red", "make it blue"], sources=[torch.rand(56, 56, 3)] * 2)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a, b = judge(imgs, batch), judge(imgs, batch)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global random state is untouched
    assert a.shape == (2,) and torch.all((a >= 1) & (a <= 5))
    assert torch.equal(a, b)  # seeded sampling of the reasoning


def test_vlm_judge_http_stub():
    requests = []

    def answer(path, headers, body):
        requests.append((path, body))
        return {"choices": [judge_choice({"4": 0.5, "5": 0.25, "3": 0.25}, lead="Fine"),
                            judge_choice({"2": 1.0}, lead="Fine")]}

    with json_server(answer) as url:
        judge = R.VLMJudge(backend="http", url=f"{url}/v1", passes=2)
        s = judge(torch.rand(1, 32, 32, 3), R.RewardBatch(prompts=["make it red"]))
    # pass 1: 0.25 * 3 + 0.5 * 4 + 0.25 * 5 = 4.0; pass 2: 2 -> mean 3.0
    assert s.item() == pytest.approx(3.0)
    path, body = requests[-1]
    assert path == "/v1/chat/completions" and body["n"] == 2 and body["logprobs"] is True
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
