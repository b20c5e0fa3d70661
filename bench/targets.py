"""The product's performance goals, each a ratio of two figures measured in the same run."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from bench.load import percentile


@dataclass
class Target:
    name: str
    ratio: float
    goal: float
    higher_is_better: bool
    detail: str

    @property
    def passed(self) -> bool:
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    def as_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


AGAIN = "-again"  # suffix of a base-only workload run a second time, after the others


def base_tokens_per_s(workloads: dict, streams: int) -> float | None:
    """A server's base-only throughput at `streams`: the mean of its runs before and after the other
    workloads where both exist (a shared machine drifts over a server's lifetime)."""
    return mean_tokens_per_s(workloads, f"base-{streams}")


# servers whose base-only requests take the same path, on the fp32 base transformers runs too (`auto`
# serves the quantized default: its figure is shown beside)
SAME_ENGINE = ("merged", "unmerged")


def pooled_base_tokens_per_s(results: dict, streams: int) -> tuple[float | None, list[float]]:
    """loraplex's base-only throughput at `streams`, for the comparison with transformers: the median of the
    base-only runs of every server in SAME_ENGINE (a request without an adapter is served alike in each
    LoRA mode), and those runs in time order. They are spread over the run as transformers' three readings
    are, and a median of them lets no single slow spell decide the ratio (docs/decisions.md)."""
    runs = [w[name]["tokens_per_s"] for server in SAME_ENGINE if server in results["servers"]
            for w in [results["servers"][server]["workloads"]]
            for name in (f"base-{streams}", f"base-{streams}{AGAIN}") if name in w]
    return (statistics.median(runs) if runs else None), runs


def mean_tokens_per_s(workloads: dict, name: str) -> float | None:
    """The mean over a workload's run and its `-again` run, where they exist."""
    runs = [workloads[n]["tokens_per_s"] for n in (name, f"{name}{AGAIN}") if n in workloads]
    return sum(runs) / len(runs) if runs else None


def pooled_ttft_p99(workloads: dict, name: str) -> tuple[float, int]:
    """TTFT p99 over a workload's run and its `-again` run together: one run's 32 requests put p99 at its
    maximum, so a single slow request decided it."""
    runs = [workloads[n] for n in (name, f"{name}{AGAIN}") if n in workloads]
    if not all(run.get("ttfts") for run in runs):  # results written before the samples were kept
        return runs[0]["ttft_p99"], runs[0]["requests"]
    samples = [t for run in runs for t in run["ttfts"]]
    return percentile(samples, 99), len(samples)


def _runs_detail(workloads: dict, name: str) -> str:
    if f"{name}{AGAIN}" not in workloads:
        return ""
    first, again = workloads[name]["tokens_per_s"], workloads[f"{name}{AGAIN}"]["tokens_per_s"]
    return f" ({name.split('-')[0]} {first:.0f} first, {again:.0f} last)"


def _base_detail(workloads: dict) -> str:
    return _runs_detail(workloads, "base-16")


def _tps(results: dict, server: str, workload: str) -> float:
    return results["servers"][server]["workloads"][workload]["tokens_per_s"]


def _without_prefix_cache(results: dict, workload: str, baseline: float) -> str:
    if "nocache" not in results["servers"]:
        return ""
    tps = _tps(results, "nocache", workload)
    return f"; {tps / baseline:.2f}x ({tps:.0f} tok/s) with --prefix-cache-mb 0"


def _huge_pages_hf(results: dict, tps: float) -> str:
    huge = results["baselines"].get("hf_huge_pages")
    return f"; {tps / huge['tokens_per_s']:.2f}x transformers in huge pages" if huge else ""


def evaluate(results: dict) -> list[Target]:
    auto = results["servers"]["auto"]["workloads"]
    base = base_tokens_per_s(auto, 16)
    pooled_base, base_runs = pooled_base_tokens_per_s(results, 16)
    hf = results["baselines"]["hf_batch16_tokens_per_s"]
    peft_mixed = results["baselines"]["peft_mixed16_tokens_per_s"]
    merged = results["servers"]["merged"]["workloads"]
    merged_single, merged_base = mean_tokens_per_s(merged, "single-16"), base_tokens_per_s(merged, 16)
    swap, peft_swap = (results["baselines"]["swap"][side]["seconds"] for side in ("loraplex", "peft"))
    merged_step = results["micro"]["merged_step"]
    memory = results["registry"]["counts"][-1]
    lone_ttft = auto["lone"]["ttft_p50"]
    loaded_ttft, loaded_requests = pooled_ttft_p99(auto, "base-16")
    mixed8, all8 = mean_tokens_per_s(auto, "mixed8-16"), mean_tokens_per_s(auto, "all8-16")
    return [
        Target("base-only, 16 streams vs transformers generate b16", pooled_base / hf, 3.0, True,
               f"{pooled_base:.0f} vs {hf:.0f} tok/s, medians ({len(base_runs)} base-16 runs on "
               f"{'/'.join(SAME_ENGINE)}: {', '.join(f'{run:.0f}' for run in base_runs)}; "
               f"auto's own on the quantized default {base:.0f}: {base / hf:.2f}x)"
               f"{_without_prefix_cache(results, 'base-16', hf)}{_huge_pages_hf(results, pooled_base)}"),
        Target("8 adapters mixed (q/v r8) vs own base-only", mixed8 / base, 0.95, True,
               f"{mixed8:.0f} vs {base:.0f} tok/s{_runs_detail(auto, 'mixed8-16')}{_base_detail(auto)}"),
        Target("8 adapters mixed (7 proj r16) vs own base-only", all8 / base, 0.8, True,
               f"{all8:.0f} vs {base:.0f} tok/s{_runs_detail(auto, 'all8-16')}{_base_detail(auto)}"),
        Target("8 adapters mixed (q/v r8) vs PEFT mixed-batch b16", mixed8 / peft_mixed,
               4.0, True, f"{mixed8:.0f} vs {peft_mixed:.0f} tok/s"
               f"{_without_prefix_cache(results, 'mixed8-16', peft_mixed)}"),
        Target("single adapter, merged mode vs base-only", merged_single / merged_base, 0.97, True,
               f"{merged_single:.0f} vs {merged_base:.0f} tok/s (--lora-mode merged){_runs_detail(merged, 'single-16')}"
               f"{_base_detail(merged)}; in-process decode step {1 / merged_step['ratio']:.2f}x"),
        Target("swap speed-up vs PEFT merge+unmerge", peft_swap / swap, 4.0, True,
               f"{swap * 1e3:.1f} vs {peft_swap * 1e3:.1f} ms"),
        Target(f"memory per adapter / file size ({memory['adapters']} adapters)", memory["per_adapter_vs_file"], 1.2,
               False, f"{memory['per_adapter_bytes'] / 2**20:.2f} vs {results['registry']['file_bytes'] / 2**20:.2f} MiB"),
        Target("TTFT p99 at 16 streams vs a lone request's", loaded_ttft / lone_ttft, 3.0, False,
               f"{loaded_ttft * 1e3:.0f} vs {lone_ttft * 1e3:.0f} ms (p99 over {loaded_requests} requests)"),
        *mix_targets(auto),
        *quantized_targets(results.get("quantized"), results.get("llamacpp")),
        *constrained_targets(results.get("constrained")),
        *cold_adapter_targets(results["servers"].get("cold")),
    ]


MIX_WORKLOAD = "mix2-16"  # 16 streams, each request a 50/50 mix of two q/v r8 adapters (bench.run)


def mix_targets(workloads: dict) -> list[Target]:
    """Weighted mixes against the same streams over single adapters (`mixed8-16`), on one server: a mix of two
    r8 adapters is served as one r16 adapter on the same projections (adapters.mix)."""
    if MIX_WORKLOAD not in workloads:
        return []
    mix, single = mean_tokens_per_s(workloads, MIX_WORKLOAD), mean_tokens_per_s(workloads, "mixed8-16")
    return [Target("16 streams of 50/50 mixes vs single adapters", mix / single, 0.9, True,
                   f"{mix:.0f} vs {single:.0f} tok/s (8 mixes vs 8 adapters, q/v r8)"
                   f"{_runs_detail(workloads, MIX_WORKLOAD)}{_runs_detail(workloads, 'mixed8-16')}")]


def cold_adapter_targets(reading: dict | None) -> list[Target]:
    """The 16 streams' pace while requests for cold adapters arrive, from `bench.cold_adapter.run`."""
    if not reading:
        return []
    phases = reading["summary"]
    alone, warm, cold = phases["alone-16"], phases["warm-16"], phases["cold-16"]
    return [Target("TTFT p99, 16 streams with cold adapters vs without", cold["ttft_p99"] / alone["ttft_p99"],
                   2.0, False,
                   f"{cold['ttft_p99'] * 1e3:.0f} vs {alone['ttft_p99'] * 1e3:.0f} ms (p99 over {cold['requests']} and "
                   f"{alone['requests']} requests); inter-token p99 {cold['itl_p99'] / alone['itl_p99']:.2f}x; "
                   f"{cold['ttft_p99'] / warm['ttft_p99']:.2f}x with as many requests for a resident adapter; "
                   f"{cold['extra_requests']} cold requests, their TTFT p50 {cold['extra_ttft_p50'] * 1e3:.0f} ms")]


def constrained_targets(reading: dict | None) -> list[Target]:
    """Structured output's cost on a batch, from `bench.constrained.run` (one engine, in turns)."""
    if not reading:
        return []
    return [Target(f"{reading['streams']} streams, half JSON-constrained vs all free",
                   reading["half_constrained"] / reading["free"], 0.85, True,
                   f"{reading['half_constrained']:.0f} vs {reading['free']:.0f} tok/s ({reading['weight_format']})")]


def quantized_targets(readings: dict | None, llamacpp: dict | None = None) -> list[Target]:
    """The QLoRA goals, from `bench.quantized.run` (an engine per format, in turns): the quantized default
    (the GGUF's own blocks) against the same model in fp32, and against llama.cpp (`bench.llamacpp.run`,
    where it is installed) on the same file."""
    if not readings or "gguf" not in readings:
        return []
    fp32, gguf = readings["none"], readings["gguf"]
    fmt = gguf["weight_format"]
    against_llamacpp = [] if not llamacpp else [
        Target("quantized base vs llama.cpp, 1 stream", gguf["streams_1"] / llamacpp["streams_1"], 1.0, True,
               f"{gguf['streams_1']:.1f} vs {llamacpp['streams_1']:.1f} tok/s (llama-cpp-python "
               f"{llamacpp['version']}, same GGUF)"),
        Target(f"16 streams over {gguf['mixed_adapters']} adapters vs llama.cpp",
               gguf["mixed_16"] / llamacpp["streams_1"], 3.0, True, f"{gguf['mixed_16']:.0f} vs {llamacpp['streams_1']:.1f} tok/s (llama.cpp serializes "
               "requests whose adapters differ: its one-stream rate, an upper bound)"),
    ]
    return [*against_llamacpp,
        Target("quantized base vs fp32, 1 stream", gguf["streams_1"] / fp32["streams_1"], 3.0, True,
               f"{gguf['streams_1']:.1f} vs {fp32['streams_1']:.1f} tok/s ({fmt})"),
        Target("quantized base vs fp32, 16 streams", gguf["streams_16"] / fp32["streams_16"], 2.0, True,
               f"{gguf['streams_16']:.0f} vs {fp32['streams_16']:.0f} tok/s ({fmt})"),
        Target(f"{gguf['mixed_adapters']} adapters mixed (q/v r8) vs base-only, quantized base",
               gguf["mixed_16"] / gguf["streams_16"], 0.9, True,
               f"{gguf['mixed_16']:.0f} vs {gguf['streams_16']:.0f} tok/s at 16 streams"),
        Target("resident base weights, quantized / fp32", gguf["base_weight_bytes"] / fp32["base_weight_bytes"], 0.25,
               False, f"{gguf['base_weight_bytes'] / 2**20:.0f} vs {fp32['base_weight_bytes'] / 2**20:.0f} MiB"),
    ]
