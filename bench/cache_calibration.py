"""Calibrate the step cache's threshold from recorded residual changes, then check it.

1. probe: one sampling run with a tiny threshold (nothing is skipped) records the first blocks'
   residual change of every forward (``StepCache.records``: stream, sigma, relative L1);
2. calibrate: for each wanted share of skipped forwards (``--skip``), the smallest threshold whose
   replay of the recorded changes reaches it (``step_cache.calibrate``);
3. check: a real run at each calibrated threshold -- the share of forwards it skipped, the
   deviation of its latents from the uncached result (relative L2) and its time against the
   uncached run (alternating, best of ``--repeats``).

On random weights (the default: a model made on the spot, 6 blocks of width 384) the figures only
show that the procedure works; ``--model`` takes a release folder (real weights) and gives the
thresholds to state for them.

    python bench/cache_calibration.py [--steps 8 --cfg 4 --skip 0.25,0.4] [--model FireRed-Image-Edit-1.1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firered_core import FireRedEditor  # noqa: E402
from firered_core.pipeline import EditRequest  # noqa: E402
from firered_core.runtime import step_cache as sc  # noqa: E402
from firered_core.runtime.speed import SpeedOptions  # noqa: E402
from firered_core.tiny import make_tiny  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a release folder (real weights); default: a random model made on the spot")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--compute-blocks", type=int, default=None, help="blocks always run (default: a quarter, at most 8)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-skips", type=int, default=2)
    ap.add_argument("--skip", default="0.25,0.4", help="wanted shares of skipped forwards")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    model = args.model or make_tiny(Path(tmp.name) / "m", num_layers=args.layers, width=args.width,
                                    num_attention_heads=max(1, args.width // 128))
    ed = FireRedEditor.from_pretrained(model, device=args.device, dtype=args.dtype)
    n_blocks = len(ed.c.transformer.transformer_blocks)
    compute = args.compute_blocks or max(1, min(8, n_blocks // 4))
    from PIL import Image

    pic = Image.radial_gradient("L").convert("RGB").resize((args.size, args.size))
    req = EditRequest(prompt="make the centre red", steps=args.steps, cfg=args.cfg, seed=1, width=args.size,
                      height=args.size, ref_area=args.size * args.size, vl_area=128 * 128)
    with torch.inference_mode():
        enc = ed.encode(pic, req)

    def options(thr):
        return SpeedOptions(cache_threshold=thr, cache_compute_blocks=compute, cache_warmup=args.warmup,
                            cache_max_skips=args.max_skips)

    def sample(opts):
        ed.configure(speed=opts)
        t = time.perf_counter()
        with torch.inference_mode():
            z, _ = ed.sample(enc, req, generator=torch.Generator().manual_seed(1))
        return time.perf_counter() - t, z

    # 1. the probe: capture the cache object of one run with a tiny threshold
    made = []
    orig = SpeedOptions.step_cache

    def capture(self, tr):
        made.append(orig(self, tr))
        return made[-1]

    SpeedOptions.step_cache = capture
    try:
        sample(options(1e-9))
    finally:
        SpeedOptions.step_cache = orig
    probe = made[-1]
    assert probe.stats.blocks_skipped == 0
    changes = sc.step_changes(probe.records)
    print(f"model: {'real weights from ' + str(args.model) if args.model else f'random, {args.layers} blocks x width {args.width}'}; "
          f"{args.size}x{args.size}, {args.steps} steps, CFG {args.cfg}; cache: {compute} of {n_blocks} blocks computed, "
          f"warm-up {args.warmup}, at most {args.max_skips} skips in a row")
    print("recorded first-blocks residual change per step (relative L1), by stream:")
    for i, seq in enumerate(changes.values()):
        print(f"  stream {i + 1} " + " ".join(f"{d:.3f}" for d in seq))
    flat = sorted(d for seq in changes.values() for d in seq)
    print(f"  min {flat[0]:.4f}  median {flat[len(flat) // 2]:.4f}  max {flat[-1]:.4f}")

    # 2. + 3. calibrated thresholds, checked by real runs against the uncached one
    t_plain, z_plain = sample(SpeedOptions())
    rows = []
    for share in (float(v) for v in args.skip.split(",") if v):
        thr = sc.calibrate(probe.records, share, warmup=args.warmup, max_skips=args.max_skips)
        predicted, total = sc.simulate(changes, thr, warmup=args.warmup, max_skips=args.max_skips)
        tp, to, z = [], [], None
        for _ in range(args.repeats):
            tp.append(sample(SpeedOptions())[0])
            t, z = sample(options(thr))
            to.append(t)
        st = ed.last_cache_stats
        dev = ((z - z_plain).norm() / z_plain.norm()).item()
        row = dict(wanted=share, threshold=thr, predicted_skipped=predicted, forwards=total,
                   skipped=st.cached_forwards, seen=st.forwards, blocks_skipped_fraction=st.skipped_fraction,
                   deviation=dev, time_ratio=min(to) / min(tp))
        rows.append(row)
        print(f"  wanted {share:.0%} skipped -> threshold {thr:.4g}: replay {predicted}/{total}, run "
              f"{st.cached_forwards}/{st.forwards} forwards skipped ({st.skipped_fraction:.0%} of block evals), "
              f"deviation {dev:.2e}, time {row['time_ratio']:.2f}x uncached")
    ed.configure(speed=SpeedOptions())
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "changes": list(changes.values()),
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
