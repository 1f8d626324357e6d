"""The rarer LoRA layouts (issue 12.3), each written as its tool writes it and checked against the
base with the weights merged by hand: DoRA (``dora_scale``) decomposed as ComfyUI's weight
adapter does, ``diff`` / ``diff_b`` full patches, LoRA bias keys, ``.lora_linear_layer.`` and
``lora_A`` / ``lora_B`` without ``.weight``, LyCORIS' ``lora_mid`` (Tucker) factor, rsLoRA
scaling from the PEFT config, and shape errors that name the layer."""

import copy
import json

import pytest
import torch
from formats_helpers import LORA_TARGETS as TARGETS
from formats_helpers import run, tiny_transformer, underscored
from safetensors.torch import save_file

from firered_core.formats.lora import LoraFormatError, load_lora

RANK = 4


@pytest.fixture(scope="module")
def base():
    return tiny_transformer()


@pytest.fixture()
def model(base):
    return copy.deepcopy(base)



def _pair(m, g, rank=RANK):
    return torch.randn(rank, m.in_features, generator=g) * 0.3, torch.randn(m.out_features, rank, generator=g) * 0.3


def _check(tmp_path, base, model, sd, edits, strength=0.7, meta=None, kind=None):
    """Load ``sd`` (written to a file) at ``strength``; the reference is ``base`` with ``edits``
    (module -> (weight delta at strength 1, bias delta or None)) added by hand, times strength."""
    f = tmp_path / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f), metadata=meta)
    entry = load_lora(model, f, strength)
    assert sorted(entry.layers) == sorted(edits) and not entry.unmatched, (entry.layers, entry.unmatched)
    if kind:
        assert kind in entry.format, entry.format
    ref = copy.deepcopy(base)
    for n, (dw, db) in edits.items():
        lin = ref.get_submodule(n)
        if dw is not None:
            lin.weight.data += strength * dw
        if db is not None:
            lin.bias.data += strength * db
    got, want = run(model), run(ref)
    assert torch.allclose(got, want, atol=3e-5, rtol=1e-5), (got - want).abs().max()
    assert (got - run(base)).abs().max() > 1e-3  # it does something
    return entry


@pytest.mark.parametrize("axis", ["in", "out"])
def test_dora_is_applied_as_comfyui_decomposes_it(tmp_path, base, model, axis):
    """kohya DoRA (``dora_scale`` [1, in], LyCORIS' default) and PEFT-style [out, 1]: at strength
    s the layer is ``W + s * (m * V / ||V|| - W)``, ``V = W + alpha/r * up @ down``, the norm along
    the axis the magnitude does not span."""
    g = torch.Generator().manual_seed(21)
    sd, edits = {}, {}
    for n in TARGETS[:5]:
        m = base.get_submodule(n)
        d, u = _pair(m, g)
        k = "lora_unet_" + underscored(n)
        sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"], sd[k + ".alpha"] = d, u, torch.tensor(2.0)
        w = m.weight.detach().float()
        v = w + 2.0 / RANK * (u @ d)
        if axis == "in":
            mag = v.norm(dim=0, keepdim=True) * (1 + 0.2 * torch.rand(1, m.in_features, generator=g))
            norm = v.norm(dim=0, keepdim=True)
        else:
            mag = v.norm(dim=1, keepdim=True) * (1 + 0.2 * torch.rand(m.out_features, 1, generator=g))
            norm = v.norm(dim=1, keepdim=True)
        sd[k + ".dora_scale"] = mag
        edits[n] = (mag * v / norm - w, None)
    _check(tmp_path, base, model, sd, edits, kind="DoRA")


def test_diff_and_diff_b_patches(tmp_path, base, model):
    g = torch.Generator().manual_seed(22)
    sd, edits = {}, {}
    for i, n in enumerate(TARGETS[:4]):
        m = base.get_submodule(n)
        dw = torch.randn(m.out_features, m.in_features, generator=g) * 0.05 if i != 3 else None
        db = torch.randn(m.out_features, generator=g) * 0.1 if i != 0 else None
        if dw is not None:
            sd[f"diffusion_model.{n}.diff"] = dw
        if db is not None:
            sd[f"diffusion_model.{n}.diff_b"] = db
        edits[n] = (dw, db)
    _check(tmp_path, base, model, sd, edits, kind="diff")


def test_lora_bias_keys(tmp_path, base, model):
    """PEFT ``lora_bias=True``: ``lora_B`` has a bias, scaled with the layer (alpha / r)."""
    g = torch.Generator().manual_seed(23)
    sd, edits = {}, {}
    for n in TARGETS[:4]:
        m = base.get_submodule(n)
        d, u = _pair(m, g)
        b = torch.randn(m.out_features, generator=g) * 0.3
        sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = d, u
        sd[f"transformer.{n}.lora_B.bias"] = b
        edits[n] = (2.0 / RANK * (u @ d), 2.0 / RANK * b)
    _check(tmp_path, base, model, sd, edits, meta={"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": 2.0})})


@pytest.mark.parametrize("layout", ["lora_linear_layer", "no_weight_suffix"])
def test_older_and_bare_key_names(tmp_path, base, model, layout):
    g = torch.Generator().manual_seed(24)
    sd, edits = {}, {}
    for n in TARGETS[:6]:
        d, u = _pair(base.get_submodule(n), g)
        if layout == "lora_linear_layer":  # diffusers' LoRACompatibleLinear: no alpha, scale 1
            sd[f"{n}.lora_linear_layer.down.weight"], sd[f"{n}.lora_linear_layer.up.weight"] = d, u
            edits[n] = (u @ d, None)
        else:
            sd[f"diffusion_model.{n}.lora_A"], sd[f"diffusion_model.{n}.lora_B"] = d, u
            sd[f"diffusion_model.{n}.alpha"] = torch.tensor(3.0)
            edits[n] = (3.0 / RANK * (u @ d), None)
    _check(tmp_path, base, model, sd, edits)


def test_lora_mid_tucker_factor(tmp_path, base, model):
    g = torch.Generator().manual_seed(25)
    sd, edits = {}, {}
    for i, n in enumerate(TARGETS[:4]):
        d, u = _pair(base.get_submodule(n), g)
        mid = torch.randn(RANK, RANK, generator=g) * 0.5
        k = "lora_unet_" + underscored(n)
        sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"], sd[k + ".alpha"] = d, u, torch.tensor(2.0)
        sd[k + ".lora_mid.weight"] = mid if i % 2 else mid[:, :, None, None]  # 2-D or as a 1x1 conv
        edits[n] = (2.0 / RANK * (u @ mid @ d), None)
    _check(tmp_path, base, model, sd, edits)


def test_rslora_scaling_from_the_peft_config(tmp_path, base, model):
    """``use_rslora``: PEFT scales by lora_alpha / sqrt(r) (here 6 / 2 = 3, where alpha / r is 1.5)."""
    g = torch.Generator().manual_seed(26)
    sd, edits = {}, {}
    for n in TARGETS[:4]:
        d, u = _pair(base.get_submodule(n), g)
        sd[f"transformer.{n}.lora_A.weight"], sd[f"transformer.{n}.lora_B.weight"] = d, u
        edits[n] = (6.0 / RANK**0.5 * (u @ d), None)
    meta = {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": 6.0, "use_rslora": True})}
    _check(tmp_path, base, model, sd, edits, meta=meta)


def test_dora_and_diff_of_the_wrong_shape_are_named(tmp_path, model):
    n = "transformer_blocks.0.attn.to_q"
    m = model.get_submodule(n)
    for sd, match in (
        ({f"{n}.diff": torch.zeros(3, 3)}, r"diff patch for layer .*to_q.*expected \[32, 32\]"),
        ({f"{n}.lora_A.weight": torch.zeros(RANK, m.in_features), f"{n}.lora_B.weight": torch.zeros(m.out_features, RANK),
          f"{n}.dora_scale": torch.ones(5, 5)}, r"dora_scale of shape \(5, 5\)"),
    ):
        f = tmp_path / "bad.safetensors"
        save_file(sd, str(f))
        with pytest.raises(LoraFormatError, match=match):
            load_lora(model, f)
