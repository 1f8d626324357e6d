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
