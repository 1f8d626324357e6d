"""The Qwen2.5-VL text encoder from the quantized files ComfyUI users hold now: ComfyUI's
block-quantized layers (comfy_quant int8_tensorwise / mxfp8 / nvfp4) and GGUF files in llama.cpp's
split (the qwen2vl language model + the mmproj vision tower), each compared with the Hugging Face
weights it was made from."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_comfy_quant import hand_quantize
from test_text_encoder_files import encode, to_comfyui

from firered_core.formats.text_encoder_files import TextEncoderFileError, find_processor, load_text_encoder

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir / "text_encoder", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return find_processor(model_dir=tiny_model_dir)


def module_name(classic):
    if classic.startswith("visual."):
        return "model." + classic
    if classic.startswith("model."):
        return "model.language_model." + classic[len("model.") :]
    return classic


# ---------------------------------------------------------------------------------------------
# comfy_quant block formats
# ---------------------------------------------------------------------------------------------

QUANTIZED = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "visual.blocks.0.attn.qkv",
             "visual.merger.mlp.2")  # fmt: skip


@pytest.mark.parametrize("fmt", ["int8_tensorwise", "mxfp8", "nvfp4"])
def test_block_quantized_layers_are_dequantized_exactly(reference, processor, tmp_path, fmt):
    sd = to_comfyui(reference.state_dict(), lm_head=False)
    exact = {}
    for layer in QUANTIZED:
        tensors, exact[layer] = hand_quantize(sd[layer + ".weight"], fmt)
        sd.update({f"{layer}.{k}": v for k, v in tensors.items()})
        sd[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    f = tmp_path / f"qwen_2.5_vl_7b_{fmt}.safetensors"
    save_file(sd, str(f))
    model = load_text_encoder(f, dtype=torch.float32, processor=processor)
    got, ref = model.state_dict(), reference.state_dict()
    for layer in QUANTIZED:
        assert torch.equal(got[module_name(layer) + ".weight"], exact[layer]), layer
    untouched = [k for k in ref if k != "lm_head.weight" and not any(module_name(q) + ".weight" == k for q in QUANTIZED)]
    assert all(torch.equal(got[k], ref[k]) for k in untouched)
    assert torch.isfinite(encode(model, processor)).all()


def test_bad_block_quantized_text_encoder_layers_are_named(reference, processor, tmp_path):
    sd = to_comfyui(reference.state_dict(), lm_head=False)
    layer = "model.layers.1.mlp.down_proj"
    tensors, _ = hand_quantize(sd[layer + ".weight"], "mxfp8")
    sd.update({f"{layer}.{k}": v for k, v in tensors.items()})
    sd[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "mxfp8"}'), dtype=torch.uint8)
    del sd[layer + ".weight_scale"]
    f = tmp_path / "missing_scale.safetensors"
    save_file(sd, str(f))
    with pytest.raises(TextEncoderFileError, match=rf"missing_scale.*layer '{layer}' \(mxfp8\): no .*weight_scale"):
        load_text_encoder(f, processor=processor)
    sd[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "awq_w4a16"}'), dtype=torch.uint8)
    save_file(sd, str(f))
    with pytest.raises(TextEncoderFileError, match=rf"layer '{layer}' is quantized as 'awq_w4a16'"):
        load_text_encoder(f, processor=processor)


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp's split: language model + mmproj)
# ---------------------------------------------------------------------------------------------


def gguf_reference(weight, qtype):
    """What a GGUF tensor of ``weight`` in ``qtype`` holds, by gguf-py's own reference code."""
    a = weight.float().numpy()
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(a.astype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32)).float()
    data = gguf.quants.quantize(a, qtype)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype))).reshape(weight.shape).float()


@pytest.fixture(scope="module")
def source(reference):
    """The tiny encoder with random norm weights (a fresh model's are all ones, which would hide a
    norm written under another norm's name)."""
    import copy

    m = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def gguf_files(source, tmp_path_factory):
    from firered_core.formats.writers import write_gguf_text_encoder

    d = tmp_path_factory.mktemp("te_gguf")
    out = {}
    for quant, vquant in (("F32", "F32"), ("Q8_0", "F16")):
        sub = d / quant
        sub.mkdir()
        out[quant] = write_gguf_text_encoder(source.state_dict(), source.config, sub / f"Qwen2.5-VL-7B-Instruct-{quant}.gguf",
                                             quant, mmproj=sub / f"mmproj-Qwen2.5-VL-7B-Instruct-{vquant}.gguf",
                                             mmproj_quant=vquant)  # fmt: skip
    return out


def test_gguf_files_use_llama_cpp_names(gguf_files):
    text, mm = gguf_files["Q8_0"]
    names = {t.name for t in gguf.GGUFReader(str(text)).tensors}
    vnames = {t.name for t in gguf.GGUFReader(str(mm)).tensors}
    assert {"token_embd.weight", "blk.0.attn_q.bias", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert {"v.patch_embd.weight", "v.patch_embd.weight.1", "v.blk.0.attn_k.weight", "v.blk.1.ln2.weight", "mm.2.bias",
            "v.post_ln.weight"} <= vnames  # fmt: skip


def test_unquantized_gguf_encodes_exactly_like_the_original(source, processor, gguf_files):
    text, _ = gguf_files["F32"]
    model = load_text_encoder(text, dtype=torch.float32, processor=processor)  # the mmproj beside it is found
    assert torch.equal(encode(model, processor), encode(source, processor))


def test_quantized_gguf_holds_exactly_what_gguf_py_decodes(source, processor, gguf_files):
    Q = gguf.GGMLQuantizationType
    text, mm = gguf_files["Q8_0"]
    model = load_text_encoder(text, dtype=torch.float32, processor=processor, mmproj=mm)
    got = model.state_dict()
    for name, w in source.state_dict().items():
        if name == "lm_head.weight":
            continue
        vision = name.startswith("model.visual.")
        qtype = Q.F32 if w.ndim == 1 else (Q.F16 if vision or w.ndim != 2 or w.shape[1] % 32 else Q.Q8_0)
        assert torch.equal(got[name], gguf_reference(w, qtype)), name
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    rel = float((encode(model, processor) - encode(source, processor)).norm() / encode(source, processor).norm())
    assert 0 < rel < 0.05, rel  # Q8_0: measured ~3e-3


def test_gguf_without_its_vision_tower_says_the_mmproj_is_needed(processor, gguf_files, tmp_path):
    import shutil

    from firered_core.formats.inspect import describe_file

    text, mm = gguf_files["Q8_0"]
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(text, alone / text.name)
    with pytest.raises(TextEncoderFileError, match=r"(?s)language model only.*mmproj.*FireRed needs it to read the input pictures"):
        load_text_encoder(alone / text.name, processor=processor)
    info = describe_file(alone / text.name)
    assert info["kind"] == "text_encoder" and not info["loadable"] and "mmproj" in info["error"]
    # a misleading name beside it: the content decides
    shutil.copy(mm, alone / "vision.gguf")
    info = describe_file(alone / text.name)
    assert info["loadable"] and info["mmproj"].endswith("vision.gguf") and "Qwen2.5-VL" in info["what"]
    assert load_text_encoder(alone / text.name, processor=processor) is not None
    with pytest.raises(TextEncoderFileError, match="vision tower \\(mmproj\\).*load the qwen2vl GGUF beside it"):
        load_text_encoder(alone / "vision.gguf", processor=processor)
    with pytest.raises(TextEncoderFileError, match="not a vision-tower GGUF"):
        load_text_encoder(alone / text.name, processor=processor, mmproj=alone / text.name)


def test_gguf_metadata_gives_what_the_shapes_cannot(reference, processor, tmp_path):
    """Head counts and the M-RoPE split are not in the weights' shapes: the GGUF's metadata states
    them (a 4-head text model with head size 16, which the shapes alone would read as 2 heads of 32)."""
    import copy

    from transformers import Qwen2_5_VLForConditionalGeneration

    from firered_core.formats.writers import write_gguf_text_encoder

    cfg = copy.deepcopy(reference.config)
    cfg.text_config.num_attention_heads, cfg.text_config.num_key_value_heads = 4, 2
    cfg.text_config.rope_parameters = {**cfg.text_config.rope_parameters, "mrope_section": [2, 3, 3]}
    torch.manual_seed(5)
    other = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    text, mm = write_gguf_text_encoder(other.state_dict(), cfg, tmp_path / "heads-F32.gguf", "F32",
                                       mmproj=tmp_path / "heads-mmproj-F32.gguf", mmproj_quant="F32")  # fmt: skip
    model = load_text_encoder(text, dtype=torch.float32, processor=processor)
    assert model.config.text_config.num_attention_heads == 4
    assert torch.equal(encode(model, processor), encode(other, processor))
