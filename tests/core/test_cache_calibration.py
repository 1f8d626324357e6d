"""Step-cache calibration: a threshold chosen from a probe run's recorded residual changes
(``step_cache.calibrate``) skips, in a real cached run, at least the share of forwards it was
chosen for and at least as many as its replay predicts (the replay sums step changes, an upper
bound of the distance the cache measures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from firered_core.runtime import step_cache as sc

ROOT = Path(__file__).resolve().parents[2]


def test_replay_follows_the_cache_rule():
    changes = {"a": [0.5, 0.1, 0.1, 0.1, 0.1, 0.5]}  # forwards 2..7 compared with the one before
    # warm-up 3: forward 4 is the first that may skip; 0.1 < 0.25 -> skip 4, then 0.2 (acc) skip 5,
    # then 0.3 >= 0.25 -> compute 6, then 0.5 -> compute 7
    assert sc.simulate(changes, 0.25, warmup=3, max_skips=3) == (2, 7)
    assert sc.simulate(changes, 0.25, warmup=3, max_skips=1) == (2, 7)  # skip 4, compute 5, skip 6
    assert sc.simulate(changes, 0.0, warmup=3) == (0, 7)
    thr = sc.calibrate([("a", 0.0, d) for d in changes["a"]], 0.25, warmup=3, max_skips=3)
    assert sc.simulate(changes, thr, warmup=3, max_skips=3)[0] >= 2 and thr <= 0.21


@pytest.mark.slow
def test_calibrated_thresholds_skip_what_they_promise(tmp_path):
    out = tmp_path / "cal.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "cache_calibration.py"), "--layers", "4", "--width", "128",
                           "--size", "64", "--steps", "6", "--skip", "0.2,0.35", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    for r in rows:
        assert r["skipped"] >= r["predicted_skipped"], r
        assert r["skipped"] >= r["wanted"] * r["seen"] - 1e-9, r
        assert 0 < r["deviation"] < 0.5, r
