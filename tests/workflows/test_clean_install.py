"""The pack as the Manager installs it (``git clone`` into ``custom_nodes``), from a clean checkout of the
committed tree, in a fresh ComfyUI folder (``COMFYUI_PATH`` tier): ComfyUI starts with no traceback and
no import failure from the pack, every node of the pack is listed, the front-end script is served and
the pack's templates can be fetched; ``comfy node validate`` (comfy-cli, where installed) passes on the
same checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from comfy_server import PACK_DIR_NAME, REPO, ComfyServer, comfyui_path


def tracebacks(log: str) -> list[str]:
    """Each Python traceback in ``log``: its header, the indented frame lines, and the exception line."""
    out, lines = [], log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            j = i + 1
            while j < len(lines) and lines[j][:1].isspace():
                j += 1
            out.append("\n".join(lines[i : j + 1]))
    return out


def test_tracebacks_are_cut_at_their_exception_line():
    log = "a\nTraceback (most recent call last):\n  File \"x.py\", line 1\n    f()\nKeyError: 1\nloaded /p/pack\n"
    assert tracebacks(log) == ['Traceback (most recent call last):\n  File "x.py", line 1\n    f()\nKeyError: 1']


@pytest.fixture(scope="module")
def clean_install(tmp_path_factory):
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set (the real-ComfyUI tier)")
    root = tmp_path_factory.mktemp("comfyui_clean_install")
    clone = root / "clone" / PACK_DIR_NAME
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, capture_output=True, timeout=120)
    server = ComfyServer(comfyui_path(), root / "server")
    server.prepare(pack_dir=clone, test_pack=False)
    server.start()
    yield server, clone
    server.stop()


@pytest.mark.comfyui
def test_a_clean_clone_starts_without_errors(clean_install):
    server, clone = clean_install
    log = server.log()
    ours = [ln for ln in log.splitlines() if PACK_DIR_NAME in ln or "FireRed" in ln]
    assert not [ln for ln in ours if "IMPORT FAILED" in ln or "Cannot import" in ln], ours
    # a traceback whose frames are in the pack (ComfyUI's own, e.g. an extra node whose dependency this
    # venv lacks, are not the pack's)
    for block in tracebacks(log):
        assert str(clone) not in block and PACK_DIR_NAME not in block, block[:3000]
    ids = set()
    for py in (clone / "nodes").glob("*.py"):
        m = re.search(r"^NODE_CLASS_MAPPINGS\s*=\s*\{(.*?)^\}", py.read_text(), re.S | re.M)
        if m:
            ids.update(re.findall(r"""^\s*["']([A-Za-z0-9_]+)["']\s*:""", m.group(1), re.M))
    info = server.object_info()
    assert ids and not sorted(ids - set(info)), sorted(ids - set(info))
    assert f"/extensions/{PACK_DIR_NAME}/firered.js" in server.get("/extensions")
    names = server.get("/workflow_templates").get(PACK_DIR_NAME) or []
    assert names, "the template browser lists no workflow of the pack"
    for name in names:
        wf = server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
        wf = json.loads(wf) if isinstance(wf, (bytes, str)) else wf
        assert wf.get("nodes"), name


def comfy_cli() -> str | None:
    """comfy-cli's ``comfy`` (``$FIRERED_COMFY_CLI``, else on PATH), or None."""
    env = os.environ.get("FIRERED_COMFY_CLI")
    return env if env and os.path.exists(env) else shutil.which("comfy")


def test_comfy_node_validate_passes_on_a_clean_checkout(tmp_path):
    """The Comfy Registry's own check of the committed tree (``comfy node validate``: pyproject and its
    security rules); comfy-cli prints a warning and still exits 0 on a finding, so the success line is
    what counts. Skipped without comfy-cli (``pip install comfy-cli``; needs no ComfyUI)."""
    cli = comfy_cli()
    if cli is None:
        pytest.skip("comfy-cli is not installed (pip install comfy-cli, or set FIRERED_COMFY_CLI)")
    clone = tmp_path / PACK_DIR_NAME
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, capture_output=True, timeout=120)
    out = subprocess.run(
        [cli, "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
        cwd=clone, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "All validation checks passed" in text, text[-3000:]
