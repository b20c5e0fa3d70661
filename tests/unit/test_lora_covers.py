"""Which concatenated adapter sets serve a step: reuse over rebuilding, at most two per step, each active
adapter in exactly one."""

from server.lora.covers import CoverCache


def cache(max_covers: int = 8) -> CoverCache:
    return CoverCache(lambda slots: sorted(slots), max_covers=max_covers)


def served(choice) -> list[int]:
    return sorted(slot for cover, _ in choice for slot in cover)


def test_the_same_adapters_again_build_nothing():
    c = cache()
    c.select(frozenset({1, 2, 3}))
    assert [cover for cover, _ in c.select(frozenset({1, 2, 3}))] == [frozenset({1, 2, 3})]
    assert c.builds == 1


def test_a_request_leaving_reuses_the_larger_cover_while_at_most_half_of_it_idles():
    c = cache()
    c.select(frozenset({1, 2, 3, 4}))
    assert c.select(frozenset({1, 2}))[0][0] == frozenset({1, 2, 3, 4})
    assert c.builds == 1
    assert c.select(frozenset({1}))[0][0] == frozenset({1})  # three of four idle: its own cover
    assert c.builds == 2


def test_a_new_adapter_gets_a_cover_of_its_own_beside_the_old_one():
    c = cache()
    c.select(frozenset(range(8)))
    choice = c.select(frozenset(range(8)) | {20})
    assert [cover for cover, _ in choice] == [frozenset(range(8)), frozenset({20})]
    assert served(choice) == [*range(8), 20]


def test_mostly_new_adapters_get_one_new_cover():
    c = cache()
    c.select(frozenset({1, 2}))
    choice = c.select(frozenset({1, 2, 10, 11, 12}))
    assert [cover for cover, _ in choice] == [frozenset({1, 2, 10, 11, 12})]


def test_no_adapter_is_served_by_two_covers():
    c = cache()
    c.select(frozenset({1, 2, 3, 4}))
    c.select(frozenset({4, 5}))
    for active in [{1, 2, 3, 4, 5}, {1, 2, 4, 5}, {2, 3, 4, 5, 6}, {4, 5, 1}]:
        choice = c.select(frozenset(active))
        assert len(choice) <= 2
        counts = [sum(slot in cover for cover, _ in choice) for slot in active]
        assert counts == [1] * len(active), (active, choice)


def test_forgetting_a_slot_drops_every_cover_holding_it():
    c = cache()
    c.select(frozenset({1, 2}))
    c.select(frozenset({3}))
    c.forget(2)
    assert len(c) == 1
    c.select(frozenset({1, 2}))
    assert c.builds == 3


def test_least_recently_used_covers_go_first():
    c = cache(max_covers=2)
    for cover in ({1}, {2}, {1}, {3}):
        c.select(frozenset(cover))
    assert c.builds == 3
    c.select(frozenset({1}))
    assert c.builds == 3  # {1} was used more recently than {2}, which went
