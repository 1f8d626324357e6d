"""The memory plan: where the MM-DiT, the text encoder and the VAE live while an edit runs.

FireRed is a 20B MM-DiT (40.9 GB in bf16, 20.4 GB in fp8) beside a 7B Qwen2.5-VL encoder (16.6 GB in
bf16) and a small VAE. Four plans, from fastest to leanest:

``resident``
    everything on the device, always.
``offload_encoders``
    the MM-DiT stays on the device; the text encoder and the VAE live on the offload device (CPU)
    and visit the device for their stage only. When the encoder does not fit beside the MM-DiT, the
    MM-DiT yields (is moved off) while the instruction is encoded (``transformer_yields``): one
    MM-DiT transfer per edit, far cheaper than streaming blocks at every step.
``block_swap``
    ``blocks_resident`` MM-DiT blocks stay on the device; the others live in pinned CPU memory and
    are copied in one block ahead of use on a side CUDA stream, so the copy of block i+1 overlaps
    the compute of block i (:class:`firered_core.runtime.blockswap.BlockSwapper`). Encoders visit as above. On the CPU the same
    code runs synchronously (that is what the tests exercise).
``sequential``
    the last resort: every MM-DiT block and every text-encoder layer is streamed (none resident);
    the VAE visits, tiled.

:func:`plan_memory` picks the first plan that fits ``free_bytes`` (minus a reserve of
0.5 GiB + 5 %), from estimated stage peaks:

- resident:         DiT + TE + VAE + max(TE act, DiT act, VAE act)
- offload_encoders: DiT + max(TE + TE act, DiT act, VAE + VAE act)     (or, DiT yielding:
                    max(TE + TE act, DiT + DiT act, DiT + VAE + VAE act))
- block_swap(N):    DiT outside blocks + N blocks + max(TE + TE act, (prefetch+1) blocks + DiT act,
                    VAE + VAE act), or with the DiT yielding to the encoder: max(TE + TE act,
                    DiT outside blocks + N blocks + max((prefetch+1) blocks + DiT act, VAE + VAE act));
                    N is the largest that fits (0 <= N < number of blocks), yielding when that
                    keeps more blocks resident
- sequential:       max(TE streamed minimum + TE act, DiT outside blocks + 2 blocks + DiT act,
                    VAE + tiled VAE act)

Activations (estimates, stated so they can be checked): DiT ``14 x tokens x width x bytes`` per
batch row (tokens = target + reference + text; 2 rows with batched CFG); TE 0.5 GiB; VAE
2500 bytes per pixel of the largest picture untiled, 0.25 GiB tiled. VAE tiling is switched on when
the untiled VAE stage would not fit, for pictures over 4 MP, and always in ``sequential``.

The planned table for the real model at 1024x1024 with one 1024x1024 reference and batched CFG
(GB = 1e9 bytes; "yields" = the MM-DiT's resident part leaves the device while the text encoder
runs) -- ``tests/core/test_speed_memory.py`` checks it:

=====  =============================  =============================  =============================
free   DiT bf16 40.9, TE bf16 16.6    DiT fp8 20.4, TE bf16 16.6     DiT fp8 20.4, TE fp8 8.3
=====  =============================  =============================  =============================
80     resident                       resident                       resident
64     offload_encoders               resident                       resident
48     offload_encoders, yields       resident                       resident
40     block_swap 50/60, yields       offload_encoders, yields       resident
32     block_swap 39/60, yields       offload_encoders, yields       offload_encoders
24     block_swap 28/60, yields       block_swap 56/60, yields       block_swap 56/60, yields
16     sequential                     sequential                     block_swap 34/60, yields
12     sequential                     sequential                     block_swap 23/60, yields
8      sequential                     sequential                     sequential
6      too little (ValueError)        too little (ValueError)        sequential
=====  =============================  =============================  =============================
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .blockswap import BlockSwapper, module_bytes, stream_lists

log = logging.getLogger(__name__)

PLANS = ("resident", "offload_encoders", "block_swap", "sequential")
GB = 1_000_000_000
GiB = 1 << 30

DIT_ACT_FACTOR = 14  # live activation bytes per token per width unit per byte of dtype (estimate)
TE_ACT_BYTES = GiB // 2
VAE_BYTES_PER_PIXEL = 2500
VAE_TILED_BYTES = GiB // 4
VAE_TILING_PIXELS = 4_000_000


def reserve_bytes(free_bytes: int) -> int:
    """Headroom kept free: 0.5 GiB + 5 % (allocator fragmentation, kernels' workspaces)."""
    return GiB // 2 + free_bytes // 20


# ---------------------------------------------------------------------------------------------
# sizes and the planner
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of the parts of a loaded model, as the planner needs them.

    transformer: the whole MM-DiT; block: its largest block; blocks: how many blocks;
    text_encoder: the whole encoder; text_encoder_streamed: what the encoder needs on the device
    when its layers are streamed (everything outside the layer lists + 2 layers); vae: the VAE;
    width: the MM-DiT inner width; dtype_bytes: bytes per activation element.
    """

    transformer: int
    block: int
    blocks: int
    text_encoder: int
    text_encoder_streamed: int
    vae: int
    width: int = 3072
    dtype_bytes: int = 2

    @property
    def transformer_outside_blocks(self) -> int:
        return max(self.transformer - self.block * self.blocks, 0)

    @classmethod
    def real(cls, dit_bytes_per_param: float = 2.0, te_bytes_per_param: float = 2.0) -> "ModelSizes":
        """The real FireRed / Qwen-Image-Edit-2509 sizes (parameter census: 20.43B DiT in 60 blocks of
        0.3392B, 8.29B encoder of which 2.27B are outside its 28 decoder layers / 32 vision blocks)."""
        block_params = 0.33917e9
        te_params, te_outside, te_layer = 8.292e9, 2.27e9, 0.2331e9
        return cls(
            transformer=int(20.4304e9 * dit_bytes_per_param),
            block=int(block_params * dit_bytes_per_param),
            blocks=60,
            text_encoder=int(te_params * te_bytes_per_param),
            text_encoder_streamed=int((te_outside + 2 * te_layer) * te_bytes_per_param),
            vae=int(0.127e9 * 2),
        )

    @classmethod
    def of(cls, transformer: nn.Module, text_encoder: nn.Module, vae: nn.Module) -> "ModelSizes":
        blocks = list(transformer.transformer_blocks)
        from ..model.modules import compute_dtype

        dtype = compute_dtype(transformer)
        te_lists = stream_lists(text_encoder)
        te_in_lists = sum(module_bytes(b) for lst in te_lists for b in lst)
        te_layer = max((module_bytes(b) for lst in te_lists for b in lst), default=0)
        te = module_bytes(text_encoder)
        return cls(
            transformer=module_bytes(transformer),
            block=max(module_bytes(b) for b in blocks),
            blocks=len(blocks),
            text_encoder=te,
            text_encoder_streamed=te - te_in_lists + 2 * te_layer,
            vae=module_bytes(vae),
            width=int(transformer.config.num_attention_heads * transformer.config.attention_head_dim),
            dtype_bytes=torch.tensor([], dtype=dtype).element_size(),
        )


@dataclass(frozen=True)
class MemoryPlan:
    """A chosen plan. ``name`` is one of :data:`PLANS`; ``blocks_resident`` (block_swap) how many
    MM-DiT blocks stay on the device; ``transformer_yields``: the MM-DiT leaves the device while the
    text encoder runs; ``vae_tiling``: decode / encode in tiles; ``prefetch``: blocks copied ahead;
    ``peak_bytes``: the estimated device peak; ``reason``: one line saying why."""

    name: str
    blocks_resident: int | None = None
    transformer_yields: bool = False
    vae_tiling: bool = False
    prefetch: int = 1
    peak_bytes: int = 0
    reason: str = ""

    def describe(self) -> str:
        extra = ""
        if self.name == "block_swap":
            extra = f", {self.blocks_resident} blocks resident"
        if self.transformer_yields:
            extra += ", MM-DiT yields to the text encoder"
        if self.vae_tiling:
            extra += ", VAE tiled"
        return f"{self.name}{extra} (est. peak {self.peak_bytes / GB:.1f} GB)"


def dit_tokens(width: int, height: int, refs: int = 1, ref_area: int = 1024 * 1024, text_tokens: int = 256) -> int:
    """Tokens through the MM-DiT: the target's 16x16-pixel patches, each reference's, the text."""
    return (width // 16) * (height // 16) + refs * (ref_area // 256) + text_tokens


def plan_memory(
    free_bytes: int,
    sizes: ModelSizes,
    *,
    width: int = 1024,
    height: int = 1024,
    refs: int = 1,
    ref_area: int = 1024 * 1024,
    cfg_batch: int = 2,
    prefetch: int = 1,
    plan: str = "auto",
    blocks_resident: int | None = None,
    vae_tiling: bool | None = None,
) -> MemoryPlan:
    """Choose a :class:`MemoryPlan` for ``free_bytes`` of device memory (see the module docstring
    for the rule and the table). ``plan`` / ``blocks_resident`` / ``vae_tiling`` force a choice
    (the estimate is still filled in). Raises ``ValueError`` naming the need when nothing fits."""
    if plan not in ("auto",) + PLANS:
        raise ValueError(f"memory plan must be 'auto' or one of {PLANS}, got {plan!r}")
    if free_bytes <= 0:
        raise ValueError(f"free_bytes must be positive, got {free_bytes}")
    budget = free_bytes - reserve_bytes(free_bytes)
    tokens = dit_tokens(width, height, refs, ref_area)
    dit_act = DIT_ACT_FACTOR * tokens * sizes.width * sizes.dtype_bytes * cfg_batch
    pixels = max(width * height, ref_area if refs else 0)
    vae_full = VAE_BYTES_PER_PIXEL * pixels
    tile_big = pixels > VAE_TILING_PIXELS
    dit, te, vae, blk = sizes.transformer, sizes.text_encoder, sizes.vae, sizes.block
    outside = sizes.transformer_outside_blocks

    def vae_act(tiled: bool) -> int:
        return VAE_TILED_BYTES if tiled else vae_full

    def peaks(tiled: bool) -> dict[str, Any]:
        va = vae_act(tiled)
        stay_room = budget - outside - max(te + TE_ACT_BYTES, (prefetch + 1) * blk + dit_act, vae + va)
        yield_room = budget - outside - max((prefetch + 1) * blk + dit_act, vae + va)
        n_stay = min(max(stay_room // blk, -1), sizes.blocks - 1) if blk else -1
        n_yield = min(max(yield_room // blk, -1), sizes.blocks - 1) if blk and te + TE_ACT_BYTES <= budget else -1
        return {
            "resident": dit + te + vae + max(TE_ACT_BYTES, dit_act, va),
            "offload_encoders": dit + max(te + TE_ACT_BYTES, dit_act, vae + va),
            "offload_yield": max(te + TE_ACT_BYTES, dit + dit_act, dit + vae + va),
            "block_swap_n": int(max(n_stay, n_yield)),
            "block_swap_yields": bool(n_yield > n_stay),
            "sequential": max(
                sizes.text_encoder_streamed + TE_ACT_BYTES, outside + 2 * blk + dit_act, vae + VAE_TILED_BYTES
            ),
        }

    def swap_peak(n: int, tiled: bool, yields: bool = False) -> int:
        if yields:
            return max(te + TE_ACT_BYTES, outside + n * blk + max((prefetch + 1) * blk + dit_act, vae + vae_act(tiled)))
        return outside + n * blk + max(te + TE_ACT_BYTES, (prefetch + 1) * blk + dit_act, vae + vae_act(tiled))

    def choose(tiled: bool) -> MemoryPlan | None:
        p = peaks(tiled)
        if p["resident"] <= budget:
            return MemoryPlan("resident", vae_tiling=tiled, prefetch=prefetch, peak_bytes=p["resident"])
        if p["offload_encoders"] <= budget:
            return MemoryPlan("offload_encoders", vae_tiling=tiled, prefetch=prefetch, peak_bytes=p["offload_encoders"])
        if p["offload_yield"] <= budget:
            return MemoryPlan("offload_encoders", transformer_yields=True, vae_tiling=tiled, prefetch=prefetch,
                              peak_bytes=p["offload_yield"])
        if p["block_swap_n"] >= 0:
            n, y = p["block_swap_n"], p["block_swap_yields"]
            return MemoryPlan("block_swap", blocks_resident=n, transformer_yields=y, vae_tiling=tiled,
                              prefetch=prefetch, peak_bytes=swap_peak(n, tiled, y))
        return None

    if plan == "auto":
        chosen = None if tile_big or vae_tiling else choose(False)
        if chosen is None and vae_tiling is not False:
            chosen = choose(True)
        if chosen is None:
            seq = peaks(True)["sequential"]
            if seq > budget:
                raise ValueError(
                    f"not enough device memory: {free_bytes / GB:.1f} GB free, but even the sequential plan needs "
                    f"about {(seq + reserve_bytes(free_bytes)) / GB:.1f} GB at {width}x{height}; use a smaller picture "
                    "or a smaller (fp8 / GGUF) model file"
                )
            chosen = MemoryPlan("sequential", blocks_resident=0, vae_tiling=True, prefetch=prefetch, peak_bytes=seq)
        if blocks_resident is not None and chosen.name == "block_swap":
            chosen = replace(chosen, blocks_resident=blocks_resident,
                             peak_bytes=swap_peak(blocks_resident, chosen.vae_tiling, chosen.transformer_yields))
        return replace(chosen, reason=f"auto: {free_bytes / GB:.1f} GB free, {tokens} tokens at {width}x{height}")

    tiled = bool(vae_tiling) if vae_tiling is not None else (tile_big or plan == "sequential")
    p = peaks(tiled)
    if plan == "block_swap":
        n = blocks_resident if blocks_resident is not None else max(p["block_swap_n"], 0)
        if not 0 <= n <= sizes.blocks:
            raise ValueError(f"blocks_resident must be between 0 and {sizes.blocks}, got {n}")
        y = swap_peak(n, tiled) > budget >= swap_peak(n, tiled, True)
        return MemoryPlan("block_swap", blocks_resident=n, transformer_yields=y, vae_tiling=tiled, prefetch=prefetch,
                          peak_bytes=swap_peak(n, tiled, y), reason="set by the user")
    if plan == "sequential":
        return MemoryPlan("sequential", blocks_resident=0, vae_tiling=tiled, prefetch=prefetch,
                          peak_bytes=p["sequential"], reason="set by the user")
    if plan == "offload_encoders":
        yields = p["offload_encoders"] > budget and p["offload_yield"] <= budget
        return MemoryPlan("offload_encoders", transformer_yields=yields, vae_tiling=tiled, prefetch=prefetch,
                          peak_bytes=p["offload_yield" if yields else "offload_encoders"], reason="set by the user")
    return MemoryPlan("resident", vae_tiling=tiled, prefetch=prefetch, peak_bytes=p["resident"], reason="set by the user")


# ---------------------------------------------------------------------------------------------
# options (the user-facing knob)
# ---------------------------------------------------------------------------------------------


@dataclass
class MemoryOptions:
    """How the editor uses device memory.

    plan: ``"auto"`` (chosen from the free device memory by :func:`plan_memory`) or one of
        :data:`PLANS`. budget_gb: plan for this many GB instead of the free memory (e.g. 24 to
        behave like a 24 GB card). blocks_resident: MM-DiT blocks kept on the device under
        ``block_swap`` (None = as many as fit). vae_tiling: None = automatic (large pictures,
        tight memory), True / False to force. offload_device: where offloaded weights live.
        prefetch: blocks copied ahead under block swap. pin_memory: page-lock the CPU copies of
        streamed blocks (faster, overlappable copies; CUDA only).
    """

    plan: str = "auto"
    budget_gb: float | None = None
    blocks_resident: int | None = None
    vae_tiling: bool | None = None
    offload_device: str = "cpu"
    prefetch: int = 1
    pin_memory: bool = True

    def __post_init__(self) -> None:
        if self.plan not in ("auto",) + PLANS:
            raise ValueError(f"MemoryOptions.plan must be 'auto' or one of {PLANS}, got {self.plan!r}")
        if self.blocks_resident is not None and self.blocks_resident < 0:
            raise ValueError(f"MemoryOptions.blocks_resident must be >= 0, got {self.blocks_resident}")
        if self.prefetch < 1:
            raise ValueError(f"MemoryOptions.prefetch must be >= 1, got {self.prefetch}")
        if self.budget_gb is not None and self.budget_gb <= 0:
            raise ValueError(f"MemoryOptions.budget_gb must be positive, got {self.budget_gb}")


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (what the caching allocator holds but does not use counts as
    free); ``None`` for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + reserved)


# ---------------------------------------------------------------------------------------------
# placing the parts of an editor according to a plan
# ---------------------------------------------------------------------------------------------


class MemoryManager:
    """Places a model's parts per a :class:`MemoryPlan` and moves them around each stage.

    ``stage("text_encoder" | "vae" | "transformer")`` is a context manager the editor wraps each
    stage in: visiting parts come onto the device for the stage and leave after it.
    ``offload()`` moves everything to the offload device (e.g. when a ComfyUI node finishes);
    ``to_device()`` puts the plan back in place.
    """

    def __init__(self, components, plan: MemoryPlan, device, options: MemoryOptions | None = None):
        self.c = components
        self.plan = plan
        self.device = torch.device(device)
        self.options = options or MemoryOptions()
        self.offload_device = torch.device(self.options.offload_device)
        self.swappers: dict[str, BlockSwapper] = {}
        self.applied = False

    # parts that visit the device for their stage only
    def _visits(self, part: str) -> bool:
        if self.plan.name == "resident":
            return False
        if part == "vae":
            return True
        if part == "text_encoder":
            return self.plan.name != "sequential"
        return False

    def apply(self) -> None:
        tr, te, vae = self.c.transformer, self.c.text_encoder, self.c.vae
        name = self.plan.name
        if self.plan.vae_tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        elif hasattr(vae, "disable_tiling") and getattr(vae, "use_tiling", False):
            vae.disable_tiling()
        if name in ("block_swap", "sequential"):
            if "transformer" not in self.swappers:
                self.swappers["transformer"] = BlockSwapper(
                    tr, resident=self.plan.blocks_resident or 0, device=self.device, offload_device=self.offload_device,
                    prefetch=self.plan.prefetch, pin_memory=self.options.pin_memory).install()
            else:
                self.swappers["transformer"].to_device()
        else:
            tr.to(self.device)
        if name == "sequential":
            if "text_encoder" not in self.swappers:
                self.swappers["text_encoder"] = BlockSwapper(
                    te, resident=0, device=self.device, offload_device=self.offload_device,
                    prefetch=self.plan.prefetch, pin_memory=self.options.pin_memory).install()
            else:
                self.swappers["text_encoder"].to_device()
        else:
            te.to(self.offload_device if self._visits("text_encoder") else self.device)
        vae.to(self.offload_device if self._visits("vae") else self.device)
        self.applied = True

    def remove(self) -> None:
        """Undo the plan: no hooks; every part back on the device as one piece (resident)."""
        for s in self.swappers.values():
            s.uninstall(self.device)
        self.swappers.clear()
        for m in (self.c.transformer, self.c.text_encoder, self.c.vae):
            m.to(self.device)
        if getattr(self.c.vae, "use_tiling", False):
            self.c.vae.disable_tiling()
        self.applied = False

    @contextlib.contextmanager
    def stage(self, part: str):
        if not self.applied:
            self.apply()
        module = getattr(self.c, part)
        yields = part == "text_encoder" and self.plan.transformer_yields
        swapper = self.swappers.get("transformer")
        if yields:
            swapper.offload() if swapper is not None else self.c.transformer.to(self.offload_device)
            _empty_cache(self.device)
        visiting = self._visits(part)
        if visiting:
            module.to(self.device)
        try:
            yield module
        finally:
            if visiting:
                module.to(self.offload_device)
                _empty_cache(self.device)
            if yields:
                swapper.to_device() if swapper is not None else self.c.transformer.to(self.device)

    def offload(self) -> None:
        for key in ("transformer", "text_encoder", "vae"):
            if key in self.swappers:
                self.swappers[key].offload()
            else:
                getattr(self.c, key).to(self.offload_device)
        _empty_cache(self.device)
        self.applied = False

    def to_device(self) -> None:
        self.apply()


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
