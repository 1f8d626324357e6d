"""Training data: the JSONL and folder formats, bad samples named by line, skipped and counted."""

import json

import pytest
from PIL import Image

from firered_trainer.data import DataError, LoadReport, load_dataset, mix, read_folder, read_jsonl


def pic(path, w=32, h=24):
    Image.new("RGB", (w, h), (120, 30, 200)).save(path)
    return path.name


@pytest.fixture
def jsonl(tmp_path):
    pic(tmp_path / "s1.png", 40, 20)
    pic(tmp_path / "s2.png", 20, 40)
    pic(tmp_path / "t1.png", 40, 20)
    rows = [
        {"source_image": "s1.png", "target_image": "t1.png", "instruction": "make it red", "instruction_cn": "变红",
         "inverse_instruction": "make it purple", "task": "color"},
        {"source_image": ["s1.png", "s2.png"], "edit_image": "t1.png", "instruction": "put Picture 2 on Picture 1"},
        {"source_image": None, "target_image": "t1.png", "instruction": "a purple square", "task": "t2i"},
    ]
    f = tmp_path / "data.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return f


def test_jsonl_formats(jsonl):
    ds = read_jsonl(jsonl)
    assert [s.n_sources for s in ds] == [1, 2, 0]
    assert ds[0].task == "color" and ds[1].task == "data" and ds[0].instruction_cn == "变红"
    assert ds[0].source_sizes == ((40, 20),) and ds[1].target_size == (40, 20)
    assert ds[1].where.endswith("data.jsonl:2")


def test_bad_lines_are_named_skipped_and_counted(jsonl, tmp_path):
    with jsonl.open("a") as f:
        f.write("{broken json\n")
        f.write(json.dumps({"source_image": "missing.png", "target_image": "t1.png", "instruction": "x"}) + "\n")
        f.write(json.dumps({"source_image": ["s1.png"] * 4, "target_image": "t1.png", "instruction": "x"}) + "\n")
        f.write(json.dumps({"source_image": "s1.png", "target_image": "t1.png"}) + "\n")
    report = LoadReport()
    ds = read_jsonl(jsonl, report=report)
    assert len(ds) == 3 and report.skipped == 4
    assert "data.jsonl:4: not valid JSON" in report.errors[0]
    assert "data.jsonl:5: picture not found" in report.errors[1] and "missing.png" in report.errors[1]
    assert "data.jsonl:6: 4 source pictures" in report.errors[2]
    assert "data.jsonl:7: no instruction" in report.errors[3]
    with pytest.raises(DataError, match="4 bad samples .more than max_bad=2"):
        read_jsonl(jsonl, max_bad=2)


def test_unreadable_picture_is_named(tmp_path):
    (tmp_path / "t.png").write_text("not a png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"target_image": "t.png", "instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: .*t.png is not a readable picture"):
        read_jsonl(tmp_path / "d.jsonl")


def test_folder_of_pairs(tmp_path):
    pic(tmp_path / "a_source.png")
    pic(tmp_path / "a_target.png")
    (tmp_path / "a.txt").write_text("make it red\n变红\n")
    pic(tmp_path / "b_source1.png")
    pic(tmp_path / "b_source2.jpg")
    pic(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("combine Picture 1 and Picture 2")
    (tmp_path / "c.txt").write_text("caption without a picture")
    report = LoadReport()
    ds = read_folder(tmp_path, report=report)
    assert [s.n_sources for s in ds] == [1, 2]
    assert ds[0].instruction_cn == "变红"
    assert report.skipped == 1 and "c.txt:1: no target picture" in report.errors[0]
    assert len(load_dataset(tmp_path)) == 2


def test_mixing_names_every_sample(jsonl, tmp_path):
    a = read_jsonl(jsonl, dataset="a")
    samples, names = mix([("a", a), ("b", a[:1])])
    assert len(samples) == 4 and names == ["a", "a", "a", "b"]
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")


def test_rl_readers_skip_and_count_bad_lines_like_sft(tmp_path):
    """The DPO and NFT readers follow the SFT rule: a bad line is skipped and counted with its file
    and line; more than max_bad of them stops the run with a DataError naming the limit."""
    from firered_trainer.data import DataError, LoadReport
    from firered_trainer.rl import common

    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16), (10, 10, 200)).save(tmp_path / "b.png")
    good = {"instruction": "make it red", "preferred": "a.png", "rejected": "b.png", "source_image": "b.png"}
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join([
        json.dumps(good),
        "{not json",
        json.dumps({**good, "rejected": None}),
        json.dumps({**good, "preferred": "missing.png"}),
        json.dumps(good),
    ]) + "\n")
    report = LoadReport()
    pairs = common.read_preferences(prefs, report=report)
    assert len(pairs) == 2 and report.loaded == 2 and report.skipped == 3
    assert [e.split(": ")[0] for e in report.errors] == [f"{prefs}:{n}" for n in (2, 3, 4)]
    assert "missing.png" in report.errors[2]
    with pytest.raises(DataError, match=r"3 bad samples \(more than max_bad=2\)"):
        common.read_preferences(prefs, max_bad=2)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([json.dumps({"instruction": "a cat"}), "[1, 2]",
                                  json.dumps({"instruction": "x", "target_box": [1, 2]}),
                                  json.dumps({"instruction": "a dog", "source_image": "a.png"})]) + "\n")
    report = LoadReport()
    got = common.read_prompts(prompts, report=report)
    assert [p.instruction for p in got] == ["a cat", "a dog"] and report.skipped == 2
    assert "expected a JSON object" in report.errors[0] and "target_box" in report.errors[1]
    with pytest.raises(DataError, match="max_bad=1"):
        common.read_prompts(prompts, max_bad=1)
