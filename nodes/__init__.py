"""ComfyUI nodes of the pack (written in the classic node API; registered in ComfyUI's V3 schema where it has one: v3.py).

Each node resolves its inputs and calls one ``firered_core`` (or ``firered_trainer``) function; ComfyUI's
services are reached through :mod:`.host` only. Node modules are imported one by one: a module whose
optional dependency is missing is left out with one log line, and the rest of the pack still loads,
so importing the pack never breaks ComfyUI's start-up.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger("FireRed")

#: node modules, in menu order; each exports NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS
MODULES = ("loaders", "edit", "stitch", "recaption", "consistency", "native", "speed", "train")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
DISABLED: dict[str, str] = {}


def _load(name: str) -> None:
    try:
        mod = importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name and (e.name == f"{__name__}.{name}"):  # a broken install: a file of the pack is missing
            DISABLED[name] = "its file is missing from the pack (reinstall the pack)"
            log.warning("FireRed: %s nodes missing: nodes/%s.py is not in this install of the pack (reinstall it)", name, name)
            return
        DISABLED[name] = f"needs {e.name!r}, which is not installed"
        log.warning("FireRed: %s nodes disabled: they need the Python package %r (pip install it to enable them)", name, e.name)
        return
    except Exception as e:  # never break ComfyUI's start-up
        DISABLED[name] = f"{type(e).__name__}: {e}"
        log.warning("FireRed: %s nodes disabled: %s: %s", name, type(e).__name__, e)
        return
    NODE_CLASS_MAPPINGS.update(getattr(mod, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))


for _name in MODULES:
    _load(_name)


def _upgrade_to_v3() -> None:
    """The V3 form of each node where ComfyUI has ``comfy_api.latest`` (nodes/v3.py), else classic."""
    try:
        from . import v3

        NODE_CLASS_MAPPINGS.update(v3.upgrade(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS))
    except Exception as e:  # the classic nodes stay registered
        log.warning("FireRed: V3 node schema not used (classic nodes instead): %s: %s", type(e).__name__, e)


_upgrade_to_v3()


def _register_routes() -> None:
    try:
        from . import routes
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.routes":
            log.warning("FireRed: file-info route disabled: needs %r", e.name)
        return
    try:
        routes.register()
    except Exception as e:
        log.warning("FireRed: file-info route disabled: %s: %s", type(e).__name__, e)


_register_routes()
