"""The speed & memory settings node: one place for the attention backend, step caching,
compilation and the MM-DiT's memory plan. It sits between the model loader (or LoRA loaders) and
the sampler, and returns the same MM-DiT with these settings (the loaded model is shared)."""

from __future__ import annotations

from dataclasses import replace

from ..firered_core.runtime.attention import CHOICES as ATTENTION_CHOICES
from ..firered_core.runtime.memory import MemoryOptions
from ..firered_core.runtime.speed import SpeedOptions

CATEGORY = "FireRed/loaders"
MEMORY_PLANS = ["off", "auto", "resident", "block_swap", "sequential"]


class FireRedSpeedMemory:
    DESCRIPTION = (
        "Speed and memory for the MM-DiT. Memory: keep all of it on the GPU, or stream its blocks from CPU memory "
        "(block swap) so a 41 GB model runs on a 16-24 GB card; same picture either way. Speed: attention backend, "
        "step cache (skips most of the model on steps that change little; small deviation), torch.compile."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("FIRERED_DIT",)
    RETURN_NAMES = ("dit",)
    OUTPUT_TOOLTIPS = ("The same MM-DiT with these settings, for FireRed Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit": ("FIRERED_DIT", {"tooltip": "The MM-DiT from FireRed Model Loader or LoRA Loader."}),
                "memory_plan": (MEMORY_PLANS, {"default": "auto", "tooltip": "off: as loaded (moved whole to the GPU per run). auto: whole if it fits in 80% of the free memory, else block swap. "
                                               "block_swap: some blocks stay, the rest stream from CPU memory. sequential: every block streams (slowest, least memory)."}),
                "blocks_resident": ("INT", {"default": -1, "min": -1, "max": 200, "tooltip": "Block swap: blocks kept on the GPU (-1 = as many as fit). FireRed has 60."}),
                "budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip": "Plan for this much GPU memory (0 = the free memory now), e.g. 20 to leave room for other models."}),
                "attention": (list(ATTENTION_CHOICES), {"default": "sdpa", "tooltip": "Attention kernel: sdpa (PyTorch, default), flash or sage when installed, auto = the fastest installed."}),
                "cache_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Step cache: skip the later blocks when the first blocks' output changed less than this (relative). 0 = off; 0.05-0.1 mild; 0.15 aggressive."}),
                "cache_warmup": ("INT", {"default": 3, "min": 0, "max": 50, "tooltip": "Step cache: full steps before any skip."}),
                "compile": ("BOOLEAN", {"default": False, "tooltip": "torch.compile the repeated block: faster steps after a one-time warm-up of tens of seconds."}),
                "fp8_matmul": ("BOOLEAN", {"default": False, "tooltip": "Run fp8 weights as fp8 matrix products on Ada / Hopper GPUs (faster; activations rounded to fp8). Elsewhere fp8 weights are expanded layer by layer."}),
            }
        }

    def apply(self, dit, memory_plan="auto", blocks_resident=-1, budget_gb=0.0, attention="sdpa", cache_threshold=0.0, cache_warmup=3,
              compile=False, fp8_matmul=False):
        speed = SpeedOptions(attention=attention, cache_threshold=cache_threshold, cache_warmup=cache_warmup, compile=compile, fp8_matmul=fp8_matmul)
        memory = None
        if memory_plan != "off":
            memory = MemoryOptions(plan=memory_plan, budget_gb=budget_gb or None, blocks_resident=None if blocks_resident < 0 else blocks_resident)
        return (replace(dit, speed=speed, memory=memory),)


NODE_CLASS_MAPPINGS = {"FireRedSpeedMemory": FireRedSpeedMemory}
NODE_DISPLAY_NAME_MAPPINGS = {"FireRedSpeedMemory": "FireRed Speed & Memory"}
