"""Whether the host held still through a run: each ratio is only as good as that.

On a shared VM a neighbour's work slows whatever runs at that moment, and a slow spell that lands on one
side of a ratio moves it by as much as it slows that side. The run carries three signals of it:
- the contention probes (start, between the servers, end): a free machine runs the probe's GEMM nearly
  twice as fast on two threads as on one (SCALING_PER_THREAD);
- their memory read rates (best of 5 each) against the run's best (READ_SPREAD);
- base-16's six runs on the auto, merged and unmerged servers, the same traffic through the same code,
  against each other (BASE_SPREAD).
The thresholds come from quiet and slow runs on a shared 2-core VM (docs/decisions.md).
"""

from __future__ import annotations

from bench.targets import pooled_base_tokens_per_s

PROBES = ("start", "between", "end")
SCALING_PER_THREAD = 0.85  # of ideal, up to two threads: a GEMM this size scales near-perfectly to two
READ_SPREAD = 0.85  # a probe reading memory under this fraction of the run's best
BASE_SPREAD = 1.15  # base-16's fastest run over its slowest


def probes(meta: dict) -> dict[str, dict]:
    """The run's contention probes by when they ran (runs written before the middle one have two)."""
    return {when: meta[f"contention_probe_{when}"] for when in PROBES if f"contention_probe_{when}" in meta}


def cores_look_free(probe: dict, one_thread_best: float = 0.0) -> bool:
    """Whether the thread team ran near its ideal speed-up over one thread: over the best one-thread reading
    known (`one_thread_best`, from the run's other probes), since a neighbour slows the lone thread too (a
    probe read 62 on one thread and 112 on two against 93 and 184 quiet)."""
    one = max(probe["one_thread_gflops"], one_thread_best)
    return probe["all_threads_gflops"] >= SCALING_PER_THREAD * min(probe["threads"], 2) * one


def gemm(probe: dict) -> str:
    return (f"GEMM {probe['one_thread_gflops']:.0f} GFLOP/s on 1 thread, {probe['all_threads_gflops']:.0f} on "
            f"{probe['threads']}")


def one_thread_best(run_probes: dict[str, dict]) -> float:
    return max(p["one_thread_gflops"] for p in run_probes.values())


def free_at(run_probes: dict[str, dict]) -> dict[str, bool]:
    """Whether each probe found the cores free, against the best one-thread reading of them all."""
    one_best = one_thread_best(run_probes)
    return {when: cores_look_free(p, one_best) for when, p in run_probes.items()}


def findings(results: dict) -> list[str]:
    """What says the host did not hold still in this run (none: it did, as far as the run can tell)."""
    run_probes = probes(results["meta"])
    one_best = one_thread_best(run_probes)
    found = [f"cores shared at the {when} probe ({gemm(run_probes[when])}; {one_best:.0f} on 1 at best)"
             for when, free in free_at(run_probes).items() if not free]
    reads = {when: p["read_gbps"] for when, p in run_probes.items()}
    best = max(reads.values())
    slow = [f"{when} {gbps:.0f}" for when, gbps in reads.items() if gbps < READ_SPREAD * best]
    if slow:
        found.append(f"memory read {', '.join(slow)} GB/s against {best:.0f} at best")
    if "servers" in results:
        _, runs = pooled_base_tokens_per_s(results, 16)
        if runs and max(runs) > BASE_SPREAD * min(runs):
            found.append(f"base-16 read {min(runs):.0f}-{max(runs):.0f} tok/s over its {len(runs)} runs")
    return found


def verdict(results: dict) -> str:
    found = findings(results)
    if not found:
        return "Host steady through the run (probes' GEMM scaling and memory reads, base-16 across servers)."
    return f"HOST UNSTEADY: {'; '.join(found)}. Ratios may be off by as much as these spreads."
