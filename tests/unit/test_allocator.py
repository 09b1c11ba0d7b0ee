"""FreeSpace: the allocator's free map, and runs()."""

from __future__ import annotations

import random

import pytest

from razorfs.actors.block_allocator import FreeSpace, runs


def blocks_of(extents) -> list[int]:
    return [block for start, length in extents for block in range(start, start + length)]


def test_new_free_space_grows_at_the_high_water_mark() -> None:
    space = FreeSpace()
    assert space.allocate(3) == [(0, 3)]
    assert space.allocate(2) == [(3, 2)]
    assert space.high_water == 5 and space.free_count == 0 and space.extents() == []


def test_allocate_takes_the_first_hole_that_fits() -> None:
    space = FreeSpace.from_used([0, 3, 4, 10], 12)  # holes: 1+2, 5+5, 11+1
    assert space.extents() == [(1, 2), (5, 5), (11, 1)]
    assert space.allocate(3) == [(5, 3)]
    assert space.extents() == [(1, 2), (8, 2), (11, 1)]
    assert space.allocate(2) == [(1, 2)]
    assert space.allocate(1) == [(8, 1)]
    assert space.extents() == [(9, 1), (11, 1)]
    assert space.free_count == 2 and space.high_water == 12


def test_allocate_grows_when_no_hole_fits() -> None:
    space = FreeSpace.from_used([0, 3, 4, 10], 12)
    assert space.allocate(6) == [(12, 6)]
    assert space.high_water == 18
    assert space.extents() == [(1, 2), (5, 5), (11, 1)]  # holes untouched
    assert space.free_count == 8


def test_allocate_fragmented_gathers_holes_then_grows() -> None:
    space = FreeSpace.from_used([0, 3, 4, 10], 12)
    assert space.allocate_fragmented(7) == [(1, 2), (5, 5)]
    assert space.extents() == [(11, 1)] and space.free_count == 1
    assert space.allocate_fragmented(3) == [(11, 1), (12, 2)]
    assert space.extents() == [] and space.free_count == 0 and space.high_water == 14


def test_allocate_fragmented_splits_the_last_hole() -> None:
    space = FreeSpace.from_used([0, 3], 10)  # holes 1+2, 4+6
    assert space.allocate_fragmented(4) == [(1, 2), (4, 2)]
    assert space.extents() == [(6, 4)] and space.free_count == 4


def test_free_merges_with_both_neighbours() -> None:
    space = FreeSpace(high_water=0)
    space.allocate(10)
    space.free(2, 2)
    space.free(6, 2)
    assert space.extents() == [(2, 2), (6, 2)]
    space.free(4, 2)  # joins 2+2 and 6+2
    assert space.extents() == [(2, 6)]
    space.free(8, 2)  # joins the previous one
    space.free(0, 1)  # lone, next to nothing
    assert space.extents() == [(0, 1), (2, 8)]
    space.free(1, 1)
    assert space.extents() == [(0, 10)] and space.free_count == 10


def test_trim_top_gives_back_a_free_run_at_the_high_water_mark() -> None:
    space = FreeSpace()
    space.allocate(8)
    space.free(2, 1)
    space.trim_top()  # the top block is in use: nothing to give back
    assert space.high_water == 8 and space.extents() == [(2, 1)]
    space.free(5, 3)
    space.trim_top()
    assert space.high_water == 5 and space.extents() == [(2, 1)] and space.free_count == 1
    assert space.allocate(3) == [(5, 3)]  # the store grows there again


def test_freed_blocks_are_reused() -> None:
    space = FreeSpace()
    space.allocate(8)
    space.free(3, 2)
    assert space.allocate(2) == [(3, 2)]
    assert space.high_water == 8 and space.free_count == 0


@pytest.mark.parametrize("start, length", [(2, 1), (1, 2), (3, 4), (0, 10), (4, 1), (5, 3)])
def test_double_free_raises(start: int, length: int) -> None:
    space = FreeSpace.from_used([0, 1, 6, 7, 8, 9], 10)  # free: 2..5
    with pytest.raises(ValueError, match="double free"):
        space.free(start, length)


def test_refused_double_free_leaves_the_free_map_unchanged() -> None:
    space = FreeSpace.from_used(range(5, 10), 15)  # free: 0+5 and 10+5
    with pytest.raises(ValueError, match="double free"):
        space.free(3, 7)  # 3..4 are already free; 10 is adjacent
    assert space.extents() == [(0, 5), (10, 5)]
    assert space.free_count == 10


def test_from_used_builds_exactly_the_complement() -> None:
    used = [9, 2, 3, 3, 7, 15]
    space = FreeSpace.from_used(used, 20)
    assert space.high_water == 20
    assert space.extents() == [(0, 2), (4, 3), (8, 1), (10, 5), (16, 4)]
    assert set(blocks_of(space.extents())) == set(range(20)) - set(used)
    assert space.free_count == 20 - len(set(used))


def test_from_used_raises_the_high_water_mark_above_used_blocks() -> None:
    space = FreeSpace.from_used([0, 1, 12], 5)
    assert space.high_water == 13
    assert space.extents() == [(2, 10)]


def test_from_used_of_nothing() -> None:
    assert FreeSpace.from_used([], 0).extents() == []
    space = FreeSpace.from_used(iter([]), 4)
    assert space.extents() == [(0, 4)] and space.free_count == 4


def test_runs_groups_consecutive_numbers() -> None:
    assert runs([]) == []
    assert runs([5]) == [(5, 1)]
    assert runs([7, 1, 2, 3, 9, 8, 20]) == [(1, 3), (7, 3), (20, 1)]
    assert runs((x for x in (4, 6))) == [(4, 1), (6, 1)]


def check_invariants(space: FreeSpace, allocated: set[int]) -> None:
    extents = space.extents()
    free_blocks = blocks_of(extents)
    assert space.free_count == len(free_blocks)
    assert not allocated & set(free_blocks)
    assert set(free_blocks) | allocated == set(range(space.high_water))
    for (start, length), (following, _) in zip(extents, extents[1:]):
        assert length > 0 and start + length < following  # sorted, disjoint, merged


def test_random_operations_never_hand_out_a_block_twice() -> None:
    rng = random.Random(20240611)
    space = FreeSpace.from_used([3, 4, 5, 40], 50)
    allocated = {3, 4, 5, 40}
    reused = 0  # allocations served (at least partly) from holes, not by growing
    for step in range(3000):
        choice = rng.random()
        if choice < 0.45 or not allocated:
            count = rng.randint(1, 12)
            high_water = space.high_water
            extents = (space.allocate_fragmented(count) if rng.random() < 0.3
                       else space.allocate(count))
            got = blocks_of(extents)
            assert len(got) == count
            assert not allocated & set(got), f"step {step}: handed out an allocated block"
            assert len(set(got)) == count
            allocated.update(got)
            reused += min(got) < high_water
        else:
            # Free one run of allocated blocks, as the allocator does with runs(blocks).
            victim, span = rng.choice(sorted(allocated)), rng.randint(1, 6)
            group = [b for b in range(victim, victim + span) if b in allocated]
            for start, length in runs(group):
                space.free(start, length)
            allocated.difference_update(group)
        if step % 50 == 0:
            check_invariants(space, allocated)
    check_invariants(space, allocated)
    assert space.high_water - space.free_count == len(allocated)
    assert reused > 500  # the holes really were exercised
