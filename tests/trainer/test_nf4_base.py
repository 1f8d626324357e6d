"""QLoRA-style frozen base (``model.base_precision: nf4``): bitsandbytes 4-bit NF4 ``Linear4bit``
block linears with PEFT LoRA on top. bitsandbytes 0.50 runs 4-bit on the CPU, so this is tested
for real here: quantize / dequantize, forward / backward, the frozen linears' memory (~0.28x bf16),
gradients reaching the adapters only, and a short SFT run whose loss falls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from firered_trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "firered_trainer" / "configs" / "tiny_cpu.yaml"
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bnb_4bit_on_this_machine():
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    q, st = F.quantize_4bit(w, quant_type="nf4", blocksize=64)
    assert q.dtype == torch.uint8 and q.numel() == w.numel() // 2
    rel = ((F.dequantize_4bit(q, st) - w).abs().mean() / w.abs().mean()).item()
    assert rel < 0.12  # NF4 of a Gaussian: ~9% mean relative error

    from firered_trainer.lora import _nf4_linear

    lin = torch.nn.Linear(128, 64)
    l4 = _nf4_linear(lin, torch.float32)
    x = torch.randn(3, 128, generator=g, requires_grad=True)
    y = l4(x)
    assert ((y - lin(x)).norm() / lin(x).norm()).item() < 0.15
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _cfg(tiny_model_dir, tmp_path, *extra):
    from firered_trainer.tinydata import make_tiny_pairs

    jsonl = make_tiny_pairs(tmp_path / "pairs", 4, size=64, seed=2)
    return load_config(CONFIG, [f"model.path={tiny_model_dir}", f"data.jsonl={jsonl}", f"output_dir={tmp_path / 'out'}",
                                "model.base_precision=nf4", *extra])


def test_nf4_base_memory_and_gradients(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from firered_core.formats.transformer_files import load_transformer
    from firered_trainer.lora import frozen_linear_bytes
    from firered_trainer.sft import build_transformer

    cfg = _cfg(tiny_model_dir, tmp_path)
    tr = build_transformer(cfg, torch.float32, "cpu")
    attn = tr.transformer_blocks[0].attn
    assert isinstance(attn.to_q, LoraLinear4bit) and isinstance(attn.to_q.base_layer, bnb.nn.Linear4bit)
    assert isinstance(tr.transformer_blocks[0].img_mlp.net[0].proj, bnb.nn.Linear4bit)  # untargeted: 4-bit too

    bf16 = frozen_linear_bytes(load_transformer(Path(tiny_model_dir) / "transformer", dtype=torch.bfloat16,
                                                weight_dtype="dequantize"))
    nf4 = frozen_linear_bytes(tr)
    ratio = nf4 / bf16
    print(f"frozen block linears: bf16 {bf16} B, nf4 {nf4} B, ratio {ratio:.4f}")
    # 4 bits + one float32 absmax per 64 weights = 0.5625 B/weight = 0.28125x bf16; the tiny
    # model's layers add a 64-byte NF4 code book each (~0.293x here, -> 0.281x for 20B)
    assert 0.27 < ratio < 0.30

    # gradients reach the adapters and nothing else
    x = torch.randn(1, 16, 64)
    tr.train()
    out = tr(hidden_states=x, encoder_hidden_states=torch.randn(1, 5, tr.config.joint_attention_dim),
             encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long), timestep=torch.tensor([0.5]),
             img_shapes=[[(1, 4, 4)]], return_dict=False)[0]
    out.pow(2).mean().backward()
    trained = {n for n, p in tr.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(".lora_" in n for n in trained)
    assert any(".lora_B." in n for n in trained)  # B starts at 0, so A gets its gradient from step 2


def test_nf4_sft_run_loss_falls(tiny_model_dir, tmp_path):
    from firered_trainer import sft

    cfg = _cfg(tiny_model_dir, tmp_path, "max_steps=10", "optim.lr=1e-2", "checkpoint.every=100")
    res = sft.run(cfg)
    print(f"nf4 base, eval loss {res.eval_loss_before:.4f} -> {res.eval_loss_after:.4f}")
    assert res.step == 10 and res.lora is not None and res.lora.is_file()
    assert res.eval_loss_after < res.eval_loss_before


@pytest.mark.parametrize("items, key", [
    (["train_mode=full", "model.base_precision=nf4"], "model.base_precision"),
    (["model.base_precision=nf4", "model.blocks_to_swap=4"], "model.blocks_to_swap"),
    (["model.base_precision=int4"], "model.base_precision"),
])
def test_nf4_config_errors(items, key):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIG, ["data.jsonl=x.jsonl", *items])
