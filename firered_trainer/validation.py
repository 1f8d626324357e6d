"""What a run shows while it trains: the loss curve (CSV + PNG) and sample edits.

* :class:`LossLog` appends one CSV row per optimizer step (``step,loss,lr,seconds``) and, on
  resume, cuts the rows after the checkpoint's step (rewritten atomically), so the curve of a
  resumed run continues the one it was resumed from.
* :func:`plot_loss` draws the curve (raw and a moving average) as a PNG with matplotlib when it is
  installed, else with PIL alone -- no heavy dependency for one picture.
* :func:`sample_edits` runs the inference sampler of the core (:class:`firered_core.pipeline.FireRedEditor`'s
  stages: the same sigmas, true CFG and decoding as an edit) on the model being trained, from fixed
  prompts and pictures with a fixed seed; their text conditions come from the feature cache, so the
  text encoder is not needed while training.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

FIELDS = ("step", "loss", "lr", "seconds")


class LossLog:
    def __init__(self, path):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def truncate(self, step: int) -> None:
        """Keep the rows up to ``step`` (inclusive): the state a checkpoint of ``step`` saw."""
        rows = [r for r in self.rows() if int(r["step"]) <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".loss.", suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, step: int, loss: float, lr: float, seconds: float) -> None:
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow({"step": step, "loss": repr(float(loss)), "lr": repr(float(lr)), "seconds": f"{seconds:.3f}"})

    def losses(self) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r["loss"])) for r in self.rows()]


def _moving_average(v: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x
        if i >= k:
            acc -= v[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_loss(points: list[tuple[int, float]], path, *, title: str = "training loss") -> Path:
    """Write the loss curve as a PNG (matplotlib if present, else PIL)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [s for s, _ in points]
    loss = [v for _, v in points]
    smooth = _moving_average(loss, max(1, len(loss) // 20))
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
        ax.plot(steps, smooth, lw=1.8, label="moving average")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(tmp, format="png")
        plt.close(fig)
    except ImportError:
        _plot_pil(steps, loss, smooth, title).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _plot_pil(steps, loss, smooth, title) -> Image.Image:
    W, H, L, R, T, B = 700, 400, 60, 20, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((L, 8), title, fill="black")
    if not steps:
        return img
    lo, hi = min(loss), max(loss)
    hi = hi if hi > lo else lo + 1e-6
    s0, s1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

    def xy(s, v):
        return L + (s - s0) / (s1 - s0) * (W - L - R), T + (hi - v) / (hi - lo) * (H - T - B)

    d.rectangle([L, T, W - R, H - B], outline="black")
    for frac in (0.0, 0.5, 1.0):
        v = hi - frac * (hi - lo)
        d.text((4, T + frac * (H - T - B) - 6), f"{v:.4g}", fill="black")
    d.text((L, H - B + 6), str(s0), fill="black")
    d.text((W - R - 40, H - B + 6), str(s1), fill="black")
    d.text((W // 2 - 10, H - B + 20), "step", fill="black")
    for series, colour, width in ((loss, (150, 180, 230), 1), (smooth, (20, 60, 160), 2)):
        pts = [xy(s, v) for s, v in zip(steps, series)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=width)
        else:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
    return img


@torch.no_grad()
def sample_edits(transformer, vae, scheduler_config, prompts, *, positive, negative, steps: int, cfg: float,
                 seed: int, resolution: int, ref_resolution: int) -> list[Image.Image]:
    """One edit per validation prompt with the core sampler on ``transformer`` (the model being
    trained). ``positive[i]`` / ``negative[i]``: the cached :class:`TextCond` of prompt ``i`` and of
    the negative prompt " " with the same pictures."""
    from firered_core.loading import FireRedComponents
    from firered_core.model import images, latents
    from firered_core.model import vae as vae_mod
    from firered_core.pipeline import EditRequest, EncodedEdit, FireRedEditor
    from firered_core.sampling.denoiser import EditCondition

    editor = FireRedEditor(FireRedComponents(transformer, vae, None, None, scheduler_config))
    was_training = transformer.training
    transformer.eval()
    out = []
    try:
        for i, p in enumerate(prompts):
            pils = [images.to_pil(x) for x in p.pictures]
            (w, h), _, ref_sizes = images.plan_sizes(pils, None, None, output_area=resolution**2,
                                                     ref_area=ref_resolution**2)
            refs = [latents.pack(vae_mod.encode(vae, images.pil_to_tensor(images.resize(pil, *s))))
                    for pil, s in zip(pils, ref_sizes)]
            cond = EditCondition(
                ref_tokens=torch.cat(refs, 1) if refs else None,
                img_shapes=[latents.token_grid(h, w)] + [latents.token_grid(rh, rw) for rw, rh in ref_sizes],
            )
            req = EditRequest(prompt=p.prompt, steps=steps, cfg=cfg, seed=seed)
            enc = EncodedEdit(positive[i], negative[i] if cfg > 1 else None, cond, (w, h))
            gen = torch.Generator("cpu").manual_seed(seed + i)
            z, _ = editor.sample(enc, req, generator=gen)
            out.extend(images.unit_to_pil(editor.decode(z)))
    finally:
        transformer.train(was_training)
    return out
