"""Batches of same-bucket samples, deterministic and resumable.

A batch must be one tensor, so all its samples share a bucket. The order of an epoch is a pure
function of (seed, epoch), which makes resuming trivial and exact: a checkpoint stores only
``{"epoch", "position"}`` and the resumed run regenerates the same epoch and skips what was
already trained, seeing exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Iterator

from ..errors import DatasetError
from .buckets import bucket_label
from .types import DatasetIndex

logger = logging.getLogger(__name__)


def _epoch_rng(seed: int, epoch: int) -> random.Random:
    digest = hashlib.sha256(f"bucket-sampler\0{seed}\0{epoch}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class BucketBatchSampler:
    """Yields lists of sample indices; each batch from one bucket; deterministic per (seed, epoch); resumable.

    Buckets are :attr:`.discovery.Sample.bucket_key`: a batch never mixes image sizes, nor clip
    lengths (videos are keyed by width, height and frame count).

    Each sample appears ``1 + repeats`` times per epoch. Within a bucket the entries are
    shuffled and cut into batches of ``batch_size``; then the order of all batches is shuffled
    so buckets interleave.

    With ``prune=True`` (SimpleTuner's default) every batch is full: a bucket with fewer
    entries than ``batch_size`` is left out, and the leftover entries of a bucket that do not
    fill a last batch are left out of each epoch (a different few each epoch, since the bucket
    is reshuffled). ``pruned`` says what was dropped. With ``prune=False`` the last batch of a
    bucket may be smaller.
    """

    def __init__(self, index: DatasetIndex, batch_size: int, seed: int, prune: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.prune = prune
        self.epoch = 0
        self.position = 0
        self.pruned: list[str] = []
        self._entries: dict[tuple[int, ...], list[int]] = {}
        self._cached: tuple[int, list[list[int]]] | None = None

        largest = 0
        for bucket, indices in index.buckets().items():
            entries = [i for i in indices for _ in range(1 + index.samples[i].repeats)]
            largest = max(largest, len(entries))
            label = bucket_label(bucket)
            if prune and len(entries) < batch_size:
                self.pruned.append(
                    f"bucket {label} dropped: {len(entries)} sample(s) (with repeats) cannot fill a batch of "
                    f"{batch_size}: " + ", ".join(str(index.samples[i].path) for i in indices)
                )
                continue
            leftover = len(entries) % batch_size
            if prune and leftover:
                self.pruned.append(
                    f"bucket {label}: {leftover} of its {len(entries)} sample(s) (with repeats) do not fill a last "
                    f"batch of {batch_size} and are left out of each epoch (a different {leftover} each epoch)"
                )
            self._entries[bucket] = entries

        if not self._entries:
            if not index.samples:
                raise DatasetError(["the dataset index holds no samples"], "add images to the dataset")
            summary = (
                f"train_batch_size {batch_size} exceeds the images in every aspect bucket "
                f"(the largest bucket has {largest}, counting repeats), so bucket pruning removed every sample"
            )
            raise DatasetError(
                [summary, *self.pruned],
                "lower train_batch_size, set disable_bucket_pruning, add images, raise repeats, "
                "or use crop with crop_aspect 'square' so all images share one bucket",
            )
        for note in self.pruned:
            logger.info("bucket pruning: %s", note)

        per_bucket = [len(e) / batch_size for e in self._entries.values()]
        self._len = sum(math.floor(n) for n in per_bucket) if prune else sum(math.ceil(n) for n in per_bucket)

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        return self._len

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, in training order; a pure function of (seed, epoch)."""
        if self._cached is not None and self._cached[0] == epoch:
            return [list(b) for b in self._cached[1]]
        rng = _epoch_rng(self.seed, epoch)
        batches: list[list[int]] = []
        for bucket in sorted(self._entries):
            entries = list(self._entries[bucket])
            rng.shuffle(entries)
            stop = len(entries) - len(entries) % self.batch_size if self.prune else len(entries)
            batches.extend(entries[i : i + self.batch_size] for i in range(0, stop, self.batch_size))
        rng.shuffle(batches)
        self._cached = (epoch, batches)
        return [list(b) for b in batches]

    def next_batch(self) -> list[int]:
        """The next batch; moves to the next epoch (``epoch`` + 1, ``position`` 0) when one ends."""
        if self.position >= self._len:
            self.epoch += 1
            self.position = 0
        batches = self.batches_for_epoch(self.epoch)
        batch = batches[self.position]
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        """The remaining batches of the current epoch (all of the next one if it is finished),
        so the sampler also works as a ``DataLoader`` ``batch_sampler``."""
        if self.position >= self._len:
            self.epoch += 1
            self.position = 0
        epoch = self.epoch
        while self.epoch == epoch and self.position < self._len:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Where the sampler is: the batches already taken from the current epoch."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where :meth:`state_dict` was taken (same index, batch size and seed)."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"invalid sampler state {state!r}")
        if position > self._len:
            logger.warning(
                "sampler state says batch %d of epoch %d, but an epoch now has %d batches (the dataset changed); "
                "continuing with the next epoch",
                position,
                epoch,
                self._len,
            )
            position = self._len
        self.epoch, self.position = epoch, position
