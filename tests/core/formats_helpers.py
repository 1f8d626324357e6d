"""Helpers shared by the loader tests (test_transformer_files, test_lora, test_gguf): a tiny
random MM-DiT built from config, one forward pass of it on fixed inputs, and comparisons."""

import torch

JOINT = 32  # the tiny MM-DiT's text width


def tiny_transformer(seed=0, num_layers=2, heads=2, head_dim=16, joint=JOINT, axes=(4, 6, 6)):
    """A 2-block ``QwenImageTransformer2DModel`` (width 32) with random weights, in eval mode."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return (
        QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=joint,
            axes_dims_rope=axes,
        )
        .eval()
        .requires_grad_(False)
    )


def run(model, dtype=torch.float32, seed=1):
    """The model's output (float32) for a 4x4 target latent, a 4x4 reference latent and 7 text tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16 + 16, model.config.in_channels, generator=g)
    e = torch.randn(1, 7, model.config.joint_attention_dim, generator=g)
    with torch.no_grad():
        return model(
            hidden_states=x.to(dtype),
            encoder_hidden_states=e.to(dtype),
            encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long),
            timestep=torch.tensor([0.6], dtype=dtype),
            img_shapes=[[(1, 4, 4), (1, 4, 4)]],
            return_dict=False,
        )[0].float()


def rel(a, b):
    """Relative error ||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def state(model, prefix=""):
    """The model's state dict (contiguous tensors, ready for save_file), keys under ``prefix``."""
    return {prefix + k: v.contiguous() for k, v in model.state_dict().items()}


# The layers FireRed's trainer targets, plus top-level ones some trainers add.
LORA_TARGETS = [
    f"transformer_blocks.{i}.{m}"
    for i in range(2)
    for m in (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "img_mod.1",
        "txt_mlp.net.2",
        "txt_mod.1",
    )
] + ["img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"]


def underscored(n):
    return n.replace(".", "_")
