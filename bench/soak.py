"""`python -m bench.soak [--minutes 10]`: does the server's memory settle on a plateau under long mixed traffic?

One real server (the default model, the shipped adapters preloaded, --max-batch 16, an admin key so every
request is authenticated) takes a warm-up of traffic, then the soak: a few closed-loop clients send native and
OpenAI chat requests, streamed or not, with the shipped adapters, uploaded ones or none, of varied lengths;
some hang up mid-stream or give up before the answer, some are refused (422, 404, 413); meanwhile a manager
uploads adapters with fresh random weights, replaces and deletes them, keeping about MAX_EXTRA alive. The
server's RSS is sampled throughout; the target is RSS at the end (after an idle pause) over RSS after the
warm-up (after the same pause). Exits non-zero on a miss or on any server error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import torch

from adapters import peft_folder_files, random_adapter
from bench.fixtures import ALL_R16, QV_R8, SMOLLM2_SHAPES
from tests.integration.server_process import ServerProcess

RESULTS_DIR = Path(__file__).parent / "results"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "adapters" / "shipped"
SHIPPED = ("pirate", "butler", "coach", "summarizer", "qa")
TARGET = 1.3
STREAMS = 8
MAX_EXTRA = 20
SAMPLE_EVERY_S = 2.0
IDLE_S = 5.0
REQUEST_TIMEOUT_S = 180
MAX_JSON_BYTES = 1 << 20  # the server's default --max-json-bytes
WORDS = ("the keeper lamp storm boat rocks harbour night tide wind ledger rope gull lantern shore wave "
         "captain cargo north south island fog bell cliff river market bread letter clock garden").split()
_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def memory_detail(pid: int) -> dict[str, float]:
    """The anonymous and huge-page parts of the RSS, in MiB, to tell heap growth from other memory."""
    wanted = ("Rss", "Anonymous", "AnonHugePages", "Shared_Clean", "Private_Clean")
    detail = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = line.split(":")[0]
        if key in wanted:
            detail[key] = int(line.split()[1]) / 1024
    return detail


class RssSamples:
    """(seconds since the first sample, RSS MiB) every SAMPLE_EVERY_S, and named moments on the same clock."""

    def __init__(self, pid: int):
        self.pid, self.samples, self.marks = pid, [], {}
        self.started = time.monotonic()

    def mark(self, moment: str) -> None:
        self.marks[moment] = round(time.monotonic() - self.started, 1)

    async def run(self) -> None:
        while True:
            self.samples.append((round(time.monotonic() - self.started, 1), round(rss_mb(self.pid), 1)))
            await asyncio.sleep(SAMPLE_EVERY_S)


class Tally:
    """Requests by kind and outcome; every server error or broken exchange is also kept as a failure."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []

    def record(self, kind: str, outcome: int | str, detail: str = "") -> None:
        self.counts[f"{kind} {outcome}"] += 1
        if isinstance(outcome, str) and outcome.startswith("error") or isinstance(outcome, int) and outcome >= 500:
            self.failures.append(f"{kind} {outcome} {detail[:300]}")

    def answer(self, kind: str, status: int, ok: set[int], detail: str) -> None:
        self.record(kind, status if status in ok or status >= 500 else f"unexpected {status}", detail)


def random_files(seed: int) -> dict[str, bytes]:
    kind = ALL_R16 if seed % 5 == 0 else QV_R8  # a fifth of them 19.7 MiB, the rest 1.8 MiB
    return peft_folder_files(random_adapter("soak", SMOLLM2_SHAPES, kind.rank, 2.0 * kind.rank, kind.targets,
                                            seed, init_std=0.02))


class Traffic:
    def __init__(self, http: aiohttp.ClientSession, url: str, model_id: str, seed: int):
        self.http, self.url, self.model_id = http, url, model_id
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.extras: list[str] = []
        self.uploaded = 0
        self.deadline = 0.0

    async def run(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        loops = [self.client() for _ in range(STREAMS)] + [self.manager()]
        await asyncio.wait_for(asyncio.gather(*loops), seconds + REQUEST_TIMEOUT_S)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    # what one request asks for

    def adapter(self) -> str | None:
        draw = self.rng.random()
        if draw < 0.3 and self.extras:
            return self.rng.choice(self.extras)
        return None if draw > 0.75 else self.rng.choice(SHIPPED)

    def text(self) -> str:
        return " ".join(self.rng.choices(WORDS, k=self.rng.choice((3, 20, 80, 250, 450))))

    def sampling(self) -> dict:
        body = {"temperature": self.rng.choice((0, 0.7, 1.0)), "ignore_eos": self.rng.random() < 0.3}
        return body | ({"seed": self.rng.randrange(2**32)} if self.rng.random() < 0.5 else {})

    def native(self, adapter: str | None, stream: bool) -> dict:
        text = {"prompt": self.text()} if self.rng.random() < 0.5 else \
            {"messages": [{"role": "user", "content": self.text()}]}
        return {**text, "adapter": adapter, "max_new_tokens": self.rng.choice((1, 8, 32, 96, 160)),
                "stream": stream, **self.sampling()}

    def chat(self, adapter: str | None, stream: bool) -> dict:
        messages = [{"role": "system", "content": self.text()}] if self.rng.random() < 0.3 else []
        return {"model": adapter or self.model_id, "messages": [*messages, {"role": "user", "content": self.text()}],
                "max_tokens": self.rng.choice((1, 8, 32, 96, 160)), "stream": stream, **self.sampling()}

    # the exchanges

    def ok(self, adapter: str | None) -> set[int]:
        return {200, 404} if adapter in self.extras else {200}  # an uploaded adapter may be deleted meanwhile

    async def exchange(self, kind: str, method: str, path: str, ok: set[int], cut_after: int | None = None,
                       **send) -> int | None:
        try:
            async with self.http.request(method, self.url + path, **send) as response:
                if response.status == 200 and send.get("json", {}).get("stream"):
                    await self.read_stream(kind, response, cut_after)
                else:
                    self.tally.answer(kind, response.status, ok, (await response.read()).decode(errors="replace"))
                return response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.tally.record(kind, f"error {type(exc).__name__}", str(exc))
            return None

    async def read_stream(self, kind: str, response: aiohttp.ClientResponse, cut_after: int | None) -> None:
        events = 0
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue
            if b'"error"' in line:
                self.tally.record(kind, "error in stream", line.decode(errors="replace"))
                return
            events += 1
            if cut_after is not None and events >= cut_after:
                response.close()  # hang up: the server must notice and free the request's slot
                self.tally.record(kind, "hung up")
                return
        self.tally.record(kind, 200)

    async def give_up(self, body: dict) -> None:
        """A non-streaming request abandoned before its answer: the server hears only the disconnect."""
        try:
            await asyncio.wait_for(self.exchange("gave-up", "POST", "/generate", self.ok(body["adapter"]),
                                                 json={**body, "max_new_tokens": 160}), 0.5)
        except asyncio.TimeoutError:
            self.tally.record("gave-up", "hung up")

    async def one_request(self) -> None:
        draw, adapter, stream = self.rng.random(), self.adapter(), self.rng.random() < 0.5
        ok, kind = self.ok(adapter), "-stream" * stream
        if draw < 0.35:
            await self.exchange("generate" + kind, "POST", "/generate", ok, json=self.native(adapter, stream))
        elif draw < 0.65:
            await self.exchange("chat" + kind, "POST", "/v1/chat/completions", ok, json=self.chat(adapter, stream))
        elif draw < 0.75:
            await self.exchange("hang-up", "POST", "/generate", ok, cut_after=self.rng.randint(1, 20),
                                json={**self.native(adapter, True), "max_new_tokens": 160})
        elif draw < 0.8:
            await self.give_up(self.native(adapter, False))
        elif draw < 0.88:
            bad = self.rng.choice(({"max_new_tokens": 0}, {"temperature": 9.0}, {"top_p": 0}, {"stop": [""]}))
            await self.exchange("bad-params", "POST", "/generate", {422}, json={**self.native(adapter, False), **bad})
        elif draw < 0.96:
            missing = self.chat(f"no-such-{self.rng.randrange(10**6)}", False)
            await self.exchange("unknown-adapter", "POST", "/v1/chat/completions", {404}, json=missing)
        else:
            oversized = json.dumps({"prompt": "x" * MAX_JSON_BYTES, "max_new_tokens": 8}).encode()
            await self.exchange("too-large", "POST", "/generate", {413}, data=oversized,
                                headers={"Content-Type": "application/json"})

    async def client(self) -> None:
        while self.running():
            await self.one_request()

    # adapter management

    async def upload(self, name: str, replace: bool) -> bool:
        self.uploaded += 1
        files = await asyncio.to_thread(random_files, self.rng.randrange(2**31))
        form = aiohttp.FormData({"name": name, "replace": "true" if replace else "false"})
        for file_name, data in files.items():
            form.add_field("files", data, filename=file_name)
        return await self.exchange("replace" if replace else "upload", "POST", "/adapters", {201}, data=form) == 201

    async def manager(self) -> None:
        while self.running():
            await self.manage_one()

    async def manage_one(self) -> None:
        if len(self.extras) < MAX_EXTRA:
            name = f"soak-{self.uploaded}"
            if not await self.upload(name, replace=False):
                return
            self.extras.append(name)
        elif self.rng.random() < 0.5:
            name = self.rng.choice(self.extras)
            await self.upload(name, replace=True)
        else:
            gone = self.extras.pop(self.rng.randrange(len(self.extras)))
            await self.exchange("delete", "DELETE", f"/adapters/{gone}", {204})
            return
        await self.exchange("use-new", "POST", "/generate", {200},
                            json={"prompt": self.text(), "adapter": name, "max_new_tokens": 4, "temperature": 0})


async def settled_rss(pid: int) -> tuple[float, dict]:
    await asyncio.sleep(IDLE_S)
    return rss_mb(pid), memory_detail(pid)


async def soak(url: str, pid: int, key: str, warmup_s: float, soak_s: float, seed: int) -> dict:
    sampler = RssSamples(pid)
    sampling = asyncio.create_task(sampler.run())
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"},
                                     timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as http:
        async with http.get(f"{url}/health") as response:
            model_id = (await response.json())["model"]
        start = rss_mb(pid)
        traffic = Traffic(http, url, model_id, seed)
        log(f"warm-up: {warmup_s:.0f} s of traffic (RSS {start:.0f} MiB)")
        await traffic.run(warmup_s)
        sampler.mark("warmup_traffic_end")
        warm, warm_detail = await settled_rss(pid)
        log(f"soak: {soak_s:.0f} s of traffic (RSS after warm-up {warm:.0f} MiB)")
        sampler.mark("soak_start")
        await traffic.run(soak_s)
        sampler.mark("soak_traffic_end")
        end, end_detail = await settled_rss(pid)
    sampling.cancel()
    peak = max(mb for _, mb in sampler.samples)
    return {"target": TARGET, "ratio": end / warm, "passed": end / warm <= TARGET and not traffic.tally.failures,
            "rss_mb": {"start": start, "after_warmup": warm, "peak_sampled": peak, "peak_hwm": rss_mb(pid, "VmHWM"),
                       "end": end},
            "memory_detail_mb": {"after_warmup": warm_detail, "end": end_detail},
            "requests": dict(sorted(traffic.tally.counts.items())), "failures": traffic.tally.failures,
            "adapters_uploaded": traffic.uploaded, "extra_adapters_alive": len(traffic.extras),
            "rss_marks_s": sampler.marks, "rss_samples": sampler.samples}


def summary(report: dict) -> str:
    rss = report["rss_mb"]
    lines = [f"RSS MiB: start {rss['start']:.0f}, after warm-up {rss['after_warmup']:.0f}, "
             f"peak {rss['peak_sampled']:.0f} (high-water mark {rss['peak_hwm']:.0f}), end {rss['end']:.0f}",
             f"end / after warm-up: {report['ratio']:.2f}x (target <= {TARGET}x): "
             f"{'PASS' if report['ratio'] <= TARGET else 'MISS'}",
             "requests: " + ", ".join(f"{k}: {v}" for k, v in report["requests"].items())]
    lines += [f"{len(report['failures'])} server errors or broken exchanges:", *report["failures"][:20]] \
        if report["failures"] else ["no server errors"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="soak length after the warm-up (default 10)")
    parser.add_argument("--warmup-minutes", type=float, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where soak-<time>.json goes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so the server is stopped
    torch.set_num_threads(1)  # the random adapters are made beside the server, on its cores
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="loraplex-soak-") as tmp:
        server = ServerProcess(Path(tmp) / "store", "--preload-dir", str(SHIPPED_DIR),
                               log_path=Path(tmp) / "server.log", env={"LORAPLEX_ADMIN_KEYS": key})
        try:
            server.start(timeout=300)
            log(f"server {server.proc.pid} healthy at {server.url}")
            report = asyncio.run(soak(server.url, server.proc.pid, key, 60 * args.warmup_minutes,
                                      60 * args.minutes, args.seed))
            if report["failures"]:
                print(server.log_path.read_text()[-4000:], file=sys.stderr)
        finally:
            server.stop()
    report["meta"] = {"minutes": args.minutes, "warmup_minutes": args.warmup_minutes, "streams": STREAMS,
                      "max_extra_adapters": MAX_EXTRA, "idle_s": IDLE_S, "seed": args.seed,
                      "started": started}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    log(f"wrote {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
