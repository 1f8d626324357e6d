"""GGUF MM-DiT files (Q8_0, a 4-bit quant, K-quants, F16/F32) load with their weights kept
quantized, compute what the dequantized weights compute, stay within the quantization error of
the float model, and bad files fail clearly."""

import numpy as np
import pytest
import torch
from formats_helpers import rel

from firered_core.formats.gguf_files import GGUFFileError, inspect_gguf, load_gguf_transformer, quantized_linear_count

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


def city96_type(name: str, array: np.ndarray, target) -> "Q":
    """The tensor types of a ComfyUI-GGUF file (tools/convert.py, then llama.cpp's quantizer): 1-D
    and tiny tensors F32, the rest the target type where the row fits its block, else F16."""
    if array.ndim == 1 or array.size <= 1024:
        return Q.F32
    if isinstance(target, tuple):  # a mix, as in Q4_K_M files: cycle through the types
        city96_type.n = getattr(city96_type, "n", -1) + 1
        target = target[city96_type.n % len(target)]
    block = gguf.GGML_QUANT_SIZES[target][0]
    return target if array.shape[-1] % block == 0 else Q.F16


def random_kquant(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Valid random K-quant blocks (gguf-py cannot quantize to K-quants): random bytes with small
    fp16 super-block scales (``d``/``dmin``; Q6_K keeps ``d`` in its last two bytes)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d = rng.uniform(2e-4, 6e-4, size=(rows, cols // block)).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype == Q.Q6_K:
        raw[..., -2:] = d
    else:
        raw[..., 0:2] = d
        raw[..., 2:4] = (
            rng.uniform(1e-4, 3e-4, size=(rows, cols // block)).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
        )
    return raw.reshape(rows, -1)


def write_gguf(path, state: dict, target, *, arch="qwen_image", prefix="", rng=None) -> dict:
    """Write ``state`` as a ComfyUI-GGUF style file; return the weights the file really holds
    (each tensor dequantized with gguf-py's reference code, rounded to fp16 like diffusers does)."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    held = {}
    for name, t in state.items():
        a = t.float().numpy()
        q = city96_type(name, a, target)
        if q in K_QUANTS:
            data = random_kquant(a.shape[0], a.shape[1], q, rng)
        else:
            data = gguf.quants.quantize(a, q)
        w.add_tensor(prefix + name, data, raw_dtype=q)
        held[name] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, q))).reshape(t.shape).float()
        if q not in (Q.F32, Q.F16):
            held[name] = held[name].half().float()  # diffusers dequantizes into fp16 (Q8_0: d * q is then exact)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def run(model, seed=0, text_dim=None):
    g = torch.Generator().manual_seed(seed)
    text_dim = text_dim or model.config.joint_attention_dim
    kw = dict(
        hidden_states=torch.randn(1, 2 * 16, model.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 7, text_dim, generator=g),
        encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long),
        timestep=torch.tensor([0.6]),
        img_shapes=[[(1, 4, 4), (1, 4, 4)]],  # target + one reference picture
        return_dict=False,
    )
    with torch.no_grad():
        return model(**kw)[0]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer").eval()


def with_weights(model, held):
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(held, strict=True)
    return m


@pytest.mark.parametrize(("target", "bound"), [(Q.Q8_0, 0.02), (Q.Q4_0, 0.2), (Q.F16, 1e-3)])
def test_gguf_keeps_weights_quantized_and_computes_the_dequantized_model(reference, tmp_path, target, bound):
    path = tmp_path / f"tiny-{target.name}.gguf"
    held = write_gguf(path, reference.state_dict(), target)
    model = load_gguf_transformer(path, dtype=torch.float32)
    info = inspect_gguf(path)
    assert info.architecture == "qwen_image"
    assert info.config["num_layers"] == reference.config.num_layers
    assert tuple(info.config["axes_dims_rope"]) == tuple(reference.config.axes_dims_rope)
    out = run(model)
    # exactly the model the file holds (dequantized on the fly), up to float rounding
    assert torch.allclose(out, run(with_weights(reference, held)), atol=1e-5, rtol=1e-5)
    # and within the quantization error of the float model (measured: Q8_0 0.5%, Q4_0 8%, F16 0.03%)
    err = rel(out, run(reference))
    print(target.name, "relative error", err)
    assert err < bound, err
    if target != Q.F16:
        assert quantized_linear_count(model) > 0
        q = model.transformer_blocks[0].img_mlp.net[0].proj.weight  # (small ones stay F32, as in city96's files)
        assert q.dtype == torch.uint8 and q.quant_type == target  # kept quantized in memory
        # at rest the model is smaller than its float weights
        held_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert held_bytes < 0.6 * sum(p.numel() * p.element_size() for p in reference.parameters())


def test_k_quants_as_users_hold_them(tmp_path):
    """A "Q4_K_M"-like file mixing Q4_K / Q5_K / Q6_K; K-quants need rows of 256, hence a small
    model with 256-wide layers."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(
        num_layers=1, attention_head_dim=128, num_attention_heads=2, joint_attention_dim=256,
        in_channels=64, out_channels=16, axes_dims_rope=(16, 56, 56),
    ).eval()  # fmt: skip
    path = tmp_path / "kq-mixed.gguf"
    held = write_gguf(path, ref.state_dict(), K_QUANTS, rng=np.random.default_rng(0))
    model = load_gguf_transformer(path, dtype=torch.float32)
    info = inspect_gguf(path)
    assert {"Q4_K", "Q5_K", "Q6_K", "F32"} <= set(info.type_counts)
    assert tuple(info.config["axes_dims_rope"]) == (16, 56, 56)
    kinds = {
        m.weight.quant_type
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "quant_type")
    }
    assert kinds == set(K_QUANTS)
    a, b = run(model), run(with_weights(ref, held))
    assert rel(a, b) < 2e-3, rel(a, b)  # K-quant dequantization rounds in fp16 more than once


def test_bf16_compute_prefixed_names_and_misleading_extension(reference, tmp_path):
    path = tmp_path / "transformer.safetensors"  # a GGUF with the wrong extension
    write_gguf(path, reference.state_dict(), Q.Q8_0, prefix="model.diffusion_model.")
    model = load_gguf_transformer(path, dtype=torch.bfloat16)
    assert model.transformer_blocks[0].img_mod[1].weight.quant_type == Q.Q8_0
    assert model.txt_norm.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(
            hidden_states=torch.randn(1, 16, 64, generator=g).bfloat16(),
            encoder_hidden_states=torch.randn(1, 7, 64, generator=g).bfloat16(),
            encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long),
            timestep=torch.tensor([0.6]).bfloat16(),
            img_shapes=[[(1, 4, 4)]],
            return_dict=False,
        )[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_files_fail_naming_file_found_and_expected(reference, tiny_model_dir, tmp_path):
    flux = tmp_path / "flux1-dev-Q8_0.gguf"
    write_gguf(flux, {"double_blocks.0.img_attn.proj.weight": torch.randn(64, 64)}, Q.Q8_0, arch="flux")
    with pytest.raises(GGUFFileError, match=r"(?s)flux1-dev-Q8_0\.gguf.*'flux'.*Qwen-Image"):
        load_gguf_transformer(flux)
    text = tmp_path / "Qwen2.5-VL-7B-Q8_0.gguf"
    write_gguf(text, {"blk.0.attn_q.weight": torch.randn(64, 64)}, Q.Q8_0, arch="qwen2vl")
    with pytest.raises(GGUFFileError, match=r"(?s)Qwen2\.5-VL-7B-Q8_0\.gguf.*text / vision encoder.*Qwen-Image"):
        load_gguf_transformer(text)
    good = tmp_path / "good.gguf"
    write_gguf(good, reference.state_dict(), Q.Q8_0)
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(GGUFFileError, match=r"cut\.gguf.*(truncated|corrupt)"):
        load_gguf_transformer(cut)
    with pytest.raises(
        GGUFFileError, match=r"(?s)diffusion_pytorch_model\.safetensors.*not.*GGUF|safetensors.*Qwen-Image"
    ):
        load_gguf_transformer(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    sd = dict(reference.state_dict())
    del sd["proj_out.bias"]
    holed = tmp_path / "holed.gguf"
    write_gguf(holed, sd, Q.Q8_0)
    with pytest.raises(GGUFFileError, match=r"holed\.gguf.*missing.*proj_out\.bias"):
        load_gguf_transformer(holed)


def test_2511_marker_in_a_gguf_builds_zero_cond_t(reference, tmp_path):
    """A GGUF converted from a Qwen-Image-Edit-2511 ComfyUI file keeps the ``__index_timestep_zero__``
    marker: it is not an unexpected tensor, and the model conditions the references at t = 0."""
    sd = {k: v for k, v in reference.state_dict().items()}
    sd["__index_timestep_zero__"] = torch.zeros(1)
    f = tmp_path / "qwen-image-edit-2511-Q8_0.gguf"
    write_gguf(f, sd, Q.Q8_0)
    assert inspect_gguf(f).markers == ("__index_timestep_zero__",)
    m = load_gguf_transformer(f, dtype=torch.float32)
    assert m.config.zero_cond_t
    plain = tmp_path / "plain-Q8_0.gguf"
    write_gguf(plain, reference.state_dict(), Q.Q8_0)
    assert not load_gguf_transformer(plain, dtype=torch.float32).config.zero_cond_t
    assert rel(run(m), run(load_gguf_transformer(plain, dtype=torch.float32))) > 1e-3
