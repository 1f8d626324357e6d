"""The pack's server route: what a model file is, for the loaders' front end.

``GET /firered/file_info?folder=<diffusion_models|text_encoders|vae|loras|diffusers>&name=<file>``
answers the JSON of :func:`firered_core.formats.inspect.describe_file` for the file ComfyUI lists
under that name (``folder_paths.get_full_path``; for ``diffusers``, the release folder of that name
in one of the ``diffusers`` model folders), plus ``folder`` and ``expected_kind`` / ``matches`` (does the
file hold what this folder's loader loads). Bad requests get HTTP 400, an unknown file 404, both
with ``{"error": ...}``. Answers are cached by (path, mtime, size): headers are read once per file
version.

:func:`file_info` is the whole logic as a plain function (tested without ComfyUI);
:func:`register` adds the route to ComfyUI's server. Outside ComfyUI it does nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Callable

log = logging.getLogger(__name__)

ROUTE = "/firered/file_info"
#: the ComfyUI model folders the route answers for -> the kind of file their loader loads
FOLDERS = {
    "diffusion_models": "mmdit",
    "text_encoders": "text_encoder",
    "vae": "vae",
    "loras": "lora",
    "diffusers": "mmdit",
}
_MAX_NAME = 1024
_CACHE_SIZE = 256

_cache: OrderedDict[tuple[str, int, int], dict[str, Any]] = OrderedDict()
_lock = threading.Lock()
_registered = False


def _bad_name(name: str) -> str | None:
    """Why ``name`` is not a file name ComfyUI could list (None if it is fine)."""
    if not name:
        return "missing 'name'"
    if len(name) > _MAX_NAME or "\x00" in name:
        return "invalid 'name'"
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            return f"'name' must be a file name inside the folder, not a path ({name!r})"
    return None


def _describe(path: str) -> dict[str, Any]:
    from ..firered_core.formats.inspect import describe_file

    return describe_file(path)


def file_info(
    folder: str,
    name: str,
    resolve: Callable[[str, str], str | None],
    describe: Callable[[str], dict[str, Any]] = _describe,
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for a request for ``name`` in the model folder ``folder``.

    ``resolve(folder, name)`` gives the file's path or None (``folder_paths.get_full_path`` in
    ComfyUI); ``describe(path)`` reads it (:func:`describe_file`). The answer for a path is cached
    until the file's mtime or size changes.
    """
    if folder not in FOLDERS:
        return 400, {"error": f"unknown folder {folder!r}; expected one of {sorted(FOLDERS)}"}
    why = _bad_name(name)
    if why:
        return 400, {"error": why}
    try:
        path = resolve(folder, name)
    except Exception as e:  # noqa: BLE001 - folder_paths raises on odd input; the client gets a 400
        return 400, {"error": f"cannot resolve {name!r} in {folder}: {e}"}
    if not path:
        return 404, {"error": f"{name!r} is not in the {folder} folder"}
    try:
        st = os.stat(path)
    except OSError:
        return 404, {"error": f"{name!r} is not in the {folder} folder"}
    key = (os.path.realpath(path), int(st.st_mtime_ns), int(st.st_size))
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
    if hit is None:
        try:
            hit = describe(path)
        except FileNotFoundError:
            return 404, {"error": f"{name!r} is not in the {folder} folder"}
        except Exception as e:  # noqa: BLE001 - a broken file must not break the server
            log.debug("FireRed: reading %s failed", path, exc_info=True)
            return 500, {"error": f"could not read {name!r}: {type(e).__name__}: {e}"}
        with _lock:
            _cache[key] = hit
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    body = dict(hit)
    body["path"] = name  # never hand the server's absolute paths to the browser
    body["folder"] = folder
    body["expected_kind"] = FOLDERS[folder]
    body["matches"] = hit.get("kind") == FOLDERS[folder]
    return 200, body


def comfy_resolve(folder_paths, folder: str, name: str) -> str | None:
    """The path ComfyUI's loaders would open: ``get_full_path`` for files; for ``diffusers``, the
    first model folder holding a sub-folder ``name`` (``get_full_path`` only finds files)."""
    if folder == "diffusers":
        for base in folder_paths.get_folder_paths(folder):
            path = os.path.join(base, name)
            if os.path.isdir(path):
                return path
        return None
    return folder_paths.get_full_path(folder, name)


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def register() -> bool:
    """Add ``GET /firered/file_info`` to ComfyUI's server; False (silently) outside ComfyUI."""
    global _registered
    if _registered:
        return True
    try:
        import folder_paths
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None or not hasattr(server, "routes"):
        return False

    async def handle_file_info(request):
        import asyncio

        q = request.rel_url.query
        loop = asyncio.get_running_loop()
        status, body = await loop.run_in_executor(
            None, file_info, q.get("folder", ""), q.get("name", ""), lambda f, n: comfy_resolve(folder_paths, f, n)
        )
        return web.json_response(body, status=status)

    server.routes.get(ROUTE)(handle_file_info)
    _registered = True
    return True
