"""Shared fixtures: a tiny random FireRed model, made once per test session from config and
saved in the release layout, so every test loads real files through the real loaders."""

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_PACK_ROOT = Path(__file__).resolve().parents[1]


class _PackRootIsADirectory:
    """Collect the pack root as a plain directory, never as a Python package.

    The root holds ComfyUI's entry ``__init__.py``, so pytest would otherwise import the checkout
    as a package named after its folder, running that file's relative imports: under the folder
    name the README suggests (``ComfyUI-FireRed-Image-Edit``, not a Python name) every test then
    errors. The tests import the pack's parts by their own names (``firered_core``,
    ``firered_trainer``, ``nodes``), so nothing needs the root as a package. Registered as a
    plugin (not a conftest hook) because the root is collected before this folder's conftest
    applies."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path).resolve() == _PACK_ROOT:
            return pytest.Dir.from_parent(parent, path=Path(path))
        return None


def pytest_configure(config):
    config.pluginmanager.register(_PackRootIsADirectory(), "firered-pack-root-as-directory")


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module's training runs: on a shared 2-core machine several times faster
    than two contended threads, and the float reductions match those of the subprocess runs."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from firered_core.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-firered", seed=0)


def make_picture(width: int, height: int, seed: int = 0):
    """A deterministic, structured test picture (gradients and a disc), as RGB PIL."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = x / max(width - 1, 1)
    g = y / max(height - 1, 1)
    cx, cy, rad = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height, 0.25 * min(width, height)
    b = ((x - cx) ** 2 + (y - cy) ** 2 < rad**2).astype(np.float32)
    arr = np.stack([r, g, 0.2 + 0.6 * b], -1) + rng.normal(0, 0.03, (height, width, 3))
    return Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8))


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need CUDA: skipped, with the reason, on a machine without it."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.sh runs these on one)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def judge_choice(top: dict[str, float], lead: str = "Ok") -> dict:
    """One OpenAI chat-completion choice answering ``"<lead>. Score: N"`` (N: the first key of
    ``top``) whose score token carries ``top`` as its top log-probabilities -- what an
    OpenAI-compatible judge server returns with ``logprobs``."""
    import math

    tok = next(iter(top))
    toks = [{"token": t, "logprob": -0.1, "top_logprobs": []} for t in [lead, ".", " Score", ":", " "]]
    toks.append({"token": tok, "logprob": math.log(top[tok]),
                 "top_logprobs": [{"token": k, "logprob": math.log(v)} for k, v in top.items()]})
    return {"message": {"content": f"{lead}. Score: {tok}"}, "logprobs": {"content": toks}}


@contextlib.contextmanager
def json_server(answer):
    """A local HTTP server answering every POST with ``answer(path, headers, body) -> dict`` as JSON
    (``body``: the parsed request); yields its address ``http://127.0.0.1:PORT``."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps(answer(self.path, self.headers, body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
