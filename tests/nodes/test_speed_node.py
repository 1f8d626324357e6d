"""FireRed Speed & Memory: the memory plans give the plain run's picture; the settings ride on a
new MM-DiT part, the loaded one is unchanged."""

import torch

from tests.nodes.test_nodes import SMALL, image, node, sample_kwargs


def settings(pack, dit, **over):
    w = dict(memory_plan="auto", blocks_resident=-1, budget_gb=0.0, attention="sdpa", cache_threshold=0.0, cache_warmup=3, compile=False)
    w.update(over)
    return node(pack, "FireRedSpeedMemory").apply(dit, **w)[0]


def test_memory_plans_give_the_resident_picture_bit_for_bit(pack, loaded):
    dit, te, vae = loaded
    cond = node(pack, "FireRedEditEncode").encode(te, vae, "make it green", " ", image1=image(4), **SMALL)[0]
    s = node(pack, "FireRedSampler")
    kw = sample_kwargs(steps=3)
    plain = s.sample(dit, cond, **kw)[0]["samples"]
    for plan, blocks in (("block_swap", 1), ("sequential", -1), ("auto", -1)):
        fast = settings(pack, dit, memory_plan=plan, blocks_resident=blocks)
        assert fast.memory is not None and dit.memory is None and fast.transformer is dit.transformer
        out = s.sample(fast, cond, **kw)[0]["samples"]
        assert torch.equal(out, plain), plan
    assert all(p.device.type == "cpu" for p in dit.transformer.parameters())


def test_step_cache_setting_reaches_the_sampler(pack, loaded):
    dit, te, vae = loaded
    cond = node(pack, "FireRedEditEncode").encode(te, vae, "make it green", " ", image1=image(4), **SMALL)[0]
    s = node(pack, "FireRedSampler")
    kw = sample_kwargs(steps=8, cfg=1.0)
    plain = s.sample(dit, cond, **kw)[0]["samples"]
    cached = s.sample(settings(pack, dit, memory_plan="off", cache_threshold=0.5, cache_warmup=1), cond, **kw)[0]["samples"]
    rel = ((cached - plain).norm() / plain.norm()).item()
    assert 0 < rel < 0.2, rel  # steps were skipped (not identical), the picture stays close
    again = s.sample(dit, cond, **kw)[0]["samples"]
    assert torch.equal(again, plain)  # the plain MM-DiT part runs without the cache


def test_vae_tiling_and_fp8_matmul_settings_reach_the_models(pack, models_env):
    root, files = models_env
    vae = node(pack, "FireRedVAELoader").load(files["vae"].name, "fp32", False, True)[0]
    assert vae.model.use_tiling  # diffusers' tiled encode / decode is on
    plain = node(pack, "FireRedVAELoader").load(files["vae"].name, "fp32", False)[0]
    assert not plain.model.use_tiling
    dit = node(pack, "FireRedModelLoader").load(files["transformer"].name, "auto", "fp32", False)[0]
    assert settings(pack, dit, fp8_matmul=True).speed.fp8_matmul


def test_every_node_that_runs_the_mmdit_honours_the_memory_plan(pack, loaded, monkeypatch):
    """With block swap chosen in FireRed Speed & Memory, the sampler, the one-node edit and Auto
    Edit Mask each stream the MM-DiT through the block swapper (installed once per run, with the
    chosen number of resident blocks), not move it whole; the one-node edit gives the resident
    run's picture bit for bit."""
    import sys

    from tests.nodes.conftest import PACK_NAME

    dit, te, vae = loaded
    mem = sys.modules[f"{PACK_NAME}.firered_core.runtime.blockswap"]
    installs = []
    real_install = mem.BlockSwapper.install

    def install(self, *a, **k):
        installs.append(self)
        return real_install(self, *a, **k)

    monkeypatch.setattr(mem.BlockSwapper, "install", install)
    swap = settings(pack, dit, memory_plan="block_swap", blocks_resident=1)
    cond = node(pack, "FireRedEditEncode").encode(te, vae, "make it green", " ", image1=image(4), **SMALL)[0]
    counts = {}
    node(pack, "FireRedSampler").sample(swap, cond, **sample_kwargs(steps=2))
    counts["FireRedSampler"] = len(installs)
    edit_kw = dict(seed=7, steps=2, cfg=4.0, sampler="euler", schedule="flowmatch", shift=0.0, width=64, height=64, **SMALL)
    swapped = node(pack, "FireRedEdit").edit(swap, te, vae, "make it green", " ", image1=image(4), **edit_kw)[0]
    counts["FireRedEdit"] = len(installs) - counts["FireRedSampler"]
    node(pack, "FireRedAutoMask").estimate(swap, cond, seed=7, steps=4, cfg=4.0, schedule="flowmatch", estimate_steps=1,
                                           threshold=0.0, smooth=1.0, width=64, height=64, source_picture=1)
    counts["FireRedAutoMask"] = len(installs) - counts["FireRedSampler"] - counts["FireRedEdit"]
    assert counts == {"FireRedSampler": 1, "FireRedEdit": 1, "FireRedAutoMask": 1}, counts
    assert all(sw.resident == 1 for sw in installs)
    resident = node(pack, "FireRedEdit").edit(dit, te, vae, "make it green", " ", image1=image(4), **edit_kw)[0]
    assert len(installs) == 3  # the part without memory options is not streamed
    assert torch.equal(swapped, resident)
