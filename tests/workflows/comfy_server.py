"""A real ComfyUI server for the ``COMFYUI_PATH`` test tier, and a small client for it.

The server is ``python main.py --cpu`` from the checkout at ``$COMFYUI_PATH`` (interpreter:
``$COMFYUI_PYTHON``, else this one), with

* the pack installed through a ``custom_nodes`` entry of an ``--extra-model-paths-config`` YAML: a temp
  folder holding a symlink named ``ComfyUI-FireRed-Image-Edit`` to this repository, plus a test-only pack
  (:data:`TEST_NODES_SOURCE`: a conditioning made without the 7B text encoder, a slow interruptible node);
* a temp ``models/`` folder holding the tiny model in ComfyUI's file layouts
  (:func:`firered_core.tiny.make_tiny_comfyui`) and the tiny diffusers release folder;
* temp input / output / temp / user directories.

The client posts API-format prompts and follows them on the websocket (``websocket-client``) to
``execution_success`` / ``execution_error`` / ``execution_interrupted``. :func:`ui_to_api` turns a
UI-format workflow (what ``workflows/*.json`` holds) into an API prompt using ``/object_info``.
Nothing from ComfyUI is imported here: it is only ever run as a separate process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-FireRed-Image-Edit"
TEST_PACK_NAME = "firered_test_nodes"

#: UI-only node types of the front end: never sent to /prompt
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

#: A test-only ComfyUI pack (written into the temp custom_nodes folder, never shipped).
TEST_NODES_SOURCE = r'''
import time
import torch
import comfy.model_management


class FireRedTestConditioning:
    """Random CONDITIONING shaped like Qwen2.5-VL-7B hidden states (so no 7B text encoder is needed)."""
    CATEGORY = "FireRed/testing"
    FUNCTION = "make"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            "dim": ("INT", {"default": 3584, "min": 1, "max": 8192}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0}),
        }}

    def make(self, seed, tokens, dim, scale):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, dim, generator=g) * scale, {}]],)


class FireRedTestSlow:
    """Counts for `seconds`, checking ComfyUI's interrupt flag every 50 ms (harness self-test)."""
    CATEGORY = "FireRed/testing"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 600.0}),
                             "size": ("INT", {"default": 32, "min": 8, "max": 1024})}}

    def run(self, seconds, size):
        end = time.time() + seconds
        while time.time() < end:
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(0.05)
        return (torch.full((1, size, size, 3), 0.5),)


NODE_CLASS_MAPPINGS = {"FireRedTestConditioning": FireRedTestConditioning, "FireRedTestSlow": FireRedTestSlow}
'''


def comfyui_path() -> Path | None:
    p = os.environ.get("COMFYUI_PATH")
    return Path(p) if p else None


def comfyui_python() -> str:
    return os.environ.get("COMFYUI_PYTHON") or sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(AssertionError):
    pass


@dataclass
class RunResult:
    """How a prompt ended: ``status`` is "execution_success", "execution_error" or
    "execution_interrupted"; ``messages`` the websocket messages of this prompt, in order."""

    prompt_id: str
    status: str
    messages: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def message(self, kind: str) -> dict | None:
        for m in self.messages:
            if m.get("type") == kind:
                return m.get("data")
        return None

    def describe(self) -> str:
        err = self.message("execution_error")
        if err:
            tb = "".join(err.get("traceback", []))[-3000:]
            return (
                f"{self.status} in node {err.get('node_id')} ({err.get('node_type')}): "
                f"{err.get('exception_type')}: {str(err.get('exception_message'))[:1500]}\n{tb}"
            )
        return self.status


class ComfyServer:
    """A ComfyUI server process on the CPU. ``root`` holds models/, custom_nodes/, input/, output/..."""

    def __init__(self, comfy_dir: Path, root: Path, *, python: str | None = None, extra_args: tuple[str, ...] = ()):
        self.comfy_dir = Path(comfy_dir)
        self.root = Path(root)
        self.python = python or comfyui_python()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models = self.root / "models"
        self.custom_nodes = self.root / "custom_nodes"
        self.input_dir = self.root / "input"
        self.output_dir = self.root / "output"
        self.log_path = self.root / "comfyui.log"
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # -- set-up ----------------------------------------------------------------------------

    def prepare(self, *, pack_dir: Path = REPO, test_pack: bool = True) -> None:
        """Folders, the pack symlink, the test pack and the extra-model-paths YAML (models are
        written by the caller into :attr:`models`)."""
        for d in (
            self.models,
            self.custom_nodes,
            self.input_dir,
            self.output_dir,
            self.root / "temp",
            self.root / "user",
        ):
            d.mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
        if test_pack:
            (self.custom_nodes / f"{TEST_PACK_NAME}.py").write_text(TEST_NODES_SOURCE)
        folders = ("diffusion_models", "text_encoders", "vae", "loras", "diffusers", "checkpoints", "clip_vision")
        lines = ["firered_test:", f"    base_path: {self.root}", "    custom_nodes: custom_nodes"]
        lines += [f"    {f}: models/{f}" for f in folders]
        (self.root / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 120.0) -> None:
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--extra-model-paths-config", str(self.root / "extra_model_paths.yaml"),
            "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.root / "temp"), "--user-directory", str(self.root / "user"),
            "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none", *self.extra_args,
        ]  # fmt: skip
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        env.pop("COMFYUI_PATH", None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    # -- HTTP ------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 60.0) -> tuple[int, Any]:
        """(status, decoded JSON or bytes); HTTP errors are returned, not raised."""
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        if "json" in ctype:
            return status, json.loads(raw or b"null")
        return status, raw

    def get(self, path: str, *, timeout: float = 60.0) -> Any:
        status, out = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path} -> HTTP {status}: {out!r}"[:2000])
        return out

    def object_info(self) -> dict:
        if not hasattr(self, "_object_info"):
            self._object_info = self.get("/object_info")
        return self._object_info

    def post_prompt(self, prompt: dict, *, workflow: dict | None = None) -> tuple[int, dict]:
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        return self.request("POST", "/prompt", body)

    def interrupt(self) -> None:
        status, out = self.request("POST", "/interrupt", {})
        if status != 200:
            raise ComfyError(f"/interrupt -> HTTP {status}: {out!r}")

    def history(self, prompt_id: str, timeout: float = 15.0) -> dict:
        """The /history entry of a finished prompt (ComfyUI sends execution_success just before it
        stores the entry, so this waits for it)."""
        deadline = time.time() + timeout
        while True:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry or time.time() > deadline:
                return entry or {}
            time.sleep(0.2)

    # -- websocket ---------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0):
        import websocket  # websocket-client

        ws = websocket.WebSocket()
        ws.connect(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=timeout)
        return ws

    def run(self, prompt: dict, *, timeout: float = 300.0, workflow: dict | None = None, on_message=None) -> RunResult:
        """Queue ``prompt`` and follow it to its end. ``on_message(server, message_dict)`` sees each
        JSON message of this prompt as it arrives (e.g. to interrupt on the first progress)."""
        import websocket

        ws = self.connect()
        try:
            status, out = self.post_prompt(prompt, workflow=workflow)
            if status != 200:
                raise ComfyError(f"/prompt refused the prompt (HTTP {status}): {json.dumps(out, indent=1)[:4000]}")
            pid = out["prompt_id"]
            res = RunResult(pid, "")
            t0 = time.time()
            ws.settimeout(2.0)
            while time.time() - t0 < timeout:
                if not self.alive():
                    raise ComfyError(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if not isinstance(raw, str):
                    continue  # binary preview frames
                msg = json.loads(raw)
                data = msg.get("data") or {}
                if data.get("prompt_id") not in (None, pid):
                    continue
                if msg.get("type") == "status":
                    continue
                res.messages.append(msg)
                if on_message is not None:
                    on_message(self, msg)
                if (
                    msg.get("type") in ("execution_success", "execution_error", "execution_interrupted")
                    and data.get("prompt_id") == pid
                ):
                    res.status = msg["type"]
                    res.seconds = time.time() - t0
                    return res
            self.interrupt()
            raise ComfyError(
                f"prompt {pid} did not finish within {timeout:.0f} s; messages: {[m.get('type') for m in res.messages]}"
            )
        finally:
            ws.close()


# -- UI format -> API format ---------------------------------------------------------------------


def _input_specs(info: dict) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of a node's inputs in widget order (required, then optional)."""
    out = []
    inputs = info.get("input", {})
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        sec = inputs.get(section) or {}
        names = order.get(section) or list(sec)
        for name in names:
            spec = sec[name]
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, typ, opts))
    return out


def _is_widget(typ: Any, opts: dict) -> bool:
    if isinstance(typ, list):
        return True  # classic COMBO
    return typ in WIDGET_TYPES and not opts.get("forceInput")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format (0.4) workflow into an API prompt.

    Positional ``widgets_values`` are named with ``/object_info`` (a ``control_after_generate``
    value after an INT widget is skipped; trailing UI-only values such as the upload button are
    ignored). Note / MarkdownNote are dropped, Reroute links are followed, a PrimitiveNode's value
    is written into the widgets it feeds, muted nodes (mode 2) are dropped and bypassed nodes
    (mode 4) pass their input of the same type through.
    """
    if "nodes" not in workflow:
        raise ValueError("not a UI-format workflow (no 'nodes'); API prompts can be posted as they are")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links: dict[int, tuple[int, int, int, int, str]] = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (
                link["origin_id"],
                link["origin_slot"],
                link["target_id"],
                link["target_slot"],
                link.get("type"),
            )
        else:
            lid, a, aslot, b, bslot, typ = link[:6]
            links[lid] = (a, aslot, b, bslot, typ)

    def resolve(link_id: int, depth: int = 0):
        """The (node id, slot) a link really comes from, or ("value", v) for a PrimitiveNode."""
        if depth > 64:
            raise ValueError(f"link {link_id}: reroute / bypass loop")
        src, slot, _, _, typ = links[link_id]
        n = nodes[src]
        if n["type"] == "Reroute":
            inp = (n.get("inputs") or [{}])[0].get("link")
            return None if inp is None else resolve(inp, depth + 1)
        if n["type"] == "PrimitiveNode":
            return ("value", (n.get("widgets_values") or [None])[0])
        if n.get("mode", 0) == 4:  # bypassed: pass the first input of the same type through
            out_type = (n.get("outputs") or [])[slot].get("type") if slot < len(n.get("outputs") or []) else typ
            for inp in n.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return resolve(inp["link"], depth + 1)
            return None
        if n.get("mode", 0) == 2:
            return None
        return (str(src), slot)

    prompt: dict[str, dict] = {}
    for n in workflow["nodes"]:
        t = n["type"]
        if t in UI_ONLY or n.get("mode", 0) in (2, 4):
            continue
        if t not in object_info:
            raise ValueError(f"node {n['id']}: type {t!r} is not known to this ComfyUI (/object_info)")
        specs = _input_specs(object_info[t])
        spec_by_name = {name: (typ, opts) for name, typ, opts in specs}
        inputs: dict[str, Any] = {}
        values = n.get("widgets_values")
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in spec_by_name})
        elif values:
            vals = list(values)
            i = 0
            for name, typ, opts in specs:
                if not _is_widget(typ, opts):
                    continue
                if i >= len(vals):
                    break
                inputs[name] = vals[i]
                i += 1
                if typ == "INT" and i < len(vals) and isinstance(vals[i], str) and vals[i] in CONTROL_VALUES:
                    i += 1  # control_after_generate
        for inp in n.get("inputs") or []:
            lid = inp.get("link")
            if lid is None:
                continue
            src = resolve(lid)
            name = inp.get("widget", {}).get("name") if inp.get("widget") else inp.get("name")
            if name not in spec_by_name:
                name = inp.get("name")
            if src is None:
                inputs.pop(name, None)
            elif src[0] == "value":
                inputs[name] = src[1]
            else:
                inputs[name] = [src[0], src[1]]
        prompt[str(n["id"])] = {"class_type": t, "inputs": inputs, "_meta": {"title": n.get("title") or t}}
    return prompt


def load_image_names(prompt: dict) -> list[str]:
    """File names LoadImage(-like) nodes of an API prompt read from the input folder."""
    names = []
    for node in prompt.values():
        if node["class_type"] in ("LoadImage", "LoadImageMask", "LoadImageOutput"):
            v = node["inputs"].get("image")
            if isinstance(v, str):
                names.append(v.split(" [")[0])
    return names


def write_test_picture(path: Path, size: tuple[int, int] = (96, 64), seed: int = 0) -> None:
    """A structured RGB test picture (gradients and a disc) as PNG."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, 0.25 * min(w, h)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r * r).astype(np.float32)
    arr = np.stack([x / max(w - 1, 1), y / max(h - 1, 1), 0.2 + 0.6 * disc], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(path)


def output_images(history: dict) -> list[dict]:
    """``{filename, subfolder, type}`` of every image in a /history entry."""
    out = []
    for node_out in (history.get("outputs") or {}).values():
        out.extend(node_out.get("images") or [])
    return out


def start_server(root: Path, *, make_models: bool = True) -> ComfyServer:
    """Prepare ``root`` (tiny models, pack, test pack, YAML) and start a server on it."""
    comfy = comfyui_path()
    if comfy is None:
        raise RuntimeError("COMFYUI_PATH is not set")
    server = ComfyServer(comfy, root)
    server.prepare()
    if make_models:
        from firered_core.tiny import make_tiny, make_tiny_comfyui

        make_tiny_comfyui(server.models)
        make_tiny(server.models / "diffusers" / "FireRed-Image-Edit-tiny", seed=0)
    server.start()
    return server


# -- ComfyUI-loadable native Qwen-Image MM-DiT (full width: ComfyUI fixes the width) ------------
# (the VAE needs no stand-in: make_tiny_comfyui writes the configuration ComfyUI's VAELoader builds)

NATIVE_DIT = "firered_native_test_full_width_1layer.safetensors"
NATIVE_SIZE = (64, 48)  # pictures on the native path (w, h): an 8x6 latent


def cached(name: str, writer) -> Path:
    """``$FIRERED_TEST_CACHE/name`` (default ``~/.cache/firered-comfyui-tier``), written by
    ``writer(path)`` the first time (to a temp name, then renamed)."""
    root = Path(os.environ.get("FIRERED_TEST_CACHE") or Path.home() / ".cache" / "firered-comfyui-tier")
    path = root / name
    if not path.exists():
        tmp = root / f".{name}.{os.getpid()}.tmp"
        writer(tmp)
        os.replace(tmp, path)
    return path


def write_native_dit(path: Path, *, num_layers: int = 1, seed: int = 0) -> Path:
    """A random Qwen-Image MM-DiT at the real width (3072 hidden, 24 heads x 128, text dim 3584) with
    ``num_layers`` blocks, in diffusers key names, bf16 -- what ComfyUI's detection can load (it reads
    only the in-channels and the number of blocks). About 0.37 B parameters per block."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(num_layers=num_layers)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith(".bias"):
            t = torch.zeros(p.shape)
        elif "norm" in name and p.dim() == 1:
            t = torch.ones(p.shape)
        else:
            fan_in = p.shape[1] if p.dim() > 1 else p.shape[0]
            t = torch.randn(p.shape, generator=g) / fan_in**0.5
        sd[name] = t.to(torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def write_rgba_half_mask(path: Path, size: tuple[int, int]) -> None:
    """A PNG whose alpha is 0 on the left half: ComfyUI's LoadImage gives MASK = 1 - alpha, i.e.
    1 (may change) on the left half, 0 (keep) on the right."""
    import numpy as np
    from PIL import Image

    w, h = size
    a = np.full((h, w, 4), 255, np.uint8)
    a[:, : w // 2, 3] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "RGBA").save(path)


def uses_native_qwen(prompt: dict) -> bool:
    """Whether an API prompt uses ComfyUI's own Qwen-Image model loaders (needs :func:`substitute_native`:
    ComfyUI 0.3.x builds the full-width MM-DiT and the 7B text encoder whatever the file holds, so the
    tiny DiT and text encoder of :func:`firered_core.tiny.make_tiny_comfyui` do not load there; its VAE
    does, and ``VAELoader`` keeps the workflow's file)."""
    return any(
        n["class_type"] in ("UNETLoader", "CLIPLoader", "TextEncodeQwenImageEditPlus")
        for n in prompt.values()
    )


def substitute_native(prompt: dict, server) -> dict:
    """Make a native Qwen-Image-Edit prompt runnable on the test files: UNETLoader gets the full-width
    test DiT (``VAELoader`` keeps the workflow's ``qwen_image_vae.safetensors``, the tiny VAE), each TextEncodeQwenImageEditPlus becomes test conditioning + ReferenceLatent of its
    first picture (VAE-encoded as the node would), CLIPLoader is dropped, pictures are made 64x48."""
    for name in [k for k, n in prompt.items() if n["class_type"] == "LoadImage"]:
        img = prompt[name]["inputs"]["image"]
        if not (server.input_dir / img).exists():
            write_test_picture(server.input_dir / img, size=NATIVE_SIZE, seed=7)
    out = {}
    for nid, n in prompt.items():
        t, inp = n["class_type"], dict(n["inputs"])
        if t == "CLIPLoader":
            continue
        if t == "UNETLoader":
            inp["unet_name"] = NATIVE_DIT
        elif t == "ImageScaleToTotalPixels":  # a small picture (its minimum, 0.01 MP, is slow here)
            t, inp = (
                "ImageScale",
                {
                    "image": inp["image"],
                    "upscale_method": "area",
                    "width": NATIVE_SIZE[0],
                    "height": NATIVE_SIZE[1],
                    "crop": "disabled",
                },
            )
        elif t == "TextEncodeQwenImageEditPlus":
            cond = f"{nid}_cond"
            out[cond] = {
                "class_type": "FireRedTestConditioning",
                "inputs": {"seed": len(out), "tokens": 6, "dim": 3584, "scale": 1.0},
            }
            if "image1" in inp and "vae" in inp:
                enc = f"{nid}_enc"
                out[enc] = {"class_type": "VAEEncode", "inputs": {"pixels": inp["image1"], "vae": inp["vae"]}}
                out[nid] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": [cond, 0], "latent": [enc, 0]}}
            else:
                out[nid] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [cond, 0]}}
            continue
        out[nid] = {"class_type": t, "inputs": inp}
    return out
