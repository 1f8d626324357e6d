"""LoRA files of the pack and of the trainer map onto ComfyUI's own LoRA keys for Qwen-Image
(``COMFYUI_PATH`` tier; skipped when it is unset).

A native Qwen-Image model is loaded by ComfyUI itself (``comfy.sd.load_diffusion_model`` on the
full-width 1-block test file), ``comfy.lora.model_lora_keys_unet`` gives ComfyUI's key map, and
``comfy.lora.load_lora`` maps each LoRA file through it: every LoRA key must be consumed (ComfyUI logs
``lora key not loaded`` otherwise), and every mapped module must exist in the loaded model
(``ModelPatcher.add_patches``). This runs in a child process with ``$COMFYUI_PYTHON``, so pytest's
own interpreter needs no ComfyUI.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from comfy_server import comfyui_path, comfyui_python
from tier_files import NATIVE_DIT, cached, write_native_dit

pytestmark = pytest.mark.comfyui

PROBE = r"""
import json, logging, sys
comfy_dir, dit_path, lora_paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, comfy_dir)
from comfy.cli_args import args
args.cpu = True
import comfy.lora, comfy.sd, comfy.utils

class Catch(logging.Handler):
    def __init__(self):
        super().__init__(); self.lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())

catch = Catch(); logging.getLogger().addHandler(catch); logging.getLogger().setLevel(logging.INFO)
model = comfy.sd.load_diffusion_model(dit_path)
key_map = comfy.lora.model_lora_keys_unet(model.model, {})
out = {"model": type(model.model).__name__, "key_map_size": len(key_map)}
for name, path in lora_paths.items():
    catch.lines.clear()
    sd = comfy.utils.load_torch_file(path)
    patches = comfy.lora.load_lora(sd, key_map)
    added = model.clone().add_patches(patches, 1.0)
    out[name] = {
        "lora_keys": len(sd), "patches": len(patches), "added": len(added),
        "not_loaded": [l for l in catch.lines if "not loaded" in l.lower()],
        "targets": sorted(str(k) for k in patches),
    }
print("PROBE-RESULT " + json.dumps(out))
"""

TINY = dict(
    num_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6), joint_attention_dim=32
)


def _modules(sd_keys, prefix: str) -> set[str]:
    mods = set()
    for k in sd_keys:
        m = re.match(rf"{re.escape(prefix)}(.+?)\.(lora_A|lora_B|lora_up|lora_down|alpha)", k)
        if m:
            mods.add(m.group(1))
    return mods


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """name -> (path, module names, key prefix): the trainer's two formats (when firered_trainer/lora.py is
    there) over every target preset, and the pack's test LoRA (``make_tiny_comfyui``)."""
    import torch
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("loras")
    files = {}
    try:
        from firered_trainer import lora as tl
        from firered_trainer.config import LORA_PRESETS
    except ImportError as e:
        tl = None
        print(f"trainer LoRA writer not importable ({e}); checking the pack's LoRA only")
    if tl is not None:
        from diffusers import QwenImageTransformer2DModel

        torch.manual_seed(0)
        tr = QwenImageTransformer2DModel(**TINY)
        modules = sorted({m for preset in LORA_PRESETS.values() for m in preset})
        tl.add_lora(tr, rank=4, alpha=4.0, modules=modules)
        for _, p in tr.named_parameters():
            if p.requires_grad:  # PEFT zero-initialises lora_B: make the adapters non-trivial
                p.data.normal_(0, 0.1)
        paths = tl.save_lora(tr, root / "trainer_comfyui.safetensors", root / "trainer_diffusers.safetensors",
                             rank=4, alpha=4.0, modules=modules)  # fmt: skip
        files["trainer_comfyui"] = (str(paths["comfyui"]), "diffusion_model.")
        files["trainer_diffusers"] = (str(paths["diffusers"]), "transformer.")
    from firered_core.tiny import make_tiny_comfyui

    made = make_tiny_comfyui(root / "models", num_layers=1)
    files["pack_tiny_lora"] = (str(made["lora"]), "diffusion_model.")
    out = {name: (path, _modules(load_file(path).keys(), prefix)) for name, (path, prefix) in files.items()}
    # a negative control: PEFT's in-memory names, which ComfyUI does not map
    from safetensors.torch import save_file

    ctrl = root / "control_peft_names.safetensors"
    name = "base_model.model.transformer_blocks.0.attn.to_q"
    save_file({f"{name}.lora_A.weight": torch.zeros(4, 3072), f"{name}.lora_B.weight": torch.zeros(3072, 4)}, str(ctrl))
    out["control_peft_names"] = (str(ctrl), None)
    return out


def test_lora_keys_map_onto_comfyui_qwen_image(lora_files):
    if comfyui_path() is None:
        pytest.skip("COMFYUI_PATH is not set (the real-ComfyUI tier)")
    dit = cached(NATIVE_DIT, write_native_dit)
    proc = subprocess.run(
        [comfyui_python(), "-c", PROBE, str(comfyui_path()), str(dit), json.dumps({k: v[0] for k, v in lora_files.items()})],
        capture_output=True, text=True, timeout=600, cwd=str(comfyui_path()),
    )  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE-RESULT ")), None)
    assert line, f"probe failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    out = json.loads(line[len("PROBE-RESULT ") :])
    assert out["model"] == "QwenImage", out["model"]
    ctrl = out["control_peft_names"]
    assert ctrl["patches"] == 0 and len(ctrl["not_loaded"]) == 2, ctrl  # the check can fail
    for name, (_, modules) in lora_files.items():
        if modules is None:
            continue
        r = out[name]
        print(f"{name}: {r['lora_keys']} keys, {len(modules)} modules -> {r['patches']} ComfyUI patches")
        assert not r["not_loaded"], f"{name}: ComfyUI did not map {r['not_loaded'][:10]}"
        assert r["patches"] == len(modules) == r["added"], (name, r["patches"], len(modules), r["added"])
        targets = {t.removeprefix("diffusion_model.").removesuffix(".weight") for t in r["targets"]}
        assert targets == modules, (name, sorted(targets ^ modules)[:10])
    if "trainer_comfyui" in lora_files:
        assert out["trainer_comfyui"]["targets"] == out["trainer_diffusers"]["targets"]
