"""The batch samplers against what the accountant and the data-parallel split assume: Poisson inclusion at rate q,
independently per example and per step; batch t a function of (seed, t) alone; every epoch of the shuffled
sampler a partition; and the ranks' shares a partition of the single-process batch."""

from __future__ import annotations

import itertools
import math

import pytest

from dpft.data.sampling import PoissonBatchSampler, ShuffledBatchSampler


def _binomial_within(count: int, trials: int, p: float, z: float = 5.0) -> bool:
    """`count` successes of `trials` Bernoulli(p) draws lie within z standard deviations of the mean."""
    return abs(count - trials * p) <= z * math.sqrt(trials * p * (1 - p))


# --- Poisson sampling ----------------------------------------------------------------------------------
def test_each_example_joins_each_batch_independently_with_probability_q():
    n, q, steps = 60, 0.1, 400
    sampler = PoissonBatchSampler(n, q, seed=3)
    batches = [set(sampler.global_batch(t)) for t in range(steps)]
    assert all(b <= set(range(n)) for b in batches)
    for i in range(n):  # the marginal of every example, also the first and the last
        assert _binomial_within(sum(i in b for b in batches), steps, q), i
    both = sum(0 in b and 1 in b for b in batches) + sum(n - 2 in b and n - 1 in b for b in batches)
    assert _binomial_within(both, 2 * steps, q * q)  # pairs: the product of the marginals
    # successive batches of one example are independent too: P(in t and in t + 1) = q²
    consecutive = sum(i in batches[t] and i in batches[t + 1] for i in range(n) for t in range(steps - 1))
    assert _binomial_within(consecutive, n * (steps - 1), q * q)


def test_batch_t_depends_on_the_seed_and_t_alone():
    a, b = PoissonBatchSampler(100, 0.2, seed=5), PoissonBatchSampler(100, 0.2, seed=5)
    forward = [a.global_batch(t) for t in range(8)]
    backward = [b.global_batch(t) for t in reversed(range(8))][::-1]
    assert forward == backward
    assert len({tuple(x) for x in forward}) == 8  # every step draws anew
    other = PoissonBatchSampler(100, 0.2, seed=6)
    assert [other.global_batch(t) for t in range(8)] != forward


def test_sample_rate_one_takes_every_example_and_an_epoch_is_one_over_q_batches():
    assert PoissonBatchSampler(7, 1.0, seed=0).global_batch(4) == list(range(7))
    for q, batches in [(1.0, 1), (0.5, 2), (0.3, 4), (0.25, 4), (0.01, 100)]:
        assert len(PoissonBatchSampler(50, q, seed=0)) == batches


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, math.nan])
def test_a_sample_rate_outside_0_1_is_refused(q):
    with pytest.raises(ValueError, match="sample rate"):
        PoissonBatchSampler(10, q, seed=0)


# --- step indexing -----------------------------------------------------------------------------------
def test_iteration_starts_at_the_step_reached_and_stops_at_the_end_of_its_epoch():
    step = [0]
    sampler = PoissonBatchSampler(40, 0.25, seed=1, position=lambda: step[0])  # epochs of 4 batches
    reference = PoissonBatchSampler(40, 0.25, seed=1)
    for start in (0, 1, 3, 4, 6):
        step[0] = start
        epoch_end = (start // 4 + 1) * 4
        assert list(iter(sampler)) == [reference.global_batch(t) for t in range(start, epoch_end)], start


def test_without_a_position_each_iteration_continues_where_the_last_stopped():
    sampler = PoissonBatchSampler(30, 0.5, seed=2)  # epochs of 2 batches
    reference = PoissonBatchSampler(30, 0.5, seed=2)
    seen = [b for _ in range(3) for b in sampler]
    assert seen == [reference.global_batch(t) for t in range(6)]


# --- the shuffled sampler of the non-private baselines -------------------------------------------------
def test_every_shuffled_epoch_is_a_partition_of_a_fresh_permutation():
    n, size = 23, 5  # 4 batches an epoch, 3 examples dropped
    sampler = ShuffledBatchSampler(n, size, seed=4)
    assert len(sampler) == 4
    epochs = [[sampler.global_batch(e * 4 + k) for k in range(4)] for e in range(3)]
    for batches in epochs:
        flat = [i for b in batches for i in b]
        assert all(len(b) == size for b in batches)
        assert len(set(flat)) == 20 and set(flat) <= set(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    for first in (0, 4, 9):  # random access (a resumed run): whichever epoch is asked for first
        again = ShuffledBatchSampler(n, size, seed=4)
        assert again.global_batch(first) == epochs[first // 4][first % 4]
        assert again.global_batch(0) == epochs[0][0] and again.global_batch(11) == epochs[2][3]


def test_one_example_a_batch_and_the_whole_set_a_batch_are_valid():
    assert [ShuffledBatchSampler(3, 1, seed=0).global_batch(t) for t in range(3)] in (
        [[a], [b], [c]] for a, b, c in itertools.permutations(range(3)))
    whole = ShuffledBatchSampler(5, 5, seed=0)
    assert len(whole) == 1 and sorted(whole.global_batch(0)) == list(range(5))


@pytest.mark.parametrize("size", [0, 24])
def test_a_batch_size_outside_1_n_is_refused(size):
    with pytest.raises(ValueError, match="batch size"):
        ShuffledBatchSampler(23, size, seed=0)


# --- data-parallel shares --------------------------------------------------------------------------------
@pytest.mark.parametrize("replicas", [2, 3])
def test_the_ranks_shares_partition_the_single_process_batch(replicas):
    for make in (lambda **kw: PoissonBatchSampler(50, 0.3, seed=7, **kw),
                 lambda **kw: ShuffledBatchSampler(50, 6, seed=7, **kw)):
        whole = make()
        ranks = [make(rank=r, num_replicas=replicas) for r in range(replicas)]
        for t in range(5):
            shares = [r.batch(t) for r in ranks]
            flat = [i for s in shares for i in s]
            assert sorted(flat) == sorted(whole.batch(t)) and len(flat) == len(set(flat))
            if isinstance(whole, ShuffledBatchSampler):  # equal shares: positions r, r + W, ...
                assert all(s == whole.batch(t)[r::replicas] for r, s in enumerate(shares))
            else:  # rank r samples its own partition {i : i mod W = r}
                assert all(i % replicas == r for r, s in enumerate(shares) for i in s)


def test_a_rank_outside_the_replicas_and_an_indivisible_batch_are_refused():
    for rank, replicas in [(2, 2), (-1, 2)]:
        with pytest.raises(ValueError, match="rank"):
            PoissonBatchSampler(10, 0.5, seed=0, rank=rank, num_replicas=replicas)
    with pytest.raises(ValueError, match="divisible"):
        ShuffledBatchSampler(10, 5, seed=0, rank=0, num_replicas=2)
    assert len(ShuffledBatchSampler(10, 4, seed=0, rank=1, num_replicas=2).batch(0)) == 2
