"""The MM-DiT loads from every file layout users hold: a tiny transformer is written with our own
writers as real safetensors files (bare keys, ComfyUI prefix, sharded diffusers folder, fp8,
ComfyUI scaled fp8 and mixed precision), loaded through ``load_transformer``, and its forward
output compared with the original's. Bad files fail with messages that name the file, what was
found and what was expected."""

import json
import struct

import pytest
import torch
from formats_helpers import linear_names, rel, run, state, tiny_transformer
from safetensors.torch import save_file

from firered_core.formats.fp8_layers import FP8Linear, model_memory_bytes
from firered_core.formats.transformer_files import CheckpointFormatError, inspect_transformer, load_transformer
from firered_core.formats.writers import write_gguf

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def base():
    return tiny_transformer()


@pytest.fixture(scope="module")
def ref_out(base):
    return run(base)


def with_weights(model, new):
    """A copy of ``model`` whose linear weights are replaced by ``new[name]`` (the dequantized fp8
    weights): the exact reference for an fp8 load."""
    import copy

    m = copy.deepcopy(model)
    for n in linear_names(m):
        if n in new:
            m.get_submodule(n).weight.data = new[n].float()
    return m


def quantize(model, scaled):
    """(file tensors, dequantized weights) for every linear: plain fp8 down-cast, or ComfyUI's
    per-tensor scale (amax / 448)."""
    sd, deq = state(model), {}
    for n in linear_names(model):
        w = sd[n + ".weight"].float()
        if scaled:
            s = w.abs().max() / torch.finfo(FP8).max
            q = (w / s).to(FP8)
            sd[n + ".scale_weight"] = s.reshape(()).float()
            deq[n] = q.float() * s
        else:
            q = w.clamp(-448, 448).to(FP8)
            deq[n] = q.float()
        sd[n + ".weight"] = q
    return sd, deq


# ---------------------------------------------------------------------------------------------
# lossless formats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_single_file_with_or_without_prefix_is_exact(tmp_path, base, ref_out, prefix):
    f = tmp_path / "firered_image_edit_1.0_bf16.safetensors"
    save_file(state(base, prefix), str(f))
    m = load_transformer(f, dtype=torch.float32)
    assert inspect_transformer(f).prefix == prefix
    assert torch.equal(run(m), ref_out)


def test_bf16_file_in_bf16_is_exact(tmp_path, base):
    f = tmp_path / "t.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in state(base).items()}, str(f))
    m = load_transformer(f, dtype=torch.bfloat16)
    ref = tiny_transformer().to(torch.bfloat16)
    assert next(m.parameters()).dtype == torch.bfloat16
    assert torch.equal(run(m, torch.bfloat16), run(ref, torch.bfloat16))


def test_format_is_detected_by_content_not_name(tmp_path, base, ref_out):
    f = tmp_path / "model.bin"  # misleading extension
    save_file(state(base, "model.diffusion_model."), str(f))
    assert torch.equal(run(load_transformer(f, dtype=torch.float32)), ref_out)


def test_all_in_one_checkpoint_ignores_other_components(tmp_path, base, ref_out):
    sd = state(base, "model.diffusion_model.")
    sd["vae.decoder.conv_in.weight"] = torch.zeros(4, 4)
    sd["text_encoders.qwen25_7b.transformer.model.norm.weight"] = torch.zeros(4)
    f = tmp_path / "aio.safetensors"
    save_file(sd, str(f))
    assert torch.equal(run(load_transformer(f, dtype=torch.float32)), ref_out)


def test_sharded_diffusers_folder_and_release_folder(tmp_path, base, ref_out):
    folder = tmp_path / "release" / "transformer"
    base.save_pretrained(folder, max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) > 2 and list(folder.glob("*.index.json"))
    ckpt = inspect_transformer(folder)
    assert "sharded" in ckpt.format and len(ckpt.files) > 2
    assert torch.equal(run(load_transformer(folder, dtype=torch.float32)), ref_out)
    assert torch.equal(run(load_transformer(tmp_path / "release", dtype=torch.float32)), ref_out)


def test_tiny_release_folder_matches_diffusers(tiny_model_dir):
    from diffusers import QwenImageTransformer2DModel

    ref = QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer").eval()
    m = load_transformer(tiny_model_dir, dtype=torch.float32)
    # not bit-equal: diffusers computes on memory-mapped tensors, whose offsets change matmul rounding
    arch = [k for k in ref.config if not k.startswith("_")]
    assert {k: m.config[k] for k in arch} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in ref.config.items() if k in arch
    }
    assert torch.allclose(run(m), run(ref), atol=1e-5, rtol=1e-5)


def test_architecture_is_read_from_the_keys(tmp_path):
    other = tiny_transformer(seed=3, num_layers=3, heads=3, head_dim=8, joint=24, axes=(4, 2, 2))
    f = tmp_path / "other.safetensors"
    save_file(state(other, "model.diffusion_model."), str(f))
    cfg = inspect_transformer(f).config
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["joint_attention_dim"]) == (
        3,
        3,
        8,
        24,
    )
    assert (cfg["in_channels"], cfg["out_channels"]) == (64, 16)
    m = load_transformer(f, dtype=torch.float32)
    assert len(m.transformer_blocks) == 3
    assert torch.equal(run(m), run(other))


def test_weights_are_never_held_twice_and_nothing_stays_on_meta(tmp_path, base):
    f = tmp_path / "t.safetensors"
    save_file(state(base), str(f))
    m = load_transformer(f, dtype=torch.float32)
    assert all(t.device.type == "cpu" for t in list(m.parameters()) + list(m.buffers()))
    assert model_memory_bytes(m) == model_memory_bytes(base)


# ---------------------------------------------------------------------------------------------
# fp8
# ---------------------------------------------------------------------------------------------


def fp8_model_bytes(model):
    """(elements of linear weights, elements of every other parameter)."""
    lin = sum(model.get_submodule(n).weight.numel() for n in linear_names(model))
    rest = sum(p.numel() for p in model.parameters()) - lin
    return lin, rest


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "scaled_fp8"])
def test_fp8_files_stay_fp8_and_equal_their_dequantized_weights(tmp_path, base, ref_out, scaled):
    sd, deq = quantize(base, scaled)
    sd = {"model.diffusion_model." + k: v for k, v in sd.items()}
    if scaled:
        sd["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=FP8)
    f = tmp_path / "qwen_image_edit_2509_fp8.safetensors"
    save_file(sd, str(f))
    assert ("scaled fp8" in inspect_transformer(f).format) == scaled
    m = load_transformer(f, dtype=torch.float32)
    fp8 = [mod for mod in m.modules() if isinstance(mod, FP8Linear)]
    assert len(fp8) == len(linear_names(base))
    assert all(mod.weight_fp8.dtype == torch.uint8 and mod.fp8_dtype == FP8 for mod in fp8)
    # exact against the same model with the dequantized weights computed by hand
    assert torch.allclose(run(m), run(with_weights(base, deq)), atol=1e-6, rtol=1e-6)
    # memory: one byte per linear weight element (+ 4 bytes per scale), the rest in the compute dtype
    lin, rest = fp8_model_bytes(base)
    assert model_memory_bytes(m) == lin + 4 * rest + (4 * len(fp8) if scaled else 0)
    # and within the quantization error of the full-precision model (measured: plain ~3e-2, scaled ~2e-2 of max)
    err = (run(m) - ref_out).abs().max() / ref_out.abs().max()
    assert err < (0.06 if not scaled else 0.04)


def test_scaled_fp8_is_closer_than_plain_fp8(tmp_path, base):
    """Per-tensor scales keep fp8's 3 mantissa bits on weights of any size: small weights (real
    checkpoints sit around 1e-2, in fp8's subnormal range) and large ones (plain fp8 saturates at
    448). Measured relative weight error: plain 0.88 / scaled 0.027 at x0.02; 0.068 / 0.027 at x3000."""
    for factor in (0.02, 3000.0):
        m = with_weights(base, {n: base.get_submodule(n).weight * factor for n in linear_names(base)})
        plain, scaled = quantize(m, False)[1], quantize(m, True)[1]
        worst = {
            q: max(rel(d[n], m.get_submodule(n).weight) for n in d) for q, d in (("plain", plain), ("scaled", scaled))
        }
        assert worst["scaled"] < 0.035 and worst["scaled"] < 0.6 * worst["plain"], (factor, worst)
    # end to end, through real files (small weights): measured relative output error 3.3e-2 vs 3.1e-3
    small = with_weights(base, {n: base.get_submodule(n).weight * 0.02 for n in linear_names(base)})
    ref, errs = run(small), {}
    for scaled in (False, True):
        sd, _ = quantize(small, scaled)
        f = tmp_path / f"{scaled}.safetensors"
        save_file(sd, str(f))
        errs[scaled] = rel(run(load_transformer(f, dtype=torch.float32)), ref)
    assert errs[True] < 0.01 and errs[True] * 5 < errs[False]


def test_comfy_mixed_precision_files(tmp_path, base):
    """ComfyUI's newer layout: ``<layer>.comfy_quant`` JSON + ``<layer>.weight_scale`` on some layers,
    the others kept in bf16; or the same layer table in the ``_quantization_metadata`` header."""
    sd, deq = quantize(base, scaled=True)
    keep = {"img_in", "proj_out", "txt_in"}  # stay full precision, as mixed files keep sensitive layers
    for n in keep:
        sd[n + ".weight"] = base.get_submodule(n).weight.to(torch.bfloat16)
        del sd[n + ".scale_weight"]
        deq[n] = sd[n + ".weight"].float()
    layers = {}
    for n in linear_names(base):
        if n in keep:
            continue
        sd[n + ".weight_scale"] = sd.pop(n + ".scale_weight")
        layers[n] = {"format": "float8_e4m3fn"}
    per_layer = dict(sd)
    for n, conf in layers.items():
        per_layer[n + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    # the fp8 bytes of one layer stored in a uint8 container, as some writers do
    n0 = "transformer_blocks.0.img_mod.1"
    per_layer[n0 + ".weight"] = per_layer[n0 + ".weight"].view(torch.uint8)
    f1, f2 = tmp_path / "fp8mixed.safetensors", tmp_path / "meta.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in per_layer.items()}, str(f1))
    save_file(sd, str(f2), metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})})
    ref = run(with_weights(base, deq))
    for f in (f1, f2):
        m = load_transformer(f, dtype=torch.float32)
        assert "mixed precision" in inspect_transformer(f).format
        kinds = {n: type(m.get_submodule(n)).__name__ for n in linear_names(base)}
        assert all(kinds[n] == ("Linear" if n in keep else "FP8Linear") for n in kinds)
        assert torch.allclose(run(m), ref, atol=1e-6, rtol=1e-6)


def test_unsupported_quant_format_is_named(tmp_path, base):
    sd = state(base)
    sd["img_in.comfy_quant"] = torch.tensor(list(b'{"format": "svdquant_w4a4"}'), dtype=torch.uint8)
    f = tmp_path / "w4a4.safetensors"
    save_file(sd, str(f))
    with pytest.raises(CheckpointFormatError, match="layer 'img_in' is quantized as 'svdquant_w4a4'") as e:
        load_transformer(f)
    assert str(f) in str(e.value)


def test_weight_dtype_options(tmp_path, base, ref_out):
    f = tmp_path / "bf16.safetensors"
    save_file(state(base), str(f))
    bf16 = load_transformer(f, dtype=torch.bfloat16)
    m = load_transformer(f, dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn")  # plain down-cast at load
    assert sum(isinstance(x, FP8Linear) for x in m.modules()) == len(linear_names(base))
    lin, rest = fp8_model_bytes(base)
    assert model_memory_bytes(bf16) == 2 * (lin + rest)
    assert model_memory_bytes(m) == lin + 2 * rest  # fp8 ~ half of bf16 for a model made of linears
    e5m2 = load_transformer(f, dtype=torch.bfloat16, weight_dtype="fp8_e5m2")
    assert e5m2.transformer_blocks[0].attn.to_q.fp8_dtype == torch.float8_e5m2
    assert model_memory_bytes(e5m2) == lin + 2 * rest
    _, deq = quantize(base, scaled=False)
    sdq, _ = quantize(base, scaled=False)
    f8 = tmp_path / "fp8.safetensors"
    save_file(sdq, str(f8))
    a = run(load_transformer(f8, dtype=torch.float32))
    b = run(load_transformer(f8, dtype=torch.float32, weight_dtype="dequantize"))
    assert not any(isinstance(x, FP8Linear) for x in load_transformer(f8, weight_dtype="dequantize").modules())
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def test_fp8_survives_dtype_and_device_moves(tmp_path, base):
    sd, _ = quantize(base, scaled=False)
    f = tmp_path / "fp8.safetensors"
    save_file(sd, str(f))
    m = load_transformer(f, dtype=torch.bfloat16)
    m.to(torch.float32)
    lin = m.transformer_blocks[0].attn.to_q
    assert isinstance(lin, FP8Linear) and lin.weight_fp8.dtype == torch.uint8
    assert next(m.parameters()).dtype == torch.float32  # the compute dtype, never fp8


# ---------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------


def test_truncated_file(tmp_path, base):
    f = tmp_path / "cut.safetensors"
    save_file(state(base), str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated") as e:
        load_transformer(f)
    assert str(f) in str(e.value)
    f.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(CheckpointFormatError, match="truncated|corrupt"):
        load_transformer(f)


def test_not_safetensors_and_corrupt_header(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"this is not a weight file at all")
    with pytest.raises(CheckpointFormatError, match="not a safetensors file"):
        load_transformer(f)
    f.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(CheckpointFormatError, match="GGUF"):
        inspect_transformer(f)
    f.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(CheckpointFormatError, match="pickle"):
        load_transformer(f)
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'  # JSON cut short
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        load_transformer(f)
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        load_transformer(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    "keys, found",
    [
        (
            {
                "double_blocks.0.img_attn.qkv.weight": (6, 2),
                "single_blocks.0.linear1.weight": (2, 2),
                "img_in.weight": (2, 2),
            },
            "Flux",
        ),
        ({"model.diffusion_model.input_blocks.0.0.weight": (2, 2, 3, 3), "conditioner.embedders.0.x": (2,)}, "SDXL"),
        (
            {
                "transformer_blocks.0.attn.to_q.lora_A.weight": (2, 2),
                "transformer_blocks.0.attn.to_q.lora_B.weight": (2, 2),
            },
            "LoRA",
        ),
        ({"model.layers.0.self_attn.k_proj.bias": (2,), "visual.blocks.0.attn.qkv.weight": (2, 2)}, "text encoder"),
    ],
    ids=["flux", "sdxl", "lora", "text-encoder"],
)
def test_another_model_is_named(tmp_path, keys, found):
    f = tmp_path / "qwen_image_edit.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(f))
    with pytest.raises(CheckpointFormatError, match=found) as e:
        load_transformer(f)
    assert str(f) in str(e.value) and "expected a Qwen-Image" in str(e.value)


def test_missing_and_extra_keys(tmp_path, base):
    sd = state(base, "model.diffusion_model.")
    del sd["model.diffusion_model.transformer_blocks.1.attn.to_k.weight"]
    f = tmp_path / "missing.safetensors"
    save_file(sd, str(f))
    with pytest.raises(CheckpointFormatError, match=r"1 missing.*transformer_blocks\.1\.attn\.to_k\.weight") as e:
        load_transformer(f)
    assert str(f) in str(e.value)
    sd = state(base)
    sd["transformer_blocks.0.attn.something_new.weight"] = torch.zeros(2, 2)
    save_file(sd, str(f))
    with pytest.raises(CheckpointFormatError, match="1 unexpected"):
        load_transformer(f)


def test_incomplete_sharded_folder(tmp_path, base):
    folder = tmp_path / "transformer"
    base.save_pretrained(folder, max_shard_size="60KB")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointFormatError, match="missing") as e:
        load_transformer(folder)
    assert shard.name in str(e.value)


def test_gguf_files_go_to_the_gguf_loader(tmp_path, base, ref_out):
    pytest.importorskip("gguf")
    from diffusers.quantizers.gguf.utils import GGUFLinear

    f = write_gguf(base.state_dict(), tmp_path / "firered-q8_0.safetensors")  # a misleading name: the content decides
    m = load_transformer(f, dtype=torch.float32)
    assert isinstance(m.transformer_blocks[0].attn.to_q, GGUFLinear)
    assert rel(run(m), ref_out) < 0.02  # Q8_0
