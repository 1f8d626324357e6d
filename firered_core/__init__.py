"""firered_core: a self-contained inference library for FireRed-Image-Edit (1.0 / 1.1).

Light at import: torch-level math modules only; diffusers / transformers are imported by the
functions that need them. The public entry point is :class:`FireRedEditor`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["FireRedEditor", "EditRequest", "EditResult", "make_tiny", "__version__"]


def __getattr__(name: str):
    if name in ("FireRedEditor", "EditRequest", "EditResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "make_tiny":
        from .tiny import make_tiny

        return make_tiny
    raise AttributeError(name)
