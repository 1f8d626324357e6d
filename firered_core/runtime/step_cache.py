"""Step caching: skip most MM-DiT blocks on steps where the first blocks barely change.

The first-blocks residual cache (the DBCache idea) with a Taylor-series calibration (TaylorSeer):

1. every forward runs the first ``compute_blocks`` blocks; their residual
   ``r = h_after_first_blocks - h_in`` (image stream) is compared with the one of the last fully
   computed forward of the same stream by relative L1 ``mean|r - r_ref| / mean|r_ref|``;
2. below ``threshold`` (every batch row), after ``warmup`` full forwards and fewer than
   ``max_skips`` consecutive skips, the remaining blocks are skipped: their residual
   ``R = h_out - h_after_first_blocks`` is taken from the cache, extrapolated in sigma from the last
   two computed forwards (``taylor_order`` 1: ``R1 + (s - s1) (R1 - R0) / (s1 - s0)``; 0: ``R1``);
3. otherwise every block runs and the cache is refreshed.

Streams: the denoiser opens ``stream(key, sigma)`` around each forward, ``key`` naming the texts
and batch (cond, uncond and the batched cond+uncond pass of true CFG each get their own cache;
inside a batched pass each row carries its own residual and must pass the test). Off by default;
``threshold=0`` never skips. :attr:`StepCache.stats` counts the block evaluations run and
skipped (exact: a skipped block is never called).

The cache hooks the block loop of diffusers' ``QwenImageTransformer2DModel.forward`` (``for ...
in enumerate(self.transformer_blocks)``) by giving that ModuleList, for the duration of a sampling
run, a subclass whose iteration yields the blocks through the cache; no weights or module names
change, so LoRA, block swap and compiled blocks are unaffected.

Calibration. Every change measured is recorded (:attr:`StepCache.records`: stream, sigma, change),
so a run with a tiny threshold (nothing skipped: each change is step to step) is a probe;
:func:`calibrate` turns a probe's records into the threshold that skips a wanted share of the
forwards, by replaying them (:func:`simulate`: warm-up, ``max_skips`` and the change accumulated
since the last computed forward, as the cache compares against that forward's residual). The
changes depend on the weights: random weights move the first blocks' residual far more per step
than trained ones, so thresholds calibrated on random weights (every figure in this repository so
far) are not known to hold on the released weights -- calibrate on them with
``bench/cache_calibration.py --model <release folder>``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch
from torch import nn


@dataclass
class StepCacheStats:
    """forwards: MM-DiT forwards seen; cached_forwards: those that skipped the remaining blocks;
    blocks_run / blocks_skipped: block evaluations made / saved."""

    forwards: int = 0
    cached_forwards: int = 0
    blocks_run: int = 0
    blocks_skipped: int = 0

    @property
    def skipped_fraction(self) -> float:
        total = self.blocks_run + self.blocks_skipped
        return self.blocks_skipped / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"forwards": self.forwards, "cached_forwards": self.cached_forwards, "blocks_run": self.blocks_run,
                "blocks_skipped": self.blocks_skipped}


@dataclass
class _Stream:
    key: Hashable = None
    calls: int = 0
    consecutive: int = 0
    ref: torch.Tensor | None = None  # first-blocks residual of the last computed forward
    history: list[tuple[float, torch.Tensor]] = field(default_factory=list)  # (sigma, remaining residual)


class _CachedBlocks(nn.ModuleList):
    """The transformer's block list while a :class:`StepCache` is installed (same children)."""

    def __iter__(self):
        cache = self.__dict__.get("_firered_step_cache")
        blocks = list(self._modules.values())
        if cache is None or cache._current is None:
            return iter(blocks)
        return cache._iterate(blocks)


class _Call:
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def relative_l1(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per batch row ``mean|a - ref| / mean|ref|`` (float32)."""
    a, ref = a.float().flatten(1), ref.float().flatten(1)
    return (a - ref).abs().mean(1) / ref.abs().mean(1).clamp_min(1e-12)


class StepCache:
    """A first-blocks residual cache over one transformer; use ``with cache.installed(): ...``."""

    def __init__(self, transformer: nn.Module, *, threshold: float = 0.08, compute_blocks: int = 8, warmup: int = 3,
                 max_skips: int = 3, taylor_order: int = 1):
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        if compute_blocks < 1:
            raise ValueError(f"cache compute_blocks must be >= 1, got {compute_blocks}")
        if warmup < 1:
            raise ValueError(f"cache warmup must be >= 1 (the first forward fills the cache), got {warmup}")
        if max_skips < 0:
            raise ValueError(f"cache max_skips must be >= 0, got {max_skips}")
        if taylor_order not in (0, 1):
            raise ValueError(f"cache taylor_order must be 0 or 1, got {taylor_order}")
        if not isinstance(getattr(transformer, "transformer_blocks", None), nn.ModuleList):
            raise TypeError("the step cache needs a QwenImageTransformer2DModel (a transformer_blocks ModuleList)")
        self.transformer = transformer
        self.threshold = float(threshold)
        self.compute_blocks = int(compute_blocks)
        self.warmup = int(warmup)
        self.max_skips = int(max_skips)
        self.taylor_order = int(taylor_order)
        self.stats = StepCacheStats()
        self.deltas: list[float] = []  # every relative-L1 change measured (largest row), to tune the threshold
        self.records: list[tuple[Hashable, float, float]] = []  # (stream key, sigma, change), in order
        self._streams: dict[Hashable, _Stream] = {}
        self._current: tuple[_Stream, float] | None = None

    # -- installing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def installed(self):
        blocks = self.transformer.transformer_blocks
        old = type(blocks)
        if old is not nn.ModuleList:
            raise RuntimeError(f"transformer_blocks is a {old.__name__}, not a plain ModuleList (another cache installed?)")
        blocks.__class__ = _CachedBlocks
        blocks.__dict__["_firered_step_cache"] = self
        try:
            yield self
        finally:
            blocks.__dict__.pop("_firered_step_cache", None)
            blocks.__class__ = old
            self._current = None

    @contextlib.contextmanager
    def stream(self, key: Hashable, sigma: float):
        """Run one forward of stream ``key`` at ``sigma`` through the cache."""
        st = self._streams.setdefault(key, _Stream(key))
        prev, self._current = self._current, (st, float(sigma))
        try:
            yield
        finally:
            self._current = prev

    def reset(self) -> None:
        self._streams.clear()
        self.stats = StepCacheStats()
        self.deltas = []
        self.records = []

    # -- the block loop ----------------------------------------------------------------------------

    def _estimate(self, st: _Stream, sigma: float) -> torch.Tensor:
        s1, r1 = st.history[-1]
        if self.taylor_order == 0 or len(st.history) < 2:
            return r1
        s0, r0 = st.history[-2]
        if s1 == s0:
            return r1
        return r1 + (r1 - r0) * ((sigma - s1) / (s1 - s0))

    def _iterate(self, blocks: list[nn.Module]):
        st, sigma = self._current
        n = len(blocks)
        k = min(self.compute_blocks, n - 1) if n > 1 else n
        box: dict[str, Any] = {}

        def first(*args, **kwargs):
            box["h_in"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            out = blocks[0](*args, **kwargs)
            if k == 1:
                box["head"] = out
            return out

        def head_end(*args, **kwargs):
            out = blocks[k - 1](*args, **kwargs)
            box["head"] = out
            return out

        def tail_end(*args, **kwargs):
            out = blocks[n - 1](*args, **kwargs)
            box["tail"] = out
            return out

        self.stats.forwards += 1
        st.calls += 1
        yield _Call(first)
        for i in range(1, k):
            yield _Call(head_end) if i == k - 1 else blocks[i]
        if k >= n:  # a one-block model: nothing to cache
            self.stats.blocks_run += n
            return
        _, h_head = box["head"]
        r = h_head - box["h_in"]
        delta = None
        if self.threshold > 0 and st.ref is not None and st.ref.shape == r.shape:
            delta = float(relative_l1(r, st.ref).max())
            self.deltas.append(delta)
            self.records.append((st.key, sigma, delta))
        skip = delta is not None and st.calls > self.warmup and st.consecutive < self.max_skips and delta < self.threshold
        if skip:
            est = self._estimate(st, sigma)
            st.consecutive += 1
            self.stats.cached_forwards += 1
            self.stats.blocks_run += k
            self.stats.blocks_skipped += n - k

            def cached(*args, **kwargs):
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                e = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
                return e, h + est.to(h.dtype)

            yield _Call(cached)
            return
        for i in range(k, n):
            yield _Call(tail_end) if i == n - 1 else blocks[i]
        _, h_out = box["tail"]
        st.consecutive = 0
        st.ref = r
        st.history = (st.history + [(sigma, h_out - h_head)])[-2:]
        self.stats.blocks_run += n


# -- calibration -------------------------------------------------------------------------------------


def step_changes(records) -> dict[Hashable, list[float]]:
    """The changes of a probe run (:attr:`StepCache.records`, nothing skipped) per stream, in order:
    entry ``i`` is the change between forwards ``i + 1`` and ``i + 2`` of that stream (the first
    forward has nothing to compare with)."""
    out: dict[Hashable, list[float]] = {}
    for key, _sigma, delta in records:
        out.setdefault(key, []).append(float(delta))
    return out


def simulate(changes: dict[Hashable, list[float]], threshold: float, *, warmup: int = 3, max_skips: int = 3) -> tuple[int, int]:
    """(forwards skipped, forwards) that ``threshold`` would give on the streams' step changes,
    following :class:`StepCache`'s rule; after a skip the compared residual is the last computed
    one, so the change is taken as the sum of the step changes since then (an upper bound of the
    distance, by the triangle inequality)."""
    skipped = total = 0
    for seq in changes.values():
        total += len(seq) + 1
        acc, run = 0.0, 0
        for i, d in enumerate(seq):
            acc += d
            call = i + 2
            if threshold > 0 and call > warmup and run < max_skips and acc < threshold:
                skipped += 1
                run += 1
            else:
                acc, run = 0.0, 0
    return skipped, total


CALIBRATION_MARGIN = 0.02  # thresholds sit this far above the recorded change they must pass


def calibrate(records, skip_fraction: float, *, warmup: int = 3, max_skips: int = 3,
              margin: float = CALIBRATION_MARGIN) -> float:
    """The smallest threshold (4 significant digits, rounded up) whose replay (:func:`simulate`)
    skips at least ``skip_fraction`` of the forwards of a probe run; the largest reachable share
    (warm-up and ``max_skips`` bound it) when ``skip_fraction`` cannot be reached. Each candidate
    sits ``margin`` (relative) above the recorded change it must pass: the cached run's changes
    differ a little from the probe's (the forwards it skips change the inputs that follow), and a
    threshold just above a recorded change skipped one forward fewer than promised when the
    conditioning changed by a hair."""
    if not 0 < skip_fraction < 1:
        raise ValueError(f"skip_fraction must be in (0, 1), got {skip_fraction}")
    changes = step_changes(records)
    if not changes:
        raise ValueError("no changes recorded: run a probe with a tiny threshold (e.g. 1e-9) over at least two steps")
    # candidate thresholds: just above every accumulated change a replay can compare
    cands = set()
    for seq in changes.values():
        for i in range(len(seq)):
            acc = 0.0
            for d in seq[i : i + max_skips]:
                acc += d
                cands.add(acc)
    best = None
    for c in sorted(cands):
        want = c * (1 + margin) + 1e-12
        t = float(f"{want:.4g}")
        t = t if t >= want else float(f"{want * (1 + 1e-3):.4g}")
        sk, tot = simulate(changes, t, warmup=warmup, max_skips=max_skips)
        best = t
        if sk >= skip_fraction * tot:
            return t
    return best
