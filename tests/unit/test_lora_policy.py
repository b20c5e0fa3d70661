"""auto's choice of merged vs unmerged over a sequence of steps (server.lora.policy.MergeChoice)."""

from server.lora.policy import MergeChoice

A, B = object(), object()


def run(choice: MergeChoice, steps: list[list]) -> list:
    """The merge target of each step, feeding back what the engine would then hold merged."""
    merged, targets = None, []
    for running in steps:
        merged = choice.next(running, merged)
        targets.append(merged)
    return targets


def test_auto_merges_an_adapter_once_it_has_been_the_whole_running_set_for_the_settle_steps():
    assert run(MergeChoice("auto", settle_steps=3), [[A, A]] * 5) == [None, None, None, A, A]


def test_auto_does_not_merge_for_a_moment_of_uniformity():
    steps = [[A], [A, B], [A, B], [B], [A, B]]
    assert run(MergeChoice("auto", settle_steps=3), steps) == [None] * 5


def test_a_mix_or_the_bare_base_unmerges_at_once_and_the_wait_starts_over():
    steps = [[A]] * 3 + [[A, None]] + [[A]] * 3
    assert run(MergeChoice("auto", settle_steps=2), steps) == [None, None, A, None, None, None, A]


def test_another_adapter_replaces_the_merged_one_only_after_its_own_wait():
    steps = [[A]] * 2 + [[B]] * 3
    assert run(MergeChoice("auto", settle_steps=1), steps) == [None, A, None, B, B]


def test_forced_modes_do_not_wait():
    assert run(MergeChoice("merged", settle_steps=3), [[A]] * 2) == [A, A]
    assert run(MergeChoice("unmerged", settle_steps=3), [[A]] * 2) == [None, None]
