"""Run inside a ComfyUI environment (``python comfy_lora_check.py COMFYUI_PATH SHAPES.json LORA STRENGTH``):
map a LoRA file through ComfyUI's own ``model_lora_keys_unet`` / ``load_lora`` / ``calculate_weight``
against a model whose state dict has the given ``diffusion_model.*.weight`` shapes (zeros), and
print each patched weight -- i.e. the update ComfyUI's LoraLoaderModelOnly would add -- as JSON."""

import json
import sys

import torch

sys.path.insert(0, sys.argv[1])
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # ComfyUI's own --cpu: no GPU needed to map keys
import comfy.lora  # noqa: E402
import comfy.lora_convert  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

shapes = json.load(open(sys.argv[2]))


class Model:
    """What model_lora_keys_unet reads: the state dict keys and a (non-SD) unet config."""

    model_config = type("Config", (), {"unet_config": {"image_model": "qwen_image"}})()

    def state_dict(self):
        return {k: torch.zeros(s) for k, s in shapes.items()}


key_map = comfy.lora.model_lora_keys_unet(Model(), {})
patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(load_file(sys.argv[3])), key_map)
strength = float(sys.argv[4])
out = {k: comfy.lora.calculate_weight([(strength, p, 1.0, None, None)], torch.zeros(shapes[k]), k).tolist()
       for k, p in patches.items()}
print(json.dumps(out))
