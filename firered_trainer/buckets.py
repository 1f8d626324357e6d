"""The Multi-Condition Aware Bucket Sampler (FireRed report section 3.2).

Every batch is homogeneous: one task, one number of input pictures, and one aspect-ratio bucket
for every source picture and for the target -- so a batch stacks without padding or cropping
waste. Which kind of batch comes next is drawn with weights per dataset and per number of inputs.

How it draws (all of it deterministic for a seed):

* samples are grouped into *buckets* by :func:`bucket_key` -- (task, number of sources, the rounded
  aspect ratio of each source, the rounded aspect ratio of the target);
* a bucket too small to give every process a full batch (fewer than ``batch_size x world_size``
  samples) is merged into its nearest bucket of the same dataset, task and number of pictures
  (nearest: the smallest sum of ``|log aspect|`` differences over the pictures), smallest first,
  until every bucket is large enough: its samples train at that bucket's aspects
  (:func:`fit_to_buckets`, a centre crop), instead of never being drawn. Only a whole
  (dataset, task, count) group smaller than one global batch is left out, and said so;
* a *group* is (dataset, number of sources). Each group has a queue of *global* batches of
  ``batch_size x world_size`` samples, the same on every process: every bucket of the group is
  shuffled for the cycle and cut into global batches, the last one filled up from the start of
  the same cycle's order (a sample may come twice in a cycle; none is skipped); the group's
  batches are shuffled together. An exhausted queue is rebuilt with the next cycle's shuffle.
  Process ``rank`` trains on the slice ``[rank x batch_size, (rank + 1) x batch_size)`` of each
  global batch (:attr:`Batch.offset` is where its slice starts). So the ranks of one step never
  share a sample, and N processes at batch b draw exactly the batches of one process at batch
  N x b -- with the trainer's draws keyed by the position in the global batch (not the rank), the
  two runs are the same computation;
* each time one epoch's worth of global batches has been drawn, one log line gives the share of
  the samples used in that epoch (by all processes together);
* at step ``s`` a generator seeded with ``(seed, s)`` -- the same on every process, so all ranks
  draw batches of the same kind and sequence shape -- picks the number of sources by
  ``count_weights`` (among counts that exist), then the dataset by ``dataset_weights`` (among
  datasets that have that count). The group's next batch is taken.

The state (step and each group's cycle and position) is a small dict: :meth:`state_dict` /
:meth:`load_state_dict` resume mid-epoch exactly where the sampler stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

BucketKey = tuple
logger = logging.getLogger(__name__)


def aspect_bucket(width: int, height: int, step: float = 0.1, lo: float = 0.25, hi: float = 4.0) -> float:
    """Width / height clamped to [lo, hi] and rounded to ``step`` (the released trainer's rule)."""
    r = min(max(width / height, lo), hi)
    return round(math.floor(r / step + 0.5) * step, 4)


def bucket_key(sample) -> BucketKey:
    """(task, n_sources, source aspect buckets..., target aspect bucket) of an ``EditSample``."""
    return (
        sample.task,
        len(sample.sources),
        tuple(aspect_bucket(*s) for s in sample.source_sizes),
        aspect_bucket(*sample.target_size),
    )


def _aspect_distance(a: BucketKey, b: BucketKey) -> float:
    pairs = list(zip(a[2], b[2])) + [(a[3], b[3])]
    return sum(abs(math.log(x / y)) for x, y in pairs)


@dataclass
class BucketPlan:
    """Where every sample trains: ``keys[i]`` is sample i's bucket after merging (its own key when
    its bucket was large enough); ``unused`` the samples of groups too small for one batch per
    process; ``merged`` how many samples moved to another bucket, ``worst_change`` the largest
    aspect factor such a move made (1.25 = 25% wider or taller, taken by a centre crop)."""

    keys: list
    unused: list[int]
    merged: int
    worst_change: float


def merge_small_buckets(keys: Sequence[BucketKey], datasets: Sequence[str], need: int) -> BucketPlan:
    """Merge every bucket of fewer than ``need`` samples into its nearest bucket of the same
    (dataset, task, number of pictures), smallest first, until all are large enough (see the
    module docstring). Deterministic: ties go to the larger bucket, then the key's ``repr``."""
    groups: dict[tuple, dict[BucketKey, list[int]]] = {}
    for i, (k, d) in enumerate(zip(keys, datasets)):
        groups.setdefault((d, k[0], k[1]), {}).setdefault(k, []).append(i)
    out, unused, merged, worst = list(keys), [], 0, 1.0
    for g in sorted(groups, key=repr):
        buckets = groups[g]
        while len(buckets) > 1:
            small = min(buckets, key=lambda k: (len(buckets[k]), repr(k)))
            if len(buckets[small]) >= need:
                break
            into = min((k for k in buckets if k != small),
                       key=lambda k: (_aspect_distance(small, k), -len(buckets[k]), repr(k)))
            buckets[into].extend(buckets.pop(small))
        for k, idx in buckets.items():
            if len(idx) < need:
                unused.extend(idx)
                continue
            for i in idx:
                if keys[i] != k:
                    merged += 1
                    worst = max(worst, math.exp(max(abs(math.log(x / y)) for x, y in
                                                    zip((*keys[i][2], keys[i][3]), (*k[2], k[3])))))
                out[i] = k
    return BucketPlan(out, sorted(unused), merged, worst)


def _size_at(aspect: float, size: tuple[int, int]) -> tuple[int, int]:
    """A (width, height) of ``aspect`` and about ``size``'s area: what a centre crop to the
    bucket's aspect leaves of the picture."""
    w, h = size
    if abs(aspect_bucket(w, h) - aspect) < 1e-9:
        return (w, h)
    area = w * h
    return (max(1, round(math.sqrt(area * aspect))), max(1, round(math.sqrt(area / aspect))))


def fit_to_buckets(samples: Sequence, keys: Sequence[BucketKey]) -> list:
    """The samples with the picture sizes of their assigned buckets (``BucketPlan.keys``): a sample
    merged into another bucket gets sizes at that bucket's aspects, so it is cropped to them and
    batches with it; the others are returned as they are."""
    out = []
    for s, k in zip(samples, keys):
        if k == bucket_key(s):
            out.append(s)
            continue
        out.append(dataclasses.replace(
            s, source_sizes=tuple(_size_at(a, sz) for a, sz in zip(k[2], s.source_sizes)),
            target_size=_size_at(k[3], s.target_size)))
    return out


@dataclass(frozen=True)
class Batch:
    """This process's indices into the dataset, the step that drew them, and their bucket;
    ``offset``: the position of ``indices[0]`` in the step's global batch ``all_indices`` (every
    process's samples, rank 0's first)."""

    indices: tuple[int, ...]
    step: int
    key: BucketKey
    offset: int = 0
    all_indices: tuple[int, ...] = ()


class BucketBatchSampler:
    """Infinite, weighted, sharded, resumable stream of homogeneous batches.

    keys: the bucket key of every sample (:func:`bucket_key`); datasets: every sample's dataset name.
    dataset_weights / count_weights: relative weights (missing = 1; 0 = never).
    Iterating yields lists of indices (usable as a DataLoader ``batch_sampler``); :meth:`next_batch`
    returns the :class:`Batch` with its key.
    """

    def __init__(
        self,
        keys: Sequence[BucketKey],
        datasets: Sequence[str],
        batch_size: int,
        *,
        dataset_weights: dict[str, float] | None = None,
        count_weights: dict[int, float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(keys) != len(datasets):
            raise ValueError(f"{len(keys)} bucket keys but {len(datasets)} dataset names")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.dataset_weights = dataset_weights or {}
        self.count_weights = count_weights or {}
        self.plan = merge_small_buckets(keys, datasets, batch_size * world_size)
        if rank == 0 and (self.plan.merged or self.plan.unused):
            logger.info("bucket sampler: %d of %d samples train in a neighbouring aspect bucket (crop up to %.2fx); "
                        "%d are in groups smaller than a batch of %d on each of %d processes and are not used",
                        self.plan.merged, len(keys), self.plan.worst_change, len(self.plan.unused), batch_size,
                        world_size)
        unused = set(self.plan.unused)
        buckets: dict[tuple[str, BucketKey], list[int]] = {}
        for i, (k, d) in enumerate(zip(self.plan.keys, datasets)):
            if i not in unused:
                buckets.setdefault((d, k), []).append(i)
        self._buckets = buckets
        # a group can serve batches only if one of its buckets fills a global batch
        self.global_batch = batch_size * world_size
        per_group: dict[tuple[str, int], list[tuple[str, BucketKey]]] = {}
        for d, k in sorted(buckets, key=repr):
            if len(buckets[(d, k)]) >= self.global_batch:
                per_group.setdefault((d, k[1]), []).append((d, k))
        self._groups = per_group
        usable = {
            g: b for g, b in per_group.items()
            if self.dataset_weights.get(g[0], 1.0) > 0 and self.count_weights.get(g[1], 1.0) > 0
        }
        if not usable:
            raise ValueError(
                f"no bucket holds a full batch of {batch_size} per process (world size {world_size}) "
                "with a non-zero weight: lower the batch size or add data"
            )
        self._usable = sorted(usable, key=repr)
        self.step = 0
        self._pos: dict[tuple[str, int], tuple[int, int]] = {g: (0, 0) for g in self._usable}
        # group -> (cycle, its batches): a cache, rebuilt deterministically from (seed, group, cycle)
        self._queues: dict[tuple[str, int], tuple[int, list[tuple[tuple[int, ...], BucketKey]]]] = {}
        # coverage: the samples that can be drawn, the ones drawn in the current epoch, its length
        self._all = sorted(i for g in self._usable for b in self._groups[g] for i in self._buckets[b])
        self.epoch_steps = max(1, math.ceil(len(self._all) / self.global_batch))
        self._seen: set[int] = set()
        self._quiet = False

    @property
    def assigned(self) -> list:
        """Every sample's bucket key after merging (see :class:`BucketPlan`)."""
        return self.plan.keys

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "pos": {repr(g): list(p) for g, p in self._pos.items()}, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.step = int(state["step"])
        pos = state["pos"]
        for g in self._usable:
            if repr(g) in pos:
                self._pos[g] = tuple(pos[repr(g)])
        self._queues.clear()

    # -- drawing ---------------------------------------------------------------------------

    def _queue(self, group, cycle: int):
        rng = random.Random(f"{self.seed}/{group!r}/{cycle}")
        batches, n = [], self.global_batch
        for d, k in self._groups[group]:
            idx = list(self._buckets[(d, k)])
            rng.shuffle(idx)
            idx += idx[: -len(idx) % n]  # fill the last batch from this cycle's start
            for j in range(0, len(idx), n):
                batches.append((tuple(idx[j : j + n]), k))
        rng.shuffle(batches)
        return batches

    def _pick_group(self, step: int):
        rng = random.Random(f"{self.seed}/step/{step}")
        counts = sorted({g[1] for g in self._usable})
        c = rng.choices(counts, weights=[self.count_weights.get(c, 1.0) for c in counts])[0]
        cands = [g for g in self._usable if g[1] == c]
        return rng.choices(cands, weights=[self.dataset_weights.get(g[0], 1.0) for g in cands])[0]

    def next_batch(self) -> Batch:
        group = self._pick_group(self.step)
        cycle, pos = self._pos[group]
        cached = self._queues.get(group)
        q = cached[1] if cached is not None and cached[0] == cycle else self._queue(group, cycle)
        if pos >= len(q):
            cycle, pos = cycle + 1, 0
            q = self._queue(group, cycle)
        self._queues[group] = (cycle, q)
        everyone, key = q[pos]
        self._pos[group] = (cycle, pos + 1)
        start = self.rank * self.batch_size
        batch = Batch(everyone[start : start + self.batch_size], self.step, key, start, everyone)
        self.step += 1
        self._seen.update(everyone)
        if self.step % self.epoch_steps == 0:
            if not self._quiet:
                logger.info("bucket sampler: epoch %d (process %d) used %d of the %d samples (%.1f%%)",
                            self.step // self.epoch_steps, self.rank, len(self._seen), len(self._all),
                            100.0 * len(self._seen) / max(1, len(self._all)))
            self._seen = set()
        return batch

    def preview(self, n: int) -> Iterator[Batch]:
        """The first ``n`` batches a fresh sampler with these settings draws (steps 0 .. n-1),
        without moving this one: what a run will see, known before it starts (the feature cache
        encodes only those variants)."""
        clone = copy.copy(self)
        clone._pos = {g: (0, 0) for g in self._usable}
        clone._queues, clone._seen, clone._quiet, clone.step = {}, set(), True, 0
        for _ in range(n):
            yield clone.next_batch()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield list(self.next_batch().indices)
