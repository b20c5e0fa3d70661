"""The printed report: every figure next to the same-run baseline it is a ratio of."""

from __future__ import annotations

from bench.steadiness import free_at, gemm, probes, verdict
from bench.targets import AGAIN, base_tokens_per_s


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}"


def _workloads(results: dict) -> list[str]:
    hf = results["baselines"]["hf_batch16_tokens_per_s"]
    hf_rss = results["baselines"]["hf_peak_rss_mb"]
    lone = results["servers"]["auto"]["workloads"]["lone"]
    lines = [
        "Workloads: closed-loop SSE streams, 64 new tokens each (ignore_eos, greedy). x base: tok/s over the same",
        f"server's base-only runs at the same streams (mean of base-N and base-N{AGAIN}, run first and last where",
        "both exist); x HF: over transformers generate b16; TTFT x lone: p99 over a",
        f"lone request's p50 ({_ms(lone['ttft_p50'])} ms); RSS x HF: server peak RSS over the transformers process "
        f"peak ({hf_rss:.0f} MiB).",
        f"{'mode':9}{'workload':13}{'streams':>7}{'tok/s':>8}{'x base':>8}{'x HF':>7}{'TTFT p50/p99 ms':>17}"
        f"{'x lone':>8}{'latency p50/p99 s':>19}{'RSS MiB':>9}{'x HF':>6}",
    ]
    for mode, server in results["servers"].items():
        for name, w in server["workloads"].items():
            base = w["tokens_per_s"] if w["streams"] == 1 else base_tokens_per_s(server["workloads"], w["streams"])
            x_base = f"{w['tokens_per_s'] / base:.2f}" if base else "-"
            lines.append(
                f"{mode:9}{name:13}{w['streams']:>7}{w['tokens_per_s']:>8.0f}{x_base:>8}"
                f"{w['tokens_per_s'] / hf:>7.2f}{_ms(w['ttft_p50']) + '/' + _ms(w['ttft_p99']):>17}"
                f"{w['ttft_p99'] / lone['ttft_p50']:>8.2f}"
                f"{w['latency_p50']:>11.2f}/{w['latency_p99']:<7.2f}{w['peak_rss_mb']:>9.0f}"
                f"{w['peak_rss_mb'] / hf_rss:>6.2f}{'' if w['steady'] else '  (no steady window: tok/s over the whole run)'}")
    return lines


def _engine(results: dict) -> list[str]:
    """What each workload cost the engine (from the server's /metrics), to explain a row's outliers."""
    lines = ["Engine, per workload (server /metrics): steps x mean ms (decode only | with a prompt chunk), steps over",
             "100 ms, merges/restores, LoRA cover builds and their time, adapter slot loads, GC pauses (over 50 ms):",
             f"{'mode':9}{'workload':16}{'decode steps':>16}{'prompt steps':>16}{'>100ms':>8}{'merge/rest':>11}"
             f"{'covers':>14}{'loads':>7}{'gc (>50ms)':>12}"]
    for mode, server in results["servers"].items():
        for name, w in server["workloads"].items():
            e = w.get("engine")
            if not e:  # results written before the engine counters were kept
                continue
            steps = {kind: (e[f"{kind}_steps"], e[f"{kind}_steps_s"]) for kind in ("decode", "prefill")}
            slow = sum(e[f"{kind}_steps"] - e[f"{kind}_steps_within_100ms"] for kind in steps)
            cells = [f"{n:.0f} x {1e3 * t / n:.1f}" if n else "0" for n, t in steps.values()]
            gc = f"{e['gc_pauses']:.0f} ({e['gc_pauses'] - e['gc_pauses_within_50ms']:.0f})"
            lines.append(f"{mode:9}{name:16}{cells[0]:>16}{cells[1]:>16}{slow:>8.0f}"
                         f"{e['merges']:>6.0f}/{e['restores']:<4.0f}"
                         f"{e['cover_builds']:>6.0f} in {e['cover_build_s']:.2f}s"
                         f"{e['slot_loads']:>7.0f}{gc:>12}")
    return lines


_READ = {2: "before and after the servers", 3: "before, between and after the servers"}


def _readings(baselines: dict, key: str) -> str:
    readings = baselines.get("readings", {}).get(key)
    if not readings:
        return ""
    return (f"  (median of {', '.join(f'{r:.0f}' for r in readings)}, "
            f"read {_READ.get(len(readings), 'over the run')})")


def _baselines(results: dict) -> list[str]:
    b = results["baselines"]
    hf = b["hf_batch16_tokens_per_s"]
    naive = b["peft_naive"]
    return [
        "Baselines, in-process on the same model, prompt and adapter files (x HF: over transformers b16):",
        f"  transformers generate, batch 16, base model    {hf:7.0f} tok/s  x HF 1.00"
        f"{_readings(b, 'hf_batch16_tokens_per_s')}",
        f"  PEFT naive: set_adapter + batch-1 generate,     {naive['tokens_per_s']:7.0f} tok/s  x HF "
        f"{naive['tokens_per_s'] / hf:.2f}  ({naive['latency_p50']:.2f} s/request, one at a time)",
        f"  PEFT mixed-batch generate(adapter_names), b16   {b['peft_mixed16_tokens_per_s']:7.0f} tok/s  x HF "
        f"{b['peft_mixed16_tokens_per_s'] / hf:.2f}  (8 q/v r8 adapters, 2 rows each)"
        f"{_readings(b, 'peft_mixed16_tokens_per_s')}",
        *([f"  transformers generate, b16, in huge pages        {huge['tokens_per_s']:7.0f} tok/s  x HF "
           f"{huge['tokens_per_s'] / hf:.2f}  (its weights advised and collapsed as the server's are; "
           f"{(huge['huge_page_bytes'] or 0) / 2**20:.0f} MiB in huge pages)"] if (huge := b.get("hf_huge_pages")) else []),
    ]


def _ceiling(results: dict) -> list[str]:
    m, meta = results["micro"], results["meta"]
    # The same GEMM is timed in the micro-benchmarks and in every contention probe; the best is the ceiling,
    # since interference only ever lowers a measurement.
    timings = [m["matmul_ceiling_gflops"], *(p["all_threads_gflops"] for p in probes(meta).values())]
    ceiling = max(timings)
    best_name, best = max(((f"{mode} {name}", w["tokens_per_s"]) for mode, s in results["servers"].items()
                           for name, w in s["workloads"].items()), key=lambda item: item[1])
    achieved = 2 * m["params_per_token"] * best / 1e9
    return [
        f"Hardware ceiling: fp32 GEMM [64,576]x[576,1536] through server Linear ({m['backend']}, {m['threads']} "
        f"threads): {ceiling:.0f} GFLOP/s (best of {len(timings)} timings: "
        f"{', '.join(f'{t:.0f}' for t in timings)}).",
        f"  best run ({best_name}, {best:.0f} tok/s) x 2 x {m['params_per_token'] / 1e6:.1f}M params/token = "
        f"{achieved:.1f} GFLOP/s = {100 * achieved / ceiling:.0f}% of the ceiling",
    ]


def _micro(results: dict) -> list[str]:
    m, b, reg = results["micro"], results["baselines"], results["registry"]
    lines = ["Unmerged LoRA decode step vs the bare base (in-process forward, LoraSlots plan):",
             f"  {'batch':>5}{'base ms':>9}{'q/v r8 single':>15}{'q/v r8 8 mixed':>16}{'7-proj r16 8 mixed':>20}"
             f"   plan rebuild ms (single / 8 mixed / 7-proj 8 mixed)"]
    for row in m["lora_overhead"]:
        lines.append(f"  {row['batch']:>5}{row['base_step_s'] * 1e3:>9.1f}{row['qv_single_ratio']:>14.2f}x"
                     f"{row['qv_mixed8_ratio']:>15.2f}x{row['all_mixed8_ratio']:>19.2f}x   "
                     f"{row['qv_single_plan_s'] * 1e3:.1f} / {row['qv_mixed8_plan_s'] * 1e3:.1f} / "
                     f"{row['all_mixed8_plan_s'] * 1e3:.1f}")
    merged = m["merged_step"]
    lines.append(f"Merged decode step (batch {merged['batch']}, q/v r8 merged into the base) vs the bare base, in turns: "
                 f"{_ms(merged['merged_step_s'])} vs {_ms(merged['base_step_s'])} ms -> {1 / merged['ratio']:.2f}x the base's speed")
    swap, peft = b["swap"]["loraplex"], b["swap"]["peft"]
    lines.append(f"Swap, timed in turns: merge_into_base + restore_base {swap['seconds'] * 1e3:.1f} ms (exact restore: "
                 f"{swap['restore_exact']}) vs PEFT merge_adapter + unmerge_adapter {peft['seconds'] * 1e3:.1f} ms "
                 f"(exact: {peft['restore_exact']}, {100 * peft['changed_fraction']:.1f}% of q_proj weights drifted)"
                 f" -> speed-up {peft['seconds'] / swap['seconds']:.2f}x")
    ready = results["servers"]["auto"]["upload_to_ready"]
    lines.append(f"Upload to ready: POST /adapters {_ms(ready['upload_s'])} ms + first token {_ms(ready['first_token_s'])}"
                 f" ms = {_ms(ready['total_s'])} ms vs PEFT load_adapter + first token "
                 f"{_ms(b['peft_load_to_first_token_s'])} ms -> speed-up {b['peft_load_to_first_token_s'] / ready['total_s']:.2f}x")
    empty, again = results["servers"]["auto"]["start_s"], results["restart"]
    lines.append(f"Cold start: healthy in {again['start_s']:.1f} s with {again['stored_adapters']} stored adapters vs "
                 f"{empty:.1f} s with none -> {again['start_s'] / empty:.2f}x; registry.load_stored of "
                 f"{reg['load_stored_count']}: {reg['load_stored_s']:.1f} s "
                 f"({1e3 * reg['load_stored_s'] / max(1, reg['load_stored_count']):.1f} ms each)")
    for c in reg["counts"]:
        lines.append(f"Memory, {c['adapters']:>4} adapters registered via the upload path: "
                     f"{c['per_adapter_bytes'] / 2**20:.2f} MiB each vs {reg['file_bytes'] / 2**20:.2f} MiB file "
                     f"-> {c['per_adapter_vs_file']:.2f}x (upload {1e3 * c['upload_s_per_adapter']:.0f} ms each)")
    auto = results["servers"]["auto"]
    added = (auto["rss_after_uploads_mb"] - auto["rss_before_uploads_mb"]) * 2**20
    lines.append(f"Memory, server: RSS grew {added / 2**20:.0f} MiB for {auto['uploaded_adapters']} uploads of "
                 f"{auto['uploaded_file_bytes'] / 2**20:.0f} MiB of files -> {added / auto['uploaded_file_bytes']:.2f}x")
    return lines


def _targets(results: dict) -> list[str]:
    lines = ["Targets (fp32, 16 streams, 64 new tokens):", f"  {'target':52}{'ratio':>7}{'goal':>8}  result  detail"]
    for t in results["targets"]:
        goal = f"{'>=' if t['higher_is_better'] else '<='}{t['goal']:g}"
        lines.append(f"  {t['name']:52}{t['ratio']:>7.2f}{goal:>8}  {'PASS' if t['passed'] else 'MISS':6}  {t['detail']}")
    return lines


def render(results: dict) -> str:
    meta = results["meta"]
    head = [f"loraplex bench: {meta['model']} {meta['dtype']}, {meta['cpu']}, {meta['cores']} cores, "
            f"{meta['threads']} torch threads, torch {meta['torch']}; {'quick' if meta['quick'] else 'full'} run "
            f"{meta['started']}, {meta['seconds'] / 60:.1f} min; load average {meta['load_average_start']:.2f} at "
            f"start, {meta['load_average_end']:.2f} at end"]
    run_probes = probes(meta)
    for when, free in free_at(run_probes).items():
        p = run_probes[when]
        head.append(f"Contention probe {'between the servers' if when == 'between' else 'at ' + when}: {gemm(p)} "
                    f"({'cores look free' if free else 'CORES SHARED: figures skewed'})"
                    f"; memory read {p['read_gbps']:.0f} GB/s on {p['threads']} threads")
    head.append(verdict(results))
    sections = [head, _workloads(results), _engine(results), _baselines(results), _ceiling(results), _micro(results),
                _targets(results)]
    return "\n\n".join("\n".join(s) for s in sections)
