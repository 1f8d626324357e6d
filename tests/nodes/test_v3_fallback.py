"""nodes/v3.py without ComfyUI: the classic classes stay registered as they are, and a wrong
``FIRERED_NODE_API`` is named. (Its V3 form in a real ComfyUI: tests/workflows/test_comfyui_v3.py.)"""

import importlib

import pytest


def test_without_the_v3_api_the_classic_classes_stay(pack):
    v3 = importlib.import_module(f"{pack.__name__}.nodes.v3")
    assert v3.io_module() is None  # no comfy_api here
    mappings = dict(pack.NODE_CLASS_MAPPINGS)
    assert v3.upgrade(mappings, pack.NODE_DISPLAY_NAME_MAPPINGS) == mappings
    assert all(hasattr(cls, "INPUT_TYPES") and hasattr(cls, "FUNCTION") for cls in mappings.values())


def test_a_wrong_api_choice_is_named(pack, monkeypatch):
    v3 = importlib.import_module(f"{pack.__name__}.nodes.v3")
    monkeypatch.setenv(v3.API_ENV, "v4")
    with pytest.raises(ValueError, match="FIRERED_NODE_API='v4': expected 'v3' or 'classic'"):
        v3.upgrade({}, {})
