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
``execution_success`` / ``execution_error`` / ``execution_interrupted``. Nothing from ComfyUI is
imported here: it is only ever run as a separate process. The tier's other helpers: UI-format
workflows as API prompts in :mod:`workflow_prompts`, the pictures and the native test DiT its prompts
read in :mod:`tier_files`, the browser side in :mod:`frontend_page`.
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

    def __init__(
        self,
        comfy_dir: Path,
        root: Path,
        *,
        python: str | None = None,
        extra_args: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
    ):
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
        self.extra_env = dict(extra_env or {})
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
            **self.extra_env,
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


def output_images(history: dict) -> list[dict]:
    """``{filename, subfolder, type}`` of every image in a /history entry."""
    out = []
    for node_out in (history.get("outputs") or {}).values():
        out.extend(node_out.get("images") or [])
    return out


def start_server(
    root: Path, *, make_models: bool = True, extra_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None
) -> ComfyServer:
    """Prepare ``root`` (tiny models, pack, test pack, YAML) and start a server on it; ``extra_args``
    go to ComfyUI's command line (e.g. ``("--front-end-root", path)``), ``extra_env`` to its environment."""
    comfy = comfyui_path()
    if comfy is None:
        raise RuntimeError("COMFYUI_PATH is not set")
    server = ComfyServer(comfy, root, extra_args=extra_args, extra_env=extra_env)
    server.prepare()
    if make_models:
        from firered_core.tiny import make_tiny, make_tiny_comfyui

        make_tiny_comfyui(server.models)
        make_tiny(server.models / "diffusers" / "FireRed-Image-Edit-tiny", seed=0)
    server.start()
    return server
