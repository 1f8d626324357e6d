"""Fixtures of the ``COMFYUI_PATH`` tier: one real ComfyUI server per test session (see
:mod:`comfy_server`); every test using it is skipped when ``$COMFYUI_PATH`` is unset."""

from __future__ import annotations

import pytest
from comfy_server import comfyui_path, start_server


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set (the real-ComfyUI tier)")
    server = start_server(tmp_path_factory.mktemp("comfyui"))
    yield server
    server.stop()
