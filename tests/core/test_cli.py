"""The command line, run as a user runs it."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

from firered_core.cli import main
from tests.conftest import make_picture

ROOT = Path(__file__).resolve().parents[2]


def test_edit_writes_the_picture(tmp_path, tiny_model_dir, capsys):
    src = tmp_path / "in.png"
    make_picture(96, 64).save(src)
    out = tmp_path / "sub" / "out.png"
    rc = main(["edit", "--model", str(tiny_model_dir), "--image", str(src), "--prompt", "make it red",
               "--out", str(out), "--steps", "2", "--width", "64", "--height", "48", "--dtype", "fp32"])
    assert rc == 0
    assert Image.open(out).size == (64, 48)
    assert not list(out.parent.glob("*.part*"))  # written atomically, nothing left behind
    assert "wrote" in capsys.readouterr().out


def test_edit_reports_bad_input_without_a_traceback(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    rc = main(["edit", "--model", str(tiny_model_dir), "--image", str(bad), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert rc == 2 and "is not an image" in capsys.readouterr().err
    rc = main(["edit", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["edit", "--model", str(tiny_model_dir), "--prompt", "x", "--out", str(tmp_path / "o.txt")])
    assert rc == 2 and "must end in .png" in capsys.readouterr().err
    rc = main(["edit", "--model", str(tiny_model_dir), "--prompt", "x", "--width", "100", "--out", str(tmp_path / "o.png")])
    assert rc == 2 and "multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_module_entry_point_makes_a_tiny_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "firered_core", "make-tiny", str(tmp_path / "t")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for sub in ("transformer", "text_encoder", "vae", "tokenizer", "processor", "scheduler"):
        assert (tmp_path / "t" / sub).is_dir()


def _no_loading(monkeypatch):
    """Any model load or tiny-model build during the call fails the test: the request must be
    refused before anything is loaded."""
    import firered_core.loading
    import firered_core.pipeline
    import firered_core.tiny

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the request was checked")

    monkeypatch.setattr(firered_core.pipeline.FireRedEditor, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(firered_core.pipeline.FireRedEditor, "from_files", classmethod(boom))
    monkeypatch.setattr(firered_core.tiny, "make_tiny", boom)


def test_bad_requests_are_refused_before_any_model_loads(tmp_path, tiny_model_dir, capsys, monkeypatch):
    _no_loading(monkeypatch)
    src = tmp_path / "in.png"
    make_picture(64, 64).save(src)
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    out = str(tmp_path / "o.png")
    cases = [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--steps", "-3"], "--steps must be at least 1, got -3"),
        (["--width", "100"], "width must be a positive multiple of 16"),
        (["--image", str(tmp_path / "missing.png")], "no such file"),
        (["--image", str(bad)], "is not an image file"),
        (["--image", str(src)] * 11, "--image given 11 times: picture 11"),
    ]
    for extra, message in cases:
        for model in (["--model", str(tiny_model_dir)], []):  # a folder to load, or the tiny model made on the spot
            rc = main(["edit", *model, "--prompt", "make it red", "--out", out, *extra])
            err = capsys.readouterr().err
            assert rc == 2 and message in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "o.png").exists()


def test_the_api_refuses_zero_steps(tiny_model_dir):
    import pytest

    from firered_core.pipeline import EditRequest

    with pytest.raises(ValueError, match="steps must be a whole number of at least 1, got 0"):
        EditRequest(prompt="x", steps=0)
    assert EditRequest(prompt="x").steps == 40


def test_an_overlong_instruction_is_cut_at_the_reference_limit_with_one_warning(tiny_model_dir, caplog):
    """The Edit-Plus conditioning keeps at most 1024 encoder states (text-to-image: 512, as
    QwenImagePipeline); past that the end of the instruction is cut and one warning says so,
    where a 5000-word instruction used to fail in the MM-DiT's RoPE."""
    import logging

    import torch

    from firered_core.model import conditioning
    from firered_core.pipeline import FireRedEditor

    ed = FireRedEditor.from_pretrained(tiny_model_dir, dtype="fp32")
    te, proc = ed.c.text_encoder, ed.c.processor
    pic = make_picture(64, 64)
    word = "red "
    # find the instruction length that lands exactly on the limit (the tiny tokenizer: one token a word)
    probe = conditioning.encode_prompt(te, proc, word * 10, [pic])
    per_word = (conditioning.encode_prompt(te, proc, word * 20, [pic]).length - probe.length) / 10
    assert per_word == 1.0
    fixed = probe.length - 10
    at_limit = word * (1024 - fixed)
    with caplog.at_level(logging.WARNING, logger="firered_core.model.conditioning"):
        full = conditioning.encode_prompt(te, proc, at_limit, [pic])
        assert full.length == 1024 and not [r for r in caplog.records if "too long" in r.getMessage()]
        over = conditioning.encode_prompt(te, proc, at_limit + "blue green", [pic])
    assert over.length == 1024
    assert torch.equal(over.embeds[0, :1000], full.embeds[0, :1000])  # the same states, the end cut
    lines = [r.getMessage() for r in caplog.records if "too long" in r.getMessage()]
    assert len(lines) == 1 and "encoder tokens, only the first 1024 are used" in lines[0]
    assert int(lines[0].split(" encoder tokens")[0].rsplit(" ", 1)[1]) > 1024
    # text-to-image: QwenImagePipeline's 512
    t2i = conditioning.encode_prompt(te, proc, word * 700)
    assert t2i.length == 512
    # and a 5000-word instruction edits
    r = ed.edit(pic, "paint the house blue and " * 1000, steps=1, width=64, height=64, seed=0)
    assert r.images[0].size == (64, 64)


def test_the_readme_single_file_edit_finds_the_tokenizer_make_tiny_wrote(tmp_path):
    """``make-tiny --layout comfyui`` writes the tokenizer beside the text-encoder file; the
    single-file edit finds it without --tokenizer, and prints no line the user cannot act on."""
    r = subprocess.run([sys.executable, "-m", "firered_core", "make-tiny", str(tmp_path / "m"), "--layout", "comfyui"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "firered_core", "edit",
                        "--transformer", str(m / "diffusion_models" / "FireRed-Image-Edit-1.1-transformer.safetensors"),
                        "--text-encoder", str(m / "text_encoders" / "qwen_2.5_vl_7b_fp8_scaled.safetensors"),
                        "--vae", str(m / "vae" / "qwen_image_vae.safetensors"),
                        "--image", str(ROOT / "assets" / "house.png"), "--prompt", "paint the house blue",
                        "--out", str(tmp_path / "out.png"), "--steps", "2", "--width", "64", "--height", "48"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "out.png").size == (64, 48)
    assert "kernels-community" not in r.stderr and "bos_token_id" not in r.stderr, r.stderr
