"""Fixtures for the node tests: the pack imported the way ComfyUI imports it (a package under its
folder name, relative imports inside), and the tiny model written as a ComfyUI ``models/`` folder."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI_FireRed_Image_Edit_under_test"


def import_pack():
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def pack():
    return import_pack()


@pytest.fixture(scope="session")
def comfy_models(tmp_path_factory, tiny_model_dir):
    """``models/`` with the tiny model in ComfyUI's layouts, plus the release folder under ``diffusers/``."""
    from firered_core.tiny import make_tiny_comfyui

    root = tmp_path_factory.mktemp("comfy") / "models"
    files = make_tiny_comfyui(root)
    (root / "diffusers").mkdir(exist_ok=True)  # make_tiny_comfyui writes the recaption release folder there
    (root / "diffusers" / "FireRed-tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    return root, files


@pytest.fixture(scope="module")
def models_env(comfy_models):
    root, files = comfy_models
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FIRERED_MODELS_DIR", str(root))
        yield root, files


@pytest.fixture(scope="module")
def loaded(pack, models_env):
    """The tiny model through the three loader nodes, in float32 (once per test module)."""
    root, files = models_env
    m = pack.NODE_CLASS_MAPPINGS
    dit = m["FireRedModelLoader"]().load(files["transformer"].name, "auto", "fp32", False)[0]
    te = m["FireRedTextEncoderLoader"]().load(files["text_encoder"].name, "fp32", False)[0]
    vae = m["FireRedVAELoader"]().load(files["vae"].name, "fp32", False)[0]
    return dit, te, vae
