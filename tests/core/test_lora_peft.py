"""Our LoRA application against PEFT's, through diffusers' own ``load_lora_adapter``, on the
same tiny transformer and the same LoRA file (PEFT / diffusers layout and kohya layout)."""

import pytest
import torch
from safetensors.torch import save_file

from firered_core.formats.lora import load_lora, remove_loras

pytest.importorskip("peft")

TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.1.img_mlp.net.2")


def tiny_transformer(tiny_model_dir):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer", dtype=torch.float32).eval()


def inputs(model):
    g = torch.Generator().manual_seed(0)
    d = model.config.joint_attention_dim
    return dict(
        hidden_states=torch.randn(1, 16 + 16, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 7, d, generator=g),
        timestep=torch.tensor([0.6]),
        img_shapes=[[(1, 4, 4), (1, 4, 4)]],
        return_dict=False,
    )


def lora_weights(model, rank=4, alpha=2.0):
    g = torch.Generator().manual_seed(1)
    mods = dict(model.named_modules())
    sd = {}
    for name in TARGETS:
        lin = mods[name]
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.3
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.3
        sd[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_lora_matches_peft(tiny_model_dir, tmp_path, strength):
    ref = tiny_transformer(tiny_model_dir)
    sd = lora_weights(ref)
    base = ref(**inputs(ref))[0]
    peft_sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    ref.load_lora_adapter(peft_sd, prefix="transformer", adapter_name="style",
                          network_alphas={k.replace(".alpha", ""): v.item() for k, v in sd.items() if k.endswith(".alpha")})
    ref.set_adapters(["style"], [strength])
    expected = ref(**inputs(ref))[0]

    f = tmp_path / "style.safetensors"
    save_file(sd, f)
    ours = tiny_transformer(tiny_model_dir)
    load_lora(ours, f, strength, name="style")
    got = ours(**inputs(ours))[0]
    assert (expected - base).abs().max() > 1e-3  # the LoRA matters
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    remove_loras(ours)
    assert torch.equal(ours(**inputs(ours))[0], base)  # removed: the base, bit for bit
