"""A tiny edit dataset for tests and the README demo: ``n`` pairs of small pictures where the
target is the source with its red and blue channels swapped and a bright square added (a simple,
learnable edit), written as FireRed JSONL (plus a text-to-image row and optional bad rows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _picture(size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    a, b, c = rng.uniform(0.2, 0.8, 3)
    cx, cy = rng.uniform(0.3, 0.7, 2)
    disc = (((x - cx) ** 2 + (y - cy) ** 2) < 0.06).astype(np.float32)
    arr = np.stack([a * x + 0.2 * disc, b * y, c * (1 - x) + 0.5 * disc], -1)
    return np.clip(arr + rng.normal(0, 0.02, arr.shape), 0, 1)


def make_tiny_pairs(folder, n: int = 8, *, size: int = 64, seed: int = 0, t2i: int = 0,
                    bad_lines: bool = False) -> Path:
    """Write ``folder/pairs.jsonl`` and its pictures; returns the JSONL path. ``bad_lines`` adds a
    broken JSON line and a row whose picture is missing (each should be skipped and counted)."""
    root = Path(folder)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        src = _picture(size, rng)
        tgt = src[..., ::-1].copy()
        s = size // 4
        tgt[s : 2 * s, s : 2 * s] = 1.0
        for name, arr in ((f"{i:03d}_src.png", src), (f"{i:03d}_tgt.png", tgt)):
            Image.fromarray((arr * 255).astype(np.uint8)).save(root / "img" / name)
        lines.append(json.dumps({
            "source_image": f"img/{i:03d}_src.png", "target_image": f"img/{i:03d}_tgt.png",
            "instruction": "swap red and blue in Picture 1 and add a white square",
            "instruction_cn": "交换图1的红色和蓝色并加一个白色方块", "task": "edit",
        }, ensure_ascii=False))
    for i in range(t2i):
        arr = _picture(size, rng)
        Image.fromarray((arr * 255).astype(np.uint8)).save(root / "img" / f"t2i_{i:03d}.png")
        lines.append(json.dumps({"source_image": None, "target_image": f"img/t2i_{i:03d}.png",
                                 "instruction": "a soft gradient with a disc", "task": "t2i"}))
    if bad_lines:
        lines.insert(1, '{"source_image": "img/000_src.png", "target_image": ')
        lines.insert(2, json.dumps({"source_image": "img/missing.png", "target_image": "img/000_tgt.png",
                                    "instruction": "x"}))
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
