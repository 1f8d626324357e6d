"""Benchmark: feature-cache bytes per sample against one variant's, drawn-only vs every variant.

Stochastic instruction alignment can show a 3-picture sample in 45 ways (the 15 orders and drops
of its pictures x English / Chinese / empty instruction). The SFT stage now encodes only the
variants its run draws (:func:`firered_trainer.features.planned_draws`); before, it encoded all of them.

1. Measured on the tiny model: 4 samples of 3 sources + a target at 64x64, an SFT run of
   ``--epochs`` passes over them (batch 2): the cache folder's bytes per sample and one variant's
   bytes (its text entry + the latents it reads), against a second cache where every variant of
   every sample was encoded (the old behaviour).
2. Estimated for the release (Qwen2.5-VL-7B, hidden 3584, bf16; pictures seen at 384^2 = 14 x 14
   merged vision tokens each; latents 16 x 128 x 128 bf16 at 1024^2): the same two figures from
   token counts.

    python bench/sia_cache_size.py [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def measured(epochs: int) -> dict:
    import torch

    from firered_core.formats.text_encoder_files import find_processor, load_text_encoder
    from firered_core.model import conditioning
    from firered_core.tiny import make_tiny
    from firered_trainer import cache as C
    from firered_trainer import features, sft
    from firered_trainer.config import load_config
    from tests.trainer.test_cache_lora import three_picture_pairs

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="sia_cache_"))
    model = make_tiny(tmp / "tiny", seed=0)
    jsonl = three_picture_pairs(tmp / "pairs", 4)
    cfg = load_config(ROOT / "firered_trainer/configs/tiny_cpu.yaml", [
        f"model.path={model}", f"data.jsonl={jsonl}", f"data.cache_dir={tmp / 'cache'}", f"output_dir={tmp / 'out'}",
        f"max_steps={2 * epochs}", "checkpoint.every=1000", "sia.text_dropout=0.05"])
    res = sft.run(cfg)
    samples = features.load_data(cfg)[0]
    drawn = folder_bytes(tmp / "cache") / len(samples)

    # the old behaviour: every variant of every sample, plus the same latents
    processor = find_processor(model_dir=model)
    te = load_text_encoder(model / "text_encoder", dtype=torch.float32, device="cpu", processor=processor).eval()
    eager_cache = C.FeatureCache(tmp / "eager")
    every = [v for s in samples for v in C.text_variants(s, cfg.sia)]
    C.extract_texts(every, eager_cache, lambda t, p: conditioning.encode_prompt(te, processor, t, p,
                                                                                dtype=torch.float32),
                    model_id=features.model_id(cfg), vl_resolution=cfg.data.vl_resolution)
    latents = folder_bytes(tmp / "cache" / "latents")
    eager = (folder_bytes(tmp / "eager") + latents) / len(samples)
    one = res.cache["variant"]
    shutil.rmtree(tmp, ignore_errors=True)
    return {"samples": len(samples), "epochs": epochs, "variants_possible": len(every) / len(samples),
            "variants_drawn": res.cache["variants_per_sample"], "one_variant_bytes": one,
            "drawn_bytes_per_sample": drawn, "drawn_ratio": drawn / one,
            "eager_bytes_per_sample": eager, "eager_ratio": eager / one}


def estimated(epochs: int, hidden: int = 3584, bytes_per: int = 2, vision_tokens: int = 196) -> dict:
    """Release-size figures from token counts: per picture ``Picture N: <vision_start>`` + 196
    merged vision tokens + ``<vision_end>`` (~203 tokens), plus ~20 for the instruction and the
    chat template's tail; latents 16 x 128 x 128 for the target and each reference."""
    from types import SimpleNamespace

    from firered_trainer import sia

    s = SimpleNamespace(drop_prob=0.2, shuffle=True)
    orders = sia.possible_orders("blend the pictures into one", 3, s)
    text = lambda k: (k * (vision_tokens + 7) + 20) * hidden * bytes_per  # noqa: E731
    latent = 16 * 128 * 128 * bytes_per
    choices = 3  # English, Chinese, empty
    every_text = choices * sum(text(len(o)) for o in orders)
    mean_text = every_text / (choices * len(orders))
    mean_latents = latent * (1 + sum(len(o) for o in orders) / len(orders))
    one = mean_text + mean_latents
    all_latents = 4 * latent
    drawn = min(epochs, choices * len(orders)) * mean_text + all_latents
    eager = every_text + all_latents
    return {"variants_possible": choices * len(orders), "one_variant_bytes": one,
            "drawn_bytes_per_sample": drawn, "drawn_ratio": drawn / one,
            "eager_bytes_per_sample": eager, "eager_ratio": eager / one}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2, help="passes over the data (each sample drawn about this often)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    m, e = measured(args.epochs), estimated(args.epochs + 1)  # + 1: the fixed evaluation draw
    for name, r in (("tiny model, measured", m), ("7B release, estimated", e)):
        print(f"{name}: one variant {r['one_variant_bytes'] / 1e6:.3f} MB; per 3-picture sample drawn-only "
              f"{r['drawn_bytes_per_sample'] / 1e6:.3f} MB = {r['drawn_ratio']:.2f}x, every variant "
              f"({r['variants_possible']:.0f}) {r['eager_bytes_per_sample'] / 1e6:.3f} MB = {r['eager_ratio']:.1f}x")
    print(json.dumps({"measured": m, "estimated": e}, indent=1))


if __name__ == "__main__":
    main()
