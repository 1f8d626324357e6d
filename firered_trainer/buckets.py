"""The Multi-Condition Aware Bucket Sampler (FireRed report section 3.2).

Every batch is homogeneous: one task, one number of input pictures, and one aspect-ratio bucket
for every source picture and for the target -- so a batch stacks without padding or cropping
waste. Which kind of batch comes next is drawn with weights per dataset and per number of inputs.

How it draws (all of it deterministic for a seed):

* samples are grouped into *buckets* by :func:`bucket_key` -- (task, number of sources, the rounded
  aspect ratio of each source, the rounded aspect ratio of the target);
* a *group* is (dataset, number of sources). Each group has a queue of batches: every bucket of
  the group is sharded across processes (shuffled once for the seed, cut to a multiple of the world
  size, then every ``world_size``-th sample from ``rank``: disjoint, equal-sized shards), shuffled
  for the cycle and cut into batches;
  the group's batches are shuffled together. An exhausted queue is rebuilt with the next cycle's
  shuffle (of the same shard: a sample never moves to another process);
* at step ``s`` a generator seeded with ``(seed, s)`` -- the same on every process, so all ranks
  draw batches of the same kind and sequence shape -- picks the number of sources by
  ``count_weights`` (among counts that exist), then the dataset by ``dataset_weights`` (among
  datasets that have that count). The group's next batch is taken.

The state (step and each group's cycle and position) is a small dict: :meth:`state_dict` /
:meth:`load_state_dict` resume mid-epoch exactly where the sampler stopped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

BucketKey = tuple


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


@dataclass(frozen=True)
class Batch:
    """Indices into the dataset, the step that drew them, and their bucket."""

    indices: tuple[int, ...]
    step: int
    key: BucketKey


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
        buckets: dict[tuple[str, BucketKey], list[int]] = {}
        for i, (k, d) in enumerate(zip(keys, datasets)):
            buckets.setdefault((d, k), []).append(i)
        self._buckets = buckets
        # a group can serve batches only if one of its buckets fills a batch on every rank
        per_group: dict[tuple[str, int], list[tuple[str, BucketKey]]] = {}
        for d, k in sorted(buckets, key=repr):
            if len(buckets[(d, k)]) // world_size >= batch_size:
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

    def _shard(self, bucket) -> list[int]:
        """This rank's part of a bucket: fixed for the seed (not the cycle), so shards never overlap."""
        idx = list(self._buckets[bucket])
        random.Random(f"{self.seed}/shard/{bucket!r}").shuffle(idx)
        return idx[: len(idx) - len(idx) % self.world_size][self.rank :: self.world_size]

    def _queue(self, group, cycle: int):
        rng = random.Random(f"{self.seed}/{group!r}/{cycle}")
        batches = []
        for d, k in self._groups[group]:
            idx = self._shard((d, k))
            rng.shuffle(idx)
            for j in range(0, len(idx) - self.batch_size + 1, self.batch_size):
                batches.append((tuple(idx[j : j + self.batch_size]), k))
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
        indices, key = q[pos]
        self._pos[group] = (cycle, pos + 1)
        batch = Batch(indices, self.step, key)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield list(self.next_batch().indices)
