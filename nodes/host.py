"""The one place the nodes meet ComfyUI's services, with plain stand-ins outside ComfyUI.

Services: model folders (``folder_paths``), devices and memory (``comfy.model_management``), the
progress bar with latent previews (``comfy.utils.ProgressBar``, ``latent_preview``), Cancel, and
the temp folder. Each function imports ComfyUI lazily and falls back when it is not there, so the
node classes run (and are tested) without a ComfyUI install:

* model folders come from ``$FIRERED_MODELS_DIR`` (default ``./models``), laid out like ComfyUI's
  ``models/`` (``diffusion_models/``, ``text_encoders/``, ``vae/``, ``loras/``, ``diffusers/``);
* Cancel is :func:`request_interrupt` (tests) instead of the Cancel button;
* progress goes nowhere and there are no previews.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger("FireRed")

#: file extensions listed per ComfyUI model folder (ComfyUI's own lists leave out GGUF)
EXTENSIONS = {
    "diffusion_models": (".safetensors", ".sft", ".gguf"),
    "text_encoders": (".safetensors", ".sft"),
    "vae": (".safetensors", ".sft"),
    "loras": (".safetensors", ".sft"),
}

_interrupt = threading.Event()
#: models this pack has put on the compute device and not yet offloaded (see :func:`on_device`)
_resident: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


_IN_COMFYUI: bool | None = None


def in_comfyui() -> bool:
    """True when running inside a ComfyUI process (its ``folder_paths`` and ``comfy`` are importable).
    Decided once per process."""
    global _IN_COMFYUI
    if _IN_COMFYUI is None:
        try:
            import comfy.model_management  # noqa: F401
            import folder_paths  # noqa: F401

            _IN_COMFYUI = True
        except Exception:
            _IN_COMFYUI = False
    return _IN_COMFYUI


# -- model folders -------------------------------------------------------------------------------


def folder_dirs(folder: str) -> list[Path]:
    """The directories ComfyUI searches for ``folder`` (``extra_model_paths.yaml`` included)."""
    if in_comfyui():
        import folder_paths

        try:
            return [Path(p) for p in folder_paths.get_folder_paths(folder)]
        except KeyError:
            return []
    root = Path(os.environ.get("FIRERED_MODELS_DIR", "models"))
    return [root / folder]


def list_files(folder: str) -> list[str]:
    """Model files of ``folder`` as ComfyUI names them (relative paths with ``/``), sorted."""
    exts = EXTENSIONS.get(folder, (".safetensors",))
    names: set[str] = set()
    for d in folder_dirs(folder):
        if not d.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            dirnames[:] = [n for n in dirnames if not n.startswith(".")]
            for f in filenames:
                if f.lower().endswith(exts):
                    names.add(Path(dirpath, f).relative_to(d).as_posix())
    return sorted(names)


def list_model_folders(folder: str = "diffusers") -> list[str]:
    """Sub-folders of ``folder`` that look like a diffusers release (``model_index.json`` or ``transformer/``)."""
    names: set[str] = set()
    for d in folder_dirs(folder):
        if d.is_dir():
            for sub in d.iterdir():
                if sub.is_dir() and ((sub / "model_index.json").is_file() or (sub / "transformer").is_dir()):
                    names.add(sub.name)
    return sorted(names)


def full_path(folder: str, name: str) -> Path:
    """Resolve a file name chosen in a loader; a clear error names the folder and where it looked."""
    if not name:
        raise FileNotFoundError(f"no file chosen for {folder}/: put a model file in models/{folder}/ and pick it")
    rel = Path(os.path.normpath(name))
    if rel.is_absolute() or rel.parts[:1] == ("..",):
        raise ValueError(f"{name!r} points outside models/{folder}/")  # symlinks inside are fine
    dirs = folder_dirs(folder)
    for d in dirs:
        p = d / rel
        if p.exists():
            return p
    looked = ", ".join(str(d) for d in dirs) or "(no folder registered)"
    raise FileNotFoundError(f"{folder}/{name} was not found (looked in: {looked})")


# -- devices and memory --------------------------------------------------------------------------


def load_device() -> torch.device:
    if in_comfyui():
        import comfy.model_management as mm

        return mm.get_torch_device()
    from ..firered_core.model.modules import concrete_device

    # with its index, as ComfyUI's is: "cuda" never equals a tensor's "cuda:0" (every part would look moved)
    return concrete_device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    if in_comfyui():
        import comfy.model_management as mm

        return mm.unet_offload_device()
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that has it, fp16 on other GPUs, fp32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def free_memory_for(nbytes: int, device: torch.device) -> None:
    """Make room before a large load: ask ComfyUI to unload what it holds on ``device``, free caches."""
    if device.type == "cpu":
        return
    if in_comfyui():
        import comfy.model_management as mm

        mm.free_memory(nbytes, device)
        mm.soft_empty_cache()
    elif device.type == "cuda":
        torch.cuda.empty_cache()


def free_before_load() -> None:
    """Before reading a large model file: unload ComfyUI's models and empty the caches."""
    if in_comfyui():
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()


def _device_of(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def _module(part) -> torch.nn.Module | None:
    for attr in ("transformer", "model"):
        m = getattr(part, attr, None)
        if isinstance(m, torch.nn.Module):
            return m
    return part if isinstance(part, torch.nn.Module) else None


@contextlib.contextmanager
def on_device(*items) -> Iterator[torch.device]:
    """Run a block with the models of ``items`` (``firered_core.parts`` parts, or modules) on the
    load device, then move each to the offload device -- also when the block raises, e.g. on
    Cancel -- unless its part says ``keep_loaded``. Before moving a model in, ComfyUI is asked to
    free that much memory.

    This is the one placement path of every node: an MM-DiT part that carries memory options (from
    FireRed Speed & Memory) is placed by its plan -- resident, block swap or sequential streaming,
    :func:`firered_core.parts.placed` -- instead of being moved whole."""
    from ..firered_core import parts

    device = load_device()
    planned = [p for p in items if isinstance(p, parts.DiT) and p.memory is not None]
    rest = [p for p in items if p is not None and not any(p is q for q in planned)]
    pairs = [(m, bool(getattr(p, "keep_loaded", False))) for p in rest if (m := _module(p)) is not None]
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.callback(soft_empty_cache)  # runs last: after every part has left the device
        for dit in planned:
            free_memory_for(module_bytes(dit.transformer), device)
            _resident.add(dit.transformer)
            stack.callback(_resident.discard, dit.transformer)
            stack.enter_context(parts.placed(dit, device, offload_device()))
        moved = [m for m, _ in pairs if _device_of(m) != device]
        if moved:
            free_memory_for(sum(module_bytes(m) for m in moved), device)
            for m in moved:
                m.to(device)
        for m, _ in pairs:
            _resident.add(m)
        try:
            yield device
        finally:
            off = offload_device()
            for m, keep in pairs:
                if keep:
                    continue
                if _device_of(m) != off:
                    m.to(off)
                _resident.discard(m)


def resident_models() -> list[torch.nn.Module]:
    """The models this pack holds on the compute device (``keep_loaded`` ones, or a node running)."""
    return list(_resident)


def soft_empty_cache() -> None:
    if in_comfyui():
        import comfy.model_management as mm

        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- progress, previews, Cancel ----------------------------------------------------------------


class InterruptedByUser(Exception):
    """Cancel outside ComfyUI (inside, ComfyUI's own ``InterruptProcessingException`` is raised)."""


def request_interrupt(flag: bool = True) -> None:
    """Outside ComfyUI: ask the running node to stop at its next step (what Cancel does inside)."""
    if flag:
        _interrupt.set()
    else:
        _interrupt.clear()


def check_interrupt() -> None:
    """Raise if the user asked to stop: ComfyUI's interrupt inside ComfyUI, :func:`request_interrupt` outside."""
    if in_comfyui():
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
    if _interrupt.is_set():
        _interrupt.clear()
        raise InterruptedByUser("cancelled")


def interrupt_requested() -> bool:
    """True when the user asked to stop, without raising (for loops that save state first)."""
    if in_comfyui():
        import comfy.model_management as mm

        if mm.processing_interrupted():
            return True
    return _interrupt.is_set()


def output_dir() -> Path:
    """ComfyUI's output folder (``./output`` outside ComfyUI)."""
    if in_comfyui():
        import folder_paths

        return Path(folder_paths.get_output_directory())
    return Path(os.environ.get("FIRERED_OUTPUT_DIR", "output"))


def _previewer():
    try:
        import comfy.latent_formats
        import latent_preview

        return latent_preview.get_previewer(load_device(), comfy.latent_formats.Wan21())
    except Exception as e:  # no previews is never fatal
        log.debug("FireRed: no latent previewer (%s)", e)
        return None


def progress_callback(node_id: str | None = None) -> Callable[[Any], None]:
    """A sampling callback: checks Cancel, then moves ComfyUI's progress bar with a latent preview.
    It takes a :class:`firered_core.parts.Progress`, which carries the step count of the whole run."""
    bar = previewer = None
    if in_comfyui():
        import comfy.utils

        bar = comfy.utils.ProgressBar(1, node_id=node_id)  # the total comes with each step
        previewer = _previewer()

    def callback(p) -> None:
        check_interrupt()
        if bar is not None:
            preview = None
            if previewer is not None and p.x0 is not None:
                preview = previewer.decode_latent_to_preview_image("JPEG", p.x0.float())
            bar.update_absolute(p.step, p.total, preview)

    return callback


def step_progress(total: int, node_id: str | None = None) -> Callable[..., None]:
    """A plain step counter for loops without latents (training): moves ComfyUI's progress bar,
    with an optional PIL picture as the preview. Cancel is left to the loop (see
    :func:`interrupt_requested`), so it can save its state first."""
    bar = None
    if in_comfyui():
        import comfy.utils

        bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def update(step: int, preview=None) -> None:
        if bar is not None:
            bar.update_absolute(step, total, ("JPEG", preview, 512) if preview is not None else None)

    return update


def input_dir() -> Path:
    """ComfyUI's input folder (``./input`` outside ComfyUI)."""
    if in_comfyui():
        import folder_paths

        return Path(folder_paths.get_input_directory())
    return Path(os.environ.get("FIRERED_INPUT_DIR", "input"))


def temp_dir() -> Path:
    if in_comfyui():
        import folder_paths

        return Path(folder_paths.get_temp_directory())
    d = Path(tempfile.gettempdir()) / "firered_temp"
    d.mkdir(parents=True, exist_ok=True)
    return d


def send_event(event: str, data: dict) -> None:
    """A websocket message to the front end (namespaced ``firered.*``); nothing outside ComfyUI."""
    if not in_comfyui():
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(event, data)
    except Exception as e:
        log.debug("FireRed: could not send %s (%s)", event, e)
