"""A tiny edit dataset for tests and the README demo: ``n`` pairs of small pictures where the
target is the source with its red and blue channels swapped and a bright square added (a simple,
learnable edit), written as FireRed JSONL (plus a text-to-image row and optional bad rows); the
same pictures as DPO preference pairs and NFT prompts (:func:`make_tiny_rl_data`); and the demo's
commands (:func:`demo_commands`), which ``make-tiny-data`` and ``--help`` print."""

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


def make_tiny_rl_data(folder, n: int = 8) -> tuple[Path, Path]:
    """Beside :func:`make_tiny_pairs`'s ``pairs.jsonl`` (same ``folder``, same pictures), write
    ``prefs.jsonl`` -- DPO pairs: the edit done (preferred) against the source left as it was
    (rejected) -- and ``prompts.jsonl`` -- NFT prompts for the ``brightness`` reward: two edits
    of source pictures and one text-to-image prompt. Returns (prefs, prompts)."""
    root = Path(folder)
    srcs = [f"img/{i:03d}_src.png" for i in range(n) if (root / "img" / f"{i:03d}_src.png").is_file()]
    if not srcs:
        raise FileNotFoundError(f"{root / 'img'}: no tiny pairs (write them first with make_tiny_pairs)")
    prefs = [json.dumps({"source_image": s, "instruction": "swap red and blue in Picture 1 and add a white square",
                         "preferred": s.replace("_src", "_tgt"), "rejected": s}) for s in srcs]
    prompts = [json.dumps({"instruction": "make Picture 1 brighter", "source_image": s}) for s in srcs[:2]]
    prompts.append(json.dumps({"instruction": "a bright picture", "source_image": None}))
    (root / "prefs.jsonl").write_text("\n".join(prefs) + "\n", encoding="utf-8")
    (root / "prompts.jsonl").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return root / "prefs.jsonl", root / "prompts.jsonl"


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it lies inside it (as a user would type it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def demo_commands(root) -> dict[str, str]:
    """The CPU demo's training commands on what ``make-tiny-data root`` writes: stage -> command."""
    root = Path(root)
    configs = Path(__file__).resolve().parent / "configs"
    model, data = root / "tiny-model", root / "data"
    head = "python -m firered_trainer"
    return {
        "sft": f"{head} sft --config {_shown(configs / 'tiny_cpu.yaml')} model.path={model} "
               f"data.jsonl={data / 'pairs.jsonl'} output_dir={root / 'sft'}",
        "dpo": f"{head} dpo --config {_shown(configs / 'dpo_tiny_cpu.yaml')} model.path={model} "
               f"data.jsonl={data / 'prefs.jsonl'} output_dir={root / 'dpo'}",
        "nft": f"{head} nft --config {_shown(configs / 'nft_tiny_cpu.yaml')} model.path={model} "
               f"data.jsonl={data / 'prompts.jsonl'} output_dir={root / 'nft'}",
    }  # fmt: skip
