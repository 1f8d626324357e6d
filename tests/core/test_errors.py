"""Bad input gets a clear error that names the input and what was expected."""

import shutil

import pytest
import torch

from firered_core import FireRedEditor
from firered_core.loading import ModelFolderError, check_model_folder
from firered_core.model import images
from tests.conftest import make_picture


@pytest.fixture(scope="module")
def editor(tiny_model_dir):
    return FireRedEditor.from_pretrained(tiny_model_dir, dtype="fp32")


SMALL = dict(steps=1, width=32, height=32, ref_area=64 * 64, vl_area=64 * 64)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        FireRedEditor.from_pretrained(tmp_path / "nope")


def test_model_path_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="is a file"):
        check_model_folder(f)


def test_missing_subfolder_is_named(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelFolderError, match=r"missing vae"):
        FireRedEditor.from_pretrained(broken)


def test_corrupt_weights_are_reported_with_the_folder(tmp_path, tiny_model_dir):
    broken = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelFolderError, match="could not load the MM-DiT from .*transformer"):
        FireRedEditor.from_pretrained(broken)


def test_not_an_image(tmp_path, editor):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    with pytest.raises(ValueError, match=r"image 1: .*notes.png.* is not an image"):
        editor.edit(str(bad), "make it red", **SMALL)
    with pytest.raises(FileNotFoundError, match="image 1: no such file"):
        editor.edit(str(tmp_path / "missing.png"), "make it red", **SMALL)
    with pytest.raises(TypeError, match="image 1: expected a PIL image"):
        editor.edit(12345, "make it red", **SMALL)
    with pytest.raises(ValueError, match="image 1: expected an image tensor"):
        editor.edit(torch.rand(8, 8), "make it red", **SMALL)


def test_empty_instruction(editor):
    with pytest.raises(ValueError, match="prompt is empty"):
        editor.edit(make_picture(32, 32), "   ", **SMALL)
    with pytest.raises(ValueError, match="prompt is required"):
        editor.edit(make_picture(32, 32))


@pytest.mark.parametrize("w,h", [(100, 64), (64, 30), (0, 64), (-16, 64)])
def test_size_not_a_multiple_of_16(editor, w, h):
    with pytest.raises(ValueError, match="multiple of 16"):
        editor.edit(make_picture(32, 32), "make it red", **{**SMALL, "width": w, "height": h})


def test_an_eleventh_picture_is_named(editor):
    # more than three pictures are stitched onto three canvases (tests/core/test_stitch.py), up to ten
    pics = [make_picture(32, 32, seed=i) for i in range(11)]
    with pytest.raises(ValueError, match="picture 11 is one too many: FireRed-Image-Edit takes at most 10"):
        editor.edit(pics, "combine them", **SMALL)


def test_unknown_sampler_and_schedule(editor):
    with pytest.raises(ValueError, match="unknown sampler"):
        editor.edit(make_picture(32, 32), "x", **{**SMALL, "sampler": "ddim"})
    with pytest.raises(ValueError, match="unknown schedule"):
        editor.edit(make_picture(32, 32), "x", **{**SMALL, "schedule": "cosine"})


def test_comfyui_image_tensors_and_paths_are_accepted(tmp_path, editor):
    pic = make_picture(48, 32)
    p = tmp_path / "in.png"
    pic.save(p)
    t = torch.from_numpy(__import__("numpy").asarray(pic).astype("float32") / 255).unsqueeze(0)  # [1,H,W,C]
    a = editor.edit(pic, "make it red", seed=1, **SMALL).pixels
    b = editor.edit(str(p), "make it red", seed=1, **SMALL).pixels
    c = editor.edit(t, "make it red", seed=1, **SMALL).pixels
    assert torch.equal(a, b) and torch.equal(a, c)
    assert images.to_pil(t).size == (48, 32)
