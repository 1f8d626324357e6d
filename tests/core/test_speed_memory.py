"""Speed and memory options (issue #8), on the tiny model, float32, CPU.

- memory plans (block swap, offload, sequential) give the everything-resident edit bit for bit;
- the step cache off is bit-identical; on, it skips exactly the block evaluations it reports and
  stays within a measured deviation;
- the memory planner picks the documented plan (the table in firered_core/runtime/memory.py);
- int8 / scaled-fp8 weights stay within measured deviations; fp8 matmul matches the upcast layer;
- an attention backend that is not installed falls back to SDPA with a log line.

Weights loaded by diffusers' ``from_pretrained`` are views of the memory-mapped safetensors file
(8-byte aligned); the CPU BLAS takes another path for them than for 64-byte-aligned fresh tensors
(measured: 1e-6 apart). Block swap always computes with fresh copies, so the resident reference
here is given fresh copies too (``_realign``) -- the comparison is then of the same arithmetic.
"""

import logging

import pytest
import torch

from firered_core import FireRedEditor
from firered_core.runtime.blockswap import BlockSwapper
from firered_core.runtime.memory import GB, MemoryOptions, ModelSizes, plan_memory
from firered_core.runtime.speed import SpeedOptions
from firered_core.runtime.step_cache import StepCache
from tests.conftest import make_picture

EDIT = dict(steps=6, cfg=4.0, seed=3, width=64, height=48, ref_area=64 * 48, vl_area=64 * 64)


def _realign(*modules):
    for m in modules:
        for p in m.parameters():
            p.data = p.data.clone()
        for mod in m.modules():
            for k, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[k] = b.clone()


@pytest.fixture(scope="module")
def editor(tiny_model_dir):
    ed = FireRedEditor.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    _realign(ed.c.transformer, ed.c.text_encoder, ed.c.vae)
    return ed


@pytest.fixture(scope="module")
def picture():
    return make_picture(64, 48, seed=1)


@pytest.fixture(scope="module")
def base(editor, picture):
    return editor.edit(picture, "make the disc red", **EDIT)


@pytest.mark.parametrize(
    "options",
    [
        MemoryOptions(plan="block_swap", blocks_resident=0),
        MemoryOptions(plan="block_swap", blocks_resident=1, prefetch=2),
        MemoryOptions(plan="offload_encoders"),
        MemoryOptions(plan="sequential"),
    ],
    ids=["swap0", "swap1", "offload", "sequential"],
)
def test_memory_plans_are_bit_identical(editor, picture, base, options):
    try:
        info = editor.configure(memory=options)
        assert info["memory_plan"].startswith(options.plan)
        r = editor.edit(picture, "make the disc red", **EDIT)
        assert torch.equal(r.latents, base.latents)
        assert torch.equal(r.pixels, base.pixels)
        swapper = editor.memory.swappers.get("transformer")
        if options.plan in ("block_swap", "sequential"):
            n_blocks = len(editor.c.transformer.transformer_blocks)
            streamed = n_blocks - (options.blocks_resident or 0)
            # every forward copies each streamed block in: 6 steps x 2 (cond, uncond, unbatched on CPU)
            assert swapper.copies >= 12 * streamed
        # offload() / to_device() round trip, as a ComfyUI node does after it finishes
        editor.offload()
        r2 = editor.edit(picture, "make the disc red", **EDIT)
        assert torch.equal(r2.latents, base.latents)
    finally:
        editor.configure(memory=MemoryOptions(plan="resident"))


def test_block_swapper_restores_weights(editor):
    tr = editor.c.transformer
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    sw = BlockSwapper(tr, resident=1, device="cpu").install()
    sw.uninstall("cpu")
    after = tr.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not tr.transformer_blocks[1]._forward_pre_hooks


def test_block_swap_spreads_the_streamed_blocks_for_inference_and_streams_the_tail_for_training():
    """Inference streams blocks spread through the list (each copy then overlaps resident compute
    before it); training streams the last ones. Either way a forward computes the unswapped one."""
    torch.manual_seed(0)
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(6))

    def forward(x):
        for b in root.blocks:
            x = torch.tanh(b(x))
        return x

    x = torch.randn(3, 8)
    want = forward(x)
    for training, streamed in ((False, [0, 2, 3, 5]), (True, [2, 3, 4, 5])):
        sw = BlockSwapper(root, [root.blocks], resident=2, device="cpu", training=training)
        assert sw.streamed == streamed
        sw.install()
        try:
            assert sorted(sw._masters) == streamed
            assert torch.equal(forward(x), want)
        finally:
            sw.uninstall("cpu")
    assert BlockSwapper(root, [root.blocks], resident=0, device="cpu").streamed == list(range(6))
    assert BlockSwapper(root, [root.blocks], resident=6, device="cpu").streamed == []


def test_cache_off_is_bit_identical(editor, picture, base):
    try:
        editor.configure(speed=SpeedOptions(cache_threshold=0.0))
        assert torch.equal(editor.edit(picture, "make the disc red", **EDIT).latents, base.latents)
        # the cache installed but never allowed to skip runs the same arithmetic
        from firered_core import pipeline

        cache = StepCache(editor.c.transformer, threshold=0.0, compute_blocks=1, warmup=1)
        orig = SpeedOptions.step_cache
        SpeedOptions.step_cache = lambda self, tr: cache
        try:
            r = editor.edit(picture, "make the disc red", **EDIT)
        finally:
            SpeedOptions.step_cache = orig
        assert torch.equal(r.latents, base.latents)
        assert cache.stats.blocks_skipped == 0 and cache.stats.forwards == 12
        assert pipeline.FireRedEditor is type(editor)
    finally:
        editor.configure(speed=SpeedOptions())


@pytest.mark.parametrize("order", [0, 1])
def test_cache_skips_what_it_reports(editor, picture, base, order):
    """On this random tiny model the first block's residual changes by a relative L1 of 0.22-0.36
    between steps, so threshold 0.3 skips some forwards. Measured latent deviation (relative L2):
    0.0011 (order 0), 0.0024 (order 1) -- bounded at 0.01."""
    calls = []
    handles = [b.register_forward_hook(lambda *a: calls.append(1)) for b in editor.c.transformer.transformer_blocks]
    try:
        editor.configure(speed=SpeedOptions(cache_threshold=0.3, cache_compute_blocks=1, cache_warmup=2,
                                            cache_taylor_order=order))
        r = editor.edit(picture, "make the disc red", **EDIT)
    finally:
        for h in handles:
            h.remove()
        editor.configure(speed=SpeedOptions())
    stats = r.info["cache"]
    n = len(editor.c.transformer.transformer_blocks)
    assert stats["forwards"] == 12 and stats["cached_forwards"] >= 2
    assert stats["blocks_skipped"] == stats["cached_forwards"] * (n - 1)
    assert len(calls) == stats["forwards"] * n - stats["blocks_skipped"] == stats["blocks_run"]
    dev = ((r.latents - base.latents).norm() / base.latents.norm()).item()
    assert 0 < dev < 0.01


REAL_BF16, REAL_FP8, REAL_FP8_TE8 = ModelSizes.real(2, 2), ModelSizes.real(1, 2), ModelSizes.real(1, 1)
PLAN_TABLE = [  # free GB, sizes, (plan, blocks resident, DiT yields)  -- the table in memory.py
    (80, REAL_BF16, ("resident", None, False)),
    (64, REAL_BF16, ("offload_encoders", None, False)),
    (48, REAL_BF16, ("offload_encoders", None, True)),
    (40, REAL_BF16, ("block_swap", 50, True)),
    (32, REAL_BF16, ("block_swap", 39, True)),
    (24, REAL_BF16, ("block_swap", 28, True)),
    (16, REAL_BF16, ("sequential", 0, False)),
    (64, REAL_FP8, ("resident", None, False)),
    (40, REAL_FP8, ("offload_encoders", None, True)),
    (24, REAL_FP8, ("block_swap", 56, True)),
    (12, REAL_FP8, ("sequential", 0, False)),
    (40, REAL_FP8_TE8, ("resident", None, False)),
    (32, REAL_FP8_TE8, ("offload_encoders", None, False)),
    (16, REAL_FP8_TE8, ("block_swap", 34, True)),
    (12, REAL_FP8_TE8, ("block_swap", 23, True)),
    (8, REAL_FP8_TE8, ("sequential", 0, False)),
]


@pytest.mark.parametrize("free_gb,sizes,expected", PLAN_TABLE)
def test_planner_table(free_gb, sizes, expected):
    plan = plan_memory(free_gb * GB, sizes)
    assert (plan.name, plan.blocks_resident, plan.transformer_yields) == expected
    assert plan.peak_bytes <= free_gb * GB
    assert plan.vae_tiling == (plan.name == "sequential")


def test_planner_limits_and_overrides():
    with pytest.raises(ValueError, match="not enough device memory"):
        plan_memory(6 * GB, REAL_BF16)
    with pytest.raises(ValueError, match="memory plan must be"):
        plan_memory(24 * GB, REAL_BF16, plan="fast")
    forced = plan_memory(24 * GB, REAL_BF16, plan="block_swap", blocks_resident=10)
    assert (forced.name, forced.blocks_resident) == ("block_swap", 10)
    assert plan_memory(80 * GB, REAL_BF16, width=2560, height=2048).vae_tiling  # > 4 MP: tiled
    with pytest.raises(ValueError, match="blocks_resident"):
        MemoryOptions(blocks_resident=-1)


@pytest.mark.parametrize("mode,bound", [("int8", 0.002), ("fp8_scaled", 0.01)])
def test_quantized_weights_edit(tiny_model_dir, picture, base, mode, bound):
    """Measured latent deviation (relative L2) after 6 steps: int8 0.00026, scaled fp8 e4m3 0.0014."""
    from firered_core.runtime import precision

    ed = FireRedEditor.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    n = precision.quantize_weights(ed.c.transformer, mode)
    assert n == 14 * len(ed.c.transformer.transformer_blocks)  # 8 attention + 4 MLP + 2 modulation
    r = ed.edit(picture, "make the disc red", **EDIT)
    dev = ((r.latents - base.latents).norm() / base.latents.norm()).item()
    assert 0 < dev < bound


def _rowwise_scaled_mm_runs() -> bool:
    """Whether this torch build's ``_scaled_mm`` takes row-wise float32 scales with a bf16 output on the CPU."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    b = torch.ones(16, 16).to(torch.float8_e4m3fn).t()
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tensor-scaled", "rowwise-scaled"])
def test_fp8_matmul_matches_upcast_layer(dtype):
    """torch._scaled_mm (it runs on the CPU too) with a per-tensor activation scale, the weight's
    per-channel scale applied after the matmul (float32 input) or by the kernel (bf16 input).
    Measured relative error against the upcast fp8 layer (the activation's e4m3 rounding):
    0.026 (float32), 0.026 (bf16); bounded at 0.06."""
    from firered_core.runtime import precision

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(dtype)
    q = precision.fp8_scaled_linear(lin)
    x = torch.randn(2, 10, 64, dtype=dtype)
    ref = q(x)
    wrapper = torch.nn.Sequential(q)
    assert precision.enable_fp8_matmul(wrapper, force=True) == 1
    y = q(x)
    assert type(q) is precision.FP8MatmulLinear and y.shape == ref.shape and y.dtype == dtype
    # the layer uses the kernel's row-wise scales exactly where this torch build's kernel takes them
    # (torch 2.14's CPU kernel does, 2.11's does not), else the weight scale after the matmul
    if dtype == torch.bfloat16:
        assert q._mode == ("rowwise" if _rowwise_scaled_mm_runs() else "tensor")
    assert q._mode != "off"  # the fp8 kernel ran (float32 input: always the weight scale after it)
    rel = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    assert 0 < rel < 0.06
    precision.disable_fp8_matmul(wrapper)
    assert torch.equal(q(x), ref)


def test_a_refused_fp8_matmul_downgrades_only_that_layer(monkeypatch):
    """A layer whose shape or device the fp8 kernel refuses falls back to the upcast path; the
    other layers keep their fp8 matmul (the state is per layer, not per process)."""
    from firered_core.runtime import precision

    torch.manual_seed(0)
    refused, ok = (precision.fp8_scaled_linear(torch.nn.Linear(64, n).to(torch.bfloat16)) for n in (32, 48))
    wrapper = torch.nn.Sequential(refused, ok)
    assert precision.enable_fp8_matmul(wrapper, force=True) == 2
    real, calls, rowwise = torch._scaled_mm, [], _rowwise_scaled_mm_runs()

    def scaled_mm(a, b, *args, **kw):
        calls.append(b.shape[1])
        if b.shape[1] == 32:  # the kernel refuses this layer
            raise RuntimeError("unsupported")
        return real(a, b, *args, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = refused(x)
    assert refused._mode == "off" and torch.equal(y, precision.FP8Linear.forward(refused, x))
    calls.clear()
    ok(x)
    # still the fp8 kernel (row-wise scales where this build's kernel takes them: once, else twice)
    assert (ok._mode, calls) == (("rowwise", [48]) if rowwise else ("tensor", [48, 48]))
    assert precision.FP8MatmulLinear._mode == "rowwise"  # a layer enabled later starts on the fp8 path


def test_attention_fallback_logs(editor, caplog):
    from firered_core.runtime.attention import current_attention, set_attention

    with caplog.at_level(logging.WARNING, logger="firered_core.runtime.attention"):
        assert set_attention(editor.c.transformer, "flash") == "native"
    assert "not available" in caplog.text and "using PyTorch SDPA" in caplog.text
    assert current_attention(editor.c.transformer) == "native"
    with pytest.raises(ValueError, match="unknown"):
        set_attention(editor.c.transformer, "fastest")


def test_cli_speed_memory_flags():
    """The flags become the options FireRedEditor.configure takes (a whole CLI edit runs at the
    1024^2 reference area and is covered by tests/core/test_cli.py)."""
    from firered_core.cli import _parser, _speed_memory

    args = _parser().parse_args(["edit", "--prompt", "x", "--out", "o.png", "--blocks-resident", "3",
                                 "--cache-threshold", "0.1", "--attention", "sage", "--compile",
                                 "--weight-dtype", "int8", "--memory-budget", "24"])
    speed, memory = _speed_memory(args)
    assert (memory.plan, memory.blocks_resident, memory.budget_gb) == ("block_swap", 3, 24.0)
    assert (speed.cache_threshold, speed.attention, speed.compile) == (0.1, "sage", True)
    assert args.weight_dtype == "int8"
    plain = _parser().parse_args(["edit", "--prompt", "x", "--out", "o.png"])
    assert _speed_memory(plain) == (None, None)  # no flags: the editor is left as loaded
