"""BucketBatchSampler: which samples go into each batch, in which order, and how a run resumes.

The sampler only looks at buckets and repeats, so the index is built from plain ``Sample``
records without image files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from trainer_core.data import BucketBatchSampler, CropPlan, DatasetIndex, Sample
from trainer_core.errors import DatasetError

SQUARE, WIDE, TALL = (1024, 1024), (1280, 832), (832, 1280)


def index_of(counts: dict[tuple[int, int], int], repeats: int = 0) -> DatasetIndex:
    """An index with ``counts[bucket]`` samples in each bucket."""
    samples = []
    for bucket, n in counts.items():
        for _ in range(n):
            i = len(samples)
            samples.append(
                Sample(
                    dataset_id="d",
                    path=Path(f"img{i:03}.png"),
                    captions=(f"image {i}",),
                    source_size=bucket,
                    plan=CropPlan(bucket=bucket, resize=bucket, crop_box=(0, 0, *bucket)),
                    identity=f"id{i}",
                    repeats=repeats,
                )
            )
    return DatasetIndex(samples=samples, warnings=[])


INDEX = index_of({SQUARE: 12, WIDE: 8, TALL: 4})  # every bucket divides into batches of 4


def test_every_batch_comes_from_a_single_bucket():
    sampler = BucketBatchSampler(INDEX, batch_size=4, seed=1)
    for batch in sampler.batches_for_epoch(0):
        assert len({INDEX.samples[i].plan.bucket for i in batch}) == 1


def test_an_epoch_shows_every_sample_once_and_len_counts_its_batches():
    sampler = BucketBatchSampler(INDEX, batch_size=4, seed=1)
    batches = sampler.batches_for_epoch(0)
    assert len(sampler) == len(batches) == 6
    assert sorted(i for b in batches for i in b) == list(range(24))


def test_the_same_seed_gives_the_same_order():
    a = BucketBatchSampler(INDEX, batch_size=4, seed=1).batches_for_epoch(3)
    b = BucketBatchSampler(INDEX, batch_size=4, seed=1).batches_for_epoch(3)
    assert a == b
    assert BucketBatchSampler(INDEX, batch_size=4, seed=2).batches_for_epoch(3) != a


def test_each_epoch_has_its_own_order_and_buckets_interleave():
    sampler = BucketBatchSampler(INDEX, batch_size=4, seed=1)
    epochs = [sampler.batches_for_epoch(e) for e in range(5)]
    assert all(epochs[0] != other for other in epochs[1:])
    bucket_orders = {tuple(INDEX.samples[b[0]].plan.bucket for b in batches) for batches in epochs}
    assert len(bucket_orders) > 1  # batch order is shuffled, not bucket after bucket


def test_repeats_show_each_sample_one_plus_repeats_times():
    once = BucketBatchSampler(INDEX, batch_size=4, seed=1)
    twice = BucketBatchSampler(index_of({SQUARE: 12, WIDE: 8, TALL: 4}, repeats=1), batch_size=4, seed=1)
    assert len(twice) == 2 * len(once)
    seen = Counter(i for b in twice.batches_for_epoch(0) for i in b)
    assert set(seen.values()) == {2}
    assert len(seen) == 24


def test_next_batch_walks_the_epoch_then_rolls_over():
    sampler = BucketBatchSampler(INDEX, batch_size=4, seed=1)
    first_epoch = [sampler.next_batch() for _ in range(len(sampler))]
    assert first_epoch == sampler.batches_for_epoch(0)
    assert sampler.state_dict() == {"epoch": 0, "position": 6}
    assert sampler.next_batch() == sampler.batches_for_epoch(1)[0]
    assert sampler.state_dict() == {"epoch": 1, "position": 1}


def test_iterating_gives_the_rest_of_the_current_epoch():
    sampler = BucketBatchSampler(INDEX, batch_size=4, seed=1)
    sampler.next_batch()
    assert list(sampler) == sampler.batches_for_epoch(0)[1:]
    assert list(sampler) == sampler.batches_for_epoch(1)


@pytest.mark.parametrize("stop_after", [0, 1, 4, 6, 7, 15])
def test_resuming_from_state_dict_continues_exactly_where_the_run_stopped(stop_after):
    """A run interrupted after ``stop_after`` batches, restored into a fresh sampler, sees the
    same batches the uninterrupted run would have (also across epoch boundaries)."""
    uninterrupted = BucketBatchSampler(INDEX, batch_size=4, seed=9)
    expected = [uninterrupted.next_batch() for _ in range(20)]

    first_run = BucketBatchSampler(INDEX, batch_size=4, seed=9)
    before = [first_run.next_batch() for _ in range(stop_after)]
    saved = first_run.state_dict()

    resumed = BucketBatchSampler(INDEX, batch_size=4, seed=9)
    resumed.load_state_dict(saved)
    after = [resumed.next_batch() for _ in range(20 - stop_after)]
    assert before + after == expected


# ---------------------------------------------------------------------------- pruning


def test_pruning_drops_buckets_smaller_than_a_batch_and_says_so():
    index = index_of({SQUARE: 8, TALL: 3})
    sampler = BucketBatchSampler(index, batch_size=4, seed=1)
    assert len(sampler) == 2
    assert not any(index.samples[i].plan.bucket == TALL for b in sampler.batches_for_epoch(0) for i in b)
    (note,) = sampler.pruned
    assert "bucket 832x1280 dropped" in note
    assert "img008.png" in note


def test_pruning_drops_the_partial_last_batch_of_a_bucket_and_says_so():
    sampler = BucketBatchSampler(index_of({SQUARE: 10}), batch_size=4, seed=1)
    batches = sampler.batches_for_epoch(0)
    assert [len(b) for b in batches] == [4, 4]
    assert "2 of its 10 sample(s)" in sampler.pruned[0]
    left_out = [set(range(10)) - {i for b in sampler.batches_for_epoch(e) for i in b} for e in range(5)]
    assert len({frozenset(s) for s in left_out}) > 1  # a different two each epoch


def test_repeats_can_save_a_small_bucket_from_pruning():
    sampler = BucketBatchSampler(index_of({TALL: 2}, repeats=1), batch_size=4, seed=1)
    assert sampler.pruned == []
    assert len(sampler) == 1


def test_without_pruning_partial_batches_are_kept():
    index = index_of({SQUARE: 10, TALL: 3})
    sampler = BucketBatchSampler(index, batch_size=4, seed=1, prune=False)
    sizes = sorted(len(b) for b in sampler.batches_for_epoch(0))
    assert sizes == [2, 3, 4, 4]
    assert len(sampler) == 4
    assert sampler.pruned == []


def test_pruning_everything_is_an_error_that_suggests_the_fix():
    with pytest.raises(DatasetError) as err:
        BucketBatchSampler(index_of({SQUARE: 3, WIDE: 2}), batch_size=4, seed=1)
    message = str(err.value)
    assert "train_batch_size 4 exceeds the images in every aspect bucket" in message
    assert "largest bucket has 3" in message
    assert "disable_bucket_pruning" in err.value.hint
    assert "train_batch_size" in err.value.hint
