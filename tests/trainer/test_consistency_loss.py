"""The SFT consistency loss (``objective.consistency_weight`` = eta, ``objective.consistency_mask:
auto``): its gradient pulls x0_hat toward the source outside the edit region only, it is zero at
and above sigma 0.9, and a short tiny-model SFT run with it keeps the unedited region closer to
the source than the same run without it.

The tiny pairs of :func:`firered_trainer.tinydata.make_tiny_pairs` swap red and blue over the whole
picture (nothing would be kept); here their targets are rewritten as the source with its left
24 pixel columns (three latent cells) inverted, a local edit whose keep region the auto mask finds
from the pair. The tiny model's random VAE barely moves its latents (std 0.38; the inverted half changes
them by ~0.03, and spills ~0.01 to the right), so these tests set ``consistency_threshold=0.015``
(the default 0.1 is for the real VAE's unit-variance latents); that keeps ~47% of the cells.

Measured (this test, 12 steps, lr 1e-2, CPU, one thread): keep-region MSE of x0_hat vs the source
at sigma 0.1/0.3/0.5/0.7 -- 0.2862 without the term, 0.2855 with eta=4. Small, because in the kept
cells the target already equals the source, so the term only re-weights the flow loss there."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from firered_trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "firered_trainer" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# the term itself
# ---------------------------------------------------------------------------------------------


def _synthetic(sigma: float):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, 16, 64, generator=g)
    keep = torch.ones_like(src)
    keep[:, :6] = 0  # tokens 0-5 are the edit region
    x_t = torch.randn(2, 16, 64, generator=g)
    v = torch.randn(2, 16, 64, generator=g).requires_grad_(True)
    return src, keep, x_t, v, torch.full((2,), sigma)


def test_gradient_pulls_x0_hat_toward_the_source_outside_the_edit_region():
    from firered_trainer.sft import consistency_term

    src, keep, x_t, v, sigma = _synthetic(0.5)
    loss = consistency_term(x_t, v, sigma, src, keep, eta=1.0)
    assert loss.shape == (2,) and (loss > 0).all()
    loss.sum().backward()
    assert v.grad[:, :6].abs().max() == 0  # the edit region is free
    assert v.grad[:, 6:].abs().min() > 0
    with torch.no_grad():
        x0_before = x_t - sigma.view(-1, 1, 1) * v
        x0_after = x_t - sigma.view(-1, 1, 1) * (v - 0.1 * v.grad)  # one gradient step on v
        err = lambda x: ((x - src)[:, 6:] ** 2).mean().item()  # noqa: E731
        assert err(x0_after) < err(x0_before)
        assert torch.equal(x0_after[:, :6], x0_before[:, :6])
    # eta sigma^2: the value is the schedule times the region MSE
    mse = ((x0_before - src)[:, 6:] ** 2).flatten(1).mean(1)
    assert torch.allclose(loss.detach(), 0.25 * mse, rtol=1e-5)


@pytest.mark.parametrize("s", [0.9, 0.95, 1.0])
def test_zero_at_and_above_sigma_0_9(s):
    from firered_trainer.sft import consistency_term

    src, keep, x_t, v, sigma = _synthetic(s)
    loss = consistency_term(x_t, v, sigma, src, keep, eta=5.0)
    assert torch.equal(loss.detach(), torch.zeros(2))
    loss.sum().backward()
    assert v.grad.abs().max() == 0


def test_auto_keep_mask_and_config():
    from firered_trainer.sft import auto_keep_mask

    src = torch.randn(16, 8, 8)
    tgt = src.clone()
    tgt[:, 2:4, 2:4] += 1.0
    tgt[:, 6, 6] += 0.05  # below the threshold: still kept
    keep = auto_keep_mask(src, tgt, 0.1)
    assert keep.shape == (1, 8, 8) and keep.sum() == 60 and keep[0, 2:4, 2:4].sum() == 0
    base = ["data.jsonl=x.jsonl"]
    assert load_config(CONFIG, base).objective.consistency_weight == 0
    for bad, key in ((["objective.consistency_weight=-1"], "objective.consistency_weight"),
                     (["objective.consistency_mask=edges"], "objective.consistency_mask"),
                     (["objective.consistency_threshold=0"], "objective.consistency_threshold")):
        with pytest.raises(ConfigError, match=key):
            load_config(CONFIG, base + bad)


# ---------------------------------------------------------------------------------------------
# a short tiny-model SFT run
# ---------------------------------------------------------------------------------------------


def _local_edit_pairs(root: Path) -> Path:
    from firered_trainer.tinydata import make_tiny_pairs

    jsonl = make_tiny_pairs(root, 4, size=64, seed=3)
    for src in sorted((root / "img").glob("*_src.png")):
        arr = np.asarray(Image.open(src)).copy()
        arr[:, :24] = 255 - arr[:, :24]  # the edit: the left three latent columns inverted, the rest kept
        Image.fromarray(arr).save(src.with_name(src.name.replace("_src", "_tgt")))
    return jsonl


def _kept_error(cfg, lora_file, sigmas=(0.1, 0.3, 0.5, 0.7)) -> float:
    """Mean over the pairs and sigmas of the keep-region MSE between x0_hat and the source latent
    (fixed noise), for the tiny model with the trained LoRA."""
    from firered_core import flow
    from firered_core.consistency import region_consistency
    from firered_core.formats.transformer_files import load_transformer
    from firered_trainer import cache as cache_mod
    from firered_trainer.lora import add_lora, load_lora_weights_into
    from firered_trainer.sft import Collator, load_data, model_id, predict_velocity

    tr = load_transformer(Path(cfg.model.path) / "transformer", dtype=torch.float32, weight_dtype="dequantize")
    add_lora(tr, rank=cfg.lora.rank, alpha=cfg.lora.alpha, modules=cfg.lora_modules())
    load_lora_weights_into(tr, lora_file)
    tr.eval()
    samples = load_data(cfg)[0]
    collate = Collator(cfg, cache_mod.FeatureCache(cfg.data.cache_dir), model_id(cfg))
    gen = torch.Generator().manual_seed(123)
    errs = []
    with torch.no_grad():
        for k, s in enumerate(samples):
            ex = collate(s, random.Random(k))
            assert ex.src is not None
            for sg in sigmas:
                x0 = ex.x0.unsqueeze(0).float()
                sigma = torch.tensor([sg])
                x_t = flow.add_noise(x0, torch.randn(x0.shape, generator=gen), sigma)
                v = predict_velocity(tr, x_t, sigma, ex.refs.unsqueeze(0), [ex.text], ex.img_shapes, torch.float32)
                x0_hat = flow.v_to_x0(x_t, v.float(), sg)
                errs.append(region_consistency(x0_hat, ex.src.unsqueeze(0), ex.keep.unsqueeze(0)).item())
    return float(np.mean(errs))


def test_sft_run_with_consistency_keeps_the_unedited_region(tiny_model_dir, tmp_path):
    from firered_trainer import sft

    root = tmp_path / "pairs"
    jsonl = _local_edit_pairs(root)
    results = {}
    for eta in (0.0, 4.0):
        out = tmp_path / f"run_eta{eta}"
        cfg = load_config(CONFIG, [
            f"model.path={tiny_model_dir}", f"data.jsonl={jsonl}", f"data.cache_dir={root / 'cache'}",
            f"output_dir={out}", "max_steps=12", "optim.lr=1e-2", "checkpoint.every=100", "sia.drop_prob=0",
            f"objective.consistency_weight={eta}", "objective.consistency_threshold=0.015",
        ])
        res = sft.run(cfg)
        assert res.step == 12 and all(np.isfinite(res.losses))
        cfg_eval = load_config(CONFIG, [f"model.path={tiny_model_dir}", f"data.jsonl={jsonl}",
                                        f"data.cache_dir={root / 'cache'}", "objective.consistency_weight=1",
                                        "objective.consistency_threshold=0.015",
                                        "sia.drop_prob=0", "sia.chinese_prob=0"])
        results[eta] = (_kept_error(cfg_eval, res.lora), res.losses)
    print("kept-region x0_hat MSE vs source:", {k: round(v[0], 5) for k, v in results.items()})
    assert results[4.0][1] != results[0.0][1]  # the term was active (same seeds, different losses)
    assert results[4.0][0] < results[0.0][0]
