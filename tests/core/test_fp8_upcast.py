"""fp8 layers on the CPU: the fast byte-level upcast is bit-exact for every fp8 code, and the kept
upcast copy (``FP8Linear.keep_upcast``) computes the same numbers, is kept only where the stated
rule allows, and is dropped when the layer moves."""

import pytest
import torch

from firered_core.formats import fp8_layers as tf
from firered_core.formats.fp8_layers import FP8Linear, fp8_to, set_fp8_upcast, upcast_bytes


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_upcast_is_bit_exact_for_every_code(fp8, dtype):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ref = codes.view(fp8).to(dtype)
    t, f = fp8_to(codes, fp8, dtype)
    got = t.float() * f
    finite = torch.isfinite(ref.float())
    assert torch.equal(got[finite], ref.float()[finite])
    if fp8 == torch.float8_e4m3fn and dtype != torch.float16:
        assert f == 2.0**120  # the byte trick ran, not the fallback


def layer(scaled="channel", out=48, inn=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.05
    scale = {"channel": w.abs().amax(1, keepdim=True) / 448, "tensor": w.abs().max().reshape(1) / 448, None: None}[scaled]
    q = (w / (scale if scale is not None else 1.0)).to(torch.float8_e4m3fn)
    return FP8Linear(q, torch.randn(out, generator=g), scale)


@pytest.mark.parametrize("scaled", ["channel", "tensor", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_weight_equals_the_plain_formula(scaled, dtype):
    m = layer(scaled)
    ref = m.weight_fp8.view(torch.float8_e4m3fn).to(dtype)
    if m.weight_scale is not None:
        ref = ref * m.weight_scale.to(dtype)
    assert torch.equal(m.dequantized_weight(dtype), ref)


def count_dequantizations(monkeypatch):
    calls = []
    orig = FP8Linear.dequantized_weight

    def counted(self, dtype=None):
        calls.append(dtype)
        return orig(self, dtype)

    monkeypatch.setattr(FP8Linear, "dequantized_weight", counted)
    return calls


def test_kept_copy_is_used_and_computes_the_same(monkeypatch):
    m = layer()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    m.keep_upcast = False
    plain = m(x)
    calls = count_dequantizations(monkeypatch)
    m.keep_upcast = True
    with torch.inference_mode():  # a copy made in inference mode still serves autograd later
        first = m(x)
    second = m(x)
    assert len(calls) == 1, "the second call must reuse the kept upcast copy"
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert upcast_bytes(m) == 48 * 64 * 2
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()
    assert xg.grad is not None and len(calls) == 1
    m(x.float())  # another dtype: a new copy
    assert len(calls) == 2
    m.to(torch.device("cpu"))  # moving (any _apply) drops it
    assert upcast_bytes(m) == 0
    set_fp8_upcast(m, False)
    m(x)
    m(x)
    assert len(calls) == 4 and upcast_bytes(m) == 0


def test_automatic_rule_keeps_only_on_the_cpu_when_memory_allows(monkeypatch):
    m = layer()
    x = torch.randn(3, 64)
    assert m.keep_upcast is None  # the default is the rule
    monkeypatch.setattr(tf, "_meminfo", lambda: (100 << 30, 128 << 30))  # 100 of 128 GiB available
    m(x)
    assert upcast_bytes(m) == 48 * 64 * 4
    m.drop_upcast()
    monkeypatch.setattr(tf, "_meminfo", lambda: (30 << 30, 128 << 30))  # under a quarter left: not kept
    m(x)
    assert upcast_bytes(m) == 0
    monkeypatch.setattr(tf, "_meminfo", lambda: None)  # unknown: not kept
    m(x)
    assert upcast_bytes(m) == 0
    assert tf.upcast_fits(1 << 20) is False
