"""firered_core: a self-contained inference library for FireRed-Image-Edit (1.0 / 1.1).

Light at import: torch-level math modules only; diffusers / transformers are imported by the
functions that need them. The public entry point is :class:`FireRedEditor`.
"""

from __future__ import annotations

import logging as _logging

__version__ = "0.1.0"


class _Unactionable(_logging.Filter):
    """Drops log lines a user of this pack cannot act on. bitsandbytes (imported by diffusers'
    quantizer registry on every load) warns at import, on processors with AVX512-BF16, that an
    optional CPU kernel from the Hugging Face hub is missing: the pack never uses that kernel
    (its 4-bit layers keep bitsandbytes' portable layout)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_Unactionable())

__all__ = ["FireRedEditor", "EditRequest", "EditResult", "make_tiny", "__version__"]


def __getattr__(name: str):
    if name in ("FireRedEditor", "EditRequest", "EditResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "make_tiny":
        from .tiny import make_tiny

        return make_tiny
    raise AttributeError(name)
