"""The cost of one DiffusionNFT iteration on the tiny model, split into rollout, reward and update.

    python bench/nft_cost.py                          # brightness reward, 64x64, group 8, 8 Euler steps
    python bench/nft_cost.py --reward ocr --size 128  # the layout-aware OCR reward (rapidocr on the CPU)

Builds the tiny random model in a temporary folder, runs ``--warmup`` iterations, then times
``--iters`` iterations of :meth:`firered_trainer.rl.nft.NFTRun.iteration` (the stage's own code) and prints
the mean seconds of each part and its share.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reward", default="brightness", help="brightness | colour | ocr | consistency")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()

    import torch
    from PIL import Image

    from firered_core.tiny import make_tiny
    from firered_trainer.config import load_config
    from firered_trainer.rl import nft

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny(tmp / "tiny", seed=0)
        Image.new("RGB", (args.size, args.size), (90, 120, 150)).save(tmp / "src.png")
        rec = {"instruction": 'write "SALE" on the sign', "source_image": "src.png"}
        (tmp / "p.jsonl").write_text(json.dumps(rec) + "\n")
        cfg = load_config({
            "model.path": str(model), "data.jsonl": str(tmp / "p.jsonl"), "output_dir": str(tmp / "out"),
            "nft.reward": args.reward, "nft.group_size": args.group, "nft.sample_steps": args.sample_steps,
            "nft.width": args.size, "nft.height": args.size, "data.ref_resolution": args.size, "data.vl_resolution": 56,
            "lora.rank": 4, "lora.alpha": 8, "model.dtype": "fp32", "device": "cpu", "nft.micro_batch": args.group,
            "optim.lr": 1e-3,
        }, stage="nft")  # fmt: skip
        run = nft.NFTRun(cfg)
        for _ in range(args.warmup):
            run.iteration()
        rows = [run.iteration() for _ in range(args.iters)]
    parts = {k: sum(r[f"t_{k}"] for r in rows) / len(rows) for k in ("rollout", "reward", "update")}
    total = sum(parts.values())
    print(f"one NFT iteration, tiny model, {args.size}x{args.size}, group {args.group}, {args.sample_steps} Euler steps, "
          f"reward {args.reward!r}, {torch.get_num_threads()} threads (mean of {args.iters}):")
    for k, v in parts.items():
        print(f"  {k:8s} {v * 1000:8.1f} ms  {100 * v / total:5.1f} %")
    print(f"  {'total':8s} {total * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
