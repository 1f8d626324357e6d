"""The suite runs in a checkout under the folder name the README gives
(``git clone ... ComfyUI-FireRed-Image-Edit``), which is not a Python name: the pack root's
ComfyUI entry ``__init__.py`` must not make pytest import the checkout as a package."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_FOLDER = "ComfyUI-FireRed-Image-Edit"


def test_readme_clone_folder_name_is_the_one_tested():
    assert f"git clone <this repository> {README_FOLDER}" in (ROOT / "README.md").read_text()


def test_suite_collects_and_runs_under_the_readme_folder_name(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    copy = tmp_path / README_FOLDER
    for rel in filter(None, tracked.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy / rel)
    # the README's test command, on two files: one that imports the pack's parts by name and one
    # that imports the root package the ComfyUI way
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_layout.py", "tests/nodes/test_import_safety.py"],
                         cwd=copy, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "error" not in out.stdout.splitlines()[-1]
