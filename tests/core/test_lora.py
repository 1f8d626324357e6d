"""LoRAs in every layout users hold apply to a loaded MM-DiT (full precision and fp8) and give the
output of the base with ``W + strength * alpha / rank * up @ down`` merged by hand; they stack,
change strength and come off again without reloading the base, leaving it bit for bit as it was."""

import copy
import json

import pytest
import torch
from formats_helpers import LORA_TARGETS as TARGETS
from formats_helpers import run, tiny_transformer, underscored
from safetensors.torch import save_file

from firered_core.formats.fp8_layers import FP8Linear
from firered_core.formats.lora import (
    LoraFormatError,
    apply_loras,
    list_loras,
    load_lora,
    parse_lora_spec,
    read_lora,
    remove_loras,
    set_lora_strength,
)
from firered_core.formats.transformer_files import load_transformer
from firered_core.formats.writers import write_gguf

RANK = 4
def random_lora(model, seed, alpha=2.0, targets=TARGETS):
    """module -> (down [r, in], up [out, r], alpha)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in targets:
        m = model.get_submodule(n)
        out[n] = (
            torch.randn(RANK, m.in_features, generator=g) * 0.3,
            torch.randn(m.out_features, RANK, generator=g) * 0.3,
            alpha,
        )
    return out


def merged(model, loras):
    """The reference: a copy of the model with ``W += strength * alpha / rank * up @ down`` per LoRA."""
    m = copy.deepcopy(model)
    for lora, strength in loras:
        for n, (down, up, alpha) in lora.items():
            m.get_submodule(n).weight.data += strength * alpha / RANK * (up @ down)
    return m


# writers: each returns (state dict, safetensors metadata)
def diffusers_peft(lora):
    sd = {}
    for n, (d, u, a) in lora.items():
        sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = d, u
    alpha = next(iter(lora.values()))[2]
    return sd, {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": alpha})}


def bare_peft_with_alpha(lora):
    sd = {}
    for n, (d, u, a) in lora.items():
        sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"], sd[f"{n}.alpha"] = d, u, torch.tensor(a)
    return sd, None


def peft_model_state(lora):  # raw PeftModel.state_dict(): base_model.model. + .default.
    sd = {}
    for n, (d, u, a) in lora.items():
        sd[f"base_model.model.{n}.lora_A.default.weight"], sd[f"base_model.model.{n}.lora_B.default.weight"] = d, u
    return sd, None  # alpha from adapter_config.json, written by the test


def kohya(lora):
    sd = {}
    for n, (d, u, a) in lora.items():
        k = "lora_unet_" + underscored(n)
        sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"], sd[k + ".alpha"] = d, u, torch.tensor(a)
    return sd, None


def comfyui(lora):
    sd = {}
    for n, (d, u, a) in lora.items():
        sd[f"diffusion_model.{n}.lora_A.weight"], sd[f"diffusion_model.{n}.lora_B.weight"] = d, u
        sd[f"diffusion_model.{n}.alpha"] = torch.tensor(a)
    return sd, None


def comfyui_model_prefix(lora):  # as extracted from a ComfyUI model state dict
    sd = {}
    for n, (d, u, a) in lora.items():
        k = f"model.diffusion_model.{n}"
        sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"], sd[k + ".alpha"] = d, u, torch.tensor(a)
    return sd, None


def lightning(lora):  # lightx2v Qwen-Image(-Edit-2509)-Lightning: diffusers names, lora_down/lora_up/alpha
    sd = {}
    for n, (d, u, a) in lora.items():
        sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"], sd[f"{n}.alpha"] = (
            d.to(torch.bfloat16),
            u.to(torch.bfloat16),
            torch.tensor(a),
        )
    return sd, None


WRITERS = {
    "diffusers": diffusers_peft,
    "bare_peft": bare_peft_with_alpha,
    "peft_model": peft_model_state,
    "kohya": kohya,
    "comfyui": comfyui,
    "comfyui_model_prefix": comfyui_model_prefix,
    "lightning": lightning,
}


def write(tmp_path, lora, writer, name="lora"):
    sd, meta = WRITERS[writer](lora)
    f = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f), metadata=meta)
    if writer == "peft_model":
        (tmp_path / "adapter_config.json").write_text(
            json.dumps({"r": RANK, "lora_alpha": next(iter(lora.values()))[2]})
        )
    return f


@pytest.fixture(scope="module")
def base():
    return tiny_transformer()


@pytest.fixture(scope="module")
def base_out(base):
    return run(base)


@pytest.fixture()
def model(base):
    return copy.deepcopy(base)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_each_layout_equals_the_hand_merged_reference(tmp_path, base, model, writer):
    lora = random_lora(base, seed=5)
    if writer == "lightning":  # the file holds bf16; the reference merges the same rounded values
        lora = {n: (d.to(torch.bfloat16).float(), u.to(torch.bfloat16).float(), a) for n, (d, u, a) in lora.items()}
    f = write(tmp_path, lora, writer)
    entry = load_lora(model, f, 0.7)
    assert sorted(entry.layers) == sorted(TARGETS) and not entry.unmatched
    ref = run(merged(base, [(lora, 0.7)]))
    assert torch.allclose(run(model), ref, atol=2e-5, rtol=1e-5), entry.format
    assert (run(model) - run(base)).abs().max() > 1e-2  # the LoRA does something


@pytest.mark.parametrize("writer", ["kohya", "comfyui", "lightning", "bare_peft"])
def test_key_mapping_agrees_with_diffusers(base, writer):
    """diffusers' own Qwen-Image LoRA conversion (``QwenImageLoraLoaderMixin.lora_state_dict``)
    maps the same keys to the same layers with the same alpha scaling."""
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    lora = random_lora(base, seed=6)
    sd, _ = WRITERS[writer](lora)
    ours = read_lora(dict(sd), base).layers
    theirs = QwenImageLoraLoaderMixin.lora_state_dict(dict(sd))
    assert len(theirs) == 2 * len(ours)
    for n, layer in ours.items():
        d, u = theirs[f"transformer.{n}.lora_A.weight"], theirs[f"transformer.{n}.lora_B.weight"]
        assert torch.allclose(layer.delta_weight(), u.float() @ d.float(), atol=1e-6)


def test_stacking_strengths_and_removal(tmp_path, base, base_out, model):
    a, b = random_lora(base, seed=1), random_lora(base, seed=2, alpha=8.0, targets=TARGETS[::3])
    fa, fb = write(tmp_path, a, "kohya", "style"), write(tmp_path, b, "diffusers", "lightning")
    entries = apply_loras(model, [(fa, 0.8), (fb, 0.5)])
    assert [e.name for e in entries] == ["style", "lightning"] == [e.name for e in list_loras(model)]
    assert torch.allclose(run(model), run(merged(base, [(a, 0.8), (b, 0.5)])), atol=3e-5, rtol=1e-5)
    set_lora_strength(model, "style", -0.3)
    assert torch.allclose(run(model), run(merged(base, [(a, -0.3), (b, 0.5)])), atol=3e-5, rtol=1e-5)
    set_lora_strength(model, "style", 0.0)
    set_lora_strength(model, "lightning", 0.0)
    assert torch.equal(run(model), base_out)  # strength 0 is the base, bit for bit
    set_lora_strength(model, "lightning", 1.0)
    remove_loras(model, ["style"])
    assert torch.allclose(run(model), run(merged(base, [(b, 1.0)])), atol=3e-5, rtol=1e-5)
    remove_loras(model)
    assert torch.equal(run(model), base_out) and not list_loras(model)
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(KeyError, match="style"):
        set_lora_strength(model, "style", 1.0)


def test_lora_on_an_fp8_base(tmp_path, base):
    """The fp8 linears keep their fp8 weights; the result equals the dequantized base + the merge."""
    sd, deq = {}, {}
    for k, v in base.state_dict().items():
        sd[k] = v.contiguous()
    for n, m in base.named_modules():
        if isinstance(m, torch.nn.Linear):
            s = m.weight.abs().max() / 448
            sd[n + ".weight"] = (m.weight / s).to(torch.float8_e4m3fn)
            sd[n + ".scale_weight"] = s.reshape(())
            deq[n] = sd[n + ".weight"].float() * s
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    f = tmp_path / "fp8_scaled.safetensors"
    save_file(sd, str(f))
    fp8 = load_transformer(f, dtype=torch.float32)
    ref_base = copy.deepcopy(base)
    for n, w in deq.items():
        ref_base.get_submodule(n).weight.data = w
    before = run(fp8)
    lora = random_lora(base, seed=3)
    load_lora(fp8, write(tmp_path, lora, "comfyui"), 0.9)
    assert isinstance(fp8.transformer_blocks[0].attn.to_q, FP8Linear)
    assert fp8.transformer_blocks[0].attn.to_q.weight_fp8.dtype == torch.uint8
    assert torch.allclose(run(fp8), run(merged(ref_base, [(lora, 0.9)])), atol=3e-5, rtol=1e-5)
    remove_loras(fp8)
    assert torch.equal(run(fp8), before)


def test_bf16_model_gets_the_lora_in_its_dtype(tmp_path, base):
    """On a bf16 model the adapters run in bf16 and are as accurate as merging into bf16 weights."""
    lora = random_lora(base, seed=4)
    m = copy.deepcopy(base).to(torch.bfloat16)
    load_lora(m, write(tmp_path, lora, "kohya"), 1.0)
    adapters = m.transformer_blocks[0].attn.to_q._firered_lora
    assert all(layer.down.dtype == layer.up.dtype == torch.bfloat16 for _, layer in adapters.values())
    exact = run(merged(base, [(lora, 1.0)]))
    merged_bf16 = run(merged(base, [(lora, 1.0)]).to(torch.bfloat16), torch.bfloat16)
    ours = run(m, torch.bfloat16)
    assert (ours - exact).abs().max() <= 1.5 * (merged_bf16 - exact).abs().max()


def test_lora_that_matches_nothing_is_an_error(tmp_path, model):
    sd = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 4),
    }
    f = tmp_path / "flux_style.safetensors"
    save_file(sd, str(f))
    with pytest.raises(LoraFormatError, match="none of its 2 tensors.*a LoRA for a Flux-style model") as e:
        load_lora(model, f)
    assert str(f) in str(e.value) and "expected a Qwen-Image" in str(e.value)
    assert not list_loras(model)


def test_partly_unmatched_lora_warns_with_a_sample(tmp_path, base, model):
    sd, _ = kohya(random_lora(base, seed=7, targets=TARGETS[:3]))
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    sd["lycoris_transformer_blocks_0_attn_to_q.oft_blocks"] = torch.ones(1, 32)
    f = tmp_path / "partial.safetensors"
    save_file(sd, str(f))
    with pytest.warns(UserWarning, match=r"2 of 11 LoRA tensors match no layer.*OFT.*lora_te1"):
        entry = load_lora(model, f)
    assert len(entry.layers) == 3 and len(entry.unmatched) == 2


def test_lycoris_loha_and_lokr(tmp_path, base, model):
    """LyCORIS files (SimpleTuner's ``lycoris_`` names): LoHa ``(w1a@w1b) * (w2a@w2b) * alpha/r`` and
    LoKr ``kron(w1, w2a@w2b) * alpha/r``, against the update merged by hand."""
    g = torch.Generator().manual_seed(9)
    sd, deltas = {}, {}
    for i, n in enumerate(TARGETS[:6]):
        m = base.get_submodule(n)
        k = "lycoris_" + underscored(n)
        if i % 2 == 0:  # LoHa, rank 3, alpha 1.5
            f = {
                x: torch.randn(*s, generator=g) * 0.5
                for x, s in (
                    ("hada_w1_a", (m.out_features, 3)),
                    ("hada_w1_b", (3, m.in_features)),
                    ("hada_w2_a", (m.out_features, 3)),
                    ("hada_w2_b", (3, m.in_features)),
                )
            }
            deltas[n] = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * 1.5 / 3
        else:  # LoKr: w1 full [2, 4], w2 = w2_a @ w2_b (rank 2), alpha 1
            w1 = torch.randn(2, 4, generator=g)
            f = {
                "lokr_w1": w1,
                "lokr_w2_a": torch.randn(m.out_features // 2, 2, generator=g) * 0.3,
                "lokr_w2_b": torch.randn(2, m.in_features // 4, generator=g) * 0.3,
            }
            deltas[n] = torch.kron(w1, f["lokr_w2_a"] @ f["lokr_w2_b"]) * 1.0 / 2
        for x, t in f.items():
            sd[f"{k}.{x}"] = t
        sd[f"{k}.alpha"] = torch.tensor(1.5 if i % 2 == 0 else 1.0)
    path = tmp_path / "lycoris.safetensors"
    save_file(sd, str(path))
    entry = load_lora(model, path, 0.6)
    assert "LoHa" in entry.format and "LoKr" in entry.format and len(entry.layers) == 6
    ref = copy.deepcopy(base)
    for n, d in deltas.items():
        ref.get_submodule(n).weight.data += 0.6 * d
    assert torch.allclose(run(model), run(ref), atol=3e-5, rtol=1e-5)
    remove_loras(model)
    assert torch.equal(run(model), run(base))


def test_unsupported_adapter_kinds_are_reported(tmp_path, model):
    sd = {f"lycoris_transformer_blocks_0_attn_to_q.{k}": torch.zeros(4, 4) for k in ("hada_t1", "hada_t2")}
    f = tmp_path / "loha_cp.safetensors"
    save_file(sd, str(f))
    with pytest.raises(LoraFormatError, match="LyCORIS LoHa with CP"):
        load_lora(model, f)


def test_lora_of_another_size_and_bad_files(tmp_path, model):
    sd = {
        "transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
        "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4),
    }
    f = tmp_path / "big.safetensors"
    save_file(sd, str(f))
    with pytest.raises(LoraFormatError, match=r"transformer_blocks\.0\.attn\.to_q.*3072"):
        load_lora(model, f)
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(LoraFormatError, match="truncated") as e:
        load_lora(model, f)
    assert str(f) in str(e.value)


def test_lora_on_a_gguf_base(tmp_path, base):
    """GGUF layers (diffusers' GGUFLinear, weights kept quantized) take LoRAs like any linear: the
    result is the base with its dequantized weights plus the hand merge; removal restores it."""
    pytest.importorskip("gguf")
    from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor

    from firered_core.formats.gguf_files import load_gguf_transformer

    f = write_gguf(base.state_dict(), tmp_path / "tiny-Q8_0.gguf")
    m = load_gguf_transformer(f, dtype=torch.float32)
    ref_base = copy.deepcopy(base)
    layers = [n for n, x in m.named_modules() if isinstance(x, GGUFLinear)]
    assert "transformer_blocks.0.attn.to_q" in layers
    for n in layers:
        ref_base.get_submodule(n).weight.data = dequantize_gguf_tensor(m.get_submodule(n).weight).float()
    before = run(m)
    lora = random_lora(base, seed=11)
    load_lora(m, write(tmp_path, lora, "kohya"), 0.8)
    assert torch.allclose(run(m), run(merged(ref_base, [(lora, 0.8)])), atol=1e-4, rtol=1e-4)
    remove_loras(m)
    assert torch.equal(run(m), before)


def test_command_line_lora_spec():
    assert parse_lora_spec("loras/x.safetensors") == ("loras/x.safetensors", 1.0)
    assert parse_lora_spec("loras/x.safetensors:0.75") == ("loras/x.safetensors", 0.75)
    assert parse_lora_spec("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert parse_lora_spec("C:\\loras\\x.safetensors:-0.5") == ("C:\\loras\\x.safetensors", -0.5)
