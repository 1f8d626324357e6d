"""How LoRA files name their tensors: the role suffixes (down / up / alpha / LyCORIS factors ...),
the prefixes of every trainer's layout, the adapter kinds recognised but not applied, and the model
a LoRA that matches nothing was made for. Pure tables and string functions (:mod:`.lora` reads files
with them, :mod:`.inspect` describes files with them)."""

from __future__ import annotations

from typing import Mapping

# suffix -> role; the longest suffix that matches wins
SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_A.default.weight": "down",
    ".lora_down.weight": "down",
    ".lora.down.weight": "down",
    "_lora.down.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.default.weight": "up",
    ".lora_up.weight": "up",
    ".lora.up.weight": "up",
    "_lora.up.weight": "up",
    ".lora_A": "down",
    ".lora_B": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_mid.weight": "mid",
    ".lora_B.bias": "up_bias",
    ".lora_up.bias": "up_bias",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    ".diff": "diff",
    ".diff_b": "diff_b",
}
# LyCORIS LoHa / LoKr factors (the role is the suffix without its dot)
for _k in (
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
):
    SUFFIXES["." + _k] = _k
# recognised adapter kinds this loader does not apply, by the last component of a key
UNSUPPORTED_NAMES: dict[str, str] = {}
UNSUPPORTED_STARTS = {
    "hada_t": "LyCORIS LoHa with CP tensors (hada_t1/t2)",
    "lokr_t": "LyCORIS LoKr with a CP tensor (lokr_t2)",
    "oft_": "OFT",
    "boft_": "BOFT",
}


def unsupported_kind(key: str) -> str | None:
    last = key.rpartition(".")[2]
    return UNSUPPORTED_NAMES.get(last) or next((v for k, v in UNSUPPORTED_STARTS.items() if last.startswith(k)), None)


PREFIXES = (
    "base_model.model.",
    "transformer.",
    "model.diffusion_model.",
    "diffusion_model.",
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
    "unet.",
)
FORMAT_NAMES = {
    "transformer.": "diffusers/PEFT ('transformer.' prefix)",
    "base_model.model.": "PEFT ('base_model.model.' prefix)",
    "": "bare PEFT / diffusers names",
    "model.diffusion_model.": "ComfyUI ('model.diffusion_model.' prefix)",
    "diffusion_model.": "ComfyUI ('diffusion_model.' prefix)",
    "lora_unet_": "kohya ('lora_unet_' underscored names)",
    "lora_transformer_": "kohya ('lora_transformer_' underscored names)",
    "lycoris_": "SimpleTuner LyCORIS ('lycoris_' underscored names)",
    "unet.": "'unet.' prefix",
}


def split_suffix(key: str) -> tuple[str, str] | None:
    best = None
    for suf, role in SUFFIXES.items():
        if key.endswith(suf) and (best is None or len(suf) > len(best[0])):
            best = (suf, role)
    if best is None:
        return None
    return key[: -len(best[0])], best[1]


def resolve(base: str, lookup: Mapping[str, str]) -> tuple[str, str] | None:
    """(module name, prefix stripped) for a LoRA base name, trying every prefix combination."""
    todo = [(base, "")]
    seen = set()
    while todo:
        name, pre = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if name in lookup:
            return lookup[name], pre
        for p in PREFIXES:
            if name.startswith(p):
                todo.append((name[len(p) :], pre or p))
    return None


OTHER_MODELS = (  # patterns in a LoRA's layer names (separators ignored) -> the model it was made for
    (("double.blocks", "single.blocks", "single.transformer.blocks"), "a Flux-style model"),
    (("joint.blocks",), "SD3 / SD3.5"),
    (("input.blocks", "output.blocks", "down.blocks", "up.blocks", "mid.block"), "a Stable Diffusion / SDXL UNet"),
    (("te1.", "te2.", "text.model.encoder", "text.encoder"), "a text encoder"),
    (("blocks.0.self.attn", "blocks.0.cross.attn"), "a Wan-style video model"),
)


def target_guess(keys) -> str:
    """What model a LoRA that matched nothing was made for, in words."""
    keys = list(keys)
    if not keys:
        return "no tensors"
    flat = " ".join(keys).replace("_", ".")
    for patterns, name in OTHER_MODELS:
        if any(p in flat for p in patterns):
            return f"a LoRA for {name}"
    if any(split_suffix(k) for k in keys):
        return "LoRA tensors whose layer names are not this model's"
    return "no LoRA tensors (lora_A/lora_B, lora_down/lora_up, hada_*, lokr_*)"
