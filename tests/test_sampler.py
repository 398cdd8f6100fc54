"""ResumableSampler: deterministic order, exact sharding, repeated augmentation, mid-epoch resume; SeededDataset."""

import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from xcit.data.sampler import ResumableSampler, SeededDataset


def test_order_is_a_function_of_seed_and_epoch():
    a, b = ResumableSampler(50, seed=1), ResumableSampler(50, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert a.epoch_indices() != b.epoch_indices()
    assert a.epoch_indices() != ResumableSampler(50, seed=2).epoch_indices(3)
    assert sorted(a.epoch_indices()) == list(range(50))
    assert ResumableSampler(7, shuffle=False).epoch_indices() == list(range(7))


@pytest.mark.parametrize("n, ranks, drop_last", [(20, 2, False), (23, 4, False), (23, 4, True), (5, 8, False)])
def test_ranks_cover_the_dataset_once_like_distributed_sampler(n, ranks, drop_last):
    shards = [ResumableSampler(n, seed=5, num_replicas=ranks, rank=r, drop_last=drop_last) for r in range(ranks)]
    for s in shards:
        s.set_epoch(2)
    seen = [s.epoch_indices() for s in shards]
    assert len({len(x) for x in seen}) == 1  # equal shares keep DDP ranks in lock step
    union = Counter(i for x in seen for i in x)
    if drop_last:
        assert all(c == 1 for c in union.values()) and len(union) == n - n % ranks
    else:
        assert set(union) == set(range(n)) and sum(union.values()) - n == -n % ranks  # only the padding repeats
    ds = list(range(n))
    for r, s in enumerate(shards):  # exactly torch's DistributedSampler order without repeats, shuffle off
        plain = ResumableSampler(n, shuffle=False, num_replicas=ranks, rank=r, drop_last=drop_last)
        ref = DistributedSampler(ds, num_replicas=ranks, rank=r, shuffle=False, drop_last=drop_last)
        assert plain.epoch_indices() == list(ref)


def test_repeated_augmentation_shards_copies_over_ranks():
    n, ranks, repeats = 24, 3, 3
    shards = [ResumableSampler(n, seed=0, num_replicas=ranks, rank=r, repeats=repeats) for r in range(ranks)]
    items = [list(s) for s in shards]
    assert all(len(x) == n // ranks for x in items)  # the epoch has the original dataset's length
    for pos in range(n // ranks):  # timm RepeatAugSampler: the k copies of a sample go to k different ranks
        assert len({items[r][pos][0] for r in range(ranks)}) == 1
    seeds = [s for x in items for _, s in x]
    assert len(set(seeds)) == len(seeds)  # every copy gets its own augmentation seed


def test_repeated_augmentation_matches_timm_order():
    timm_sampler = pytest.importorskip("timm.data.distributed_sampler")

    n, ranks, repeats = 40, 2, 3
    for r in range(ranks):
        ref = timm_sampler.RepeatAugSampler(list(range(n)), num_replicas=ranks, rank=r, shuffle=False, num_repeats=3)
        ref.num_selected_samples = n // ranks  # timm rounds to multiples of 256 by default; we keep the full epoch
        ours = ResumableSampler(n, shuffle=False, num_replicas=ranks, rank=r, repeats=repeats)
        assert ours.epoch_indices() == list(ref)


@pytest.mark.parametrize("ranks, repeats", [(1, 1), (2, 1), (2, 3)])
def test_mid_epoch_resume_yields_exactly_the_remaining_samples(ranks, repeats):
    for rank in range(ranks):
        full = ResumableSampler(37, seed=9, num_replicas=ranks, rank=rank, repeats=repeats, batch_size=4)
        full.set_epoch(5)
        expected = list(full)
        run = ResumableSampler(37, seed=9, num_replicas=ranks, rank=rank, repeats=repeats, batch_size=4)
        run.set_epoch(5)
        it = iter(run)
        head = [next(it) for _ in range(12)]
        state = run.state_dict(batches_done=3)
        assert state["epoch"] == 5 and state["consumed"] == 12
        fresh = ResumableSampler(37, seed=9, num_replicas=ranks, rank=rank, repeats=repeats, batch_size=4)
        fresh.load_state_dict(state)
        fresh.set_epoch(5)  # the loop calls this at the start of the resumed epoch: the position is kept
        assert fresh.start_batch == 3 and len(fresh) == len(expected)
        assert head + list(fresh) == expected
        assert list(fresh) == expected  # the position applies once; re-iterating gives the whole epoch
        fresh.set_epoch(6)
        full.set_epoch(6)
        assert list(fresh) == list(full)


def test_state_without_batches_done_counts_handed_out_samples():
    s = ResumableSampler(10, seed=0)
    it = iter(s)
    [next(it) for _ in range(4)]
    assert s.state_dict()["consumed"] == 4


def test_resume_refuses_a_different_dataset_and_warns_on_a_different_world_size(caplog):
    state = ResumableSampler(30, seed=1).state_dict(batches_done=0)
    with pytest.raises(ValueError, match="num_samples=30"):
        ResumableSampler(31, seed=1).load_state_dict(state)
    s = ResumableSampler(30, seed=1, num_replicas=2, batch_size=2)
    s.load_state_dict({**state, "consumed": 10, "num_replicas": 1})
    assert s.start_batch == 2 and "not the exact continuation" in caplog.text


class _Noisy(Dataset):
    """An 'augmentation' that draws from all three generators."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.tensor([float(i), random.random(), float(np.random.rand()), torch.rand(()).item()])


def _epoch(num_workers: int, state: dict | None = None) -> torch.Tensor:
    sampler = ResumableSampler(16, seed=3, batch_size=4)
    if state:
        sampler.load_state_dict(state)
    sampler.set_epoch(1)
    # its own generator: otherwise each iter(loader) draws the worker base seed from the global torch RNG, which
    # shifts the training loop's random stream differently in a resumed epoch
    loader = DataLoader(
        SeededDataset(_Noisy()), 4, sampler=sampler, num_workers=num_workers, generator=torch.Generator()
    )
    return torch.cat(list(loader))


def test_augmentations_do_not_depend_on_workers_or_interruptions():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    single = _epoch(0)
    assert torch.equal(torch.get_rng_state(), before)  # the training loop's own random stream is untouched
    assert torch.equal(single, _epoch(2))
    resumed = _epoch(2, {"epoch": 1, "consumed": 8})
    assert torch.equal(resumed, single[8:])
    assert len(set(single[:, 3].tolist())) == 16  # real randomness, different per sample


def test_seeded_dataset_passes_plain_indices_and_attributes_through():
    class Base(_Noisy):
        classes = ["a", "b"]

    ds = SeededDataset(Base())
    assert len(ds) == 16 and ds.classes == ["a", "b"] and ds[3][0] == 3.0
    assert torch.equal(ds[(3, 77)], ds[(3, 77)])
