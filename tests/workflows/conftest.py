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


@pytest.fixture(scope="session")
def native_files(comfy_server):
    """The ComfyUI-loadable full-width 1-block MM-DiT, linked into the server's models folder (ComfyUI
    lists new files on the next request), and the tiny VAE ``make_tiny_comfyui`` wrote (the real
    configuration, which ComfyUI's VAELoader loads as it is). The DiT is deterministic and about
    0.7 GB, so it is written once into ``$FIRERED_TEST_CACHE`` (default ``~/.cache/firered-comfyui-tier``)."""
    from tier_files import NATIVE_DIT, cached, write_native_dit

    from firered_core.tiny import WORKFLOW_FILES

    dit = comfy_server.models / "diffusion_models" / NATIVE_DIT
    dit.symlink_to(cached(NATIVE_DIT, write_native_dit))
    return dit, comfy_server.models / WORKFLOW_FILES["vae"]
