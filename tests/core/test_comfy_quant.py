"""ComfyUI's block-quantized MM-DiT files (comfy_quant ``int8_tensorwise``, ``mxfp8``, ``nvfp4``) and
the Qwen-Image-Edit-2511 ``__index_timestep_zero__`` marker.

Every file here is built by hand in the test, in the layout ComfyUI stores (the block scales
swizzled into cuBLAS's tiled layout with an index formula written out here, not the package's
reshapes), and every loaded weight is compared with the values the test computed from the bytes it
wrote: ``q * scale`` (int8), ``e4m3 * 2**(e - 127)`` per 32 inputs (mxfp8), ``e2m1 * (e4m3 block
scale * global scale)`` per 16 inputs (nvfp4)."""

import json
import logging

import pytest
import torch
from formats_helpers import linear_names, rel, run, state, tiny_transformer
from safetensors.torch import save_file

from firered_core.formats.comfy_quant import QuantLinear
from firered_core.formats.transformer_files import CheckpointFormatError, inspect_transformer, load_transformer

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
KEEP = ("img_in", "txt_in", "proj_out")  # full precision, as ComfyUI's mixed files keep them


def tiled_offset(r, c, cols):
    """Byte offset of scale (r, c) in cuBLAS's block-scale layout (the cuBLAS documentation's
    formula): 128 x 4 tiles one after the other, inside a tile (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4."""
    tiles_per_row = -(-cols // 4)
    return ((r // 128) * tiles_per_row + c // 4) * 512 + (r % 32) * 16 + (r % 128 // 32) * 4 + c % 4


def to_tiled(grid):
    rows, cols = grid.shape
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    flat = torch.zeros(rp * cp, dtype=grid.dtype)
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    flat[tiled_offset(r, c, cols)] = grid.reshape(-1)
    return flat.reshape(rp, cp)


def pad_to(w, m):
    out = torch.zeros(-(-w.shape[0] // m) * m, -(-w.shape[1] // m) * m)
    out[: w.shape[0], : w.shape[1]] = w
    return out


def hand_quantize(w, fmt, per_row=False):
    """(file tensors, the exact weight they hold [out, in]) -- written independently of the package."""
    w = w.float()
    out_f, in_f = w.shape
    if fmt == "int8_tensorwise":
        s = (w.abs().amax(1, keepdim=True) if per_row else w.abs().amax()) / 127
        q = (w / s).round().clamp(-127, 127).to(torch.int8)
        return {"weight": q, "weight_scale": s.reshape(-1) if per_row else s.reshape(())}, q.float() * s
    if fmt == "mxfp8":
        wp = pad_to(w, 32)
        rows, cols = wp.shape
        e = torch.zeros(rows, cols // 32, dtype=torch.int64)
        q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
        real = torch.zeros(rows, cols)
        for b in range(cols // 32):
            blk = wp[:, 32 * b : 32 * b + 32]
            amax = blk.abs().amax(1)
            e[:, b] = torch.where(amax > 0, torch.ceil(torch.log2(amax.clamp_min(1e-30) / 448)) + 127, 0).long()
            step = 2.0 ** (e[:, b].double() - 127)
            q[:, 32 * b : 32 * b + 32] = (blk.double() / step[:, None]).float().to(torch.float8_e4m3fn)
            real[:, 32 * b : 32 * b + 32] = (q[:, 32 * b : 32 * b + 32].double() * step[:, None]).float()
        return {"weight": q, "weight_scale": to_tiled(e.to(torch.uint8))}, real[:out_f, :in_f]
    if fmt == "nvfp4":
        wp = pad_to(w, 16)
        rows, cols = wp.shape
        s2 = wp.abs().amax() / (448 * 6)
        bs = (wp.reshape(rows, -1, 16).abs().amax(-1) / 6 / s2).to(torch.float8_e4m3fn)
        step = bs.float() * s2
        x = wp.reshape(rows, -1, 16) / step.clamp_min(1e-30)[..., None]
        mag = torch.tensor(E2M1)
        code = (x.abs()[..., None] - mag).abs().argmin(-1)
        code = (code + 8 * (x < 0)).reshape(rows, cols)
        values = torch.tensor(E2M1 + [-v for v in E2M1])[code]
        real = (values.reshape(rows, -1, 16) * step[..., None]).reshape(rows, cols)
        byte = (code[:, 0::2] * 16 + code[:, 1::2]).to(torch.uint8)  # first value in the high nibble
        return ({"weight": byte, "weight_scale": to_tiled(bs.view(torch.uint8)).view(torch.float8_e4m3fn),
                 "weight_scale_2": s2.reshape(())}, real[:out_f, :in_f])  # fmt: skip
    raise AssertionError(fmt)


def comfy_file(tmp_path, model, fmt, name="q.safetensors", per_row=False, metadata=False, keep=KEEP):
    """A ComfyUI mixed-precision file of ``model`` with every linear but ``keep`` in ``fmt``;
    returns (path, {layer: exact weight})."""
    sd, exact, layers = state(model), {}, {}
    for n in linear_names(model):
        if n in keep:
            continue
        tensors, exact[n] = hand_quantize(sd[n + ".weight"], fmt, per_row)
        sd.update({f"{n}.{k}": v for k, v in tensors.items()})
        layers[n] = {"format": fmt}
        if not metadata:
            sd[n + ".comfy_quant"] = torch.tensor(list(json.dumps(layers[n]).encode()), dtype=torch.uint8)
    f = tmp_path / name
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if metadata else None
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(f), metadata=meta)
    return f, exact


def with_weights(model, new):
    import copy

    m = copy.deepcopy(model)
    for n, w in new.items():
        m.get_submodule(n).weight.data = w.float().clone()
    return m


@pytest.fixture(scope="module")
def base():
    return tiny_transformer()


@pytest.mark.parametrize("fmt, per_row", [("int8_tensorwise", False), ("int8_tensorwise", True),
                                          ("mxfp8", False), ("nvfp4", False)])  # fmt: skip
def test_block_formats_load_exactly_and_stay_quantized(tmp_path, base, fmt, per_row, caplog):
    f, exact = comfy_file(tmp_path, base, fmt, per_row=per_row)
    with caplog.at_level(logging.INFO, logger="firered_core.formats.transformer_files"):
        m = load_transformer(f, dtype=torch.float32)
    for n in linear_names(base):
        layer = m.get_submodule(n)
        if n in KEEP:
            assert type(layer) is torch.nn.Linear
            continue
        assert isinstance(layer, QuantLinear) and layer.fmt == fmt
        assert torch.equal(layer.dequantized_weight(torch.float32), exact[n]), n
    assert torch.allclose(run(m), run(with_weights(base, exact)), atol=1e-6, rtol=1e-6)
    # one log line for all the layers dequantized per layer, not one per layer
    lines = [r.getMessage() for r in caplog.records if "dequantized per layer" in r.getMessage()]
    assert len(lines) == 1 and fmt in lines[0] and "no int8 / mxfp8 / nvfp4 matmul kernel" in lines[0]
    # kept as stored: about 1 byte per weight (int8, mxfp8), half a byte (nvfp4)
    q = [m.get_submodule(n) for n in exact]
    per_weight = sum(x.qdata.nbytes for x in q) / sum(x.out_features * x.in_features for x in q)
    assert per_weight == (0.5 if fmt == "nvfp4" else 1.0)
    # within the quantization error of the float model (measured: int8 ~0.5%, mxfp8 ~3.6%, nvfp4 ~14%)
    assert rel(run(m), run(base)) < {"int8_tensorwise": 0.02, "mxfp8": 0.08, "nvfp4": 0.3}[fmt]
    assert fmt in inspect_transformer(f).format


def test_layer_table_in_the_header_and_dequantize_option(tmp_path, base):
    f, exact = comfy_file(tmp_path, base, "mxfp8", metadata=True)
    m = load_transformer(f, dtype=torch.float32)
    assert all(isinstance(m.get_submodule(n), QuantLinear) for n in exact)
    plain = load_transformer(f, dtype=torch.float32, weight_dtype="dequantize")
    assert not any(isinstance(x, QuantLinear) for x in plain.modules())
    for n, w in exact.items():
        assert torch.equal(plain.get_submodule(n).weight, w)


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_padded_storage_of_odd_sizes(tmp_path, fmt):
    """Width 24: ComfyUI pads rows and inputs to multiples of 32 (mxfp8) / 16 (nvfp4) before
    quantizing; the loader uses the layer's own [out, in] corner."""
    odd = tiny_transformer(seed=4, heads=3, head_dim=8, joint=24, axes=(4, 2, 2))
    f, exact = comfy_file(tmp_path, odd, fmt)
    n = "transformer_blocks.0.attn.to_q"
    stored = inspect_transformer(f).entries[n + ".weight"][3]
    assert stored == ((32, 32) if fmt == "mxfp8" else (32, 16))  # padded [24, 24] (nvfp4 packs 2 per byte)
    m = load_transformer(f, dtype=torch.float32)
    assert torch.equal(m.get_submodule(n).dequantized_weight(torch.float32), exact[n])
    assert torch.allclose(run(m), run(with_weights(odd, exact)), atol=1e-6, rtol=1e-6)


def test_writer_files_load(tmp_path, base):
    from firered_core.formats.writers import to_comfy_quant

    for fmt in ("int8_tensorwise", "mxfp8", "nvfp4"):
        layers = {n: fmt for n in linear_names(base) if n not in KEEP}
        f = tmp_path / f"{fmt}.safetensors"
        save_file(to_comfy_quant(state(base), layers), str(f))
        _, exact = comfy_file(tmp_path, base, fmt)
        m = load_transformer(f, dtype=torch.float32)
        for n in layers:  # same rounding rule as the hand quantizer (nvfp4 ties may round apart)
            got = m.get_submodule(n).dequantized_weight(torch.float32)
            assert torch.equal(got, exact[n]) if fmt != "nvfp4" else rel(got, exact[n]) < 0.02, (fmt, n)


def test_lora_on_a_block_quantized_base(tmp_path, base):
    from firered_core.formats.lora import apply_loras

    f, exact = comfy_file(tmp_path, base, "int8_tensorwise")
    g = torch.Generator().manual_seed(3)
    lora = {}
    for n in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2"):
        lin = base.get_submodule(n)
        lora[f"transformer.{n}.lora_A.weight"] = torch.randn(4, lin.in_features, generator=g) * 0.1
        lora[f"transformer.{n}.lora_B.weight"] = torch.randn(lin.out_features, 4, generator=g) * 0.1
    lf = tmp_path / "lora.safetensors"
    save_file(lora, str(lf))
    m = load_transformer(f, dtype=torch.float32)
    ref = with_weights(base, exact)
    apply_loras(m, [(str(lf), 0.8)])
    apply_loras(ref, [(str(lf), 0.8)])
    assert rel(run(m), run(with_weights(base, exact))) > 1e-3  # the LoRA did something
    assert torch.allclose(run(m), run(ref), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad files: each names the layer, the format and what was expected
# ---------------------------------------------------------------------------------------------

LAYER = "transformer_blocks.0.attn.to_k"


def _edit(tmp_path, base, fmt, change):
    sd, _ = {}, None
    f, _ = comfy_file(tmp_path, base, fmt)
    from safetensors.torch import load_file

    sd = load_file(str(f))
    change(sd, "model.diffusion_model." + LAYER)
    save_file(sd, str(f))
    return f


@pytest.mark.parametrize("fmt, change, words", [
    ("int8_tensorwise", lambda sd, p: sd.pop(p + ".weight_scale"), r"no .*to_k\.weight_scale; expected a float32 scale"),
    ("int8_tensorwise", lambda sd, p: sd.__setitem__(p + ".weight_scale", torch.ones(3)),
     r"weight_scale is F32 \[3\]; expected a float32 scale: a scalar, or one per output row \(\[32\]"),
    ("mxfp8", lambda sd, p: sd.__setitem__(p + ".weight_scale", torch.zeros(32, 1, dtype=torch.uint8)),
     r"weight_scale is U8 \[32, 1\]; expected E8M0 bytes .* \[128, 4\] \(512 values\)"),
    ("mxfp8", lambda sd, p: sd.__setitem__(p + ".weight", torch.zeros(32, 16, dtype=torch.float8_e4m3fn)),
     r"weight has shape \[32, 16\]; expected \[32, 32\]"),
    ("nvfp4", lambda sd, p: sd.pop(p + ".weight_scale_2"), r"no .*to_k\.weight_scale_2; expected a float32 scalar"),
    ("nvfp4", lambda sd, p: sd.__setitem__(p + ".weight", torch.zeros(32, 32, dtype=torch.uint8)),
     r"weight has shape \[32, 32\] \(two 4-bit values per byte\); expected \[32, 16\]"),
    ("nvfp4", lambda sd, p: sd.__setitem__(p + ".pre_quant_scale", torch.ones(32)), "pre_quant_scale"),
    ("int8_tensorwise", lambda sd, p: sd.__setitem__(p + ".comfy_quant", torch.tensor(
        list(b'{"format": "int8_tensorwise", "convrot": true}'), dtype=torch.uint8)), "convrot"),
], ids=["int8-no-scale", "int8-scale-shape", "mxfp8-scale-shape", "mxfp8-weight-shape", "nvfp4-no-scale2",
        "nvfp4-unpacked", "nvfp4-pre-quant-scale", "int8-convrot"])  # fmt: skip
def test_bad_quantized_layers_are_named(tmp_path, base, fmt, change, words):
    f = _edit(tmp_path, base, fmt, change)
    with pytest.raises(CheckpointFormatError, match=words) as e:
        load_transformer(f)
    assert str(f) in str(e.value) and f"layer {LAYER!r} ({fmt})" in str(e.value)


def test_unknown_format_is_named_with_its_layer(tmp_path, base):
    f = _edit(tmp_path, base, "int8_tensorwise", lambda sd, p: sd.__setitem__(
        p + ".comfy_quant", torch.tensor(list(b'{"format": "awq_w4a16"}'), dtype=torch.uint8)))  # fmt: skip
    with pytest.raises(CheckpointFormatError, match=rf"layer '{LAYER}' is quantized as 'awq_w4a16'"):
        load_transformer(f)


# ---------------------------------------------------------------------------------------------
# the Qwen-Image-Edit-2511 marker
# ---------------------------------------------------------------------------------------------


def test_index_timestep_zero_marker_builds_the_2511_model(tmp_path, base, caplog):
    """ComfyUI's 2511 files carry an empty ``__index_timestep_zero__`` tensor: its reference pictures
    are conditioned at timestep 0 (diffusers' ``zero_cond_t``). It is recognised, explained, and
    the model computes what diffusers' 2511 model computes -- not the FireRed / 2509 output."""
    from diffusers import QwenImageTransformer2DModel

    from firered_core.formats.inspect import describe_file

    sd = state(base, "model.diffusion_model.")
    sd["model.diffusion_model.__index_timestep_zero__"] = torch.empty(0)
    f = tmp_path / "qwen_image_edit_2511_bf16.safetensors"
    save_file(sd, str(f))
    with caplog.at_level(logging.INFO, logger="firered_core.formats.transformer_files"):
        m = load_transformer(f, dtype=torch.float32)  # no "unexpected keys"
    assert m.config.zero_cond_t and m.firered_source["zero_cond_t"]
    assert any("Qwen-Image-Edit-2511" in r.getMessage() and "timestep 0" in r.getMessage() for r in caplog.records)
    assert "__index_timestep_zero__" in inspect_transformer(f).format
    info = describe_file(f)
    assert info["loadable"] and "2511" in info["what"] and "timestep 0" in info["what"]
    ref = QwenImageTransformer2DModel(**{**dict(base.config), "zero_cond_t": True}).eval()
    ref.load_state_dict(base.state_dict())
    assert torch.equal(run(m), run(ref))
    assert rel(run(m), run(base)) > 1e-3  # it matters: a 2509-style model gives another picture
    off = load_transformer(f, dtype=torch.float32, config={"zero_cond_t": False})
    assert torch.equal(run(off), run(base))
