"""The node classes, called the way ComfyUI calls them, on the tiny model in ComfyUI's file layouts.

No ComfyUI here: the pack's host adapter falls back to ``$FIRERED_MODELS_DIR`` for model folders and
to :func:`host.request_interrupt` for Cancel.
"""

import inspect

import numpy as np
import pytest
import torch

from tests.conftest import make_picture

CORE_NODES = {
    "FireRedModelLoader", "FireRedTextEncoderLoader", "FireRedVAELoader", "FireRedDiffusersLoader", "FireRedLoraLoader",
    "FireRedEditEncode", "FireRedSampler", "FireRedDecode", "FireRedEdit", "FireRedCompare",
    "FireRedConsistencyGuidance", "FireRedAutoMask", "FireRedComposite",
}
W, H = 64, 48
SMALL = {"ref_mode": "own_aspect", "ref_size": 256, "vl_size": 128}


def image(seed=0, w=W, h=H):
    return torch.from_numpy(np.asarray(make_picture(w, h, seed), dtype=np.float32) / 255.0)[None]


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def sample_kwargs(**over):
    kw = dict(seed=7, steps=3, cfg=4.0, sampler="euler", schedule="flowmatch", shift=0.0, width=W, height=H, denoise=1.0, batch_size=1)
    kw.update(over)
    return kw


# -- definitions -----------------------------------------------------------------------------------


def test_pack_registers_every_node_with_a_display_name(pack):
    assert CORE_NODES <= set(pack.NODE_CLASS_MAPPINGS)
    assert set(pack.NODE_CLASS_MAPPINGS) <= set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    from importlib import import_module

    nodes_pkg = import_module(pack.__name__ + ".nodes")
    assert not {k: v for k, v in nodes_pkg.DISABLED.items() if k in ("loaders", "edit", "consistency")}


def _specs(pack):
    for name, cls in sorted(pack.NODE_CLASS_MAPPINGS.items()):
        yield name, cls


def test_every_node_definition_is_well_formed(pack, models_env):
    problems = []
    for name, cls in _specs(pack):
        if not name.startswith("FireRed"):
            problems.append(f"{name}: id not prefixed FireRed")
        if not str(getattr(cls, "CATEGORY", "")).startswith("FireRed"):
            problems.append(f"{name}: category {getattr(cls, 'CATEGORY', None)!r}")
        spec = cls.INPUT_TYPES()
        if set(spec) - {"required", "optional", "hidden"}:
            problems.append(f"{name}: unknown sections {set(spec)}")
        fn = getattr(cls, cls.FUNCTION, None)
        if fn is None:
            problems.append(f"{name}: FUNCTION {cls.FUNCTION!r} missing")
            continue
        params = inspect.signature(fn).parameters
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
        for section in ("required", "optional"):
            for inp, s in spec.get(section, {}).items():
                if not isinstance(s, tuple) or len(s) not in (1, 2):
                    problems.append(f"{name}.{inp}: spec {s!r}")
                    continue
                typ, opts = s[0], (s[1] if len(s) == 2 else {})
                if not (isinstance(typ, str) or (isinstance(typ, list) and all(isinstance(v, str) for v in typ))):
                    problems.append(f"{name}.{inp}: type {typ!r}")
                if not opts.get("tooltip"):
                    problems.append(f"{name}.{inp}: no tooltip")
                if isinstance(typ, list) and "default" in opts and opts["default"] not in typ:
                    problems.append(f"{name}.{inp}: default {opts['default']!r} not a choice")
                if typ in ("INT", "FLOAT") and not (opts.get("min", -np.inf) <= opts.get("default", 0) <= opts.get("max", np.inf)):
                    problems.append(f"{name}.{inp}: default outside min/max")
                if inp not in params and not takes_kwargs:
                    problems.append(f"{name}.{inp}: not a parameter of {cls.FUNCTION}")
        for inp in spec.get("hidden", {}):
            if inp not in params and not takes_kwargs:
                problems.append(f"{name}.{inp}: hidden input not a parameter")
        rt = cls.RETURN_TYPES
        if not isinstance(rt, tuple):
            problems.append(f"{name}: RETURN_TYPES is not a tuple")
        for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
            if hasattr(cls, attr) and len(getattr(cls, attr)) != len(rt):
                problems.append(f"{name}: {attr} length differs from RETURN_TYPES")
        if not getattr(cls, "DESCRIPTION", ""):
            problems.append(f"{name}: no DESCRIPTION")
    assert not problems, "\n".join(problems)


def test_loaders_list_every_file_users_hold(pack, models_env):
    root, files = models_env
    choices = pack.NODE_CLASS_MAPPINGS["FireRedModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert {files[k].name for k in ("transformer", "transformer_fp8", "transformer_gguf")} <= set(choices)
    te = pack.NODE_CLASS_MAPPINGS["FireRedTextEncoderLoader"].INPUT_TYPES()["required"]["text_encoder_name"][0]
    assert files["text_encoder"].name in te and "qwen_2.5_vl_7b_fp8_scaled.safetensors" in te  # + the workflows' name
    folders = pack.NODE_CLASS_MAPPINGS["FireRedDiffusersLoader"].INPUT_TYPES()["required"]["folder_name"][0]
    assert folders == ["FireRed-Image-Edit-1.1", "FireRed-tiny"]  # the recaption workflow's folder + the fixture's


def test_loader_fingerprint_changes_when_the_file_changes(pack, models_env, tmp_path, monkeypatch):
    root, files = models_env  # (monkeypatch restores the module's models folder afterwards)
    (tmp_path / "loras").mkdir()
    f = tmp_path / "loras" / "x.safetensors"
    f.write_bytes(files["lora"].read_bytes())
    monkeypatch.setenv("FIRERED_MODELS_DIR", str(tmp_path))
    cls = pack.NODE_CLASS_MAPPINGS["FireRedLoraLoader"]
    a = cls.IS_CHANGED(lora_name="x.safetensors", strength=1.0)
    assert a == cls.IS_CHANGED(lora_name="x.safetensors", strength=1.0)
    f.write_bytes(files["lora"].read_bytes() + b" ")
    assert cls.IS_CHANGED(lora_name="x.safetensors", strength=1.0) != a


# -- running the nodes -------------------------------------------------------------------------------


def test_edit_graph_returns_comfyui_layouts(pack, loaded):
    dit, te, vae = loaded
    cond = node(pack, "FireRedEditEncode").encode(te, vae, "make the disc red", " ", image1=image(), **SMALL)[0]
    latent, mask = node(pack, "FireRedSampler").sample(dit, cond, **sample_kwargs())
    s = latent["samples"]
    assert s.shape == (1, 16, 1, H // 8, W // 8) and s.dtype == torch.float32 and s.device.type == "cpu"
    assert mask.shape == (1, H, W) and torch.all(mask == 1)  # no guidance: everything may change
    img = node(pack, "FireRedDecode").decode(vae, latent)[0]
    assert img.shape == (1, H, W, 3) and img.dtype == torch.float32 and img.device.type == "cpu"
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0

    # the one-node edit is the same computation
    one = node(pack, "FireRedEdit")
    kw = {k: v for k, v in sample_kwargs().items() if k not in ("denoise", "batch_size")}
    img1, lat1 = one.edit(dit, te, vae, "make the disc red", " ", image1=image(), **kw, **SMALL)
    assert torch.equal(lat1["samples"], s) and torch.equal(img1, img)


def test_sampler_node_matches_the_core_editor(pack, loaded, models_env):
    """Same files, seed and settings: the node graph and FireRedEditor.edit give the same picture."""
    from firered_core import FireRedEditor

    dit, te, vae = loaded
    _, files = models_env
    cond = node(pack, "FireRedEditEncode").encode(te, vae, "add a hat", " ", image1=image(3), **SMALL)[0]
    latent, _ = node(pack, "FireRedSampler").sample(dit, cond, **sample_kwargs(seed=11))
    img = node(pack, "FireRedDecode").decode(vae, latent)[0]
    editor = FireRedEditor.from_files(
        None, transformer=files["transformer"], text_encoder=files["text_encoder"], vae=files["vae"],
        tokenizer=files["tokenizer"], dtype="fp32",
    )
    ref = editor.edit(image(3), "add a hat", steps=3, cfg=4.0, seed=11, width=W, height=H, ref_area=256 * 256, vl_area=128 * 128)
    # the graph hands the latent over raw (de-normalised) and the decoder normalises it again:
    # float32 rounding only (measured max 6e-8 in 0..1 pixels)
    assert (img - ref.pixels).abs().max().item() < 1e-5


def test_batch_latent_input_and_denoise(pack, loaded):
    dit, te, vae = loaded
    cond = node(pack, "FireRedEditEncode").encode(te, vae, "make it blue", " ", image1=image(1), **SMALL)[0]
    sampler = node(pack, "FireRedSampler")
    one = sampler.sample(dit, cond, **sample_kwargs())[0]["samples"]
    two = sampler.sample(dit, cond, **sample_kwargs(batch_size=2))[0]["samples"]
    assert two.shape[0] == 2 and torch.equal(two[:1], one) and not torch.equal(two[0], two[1])

    from firered_core import parts

    src = {"samples": parts.encode_picture(vae, image(1))}  # what VAEEncode gives: raw [1, 16, 1, h, w]
    assert src["samples"].shape == one.shape
    full = sampler.sample(dit, cond, **sample_kwargs(width=0, height=0), latent=src)[0]["samples"]
    assert torch.equal(full, one)  # denoise 1: the latent sets the size only
    half = sampler.sample(dit, cond, **sample_kwargs(width=0, height=0, denoise=0.5, steps=4), latent=src)[0]["samples"]
    d = lambda a: (a - src["samples"]).pow(2).mean().item()  # noqa: E731
    assert d(half) < 0.5 * d(full)  # starting from the picture keeps much more of it


def test_lora_loader_stacks_without_touching_the_loaded_model(pack, loaded, models_env):
    dit, te, vae = loaded
    _, files = models_env
    cond = node(pack, "FireRedEditEncode").encode(te, vae, "x", " ", image1=image(), **SMALL)[0]
    lora = node(pack, "FireRedLoraLoader")
    with_lora = lora.apply(dit, files["lora"].name, 1.0)[0]
    stacked = lora.apply(with_lora, files["lora"].name, -1.0)[0]
    assert dit.loras == () and len(stacked.loras) == 2
    s = node(pack, "FireRedSampler")
    base = s.sample(dit, cond, **sample_kwargs(cfg=1.0))[0]["samples"]
    lo = s.sample(with_lora, cond, **sample_kwargs(cfg=1.0))[0]["samples"]
    assert (lo - base).abs().max() > 1e-3
    again = s.sample(dit, cond, **sample_kwargs(cfg=1.0))[0]["samples"]
    assert torch.equal(again, base)  # the branch without the LoRA is unaffected


def test_cancel_stops_within_one_step_and_leaves_nothing_resident(pack, loaded):
    import importlib

    host = importlib.import_module(pack.__name__ + ".nodes.host")
    dit, te, vae = loaded
    cond = node(pack, "FireRedEditEncode").encode(te, vae, "x", " ", image1=image(), **SMALL)[0]
    calls = []

    def count(*_):
        calls.append(1)
        if len(calls) == 2:
            host.request_interrupt()

    h = dit.transformer.register_forward_hook(count)
    try:
        with pytest.raises(host.InterruptedByUser):
            node(pack, "FireRedSampler").sample(dit, cond, **sample_kwargs(cfg=1.0, steps=10))
    finally:
        h.remove()
        host.request_interrupt(False)
    assert len(calls) == 2  # cfg 1: one forward per step; stopped right after the step that asked
    assert dit.transformer not in host.resident_models()

    kept = type(dit)(dit.transformer, dit.scheduler_config, dit.source, keep_loaded=True)
    node(pack, "FireRedSampler").sample(kept, cond, **sample_kwargs(cfg=1.0, steps=1))
    assert dit.transformer in host.resident_models()
    with host.on_device(dit):  # a later node that does not keep it hands it back
        pass
    assert dit.transformer not in host.resident_models()


def test_compare_writes_both_pictures_for_the_widget(pack):
    out = node(pack, "FireRedCompare").compare(image(0), torch.cat([image(1, 32, 24), image(2, 32, 24)]))
    entries = out["ui"]["firered_compare"]
    assert len(entries) == 2 and out["result"] == ()
    import importlib

    from PIL import Image

    host = importlib.import_module(pack.__name__ + ".nodes.host")
    for e in entries:
        for role in ("before", "after"):
            f = host.temp_dir() / e[role]["filename"]
            assert e[role]["type"] == "temp" and Image.open(f).size == (W, H)


def test_bad_inputs_get_clear_errors(pack, loaded, models_env):
    dit, te, vae = loaded
    with pytest.raises(FileNotFoundError, match="diffusion_models/nope.safetensors"):
        node(pack, "FireRedModelLoader").load("nope.safetensors", "auto", "fp32", False)
    enc = node(pack, "FireRedEditEncode")
    with pytest.raises(ValueError, match="1-3 input pictures"):
        enc.encode(te, vae, "x", " ", image1=torch.cat([image()] * 4), **SMALL)
    cond = enc.encode(te, vae, "x", " ", image1=image(), **SMALL)[0]
    s = node(pack, "FireRedSampler")
    with pytest.raises(ValueError, match="width and height"):
        s.sample(dit, cond, **sample_kwargs(height=0))
    with pytest.raises(ValueError, match="16-channel"):
        s.sample(dit, cond, **sample_kwargs(width=0, height=0), latent={"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="multiple of 16"):
        s.sample(dit, cond, **sample_kwargs(width=72, height=48))


def test_diffusers_folder_loader_and_fp8_gguf_files(pack, models_env):
    root, files = models_env
    dit, te, vae = node(pack, "FireRedDiffusersLoader").load("FireRed-tiny", "auto", "fp32", False)
    cond = node(pack, "FireRedEditEncode").encode(te, vae, "x", " ", image1=image(), **SMALL)[0]
    base = node(pack, "FireRedSampler").sample(dit, cond, **sample_kwargs(cfg=1.0, steps=2))[0]["samples"]
    for key, weights in (("transformer_fp8", "auto"), ("transformer_gguf", "auto"), ("transformer", "int8"), ("transformer", "fp8_scaled")):
        q = node(pack, "FireRedModelLoader").load(files[key].name, weights, "fp32", False)[0]
        out = node(pack, "FireRedSampler").sample(q, cond, **sample_kwargs(cfg=1.0, steps=2))[0]["samples"]
        rel = ((out - base).norm() / base.norm()).item()
        assert 0 < rel < 0.05, (key, weights, rel)  # quantized weights: close to, not equal to, the full-precision run
