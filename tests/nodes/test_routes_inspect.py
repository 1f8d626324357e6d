"""What the loaders' front end shows for a model file: ``describe_file`` on real files in every
layout users hold (the tiny model as ComfyUI files, and the formats writers' other layouts), and
the ``/firered/file_info`` route's logic (folders, path traversal, 404, cache) without ComfyUI."""

import asyncio
import importlib
import json
import logging
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from firered_core.formats import writers
from firered_core.formats.inspect import describe_file, human_size


@pytest.fixture(scope="module")
def transformer_state(comfy_models):
    """The tiny MM-DiT's state dict under its diffusers names (prefix stripped)."""
    _, paths = comfy_models
    sd = load_file(paths["transformer"])
    return {k[len(writers.COMFY_PREFIX) :]: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def routes(pack):
    """nodes/routes.py of the pack imported the way ComfyUI imports it (conftest's ``pack``)."""
    return importlib.import_module(f"{pack.__name__}.nodes.routes")


# ---------------------------------------------------------------------------------------------
# describe_file on the tiny model's ComfyUI files
# ---------------------------------------------------------------------------------------------


def test_tiny_comfyui_files_are_described(comfy_models):
    _, p = comfy_models
    d = describe_file(p["transformer"])
    assert (d["kind"], d["container"], d["precision"], d["layers"]) == ("mmdit", "safetensors", "fp32", 2)
    assert d["error"] is None and d["loadable"] and d["size"] == os.path.getsize(p["transformer"])
    assert d["summary"] == f"MM-DiT · safetensors fp32 · 2 layers · {human_size(d['size'])}"

    d = describe_file(p["transformer_fp8"])
    assert (d["kind"], d["precision"], d["layers"]) == ("mmdit", "fp8 scaled", 2)
    assert "safetensors fp8 scaled" in d["summary"]

    d = describe_file(p["transformer_gguf"])
    assert (d["kind"], d["container"], d["precision"], d["layers"]) == ("mmdit", "gguf", "GGUF Q8_0", 2)
    assert d["summary"].startswith("MM-DiT · GGUF Q8_0 · 2 layers · ")

    d = describe_file(p["text_encoder"])
    assert (d["kind"], d["container"], d["error"]) == ("text_encoder", "safetensors", None)

    d = describe_file(p["vae"])
    assert (d["kind"], d["error"]) == ("vae", None)
    assert "Qwen-Image" in d["what"]

    d = describe_file(p["lora"])
    assert d["kind"] == "lora"
    assert d["lora"]["format"] == "ComfyUI" and d["lora"]["rank"] == 4 and d["lora"]["alpha"] == 4.0
    assert d["lora"]["modules"] == 2
    assert d["summary"].startswith("LoRA · ComfyUI · rank 4 · ")
    json.dumps(d)  # plain JSON


def test_precisions_of_other_layouts(tmp_path, transformer_state):
    bf16 = {k: v.to(torch.bfloat16) for k, v in transformer_state.items()}
    save_file(bf16, tmp_path / "bf16.safetensors")
    d = describe_file(tmp_path / "bf16.safetensors")
    assert (d["kind"], d["precision"]) == ("mmdit", "bf16")

    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 else v) for k, v in transformer_state.items()}
    save_file(fp8, tmp_path / "fp8.safetensors")
    assert describe_file(tmp_path / "fp8.safetensors")["precision"] == "fp8_e4m3fn"

    # one block in fp16, the rest in bf16: named as mixed, not as either
    half = {
        k: v.to(torch.float16 if k.startswith("transformer_blocks.1.") else torch.bfloat16)
        for k, v in transformer_state.items()
    }
    save_file(half, tmp_path / "half.safetensors")
    assert describe_file(tmp_path / "half.safetensors")["precision"].startswith("mixed (")

    writers.write_gguf(transformer_state, tmp_path / "q4.gguf", "Q4_0")
    d = describe_file(tmp_path / "q4.gguf")
    assert (d["kind"], d["precision"], d["layers"]) == ("mmdit", "GGUF Q4_0", 2)


def test_comfyui_mixed_precision_file(tmp_path, transformer_state):
    scaled = writers.to_scaled_fp8(transformer_state)
    sd = {}
    for k, v in scaled.items():
        if k == "scaled_fp8":
            continue
        if k.endswith(".scale_weight"):
            layer = k[: -len(".scale_weight")]
            sd[layer + ".weight_scale"] = v
            sd[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            sd[k] = v
    save_file(writers.transformer_to_comfyui(sd), tmp_path / "mixed.safetensors")
    d = describe_file(tmp_path / "mixed.safetensors")
    assert d["kind"] == "mmdit" and d["error"] is None and d["layers"] == 2
    assert d["precision"].startswith("mixed (fp8_e4m3fn"), d["precision"]


def test_diffusers_transformer_folder(tmp_path, transformer_state):
    folder = tmp_path / "release" / "transformer"
    folder.mkdir(parents=True)
    save_file(transformer_state, folder / "diffusion_pytorch_model.safetensors")
    d = describe_file(tmp_path / "release")
    assert (d["container"], d["kind"], d["layers"], d["precision"]) == ("folder", "mmdit", 2, "fp32")
    assert d["size"] == os.path.getsize(folder / "diffusion_pytorch_model.safetensors")


def test_release_folder(tiny_model_dir):
    d = describe_file(tiny_model_dir)
    assert (d["container"], d["kind"], d["layers"], d["error"]) == ("folder", "mmdit", 2, None)
    assert d["summary"].startswith("MM-DiT · diffusers folder fp32 · 2 layers · ")
    assert d["size"] == sum(f.stat().st_size for f in Path(tiny_model_dir).rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# LoRA layouts
# ---------------------------------------------------------------------------------------------

Q, K = "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj"


def _pair(rank, n_in=32, n_out=32):
    return torch.randn(rank, n_in), torch.randn(n_out, rank)


def test_lora_layouts(tmp_path):
    # diffusers / PEFT: transformer. prefix, lora_A / lora_B, alpha in the metadata
    sd = {}
    for name in (Q, K):
        a, b = _pair(8)
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
    meta = {"lora_adapter_metadata": json.dumps({"r": 8, "lora_alpha": 16})}
    save_file(sd, tmp_path / "peft.safetensors", metadata=meta)
    lo = describe_file(tmp_path / "peft.safetensors")["lora"]
    assert (lo["format"], lo["rank"], lo["alpha"], lo["modules"]) == ("PEFT", 8, 16.0, 2)

    # kohya: underscored names, lora_down / lora_up / alpha
    sd = {}
    for name in (Q, K):
        a, b = _pair(16)
        base = "lora_unet_" + name.replace(".", "_")
        sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = a, b
        sd[f"{base}.alpha"] = torch.tensor(8.0)
    save_file(sd, tmp_path / "kohya.safetensors")
    d = describe_file(tmp_path / "kohya.safetensors")
    assert (d["lora"]["format"], d["lora"]["rank"], d["lora"]["alpha"]) == ("kohya", 16, 8.0)
    assert d["summary"].startswith("LoRA · kohya · rank 16 · fp32 · ")

    # LyCORIS LoHa and LoKr
    loha = {
        f"{Q}.hada_w1_a": torch.randn(32, 4), f"{Q}.hada_w1_b": torch.randn(4, 32),
        f"{Q}.hada_w2_a": torch.randn(32, 4), f"{Q}.hada_w2_b": torch.randn(4, 32), f"{Q}.alpha": torch.tensor(4.0),
    }  # fmt: skip
    save_file(loha, tmp_path / "loha.safetensors")
    lo = describe_file(tmp_path / "loha.safetensors")["lora"]
    assert (lo["format"], lo["rank"]) == ("LoHa", 4)

    lokr = {f"{Q}.lokr_w1": torch.randn(4, 4), f"{Q}.lokr_w2_a": torch.randn(8, 2), f"{Q}.lokr_w2_b": torch.randn(2, 8)}
    save_file(lokr, tmp_path / "lokr.safetensors")
    lo = describe_file(tmp_path / "lokr.safetensors")["lora"]
    assert (lo["format"], lo["rank"]) == ("LoKr", 2)


# ---------------------------------------------------------------------------------------------
# files that are not what the loaders take: reported, not raised
# ---------------------------------------------------------------------------------------------


def test_broken_and_foreign_files_are_reported(tmp_path, comfy_models):
    _, p = comfy_models
    raw = Path(p["transformer"]).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    d = describe_file(tmp_path / "cut.safetensors")
    assert d["kind"] == "unknown" and "truncated" in d["error"]
    assert d["summary"].startswith("unreadable: truncated file")

    torch.save({"w": torch.zeros(2)}, tmp_path / "model.ckpt")
    d = describe_file(tmp_path / "model.ckpt")
    assert (d["container"], d["kind"]) == ("zip", "unknown") and "pickle" in d["error"]

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, tmp_path / "flux.safetensors")
    d = describe_file(tmp_path / "flux.safetensors")
    assert d["kind"] == "unknown" and "Flux" in d["what"] and "Flux" in d["summary"]

    # GGUF files of other models: what they are, and that the pack's loaders do not read them
    te = {"blk.0.attn_k.bias": torch.zeros(32), "blk.0.attn_k.weight": torch.randn(32, 64)}
    writers.write_gguf(te, tmp_path / "te.gguf", "Q8_0", arch="qwen2vl")
    d = describe_file(tmp_path / "te.gguf")
    assert (d["kind"], d["precision"], d["loadable"]) == ("text_encoder", "GGUF Q8_0", False) and d["error"]
    writers.write_gguf(
        {"double_blocks.0.img_attn.qkv.weight": torch.randn(32, 64)}, tmp_path / "f.gguf", "Q4_0", arch="flux"
    )
    d = describe_file(tmp_path / "f.gguf")
    assert (d["kind"], d["loadable"]) == ("unknown", False) and "Flux" in d["summary"]

    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert describe_file(tmp_path / "empty.safetensors")["container"] == "empty"

    with pytest.raises(FileNotFoundError):
        describe_file(tmp_path / "missing.safetensors")


def test_human_size():
    assert human_size(20_400_000_000) == "20.4 GB"
    assert human_size(295_000_000) == "295 MB"
    assert human_size(512) == "512 B"


# ---------------------------------------------------------------------------------------------
# the route's logic
# ---------------------------------------------------------------------------------------------


def test_file_info_resolves_describes_and_checks_the_folder(routes, comfy_models, tmp_path):
    root, p = comfy_models
    routes.clear_cache()
    (tmp_path / "diffusion_models").mkdir()

    def resolve(folder, name):
        for base in (root, tmp_path):
            f = base / folder / name
            if f.exists():
                return str(f)
        return None

    status, body = routes.file_info("diffusion_models", Path(p["transformer_gguf"]).name, resolve)
    assert status == 200 and body["kind"] == "mmdit" and body["matches"] is True
    assert body["path"] == Path(p["transformer_gguf"]).name  # no server path goes to the browser
    assert str(root) not in json.dumps(body)

    # a LoRA put in diffusion_models: answered, flagged as not what that loader takes
    (tmp_path / "diffusion_models" / "oops.safetensors").write_bytes(Path(p["lora"]).read_bytes())
    status, body = routes.file_info("diffusion_models", "oops.safetensors", resolve)
    assert status == 200 and body["kind"] == "lora" and body["expected_kind"] == "mmdit" and body["matches"] is False

    assert routes.file_info("diffusion_models", "nope.safetensors", resolve)[0] == 404


@pytest.mark.parametrize(
    "folder,name",
    [
        ("checkpoints", "x.safetensors"),
        ("../loras", "x.safetensors"),
        ("loras", ""),
        ("loras", "../secret.safetensors"),
        ("loras", "sub/../../secret.safetensors"),
        ("loras", "/etc/passwd"),
        ("loras", "..\\..\\secret.safetensors"),
        ("loras", "C:\\Windows\\win.ini"),
        ("loras", "a\x00b"),
    ],
)
def test_file_info_refuses_unknown_folders_and_paths(routes, folder, name):
    calls = []
    status, body = routes.file_info(folder, name, lambda f, n: calls.append((f, n)))
    assert status == 400 and body["error"]
    assert not calls  # refused before anything touches the disk


def test_file_info_allows_subfolders(routes, tmp_path):
    (tmp_path / "style").mkdir()
    f = tmp_path / "style" / "a.safetensors"
    f.write_bytes(b"x")
    seen = []
    status, _ = routes.file_info(
        "loras", "style/a.safetensors", lambda fo, n: seen.append(n) or str(tmp_path / n), lambda p: {"kind": "lora"}
    )
    assert status == 200 and seen == ["style/a.safetensors"]


def test_comfy_resolve_finds_files_and_release_folders(routes, tmp_path, tiny_model_dir):
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / "FireRed-tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    (tmp_path / "diffusers" / "a-file").write_bytes(b"x")
    folder_paths = types.SimpleNamespace(
        get_folder_paths=lambda f: [str(tmp_path / "elsewhere"), str(tmp_path / f)],
        get_full_path=lambda f, n: f"{f}/{n}",
    )
    assert routes.comfy_resolve(folder_paths, "diffusers", "FireRed-tiny") == str(
        tmp_path / "diffusers" / "FireRed-tiny"
    )
    assert routes.comfy_resolve(folder_paths, "diffusers", "a-file") is None  # loaders take folders there
    assert routes.comfy_resolve(folder_paths, "diffusers", "nope") is None
    assert routes.comfy_resolve(folder_paths, "loras", "x.safetensors") == "loras/x.safetensors"
    routes.clear_cache()
    status, body = routes.file_info("diffusers", "FireRed-tiny", lambda f, n: routes.comfy_resolve(folder_paths, f, n))
    assert status == 200 and body["container"] == "folder" and body["matches"] is True, body


def test_file_info_cache_follows_mtime_and_size(routes, tmp_path):
    routes.clear_cache()
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"12345")
    calls = []

    def describe(path):
        calls.append(path)
        return {"kind": "lora", "size": os.path.getsize(path)}

    def resolve(folder, name):
        return str(f)

    for _ in range(3):
        assert routes.file_info("loras", "a.safetensors", resolve, describe)[0] == 200
    assert len(calls) == 1
    f.write_bytes(b"123456")  # a new version of the file (size changes)
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    status, body = routes.file_info("loras", "a.safetensors", resolve, describe)
    assert status == 200 and body["size"] == 6 and len(calls) == 2


def test_file_info_reports_a_failing_reader_as_500(routes, tmp_path):
    routes.clear_cache()
    f = tmp_path / "b.safetensors"
    f.write_bytes(b"x")

    def boom(path):
        raise RuntimeError("disk on fire")

    status, body = routes.file_info("vae", "b.safetensors", lambda fo, n: str(f), boom)
    assert status == 500 and "disk on fire" in body["error"]


def test_register_outside_comfyui_is_silent(routes, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "server", None)  # `import server` fails as outside ComfyUI
    monkeypatch.setattr(routes, "_registered", False)
    with caplog.at_level(logging.INFO):
        assert routes.register() is False
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_register_adds_the_route_to_promptserver(routes, monkeypatch, comfy_models):
    root, p = comfy_models
    table = {}

    class Routes:
        def get(self, path):
            def deco(fn):
                table[path] = fn
                return fn

            return deco

    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (), {"instance": types.SimpleNamespace(routes=Routes())})
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_full_path = lambda folder, name: (
        str(root / folder / name) if (root / folder / name).exists() else None
    )
    web = types.SimpleNamespace(json_response=lambda body, status=200: (status, body))
    aiohttp = types.ModuleType("aiohttp")
    aiohttp.web = web
    for name, mod in (("server", server), ("folder_paths", folder_paths), ("aiohttp", aiohttp)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(routes, "_registered", False)
    routes.clear_cache()

    assert routes.register() is True
    assert routes.register() is True and list(table) == ["/firered/file_info"]  # registered once
    request = types.SimpleNamespace(rel_url=types.SimpleNamespace(query={"folder": "vae", "name": Path(p["vae"]).name}))
    status, body = asyncio.run(table["/firered/file_info"](request))
    assert status == 200 and body["kind"] == "vae" and body["matches"]
    request.rel_url.query = {"folder": "vae", "name": "../../x"}
    assert asyncio.run(table["/firered/file_info"](request))[0] == 400
